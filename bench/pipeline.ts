/**
 * The forward data path end to end, for profiling the pipeline loop: `messages` outbox messages
 * in change sets of `perRow` rows, drained by a cold `pgtrickle-relay drain` to Redis Streams or
 * a file; prints msg/s (process start included) and the relay's CPU time and checks every message arrived.
 *
 *   node_modules/.bin/bun bench/pipeline.ts [redis|file] [messages=200000] [perRow=10] [extra relay args…]
 *
 * PGTRICKLE_BENCH_PROFILE=dir runs the relay under `bun --cpu-prof --cpu-prof-dir=dir` (the
 * profile of the drain, read with any Chrome-profile viewer). bench/e2e.ts compares every sink
 * and source with its raw client; this one only times the relay, to see what a change bought.
 */
import { Redis } from "ioredis";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createStreamTable, enableOutbox } from "../test/fixtures/outbox.ts";
import { testDatabase } from "../test/helpers/pg.ts";
import { relayCommand } from "../test/helpers/relay.ts";
import { REDIS_URL, requireServer } from "../test/helpers/servers.ts";

const [sinkType = "redis", messagesArg = "200000", perRowArg = "10", ...extra] = process.argv.slice(2);
const messages = Number(messagesArg);
const perRow = Number(perRowArg);
const rows = Math.ceil(messages / perRow);
if (sinkType !== "redis" && sinkType !== "file") throw new Error(`sink must be redis or file, not ${sinkType}`);
if (sinkType === "redis") await requireServer("redis");

const db = await testDatabase("bench_pipeline");
const key = `bench:pipeline:${process.pid}`;
const redis = sinkType === "redis" ? new Redis(REDIS_URL) : null;
try {
  await createStreamTable(db.sql, "public.bench", "id int primary key");
  const { outboxTable } = await enableOutbox(db.sql, "public.bench");
  await db.sql.unsafe(`INSERT INTO pgtrickle."${outboxTable}" (inserted_count, payload)
    SELECT ${perRow}, jsonb_build_object('v', 1, 'deleted', '[]'::jsonb, 'inserted',
      (SELECT jsonb_agg(jsonb_build_object('id', g * ${perRow} + i, 'name', 'row ' || g, 'amount', g * 1.5)) FROM generate_series(1, ${perRow}) i))
    FROM generate_series(1, ${rows}) g`);
  const file = join(mkdtempSync(join(tmpdir(), "relay-bench-")), "out.jsonl");
  const sink = sinkType === "redis" ? { type: "redis", url: REDIS_URL, stream_key: key } : { type: "file", output: file };
  await db.sql`SELECT pgtrickle.set_relay_outbox('bench_pipe', 'public.bench', NULL, ${db.sql.json(sink)})`;
  const profile = process.env.PGTRICKLE_BENCH_PROFILE;
  const cmd = relayCommand(["drain", "--postgres-url", db.url, "--pipeline", "bench_pipe", "--log-level", "warn", ...extra]);
  if (profile) cmd.splice(1, 0, "--cpu-prof", `--cpu-prof-dir=${profile}`);
  const t0 = performance.now();
  const drain = Bun.spawn(cmd, { stdout: "inherit", stderr: "inherit" });
  if ((await drain.exited) !== 0) throw new Error("drain failed");
  const secs = (performance.now() - t0) / 1000;
  const arrived = redis ? await redis.xlen(key) : readFileSync(file, "utf8").split("\n").filter(Boolean).length;
  if (arrived !== rows * perRow) throw new Error(`expected ${rows * perRow} messages, got ${arrived}`);
  const cpu = drain.resourceUsage()?.cpuTime;
  const cpuSecs = cpu ? Number(cpu.user + cpu.system) / 1e6 : NaN;
  // CPU seconds of the relay process: the figure a loaded machine moves least.
  console.log(`${sinkType}, ${rows} rows × ${perRow}: ${arrived} messages in ${secs.toFixed(2)} s = ${Math.round(arrived / secs)} msg/s; relay CPU ${cpuSecs.toFixed(2)} s`);
} finally {
  await redis?.del(key);
  redis?.disconnect();
  await db.drop();
}
