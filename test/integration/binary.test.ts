/**
 * Every backend driven by the COMPILED binary: backends are imported on first use
 * (src/backends/index.ts), and the AWS credential chain has broken after bundling before, so a
 * module or library code path missing from the bundle must fail here. Forward: one outbox, one
 * pipeline per sink, one `dist/pgtrickle-relay drain`, then each destination is read back with
 * its own client. Reverse: one pipeline per source, each fed N messages by its own client, one
 * drain, then the inboxes are counted.
 */
import { afterAll, beforeAll, expect, test } from "bun:test";
import { CreateQueueCommand, DeleteQueueCommand, ReceiveMessageCommand, SendMessageCommand, SQSClient } from "@aws-sdk/client-sqs";
import amqp from "amqplib";
import Redis from "ioredis";
import { Kafka, logLevel } from "kafkajs";
import { connect as natsConnect, type NatsConnection } from "nats";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createStreamTable, enableOutbox, writeV1Inline } from "../fixtures/outbox.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { storedRecords } from "../helpers/kafka.ts";
import { relayOnce } from "../helpers/relay.ts";
import { inboxCount, setRelayInbox } from "../helpers/reverse.ts";
import { AMQP_URL, AWS_ENV, AWS_REGION, KAFKA_BROKERS, NATS_URL, REDIS_URL, requireServer, SQS_CLIENT_CONFIG, SQS_ENDPOINT } from "../helpers/servers.ts";

const ROOT = new URL("../..", import.meta.url).pathname;
const BIN = join(ROOT, "dist/pgtrickle-relay");
const N = 5;
const KAFKA_CODECS = ["snappy", "lz4", "zstd"] as const;
const run = Math.random().toString(36).slice(2, 8);
let db: TestDatabase;
let remote: TestDatabase;
let outboxTable = "";
const dir = mkdtempSync(join(tmpdir(), "relay-binary-"));
const webhook: { keys: string[]; bodies: unknown[] } = { keys: [], bodies: [] };
let server: ReturnType<typeof Bun.serve>;
const sqs = new SQSClient(SQS_CLIENT_CONFIG);
let queueUrl = "";
let sourceQueueUrl = "";
let amqpConn: amqp.ChannelModel;
let nc: NatsConnection | undefined;
const kafka = new Kafka({ brokers: KAFKA_BROKERS, logLevel: logLevel.NOTHING });
const binaryEnv = { PGTRICKLE_RELAY_BIN: BIN, ...AWS_ENV };

beforeAll(async () => {
  for (const s of ["postgres", "nats", "redis", "rabbitmq", "kafka", "sqs"] as const) await requireServer(s);
  const build = Bun.spawnSync([join(ROOT, "scripts/build"), "--native"], { stderr: "pipe" });
  if (build.exitCode !== 0) throw new Error(`scripts/build --native failed: ${build.stderr.toString()}`);
  db = await testDatabase("binary");
  remote = await testDatabase("binary_remote", { catalog: false });
  await remote.sql`SELECT pgtrickle.create_inbox('orders_inbox')`;
  await createStreamTable(db.sql, "public.bin_orders", "id int primary key");
  ({ outboxTable } = await enableOutbox(db.sql, "public.bin_orders"));
  server = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(req) {
      webhook.keys.push(req.headers.get("idempotency-key") ?? "");
      webhook.bodies.push(await req.json());
      return new Response("ok");
    },
  });
  queueUrl = (await sqs.send(new CreateQueueCommand({ QueueName: `bin-${run}` }))).QueueUrl!;
  amqpConn = await amqp.connect(AMQP_URL);
  const ch = await amqpConn.createChannel();
  await ch.assertExchange(`bin-${run}`, "topic", { durable: true });
  await ch.assertQueue(`bin-${run}`, { durable: false, autoDelete: false });
  await ch.bindQueue(`bin-${run}`, `bin-${run}`, "#");
  await ch.close();

  const pipelines: Record<string, Record<string, unknown>> = {
    bin_file: { type: "file", output: join(dir, "out.jsonl") },
    bin_nats: { type: "nats", url: NATS_URL, stream: `BIN_${run}`, create_stream: true, subject_template: `bin${run}.{stream_table}.{op}` },
    bin_kafka: { type: "kafka", brokers: KAFKA_BROKERS.join(","), topic: `bin-${run}`, create_topic: true },
    // The codecs kafkajs lacks are bundled libraries and Bun's zstd: one missing from the binary fails here.
    ...Object.fromEntries(
      KAFKA_CODECS.map((c) => [`bin_kafka_${c}`, { type: "kafka", brokers: KAFKA_BROKERS.join(","), topic: `bin-${run}-${c}`, create_topic: true, compression: c }]),
    ),
    bin_http: { type: "webhook", url: `http://127.0.0.1:${server.port}/hook`, batch_mode: false },
    bin_redis: { type: "redis", url: REDIS_URL, stream_key: `bin:${run}:{stream_table}` },
    bin_sqs: { type: "sqs", queue_url: queueUrl, endpoint: SQS_ENDPOINT, region: AWS_REGION },
    bin_rabbit: { type: "rabbitmq", url: AMQP_URL, exchange: `bin-${run}` },
    bin_pg: { type: "pg-inbox", url: remote.url, inbox_table: "orders_inbox" },
  };
  for (const [name, sink] of Object.entries(pipelines)) {
    await db.sql`SELECT pgtrickle.set_relay_outbox(${name}, 'public.bin_orders', NULL, ${db.sql.json(sink as never)})`;
  }
  for (let i = 1; i <= N; i++) await writeV1Inline(db.sql, outboxTable, { inserted: [{ id: i }], deleted: [] });
});

