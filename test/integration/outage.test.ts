/**
 * Servers going silent mid-stream, at the pipeline level: every sink's connection runs through a
 * loopback proxy the test freezes (connections accepted, nothing forwarded, nothing closed; after
 * the thaw only new connections work, docs/WATCHDOG.md). The pipelines must turn degraded, rebuild
 * their clients, keep every row, and resume by themselves once the path is back. Kafka is reached
 * through its proxied listener (scripts/services), which advertises the proxy's fixed port. A
 * server that refuses connections, and an oversized message dead-lettered while later rows flow:
 * the contract suite (test/contract/).
 */
import { afterAll, beforeAll, expect, test } from "bun:test";
import { CreateQueueCommand, DeleteQueueCommand, ReceiveMessageCommand, SQSClient } from "@aws-sdk/client-sqs";
import amqp from "amqplib";
import Redis from "ioredis";
import { Kafka, logLevel } from "kafkajs";
import { connect as natsConnect } from "nats";
import { createStreamTable, enableOutbox, writeV1Inline } from "../fixtures/outbox.ts";
import { createTopic, deleteTopic, topicDedupKeys } from "../helpers/kafka.ts";
import { expectAllDegraded, expectAllRecovered, httpBase } from "../helpers/observe.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { proxyGroup } from "../helpers/proxy.ts";
import { eventually, RunningRelay } from "../helpers/relay.ts";
import {
  AMQP_URL,
  AWS_ENV,
  portOf,
  KAFKA_BROKERS,
  NATS_URL,
  REDIS_URL,
  requireServer,
  SQS_CLIENT_CONFIG,
} from "../helpers/servers.ts";

const run = Math.random().toString(36).slice(2, 8);
const stream = `OUTAGE_${run}`;
const topic = `outage-${run}`;
const PIPELINES = ["o_nats", "o_redis", "o_rabbit", "o_sqs", "o_http", "o_pg", "o_kafka"];
const kafka = new Kafka({ clientId: "outage-test", brokers: KAFKA_BROKERS, logLevel: logLevel.NOTHING });
let db: TestDatabase;
let remote: TestDatabase;
let outboxTable = "";
const proxies = proxyGroup();
const webhook: string[] = [];
let server: ReturnType<typeof Bun.serve>;
const sqs = new SQSClient(SQS_CLIENT_CONFIG);
let queueUrl = "";
let rabbit: amqp.ChannelModel;
let relay: RunningRelay;
let base = "";

beforeAll(async () => {
  for (const s of ["postgres", "nats", "redis", "rabbitmq", "sqs", "kafka"] as const) await requireServer(s);
  db = await testDatabase("outage");
  remote = await testDatabase("outage_remote", { catalog: false });
  await remote.sql`SELECT pgtrickle.create_inbox('orders_inbox')`;
  await createStreamTable(db.sql, "public.outage", "id int primary key, blob text");
  ({ outboxTable } = await enableOutbox(db.sql, "public.outage"));
  server = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(req) {
      for (const e of (await req.json()) as { dedup_key: string }[]) webhook.push(e.dedup_key);
      return new Response("ok");
    },
  });
  queueUrl = (await sqs.send(new CreateQueueCommand({ QueueName: `outage-${run}` }))).QueueUrl!;
  rabbit = await amqp.connect(AMQP_URL);
  const ch = await rabbit.createChannel();
  await ch.assertExchange(`outage-${run}`, "topic", { durable: true });
  await ch.assertQueue(`outage-${run}`, { durable: false });
  await ch.bindQueue(`outage-${run}`, `outage-${run}`, "#");
  await ch.close();
  await createTopic(kafka, topic);

  const { via } = proxies;
  const kafkaProxy = await proxies.kafka();
  const pgUrl = new URL(remote.url);
  pgUrl.port = String(await via(portOf(remote.url)));
  const amqpUrl = new URL(AMQP_URL);
  amqpUrl.port = String(await via(portOf(AMQP_URL)));
  const sinks: Record<string, Record<string, unknown>> = {
    o_nats: { type: "nats", url: `nats://127.0.0.1:${await via(portOf(NATS_URL))}`, stream, create_stream: true, subject_template: `outage${run}.{op}`, ack_timeout_ms: 1000 },
    o_redis: { type: "redis", url: `redis://127.0.0.1:${await via(portOf(REDIS_URL))}`, stream_key: `outage:${run}`, command_timeout_ms: 1000 },
    o_rabbit: { type: "rabbitmq", url: amqpUrl.toString(), exchange: `outage-${run}` },
    o_sqs: { type: "sqs", queue_url: queueUrl, endpoint: `http://127.0.0.1:${await via(portOf(SQS_CLIENT_CONFIG.endpoint))}`, region: "us-east-1", timeout_ms: 2000 },
    o_http: { type: "http", url: `http://127.0.0.1:${await via(server.port!)}/hook`, timeout_ms: 2000 },
    o_pg: { type: "pg-inbox", url: pgUrl.toString(), inbox_table: "orders_inbox", timeout_ms: 2000 },
    o_kafka: { type: "kafka", brokers: `127.0.0.1:${kafkaProxy.port}`, topic },
  };
  for (const [name, sink] of Object.entries(sinks)) {
    await db.sql`SELECT pgtrickle.set_relay_outbox(${name}, 'public.outage', NULL, ${db.sql.json(sink as never)})`;
  }
  relay = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0", "--io-timeout", "5"], AWS_ENV);
  base = await httpBase(relay);
});

