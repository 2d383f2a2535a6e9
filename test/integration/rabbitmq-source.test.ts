/**
 * RabbitMQ source against the real broker of scripts/services (127.0.0.1:5672, guest/guest) and
 * PostgreSQL: reverse pipelines registered with pgtrickle.set_relay_inbox, run by the relay's own
 * `drain` / `run` commands, checked in the inbox table and in the queue (nothing left ready or
 * unacknowledged once the relay is gone).
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import amqp, { type Channel, type ChannelModel, type Options } from "amqplib";
import * as v from "valibot";
import rabbitmqSink from "../../src/backends/rabbitmq/sink.ts";
import rabbitmqSource from "../../src/backends/rabbitmq/source.ts";
import { convertAmqpDelivery } from "../../src/backends/rabbitmq/delivery.ts";
import type { BackendContext, Batch } from "../../src/backends/types.ts";
import { sha256Hex } from "../../src/inbound.ts";
import { log } from "../../src/observe/log.ts";
import { backendContext } from "../helpers/backend.ts";
import { forwardMessages } from "../helpers/messages.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { freePort } from "../helpers/proxy.ts";
import { eventually, RunningRelay } from "../helpers/relay.ts";
import { deadLetters, drainPipeline, enableOnly, inboxCount, inboxRows, killRelays, pickyInbox, setRelayInbox, type InboxRow } from "../helpers/reverse.ts";
import { AMQP_URL, requireServer } from "../helpers/servers.ts";
import { expectPoisonIsolated, poisonedStream } from "../helpers/poison.ts";

const RUN = `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`;
const TIMEOUT = 120_000;
const name = (label: string) => `relaysrc.${RUN}.${label}`;

let db: TestDatabase;
let conn: ChannelModel;
let ch: Channel;
const queues: string[] = [];
const exchanges: string[] = [];
const running: RunningRelay[] = [];

beforeAll(async () => {
  await requireServer("rabbitmq");
  await requireServer("postgres");
  db = await testDatabase("rabbitmq_source");
  conn = await amqp.connect(AMQP_URL);
  ch = await conn.createChannel();
});

afterAll(async () => {
  await killRelays(running);
  if (ch) {
    for (const q of queues) await ch.deleteQueue(q).catch(() => {});
    for (const x of exchanges) await ch.deleteExchange(x).catch(() => {});
    await conn.close().catch(() => {});
  }
  await db?.drop();
});

/** A durable queue (as the relay declares it), deleted after the run. */
async function newQueue(label: string, options: Options.AssertQueue = { durable: true }): Promise<string> {
  const q = name(label);
  await ch.assertQueue(q, options);
  queues.push(q);
  return q;
}

/** A reverse pipeline `pname` → inbox `<pname>_inbox`, consuming `queue`. */
async function pipeline(pname: string, queue: string, options: Record<string, unknown> = {}): Promise<string> {
  const source = { type: "rabbitmq", url: AMQP_URL, queue, ...options };
  await setRelayInbox(db, pname, `${pname}_inbox`, source);
  return `${pname}_inbox`;
}

const drain = (pname: string, timeoutSecs = 60, extra: string[] = []) => drainPipeline(db, pname, ["--timeout", String(timeoutSecs), ...extra]);

/** Nothing ready and nobody consuming: with no consumer left, an unacknowledged delivery would be ready again. */
async function expectEmptyQueue(queue: string): Promise<void> {
  expect(await ch.checkQueue(queue)).toMatchObject({ messageCount: 0, consumerCount: 0 });
}

const synthesizedKey = (exchange: string, routingKey: string, body: string) =>
  `amqp:${sha256Hex(Buffer.concat([Buffer.from(exchange), Buffer.from([0]), Buffer.from(routingKey), Buffer.from([0]), Buffer.from(body)]))}`;

const TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

