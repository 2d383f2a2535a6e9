/**
 * RabbitMQ sink against the real broker of scripts/services (127.0.0.1:5672, guest/guest).
 * Each test binds its own queues and reads back what the sink published.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import amqp, { type Channel, type ChannelModel, type GetMessage } from "amqplib";
import * as v from "valibot";
import rabbitmqSink from "../../src/backends/rabbitmq/sink.ts";
import type { Sink } from "../../src/backends/types.ts";
import { envelopeJson } from "../../src/message.ts";
import { log } from "../../src/observe/log.ts";
import { describeIssue } from "../../src/pipeline-config.ts";
import { backendContext, expectRelayError } from "../helpers/backend.ts";
import { forwardMessages } from "../helpers/messages.ts";
import { AMQP_URL, requireServer } from "../helpers/servers.ts";

const RUN = `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`;
const name = (label: string) => `relaytest.${RUN}.${label}`;

const ctx = () => backendContext("rabbit_test", { log: log.withTag("rabbitmq-test") });

const spec = rabbitmqSink;
const sinks: Sink[] = [];
function makeSink(options: Record<string, unknown>): Sink {
  const parsed = v.safeParse(spec.config, { type: "rabbitmq", url: AMQP_URL, ...options });
  if (!parsed.success) throw new Error(`bad test config: ${parsed.issues[0].message}`);
  const sink = spec.create(parsed.output, ctx());
  sinks.push(sink);
  return sink;
}

function configIssue(options: Record<string, unknown>): string | undefined {
  const parsed = v.safeParse(spec.config, { url: AMQP_URL, exchange: "x", ...options });
  return parsed.success ? undefined : parsed.issues.map((i) => describeIssue(i, "sink")).join("; ");
}

let conn: ChannelModel;
let ch: Channel;
const exchanges: string[] = [];
const queues: string[] = [];

/** A fresh queue bound to `exchange` with `pattern`. */
async function boundQueue(exchange: string, pattern: string, label: string): Promise<string> {
  const q = name(label);
  await ch.assertQueue(q, { durable: false, autoDelete: false });
  queues.push(q);
  if (exchange !== "") await ch.bindQueue(q, exchange, pattern);
  return q;
}

async function declareExchange(label: string, type = "topic"): Promise<string> {
  const ex = name(label);
  await ch.assertExchange(ex, type, { durable: true });
  exchanges.push(ex);
  return ex;
}

/** Everything in the queue, in queue order (waits up to 10 s for `expected`). */
async function drain(queue: string, expected: number): Promise<GetMessage[]> {
  const out: GetMessage[] = [];
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline) {
    const m = await ch.get(queue, { noAck: true });
    if (m) {
      out.push(m);
      continue;
    }
    if (out.length >= expected) break;
    await Bun.sleep(50);
  }
  return out;
}

beforeAll(async () => {
  await requireServer("rabbitmq");
  conn = await amqp.connect(AMQP_URL);
  ch = await conn.createChannel();
});

afterAll(async () => {
  await Promise.allSettled(sinks.map((s) => s.close()));
  for (const q of queues) await ch.deleteQueue(q).catch(() => {});
  for (const x of exchanges) await ch.deleteExchange(x).catch(() => {});
  await conn.close();
});

