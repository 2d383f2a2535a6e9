/**
 * Forward benchmark: outbox → relay → file/stdout, against the local PostgreSQL.
 *
 *   node_modules/.bin/bun bench/forward.ts [rows=50000] [rate=200] [seconds=15]
 *
 * 1. Throughput: `rows` outbox rows (one row each, v1 inline) written up front, then
 *    `pgtrickle-relay drain` to a file; reports rows/s of the drain (process start included).
 * 2. Latency: a running relay with a stdout sink; a writer commits one outbox row every
 *    1/rate s for `seconds`; each line is timestamped when it arrives on the relay's stdout and
 *    compared with the writer's commit time. Reports p50/p95/p99 of commit → delivered.
 * Set PGTRICKLE_RELAY_BIN to measure the compiled binary instead of the sources.
 */
import { testDatabase } from "../test/helpers/pg.ts";
import { createStreamTable, enableOutbox } from "../test/fixtures/outbox.ts";
import { relayCommand } from "../test/helpers/relay.ts";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const rows = Number(process.argv[2] ?? 50_000);
const rate = Number(process.argv[3] ?? 200);
const seconds = Number(process.argv[4] ?? 15);

const db = await testDatabase("bench_forward");
try {
  await createStreamTable(db.sql, "public.bench", "id int primary key");
  const { outboxTable } = await enableOutbox(db.sql, "public.bench");
  const dir = mkdtempSync(join(tmpdir(), "relay-bench-"));
  const file = join(dir, "out.jsonl");

  // ---- throughput ----
  await db.sql.unsafe(`INSERT INTO pgtrickle."${outboxTable}" (inserted_count, payload)
    SELECT 1, jsonb_build_object('v', 1, 'inserted', jsonb_build_array(jsonb_build_object('id', g, 'name', 'row ' || g, 'amount', g * 1.5)), 'deleted', '[]'::jsonb)
    FROM generate_series(1, ${rows}) g`);
  await db.sql`SELECT pgtrickle.set_relay_outbox('bench_tp', 'public.bench', NULL, ${db.sql.json({ type: "file", output: file })})`;
  await db.sql`UPDATE pgtrickle.relay_outbox_config SET config = jsonb_set(config, '{source,batch_size}', '1000') WHERE name = 'bench_tp'`;
  const t0 = performance.now();
  const drain = Bun.spawn(relayCommand(["drain", "--postgres-url", db.url, "--pipeline", "bench_tp", "--log-level", "warn"]), { stdout: "inherit", stderr: "inherit" });
  if ((await drain.exited) !== 0) throw new Error("drain failed");
  const elapsed = (performance.now() - t0) / 1000;
  const lines = readFileSync(file, "utf8").split("\n").filter(Boolean).length;
  if (lines !== rows) throw new Error(`expected ${rows} lines, got ${lines}`);
  console.log(`throughput: ${rows} rows drained to a file (fsync per batch of 1000) in ${elapsed.toFixed(2)} s = ${Math.round(rows / elapsed)} rows/s`);
  await db.sql`SELECT pgtrickle.disable_relay('bench_tp')`;

  // ---- latency ----
  await db.sql`SELECT pgtrickle.set_relay_outbox('bench_lat', 'public.bench', NULL, ${db.sql.json({ type: "stdout" })})`;
  const [top] = await db.sql.unsafe<{ max: string }[]>(`SELECT max(id)::text AS max FROM pgtrickle."${outboxTable}"`);
  const max = top!.max;
  await db.sql`INSERT INTO pgtrickle.relay_consumer_offsets (relay_group_id, pipeline_id, last_change_id) VALUES ('default', 'bench_lat', ${max}::bigint)`;
  const relay = Bun.spawn(relayCommand(["run", "--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0", "--log-level", "warn"]), { stdout: "pipe", stderr: "inherit" });
  process.on("exit", () => relay.kill("SIGKILL")); // never leave the relay behind if the bench fails
  const arrived = new Map<number, number>();
  const reading = (async () => {
    let buf = "";
    const dec = new TextDecoder();
    for await (const chunk of relay.stdout) {
      const now = performance.now();
      buf += dec.decode(chunk, { stream: true });
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        arrived.set((JSON.parse(line) as { outbox_id: number }).outbox_id, now);
      }
    }
  })();
  await Bun.sleep(1500); // relay started and idle
  const committed = new Map<number, number>();
  const total = Math.round(rate * seconds);
  const start = performance.now();
  for (let i = 0; i < total; i++) {
    const due = start + (i * 1000) / rate;
    const wait = due - performance.now();
    if (wait > 0) await Bun.sleep(wait);
    const [r] = await db.sql.unsafe(`INSERT INTO pgtrickle."${outboxTable}" (inserted_count, payload) VALUES (1, '{"v":1,"inserted":[{"id":${i}}],"deleted":[]}') RETURNING id::int AS id`);
    committed.set((r as unknown as { id: number }).id, performance.now());
  }
  const deadline = performance.now() + 10_000;
  while (arrived.size < total && performance.now() < deadline) await Bun.sleep(50);
  relay.kill("SIGTERM");
  await relay.exited;
  await reading;
  const lat = [...committed].filter(([id]) => arrived.has(id)).map(([id, t]) => arrived.get(id)! - t).sort((a, b) => a - b);
  const pct = (p: number) => lat[Math.min(lat.length - 1, Math.floor((p / 100) * lat.length))]!.toFixed(1);
  console.log(`latency: ${lat.length}/${total} rows at ${rate}/s for ${seconds} s, commit → on the relay's stdout: p50 ${pct(50)} ms, p95 ${pct(95)} ms, p99 ${pct(99)} ms, max ${lat[lat.length - 1]!.toFixed(1)} ms`);
  if (lat.length !== total) throw new Error(`${total - lat.length} rows did not arrive`);
} finally {
  await db.drop();
}
