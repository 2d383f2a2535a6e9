/**
 * Kafka compression in both directions against the real broker of scripts/services
 * (127.0.0.1:9092), with the broker's own tools on the other side:
 * - records written by Kafka's console producer with each codec are relayed by the Kafka source
 *   into an inbox, every record once;
 * - the Kafka sink with each `compression` writes batches that the broker validated and stored
 *   with that codec, read back from its log segments by Kafka's own record classes
 *   (test/helpers/KafkaLogBatches.java).
 * The compiled binary's codecs are checked in binary.test.ts.
 */
import { afterAll, beforeAll, expect, test } from "bun:test";
import { Kafka, logLevel, type Admin } from "kafkajs";
import * as v from "valibot";
import kafkaSink from "../../src/backends/kafka/sink.ts";
import type { Rejection } from "../../src/backends/types.ts";
import type { Message } from "../../src/message.ts";
import { log } from "../../src/observe/log.ts";
import { backendContext } from "../helpers/backend.ts";
import { consoleProduce, storedRecords, type StoredRecord } from "../helpers/kafka.ts";
import { forwardMessages } from "../helpers/messages.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { relayOnce } from "../helpers/relay.ts";
import { inboxRows, setRelayInbox } from "../helpers/reverse.ts";
import { KAFKA_BROKERS, requireServer } from "../helpers/servers.ts";

const RUN = `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`;
const CODECS = ["gzip", "snappy", "lz4", "zstd"] as const;
/** Repetitive padding, so that every codec has something to compress. */
const PAD = "lorem ipsum dolor sit amet, ".repeat(10);

let db: TestDatabase;
const client = new Kafka({ clientId: "kafka-compression-test", brokers: KAFKA_BROKERS, logLevel: logLevel.NOTHING });
let admin: Admin;

beforeAll(async () => {
  await requireServer("kafka");
  await requireServer("postgres");
  db = await testDatabase("kafka_compression");
  admin = client.admin();
  await admin.connect();
});

afterAll(async () => {
  if (admin) {
    const mine = (await admin.listTopics()).filter((t) => t.startsWith(`relaycomp.${RUN}.`));
    if (mine.length) await admin.deleteTopics({ topics: mine }).catch(() => {});
    const groups = (await admin.listGroups()).groups.map((g) => g.groupId).filter((g) => g.startsWith(`relaycomp-${RUN}-`));
    if (groups.length) await admin.deleteGroups(groups).catch(() => {});
    await admin.disconnect();
  }
  await db?.drop();
});

const topicOf = (direction: string, codec: string) => `relaycomp.${RUN}.${direction}.${codec}`;

/** A Kafka sink with `options` started, given `messages` and closed; its rejections. */
async function writeThroughSink(name: string, options: Record<string, unknown>, messages: Message[]): Promise<Rejection[]> {
  const spec = kafkaSink;
  const config = v.parse(spec.config, { type: "kafka", brokers: KAFKA_BROKERS.join(","), ...options });
  const sink = spec.create(config, backendContext(name, { log: log.withTag("kafka-compression-test") }));
  try {
    await sink.start();
    return await sink.write(messages);
  } finally {
    await sink.close();
  }
}

/** Per topic: the codecs its batches were stored with, and its largest batch's record count. */
function batchesOf(records: StoredRecord[], topic: string): { codecs: string[]; largestBatch: number } {
  const sizes = new Map<string, number>();
  const codecs = new Set<string>();
  for (const r of records.filter((r) => r.topic === topic)) {
    codecs.add(r.codec);
    sizes.set(`${r.partition}:${r.batchOffset}`, (sizes.get(`${r.partition}:${r.batchOffset}`) ?? 0) + 1);
  }
  return { codecs: [...codecs], largestBatch: Math.max(0, ...sizes.values()) };
}

