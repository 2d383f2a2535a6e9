/**
 * The outbox → file/Redis per-message path alone, in this process, against the raw loop's work.
 *
 *   node_modules/.bin/bun bench/forward-path.ts [rows-per-set=10] [messages=200000] [rounds=5] [raw|file|redis|redis-send]
 *
 * Reads an outbox of `messages` messages (bench/lib.ts fillOutbox, as bench/e2e.ts writes it) in
 * polls of 1000 messages' worth of header rows, and turns each poll into what the sinks hand the
 * OS or the client library, with no sink I/O:
 *   - raw: bench/e2e.ts's raw loop (`SELECT id, payload`, one envelope object and JSON.stringify
 *     per message, lines joined);
 *   - relay file: the outbox source's reader and message building (src/backends/outbox/) and the
 *     file sink's formatMessages (JSON Lines);
 *   - relay redis: the same messages and the Redis sink's XADD field items;
 *   - with `redis-send`: the raw loop's XADDs (ioredis, 1000 per pipeline, as bench/e2e.ts sends
 *     them) against the relay's source and Redis sink writing, both to a real Redis — what the
 *     client library costs on each side.
 * Prints the median of `rounds` rounds of this process's CPU time per message (user + system:
 * on a shared machine it varies far less than wall time), database round trips included. The
 * process is warm after the first round: what a cold `drain` adds (its start, the JIT compiling
 * the relay's code) is bench/e2e.ts's to show.
 */
import * as v from "valibot";
import { formatMessages } from "../src/backends/file/sink.ts";
import { OutboxSourceConfig } from "../src/backends/outbox/config.ts";
import { OutboxSource } from "../src/backends/outbox/source.ts";
import { entryFields } from "../src/backends/redis/sink.ts";
import redisSink from "../src/backends/redis/sink.ts";
import { RedisSinkConfig } from "../src/backends/redis/config.ts";
import type { Message } from "../src/message.ts";
import { Redis } from "ioredis";
import { REDIS_URL } from "../test/helpers/servers.ts";
import { createStreamTable, enableOutbox, ident } from "../test/fixtures/outbox.ts";
import { testDatabase } from "../test/helpers/pg.ts";
import { benchContext, fillOutbox, median } from "./lib.ts";

const rowsPerSet = Number(process.argv[2] ?? 10);
const total = Number(process.argv[3] ?? 200_000);
const rounds = Number(process.argv[4] ?? 5);
const only = process.argv[5];
const BATCH = 1000;

const db = await testDatabase("bench_forward_path");
let sink = 0; // results feed this, so the work cannot be optimized away
try {
  const streamTable = `fp_${Math.random().toString(36).slice(2, 8)}`;
  await createStreamTable(db.sql, `public.${streamTable}`, "id int primary key");
  const { outboxTable } = await enableOutbox(db.sql, `public.${streamTable}`);
  await fillOutbox(db.sql, outboxTable, rowsPerSet, total);

  const redis = new Redis(REDIS_URL);
  const streamKey = `bench:${streamTable}`;

  async function raw(send = false) {
    let last = "0";
    const subject = `pgtrickle.${streamTable}.insert`;
    for (;;) {
      const rows = await db.sql.unsafe<{ id: string; payload: { inserted: unknown[] } }[]>(
        `SELECT o.id::text AS id, o.payload FROM pgtrickle.${ident(outboxTable)} o WHERE o.id > $1::bigint ORDER BY o.id LIMIT $2`,
        [last, BATCH / rowsPerSet],
      );
      if (rows.length === 0) break;
      const bodies: string[] = [];
      const p = send ? redis.pipeline() : null;
      for (const row of rows) {
        const outboxId = Number(row.id);
        row.payload.inserted.forEach((payload, i) => {
          const dedupKey = `${outboxTable}:${row.id}:${i}`;
          if (p) p.xadd(streamKey, "*", "dedup_key", dedupKey, "pgt_dedup_key", dedupKey, "subject", subject, "op", "insert", "payload", JSON.stringify(payload), "full_refresh", "false", "outbox_id", String(outboxId));
          else bodies.push(JSON.stringify({ dedup_key: dedupKey, subject, payload, op: "insert", is_full_refresh: false, outbox_id: outboxId, refresh_id: null }));
        });
      }
      if (p) {
        for (const [err] of (await p.exec())!) if (err) throw err;
      } else sink += (bodies.join("\n") + "\n").length;
      last = rows[rows.length - 1]!.id;
    }
  }

  async function relay(use: (messages: Message[]) => unknown) {
    const cfg = v.parse(OutboxSourceConfig, { outbox: `public.${streamTable}`, batch_size: BATCH / rowsPerSet, max_batch_messages: BATCH, start_position: "earliest" });
    const source = new OutboxSource(cfg, benchContext({ sql: db.sql, pipeline: "bench", drain: true }));
    await source.start();
    for await (const batch of source.batches(new AbortController().signal)) await use(batch.messages);
  }

  const cases: [string, string, () => Promise<void>][] = [
    ["raw", "raw (2 columns, envelope objects, JSON Lines)", () => raw()],
    ["file", "relay → file (formatMessages jsonl)", () => relay((ms) => (sink += formatMessages("jsonl", ms).length))],
    ["redis", "relay → Redis (XADD field items)", () => relay((ms) => { for (const m of ms) sink += entryFields(m).length; })],
    ["redis-send", "raw → Redis (XADD, 1000 per pipeline)", () => raw(true)],
    ["redis-send", "relay → Redis (the sink's write)", async () => {
      const redisOut = redisSink.create(v.parse(RedisSinkConfig, { url: REDIS_URL, stream_key: streamKey }), benchContext());
      await redisOut.start();
      await relay((ms) => redisOut.write(ms));
      await redisOut.close();
    }],
  ];
  for (const [key, name, fn] of cases) {
    if (only && key !== only) continue;
    const ns: number[] = [];
    for (let r = 0; r < rounds; r++) {
      await redis.del(streamKey); // the Redis cases' entries: one round's at most
      const t0 = process.cpuUsage();
      await fn();
      const cpu = process.cpuUsage(t0);
      ns.push(((cpu.user + cpu.system) * 1000) / total);
    }
    console.log(`${name.padEnd(50)} ${median(ns).toFixed(0).padStart(6)} ns/message (rounds: ${ns.map((x) => x.toFixed(0)).join(", ")})`);
  }
  await redis.del(streamKey);
  redis.disconnect();
} finally {
  await db.drop();
}
if (sink < 0) console.log(sink);
