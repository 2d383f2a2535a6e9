/**
 * Kafka sink against the real single-node KRaft broker of scripts/services (127.0.0.1:9092).
 * Every record written is read back with a kafkajs consumer.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { Kafka, logLevel, type Admin, type IHeaders } from "kafkajs";
import * as v from "valibot";
import kafkaSink from "../../src/backends/kafka/sink.ts";
import type { Sink } from "../../src/backends/types.ts";
import { envelopeJson } from "../../src/message.ts";
import { log } from "../../src/observe/log.ts";
import { backendContext, expectRelayError } from "../helpers/backend.ts";
import { forwardMessages } from "../helpers/messages.ts";
import { KAFKA_BROKERS, requireServer } from "../helpers/servers.ts";

const RUN = `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`;
const topicName = (label: string) => `relaytest.${RUN}.${label}`;

const ctx = () => backendContext("kafka_test", { log: log.withTag("kafka-test") });

const spec = kafkaSink;
function makeSink(options: Record<string, unknown>): Sink {
  const parsed = v.safeParse(spec.config, { type: "kafka", brokers: KAFKA_BROKERS.join(","), ...options });
  if (!parsed.success) throw new Error(`bad test config: ${parsed.issues[0].message}`);
  return spec.create(parsed.output, ctx());
}

function configIssue(options: Record<string, unknown>): string | undefined {
  const parsed = v.safeParse(spec.config, { brokers: KAFKA_BROKERS, ...options });
  return parsed.success ? undefined : parsed.issues.map((i) => i.message).join("; ");
}

const client = new Kafka({ clientId: "kafka-sink-test", brokers: KAFKA_BROKERS, logLevel: logLevel.NOTHING });
let admin: Admin;
const sinks: Sink[] = [];
function track(s: Sink): Sink {
  sinks.push(s);
  return s;
}

interface Record_ {
  topic: string;
  partition: number;
  offset: string;
  key: string | null;
  value: string;
  headers: Record<string, string>;
}

const headersOf = (h: IHeaders | undefined) =>
  Object.fromEntries(Object.entries(h ?? {}).map(([k, val]) => [k, Array.isArray(val) ? String(val[0]) : String(val)]));

/** Reads every record of the topics from the beginning until `expected` arrived (or 30 s passed). */
async function consume(topics: string[], expected: number): Promise<Record_[]> {
  const consumer = client.consumer({ groupId: `relaytest-${RUN}-${Math.random().toString(36).slice(2)}` });
  const out: Record_[] = [];
  await consumer.connect();
  try {
    await consumer.subscribe({ topics, fromBeginning: true });
    let resolveDone!: () => void;
    const done = new Promise<void>((r) => (resolveDone = r));
    await consumer.run({
      eachMessage: async ({ topic, partition, message }) => {
        out.push({
          topic,
          partition,
          offset: message.offset,
          key: message.key?.toString() ?? null,
          value: message.value?.toString() ?? "",
          headers: headersOf(message.headers),
        });
        if (out.length >= expected) resolveDone();
      },
    });
    await Promise.race([done, Bun.sleep(30_000)]);
    // Anything beyond `expected` (duplicates) would arrive right behind; give it a moment.
    await Bun.sleep(500);
  } finally {
    await consumer.disconnect();
  }
  return out;
}

beforeAll(async () => {
  await requireServer("kafka");
  admin = client.admin();
  await admin.connect();
});

afterAll(async () => {
  await Promise.allSettled(sinks.map((s) => s.close()));
  const mine = (await admin.listTopics()).filter((t) => t.startsWith(`relaytest.${RUN}.`));
  if (mine.length) await admin.deleteTopics({ topics: mine }).catch(() => {});
  await admin.disconnect();
});

