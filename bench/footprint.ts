/**
 * Footprint of one relay process, for sizing (docs/operations.md, the Helm chart's requests):
 * resident memory and CPU of the compiled executable (dist/pgtrickle-relay, or
 * PGTRICKLE_RELAY_BIN) running P pipelines that read one outbox into files, and the PostgreSQL
 * connections it holds. Phases: idle; steady load (R outbox rows per second, K rows each, so
 * every pipeline relays R×K messages/s); catching up a backlog of B rows after a restart.
 *
 *   node_modules/.bin/bun bench/footprint.ts [pipelines=10] [rows_per_s=100] [rows_each=10] [backlog=20000]
 */
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createStreamTable, enableOutbox, writeV1Inline } from "../test/fixtures/outbox.ts";
import { testDatabase } from "../test/helpers/pg.ts";
import { RunningRelay } from "../test/helpers/relay.ts";

const [pipelines, rate, each, backlog] = [10, 100, 10, 20000].map((d, i) => Number(process.argv[2 + i] ?? d)) as [number, number, number, number];
const exe = process.env.PGTRICKLE_RELAY_BIN ?? join(import.meta.dir, "..", "dist", "pgtrickle-relay");
if (!existsSync(exe)) throw new Error(`${exe} is missing: scripts/build --native`);
process.env.PGTRICKLE_RELAY_BIN = exe;

const db = await testDatabase("bench_footprint");
const dir = mkdtempSync(join(tmpdir(), "relay-footprint-"));
const ticks = 100; // USER_HZ on Linux
const MiB = 2 ** 20;

function sample(pid: number): { rss: number; cpu: number } {
  const rss = Number(/^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, "utf8"))![1]) * 1024;
  const fields = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1]!.split(" ");
  return { rss, cpu: (Number(fields[11]) + Number(fields[12])) / ticks };
}

/** Peak and mean RSS and mean CPU (cores) of pid over seconds, sampled every 250 ms. */
async function observe(pid: number, seconds: number, until?: () => Promise<boolean>) {
  const start = sample(pid);
  const t0 = performance.now();
  let peak = 0;
  let sum = 0;
  let n = 0;
  while ((performance.now() - t0) / 1000 < seconds && !(until && (await until()))) {
    const s = sample(pid);
    peak = Math.max(peak, s.rss);
    sum += s.rss;
    n++;
    await Bun.sleep(250);
  }
  const elapsed = (performance.now() - t0) / 1000;
  return { peak: peak / MiB, mean: sum / n / MiB, cores: (sample(pid).cpu - start.cpu) / elapsed, elapsed };
}

const fmt = (o: { peak: number; mean: number; cores: number }) => `RSS mean ${o.mean.toFixed(0)} MiB, peak ${o.peak.toFixed(0)} MiB, CPU ${(o.cores * 100).toFixed(0)}% of a core`;
const lineCount = (f: string) => (existsSync(f) ? readFileSync(f, "utf8").split("\n").length - 1 : 0);
let relay: RunningRelay | undefined;

try {
  await createStreamTable(db.sql, "public.fp", "id int primary key, note text");
  const { outboxTable } = await enableOutbox(db.sql, "public.fp");
  for (let p = 0; p < pipelines; p++) {
    await db.sql`SELECT pgtrickle.set_relay_outbox(${`fp_${p}`}, 'public.fp', NULL, ${db.sql.json({ type: "file", output: join(dir, `fp_${p}.jsonl`) })})`;
  }
  const start = () => new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0", "--log-level", "warn", "--max-workers", String(pipelines)]);
  relay = start();
  const pid = relay.proc.pid;
  const owned = async () => (await db.sql<{ n: number }[]>`SELECT count(*)::int AS n FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2`)[0]!.n;
  while ((await owned()) < pipelines) await Bun.sleep(100);
  await Bun.sleep(2000);
  const idle = await observe(pid, 10);
  const connections = (await db.sql<{ n: number }[]>`SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE 'pgtrickle-relay%'`)[0]!.n;
  console.log(`${pipelines} pipelines, idle: ${fmt(idle)}; PostgreSQL connections of the process: ${connections}`);

  let id = 0;
  let writing = true;
  const row = () => Array.from({ length: each }, () => ({ id: id++, note: "x".repeat(100) }));
  const writer = (async () => {
    while (writing) {
      const t = performance.now();
      await writeV1Inline(db.sql, outboxTable, { inserted: row(), deleted: [] });
      await Bun.sleep(Math.max(0, 1000 / rate - (performance.now() - t)));
    }
  })();
  const load = await observe(pid, 20);
  writing = false;
  await writer;
  console.log(`load, ${rate} outbox rows/s × ${each} rows = ${rate * each} messages/s per pipeline, ${rate * each * pipelines} in all: ${fmt(load)}`);

  await relay.stop("SIGTERM");
  const before = lineCount(join(dir, "fp_0.jsonl"));
  for (let i = 0; i < backlog; i += 100) {
    await db.sql.begin(async (tx) => {
      for (let j = 0; j < 100; j++) await writeV1Inline(tx as never, outboxTable, { inserted: row(), deleted: [] });
    });
  }
  const wanted = before + backlog * each;
  relay = start();
  const done = async () => lineCount(join(dir, `fp_${pipelines - 1}.jsonl`)) >= wanted && lineCount(join(dir, "fp_0.jsonl")) >= wanted;
  const catchUp = await observe(relay.proc.pid, 600, done);
  console.log(`catch-up of ${backlog} outbox rows (${backlog * each * pipelines} messages in all) after a restart: ${catchUp.elapsed.toFixed(1)} s, ${fmt(catchUp)}`);
} finally {
  await relay?.stop("SIGKILL");
  await db.drop();
  rmSync(dir, { recursive: true, force: true });
}
