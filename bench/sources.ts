/**
 * Reverse throughput: N messages published to each system with its own client, then
 * `pgtrickle-relay drain` of a reverse pipeline into an inbox; reports inbox rows/s of the drain
 * (process start included) next to the raw publish rate. The HTTP receiver has no backlog for
 * drain: it is measured under `run` with 8 concurrent senders posting arrays of 100 events.
 *
 *   node_modules/.bin/bun bench/sources.ts [messages=20000] [batch_size=500]
 */
import { CreateQueueCommand, DeleteQueueCommand, SendMessageBatchCommand, SQSClient } from "@aws-sdk/client-sqs";
import amqp from "amqplib";
import Redis from "ioredis";
import { Kafka, logLevel } from "kafkajs";
import { connect as natsConnect } from "nats";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { testDatabase } from "../test/helpers/pg.ts";
import { freePort } from "../test/helpers/proxy.ts";
import { relayOnce, RunningRelay } from "../test/helpers/relay.ts";
import { AMQP_URL, AWS_CREDENTIALS, KAFKA_BROKERS, NATS_URL, REDIS_URL, SQS_CLIENT_CONFIG, SQS_ENDPOINT } from "../test/helpers/servers.ts";

const N = Number(process.argv[2] ?? 20_000);
const batchSize = Number(process.argv[3] ?? 500);
const run = Math.random().toString(36).slice(2, 8);
const body = (i: number) => JSON.stringify({ event_type: "bench", order_id: i, amount: i * 1.5 });
const db = await testDatabase("bench_sources");
const env = { AWS_ACCESS_KEY_ID: AWS_CREDENTIALS.accessKeyId, AWS_SECRET_ACCESS_KEY: AWS_CREDENTIALS.secretAccessKey };
const rate = (n: number, ms: number) => Math.round((n * 1000) / ms);

async function drainInto(name: string, source: Record<string, unknown>): Promise<number> {
  await db.sql`SELECT pgtrickle.set_relay_inbox(${name}, ${`${name}_inbox`}, ${db.sql.json({ ...source, batch_size: batchSize } as never)})`;
  const t0 = performance.now();
  const r = await relayOnce(["drain", "--postgres-url", db.url, "--pipeline", name, "--log-level", "warn"], env, 600_000);
  const ms = performance.now() - t0;
  const [row] = await db.sql.unsafe<{ n: number }[]>(`SELECT count(*)::int AS n FROM pgtrickle."${name}_inbox"`);
  if (r.exitCode !== 0 || row!.n !== N) throw new Error(`${name}: exit ${r.exitCode}, ${row!.n}/${N} rows\n${r.stderr}`);
  return ms;
}

function report(name: string, publishMs: number | null, drainMs: number) {
  const raw = publishMs === null ? "—" : `${rate(N, publishMs)} msg/s`;
  console.log(`${name.padEnd(9)} raw publish ${raw.padStart(12)}   relay drain into the inbox ${String(rate(N, drainMs)).padStart(6)} rows/s (${(drainMs / 1000).toFixed(1)} s)`);
}

