/**
 * Every reverse source into an inbox of the real pg_trickle extension (0.45.0 and 0.39.0): the
 * relay creates the inbox with pgtrickle.create_inbox, which also makes the stream tables
 * `<inbox>_pending`, `<inbox>_dlq` and `<inbox>_stats` (1 s schedule). One small test per
 * source: two events in, two inbox rows, and the extension's stream tables fed from them.
 * Each source's own behaviour is tested in its *-source.test.ts.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { CreateQueueCommand, DeleteQueueCommand, SendMessageCommand, SQSClient } from "@aws-sdk/client-sqs";
import amqp from "amqplib";
import { Kafka, logLevel } from "kafkajs";
import { connect as natsConnect } from "nats";
import Redis from "ioredis";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { TestDatabase } from "../helpers/pg.ts";
import { pgTrickleDatabase, PGTRICKLE_VERSIONS } from "../helpers/pgtrickle.ts";
import { freePort } from "../helpers/proxy.ts";
import { eventually, RunningRelay } from "../helpers/relay.ts";
import { drainPipeline, setRelayInbox } from "../helpers/reverse.ts";
import { AMQP_URL, AWS_CREDENTIALS, KAFKA_BROKERS, NATS_URL, REDIS_URL, requireServer, SQS_CLIENT_CONFIG, SQS_ENDPOINT } from "../helpers/servers.ts";

const RUN = `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`;
const EVENTS = [
  { event_type: "order.created", order: 1 },
  { event_type: "order.created", order: 2 },
];
const dir = mkdtempSync(join(tmpdir(), "relay-pgtrickle-reverse-"));

describe.each(PGTRICKLE_VERSIONS)("pg_trickle %s", (version) => {
  const tag = `${version.replaceAll(".", "")}_${RUN}`;
  let db: TestDatabase;
  beforeAll(async () => {
    db = await pgTrickleDatabase("reverse", version);
  });
  afterAll(async () => {
    await db?.drop();
  });

  /**
   * The two events are in the inbox, and the extension's stream tables over it see them. Their
   * own 1 s scheduler was seen to leave one of them behind for over 20 s, and a refresh may
   * hold back changes newer than a running transaction (docs/pg_trickle.md), so the test
   * refreshes them itself until they have caught up.
   */
  async function expectInboxFed(inbox: string): Promise<void> {
    const rows = await db.sql<{ payload: { order: number } }[]>`SELECT payload FROM pgtrickle.${db.sql(inbox)} ORDER BY payload->>'order'`;
    expect(rows.map((r) => r.payload.order)).toEqual([1, 2]);
    const companions = await db.sql<{ pgt_name: string }[]>`
      SELECT pgt_name FROM pgtrickle.pgt_stream_tables WHERE pgt_schema = 'pgtrickle' AND pgt_name LIKE ${`${inbox}\\_%`} ORDER BY pgt_name`;
    expect(companions.map((c) => c.pgt_name)).toEqual([`${inbox}_dlq`, `${inbox}_pending`, `${inbox}_stats`]);
    let seen: unknown;
    const caughtUp = async () => {
      for (const c of companions) await db.sql`SELECT pgtrickle.refresh_stream_table(${`pgtrickle.${c.pgt_name}`})`;
      [seen] = await db.sql`
        SELECT (SELECT count(*)::int FROM pgtrickle.${db.sql(`${inbox}_pending`)}) AS pending,
               (SELECT count(*)::int FROM pgtrickle.${db.sql(`${inbox}_dlq`)}) AS dlq,
               (SELECT coalesce(sum(message_count), 0)::int FROM pgtrickle.${db.sql(`${inbox}_stats`)}) AS messages`;
      return Bun.deepEquals(seen, { pending: 2, dlq: 0, messages: 2 });
    };
    await eventually(caughtUp, 20_000, `${inbox}'s stream tables to show the two events`).catch((err: Error) => {
      throw new Error(`${err.message}; last seen ${JSON.stringify(seen)}`);
    });
  }

  async function drained(name: string, inbox: string, source: Record<string, unknown>): Promise<void> {
    await setRelayInbox(db, name, inbox, source);
    const r = await drainPipeline(db, name, ["--timeout", "90"], 120_000);
    expect(r.stderr).toContain("2 delivered");
    expect(r.exitCode).toBe(0);
    await expectInboxFed(inbox);
  }

  test("file", async () => {
    const input = join(dir, `events_${tag}.jsonl`);
    writeFileSync(input, EVENTS.map((e) => JSON.stringify(e) + "\n").join(""));
    await drained("file_in", "file_inbox", { type: "file", input });
  });

  test("stdin (its input read from a file)", async () => {
    const input = join(dir, `stdin_${tag}.jsonl`);
    writeFileSync(input, EVENTS.map((e) => JSON.stringify(e) + "\n").join(""));
    await drained("stdin_in", "stdin_inbox", { type: "stdin", input });
  });

  test("nats", async () => {
    await requireServer("nats");
    const nc = await natsConnect({ servers: NATS_URL });
    const stream = `PGT_REV_${tag}`;
    const jsm = await nc.jetstreamManager();
    try {
      await jsm.streams.add({ name: stream, subjects: [`pgtrev${tag}.>`] });
      for (const e of EVENTS) await nc.jetstream().publish(`pgtrev${tag}.orders`, JSON.stringify(e));
      await drained("nats_in", "nats_inbox", { type: "nats", url: NATS_URL, subject: `pgtrev${tag}.>` });
    } finally {
      await jsm.streams.delete(stream).catch(() => {});
      await nc.close();
    }
  });

  test("redis", async () => {
    await requireServer("redis");
    const r = new Redis(REDIS_URL);
    const key = `pgtrickle-reverse-${tag}`;
    try {
      for (const e of EVENTS) await r.xadd(key, "*", "payload", JSON.stringify(e));
      await drained("redis_in", "redis_inbox", { type: "redis", url: REDIS_URL, stream_key: key });
    } finally {
      await r.del(key);
      r.disconnect();
    }
  });

  test("kafka", async () => {
    await requireServer("kafka");
    const client = new Kafka({ clientId: "pgtrickle-reverse-test", brokers: KAFKA_BROKERS, logLevel: logLevel.NOTHING });
    const admin = client.admin();
    const producer = client.producer();
    const topic = `pgtrickle.reverse.${tag}`;
    await admin.connect();
    await producer.connect();
    try {
      await admin.createTopics({ topics: [{ topic, numPartitions: 1 }], waitForLeaders: true });
      await producer.send({ topic, messages: EVENTS.map((e) => ({ value: JSON.stringify(e) })) });
      await drained("kafka_in", "kafka_inbox", { type: "kafka", brokers: KAFKA_BROKERS.join(","), topic, group_id: `pgtrickle-reverse-${tag}` });
    } finally {
      await admin.deleteGroups([`pgtrickle-reverse-${tag}`]).catch(() => {});
      await admin.deleteTopics({ topics: [topic] }).catch(() => {});
      await producer.disconnect();
      await admin.disconnect();
    }
  }, 150_000);

  test("rabbitmq", async () => {
    await requireServer("rabbitmq");
    const conn = await amqp.connect(AMQP_URL);
    const ch = await conn.createChannel();
    const queue = `pgtrickle-reverse-${tag}`;
    try {
      await ch.assertQueue(queue, { durable: true });
      for (const e of EVENTS) ch.sendToQueue(queue, Buffer.from(JSON.stringify(e)), { persistent: true });
      await ch.close();
      await drained("rabbitmq_in", "rabbitmq_inbox", { type: "rabbitmq", url: AMQP_URL, queue });
    } finally {
      const cleanup = await conn.createChannel();
      await cleanup.deleteQueue(queue).catch(() => {});
      await conn.close();
    }
  });

  test("sqs", async () => {
    await requireServer("sqs");
    const client = new SQSClient(SQS_CLIENT_CONFIG);
    const { QueueUrl } = await client.send(new CreateQueueCommand({ QueueName: `pgtrickle-reverse-${tag}` }));
    try {
      for (const e of EVENTS) await client.send(new SendMessageCommand({ QueueUrl, MessageBody: JSON.stringify(e) }));
      await drained("sqs_in", "sqs_inbox", {
        type: "sqs",
        queue_url: QueueUrl,
        endpoint: SQS_ENDPOINT,
        region: "us-east-1",
        access_key_id: AWS_CREDENTIALS.accessKeyId,
        secret_access_key: AWS_CREDENTIALS.secretAccessKey,
      });
    } finally {
      await client.send(new DeleteQueueCommand({ QueueUrl })).catch(() => {});
      client.destroy();
    }
  });

  test("http (a running relay)", async () => {
    const port = await freePort();
    await setRelayInbox(db, "http_in", "http_inbox", { type: "http", listen_addr: `127.0.0.1:${port}`, path: "/hooks" });
    await db.sql`UPDATE pgtrickle.relay_inbox_config SET enabled = (name = 'http_in')`;
    const relay = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0"]);
    try {
      await relay.waitForLog(/\[http_in\] started/);
      for (const e of EVENTS) {
        const res = await fetch(`http://127.0.0.1:${port}/hooks`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(e) });
        expect(res.status).toBeLessThan(300);
      }
      await expectInboxFed("http_inbox");
    } finally {
      expect(await relay.stop("SIGTERM")).toBe(0);
    }
  });
});
