/**
 * Startup cost of one relay process: wall time and peak RSS of `--version`, `help`, a cold
 * `drain --allow-empty` on a database whose catalog has no pipeline, and a cold `drain` of one
 * outbox → stdout pipeline with nothing pending (what every drain pays before its first row:
 * lock session, LISTEN, the pipeline's start), for the sources under Bun and for the compiled
 * executable (peak RSS through GNU time). Medians of `runs` runs each, run in turn so that load
 * on the machine touches every command alike.
 *
 *   node_modules/.bin/bun bench/startup.ts [runs=15]
 *
 * PGTRICKLE_RELAY_MAIN (default src/main.ts) and PGTRICKLE_RELAY_BIN (default
 * dist/pgtrickle-relay, from scripts/build --native) pick what is measured;
 * PGTRICKLE_RELAY_BEFORE_MAIN and PGTRICKLE_RELAY_BEFORE_BIN add another checkout's to the same
 * rotation, for a before/after comparison that the machine's load touches alike.
 */
import { existsSync, mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createStreamTable, enableOutbox } from "../test/fixtures/outbox.ts";
import { testDatabase } from "../test/helpers/pg.ts";
import { median } from "./lib.ts";

const runs = Number(process.argv[2] ?? 15);
const root = join(import.meta.dir, "..");
const main = process.env.PGTRICKLE_RELAY_MAIN ?? join(root, "src/main.ts");
const exe = process.env.PGTRICKLE_RELAY_BIN ?? join(root, "dist/pgtrickle-relay");
if (!existsSync(exe)) throw new Error(`${exe} is missing: scripts/build --native`);

const db = await testDatabase("bench_startup");
const idle = await testDatabase("bench_startup_idle");
await createStreamTable(idle.sql, "public.idle", "id int primary key");
await enableOutbox(idle.sql, "public.idle");
await idle.sql`SELECT pgtrickle.set_relay_outbox('idle', 'public.idle', NULL, '{"type": "stdout"}'::jsonb)`;
const commands: Record<string, string[]> = {
  "--version": ["--version"],
  help: ["help"],
  "cold drain, empty catalog": ["drain", "--postgres-url", db.url, "--allow-empty"],
  "cold drain, one idle pipeline": ["drain", "--postgres-url", idle.url],
};
const programs: Record<string, string[]> = { [`bun ${main.replace(`${root}/`, "")}`]: [process.execPath, main], [exe.replace(`${root}/`, "")]: [exe] };
const before = { main: process.env.PGTRICKLE_RELAY_BEFORE_MAIN, exe: process.env.PGTRICKLE_RELAY_BEFORE_BIN };
if (before.main) programs[`before: bun ${before.main}`] = [process.execPath, before.main];
if (before.exe) programs[`before: ${before.exe}`] = [before.exe];

const TIME = "/usr/bin/time";
if (!existsSync(TIME)) throw new Error(`${TIME} (GNU time) is missing: it measures the peak RSS`);
const rssFile = join(mkdtempSync(join(tmpdir(), "relay-startup-")), "rss");

/**
 * Wall milliseconds and peak RSS (MiB) of one run; a failing command stops the bench. The peak
 * comes from GNU time, not from this process's spawn: a child forked from this (larger) process
 * counts the parent's pages it shares before exec in its maxrss.
 */
async function once(argv: string[]): Promise<{ ms: number; mib: number }> {
  const t0 = performance.now();
  const proc = Bun.spawn([TIME, "-f", "%M", "-o", rssFile, ...argv], { stdout: "ignore", stderr: "pipe" });
  const [stderr, code] = await Promise.all([new Response(proc.stderr).text(), proc.exited]);
  const ms = performance.now() - t0;
  if (code !== 0) throw new Error(`${argv.join(" ")} exited ${code}: ${stderr}`);
  return { ms, mib: Number(readFileSync(rssFile, "utf8").trim()) / 1024 };
}

try {
  const samples = new Map<string, { ms: number[]; mib: number[] }>();
  for (let r = 0; r < runs; r++) {
    for (const [program, prefix] of Object.entries(programs)) {
      for (const [command, args] of Object.entries(commands)) {
        const key = `${program}\t${command}`;
        const s = samples.get(key) ?? { ms: [], mib: [] };
        const { ms, mib } = await once([...prefix, ...args]);
        s.ms.push(ms);
        s.mib.push(mib);
        samples.set(key, s);
      }
    }
  }
  console.log(`medians of ${runs} runs (load average ${(await Bun.file("/proc/loadavg").text()).split(" ").slice(0, 3).join(" ")})`);
  console.log("| program | command | wall | peak RSS |\n|---|---|---|---|");
  for (const [key, s] of samples) {
    const [program, command] = key.split("\t");
    console.log(`| ${program} | ${command} | ${median(s.ms).toFixed(0)} ms | ${median(s.mib).toFixed(0)} MiB |`);
  }
} finally {
  await db.drop();
  await idle.drop();
}
