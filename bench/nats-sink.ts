/**
 * NATS JetStream sink throughput: 20k messages through `sink.write` in batches of 500 against
 * the local server (scripts/services start nats), next to the raw client (js.publish with the
 * same bodies, msgID and window) at the same moment, since the machine's load moves both
 * figures. DESIGN.md: raw acked publish with 256 in flight ≈ 20k msg/s on the reference machine.
 *
 *   node_modules/.bin/bun bench/nats-sink.ts [total=20000] [batch=500] [max_in_flight=256]
 */
import { connect } from "nats";
import * as v from "valibot";
import natsSink from "../src/backends/nats/sink.ts";
import { NatsSinkConfig } from "../src/backends/nats/config.ts";
import { envelopeJson } from "../src/message.ts";
import { benchContext, benchBatches, timedWrites, median } from "./lib.ts";
import { forwardMessages } from "../test/helpers/messages.ts";
import { NATS_URL, requireServer } from "../test/helpers/servers.ts";

const total = Number(process.argv[2] ?? 20_000);
const batchSize = Number(process.argv[3] ?? 500);
const maxInFlight = Number(process.argv[4] ?? 256);
const rounds = Number(process.env.ROUNDS ?? 3);

await requireServer("nats");
const run = `${process.pid}_${Date.now() % 1e6}`;
const ctx = benchContext();
const nc = await connect({ servers: NATS_URL });
const jsm = await nc.jetstreamManager();
const js = nc.jetstream();
const encoder = new TextEncoder();

async function viaSink(round: number): Promise<number> {
  const stream = `BENCH_${run}_${round}`;
  const sink = natsSink.create(
    v.parse(NatsSinkConfig, { url: NATS_URL, subject_template: `bench${run}_${round}.{stream_table}.{op}`, stream, create_stream: true, max_in_flight: maxInFlight }),
    ctx,
  );
  await sink.start();
  // Distinct outbox ids per batch and round, so no publish is a dedup hit.
  const batches = benchBatches(total, batchSize, round * 1_000_000 + 1);
  await sink.write(forwardMessages(200, { outboxId: round * 1_000_000 + 999_999 })); // warm-up
  const secs = await timedWrites(sink, batches);
  await sink.close();
  const stored = (await jsm.streams.info(stream)).state.messages;
  if (stored !== total + 200) throw new Error(`stream holds ${stored} messages, expected ${total + 200}`);
  await jsm.streams.delete(stream);
  return Math.round(total / secs);
}

async function raw(round: number): Promise<number> {
  const stream = `BENCHRAW_${run}_${round}`;
  const subject = `benchraw${run}_${round}.orders.insert`;
  await jsm.streams.add({ name: stream, subjects: [subject] });
  const all = forwardMessages(total, { outboxId: round + 1 });
  let next = 0;
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: maxInFlight }, async () => {
      while (next < all.length) {
        const m = all[next++]!;
        await js.publish(subject, encoder.encode(envelopeJson(m)), { msgID: m.dedup_key });
      }
    }),
  );
  const secs = (performance.now() - t0) / 1000;
  await jsm.streams.delete(stream);
  return Math.round(total / secs);
}

const sinkRates: number[] = [];
const rawRates: number[] = [];
for (let round = 0; round < rounds; round++) {
  rawRates.push(await raw(round));
  sinkRates.push(await viaSink(round));
}
await nc.close();
const rate = median(sinkRates);
const rawRate = median(rawRates);
console.log(`nats sink: ${total} messages in batches of ${batchSize}, max_in_flight ${maxInFlight}, median of ${rounds} interleaved rounds`);
console.log(`  raw js.publish, one continuous window  ${rawRate} msg/s  (${rawRates.join(", ")})`);
console.log(`  sink.write                             ${rate} msg/s  (${sinkRates.join(", ")}) = ${((rate / rawRate) * 100).toFixed(0)} % of raw`);
