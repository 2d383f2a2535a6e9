/**
 * The progress watchdog (docs/WATCHDOG.md): every sink's connection runs through a loopback proxy
 * that the test freezes — connections accepted, bytes taken, nothing forwarded, nothing closed —
 * and later thaws for new connections only, so a client that keeps its silent socket never
 * recovers. Every pipeline must turn degraded (and /health 503) within the I/O timeout, then
 * rebuild its client and deliver every row, with its last error cleared once it recovered.
 * Kafka's broker is reached through its proxied listener (scripts/services), whose advertised
 * address is the proxy's fixed port.
 */
import { afterAll, beforeAll, expect, test } from "bun:test";
import { CreateQueueCommand, DeleteQueueCommand, ReceiveMessageCommand, SQSClient } from "@aws-sdk/client-sqs";
import amqp from "amqplib";
import Redis from "ioredis";
import { Kafka, logLevel } from "kafkajs";
import { connect as natsConnect } from "nats";
import { createStreamTable, enableOutbox, writeV1Inline } from "../fixtures/outbox.ts";
import { topicDedupKeys } from "../helpers/kafka.ts";
import { getJson, httpBase } from "../helpers/observe.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { tcpProxy } from "../helpers/proxy.ts";
import { eventually, RunningRelay } from "../helpers/relay.ts";
import {
  AMQP_URL,
  AWS_CREDENTIALS,
  KAFKA_BROKERS,
  KAFKA_PROXIED_ADVERTISED_PORT,
  KAFKA_PROXIED_PORT,
  NATS_URL,
  REDIS_URL,
  requireServer,
  SQS_CLIENT_CONFIG,
} from "../helpers/servers.ts";

const run = Math.random().toString(36).slice(2, 8);
const stream = `WATCHDOG_${run}`;
const topic = `watchdog-${run}`;
const PIPELINES = ["w_nats", "w_redis", "w_rabbit", "w_sqs", "w_http", "w_pg", "w_kafka"];
let db: TestDatabase;
let remote: TestDatabase;
let outboxTable = "";
const proxies: Awaited<ReturnType<typeof tcpProxy>>[] = [];
const webhook = new Set<string>();
let server: ReturnType<typeof Bun.serve>;
const sqs = new SQSClient(SQS_CLIENT_CONFIG);
const kafka = new Kafka({ clientId: "watchdog-test", brokers: KAFKA_BROKERS, logLevel: logLevel.NOTHING });
let queueUrl = "";
let rabbit: amqp.ChannelModel;
let relay: RunningRelay;
let base = "";

const portOf = (url: string) => Number(new URL(url).port);

