/**
 * Redis Streams sink throughput: 20k messages through `sink.write` in batches of 500 against the
 * local server (scripts/services start redis), with plain XADD and with the Lua dedup
 * (`dedup_window_seconds`), next to raw pipelined XADD from ioredis at the same moment (the
 * machine's load moves every figure; DESIGN.md: raw ≈ 70–100k/s on the reference machine).
 *
 *   node_modules/.bin/bun bench/redis-sink.ts [total=20000] [batch=500]
 */
import { Redis } from "ioredis";
import * as v from "valibot";
import redisSink from "../src/backends/redis/sink.ts";
import { RedisSinkConfig } from "../src/backends/redis/config.ts";
import { benchBatches, benchContext, median, timedWrites } from "./lib.ts";
import { forwardMessages } from "../test/helpers/messages.ts";
import { REDIS_URL, requireServer } from "../test/helpers/servers.ts";

const total = Number(process.argv[2] ?? 20_000);
const batchSize = Number(process.argv[3] ?? 500);

await requireServer("redis");
const run = `${process.pid}_${Date.now() % 1e6}`;
const ctx = benchContext();
const batches = benchBatches(total, batchSize);
const admin = new Redis(REDIS_URL);

async function viaSink(label: string, options: Record<string, unknown>): Promise<number> {
  const key = `bench:${run}:${label}`;
  const sink = redisSink.create(v.parse(RedisSinkConfig, { url: REDIS_URL, stream_key: key, ...options }), ctx);
  await sink.start();
  await sink.write(forwardMessages(200, { outboxId: 1_000_000 })); // warm-up
  const secs = await timedWrites(sink, batches);
  await sink.close();
  const len = await admin.xlen(key);
  if (len !== total + 200) throw new Error(`${key} holds ${len} entries, expected ${total + 200}`);
  await admin.del(key, `${key}:pgt_dedup`);
  return Math.round(total / secs);
}

async function raw(): Promise<number> {
  const key = `bench:${run}:raw`;
  const t0 = performance.now();
  for (const batch of batches) {
    const p = admin.pipeline();
    for (const m of batch) {
      p.xadd(key, "*", "dedup_key", m.dedup_key, "pgt_dedup_key", m.dedup_key, "subject", m.subject, "op", m.op,
        "payload", JSON.stringify(m.payload), "full_refresh", "false", "outbox_id", String(m.outbox_id));
    }
    await p.exec();
  }
  const secs = (performance.now() - t0) / 1000;
  await admin.del(key);
  return Math.round(total / secs);
}

async function replayed(): Promise<number> {
  // A replay of everything within the window: every message is found and nothing is added.
  const key = `bench:${run}:replay`;
  const sink = redisSink.create(v.parse(RedisSinkConfig, { url: REDIS_URL, stream_key: key, dedup_window_seconds: 120 }), ctx);
  await sink.start();
  for (const batch of batches) await sink.write(batch);
  const t0 = performance.now();
  for (const batch of batches) await sink.write(batch);
  const rate = Math.round(total / ((performance.now() - t0) / 1000));
  if ((await admin.xlen(key)) !== total) throw new Error("the replay added entries");
  await sink.close();
  await admin.del(key, `${key}:pgt_dedup`);
  return rate;
}

// Interleaved rounds, median reported: the machine's load moves single runs a lot.
const rounds = Number(process.env.ROUNDS ?? 5);
const results: Record<string, number[]> = { raw: [], plain: [], dedup: [], replay: [] };
for (let i = 0; i < rounds; i++) {
  results.raw!.push(await raw());
  results.plain!.push(await viaSink("plain", {}));
  results.dedup!.push(await viaSink("dedup", { dedup_window_seconds: 120 }));
  results.replay!.push(await replayed());
}
admin.disconnect();
const [rawRate, plain, dedup, replay] = [results.raw!, results.plain!, results.dedup!, results.replay!].map(median) as [number, number, number, number];

console.log(`redis sink: ${total} messages in batches of ${batchSize}, median of ${rounds} interleaved rounds`);
console.log(`  raw pipelined XADD, same fields  ${rawRate} msg/s`);
console.log(`  sink, plain XADD                 ${plain} msg/s (${((plain / rawRate) * 100).toFixed(0)} % of raw)`);
console.log(`  sink, dedup_window_seconds 120   ${dedup} msg/s (${((dedup / rawRate) * 100).toFixed(0)} % of raw)`);
console.log(`  sink, dedup, replayed batches    ${replay} msg/s`);
