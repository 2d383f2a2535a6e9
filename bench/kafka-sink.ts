/**
 * Kafka sink throughput: 20k messages through `sink.write` in batches of 500 against the local
 * broker (scripts/services start kafka), idempotent producer, acks=all, 3 partitions. Prints
 * msg/s next to the raw kafkajs figure (same producer settings, one sendBatch per 500 messages
 * with the same keys, bodies and headers) measured right after, since machine load moves both.
 *
 *   node_modules/.bin/bun bench/kafka-sink.ts [total=20000] [batch=500] [compression=none|gzip|snappy|lz4|zstd]
 */
import { Kafka, logLevel, Partitioners } from "kafkajs";
import * as v from "valibot";
import kafkaSink from "../src/backends/kafka/sink.ts";
import { COMPRESSION_TYPES, type KafkaCompression } from "../src/backends/kafka/codecs.ts";
import { envelopeJson } from "../src/message.ts";
import { benchContext, benchBatches, timedWrites } from "./lib.ts";
import { forwardMessages } from "../test/helpers/messages.ts";
import { KAFKA_BROKERS, requireServer } from "../test/helpers/servers.ts";

const total = Number(process.argv[2] ?? 20_000);
const batchSize = Number(process.argv[3] ?? 500);
const compression = (process.argv[4] ?? "none") as KafkaCompression;

await requireServer("kafka");
const run = `${process.pid}_${Date.now() % 1e6}`;
const topic = `bench.kafka.${run}`;
const rawTopic = `${topic}.raw`;
const ctx = benchContext();
const client = new Kafka({ clientId: "bench", brokers: KAFKA_BROKERS, logLevel: logLevel.NOTHING });
const admin = client.admin();
await admin.connect();
await admin.createTopics({ topics: [{ topic, numPartitions: 3 }, { topic: rawTopic, numPartitions: 3 }] });

const sink = kafkaSink.create(v.parse(kafkaSink.config, { brokers: KAFKA_BROKERS, topic, compression }), ctx);
await sink.start();
const batches = benchBatches(total, batchSize);
const producer = client.producer({ idempotent: true, maxInFlightRequests: 5, createPartitioner: Partitioners.DefaultPartitioner });
await producer.connect();
const rawWrite = (batch: (typeof batches)[number]) =>
  producer.sendBatch({
    acks: -1,
    compression: COMPRESSION_TYPES[compression],
    topicMessages: [
      {
        topic: rawTopic,
        messages: batch.map((m) => ({ key: m.dedup_key, value: envelopeJson(m), headers: { pgt_dedup_key: m.dedup_key } })),
      },
    ],
  });

await sink.write(forwardMessages(200, { outboxId: 1_000_000 })); // warm-up
await rawWrite(forwardMessages(200, { outboxId: 1_000_000 }));

// Three alternating rounds of each, best round reported: other work on the machine moves the
// figures a lot, and alternating exposes both to the same conditions.
const sinkTimes: number[] = [];
const rawTimes: number[] = [];
for (let round = 0; round < 3; round++) {
  sinkTimes.push(await timedWrites(sink, batches));
  const t0 = performance.now();
  for (const batch of batches) await rawWrite(batch);
  rawTimes.push((performance.now() - t0) / 1000);
}
await sink.close();
await producer.disconnect();

const count = async (t: string) => (await admin.fetchTopicOffsets(t)).reduce((n, p) => n + Number(p.high), 0);
const stored = await count(topic);
if (stored !== 3 * total + 200) throw new Error(`topic holds ${stored} records, expected ${3 * total + 200}`);
await admin.deleteTopics({ topics: [topic, rawTopic] });
await admin.disconnect();

const secs = Math.min(...sinkTimes);
const rawSecs = Math.min(...rawTimes);
const rate = Math.round(total / secs);
const raw = Math.round(total / rawSecs);
console.log(
  `kafka sink: ${total} messages in batches of ${batchSize}, compression ${compression}: ${secs.toFixed(2)} s = ${rate} msg/s ` +
    `(best of 3 alternating rounds; raw kafkajs sendBatch per batch: ${raw} msg/s; sink/raw ${((rate / raw) * 100).toFixed(0)} %)`,
);