beforeAll(async () => {
  for (const s of ["postgres", "nats", "redis", "rabbitmq", "sqs", "kafka"] as const) await requireServer(s);
  db = await testDatabase("watchdog");
  remote = await testDatabase("watchdog_remote", { catalog: false });
  await remote.sql`SELECT pgtrickle.create_inbox('orders_inbox')`;
  await createStreamTable(db.sql, "public.watched", "id int primary key");
  ({ outboxTable } = await enableOutbox(db.sql, "public.watched"));
  server = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(req) {
      for (const e of (await req.json()) as { dedup_key: string }[]) webhook.add(e.dedup_key);
      return new Response("ok");
    },
  });
  queueUrl = (await sqs.send(new CreateQueueCommand({ QueueName: `watchdog-${run}` }))).QueueUrl!;
  rabbit = await amqp.connect(AMQP_URL);
  const ch = await rabbit.createChannel();
  await ch.assertExchange(`watchdog-${run}`, "topic", { durable: true });
  await ch.assertQueue(`watchdog-${run}`, { durable: false });
  await ch.bindQueue(`watchdog-${run}`, `watchdog-${run}`, "#");
  await ch.close();
  const admin = kafka.admin();
  await admin.connect();
  await admin.createTopics({ topics: [{ topic, numPartitions: 1 }], waitForLeaders: true });
  await admin.disconnect();

  const via = async (port: number) => {
    const p = await tcpProxy(port);
    proxies.push(p);
    return p.port;
  };
  const kafkaProxy = await tcpProxy(KAFKA_PROXIED_PORT, KAFKA_PROXIED_ADVERTISED_PORT);
  proxies.push(kafkaProxy);
  const pgUrl = new URL(remote.url);
  pgUrl.port = String(await via(portOf(remote.url)));
  const amqpUrl = new URL(AMQP_URL);
  amqpUrl.port = String(await via(portOf(AMQP_URL)));
  // The backends' own timeouts stay at their defaults: the watchdog (--io-timeout 5) must act.
  const sinks: Record<string, Record<string, unknown>> = {
    w_nats: { type: "nats", url: `nats://127.0.0.1:${await via(portOf(NATS_URL))}`, stream, create_stream: true, subject_template: `watchdog${run}.{op}` },
    w_redis: { type: "redis", url: `redis://127.0.0.1:${await via(portOf(REDIS_URL))}`, stream_key: `watchdog:${run}` },
    w_rabbit: { type: "rabbitmq", url: amqpUrl.toString(), exchange: `watchdog-${run}` },
    w_sqs: { type: "sqs", queue_url: queueUrl, endpoint: `http://127.0.0.1:${await via(portOf(SQS_CLIENT_CONFIG.endpoint))}`, region: "us-east-1" },
    w_http: { type: "http", url: `http://127.0.0.1:${await via(server.port!)}/hook` },
    w_pg: { type: "pg-inbox", url: pgUrl.toString(), inbox_table: "orders_inbox" },
    w_kafka: { type: "kafka", brokers: `127.0.0.1:${kafkaProxy.port}`, topic },
  };
  for (const [name, sink] of Object.entries(sinks)) {
    await db.sql`SELECT pgtrickle.set_relay_outbox(${name}, 'public.watched', NULL, ${db.sql.json(sink as never)})`;
  }
  relay = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0", "--io-timeout", "5"], {
    AWS_ACCESS_KEY_ID: AWS_CREDENTIALS.accessKeyId,
    AWS_SECRET_ACCESS_KEY: AWS_CREDENTIALS.secretAccessKey,
  });
  base = await httpBase(relay);
});

afterAll(async () => {
  if (relay && relay.proc.exitCode === null) await relay.stop("SIGKILL");
  for (const p of proxies) await p.stop();
  server?.stop(true);
  const nc = await natsConnect({ servers: NATS_URL });
  await (await nc.jetstreamManager()).streams.delete(stream).catch(() => {});
  await nc.close();
  const redis = new Redis(REDIS_URL);
  await redis.del(`watchdog:${run}`);
  redis.disconnect();
  await rabbit
    ?.createChannel()
    .then(async (ch) => {
      await ch.deleteQueue(`watchdog-${run}`);
      await ch.deleteExchange(`watchdog-${run}`);
    })
    .catch(() => {});
  await rabbit?.close().catch(() => {});
  if (queueUrl) await sqs.send(new DeleteQueueCommand({ QueueUrl: queueUrl })).catch(() => {});
  const admin = kafka.admin();
  await admin.connect().then(() => admin.deleteTopics({ topics: [topic] })).catch(() => {});
  await admin.disconnect().catch(() => {});
  await db?.drop();
  await remote?.drop();
});

const rabbitKeys = new Set<string>();
const sqsKeys = new Set<string>();

/** The distinct dedup keys each destination holds now (queues are read destructively, so kept). */
async function delivered(expected: number): Promise<Record<string, Set<string>>> {
  const ch = await rabbit.createChannel();
  for (let m = await ch.get(`watchdog-${run}`, { noAck: true }); m; m = await ch.get(`watchdog-${run}`, { noAck: true })) rabbitKeys.add(m.properties.messageId);
  await ch.close();
  const r = await sqs.send(new ReceiveMessageCommand({ QueueUrl: queueUrl, MaxNumberOfMessages: 10, WaitTimeSeconds: 0 }));
  for (const m of r.Messages ?? []) sqsKeys.add(JSON.parse(m.Body!).dedup_key);
  const nc = await natsConnect({ servers: NATS_URL });
  const jsm = await nc.jetstreamManager();
  const natsKeys = new Set<string>();
  const info = await jsm.streams.info(stream).catch(() => null);
  for (let seq = info?.state.first_seq ?? 1; info && info.state.messages > 0 && seq <= info.state.last_seq; seq++) {
    natsKeys.add((await jsm.streams.getMessage(stream, { seq })).header.get("Nats-Msg-Id"));
  }
  await nc.close();
  const redis = new Redis(REDIS_URL);
  const entries = await redis.xrange(`watchdog:${run}`, "-", "+");
  redis.disconnect();
  const rows = await remote.sql<{ event_id: string }[]>`SELECT event_id FROM pgtrickle.orders_inbox`;
  return {
    nats: natsKeys,
    redis: new Set(entries.map(([, f]) => f[f.indexOf("pgt_dedup_key") + 1]!)),
    http: webhook,
    pg: new Set(rows.map((r) => r.event_id)),
    rabbit: rabbitKeys,
    sqs: sqsKeys,
    kafka: new Set(await topicDedupKeys(kafka, topic, expected, `watchdog-${run}`, 2000)),
  };
}

