/**
 * One claim-check change set of N rows drained from a cold process into a file, beside a raw
 * postgres.js loop doing the same reading and writing in the same run.
 *
 *   node_modules/.bin/bun bench/claim-check.ts [rows=1000000]
 *
 * Writes one v1 claim-check header (`is_claim_check`, N inserted rows announced) and its N delta
 * rows ({id, customer, amount}: ≈ 50 B of JSON each) with one INSERT … SELECT generate_series,
 * registers an outbox → file pipeline (jsonl, fsync per batch: the defaults) and runs
 * `drain` once: the compiled binary when PGTRICKLE_RELAY_BIN is set, else `bun src/main.ts`.
 * Then the raw loop (this script with `--raw`, a child process too): postgres.js pages the same
 * rows by the same keyset query and page size (claim_check_fetch_size's default), writes the same
 * envelopes as JSON Lines to a file, fsyncs once at the end. Both run under `/usr/bin/time` for
 * their peak RSS; both files are checked to hold N lines. Prints rows/s, peak RSS, CPU time.
 *
 * Environment: PGTRICKLE_RELAY_MAIN (another main.ts, e.g. a checkout of an older commit),
 * CLAIM_RELAY_ARGS (more `drain` arguments, e.g. `--sink-max-inflight 3000`), CLAIM_BUN_FLAGS (Bun
 * flags for the sources, e.g. `--cpu-prof --cpu-prof-dir=/tmp/p`), CLAIM_FETCH_SIZE (the page size
 * of both, instead of claim_check_fetch_size's default).
 */
import { closeSync, existsSync, fsyncSync, mkdtempSync, openSync, readFileSync, rmSync, writeSync } from "node:fs";
import { loadavg, tmpdir } from "node:os";
import { join } from "node:path";
import postgres from "postgres";
import { OutboxSourceConfig } from "../src/backends/outbox/config.ts";
import { createStreamTable, enableOutbox, ident } from "../test/fixtures/outbox.ts";
import { testDatabase } from "../test/helpers/pg.ts";
import { relayCommand } from "../test/helpers/relay.ts";
import * as v from "valibot";

const PAGE = Number(process.env.CLAIM_FETCH_SIZE ?? v.parse(OutboxSourceConfig, { outbox: "x" }).claim_check_fetch_size);

if (process.argv[2] === "--raw") {
  const [, , , url, outboxTable, deltaTable, streamTable, outboxId, file] = process.argv;
  await rawLoop(url!, outboxTable!, deltaTable!, streamTable!, outboxId!, file!);
  process.exit(0);
}

const N = Number(process.argv[2] ?? 1_000_000);
const TIME = "/usr/bin/time";
if (!existsSync(TIME)) throw new Error(`${TIME} is missing: it measures the peak RSS (apt-get install time)`);
const run = Math.random().toString(36).slice(2, 8);
const dir = mkdtempSync(join(tmpdir(), "relay-claim-"));
const db = await testDatabase("bench_claim");
try {
  const streamTable = `claim_${run}`;
  await createStreamTable(db.sql, `public.${streamTable}`, "id int primary key");
  const { outboxTable, deltaTable } = await enableOutbox(db.sql, `public.${streamTable}`);
  const t0 = performance.now();
  const outboxId = await db.sql.begin(async (tx) => {
    const [row] = await tx.unsafe(
      `INSERT INTO pgtrickle.${ident(outboxTable)} (inserted_count, deleted_count, is_claim_check, payload)
       VALUES (${N}, 0, true, jsonb_build_object('v', 1, 'claim_check', true, 'inserted_count', ${N}, 'deleted_count', 0)) RETURNING id::text AS id`,
    );
    const id = (row as unknown as { id: string }).id;
    await tx.unsafe(
      `INSERT INTO pgtrickle.${ident(deltaTable)} (outbox_id, row_op, row_data, row_num)
       SELECT ${id}, 'INSERT', jsonb_build_object('id', g, 'customer', 'c' || (g % 97), 'amount', g * 1.5), g
         FROM generate_series(1, ${N}) g`,
    );
    return id;
  });
  await db.sql.unsafe(`VACUUM ANALYZE pgtrickle.${ident(deltaTable)}`);
  console.log(`${N} delta rows written in ${((performance.now() - t0) / 1000).toFixed(1)} s; page size ${PAGE}`);

  const relayFile = join(dir, "relay.jsonl");
  const name = `claim_${run}`;
  await db.sql`SELECT pgtrickle.set_relay_outbox(${name}, ${`public.${streamTable}`}, NULL, ${db.sql.json({ type: "file", output: relayFile })})`;
  await db.sql`UPDATE pgtrickle.relay_outbox_config SET config = jsonb_set(config, '{source,claim_check_fetch_size}', ${PAGE}::text::jsonb) WHERE name = ${name}`;
  const main = process.env.PGTRICKLE_RELAY_MAIN;
  const relay = (args: string[]) => (main ? [process.execPath, main, ...args] : relayCommand(args));
  const which = main ? `bun ${main}` : process.env.PGTRICKLE_RELAY_BIN ? `binary ${process.env.PGTRICKLE_RELAY_BIN}` : "bun src/main.ts";
  const drain = relay(["drain", "--postgres-url", db.url, "--pipeline", name, "--log-level", "warn", "--metrics-addr", "127.0.0.1:0", ...(process.env.CLAIM_RELAY_ARGS ?? "").split(" ").filter(Boolean)]);
  // A profile (CLAIM_BUN_FLAGS) is summarised with bench/cpuprofile.ts.
  const bunFlags = which.startsWith("binary") ? [] : (process.env.CLAIM_BUN_FLAGS ?? "").split(" ").filter(Boolean);
  drain.splice(1, 0, ...bunFlags);
  report(`relay drain (${which}${bunFlags.length ? ` ${bunFlags.join(" ")}` : ""})`, await timed(drain), relayFile);

  const rawFile = join(dir, "raw.jsonl");
  report("raw postgres.js loop", await timed([process.execPath, import.meta.path, "--raw", db.url, outboxTable, deltaTable, streamTable, outboxId, rawFile]), rawFile);
  console.log(`load average ${loadavg().map((l) => l.toFixed(2)).join(" ")}`);
} finally {
  await db.drop();
  rmSync(dir, { recursive: true, force: true });
}