describe("rabbitmq source: mapping, acknowledgement, redelivery", () => {
  test("N deliveries → N inbox rows with the right columns; the queue ends empty; publishing them again leaves N rows", async () => {
    const queue = await newQueue("columns");
    const exchange = name("columns-x");
    await ch.assertExchange(exchange, "topic", { durable: false });
    exchanges.push(exchange);
    await ch.bindQueue(queue, exchange, "orders.#");
    const N = 150;
    const expected = new Map<string, Partial<InboxRow>>();
    const publish = () => {
      for (let i = 0; i < N; i++) {
        const body = JSON.stringify({ i });
        switch (i % 5) {
          case 0:
            expected.set(`mid-${i}`, { event_type: "order.created", payload: { i } });
            ch.sendToQueue(queue, Buffer.from(body), { messageId: `mid-${i}`, type: "order.created", persistent: true });
            break;
          case 1:
            expected.set(`hdr-${i}`, { event_type: queue, payload: { i } });
            ch.sendToQueue(queue, Buffer.from(body), { headers: { pgt_dedup_key: `hdr-${i}` } });
            break;
          case 2: {
            const b = JSON.stringify({ i, event_type: "shipped", aggregate_id: 7, source: "warehouse", trace_id: "abc" });
            expected.set(synthesizedKey("", queue, b), { event_type: "shipped", aggregate_id: "7", source: "warehouse", trace_id: "abc" });
            ch.sendToQueue(queue, Buffer.from(b), { type: "loses-to-body" });
            break;
          }
          case 3: {
            const text = `not json ${i}`;
            expected.set(synthesizedKey("", queue, text), { event_type: queue, payload: text, trace_id: "4bf92f3577b34da6a3ce929d0e0e4736" });
            ch.sendToQueue(queue, Buffer.from(text), { headers: { traceparent: TRACEPARENT } });
            break;
          }
          default:
            expected.set(synthesizedKey(exchange, `orders.eu.${i}`, body), { event_type: `orders.eu.${i}`, payload: { i }, source: `rabbitmq:${queue}` });
            ch.publish(exchange, `orders.eu.${i}`, Buffer.from(body));
        }
      }
    };
    publish();
    // prefetch below batch_size: raised to it, so a full batch can arrive.
    const inbox = await pipeline("rcols", queue, { batch_size: 40, prefetch_count: 5 });
    const result = await drain("rcols");
    expect(result.stderr).toContain(`rcols (reverse): drained, ${N} delivered, 0 dead-lettered`);
    expect(result.exitCode).toBe(0);
    const got = await inboxRows(db, inbox);
    expect(got.length).toBe(N);
    for (const row of got) {
      const want = expected.get(row.event_id);
      expect(want).toBeDefined();
      expect(row).toMatchObject(want!);
      if (!("source" in want!)) expect(row.source).toBe(`rabbitmq:${queue}`);
      expect(row.aggregate_id).toBe("aggregate_id" in want! ? want.aggregate_id! : null);
    }
    await expectEmptyQueue(queue);

    // The same messages again (a producer retry, or a redelivery): keys are stable, no new rows.
    publish();
    const again = await drain("rcols");
    expect(again.stderr).toContain(`drained, ${N} delivered`);
    expect(await inboxCount(db, inbox)).toBe(N);
    await expectEmptyQueue(queue);
  }, TIMEOUT);

  test("round trip: messages published by this relay's RabbitMQ sink keep their dedup keys and subjects", async () => {
    const exchange = name("roundtrip-x");
    exchanges.push(exchange);
    const queue = name("roundtrip");
    queues.push(queue);
    // The source declares the queue and binds it to the exchange the sink declares.
    const sink = rabbitmqSink.create(v.parse(rabbitmqSink.config, { url: AMQP_URL, exchange }), ctx("forward"));
    const inbox = await pipeline("rround", queue, { bind_exchange: exchange, bind_routing_key: "orders.*", batch_size: 12 });
    try {
      await sink.start();
      expect((await drain("rround")).exitCode).toBe(0); // declares and binds; nothing to read yet
      const sent = forwardMessages(30);
      expect(await sink.write(sent)).toEqual([]);
      expect((await drain("rround")).exitCode).toBe(0);
      const got = await inboxRows(db, inbox);
      expect(got.map((r) => r.event_id).sort()).toEqual(sent.map((m) => m.dedup_key).sort());
      const byKey = new Map(sent.map((m) => [m.dedup_key, m]));
      for (const row of got) {
        const m = byKey.get(row.event_id)!;
        expect(row.event_type).toBe(m.subject); // property `type`
        expect((row.payload as { payload: unknown }).payload).toEqual(m.payload);
      }
      await expectEmptyQueue(queue);
    } finally {
      await sink.close();
    }
  }, TIMEOUT);

  test("poison deliveries between valid ones (nested 30,000 deep, a lone surrogate, NUL) are dead-lettered and acknowledged; every valid one lands", async () => {
    const queue = await newQueue("poisonany");
    const inbox = await pipeline("rpoison_any", queue, { batch_size: 50 });
    const { bodies, valid } = poisonedStream();
    bodies.forEach((body, i) => ch.sendToQueue(queue, Buffer.from(body), { messageId: `pa-${i}` }));
    const result = await drain("rpoison_any", 60, ["--allow-dead-letters"]);
    expect(result.exitCode).toBe(0);
    await expectPoisonIsolated(db, "rpoison_any", inbox, valid);
    await expectEmptyQueue(queue);
  }, TIMEOUT);

  test("a message the inbox refuses goes to relay_dead_letters and is acknowledged; the others land", async () => {
    const queue = await newQueue("poison");
    const inbox = await pipeline("rpoison", queue, { batch_size: 50 });
    await pickyInbox(db, inbox);
    for (let i = 0; i < 9; i++) ch.sendToQueue(queue, Buffer.from(JSON.stringify(i === 4 ? { bad: true } : { good: i })), { messageId: `p-${i}` });
    const result = await drain("rpoison", 60, ["--allow-dead-letters"]);
    expect(result.exitCode).toBe(0);
    expect(await inboxCount(db, inbox)).toBe(8);
    expect((await deadLetters(db, "rpoison")).map((d) => [d.dedup_key, d.error_kind])).toEqual([["p-4", "inbox_permanent"]]);
    await expectEmptyQueue(queue);
  }, TIMEOUT);
});