async function expectEverywhere(keys: string[], timeoutMs: number, what: string): Promise<void> {
  let last: Record<string, Set<string>> = {};
  const complete = async () => {
    last = await delivered(keys.length);
    if (Object.values(last).every((set) => keys.every((k) => set.has(k)))) return true;
    await Bun.sleep(1000);
    return false;
  };
  await eventually(complete, timeoutMs, what).catch((err) => {
    const counts = Object.fromEntries(Object.entries(last).map(([k, v]) => [k, keys.filter((key) => v.has(key)).length]));
    throw new Error(`${err.message}: ${JSON.stringify(counts)} of ${keys.length}\n${relay.stderr.slice(-4000)}`);
  });
}

type Health = { status: string; pipelines: { name: string; state: string; last_error: string | null }[] };

const keysOf = (ids: string[]) => ids.map((id) => `${outboxTable}:${id}:0`);

test("a sink whose peer goes silent without closing is degraded, rebuilt, and delivers everything once the path is back", async () => {
  for (const name of PIPELINES) await relay.waitForLog(new RegExp(`\\[${name}\\] started`), 60_000);
  const ids: string[] = [];
  for (let i = 1; i <= 3; i++) ids.push(await writeV1Inline(db.sql, outboxTable, { inserted: [{ id: i }], deleted: [] }));
  await expectEverywhere(keysOf(ids), 60_000, "the first rows everywhere");

  for (const p of proxies) p.freeze();
  for (let i = 4; i <= 8; i++) ids.push(await writeV1Inline(db.sql, outboxTable, { inserted: [{ id: i }], deleted: [] }));
  let health: { status: number; body: Health } | null = null;
  const allDegraded = async () => {
    health = await getJson<Health>(`${base}/health`);
    const degraded = health.body.pipelines.filter((p) => p.state === "degraded").map((p) => p.name);
    if (health.status === 503 && PIPELINES.every((n) => degraded.includes(n))) return true;
    await Bun.sleep(500);
    return false;
  };
  await eventually(allDegraded, 60_000, "every pipeline degraded, /health 503").catch((err) => {
    throw new Error(`${err.message}: ${JSON.stringify(health)}\n${relay.stderr.slice(-4000)}`);
  });
  const status = await db.sql<{ pipeline: string; state: string; last_error: string | null }[]>`
    SELECT pipeline, state, last_error FROM pgtrickle.relay_pipeline_status ORDER BY pipeline`;
  expect(status.map((s) => [s.pipeline, s.state])).toEqual([...PIPELINES].sort().map((n) => [n, "degraded"]));
  expect(status.every((s) => s.last_error !== null)).toBe(true);
  // Long enough for clients rebuilt while frozen to be stuck as well.
  await Bun.sleep(8000);

  for (const p of proxies) p.thaw();
  await expectEverywhere(keysOf(ids), 120_000, "every row everywhere after the path came back");

  const recovered = async () => {
    const rows = await db.sql<{ state: string; last_error: string | null }[]>`SELECT state, last_error FROM pgtrickle.relay_pipeline_status`;
    const h = await getJson<Health>(`${base}/health`);
    if (h.status === 200 && rows.length === PIPELINES.length && rows.every((r) => r.state === "running" && r.last_error === null)) return true;
    await Bun.sleep(500);
    return false;
  };
  await eventually(recovered, 30_000, "every pipeline running with its last error cleared, /health 200").catch(async (err) => {
    throw new Error(`${err.message}: ${JSON.stringify(await db.sql`SELECT pipeline, state, last_error FROM pgtrickle.relay_pipeline_status`)}`);
  });
  expect(relay.stderr).toMatch(/no answer within 5 s; rebuilding the client/);
}, 300_000);