afterAll(async () => {
  if (relay && relay.proc.exitCode === null) await relay.stop("SIGKILL");
  for (const p of proxies.all) await p.stop();
  server?.stop(true);
  const nc = await natsConnect({ servers: NATS_URL });
  await (await nc.jetstreamManager()).streams.delete(stream).catch(() => {});
  await nc.close();
  const redis = new Redis(REDIS_URL);
  await redis.del(`outage:${run}`);
  redis.disconnect();
  await rabbit?.createChannel().then(async (ch) => {
    await ch.deleteQueue(`outage-${run}`);
    await ch.deleteExchange(`outage-${run}`);
  }).catch(() => {});
  await rabbit?.close().catch(() => {});
  if (queueUrl) await sqs.send(new DeleteQueueCommand({ QueueUrl: queueUrl })).catch(() => {});
  await deleteTopic(kafka, topic);
  await db?.drop();
  await remote?.drop();
});

/** The distinct dedup keys each destination holds now (Kafka: read until `expected` records came). */
async function delivered(expected: number): Promise<Record<string, Set<string>>> {
  const nc = await natsConnect({ servers: NATS_URL });
  const jsm = await nc.jetstreamManager();
  const natsKeys = new Set<string>();
  const info = await jsm.streams.info(stream).catch(() => null);
  // An empty stream reports first_seq 0, and message 0 does not exist.
  for (let seq = info?.state.first_seq ?? 1; info && info.state.messages > 0 && seq <= info.state.last_seq; seq++) {
    natsKeys.add((await jsm.streams.getMessage(stream, { seq })).header.get("Nats-Msg-Id"));
  }
  await nc.close();
  const redis = new Redis(REDIS_URL);
  const entries = await redis.xrange(`outage:${run}`, "-", "+");
  redis.disconnect();
  const rows = await remote.sql<{ event_id: string }[]>`SELECT event_id FROM pgtrickle.orders_inbox`;
  return {
    nats: natsKeys,
    redis: new Set(entries.map(([, f]) => f[f.indexOf("pgt_dedup_key") + 1]!)),
    http: new Set(webhook),
    pg: new Set(rows.map((r) => r.event_id)),
    rabbit: rabbitKeys,
    sqs: sqsKeys,
    kafka: new Set(await topicDedupKeys(kafka, topic, expected, `outage-${run}`, 2000)),
  };
}

const rabbitKeys = new Set<string>();
const sqsKeys = new Set<string>();
/** Queues are read destructively: collect what arrived so far. */
async function drainQueues(): Promise<void> {
  const ch = await rabbit.createChannel();
  for (let m = await ch.get(`outage-${run}`, { noAck: true }); m; m = await ch.get(`outage-${run}`, { noAck: true })) rabbitKeys.add(m.properties.messageId);
  await ch.close();
  const r = await sqs.send(new ReceiveMessageCommand({ QueueUrl: queueUrl, MaxNumberOfMessages: 10, WaitTimeSeconds: 0 }));
  for (const m of r.Messages ?? []) sqsKeys.add(JSON.parse(m.Body!).dedup_key);
}

async function allHave(keys: string[]): Promise<boolean> {
  await drainQueues();
  const d = await delivered(keys.length);
  return Object.values(d).every((set) => keys.every((k) => set.has(k)));
}

/** What each destination lacks of `keys`, for failure messages. */
async function lacking(keys: string[]): Promise<Record<string, number>> {
  const d = await delivered(keys.length);
  return Object.fromEntries(Object.entries(d).map(([k, set]) => [k, keys.filter((key) => !set.has(key)).length]));
}

const keysOf = (ids: string[]) => ids.map((id) => `${outboxTable}:${id}:0`);

test("a sink whose peer goes silent without closing is degraded, rebuilt, and delivers everything once the path is back; its last error clears", async () => {
  for (const name of PIPELINES) await relay.waitForLog(new RegExp(`\\[${name}\\] started`), 60_000);
  const ids: string[] = [];
  for (let i = 2001; i <= 2003; i++) ids.push(await writeV1Inline(db.sql, outboxTable, { inserted: [{ id: i }], deleted: [] }));
  await eventually(() => allHave(keysOf(ids)), 60_000, "the first rows everywhere");

  for (const p of proxies.all) p.freeze();
  for (let i = 2004; i <= 2008; i++) ids.push(await writeV1Inline(db.sql, outboxTable, { inserted: [{ id: i }], deleted: [] }));
  await expectAllDegraded(base, PIPELINES, relay);
  const status = await db.sql<{ pipeline: string; state: string; last_error: string | null }[]>`
    SELECT pipeline, state, last_error FROM pgtrickle.relay_pipeline_status ORDER BY pipeline`;
  expect(status.map((s) => [s.pipeline, s.state])).toEqual([...PIPELINES].sort().map((n) => [n, "degraded"]));
  expect(status.every((s) => s.last_error !== null)).toBe(true);
  // Long enough for clients rebuilt while frozen to be stuck as well.
  await Bun.sleep(8000);

  for (const p of proxies.all) p.thaw();
  await eventually(() => allHave(keysOf(ids)), 120_000, "every row everywhere after the path came back").catch(async (err) => {
    throw new Error(`${err.message}: missing ${JSON.stringify(await lacking(keysOf(ids)))}\n${relay.stderr.slice(-4000)}`);
  });
  await expectAllRecovered(db.sql, base, PIPELINES.length);
  expect(relay.stderr).toMatch(/no answer within 5 s; rebuilding the client/);
}, 300_000);
