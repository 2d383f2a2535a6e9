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
import { X509Certificate } from "node:crypto";
import { readFileSync } from "node:fs";
import {
  AMQP_URL,
  AMQPS_URL,
  KAFKA_BROKERS,
  KAFKA_MTLS_BROKERS,
  KAFKA_SASL_PASSWORD,
  KAFKA_SASL_SSL_BROKERS,
  KAFKA_SASL_USER,
  KAFKA_SSL_BROKERS,
  NATS_TLS_URL,
  REDIS_TLS_URL,
  TLS_CLIENT_ROLE,
  TLS_FILES,
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

/** Files of .services/tls, read once per test. */
const pem = (path: string) => readFileSync(path, "utf8");

describe("TLS listeners from scripts/services", () => {
  test("the local CA signed the server and client certificates; the expired ones expired, the other CA is unrelated", () => {
    const ca = new X509Certificate(pem(TLS_FILES.ca));
    const server = new X509Certificate(pem(TLS_FILES.serverCert));
    expect(server.verify(ca.publicKey)).toBe(true);
    expect(server.checkIP("127.0.0.1")).toBe("127.0.0.1");
    expect(server.checkHost("localhost")).toBe("localhost");
    expect(new X509Certificate(pem(TLS_FILES.clientCert)).subject).toBe(`CN=${TLS_CLIENT_ROLE}`);
    for (const expired of [TLS_FILES.expiredServerCert, TLS_FILES.expiredClientCert]) {
      expect(new X509Certificate(pem(expired)).validToDate.getTime()).toBeLessThan(Date.now());
    }
    expect(new X509Certificate(pem(TLS_FILES.otherServerCert)).verify(ca.publicKey)).toBe(false);
  });

  test("postgres speaks TLS on its own port; role relay_tls gets in only with the client certificate", async () => {
    await requireServer("postgres");
    const ssl = { ca: pem(TLS_FILES.ca) };
    const withTls = postgres(POSTGRES_URL, { max: 1, connect_timeout: 5, ssl, onnotice: () => {} });
    const asRole = (extra: object) => {
      const u = new URL(POSTGRES_URL);
      u.username = TLS_CLIENT_ROLE;
      return postgres(u.toString(), { max: 1, connect_timeout: 5, ssl: { ...ssl, ...extra }, onnotice: () => {} });
    };
    const withCert = asRole({ cert: pem(TLS_FILES.clientCert), key: pem(TLS_FILES.clientKey) });
    const withoutCert = asRole({});
    try {
      const [row] = await withTls<{ ssl: boolean }[]>`select ssl from pg_stat_ssl where pid = pg_backend_pid()`;
      expect(row?.ssl).toBe(true);
      const [me] = await withCert<{ user: string }[]>`select current_user as user`;
      expect(me?.user).toBe(TLS_CLIENT_ROLE);
      await expect(withoutCert`select 1`).rejects.toThrow("connection requires a valid client certificate");
    } finally {
      await Promise.all([withTls, withCert, withoutCert].map((s) => s.end({ timeout: 1 })));
    }
  });

  test("nats: the TLS server has JetStream and refuses a client without a certificate", async () => {
    const tls = { ca: pem(TLS_FILES.ca), cert: pem(TLS_FILES.clientCert), key: pem(TLS_FILES.clientKey) };
    const nc = await natsConnect({ servers: NATS_TLS_URL, timeout: 5000, tls });
    try {
      expect((await (await nc.jetstreamManager()).getAccountInfo()).limits).toBeDefined();
    } finally {
      await nc.close();
    }
    await expect(natsConnect({ servers: NATS_TLS_URL, timeout: 5000, reconnect: false, tls: { ca: tls.ca } })).rejects.toThrow();
  });

  test("redis answers PING over TLS", async () => {
    const redis = new Redis(REDIS_TLS_URL, { lazyConnect: true, maxRetriesPerRequest: 1, retryStrategy: () => null, tls: { ca: pem(TLS_FILES.ca) } });
    try {
      await redis.connect();
      expect(await redis.ping()).toBe("PONG");
    } finally {
      redis.disconnect();
    }
  });

  test("rabbitmq accepts amqps", async () => {
    const conn = await amqp.connect(AMQPS_URL, { ca: [pem(TLS_FILES.ca)] });
    try {
      const ch = await conn.createChannel();
      await ch.close();
    } finally {
      await conn.close();
    }
  });

  test("kafka lists topics over SSL, SSL with a client certificate, and SASL_SSL", async () => {
    const ca = [pem(TLS_FILES.ca)];
    const clients = [
      new Kafka({ brokers: KAFKA_SSL_BROKERS, ssl: { ca }, logLevel: logLevel.NOTHING }),
      new Kafka({ brokers: KAFKA_MTLS_BROKERS, ssl: { ca, cert: pem(TLS_FILES.clientCert), key: pem(TLS_FILES.clientKey) }, logLevel: logLevel.NOTHING }),
      new Kafka({
        brokers: KAFKA_SASL_SSL_BROKERS,
        ssl: { ca },
        sasl: { mechanism: "scram-sha-256", username: KAFKA_SASL_USER, password: KAFKA_SASL_PASSWORD },
        logLevel: logLevel.NOTHING,
      }),
    ];
    for (const kafka of clients) {
      const admin = kafka.admin();
      await admin.connect();
      try {
        expect(await admin.listTopics()).toBeArray();
      } finally {
        await admin.disconnect();
      }
    }
  });
});