interface Timed {
  wall: number;
  maxRssKb: number;
  user: number;
  system: number;
}

/** Runs `cmd` under /usr/bin/time; fails unless it exits 0. */
async function timed(cmd: string[]): Promise<Timed> {
  const out = join(dir, "time.txt");
  const t0 = performance.now();
  const proc = Bun.spawn([TIME, "-o", out, "-f", "%M %U %S", ...cmd], { stdout: "inherit", stderr: "inherit" });
  if ((await proc.exited) !== 0) throw new Error(`${cmd.join(" ")} exited ${proc.exitCode}`);
  const wall = (performance.now() - t0) / 1000;
  const [maxRssKb, user, system] = readFileSync(out, "utf8").trim().split("\n").pop()!.split(" ").map(Number);
  return { wall, maxRssKb: maxRssKb!, user: user!, system: system! };
}

function report(what: string, t: Timed, file: string) {
  const lines = countLines(file);
  if (lines !== N) throw new Error(`${what}: ${file} holds ${lines} lines, expected ${N}`);
  console.log(
    `${what}: ${N} rows in ${t.wall.toFixed(2)} s = ${Math.round(N / t.wall)} rows/s, peak RSS ${(t.maxRssKb / 1024).toFixed(0)} MB, CPU user ${t.user.toFixed(2)} s + system ${t.system.toFixed(2)} s`,
  );
}

function countLines(file: string): number {
  const bytes = readFileSync(file);
  let n = 0;
  for (let i = bytes.indexOf(10); i >= 0; i = bytes.indexOf(10, i + 1)) n++;
  return n;
}

/**
 * The raw loop: the relay's keyset page query, the same envelope (dedup key, subject of the
 * default template, payload, op, flags, outbox id, refresh id), one write per page, fsync at the end.
 */
async function rawLoop(url: string, outboxTable: string, deltaTable: string, streamTable: string, outboxId: string, file: string) {
  const sql = postgres(url, { max: 1 });
  const fd = openSync(file, "a");
  const subject = `pgtrickle.${streamTable}.insert`;
  const table = sql(["pgtrickle", deltaTable].join("."));
  let after = "0";
  let index = 0;
  for (;;) {
    const page = await sql<{ row_num: string; data: unknown }[]>`
      SELECT d.row_num::text AS row_num, d.row_data AS data FROM ${table} AS d
      WHERE d.outbox_id = ${outboxId}::bigint AND d.row_op = ANY(${["INSERT", "I"]}) AND d.row_num > ${after}::bigint
      ORDER BY d.row_num LIMIT ${PAGE}`;
    if (page.length === 0) break;
    let text = "";
    for (const r of page) {
      text += JSON.stringify({
        dedup_key: `${outboxTable}:${outboxId}:${index++}`,
        subject,
        payload: r.data,
        op: "insert",
        is_full_refresh: false,
        outbox_id: Number(outboxId),
        refresh_id: null,
      }) + "\n";
    }
    writeSync(fd, text);
    after = page[page.length - 1]!.row_num;
    if (page.length < PAGE) break;
  }
  fsyncSync(fd);
  closeSync(fd);
  await sql.end();
}
