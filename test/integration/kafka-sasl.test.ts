/**
 * Kafka over SASL_PLAINTEXT (127.0.0.1:9094 of scripts/services' broker): the sink delivers and
 * the source consumes with PLAIN and SCRAM-SHA-256 (and SCRAM-SHA-512); records are written and
 * read back with a kafkajs client using the same SASL settings. A wrong password is a config
 * error that never shows the password.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { Kafka, logLevel, type Admin, type SASLOptions } from "kafkajs";
import * as v from "valibot";
import kafkaSink from "../../src/backends/kafka/sink.ts";
import type { Sink } from "../../src/backends/types.ts";
import { log } from "../../src/observe/log.ts";
import { backendContext, expectRelayError } from "../helpers/backend.ts";
import { forwardMessages } from "../helpers/messages.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { drainPipeline, inboxRows, setRelayInbox } from "../helpers/reverse.ts";
import { KAFKA_SASL_BROKERS, KAFKA_SASL_PASSWORD, KAFKA_SASL_USER, requireServer } from "../helpers/servers.ts";
import { topicDedupKeys } from "../helpers/kafka.ts";

const RUN = `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`;
const topicName = (label: string) => `relaysasl.${RUN}.${label}`;
const MECHANISMS = ["plain", "scram-sha-256", "scram-sha-512"] as const;
type Mechanism = (typeof MECHANISMS)[number];

const saslKeys = (mechanism: Mechanism, password = KAFKA_SASL_PASSWORD) => ({
  brokers: KAFKA_SASL_BROKERS.join(","),
  security_protocol: "SASL_PLAINTEXT",
  sasl_mechanism: mechanism,
  sasl_username: KAFKA_SASL_USER,
  sasl_password: password,
});

const clientFor = (mechanism: Mechanism) =>
  new Kafka({
    clientId: `kafka-sasl-test-${mechanism}`,
    brokers: KAFKA_SASL_BROKERS,
    logLevel: logLevel.NOTHING,
    sasl: { mechanism, username: KAFKA_SASL_USER, password: KAFKA_SASL_PASSWORD } as SASLOptions,
  });

const spec = kafkaSink;
const sinks: Sink[] = [];
function makeSink(options: Record<string, unknown>): Sink {
  const parsed = v.safeParse(spec.config, { type: "kafka", ...options });
  if (!parsed.success) throw new Error(`bad test config: ${parsed.issues[0].message}`);
  const sink = spec.create(parsed.output, backendContext("kafka_sasl_test", { log: log.withTag("kafka-sasl-test") }));
  sinks.push(sink);
  return sink;
}

let admin: Admin;
let db: TestDatabase;

beforeAll(async () => {
  await requireServer("kafka");
  await requireServer("postgres");
  admin = clientFor("plain").admin();
  await admin.connect();
  db = await testDatabase("kafka_sasl");
});

afterAll(async () => {
  await Promise.allSettled(sinks.map((s) => s.close()));
  if (admin) {
    const mine = (await admin.listTopics()).filter((t) => t.startsWith(`relaysasl.${RUN}.`));
    if (mine.length) await admin.deleteTopics({ topics: mine }).catch(() => {});
    const groups = (await admin.listGroups()).groups.map((g) => g.groupId).filter((g) => g.startsWith(`relaysasl-${RUN}-`));
    if (groups.length) await admin.deleteGroups(groups).catch(() => {});
    await admin.disconnect();
  }
  await db?.drop();
});

/** The pgt_dedup_key headers of every record of `topic`, read from the beginning over SASL. */
const consumeKeys = (mechanism: Mechanism, topic: string, expected: number) =>
  topicDedupKeys(clientFor(mechanism), topic, expected, `relaysasl-${RUN}-read`, 30_000);

describe("kafka over SASL_PLAINTEXT", () => {
  for (const mechanism of MECHANISMS) {
    test(`sink (${mechanism}): N messages arrive, read back over the same SASL mechanism`, async () => {
      const topic = topicName(`sink-${mechanism}`);
      const sink = makeSink({ ...saslKeys(mechanism), topic, create_topic: true });
      await sink.start();
      const batch = forwardMessages(50, { outboxId: 5 });
      expect(await sink.write(batch)).toEqual([]);
      const keys = await consumeKeys(mechanism, topic, batch.length);
      expect(keys.sort()).toEqual(batch.map((m) => m.dedup_key).sort());
    }, 60_000);

    test(`source (${mechanism}): drain lands every record in the inbox`, async () => {
      const topic = topicName(`source-${mechanism}`);
      await admin.createTopics({ topics: [{ topic, numPartitions: 1 }], waitForLeaders: true });
      const producer = clientFor(mechanism).producer();
      await producer.connect();
      const N = 30;
      await producer.send({ topic, messages: Array.from({ length: N }, (_, i) => ({ value: JSON.stringify({ i }), headers: { pgt_dedup_key: `sasl-${mechanism}-${i}` } })) });
      await producer.disconnect();
      const name = `ksasl_${mechanism.replace(/-/g, "_")}`;
      await setRelayInbox(db, name, `${name}_inbox`, { type: "kafka", ...saslKeys(mechanism), topic, group_id: `relaysasl-${RUN}-${name}` });
      const result = await drainPipeline(db, name, ["--timeout", "60"]);
      expect(result.exitCode, result.stderr).toBe(0);
      const rows = await inboxRows(db, `${name}_inbox`);
      expect(rows.map((r) => r.event_id).sort()).toEqual(Array.from({ length: N }, (_, i) => `sasl-${mechanism}-${i}`).sort());
    }, 90_000);
  }

  for (const mechanism of ["plain", "scram-sha-256"] as const) {
    test(`a wrong password (${mechanism}) is a config error that does not contain the password`, async () => {
      const password = `wrong-${RUN}-pw`;
      const sink = makeSink({ ...saslKeys(mechanism, password), topic: topicName("never") });
      const err = await expectRelayError(sink.start(), "config");
      expect(err.message).toContain("127.0.0.1:9094");
      expect(err.message).toContain("authentication failed");
      expect(err.message).not.toContain(password);
      expect(String(err.stack ?? "")).not.toContain(password);
      expect(sink.describe).not.toContain(password);
    }, 60_000);
  }
});