test("records the console producer wrote with gzip, snappy, lz4 and zstd reach the inbox, each once", async () => {
  // ~120 KB per batch: several of the Java client's LZ4 (64 KB) and snappy (32 KB) blocks.
  const N = 400;
  const linesOf = (codec: string) => Array.from({ length: N }, (_, i) => JSON.stringify({ codec, i, pad: PAD }));
  for (const codec of CODECS) {
    await admin.createTopics({ topics: [{ topic: topicOf("in", codec), numPartitions: 1 }], waitForLeaders: true });
  }
  for (const codec of CODECS) await consoleProduce(KAFKA_BROKERS, topicOf("in", codec), codec, linesOf(codec));

  // What the producer really wrote: each codec, and batches of over 64 KB (half the records).
  const stored = await storedRecords(KAFKA_BROKERS, CODECS.map((c) => topicOf("in", c)));
  for (const codec of CODECS) {
    const { codecs, largestBatch } = batchesOf(stored, topicOf("in", codec));
    expect({ codec, codecs, bigBatch: largestBatch >= N / 2 }).toEqual({ codec, codecs: [codec], bigBatch: true });
  }

  for (const codec of CODECS) {
    await setRelayInbox(db, `in_${codec}`, `in_${codec}_inbox`, {
      type: "kafka",
      brokers: KAFKA_BROKERS.join(","),
      topic: topicOf("in", codec),
      group_id: `relaycomp-${RUN}-${codec}`,
    });
  }
  const result = await relayOnce(["drain", "--postgres-url", db.url, "--timeout", "120"], {}, 180_000);
  expect(result.stderr).not.toContain("compression not implemented");
  expect(result.exitCode).toBe(0);

  for (const codec of CODECS) {
    const rows = await inboxRows(db, `in_${codec}_inbox`);
    const offsets = rows.map((r) => Number(r.event_id.split(":").at(-1))).sort((a, b) => a - b);
    expect({ codec, offsets }).toEqual({ codec, offsets: Array.from({ length: N }, (_, i) => i) });
    const payloads = rows.map((r) => r.payload).sort((a, b) => a.i - b.i);
    expect(payloads).toEqual(linesOf(codec).map((l) => JSON.parse(l)));
  }
}, 300_000);

test("the sink's compression gzip, snappy, lz4 and zstd is what the broker stores, and its records read back", async () => {
  // ~200 KB per batch: several LZ4 and snappy blocks.
  const N = 500;
  for (const codec of ["none", ...CODECS] as const) {
    const messages = forwardMessages(N, { stream_table: `comp_${codec}`, payload: (i) => ({ i, codec, pad: PAD }) });
    const options = { topic: topicOf("out", codec), create_topic: true, num_partitions: 1, compression: codec };
    expect(await writeThroughSink(`out_${codec}`, options, messages)).toEqual([]);
  }

  const topics = ["none", ...CODECS].map((c) => topicOf("out", c));
  const stored = await storedRecords(KAFKA_BROKERS, topics);
  for (const codec of ["none", ...CODECS]) {
    const { codecs, largestBatch } = batchesOf(stored, topicOf("out", codec));
    expect({ codec, codecs, severalPerBatch: largestBatch > 1 }).toEqual({ codec, codecs: [codec], severalPerBatch: true });
    const keys = stored.filter((r) => r.topic === topicOf("out", codec)).map((r) => JSON.parse(r.value).dedup_key);
    const expected = forwardMessages(N, { stream_table: `comp_${codec}` }).map((m) => m.dedup_key);
    expect({ codec, keys }).toEqual({ codec, keys: expected });
  }
}, 300_000);

test("a record over the topic's max.message.bytes that compresses below it is sent with every codec, refused without", async () => {
  const LIMIT = 64 * 1024;
  const big = forwardMessages(1, { stream_table: "comp_big", payload: () => ({ pad: PAD.repeat(1000) }) }); // ~280 KB
  for (const codec of ["none", ...CODECS] as const) {
    const topic = topicOf("big", codec);
    await admin.createTopics({
      topics: [{ topic, numPartitions: 1, configEntries: [{ name: "max.message.bytes", value: String(LIMIT) }] }],
      waitForLeaders: true,
    });
    const rejected = (await writeThroughSink(`big_${codec}`, { topic, compression: codec }, big)).map((r) => r.error.includes("max.message.bytes"));
    expect({ codec, rejected }).toEqual({ codec, rejected: codec === "none" ? [true] : [] });
  }
  const stored = await storedRecords(KAFKA_BROKERS, CODECS.map((c) => topicOf("big", c)));
  const sent = stored.map((r) => `${r.codec} ${JSON.parse(r.value).dedup_key}`).sort();
  expect(sent).toEqual(CODECS.map((c) => `${c} ${big[0]!.dedup_key}`).sort());
}, 300_000);
