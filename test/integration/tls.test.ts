/**
 * Every network sink and source over TLS, against the TLS listeners of scripts/services (local
 * CA in .services/tls; addresses in test/helpers/servers.ts), through `pgtrickle-relay drain`:
 * - a server certificate checked against another CA: one config error, nothing delivered;
 * - an expired client certificate: one config error naming tls_cert, nothing delivered;
 * - then the right CA (and client certificate where the server wants one): all N arrive, so
 *   nothing was acknowledged or lost by the failed runs;
 * - no PEM text and no key passphrase in anything the relay printed.
 * The HTTP source has no TLS listener of its own (it is meant to sit behind a proxy), so it has
 * no case here.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import * as amqp from "amqplib";
import { Redis } from "ioredis";
import { Kafka, logLevel } from "kafkajs";
import { connect as natsConnect, headers as natsHeaders, type NatsConnection } from "nats";
import { readFileSync } from "node:fs";
import { createStreamTable, enableOutbox, writeV1Inline } from "../fixtures/outbox.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { relayOnce, type OneShot } from "../helpers/relay.ts";
import { drainPipeline, inboxCount, setRelayInbox } from "../helpers/reverse.ts";
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
  POSTGRES_URL,
  REDIS_TLS_URL,
  REDIS_URL,
  requireServer,
  TLS_CLIENT_ROLE,
  TLS_FILES,
  TLS_KEY_PASSPHRASE,
} from "../helpers/servers.ts";

const RUN = `${process.pid}${Math.floor(Math.random() * 1e6)}`;
const N = 12;
const pem = (path: string) => readFileSync(path, "utf8");

/** The TLS keys of each phase: a CA that did not sign the server, an expired client certificate, the right ones. */
const WRONG_CA = { tls_ca: TLS_FILES.otherCa };
const EXPIRED_CLIENT = { tls_ca: TLS_FILES.ca, tls_cert: TLS_FILES.expiredClientCert, tls_key: TLS_FILES.expiredClientKey };
const CA_ONLY = { tls_ca: TLS_FILES.ca };
/** The client certificate with its encrypted key: the passphrase must reach no output. */
const MUTUAL = { tls_ca: TLS_FILES.ca, tls_cert: TLS_FILES.clientCert, tls_key: TLS_FILES.clientKeyEncrypted, tls_key_password: TLS_KEY_PASSPHRASE };
const NATS_TLS = { ca: pem(TLS_FILES.ca), cert: pem(TLS_FILES.clientCert), key: pem(TLS_FILES.clientKey) };

let db: TestDatabase;
let remote: TestDatabase;
let nc: NatsConnection;
let redis: Redis;
let amqpConn: amqp.ChannelModel;
const kafka = new Kafka({ brokers: KAFKA_BROKERS, logLevel: logLevel.NOTHING });
let webhook: ReturnType<typeof Bun.serve>;
let webhookMessages = 0;

beforeAll(async () => {
  for (const s of ["postgres", "nats", "redis", "rabbitmq", "kafka"] as const) await requireServer(s);
  db = await testDatabase("tls");
  remote = await testDatabase("tls_remote", { catalog: false });
  await remote.sql`SELECT pgtrickle.create_inbox('tls_inbox')`;
  nc = await natsConnect({ servers: NATS_TLS_URL, tls: NATS_TLS, timeout: 5000 });
  redis = new Redis(REDIS_URL);
  amqpConn = await amqp.connect(AMQP_URL);
  webhook = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    tls: { cert: pem(TLS_FILES.serverCert), key: pem(TLS_FILES.serverKey) },
    async fetch(req) {
      const body = await req.json();
      webhookMessages += Array.isArray(body) ? body.length : 1;
      return new Response("ok");
    },
  });
});