afterAll(async () => {
  server?.stop(true);
  await amqpConn?.close().catch(() => {});
  for (const url of [queueUrl, sourceQueueUrl]) if (url) await sqs.send(new DeleteQueueCommand({ QueueUrl: url })).catch(() => {});
  if (nc) {
    await (await nc.jetstreamManager()).streams.delete(`BINSRC_${run}`).catch(() => {});
    await nc.close();
  }
  const admin = kafka.admin();
  await admin.connect();
  await admin.deleteTopics({ topics: [`binsrc-${run}`] }).catch(() => {});
  await admin.deleteGroups([`binsrc-${run}`]).catch(() => {});
  await admin.disconnect();
  await db?.drop();
  await remote?.drop();
});

const expectedKeys = () => Array.from({ length: N }, (_, i) => `${outboxTable}:${i + 1}:0`);

test("the compiled binary relays one outbox to every sink, credentials for SQS from the environment", async () => {
  const result = await relayOnce(["drain", "--postgres-url", db.url], binaryEnv, 120_000);
  expect(result.stderr).not.toContain("failed");
  expect(result.exitCode).toBe(0);

  const file = readFileSync(join(dir, "out.jsonl"), "utf8").trim().split("\n").map((l) => JSON.parse(l).dedup_key);
  expect(file).toEqual(expectedKeys());

  const nc = await natsConnect({ servers: NATS_URL });
  const jsm = await nc.jetstreamManager();
  const natsKeys: string[] = [];
  for (let seq = 1; seq <= N; seq++) natsKeys.push((await jsm.streams.getMessage(`BIN_${run}`, { seq })).header.get("Nats-Msg-Id"));
  expect(natsKeys).toEqual(expectedKeys());
  await jsm.streams.delete(`BIN_${run}`);
  await nc.close();

  const consumer = kafka.consumer({ groupId: `bin-check-${run}` });
  await consumer.connect();
  await consumer.subscribe({ topic: `bin-${run}`, fromBeginning: true });
  const kafkaKeys: string[] = [];
  await consumer.run({ eachMessage: async ({ message }) => void kafkaKeys.push(message.key!.toString()) });
  const until = Date.now() + 30_000;
  while (kafkaKeys.length < N && Date.now() < until) await Bun.sleep(100);
  await consumer.disconnect();
  expect(kafkaKeys.sort()).toEqual(expectedKeys().sort());
  const stored = await storedRecords(KAFKA_BROKERS, KAFKA_CODECS.map((c) => `bin-${run}-${c}`));
  for (const codec of KAFKA_CODECS) {
    const mine = stored.filter((r) => r.topic === `bin-${run}-${codec}`);
    expect({ codec, codecs: [...new Set(mine.map((r) => r.codec))] }).toEqual({ codec, codecs: [codec] });
    expect(mine.map((r) => JSON.parse(r.value).dedup_key).sort()).toEqual(expectedKeys().sort());
  }

  expect(webhook.keys.sort()).toEqual(expectedKeys().sort());

  const redis = new Redis(REDIS_URL);
  const entries = await redis.xrange(`bin:${run}:bin_orders`, "-", "+");
  expect(entries.map(([, f]) => f[f.indexOf("pgt_dedup_key") + 1])).toEqual(expectedKeys());
  await redis.del(`bin:${run}:bin_orders`);
  redis.disconnect();

  const got: string[] = [];
  for (let i = 0; i < 10 && got.length < N; i++) {
    const r = await sqs.send(new ReceiveMessageCommand({ QueueUrl: queueUrl, MaxNumberOfMessages: 10, WaitTimeSeconds: 1 }));
    for (const m of r.Messages ?? []) got.push(JSON.parse(m.Body!).dedup_key);
  }
  expect(got.sort()).toEqual(expectedKeys().sort());

  const ch = await amqpConn.createChannel();
  const amqpIds: string[] = [];
  for (let i = 0; i < N; i++) {
    const msg = await ch.get(`bin-${run}`, { noAck: true });
    if (msg) amqpIds.push(msg.properties.messageId);
  }
  await ch.deleteQueue(`bin-${run}`);
  await ch.deleteExchange(`bin-${run}`);
  expect(amqpIds).toEqual(expectedKeys());

  const rows = await remote.sql<{ event_id: string }[]>`SELECT event_id FROM pgtrickle.orders_inbox ORDER BY event_id`;
  expect(rows.map((r) => r.event_id)).toEqual(expectedKeys().sort());
}, 180_000);