describe("rabbitmq sink", () => {
  test("N messages arrive persistent, in order, with message_id, content type, dedup and full-refresh headers", async () => {
    const exchange = name("orders");
    exchanges.push(exchange);
    const sink = makeSink({ exchange, max_in_flight: 16 });
    await sink.start(); // declares the durable topic exchange
    const queue = await boundQueue(exchange, "orders.#", "orders");
    const batch = [...forwardMessages(1500, { outboxId: 5 }), ...forwardMessages(20, { outboxId: 6, full_refresh: true })];
    expect(await sink.write(batch)).toEqual([]);
    const got = await drain(queue, batch.length);
    expect(got.length).toBe(batch.length);
    got.forEach((g, i) => {
      const m = batch[i]!;
      expect(g.content.toString()).toBe(envelopeJson(m));
      expect(g.fields.routingKey).toBe("orders.insert");
      expect(g.fields.exchange).toBe(exchange);
      expect(g.properties.messageId).toBe(m.dedup_key);
      expect(g.properties.contentType).toBe("application/json");
      expect(g.properties.deliveryMode).toBe(2);
      expect(g.properties.headers?.pgt_dedup_key).toBe(m.dedup_key);
      expect(g.properties.headers?.["pgtrickle-full-refresh"]).toBe(m.is_full_refresh ? true : undefined);
    });
  }, 30_000);

  test("routing key template renders per message; a key over 255 bytes and an oversized body are rejected, the rest delivered", async () => {
    const exchange = await declareExchange("regions");
    const sink = makeSink({ exchange, declare_exchange: false, routing_key: "orders.{region}", max_message_bytes: 2000 });
    await sink.start();
    const queue = await boundQueue(exchange, "orders.*", "regions");
    const batch = forwardMessages(12, {
      payload: (i) => ({ id: i, region: i === 4 ? "r".repeat(300) : i % 2 ? "eu" : "us", blob: i === 7 ? "z".repeat(3000) : "" }),
    });
    const rejected = await sink.write(batch);
    expect(rejected.map((r) => r.message.dedup_key)).toEqual([batch[4]!.dedup_key, batch[7]!.dedup_key]);
    expect(rejected[0]!.error).toContain("255");
    expect(rejected[1]!.error).toContain("max_message_bytes");
    const got = await drain(queue, 10);
    expect(got.map((g) => g.properties.messageId)).toEqual(batch.filter((_, i) => i !== 4 && i !== 7).map((m) => m.dedup_key));
    expect(got.map((g) => g.fields.routingKey)).toEqual(batch.filter((_, i) => i !== 4 && i !== 7).map((_, j, a) => `orders.${(a[j]!.payload as { region: string }).region}`));
  }, 30_000);

  test("unroutable messages with mandatory: transient error naming exchange and key; routable ones delivered", async () => {
    const exchange = await declareExchange("partial");
    const sink = makeSink({ exchange, routing_key_template: "{stream_table}.{op}.{kind}" });
    await sink.start();
    const queue = await boundQueue(exchange, "orders.insert.bound", "partial");
    const batch = forwardMessages(10, { payload: (i) => ({ id: i, kind: i < 6 ? "bound" : "nobody" }) });
    const err = await expectRelayError(sink.write(batch), "transient");
    expect(err.message).toContain(exchange);
    expect(err.message).toContain("'orders.insert.nobody'");
    expect(err.message).toContain("4 of 10");
    expect((await drain(queue, 6)).length).toBe(6);

    // The same sink keeps working once the missing binding exists.
    await ch.bindQueue(queue, exchange, "orders.insert.nobody");
    expect(await sink.write(batch)).toEqual([]);
    expect((await drain(queue, 10)).length).toBe(10);
  }, 30_000);

  test("unroutable: dead_letter rejects only the unroutable messages; mandatory: false drops them", async () => {
    const exchange = await declareExchange("dl");
    const queue = await boundQueue(exchange, "orders.insert.a", "dl");
    const batch = forwardMessages(8, { payload: (i) => ({ id: i, kind: i % 2 ? "a" : "b" }) });

    const dl = makeSink({ exchange, routing_key_template: "{stream_table}.{op}.{kind}", unroutable: "dead_letter" });
    await dl.start();
    const rejected = await dl.write(batch);
    expect(rejected.map((r) => r.message.dedup_key)).toEqual(batch.filter((_, i) => i % 2 === 0).map((m) => m.dedup_key));
    expect(rejected[0]!.error).toContain("orders.insert.b");
    expect((await drain(queue, 4)).length).toBe(4);

    const lax = makeSink({ exchange, routing_key_template: "{stream_table}.{op}.{kind}", mandatory: false });
    await lax.start();
    expect(await lax.write(batch)).toEqual([]);
    expect((await drain(queue, 4)).length).toBe(4);
  }, 30_000);

  test("the default exchange (\"\") routes by queue name", async () => {
    const queue = await boundQueue("", "", "direct-to-queue");
    const sink = makeSink({ exchange: "", routing_key_template: queue });
    await sink.start();
    const batch = forwardMessages(5);
    expect(await sink.write(batch)).toEqual([]);
    expect((await drain(queue, 5)).map((g) => g.properties.messageId)).toEqual(batch.map((m) => m.dedup_key));
  });

  test("declare_exchange false and a missing exchange: start() is a config error naming it", async () => {
    const exchange = name("absent");
    const sink = makeSink({ exchange, declare_exchange: false });
    const err = await expectRelayError(sink.start(), "config");
    expect(err.message).toContain(`'${exchange}'`);
    expect(err.message).toContain("declare_exchange");
  });

  test("an existing exchange of another type is a config error", async () => {
    const exchange = await declareExchange("fanout", "fanout");
    const sink = makeSink({ exchange, exchange_type: "topic" });
    const err = await expectRelayError(sink.start(), "config");
    expect(err.message).toContain("exchange_type");
  });

  test("an exchange deleted under a running sink: transient error, then the next write redeclares and delivers", async () => {
    const exchange = name("vanishing");
    exchanges.push(exchange);
    const sink = makeSink({ exchange });
    await sink.start();
    const queue = await boundQueue(exchange, "#", "vanishing");
    expect(await sink.write(forwardMessages(3))).toEqual([]);
    await ch.deleteExchange(exchange);
    const err = await expectRelayError(sink.write(forwardMessages(3, { outboxId: 2 })), "transient");
    expect(err.message).toContain("127.0.0.1:5672");
    expect(err.message).toContain("NOT_FOUND");
    // Reconnects, redeclares the exchange; the queue needs its binding again.
    const batch = forwardMessages(3, { outboxId: 3 });
    await expectRelayError(sink.write(batch), "transient"); // unroutable until bound
    await ch.bindQueue(queue, exchange, "#");
    expect(await sink.write(batch)).toEqual([]);
    const got = await drain(queue, 6);
    expect(got.map((g) => g.properties.messageId)).toEqual([...forwardMessages(3), ...batch].map((m) => m.dedup_key));
  }, 30_000);

  test("connection refused is a transient error naming host:port, without the password", async () => {
    const sink = spec.create(v.parse(spec.config, { url: "amqp://relay:hunter2-secret@127.0.0.1:1/prod", exchange: "x" }), ctx());
    const err = await expectRelayError(sink.start(), "transient");
    expect(err.message).toContain("127.0.0.1:1");
    expect(err.message).not.toContain("hunter2-secret");
    expect(sink.describe).not.toContain("hunter2-secret");
    expect(sink.describe).toContain("relay@127.0.0.1:1");
  });

  test("a wrong password is a config error that does not echo it", async () => {
    const u = new URL(AMQP_URL);
    u.password = `wrong-${RUN}`;
    const sink = spec.create(v.parse(spec.config, { url: u.toString(), exchange: "x" }), ctx());
    const err = await expectRelayError(sink.start(), "config");
    expect(err.message).toContain("127.0.0.1:5672");
    expect(err.message).not.toContain(`wrong-${RUN}`);
  });

  test("a missing virtual host is a config error naming it", async () => {
    const u = new URL(AMQP_URL);
    u.pathname = `/novhost-${RUN}`;
    const sink = spec.create(v.parse(spec.config, { url: u.toString(), exchange: "x" }), ctx());
    const err = await expectRelayError(sink.start(), "config");
    expect(err.message).toContain(`virtual host 'novhost-${RUN}'`);
  });

  test("configuration mistakes are refused by the schema", () => {
    expect(configIssue({ exchange: undefined })).toContain("exchange");
    expect(configIssue({ url: "http://x" })).toContain("amqp://");
    expect(configIssue({ exchange_type: "x-delayed" })).toContain("exchange_type");
    expect(configIssue({ routing_key: "a", routing_key_template: "b" })).toContain("routing_key");
    expect(configIssue({ tls_cert: "/c.pem" })).toContain("tls_key");
    expect(configIssue({ max_in_flight: 0 })).toContain("max_in_flight");
    const parsed = v.parse(spec.config, { url: AMQP_URL, exchange: "x" });
    expect(parsed.routing_key_template).toBe("{stream_table}.{op}");
    expect(parsed.mandatory).toBe(true);
    expect(v.parse(spec.config, { url: AMQP_URL, exchange: "x", routing_key: "k.{op}" }).routing_key_template).toBe("k.{op}");
  });
});
