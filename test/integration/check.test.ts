/**
 * `check` changes nothing on any system: against the real servers, pipelines whose start would
 * create a Kafka topic, a JetStream stream, a Redis stream and group, a RabbitMQ exchange and
 * queue, a file are checked, `check` lists what `run` would create, and none of it exists afterwards.
 * HTTP sinks are really connected to; `--offline` connects to nothing.
 */
import { afterAll, beforeAll, expect, test } from "bun:test";
import amqp from "amqplib";
import { existsSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Redis } from "ioredis";
import { Kafka, logLevel } from "kafkajs";
import { connect as natsConnect } from "nats";
import { createStreamTable, enableOutbox } from "../fixtures/outbox.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { relayOnce } from "../helpers/relay.ts";
import { AMQP_URL, KAFKA_BROKERS, NATS_URL, REDIS_URL, requireServer } from "../helpers/servers.ts";

let db: TestDatabase;
const tag = `chk${process.pid}${Math.floor(Math.random() * 1e6)}`;

beforeAll(async () => {
  for (const s of ["postgres", "redis", "kafka", "nats", "rabbitmq"] as const) await requireServer(s);
  db = await testDatabase("check");
  await createStreamTable(db.sql, "public.chk_orders", "id int primary key");
  await enableOutbox(db.sql, "public.chk_orders");
});
afterAll(async () => {
  await db?.drop();
});

const forward = (name: string, sink: Record<string, unknown>) => db.sql`SELECT pgtrickle.set_relay_outbox(${name}, 'public.chk_orders', NULL, ${db.sql.json(sink as never)})`;
const reverse = (name: string, source: Record<string, unknown>) => db.sql`SELECT pgtrickle.set_relay_inbox(${name}, ${`${name}_inbox`}, ${db.sql.json(source as never)})`;

test("check creates no topic, stream, group, exchange or queue, and says what run would create", async () => {
  await forward("chk_kafka", { type: "kafka", brokers: KAFKA_BROKERS.join(","), topic: `${tag}-topic`, create_topic: true });
  await forward("chk_nats", { type: "nats", url: NATS_URL, subject: `${tag}.{op}`, stream: `${tag}_STREAM`, create_stream: true, stream_subjects: [`${tag}.>`] });
  await forward("chk_rabbit", { type: "rabbitmq", url: AMQP_URL, exchange: `${tag}-ex` });
  await reverse("chk_redis_src", { type: "redis", url: REDIS_URL, stream_key: `${tag}:stream`, group: `${tag}-group` });
  await reverse("chk_rabbit_src", { type: "rabbitmq", url: AMQP_URL, queue: `${tag}-queue` });
  const file = join(mkdtempSync(join(tmpdir(), "relay-check-")), "out.jsonl");
  await forward("chk_file", { type: "file", output: file });

  const out = await relayOnce(["check", "--postgres-url", db.url, "--json", "--timeout", "20"]);
  const report = JSON.parse(out.stdout);
  const byName = Object.fromEntries(report.pipelines.map((p: { name: string }) => [p.name, p]));
  for (const name of ["chk_kafka", "chk_nats", "chk_rabbit", "chk_redis_src", "chk_rabbit_src", "chk_file"]) {
    expect({ name, ok: byName[name].ok, error: byName[name].error }).toEqual({ name, ok: true, error: null });
  }
  expect(byName.chk_kafka.would_create).toEqual([`kafka topic '${tag}-topic'`]);
  expect(byName.chk_nats.would_create.join()).toContain(`JetStream stream "${tag}_STREAM"`);
  expect(byName.chk_rabbit.would_create).toEqual([`rabbitmq exchange '${tag}-ex'`]);
  expect(byName.chk_redis_src.would_create).toEqual([`Redis stream "${tag}:stream" with consumer group "${tag}-group"`]);
  expect(byName.chk_rabbit_src.would_create).toEqual([`rabbitmq queue '${tag}-queue'`]);
  expect(byName.chk_file.would_create).toEqual([`file ${file}`]);
  expect(existsSync(file)).toBe(false);
  expect(out.exitCode).toBe(0);
  // kafkajs's negative timer delay is not reported as a runtime warning (it broke JSON logs).
  expect(out.stderr).not.toContain("TimeoutNegativeWarning");

  const kafka = new Kafka({ brokers: KAFKA_BROKERS, logLevel: logLevel.NOTHING }).admin();
  await kafka.connect();
  expect(await kafka.listTopics()).not.toContain(`${tag}-topic`);
  await kafka.disconnect();
  const nc = await natsConnect({ servers: NATS_URL });
  const jsm = await nc.jetstreamManager();
  expect(await jsm.streams.info(`${tag}_STREAM`).then(() => "exists", () => "missing")).toBe("missing");
  await nc.close();
  const redis = new Redis(REDIS_URL);
  expect(await redis.exists(`${tag}:stream`)).toBe(0);
  redis.disconnect();
  const conn = await amqp.connect(AMQP_URL);
  for (const [kind, name] of [["exchange", `${tag}-ex`], ["queue", `${tag}-queue`]] as const) {
    const ch = await conn.createChannel();
    ch.on("error", () => {});
    const found = await (kind === "exchange" ? ch.checkExchange(name) : ch.checkQueue(name)).then(() => "exists", () => "missing");
    expect({ kind, found }).toEqual({ kind, found: "missing" });
  }
  await conn.close();
  await db.sql`DELETE FROM pgtrickle.relay_outbox_config`;
  await db.sql`DELETE FROM pgtrickle.relay_inbox_config`;
}, 120_000);