afterAll(async () => {
  webhook?.stop(true);
  if (nc) {
    const jsm = await nc.jetstreamManager();
    for (const s of [`TLS_${RUN}`, `TLSSRC_${RUN}`]) await jsm.streams.delete(s).catch(() => {});
    await nc.close();
  }
  if (redis) {
    await redis.del(`tls:${RUN}`, `tls:${RUN}:old`, `tlssrc:${RUN}`).catch(() => {});
    redis.disconnect();
  }
  if (amqpConn) {
    const ch = await amqpConn.createChannel();
    for (const q of [`tls-${RUN}`, `tlssrc-${RUN}`]) await ch.deleteQueue(q).catch(() => {});
    await ch.deleteExchange(`tls-${RUN}`).catch(() => {});
    await amqpConn.close().catch(() => {});
  }
  const admin = kafka.admin();
  await admin.connect();
  const mine = (await admin.listTopics()).filter((t) => t.startsWith(`tls-${RUN}`));
  if (mine.length) await admin.deleteTopics({ topics: mine }).catch(() => {});
  await admin.deleteGroups([`tls-${RUN}`]).catch(() => {});
  await admin.disconnect();
  await db?.drop();
  await remote?.drop();
});

/** Nothing the relay printed holds key material or the passphrase. */
function expectNoSecrets(out: OneShot): void {
  const all = out.stdout + out.stderr;
  expect(all).not.toContain("-----BEGIN");
  expect(all).not.toContain("PRIVATE KEY");
  expect(all).not.toContain(TLS_KEY_PASSPHRASE);
}

/** Runs the three phases of one pipeline: wrong CA, expired client certificate, right keys. */
async function threePhases(
  set: (tlsKeys: Record<string, unknown>) => Promise<void>,
  drain: () => Promise<OneShot>,
  delivered: () => Promise<number>,
  good: Record<string, unknown>,
): Promise<void> {
  const phases: [Record<string, unknown>, string | undefined][] = [
    [WRONG_CA, "TLS: the server's certificate is not signed by tls_ca"],
    [EXPIRED_CLIENT, "tls_cert: the client certificate expired on 2020-01-02T00:00:00.000Z"],
    [good, undefined],
  ];
  for (const [keys, failure] of phases) {
    await set(keys);
    const out = await drain();
    expectNoSecrets(out);
    expect(out.exitCode, out.stderr).toBe(failure ? 1 : 0);
    if (failure) expect(out.stderr).toContain(failure);
    expect(await delivered()).toBe(failure ? 0 : N);
  }
}