describe("kafka sink", () => {
  test("start() fails with a config error naming a missing topic", async () => {
    const topic = topicName("missing");
    const sink = track(makeSink({ topic }));
    const err = await expectRelayError(sink.start(), "config");
    expect(err.message).toContain(topic);
    expect(err.message).toContain("create_topic");
    expect(await admin.listTopics()).not.toContain(topic);
  });

  test("N messages arrive with envelope body, dedup header, full-refresh header, keys in order per key", async () => {
    const topic = topicName("orders");
    const sink = track(makeSink({ topic, create_topic: true, num_partitions: 3, key_field: "customer" }));
    await sink.start();
    expect(await admin.listTopics()).toContain(topic);
    const plain = forwardMessages(300, { outboxId: 10 });
    const refresh = forwardMessages(20, { outboxId: 11, full_refresh: true, payload: (i) => ({ id: 1000 + i, customer: `c${i % 7}` }) });
    const batch = [...plain, ...refresh];
    expect(await sink.write(batch.slice(0, 160))).toEqual([]);
    expect(await sink.write(batch.slice(160))).toEqual([]);

    const records = await consume([topic], batch.length);
    expect(records.length).toBe(batch.length);
    const byDedup = new Map(batch.map((m) => [m.dedup_key, m]));
    const partitionOfKey = new Map<string, number>();
    const lastIdOfKey = new Map<string, number>();
    records.sort((a, b) => a.partition - b.partition || Number(BigInt(a.offset) - BigInt(b.offset)));
    for (const r of records) {
      const m = byDedup.get(r.headers.pgt_dedup_key!)!;
      expect(m).toBeDefined();
      expect(r.value).toBe(envelopeJson(m));
      expect(r.key).toBe((m.payload as { customer: string }).customer);
      if (m.is_full_refresh) expect(r.headers["pgtrickle-full-refresh"]).toBe("true");
      else expect(r.headers["pgtrickle-full-refresh"]).toBeUndefined();
      // One key → one partition, and within it the order of the batch.
      const p = partitionOfKey.get(r.key!);
      if (p !== undefined) expect(r.partition).toBe(p);
      partitionOfKey.set(r.key!, r.partition);
      const id = (m.payload as { id: number }).id;
      expect(id).toBeGreaterThan(lastIdOfKey.get(r.key!) ?? -1);
      lastIdOfKey.set(r.key!, id);
      byDedup.delete(r.headers.pgt_dedup_key!);
    }
    expect(byDedup.size).toBe(0);
    expect(new Set(partitionOfKey.values()).size).toBeGreaterThan(1);
  }, 60_000);

  test("default key is the dedup key; key_template renders per message", async () => {
    const t1 = topicName("dedupkey");
    const t2 = topicName("keytpl");
    const a = track(makeSink({ topic: t1, create_topic: true }));
    const b = track(makeSink({ topic: t2, create_topic: true, key_template: "{op}:{outbox_id}:{customer}" }));
    await a.start();
    await b.start();
    const batch = forwardMessages(5, { outboxId: 77 });
    expect(await a.write(batch)).toEqual([]);
    expect(await b.write(batch)).toEqual([]);
    const ra = await consume([t1], 5);
    expect(ra.map((r) => r.key).sort()).toEqual(batch.map((m) => m.dedup_key).sort());
    const rb = await consume([t2], 5);
    expect(rb.map((r) => r.key).sort()).toEqual(batch.map((m) => `insert:77:${(m.payload as { customer: string }).customer}`).sort());
  }, 60_000);

  test("topic_template routes per message; a row rendering an illegal topic is rejected, the rest delivered", async () => {
    const prefix = topicName("tpl");
    const sink = track(makeSink({ topic_template: `${prefix}.{region}`, create_topic: true }));
    await sink.start();
    const batch = forwardMessages(9, { payload: (i) => ({ id: i, region: ["eu", "us", "bad region!"][i % 3] }) });
    const rejected = await sink.write(batch);
    expect(rejected.map((r) => r.message.dedup_key)).toEqual(batch.filter((_, i) => i % 3 === 2).map((m) => m.dedup_key));
    expect(rejected[0]!.error).toContain("not a legal Kafka topic name");
    const records = await consume([`${prefix}.eu`, `${prefix}.us`], 6);
    expect(records.length).toBe(6);
    for (const r of records) {
      const region = (JSON.parse(r.value) as { payload: { region: string } }).payload.region;
      expect(r.topic).toBe(`${prefix}.${region}`);
    }
  }, 60_000);

  test("a templated topic that does not exist (create_topic false) is a transient error naming it", async () => {
    const prefix = topicName("absent");
    const sink = track(makeSink({ topic_template: `${prefix}.{stream_table}` }));
    await sink.start();
    const err = await expectRelayError(sink.write(forwardMessages(2)), "transient");
    expect(err.message).toContain(`${prefix}.orders`);
  });

  test("a message larger than the topic's max.message.bytes is rejected, the others delivered", async () => {
    const topic = topicName("small");
    await admin.createTopics({ topics: [{ topic, numPartitions: 1, configEntries: [{ name: "max.message.bytes", value: "4096" }] }] });
    const sink = track(makeSink({ topic }));
    await sink.start();
    const batch = forwardMessages(40, { payload: (i) => ({ id: i, blob: i === 17 ? "x".repeat(8000) : "y".repeat(300) }) });
    const rejected = await sink.write(batch);
    expect(rejected.map((r) => r.message.dedup_key)).toEqual([batch[17]!.dedup_key]);
    expect(rejected[0]!.error).toContain("max.message.bytes");
    // 39 × ~500 bytes do not fit one 4 KiB record batch: the sink must have split them.
    const records = await consume([topic], 39);
    expect(records.map((r) => r.headers.pgt_dedup_key)).toEqual(batch.filter((_, i) => i !== 17).map((m) => m.dedup_key));
  }, 60_000);

  test("when the broker refuses a batch as too large (limit set too high), the offending message is isolated", async () => {
    const topic = topicName("lying");
    await admin.createTopics({ topics: [{ topic, numPartitions: 1, configEntries: [{ name: "max.message.bytes", value: "4096" }] }] });
    // max_message_bytes above the topic's real limit: the size pre-check lets everything through.
    const sink = track(makeSink({ topic, max_message_bytes: 100_000 }));
    await sink.start();
    const batch = forwardMessages(12, { payload: (i) => ({ id: i, blob: i === 5 ? "x".repeat(8000) : "y".repeat(100) }) });
    const rejected = await sink.write(batch);
    expect(rejected.map((r) => r.message.dedup_key)).toEqual([batch[5]!.dedup_key]);
    expect(rejected[0]!.error).toContain("larger than the max message size");
    const records = await consume([topic], 11);
    expect(records.map((r) => r.headers.pgt_dedup_key)).toEqual(batch.filter((_, i) => i !== 5).map((m) => m.dedup_key));
  }, 60_000);

  test("write reconnects after close()", async () => {
    const topic = topicName("reconnect");
    const sink = track(makeSink({ topic, create_topic: true }));
    await sink.start();
    expect(await sink.write(forwardMessages(3))).toEqual([]);
    await sink.close();
    expect(await sink.write(forwardMessages(3, { outboxId: 2 }))).toEqual([]);
    expect((await consume([topic], 6)).length).toBe(6);
  }, 60_000);

  test("gzip compression and acks=1 deliver", async () => {
    const topic = topicName("gzip");
    const sink = track(makeSink({ topic, create_topic: true, compression: "gzip", acks: 1 }));
    await sink.start();
    const batch = forwardMessages(50);
    expect(await sink.write(batch)).toEqual([]);
    const records = await consume([topic], 50);
    expect(records.map((r) => r.value).sort()).toEqual(batch.map(envelopeJson).sort());
  }, 60_000);

  test("an unreachable broker is a transient error naming host:port", async () => {
    const sink = track(spec.create(v.parse(spec.config, { brokers: "127.0.0.1:1", topic: "t", connection_timeout_ms: 500 }), ctx()));
    const err = await expectRelayError(sink.start(), "transient");
    expect(err.message).toContain("127.0.0.1:1");
  }, 60_000);

  test("SASL against a listener without SASL is a config error that does not leak the password", async () => {
    const password = `s3cret-${RUN}`;
    const sink = track(
      makeSink({ topic: "t", security_protocol: "SASL_PLAINTEXT", sasl_mechanism: "SCRAM-SHA-512", sasl_username: "relay", sasl_password: password }),
    );
    const err = await expectRelayError(sink.start(), "config");
    expect(err.message).toContain("sasl");
    expect(err.message).toContain("127.0.0.1:9092");
    expect(err.message).not.toContain(password);
    expect(sink.describe).not.toContain(password);
  }, 60_000);

  test("configuration mistakes are refused by the schema with the key named", () => {
    expect(configIssue({ topic: "t", compression: "brotli" })).toContain("compression");
    expect(configIssue({ topic: "has space" })).toContain("topic");
    expect(configIssue({})).toContain("topic");
    expect(configIssue({ topic: "a", topic_template: "b.{op}" })).toContain("either");
    expect(configIssue({ topic: "t", acks: "2" })).toContain("acks");
    expect(configIssue({ topic: "t", sasl_mechanism: "plain", sasl_username: "u", sasl_password: "p" })).toContain("SASL_PLAINTEXT");
    expect(configIssue({ topic: "t", security_protocol: "SASL_SSL", sasl_mechanism: "plain" })).toContain("sasl_password");
    expect(configIssue({ topic: "t", key_field: "a", key_template: "{b}" })).toContain("key_template");
    expect(configIssue({ topic: "t", brokers: " , " })).toContain("brokers");
    // `topic` with placeholders is a template; arrays of brokers are accepted.
    const ok = v.parse(spec.config, { brokers: ["a:1", "b:2"], topic: "pgtrickle.{stream_table}", acks: "all" });
    expect(ok.topic_template).toBe("pgtrickle.{stream_table}");
    expect(ok.topic).toBeUndefined();
    expect(ok.acks).toBe(-1);
  });
});

