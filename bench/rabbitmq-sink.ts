/**
 * RabbitMQ sink throughput: 20k messages through `sink.write` in batches of 500 against the
 * local broker (scripts/services start rabbitmq): confirm channel, persistent messages into one
 * durable queue. Prints msg/s next to the raw amqplib figure (a confirm channel publishing the
 * same bodies and properties with the same window), in alternating rounds since machine load
 * moves both; DESIGN.md's raw ceiling here is ≈ 18k/s.
 *
 *   node_modules/.bin/bun bench/rabbitmq-sink.ts [total=20000] [batch=500] [max_in_flight=1000]
 */
import amqp from "amqplib";
import * as v from "valibot";
import rabbitmqSink from "../src/backends/rabbitmq/sink.ts";
import { envelopeJson } from "../src/message.ts";
import { benchContext, benchBatches, timedWrites } from "./lib.ts";
import { forwardMessages } from "../test/helpers/messages.ts";
import { AMQP_URL, requireServer } from "../test/helpers/servers.ts";

const total = Number(process.argv[2] ?? 20_000);
const batchSize = Number(process.argv[3] ?? 500);
const maxInFlight = Number(process.argv[4] ?? 1000);

await requireServer("rabbitmq");
const run = `${process.pid}_${Date.now() % 1e6}`;
const exchange = `bench.rabbit.${run}`;
const queue = `bench.rabbit.${run}`;
const ctx = benchContext();

const conn = await amqp.connect(AMQP_URL);
const admin = await conn.createChannel();
await admin.assertExchange(exchange, "topic", { durable: true });
await admin.assertQueue(queue, { durable: true });
await admin.bindQueue(queue, exchange, "#");

const sink = rabbitmqSink.create(v.parse(rabbitmqSink.config, { url: AMQP_URL, exchange, max_in_flight: maxInFlight }), ctx);
await sink.start();
const batches = benchBatches(total, batchSize);

const raw = await conn.createConfirmChannel();
async function rawWrite(batch: (typeof batches)[number]): Promise<void> {
  let inFlight = 0;
  let wake: (() => void) | undefined;
  const confirms: Promise<void>[] = [];
  for (const m of batch) {
    while (inFlight >= maxInFlight) await new Promise<void>((r) => (wake = r));
    inFlight++;
    confirms.push(
      new Promise<void>((resolve, reject) => {
        const ok = raw.publish(
          exchange,
          "orders.insert",
          Buffer.from(envelopeJson(m)),
          { persistent: true, mandatory: true, messageId: m.dedup_key, contentType: "application/json", headers: { pgt_dedup_key: m.dedup_key } },
          (err) => {
            inFlight--;
            wake?.();
            err ? reject(err) : resolve();
          },
        );
        void ok;
      }),
    );
  }
  await Promise.all(confirms);
}

await sink.write(forwardMessages(200, { outboxId: 1_000_000 })); // warm-up
await rawWrite(forwardMessages(200, { outboxId: 1_000_000 }));
const sinkTimes: number[] = [];
const rawTimes: number[] = [];
for (let round = 0; round < 3; round++) {
  sinkTimes.push(await timedWrites(sink, batches));
  const t0 = performance.now();
  for (const batch of batches) await rawWrite(batch);
  rawTimes.push((performance.now() - t0) / 1000);
}
await sink.close();

const stored = (await admin.checkQueue(queue)).messageCount;
if (stored !== 6 * total + 400) throw new Error(`queue holds ${stored} messages, expected ${6 * total + 400}`);
await admin.deleteQueue(queue);
await admin.deleteExchange(exchange);
await conn.close();

const secs = Math.min(...sinkTimes);
const rate = Math.round(total / secs);
const rawRate = Math.round(total / Math.min(...rawTimes));
console.log(
  `rabbitmq sink: ${total} messages in batches of ${batchSize}, max_in_flight ${maxInFlight}: ${secs.toFixed(2)} s = ${rate} msg/s ` +
    `(best of 3 alternating rounds; raw amqplib confirm publish, same window: ${rawRate} msg/s; sink/raw ${((rate / rawRate) * 100).toFixed(0)} %)`,
);