describe("sinks over TLS", () => {
  /** A stream table of its own with N rows pending in its outbox, relayed by pipeline `name`. */
  async function forward(name: string, sink: Record<string, unknown>): Promise<void> {
    await createStreamTable(db.sql, `public.${name}`, "id int primary key");
    const { outboxTable } = await enableOutbox(db.sql, `public.${name}`);
    await writeV1Inline(db.sql, outboxTable, { inserted: Array.from({ length: N }, (_, i) => ({ id: i + 1 })), deleted: [] });
    await setSink(name, sink, {});
  }
  const setSink = (name: string, sink: Record<string, unknown>, tlsKeys: Record<string, unknown>) =>
    db.sql`SELECT pgtrickle.set_relay_outbox(${name}, ${`public.${name}`}, NULL, ${db.sql.json({ ...sink, ...tlsKeys } as never)})`.then(() => {});
  const drainForward = (name: string) => () => relayOnce(["drain", "--postgres-url", db.url, "--pipeline", name, "--timeout", "60"], {}, 90_000);

  async function sinkCase(name: string, sink: Record<string, unknown>, delivered: () => Promise<number>, good: Record<string, unknown>) {
    await forward(name, sink);
    await threePhases((keys) => setSink(name, sink, keys), drainForward(name), delivered, good);
  }

  async function topicCount(topic: string): Promise<number> {
    const admin = kafka.admin();
    await admin.connect();
    try {
      if (!(await admin.listTopics()).includes(topic)) return 0;
      return (await admin.fetchTopicOffsets(topic)).reduce((n, p) => n + Number(p.high) - Number(p.low), 0);
    } finally {
      await admin.disconnect();
    }
  }

  test("nats: mutual TLS (the server requires a client certificate)", async () => {
    const stream = `TLS_${RUN}`;
    const delivered = async () => {
      const jsm = await nc.jetstreamManager();
      return jsm.streams.info(stream).then((i) => i.state.messages, () => 0);
    };
    await sinkCase("tls_nats", { type: "nats", url: NATS_TLS_URL, stream, create_stream: true, subject_template: `tls${RUN}.{stream_table}.{op}` }, delivered, MUTUAL);
  }, 240_000);

  test("kafka: SSL", async () => {
    const topic = `tls-${RUN}-ssl`;
    await sinkCase("tls_kafka_ssl", { type: "kafka", brokers: KAFKA_SSL_BROKERS.join(","), security_protocol: "SSL", topic, create_topic: true }, () => topicCount(topic), CA_ONLY);
  }, 240_000);

  test("kafka: SSL with a required client certificate", async () => {
    const topic = `tls-${RUN}-mtls`;
    await sinkCase("tls_kafka_mtls", { type: "kafka", brokers: KAFKA_MTLS_BROKERS.join(","), security_protocol: "SSL", topic, create_topic: true }, () => topicCount(topic), MUTUAL);
  }, 240_000);

  test("kafka: SASL_SSL", async () => {
    const topic = `tls-${RUN}-saslssl`;
    const sink = {
      type: "kafka",
      brokers: KAFKA_SASL_SSL_BROKERS.join(","),
      security_protocol: "SASL_SSL",
      sasl_mechanism: "scram-sha-256",
      sasl_username: KAFKA_SASL_USER,
      sasl_password: KAFKA_SASL_PASSWORD,
      topic,
      create_topic: true,
    };
    await sinkCase("tls_kafka_saslssl", sink, () => topicCount(topic), CA_ONLY);
  }, 240_000);

  test("redis: rediss://", async () => {
    const key = `tls:${RUN}`;
    await sinkCase("tls_redis", { type: "redis", url: REDIS_TLS_URL, stream_key: key }, () => redis.xlen(key), MUTUAL);
  }, 240_000);

  test("rabbitmq: amqps://", async () => {
    const exchange = `tls-${RUN}`;
    const ch = await amqpConn.createChannel();
    await ch.assertExchange(exchange, "topic", { durable: true });
    await ch.assertQueue(exchange, { durable: false, autoDelete: false });
    await ch.bindQueue(exchange, exchange, "#");
    const delivered = async () => (await ch.checkQueue(exchange)).messageCount;
    try {
      await sinkCase("tls_rabbitmq", { type: "rabbitmq", url: AMQPS_URL, exchange }, delivered, MUTUAL);
    } finally {
      await ch.close();
    }
  }, 240_000);

  test("http: https://", async () => {
    webhookMessages = 0;
    await sinkCase("tls_http", { type: "http", url: `https://127.0.0.1:${webhook.port}/hook` }, async () => webhookMessages, CA_ONLY);
  }, 240_000);

  test("old spellings (Kafka ssl_*, Redis' tls object) still connect, with one warning naming the new key", async () => {
    const topic = `tls-${RUN}-old`;
    const key = `tls:${RUN}:old`;
    const sinks = {
      tls_old_kafka: { type: "kafka", brokers: KAFKA_MTLS_BROKERS.join(","), security_protocol: "SSL", topic, create_topic: true, ssl_ca_file: TLS_FILES.ca, ssl_cert_file: TLS_FILES.clientCert, ssl_key_file: TLS_FILES.clientKeyEncrypted, ssl_key_password: TLS_KEY_PASSPHRASE },
      tls_old_redis: { type: "redis", url: REDIS_TLS_URL, stream_key: key, tls: { ca: TLS_FILES.ca } },
    };
    for (const [name, sink] of Object.entries(sinks)) await forward(name, sink);
    const out = await relayOnce(["drain", "--postgres-url", db.url, "--pipeline", Object.keys(sinks).join(","), "--timeout", "60"], {}, 90_000);
    expectNoSecrets(out);
    expect(out.exitCode, out.stderr).toBe(0);
    expect(await topicCount(topic)).toBe(N);
    expect(await redis.xlen(key)).toBe(N);
    for (const [oldKey, newKey] of [["ssl_ca_file", "tls_ca"], ["ssl_key_password", "tls_key_password"], ["tls.ca", "tls_ca"]]) {
      expect(out.stderr.split(`${oldKey} is an old spelling; use ${newKey}`).length - 1).toBe(1);
    }
  }, 240_000);

  test("pg-inbox: verify-full, logging in by client certificate (pg_hba cert)", async () => {
    const url = new URL(POSTGRES_URL);
    url.username = TLS_CLIENT_ROLE;
    url.pathname = `/${remote.name}`;
    const delivered = async () => (await remote.sql<{ n: number }[]>`SELECT count(*)::int AS n FROM pgtrickle.tls_inbox`)[0]!.n;
    await sinkCase("tls_pg", { type: "pg-inbox", url: url.toString(), inbox_table: "tls_inbox" }, delivered, MUTUAL);
  }, 240_000);
  test("check names the TLS failure of a pipeline, without connecting past it", async () => {
    await forward("tls_check", { type: "redis", url: REDIS_TLS_URL, stream_key: `tls:${RUN}:check`, ...WRONG_CA });
    const out = await relayOnce(["check", "--postgres-url", db.url], {}, 120_000);
    expectNoSecrets(out);
    expect(out.exitCode, out.stdout + out.stderr).toBe(1);
    const verdict = out.stdout.slice(out.stdout.indexOf("tls_check (forward)"));
    expect(verdict.split("\n").slice(0, 3).join("\n")).toContain("TLS: the server's certificate is not signed by tls_ca");
    expect(await redis.exists(`tls:${RUN}:check`)).toBe(0);
    await db.sql`SELECT pgtrickle.disable_relay('tls_check')`;
  }, 180_000);
});