/** Feeds N messages into each source system, one reverse pipeline per source type. */
async function sourcePipelines(): Promise<Record<string, Record<string, unknown>>> {
  const bodies = Array.from({ length: N }, (_, i) => JSON.stringify({ event_type: "order.created", n: i + 1 }));

  nc = await natsConnect({ servers: NATS_URL });
  await (await nc.jetstreamManager()).streams.add({ name: `BINSRC_${run}`, subjects: [`binsrc${run}.>`] });
  const js = nc.jetstream();
  for (const body of bodies) await js.publish(`binsrc${run}.orders`, new TextEncoder().encode(body));

  const admin = kafka.admin();
  await admin.connect();
  await admin.createTopics({ topics: [{ topic: `binsrc-${run}`, numPartitions: 1 }], waitForLeaders: true });
  await admin.disconnect();
  const producer = kafka.producer();
  await producer.connect();
  await producer.send({ topic: `binsrc-${run}`, messages: bodies.map((value, i) => ({ key: `k${i}`, value })) });
  await producer.disconnect();

  const redis = new Redis(REDIS_URL);
  for (const body of bodies) await redis.xadd(`binsrc:${run}`, "*", "payload", body);
  redis.disconnect();

  sourceQueueUrl = (await sqs.send(new CreateQueueCommand({ QueueName: `binsrc-${run}` }))).QueueUrl!;
  for (const body of bodies) await sqs.send(new SendMessageCommand({ QueueUrl: sourceQueueUrl, MessageBody: body }));

  const ch = await amqpConn.createChannel();
  await ch.assertQueue(`binsrc-${run}`, { durable: true });
  for (const body of bodies) ch.sendToQueue(`binsrc-${run}`, Buffer.from(body), { persistent: true });
  await ch.close();

  const input = join(dir, "in.jsonl");
  writeFileSync(input, bodies.map((b) => `${b}\n`).join(""));

  return {
    src_nats: { type: "nats", url: NATS_URL, subject: `binsrc${run}.>` },
    src_kafka: { type: "kafka", brokers: KAFKA_BROKERS.join(","), topic: `binsrc-${run}`, group_id: `binsrc-${run}` },
    src_redis: { type: "redis", url: REDIS_URL, stream_key: `binsrc:${run}` },
    src_sqs: { type: "sqs", queue_url: sourceQueueUrl, endpoint: SQS_ENDPOINT, region: AWS_REGION },
    src_rabbit: { type: "rabbitmq", url: AMQP_URL, queue: `binsrc-${run}` },
    src_file: { type: "file", input },
  };
}

test("the compiled binary drains every source into its inbox (the HTTP receiver loads and is skipped: it has no backlog)", async () => {
  const pipelines = { ...(await sourcePipelines()), src_http: { type: "http", listen_addr: "127.0.0.1:0", path: "/hooks" } };
  for (const [name, source] of Object.entries(pipelines)) await setRelayInbox(db, name, `${name}_inbox`, source);
  const names = Object.keys(pipelines);
  const result = await relayOnce(["drain", "--postgres-url", db.url, "--pipeline", names.join(","), "--timeout", "150"], binaryEnv, 180_000);
  expect(result.stderr).not.toContain("failed");
  expect(result.exitCode).toBe(0);
  const counts: Record<string, number> = {};
  for (const name of names) counts[name] = await inboxCount(db, `${name}_inbox`);
  expect(counts).toEqual({ ...Object.fromEntries(names.map((n) => [n, N])), src_http: 0 });
}, 240_000);
