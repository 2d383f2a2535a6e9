/**
 * One smoke test per server that scripts/services starts: each really talks to its server with
 * the client library the relay uses. A server that is not running fails here, by name.
 */
import { describe, expect, test } from "bun:test";
import postgres from "postgres";
import { connect as natsConnect } from "nats";
import { Redis } from "ioredis";
import * as amqp from "amqplib";
import { Kafka, logLevel } from "kafkajs";
import {
  CreateQueueCommand,
  DeleteQueueCommand,
  ReceiveMessageCommand,
  SendMessageCommand,
  SQSClient,
} from "@aws-sdk/client-sqs";
import {
  AMQP_URL,
  KAFKA_BROKERS,
  NATS_URL,
  PGTRICKLE_URLS,
  PGTRICKLE_VERSIONS,
  POSTGRES_URL,
  PROMETHEUS_URL,
  REDIS_URL,
  SQS_CLIENT_CONFIG,
  requireServer,
} from "../helpers/servers.ts";

const unique = `${process.pid}_${Date.now().toString(36)}`;

describe("servers from scripts/services", () => {
  test.each(PGTRICKLE_VERSIONS)("pgtrickle: PostgreSQL 18.6 preloads pg_trickle %s", async (version) => {
    await requireServer(`pgtrickle-${version}`);
    const sql = postgres(PGTRICKLE_URLS[version], { max: 1, connect_timeout: 5, onnotice: () => {} });
    try {
      const [row] = await sql<{ server: string; preload: string; available: string }[]>`
        SELECT current_setting('server_version') AS server, current_setting('shared_preload_libraries') AS preload,
               (SELECT default_version FROM pg_available_extensions WHERE name = 'pg_trickle') AS available`;
      expect(row).toEqual({ server: "18.6", preload: "pg_trickle", available: version });
    } finally {
      await sql.end({ timeout: 1 });
    }
  });

  test("postgres answers a query as user postgres", async () => {
    await requireServer("postgres");
    const sql = postgres(POSTGRES_URL, { max: 1, connect_timeout: 5, onnotice: () => {} });
    try {
      const [row] = await sql<{ version: string; user: string }[]>`select version(), current_user as user`;
      expect(row?.version).toStartWith("PostgreSQL");
      expect(row?.user).toBe("postgres");
    } finally {
      await sql.end({ timeout: 1 });
    }
  });

  test("nats has JetStream", async () => {
    await requireServer("nats");
    const nc = await natsConnect({ servers: NATS_URL, timeout: 2000 });
    try {
      const jsm = await nc.jetstreamManager();
      const info = await jsm.getAccountInfo();
      expect(info.limits).toBeDefined();
      const stream = `services_${unique}`;
      await jsm.streams.add({ name: stream, subjects: [`${stream}.>`] });
      const ack = await nc.jetstream().publish(`${stream}.hello`, new TextEncoder().encode("hi"));
      expect(ack.seq).toBe(1);
      await jsm.streams.delete(stream);
    } finally {
      await nc.close();
    }
  });

  test("redis answers PING", async () => {
    await requireServer("redis");
    const redis = new Redis(REDIS_URL, { lazyConnect: true, maxRetriesPerRequest: 1, retryStrategy: () => null });
    try {
      await redis.connect();
      expect(await redis.ping()).toBe("PONG");
    } finally {
      redis.disconnect();
    }
  });

  test("rabbitmq confirms a publish", async () => {
    await requireServer("rabbitmq");
    const conn = await amqp.connect(AMQP_URL);
    try {
      const ch = await conn.createConfirmChannel();
      const { queue } = await ch.assertQueue("", { exclusive: true, autoDelete: true });
      ch.sendToQueue(queue, Buffer.from("hi"));
      await ch.waitForConfirms();
      const msg = await ch.get(queue, { noAck: true });
      expect(msg && msg.content.toString()).toBe("hi");
      await ch.close();
    } finally {
      await conn.close();
    }
  });

  test("kafka creates a topic, takes a message and hands it back", async () => {
    await requireServer("kafka");
    const kafka = new Kafka({ clientId: "services-test", brokers: KAFKA_BROKERS, logLevel: logLevel.NOTHING });
    const topic = `services_${unique}`;
    const admin = kafka.admin();
    const producer = kafka.producer({ allowAutoTopicCreation: false });
    const consumer = kafka.consumer({ groupId: `services_${unique}` });
    await admin.connect();
    try {
      expect(await admin.createTopics({ topics: [{ topic, numPartitions: 1 }], waitForLeaders: true })).toBe(true);
      expect(await admin.listTopics()).toContain(topic);

      await producer.connect();
      await producer.send({ topic, acks: -1, messages: [{ key: "k", value: "hello" }] });

      await consumer.connect();
      await consumer.subscribe({ topics: [topic], fromBeginning: true });
      const received = new Promise<string>((resolve) => {
        void consumer.run({ eachMessage: async ({ message }) => resolve(message.value?.toString() ?? "") });
      });
      expect(await received).toBe("hello");
    } finally {
      await consumer.disconnect();
      await producer.disconnect();
      await admin.deleteTopics({ topics: [topic] }).catch(() => {});
      await admin.disconnect();
    }
  });

  test("sqs (fauxqs) creates a queue, sends and receives", async () => {
    await requireServer("sqs");
    const sqs = new SQSClient(SQS_CLIENT_CONFIG);
    const { QueueUrl } = await sqs.send(new CreateQueueCommand({ QueueName: `services_${unique}` }));
    expect(QueueUrl).toBeString();
    try {
      await sqs.send(new SendMessageCommand({ QueueUrl, MessageBody: "hello" }));
      const { Messages } = await sqs.send(
        new ReceiveMessageCommand({ QueueUrl, MaxNumberOfMessages: 1, WaitTimeSeconds: 1 }),
      );
      expect(Messages?.[0]?.Body).toBe("hello");
    } finally {
      await sqs.send(new DeleteQueueCommand({ QueueUrl }));
      sqs.destroy();
    }
  });

  test("prometheus is ready, evaluates a query and has the scrape job and rule directory the monitoring test uses", async () => {
    await requireServer("prometheus");
    const query = (await (await fetch(`${PROMETHEUS_URL}/api/v1/query?query=${encodeURIComponent("vector(41) + 1")}`)).json()) as {
      data: { result: { value: [number, string] }[] };
    };
    expect(query.data.result[0]?.value[1]).toBe("42");
    const loaded = (await (await fetch(`${PROMETHEUS_URL}/api/v1/status/config`)).json()) as { data: { yaml: string } };
    const config = Bun.YAML.parse(loaded.data.yaml) as {
      rule_files: string[];
      scrape_configs: { job_name: string; file_sd_configs?: unknown[] }[];
    };
    expect(config.rule_files).toHaveLength(1);
    expect(config.scrape_configs.find((j) => j.job_name === "pgtrickle-relay")?.file_sd_configs).toHaveLength(1);
  });

  test("requireServer fails loudly, naming the server, when nothing listens", async () => {
    // nothing listens on loopback port 1
    const { SERVER_ADDRESSES } = await import("../helpers/servers.ts");
    const saved = { ...SERVER_ADDRESSES.redis };
    SERVER_ADDRESSES.redis.port = 1;
    try {
      await expect(requireServer("redis")).rejects.toThrow(
        "redis is not running at 127.0.0.1:1; start it with scripts/services",
      );
    } finally {
      Object.assign(SERVER_ADDRESSES.redis, saved);
    }
  });
});