describe("sources over TLS", () => {
  const bodies = Array.from({ length: N }, (_, i) => JSON.stringify({ event_type: "order.created", n: i + 1 }));

  async function sourceCase(name: string, source: Record<string, unknown>, good: Record<string, unknown>) {
    const inbox = `${name}_inbox`;
    await threePhases(
      (keys) => setRelayInbox(db, name, inbox, { ...source, ...keys }),
      () => drainPipeline(db, name, ["--timeout", "60"], 90_000),
      () => inboxCount(db, inbox),
      good,
    );
  }

  test("nats: mutual TLS", async () => {
    const subject = `tlssrc${RUN}`;
    await (await nc.jetstreamManager()).streams.add({ name: `TLSSRC_${RUN}`, subjects: [`${subject}.>`] });
    const js = nc.jetstream();
    for (const [i, body] of bodies.entries()) {
      const h = natsHeaders();
      h.set("Nats-Msg-Id", `tlssrc-${i}`);
      await js.publish(`${subject}.orders`, new TextEncoder().encode(body), { headers: h });
    }
    await sourceCase("tlssrc_nats", { type: "nats", url: NATS_TLS_URL, subject: `${subject}.>` }, MUTUAL);
  }, 240_000);

  test("kafka: SSL with a required client certificate", async () => {
    const topic = `tls-${RUN}-src`;
    const admin = kafka.admin();
    await admin.connect();
    await admin.createTopics({ topics: [{ topic, numPartitions: 1 }], waitForLeaders: true });
    await admin.disconnect();
    const producer = kafka.producer();
    await producer.connect();
    await producer.send({ topic, messages: bodies.map((value, i) => ({ key: `k${i}`, value })) });
    await producer.disconnect();
    await sourceCase("tlssrc_kafka", { type: "kafka", brokers: KAFKA_MTLS_BROKERS.join(","), security_protocol: "SSL", topic, group_id: `tls-${RUN}` }, MUTUAL);
  }, 240_000);

  test("redis: rediss://", async () => {
    const key = `tlssrc:${RUN}`;
    for (const body of bodies) await redis.xadd(key, "*", "payload", body);
    await sourceCase("tlssrc_redis", { type: "redis", url: REDIS_TLS_URL, stream_key: key }, CA_ONLY);
  }, 240_000);

  test("rabbitmq: amqps://", async () => {
    const queue = `tlssrc-${RUN}`;
    const ch = await amqpConn.createChannel();
    await ch.assertQueue(queue, { durable: true });
    for (const body of bodies) ch.sendToQueue(queue, Buffer.from(body), { persistent: true });
    await ch.close();
    await sourceCase("tlssrc_rabbitmq", { type: "rabbitmq", url: AMQPS_URL, queue }, MUTUAL);
  }, 240_000);
});
