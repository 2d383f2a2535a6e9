/**
 * The progress watchdog for reverse sources (docs/WATCHDOG.md): each source's connection runs
 * through a loopback proxy the test freezes (connections accepted, nothing forwarded, nothing
 * closed; after the thaw only new connections work). Every pipeline must turn degraded, rebuild
 * its client, and land every message in its inbox once the path is back, its last error cleared.
 * Messages are published straight to the servers, never through the proxies.
 */
import { afterAll, beforeAll, expect, test } from "bun:test";
import { CreateQueueCommand, DeleteQueueCommand, SendMessageCommand, SQSClient } from "@aws-sdk/client-sqs";
import amqp from "amqplib";
import Redis from "ioredis";
import { Kafka, logLevel, type Producer } from "kafkajs";
import { connect as natsConnect, type NatsConnection } from "nats";
import { createTopic, deleteTopic } from "../helpers/kafka.ts";
import { expectAllDegraded, expectAllRecovered, httpBase } from "../helpers/observe.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { proxyGroup } from "../helpers/proxy.ts";
import { eventually, RunningRelay } from "../helpers/relay.ts";
import { inboxRows, setRelayInbox } from "../helpers/reverse.ts";
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
const PIPELINES = ["wr_nats", "wr_redis", "wr_sqs", "wr_rabbit", "wr_kafka"] as const;
type Name = (typeof PIPELINES)[number];
const stream = `WDR_${run}`;
const subject = `wdr${run}.events`;
const redisKey = `wdr:${run}`;
const queue = `wdr-${run}`;
const topic = `wdr-${run}`;
const kafka = new Kafka({ clientId: "watchdog-reverse-test", brokers: KAFKA_BROKERS, logLevel: logLevel.NOTHING });
let producer: Producer;
let db: TestDatabase;
const proxies = proxyGroup();
const sqs = new SQSClient(SQS_CLIENT_CONFIG);
let queueUrl = "";
let nc: NatsConnection;
let redis: Redis;
let rabbit: amqp.ChannelModel;
let rabbitChannel: amqp.Channel;
let relay: RunningRelay;
let base = "";

beforeAll(async () => {
  for (const s of ["postgres", "nats", "redis", "rabbitmq", "sqs", "kafka"] as const) await requireServer(s);
  db = await testDatabase("watchdog_reverse");
  nc = await natsConnect({ servers: NATS_URL });
  await (await nc.jetstreamManager()).streams.add({ name: stream, subjects: [subject] });
  redis = new Redis(REDIS_URL);
  queueUrl = (await sqs.send(new CreateQueueCommand({ QueueName: queue }))).QueueUrl!;
  rabbit = await amqp.connect(AMQP_URL);
  rabbitChannel = await rabbit.createChannel();
  await rabbitChannel.assertQueue(queue, { durable: true });
  await createTopic(kafka, topic);
  producer = kafka.producer();
  await producer.connect();

  const { via } = proxies;
  const kafkaProxy = await proxies.kafka();
  const amqpUrl = new URL(AMQP_URL);
  amqpUrl.port = String(await via(portOf(AMQP_URL)));
  const sources: Record<Name, Record<string, unknown>> = {
    wr_nats: { type: "nats", url: `nats://127.0.0.1:${await via(portOf(NATS_URL))}`, stream, subject },
    // Long polls shorter than the I/O timeout (docs/WATCHDOG.md).
    wr_redis: { type: "redis", url: `redis://127.0.0.1:${await via(portOf(REDIS_URL))}`, stream_key: redisKey, block_ms: 2000 },
    wr_sqs: { type: "sqs", queue_url: queueUrl, endpoint: `http://127.0.0.1:${await via(portOf(SQS_CLIENT_CONFIG.endpoint))}`, region: "us-east-1", wait_time_seconds: 2 },
    // RabbitMQ pushes: a silent connection is found by the AMQP heartbeat.
    wr_rabbit: { type: "rabbitmq", url: amqpUrl.toString(), queue, heartbeat_seconds: 2 },
    wr_kafka: { type: "kafka", brokers: `127.0.0.1:${kafkaProxy.port}`, topic, group_id: `wdr-${run}` },
  };
  for (const name of PIPELINES) await setRelayInbox(db, name, `${name}_inbox`, sources[name]);
  relay = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0", "--io-timeout", "8"], AWS_ENV);
  base = await httpBase(relay);
});

afterAll(async () => {
  if (relay && relay.proc.exitCode === null) await relay.stop("SIGKILL");
  for (const p of proxies.all) await p.stop();
  await (await nc?.jetstreamManager())?.streams.delete(stream).catch(() => {});
  await nc?.close();
  await redis?.del(redisKey);
  redis?.disconnect();
  await rabbitChannel?.deleteQueue(queue).catch(() => {});
  await rabbit?.close().catch(() => {});
  await producer?.disconnect().catch(() => {});
  await deleteTopic(kafka, topic);
  if (queueUrl) await sqs.send(new DeleteQueueCommand({ QueueUrl: queueUrl })).catch(() => {});
  await db?.drop();
});

/** Message `i` to every source's server, each with the body field `key`: `<pipeline>-<i>`. */
async function publish(i: number): Promise<void> {
  const body = (name: Name) => JSON.stringify({ key: `${name}-${i}` });
  await nc.jetstream().publish(subject, new TextEncoder().encode(body("wr_nats")));
  await redis.xadd(redisKey, "*", "payload", body("wr_redis"));
  await sqs.send(new SendMessageCommand({ QueueUrl: queueUrl, MessageBody: body("wr_sqs") }));
  rabbitChannel.sendToQueue(queue, Buffer.from(body("wr_rabbit")), { persistent: true, contentType: "application/json" });
  await producer.send({ topic, messages: [{ value: body("wr_kafka") }] });
}

async function missing(upTo: number): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  for (const name of PIPELINES) {
    const ids = new Set((await inboxRows(db, `${name}_inbox`).catch(() => [])).map((r) => r.payload?.key));
    const lacking = Array.from({ length: upTo }, (_, k) => `${name}-${k + 1}`).filter((id) => !ids.has(id)).length;
    if (lacking > 0) out[name] = lacking;
  }
  return out;
}

async function expectAllLanded(upTo: number, timeoutMs: number, what: string): Promise<void> {
  let last: Record<string, number> = {};
  const landed = async () => {
    last = await missing(upTo);
    if (Object.keys(last).length === 0) return true;
    await Bun.sleep(500);
    return false;
  };
  await eventually(landed, timeoutMs, what).catch((err) => {
    throw new Error(`${err.message}: missing ${JSON.stringify(last)}\n${relay.stderr.slice(-4000)}`);
  });
}

test("a source whose peer goes silent without closing is degraded, rebuilt, and delivers everything once the path is back", async () => {
  for (const name of PIPELINES) await relay.waitForLog(new RegExp(`\\[${name}\\] started`), 60_000);
  for (let i = 1; i <= 3; i++) await publish(i);
  await expectAllLanded(3, 60_000, "the first messages in every inbox");

  for (const p of proxies.all) p.freeze();
  await expectAllDegraded(base, PIPELINES, relay);
  for (let i = 4; i <= 8; i++) await publish(i);
  await Bun.sleep(8000);
  expect(Object.keys(await missing(8)).sort()).toEqual([...PIPELINES].sort());

  for (const p of proxies.all) p.thaw();
  await expectAllLanded(8, 120_000, "every message in every inbox after the path came back");
  await expectAllRecovered(db.sql, base, PIPELINES.length);
}, 300_000);