try {
  // NATS JetStream
  {
    const nc = await natsConnect({ servers: NATS_URL });
    const jsm = await nc.jetstreamManager();
    await jsm.streams.add({ name: `BS_${run}`, subjects: [`bs${run}.>`] });
    const js = nc.jetstream();
    const t0 = performance.now();
    for (let i = 0; i < N; i += 256) await Promise.all(Array.from({ length: Math.min(256, N - i) }, (_, k) => js.publish(`bs${run}.e`, new TextEncoder().encode(body(i + k)))));
    const pub = performance.now() - t0;
    report("nats", pub, await drainInto("bs_nats", { type: "nats", url: NATS_URL, stream: `BS_${run}`, subject: `bs${run}.>` }));
    await jsm.streams.delete(`BS_${run}`);
    await nc.close();
  }
  // Redis Streams
  {
    const redis = new Redis(REDIS_URL);
    const t0 = performance.now();
    for (let i = 0; i < N; i += 1000) {
      const p = redis.pipeline();
      for (let k = i; k < Math.min(N, i + 1000); k++) p.xadd(`bs:${run}`, "*", "payload", body(k));
      await p.exec();
    }
    const pub = performance.now() - t0;
    report("redis", pub, await drainInto("bs_redis", { type: "redis", url: REDIS_URL, stream_key: `bs:${run}` }));
    await redis.del(`bs:${run}`);
    redis.disconnect();
  }
  // RabbitMQ
  {
    const conn = await amqp.connect(AMQP_URL);
    const ch = await conn.createConfirmChannel();
    await ch.assertQueue(`bs-${run}`, { durable: true });
    const t0 = performance.now();
    for (let i = 0; i < N; i++) ch.sendToQueue(`bs-${run}`, Buffer.from(body(i)), { persistent: true });
    await ch.waitForConfirms();
    const pub = performance.now() - t0;
    report("rabbitmq", pub, await drainInto("bs_rabbit", { type: "rabbitmq", url: AMQP_URL, queue: `bs-${run}` }));
    await ch.deleteQueue(`bs-${run}`);
    await conn.close();
  }
  // Kafka
  {
    const kafka = new Kafka({ brokers: KAFKA_BROKERS, logLevel: logLevel.NOTHING });
    const admin = kafka.admin();
    await admin.connect();
    await admin.createTopics({ topics: [{ topic: `bs-${run}`, numPartitions: 3 }], waitForLeaders: true });
    const producer = kafka.producer();
    await producer.connect();
    const t0 = performance.now();
    for (let i = 0; i < N; i += 1000) {
      await producer.send({ topic: `bs-${run}`, messages: Array.from({ length: Math.min(1000, N - i) }, (_, k) => ({ value: body(i + k) })) });
    }
    const pub = performance.now() - t0;
    await producer.disconnect();
    report("kafka", pub, await drainInto("bs_kafka", { type: "kafka", brokers: KAFKA_BROKERS.join(","), topic: `bs-${run}`, group_id: `bs-${run}` }));
    await admin.deleteTopics({ topics: [`bs-${run}`] }).catch(() => {});
    await admin.deleteGroups([`bs-${run}`]).catch(() => {});
    await admin.disconnect();
  }
  // SQS (fauxqs)
  {
    const sqs = new SQSClient(SQS_CLIENT_CONFIG);
    const queueUrl = (await sqs.send(new CreateQueueCommand({ QueueName: `bs-${run}` }))).QueueUrl!;
    const t0 = performance.now();
    const calls: Promise<unknown>[] = [];
    for (let i = 0; i < N; i += 10) {
      calls.push(sqs.send(new SendMessageBatchCommand({ QueueUrl: queueUrl, Entries: Array.from({ length: Math.min(10, N - i) }, (_, k) => ({ Id: String(k), MessageBody: body(i + k) })) })));
      if (calls.length >= 16) await Promise.all(calls.splice(0));
    }
    await Promise.all(calls);
    const pub = performance.now() - t0;
    report("sqs", pub, await drainInto("bs_sqs", { type: "sqs", queue_url: queueUrl, endpoint: SQS_ENDPOINT, region: "us-east-1" }));
    await sqs.send(new DeleteQueueCommand({ QueueUrl: queueUrl }));
  }
  // File (JSON Lines)
  {
    const path = join(mkdtempSync(join(tmpdir(), "bench-src-")), "in.jsonl");
    writeFileSync(path, Array.from({ length: N }, (_, i) => body(i)).join("\n") + "\n");
    report("file", null, await drainInto("bs_file", { type: "file", input: path }));
  }
  // HTTP receiver under run: 8 senders, arrays of 100 events, each answered after the commit.
  {
    const port = await freePort();
    await db.sql`SELECT pgtrickle.set_relay_inbox('bs_http', 'bs_http_inbox', ${db.sql.json({ type: "http", listen_addr: `127.0.0.1:${port}`, path: "/in", batch_size: batchSize })})`;
    await db.sql`UPDATE pgtrickle.relay_inbox_config SET enabled = (name = 'bs_http')`;
    const relay = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0", "--log-level", "warn"]);
    process.on("exit", () => relay.proc.kill("SIGKILL"));
    for (;;) {
      const ok = await fetch(`http://127.0.0.1:${port}/in`, { method: "POST", body: "[]" }).then((r) => r.status === 200, () => false);
      if (ok) break;
      await Bun.sleep(100);
    }
    let next = 0;
    const t0 = performance.now();
    await Promise.all(
      Array.from({ length: 8 }, async () => {
        while (next < N) {
          const from = next;
          next += 100;
          const events = Array.from({ length: Math.min(100, N - from) }, (_, k) => JSON.parse(body(from + k)));
          const r = await fetch(`http://127.0.0.1:${port}/in`, { method: "POST", body: JSON.stringify(events) });
          if (r.status !== 200) throw new Error(`HTTP ${r.status}: ${await r.text()}`);
        }
      }),
    );
    const ms = performance.now() - t0;
    await relay.stop("SIGTERM");
    const [row] = await db.sql<{ n: number }[]>`SELECT count(*)::int AS n FROM pgtrickle.bs_http_inbox`;
    if (row!.n !== N) throw new Error(`http: ${row!.n}/${N} rows`);
    console.log(`${"http".padEnd(9)} 8 senders × arrays of 100, each answered after the inbox commit: ${rate(N, ms)} rows/s (${(ms / 1000).toFixed(1)} s)`);
  }
} finally {
  await db.drop();
}