test("an HTTP sink is connected to: a closed port fails, a listening one passes; --offline connects to nothing", async () => {
  const server = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: () => new Response("ok") });
  const requests: string[] = [];
  const open = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: (req) => (requests.push(req.url), new Response("ok")) });
  const closedPort = server.port;
  server.stop(true);
  try {
    await forward("chk_http_closed", { type: "http", url: `http://127.0.0.1:${closedPort}/hook` });
    await forward("chk_http_open", { type: "http", url: `http://127.0.0.1:${open.port}/hook` });
    const out = await relayOnce(["check", "--postgres-url", db.url, "--timeout", "10"]);
    expect(out.exitCode).toBe(1);
    expect(out.stdout).toMatch(/FAIL  chk_http_closed .*\n\s+sink: cannot connect to http:\/\/127\.0\.0\.1:\d+/);
    expect(out.stdout).toMatch(/ok    chk_http_open/);
    expect(requests).toEqual([]);
    const offline = await relayOnce(["check", "--postgres-url", db.url, "--offline"]);
    expect(offline.stdout).toMatch(/ok    chk_http_closed/);
    expect(offline.exitCode).toBe(0);
  } finally {
    open.stop(true);
    await db.sql`DELETE FROM pgtrickle.relay_outbox_config`;
  }
}, 60_000);

test("a misspelled key fails check with a suggestion (run only warns); names are validated; a name shared by both directions is pointed out", async () => {
  await forward("chk_typo", { type: "file", output: "/dev/null", formt: "csv" });
  const out = await relayOnce(["check", "--postgres-url", db.url, "--offline"]);
  expect(out.exitCode).toBe(1);
  expect(out.stdout).toContain("unknown stdout sink key 'sink.formt' (did you mean 'sink.format'?)");
  expect(out.stderr.match(/formt/g)?.length ?? 0).toBe(0); // reported once, in the verdict, not as log warnings

  const refused = (p: Promise<unknown>) => p.then(() => "accepted", (err: Error) => err.message);
  expect(await refused(forward("", { type: "stdout" }))).toContain("pipeline name '' is not valid");
  expect(await refused(forward("a b", { type: "stdout" }))).toContain("is not valid");
  await reverse("chk_typo", { type: "stdin" });
  const clash = await relayOnce(["check", "--postgres-url", db.url, "--offline", "--pipeline", "chk_typo"]);
  expect(clash.stdout).toContain("name shared by a forward and a reverse pipeline");
  await db.sql`DELETE FROM pgtrickle.relay_outbox_config`;
  await db.sql`DELETE FROM pgtrickle.relay_inbox_config`;
}, 60_000);