describe("rabbitmq source: crashes", () => {
  test("kill -9 after the inbox commit but before the ack, then a restart: RabbitMQ redelivers, N rows, nothing left in the queue", async () => {
    const queue = await newQueue("crash");
    const inbox = await pipeline("rcrash", queue, { batch_size: 100 });
    await pickyInbox(db, inbox);
    // One batch: 20 events and one the inbox refuses. The pipeline commits the inbox rows, then
    // writes the dead letter, then acks; a lock on relay_dead_letters stops it in between.
    for (let i = 0; i < 21; i++) ch.sendToQueue(queue, Buffer.from(JSON.stringify(i === 20 ? { bad: i } : { n: i })), { messageId: `c-${i}` });
    await enableOnly(db, "rcrash");
    const locker = await db.sql.reserve();
    await locker`BEGIN`;
    await locker`LOCK TABLE pgtrickle.relay_dead_letters IN EXCLUSIVE MODE`;
    const relay = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0"]);
    running.push(relay);
    try {
      await eventually(async () => (await inboxCount(db, inbox)) === 20, 30_000, "the batch's inbox commit");
      await eventually(
        async () => {
          const [row] = await db.sql`SELECT count(*)::int AS n FROM pg_locks WHERE NOT granted AND relation = 'pgtrickle.relay_dead_letters'::regclass`;
          return (row as { n: number }).n > 0;
        },
        10_000,
        "the relay to wait for the dead-letter table",
      );
      // Delivered, in the inbox, not acknowledged.
      expect(await ch.checkQueue(queue)).toMatchObject({ messageCount: 0, consumerCount: 1 });
    } finally {
      await relay.stop("SIGKILL");
      await locker`ROLLBACK`;
      locker.release();
    }
    await eventually(async () => (await ch.checkQueue(queue)).messageCount === 21, 10_000, "RabbitMQ to requeue the unacknowledged deliveries");
    const result = await drain("rcrash", 60, ["--allow-dead-letters"]);
    expect(result.exitCode).toBe(0);
    expect(await inboxCount(db, inbox)).toBe(20);
    expect((await deadLetters(db, "rcrash")).map((d) => [d.dedup_key, d.error_kind, d.attempts])).toEqual([["c-20", "inbox_permanent", 1]]);
    await expectEmptyQueue(queue);
  }, TIMEOUT);

  test("SIGTERM while deliveries keep arriving: the batch in hand is finished, the rest stays queued, a restart delivers it all", async () => {
    const queue = await newQueue("sigterm");
    const inbox = await pipeline("rterm", queue, { batch_size: 10, prefetch_count: 50 });
    await enableOnly(db, "rterm");
    const relay = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0"]);
    running.push(relay);
    let sent = 0;
    try {
      const publishing = (async () => {
        while (sent < 400) {
          for (let i = 0; i < 10; i++, sent++) ch.sendToQueue(queue, Buffer.from(JSON.stringify({ seq: sent })), { messageId: `t-${sent}` });
          await Bun.sleep(10);
        }
      })();
      await eventually(async () => (await inboxCount(db, inbox)) >= 50, 30_000, "the relay to consume");
      expect(await relay.stop("SIGTERM")).toBe(0);
      await publishing;
    } finally {
      if (relay.proc.exitCode === null) await relay.stop("SIGKILL");
    }
    expect((await drain("rterm")).exitCode).toBe(0);
    const got = await inboxRows(db, inbox);
    expect(got.length).toBe(400);
    await expectEmptyQueue(queue);
  }, TIMEOUT);
});

describe("rabbitmq source: failures and configuration", () => {
  test("an unreachable broker leaves the pipeline degraded (transient), with host:port named and no secret in the output", async () => {
    const port = await freePort();
    const secret = `pw-${RUN}-do-not-print`;
    await pipeline("rdown", "some.queue", { url: `amqp://relay:${secret}@127.0.0.1:${port}/`, connection_timeout_ms: 1000 });
    const result = await drain("rdown", 5);
    expect(result.exitCode).toBe(1);
    const output = result.stdout + result.stderr;
    expect(output).toMatch(new RegExp(`\\[rdown\\] degraded, will retry: start: rabbitmq connecting on amqp://relay@127\\.0\\.0\\.1:${port}/: .*ECONNREFUSED`));
    expect(output).not.toContain(secret);
  }, TIMEOUT);

  test("auto_ack true is refused as a configuration error that says why", async () => {
    const queue = await newQueue("autoack");
    await pipeline("rautoack", queue, { auto_ack: true });
    const result = await drain("rautoack", 10);
    expect(result.exitCode).toBe(1);
    expect(result.stderr).toMatch(/rautoack \(reverse\): failed.*'source': auto_ack must stay false: with automatic acknowledgement RabbitMQ drops each message as soon as it is delivered/);
  }, TIMEOUT);

  test("declare_queue uses an existing queue with other properties as it is; declare_queue false needs the queue; bind_exchange needs the exchange", async () => {
    // A non-durable queue with a length limit: a durable declaration would be refused (406).
    const odd = await newQueue("odd", { durable: false, arguments: { "x-max-length": 1000 } });
    ch.sendToQueue(odd, Buffer.from(JSON.stringify({ odd: 1 })), { messageId: "odd-1" });
    const inbox = await pipeline("rodd", odd);
    const result = await drain("rodd");
    expect(result.exitCode).toBe(0);
    expect(result.stderr).toContain("exists with other properties than a plain durable queue; using it as it is");
    expect((await inboxRows(db, inbox)).map((r) => r.event_id)).toEqual(["odd-1"]);
    await expectEmptyQueue(odd);

    await pipeline("rnoqueue", name("never-declared"), { declare_queue: false });
    const missing = await drain("rnoqueue", 10);
    expect(missing.exitCode).toBe(1);
    // The user name shows as *** too: it equals the password (guest/guest), and showing it would show the password.
    expect(missing.stderr).toMatch(/rnoqueue \(reverse\): failed.*queue '.*never-declared' does not exist on amqp:\/\/\*\*\*@127\.0\.0\.1:5672\/: create it, or set declare_queue: true/);

    const queue = await newQueue("nobind");
    await pipeline("rnobind", queue, { bind_exchange: name("no-such-exchange") });
    const unbound = await drain("rnobind", 10);
    expect(unbound.exitCode).toBe(1);
    expect(unbound.stderr).toMatch(/rnobind \(reverse\): failed.*cannot bind queue .* to exchange '.*no-such-exchange'.*: the exchange does not exist/);
  }, TIMEOUT);

  test(
    "lag(): ready messages (checkQueue on a channel of its own) plus the deliveries held unacknowledged; 0 once drained",
    async () => {
      const queue = await newQueue("lag");
      const source = rabbitmqSource.create(v.parse(rabbitmqSource.config, { url: AMQP_URL, queue, batch_size: 10, batch_wait_ms: 50 }), { ...ctx("reverse"), pipeline: "lag_p" });
      try {
        await source.start();
        expect(await source.lag!()).toEqual({ rows: 0, seconds: 0 });
        for (let i = 0; i < 25; i++) ch.sendToQueue(queue, Buffer.from(JSON.stringify({ i })), { messageId: `lag-${i}` });
        await eventually(async () => (await ch.checkQueue(queue)).messageCount === 25, 10_000, "25 messages ready");
        expect(await source.lag!()).toEqual({ rows: 25, seconds: 0 });
        expect(await source.lag!()).toEqual({ rows: 25, seconds: 0 });
        expect(await ch.checkQueue(queue)).toMatchObject({ messageCount: 25, consumerCount: 0 }); // asking consumed nothing
        const it = source.batches(new AbortController().signal)[Symbol.asyncIterator]();
        const first = (await it.next()).value as Batch;
        expect(first.messages).toHaveLength(10);
        // Delivered but unacknowledged (in the batch or buffered) still counts.
        await eventually(async () => (await source.lag!())!.rows === 25, 10_000, "lag 25 with a batch in hand");
        await first.ack();
        expect((await source.lag!())!.rows).toBe(15);
        for (let r = await it.next(); !r.done; r = await it.next()) await r.value.ack();
        expect(await source.lag!()).toEqual({ rows: 0, seconds: 0 });
        // A queue that vanished: lag() fails, the consuming side is untouched.
        const gone = rabbitmqSource.create(v.parse(rabbitmqSource.config, { url: AMQP_URL, queue: name("lag_missing"), declare_queue: false }), ctx("reverse"));
        await expect(gone.lag!()).rejects.toThrow("404");
        await gone.close();
      } finally {
        await source.close();
      }
      await expectEmptyQueue(queue);
    },
    TIMEOUT,
  );

  test("options are validated with messages naming the key", () => {
    const issue = (options: Record<string, unknown>) => {
      const parsed = v.safeParse(rabbitmqSource.config, { url: AMQP_URL, queue: "q", ...options });
      return parsed.success ? undefined : parsed.issues.map((i) => i.message).join("; ");
    };
    expect(issue({})).toBeUndefined();
    expect(issue({ queue: undefined })).toContain("queue is required");
    expect(issue({ queue: "x".repeat(256) })).toContain("at most 255 bytes");
    expect(issue({ url: "http://x" })).toContain("amqp://");
    expect(issue({ prefetch_count: 70000 })).toContain("65535");
    expect(issue({ bind_exchange: "" })).toContain("default exchange cannot be bound");
    expect(issue({ tls_cert: "/c.pem" })).toContain("go together");
    const parsed = v.parse(rabbitmqSource.config, { url: AMQP_URL, queue: "q" });
    expect(parsed).toMatchObject({ prefetch_count: 100, declare_queue: true, bind_routing_key: "#", auto_ack: false, batch_size: 100 });
  });

  test("dedup key precedence: message_id, then header pgt_dedup_key, then the content hash", () => {
    const cfg = v.parse(rabbitmqSource.config, { url: AMQP_URL, queue: "q" });
    const delivery = (messageId: unknown, headers: Record<string, unknown>) => ({ fields: { exchange: "ex", routingKey: "rk" }, properties: { messageId, headers }, content: Buffer.from("body") });
    expect(convertAmqpDelivery(delivery("m1", { pgt_dedup_key: "h1" }), "q", cfg, "p").dedup_key).toBe("m1");
    expect(convertAmqpDelivery(delivery(undefined, { pgt_dedup_key: "h1" }), "q", cfg, "p").dedup_key).toBe("h1");
    expect(convertAmqpDelivery(delivery("", { pgt_dedup_key: Buffer.from("h2") }), "q", cfg, "p").dedup_key).toBe("h2");
    expect(convertAmqpDelivery(delivery(undefined, {}), "q", cfg, "p").dedup_key).toBe(synthesizedKey("ex", "rk", "body"));
    // The NUL separators keep exchange/routing-key boundaries apart.
    expect(synthesizedKey("ex", "rk", "body")).not.toBe(synthesizedKey("e", "xrk", "body"));
  });
});

function ctx(direction: "forward" | "reverse"): BackendContext {
  return backendContext("rabbitmq_source_test", { direction, log: log.withTag("rabbitmq-source-test"), sql: db.sql, postgresUrl: db.url, drain: true });
}
