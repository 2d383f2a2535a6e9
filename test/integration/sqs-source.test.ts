/**
 * SQS source → inbox, against the SQS emulator (fauxqs) and PostgreSQL that scripts/services
 * starts: reverse pipelines registered with pgtrickle.set_relay_inbox and run by
 * `pgtrickle-relay drain` / `run`; messages are produced with the AWS SDK and with the relay's
 * own SQS sink (round trip of dedup keys).
 */
import {
  CreateQueueCommand,
  DeleteMessageBatchCommand,
  DeleteQueueCommand,
  GetQueueAttributesCommand,
  ReceiveMessageCommand,
  SendMessageBatchCommand,
  SendMessageCommand,
  SQSClient,
  type MessageAttributeValue,
} from "@aws-sdk/client-sqs";
import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import * as v from "valibot";
import sqsSink from "../../src/backends/sqs/sink.ts";
import sqsSource from "../../src/backends/sqs/source.ts";
import type { Batch } from "../../src/backends/types.ts";
import { RelayError } from "../../src/errors.ts";
import { log } from "../../src/observe/log.ts";
import { backendContext } from "../helpers/backend.ts";
import { forwardMessages } from "../helpers/messages.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { freePort } from "../helpers/proxy.ts";
import { eventually, relayOnce, RunningRelay } from "../helpers/relay.ts";
import { disableInboxes, poisonable } from "../helpers/reverse.ts";
import { expectPoisonIsolated, poisonedStream } from "../helpers/poison.ts";
import { AWS_CREDENTIALS, requireServer, SQS_CLIENT_CONFIG, SQS_ENDPOINT } from "../helpers/servers.ts";

const run = `${process.pid}-${Math.random().toString(36).slice(2, 7)}`;
const tag = run.replace(/-/g, "_");
const admin = new SQSClient(SQS_CLIENT_CONFIG);
const queues: string[] = [];
let db: TestDatabase;

beforeAll(async () => {
  await requireServer("postgres");
  await requireServer("sqs");
  db = await testDatabase("sqs_source");
});
// Each test runs its own relay, which would otherwise also run every earlier test's pipeline.
afterEach(() => disableInboxes(db));
afterAll(async () => {
  for (const q of queues) await admin.send(new DeleteQueueCommand({ QueueUrl: q })).catch(() => {});
  admin.destroy();
  await db?.drop();
});

const connection = {
  endpoint: SQS_ENDPOINT,
  region: "us-east-1",
  access_key_id: AWS_CREDENTIALS.accessKeyId,
  secret_access_key: AWS_CREDENTIALS.secretAccessKey,
};

async function createQueue(label: string, fifo = false): Promise<string> {
  const out = await admin.send(
    new CreateQueueCommand({ QueueName: `relay-src-${label}-${run}${fifo ? ".fifo" : ""}`, Attributes: fifo ? { FifoQueue: "true" } : {} }),
  );
  queues.push(out.QueueUrl!);
  return out.QueueUrl!;
}

const queueName = (url: string) => url.split("/").pop()!;

interface Row {
  event_id: string;
  event_type: string | null;
  source: string | null;
  aggregate_id: string | null;
  payload: unknown;
  trace_id: string | null;
}

/** A queue, an inbox and a reverse sqs pipeline between them. */
async function pipeline(label: string, source: Record<string, unknown> = {}, options: { fifo?: boolean } = {}) {
  const name = `${label}_${tag}`;
  const inbox = `${name}_inbox`;
  const queueUrl = await createQueue(label, options.fifo);
  await db.sql`SELECT pgtrickle.create_inbox(${inbox})`;
  await db.sql`SELECT pgtrickle.set_relay_inbox(${name}, ${inbox}, ${db.sql.json({ type: "sqs", queue_url: queueUrl, ...connection, ...source } as never)})`;
  const rows = () => db.sql<Row[]>`SELECT event_id, event_type, source, aggregate_id, payload, trace_id FROM pgtrickle.${db.sql(inbox)} ORDER BY event_id`;
  const count = async () => (await db.sql<{ n: number }[]>`SELECT count(*)::int AS n FROM pgtrickle.${db.sql(inbox)}`)[0]!.n;
  const drain = (timeoutMs = 60_000) => relayOnce(["drain", "--postgres-url", db.url, "--pipeline", name, "--allow-dead-letters"], {}, timeoutMs);
  return { name, inbox, queueUrl, rows, count, drain };
}

/** Visible and in-flight messages of a queue (fauxqs reports them exactly). */
async function depth(queueUrl: string): Promise<{ visible: number; inFlight: number }> {
  const out = await admin.send(
    new GetQueueAttributesCommand({ QueueUrl: queueUrl, AttributeNames: ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"] }),
  );
  return { visible: Number(out.Attributes!.ApproximateNumberOfMessages), inFlight: Number(out.Attributes!.ApproximateNumberOfMessagesNotVisible) };
}

const str = (value: string): MessageAttributeValue => ({ DataType: "String", StringValue: value });

async function send(queueUrl: string, body: string, attributes: Record<string, MessageAttributeValue> = {}, fifo?: { group: string; dedup: string }) {
  const out = await admin.send(
    new SendMessageCommand({
      QueueUrl: queueUrl,
      MessageBody: body,
      ...(Object.keys(attributes).length ? { MessageAttributes: attributes } : {}),
      ...(fifo ? { MessageGroupId: fifo.group, MessageDeduplicationId: fifo.dedup } : {}),
    }),
  );
  return out.MessageId!;
}

async function sendMany(queueUrl: string, bodies: string[]): Promise<string[]> {
  const ids: string[] = [];
  for (let i = 0; i < bodies.length; i += 10) {
    const out = await admin.send(
      new SendMessageBatchCommand({ QueueUrl: queueUrl, Entries: bodies.slice(i, i + 10).map((b, j) => ({ Id: String(j), MessageBody: b })) }),
    );
    expect(out.Failed ?? []).toEqual([]);
    const byId = new Map((out.Successful ?? []).map((s) => [s.Id, s.MessageId!]));
    ids.push(...bodies.slice(i, i + 10).map((_, j) => byId.get(String(j))!));
  }
  return ids;
}

const relay = () => new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0"]);

const TRACE = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACEPARENT = `00-${TRACE}-00f067aa0ba902b7-01`;

describe("messages → inbox rows", () => {
  test("N messages → N rows with the contract's columns, every message deleted; the producer's resend stays N", async () => {
    const p = await pipeline("cols", { batch_size: 100 });
    const keyed = async () => {
      for (let i = 0; i < 10; i++) {
        await send(p.queueUrl, JSON.stringify({ i, aggregate_id: `agg-${i}` }), {
          pgt_dedup_key: str(`key-${i}`),
          event_type: str("order.created"),
          traceparent: str(TRACEPARENT),
        });
      }
    };
    await keyed();
    const plainIds = await sendMany(p.queueUrl, Array.from({ length: 10 }, (_, i) => JSON.stringify({ plain: i })));
    const textId = await send(p.queueUrl, "not json at all");
    const typedId = await send(p.queueUrl, JSON.stringify({ event_type: "from.body", source: "billing", trace_id: "body-trace" }), { event_type: str("from.attribute") });

    const result = await p.drain();
    expect(result.exitCode).toBe(0);
    expect(result.stderr).toContain("22 delivered");
    const rows = await p.rows();
    expect(rows).toHaveLength(22);
    const byId = new Map(rows.map((r) => [r.event_id, r]));
    expect(byId.get("key-3")).toEqual({
      event_id: "key-3",
      event_type: "order.created",
      source: `sqs:${queueName(p.queueUrl)}`,
      aggregate_id: "agg-3",
      payload: { i: 3, aggregate_id: "agg-3" },
      trace_id: TRACE,
    });
    expect(byId.get(`sqs:${plainIds[4]}`)).toEqual({
      event_id: `sqs:${plainIds[4]}`,
      event_type: queueName(p.queueUrl),
      source: `sqs:${queueName(p.queueUrl)}`,
      aggregate_id: null,
      payload: { plain: 4 },
      trace_id: null,
    });
    expect(byId.get(`sqs:${textId}`)!.payload).toBe("not json at all");
    expect(byId.get(`sqs:${typedId}`)).toMatchObject({ event_type: "from.body", source: "billing", trace_id: "body-trace" });
    expect(await depth(p.queueUrl)).toEqual({ visible: 0, inFlight: 0 });

    // A producer retry (same pgt_dedup_key) is the same event.
    await keyed();
    expect((await p.drain()).exitCode).toBe(0);
    expect(await p.count()).toBe(22);
    expect(await depth(p.queueUrl)).toEqual({ visible: 0, inFlight: 0 });
  });

  test("FIFO queue: MessageDeduplicationId is the key unless pgt_dedup_key is set; every group delivered", async () => {
    const p = await pipeline("fifo", { batch_size: 50 }, { fifo: true });
    for (let i = 0; i < 9; i++) await send(p.queueUrl, JSON.stringify({ i }), {}, { group: `g${i % 3}`, dedup: `dedup-${i}` });
    await send(p.queueUrl, JSON.stringify({ i: 9 }), { pgt_dedup_key: str("attr-key") }, { group: "g0", dedup: "dedup-9" });
    const result = await p.drain();
    expect(result.exitCode).toBe(0);
    expect((await p.rows()).map((r) => r.event_id)).toEqual([...Array.from({ length: 9 }, (_, i) => `dedup-${i}`), "attr-key"].sort());
    expect(await depth(p.queueUrl)).toEqual({ visible: 0, inFlight: 0 });
  });

  test("round trip with the SQS sink: original dedup keys, batches larger than max_messages; a replay stays N", async () => {
    const p = await pipeline("roundtrip", { batch_size: 25, max_messages: 7 });
    const ctx = backendContext("fwd");
    const messages = forwardMessages(30, { stream_table: `rt_${tag}` });
    const forward = async () => {
      const sink = sqsSink.create(v.parse(sqsSink.config, { queue_url: p.queueUrl, ...connection }), ctx);
      await sink.start();
      expect(await sink.write(messages)).toEqual([]);
      await sink.close();
    };
    await forward();
    expect((await p.drain()).exitCode).toBe(0);
    const rows = await p.rows();
    expect(rows.map((r) => r.event_id)).toEqual(messages.map((m) => m.dedup_key).sort());
    expect(rows.find((r) => r.event_id === messages[7]!.dedup_key)!.payload).toMatchObject({ dedup_key: messages[7]!.dedup_key, payload: messages[7]!.payload });
    await forward();
    expect((await p.drain()).exitCode).toBe(0);
    expect(await p.count()).toBe(30);
    expect(await depth(p.queueUrl)).toEqual({ visible: 0, inFlight: 0 });
  });

  test("credentials from the environment (the AWS provider chain, as the compiled binary must find them)", async () => {
    const name = `envcreds_${tag}`;
    const queueUrl = await createQueue("envcreds");
    await db.sql`SELECT pgtrickle.set_relay_inbox(${name}, ${`${name}_inbox`}, ${db.sql.json({ type: "sqs", queue_url: queueUrl, endpoint: SQS_ENDPOINT } as never)})`;
    await sendMany(queueUrl, ['{"n":1}', '{"n":2}']);
    const env = { AWS_ACCESS_KEY_ID: "envkey", AWS_SECRET_ACCESS_KEY: "envsecret", AWS_REGION: "us-east-1" };
    const result = await relayOnce(["drain", "--postgres-url", db.url, "--pipeline", name], env);
    expect(result.exitCode).toBe(0);
    expect(result.stderr).toContain("2 delivered");
    expect(await depth(queueUrl)).toEqual({ visible: 0, inFlight: 0 });
  });

  test("poison messages between valid ones (nested 30,000 deep, a lone surrogate, NUL) are dead-lettered and deleted; every valid one lands", async () => {
    const p = await pipeline("poisonany");
    const { bodies, valid } = poisonedStream();
    await sendMany(p.queueUrl, bodies);
    expect((await p.drain()).exitCode).toBe(0);
    await expectPoisonIsolated(db, p.name, p.inbox, valid);
    expect(await depth(p.queueUrl)).toEqual({ visible: 0, inFlight: 0 });
  }, 60_000);

  test("a poison message goes to relay_dead_letters and is deleted with its batch; the others land", async () => {
    const p = await pipeline("poison");
    await poisonable(db, p.inbox);
    const ids = await sendMany(p.queueUrl, ['{"n":1}', '{"poison":true}', '{"n":3}', '{"n":4}']);
    expect((await p.drain()).exitCode).toBe(0);
    expect(await p.count()).toBe(3);
    const letters = await db.sql<{ dedup_key: string; error_kind: string }[]>`
      SELECT dedup_key, error_kind FROM pgtrickle.relay_dead_letters WHERE pipeline = ${p.name}`;
    expect([...letters]).toEqual([{ dedup_key: `sqs:${ids[1]}`, error_kind: "inbox_permanent" }]);
    expect(await depth(p.queueUrl)).toEqual({ visible: 0, inFlight: 0 });
  });
});

describe("visibility and crashes", () => {
  test("a slow inbox (5 s) with visibility_timeout 2: visibility is extended, nobody else sees the messages, one delivery", async () => {
    const p = await pipeline("slow", { visibility_timeout: 2, batch_size: 10 });
    // Each INSERT statement sleeps 5 s and is counted: a redelivered message would need a second one.
    await db.sql.unsafe(`
      CREATE TABLE pgtrickle.${p.inbox}_calls (at timestamptz DEFAULT clock_timestamp());
      CREATE FUNCTION pgtrickle.${p.inbox}_slow() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN INSERT INTO pgtrickle.${p.inbox}_calls DEFAULT VALUES; PERFORM pg_sleep(5); RETURN NULL; END $$;
      CREATE TRIGGER slow BEFORE INSERT ON pgtrickle.${p.inbox} FOR EACH STATEMENT EXECUTE FUNCTION pgtrickle.${p.inbox}_slow();`);
    await sendMany(p.queueUrl, Array.from({ length: 5 }, (_, i) => JSON.stringify({ i })));
    const draining = p.drain();
    // Another consumer keeps trying while the relay writes; it must never get a message.
    let stolen = 0;
    let polls = 0;
    await eventually(async () => (await db.sql`SELECT 1 FROM pgtrickle.${db.sql(`${p.inbox}_calls`)}`).length > 0, 10_000, "the slow write to begin");
    const until = Date.now() + 5000;
    while (Date.now() < until) {
      const out = await admin.send(new ReceiveMessageCommand({ QueueUrl: p.queueUrl, MaxNumberOfMessages: 10, WaitTimeSeconds: 0, VisibilityTimeout: 0 }));
      stolen += out.Messages?.length ?? 0;
      polls++;
      await Bun.sleep(200);
    }
    const result = await draining;
    expect(result.exitCode).toBe(0);
    expect(polls).toBeGreaterThan(10);
    expect(stolen).toBe(0);
    expect(await p.count()).toBe(5);
    const [row] = await db.sql<{ calls: number }[]>`SELECT count(*)::int AS calls FROM pgtrickle.${db.sql(`${p.inbox}_calls`)}`;
    expect(row!.calls).toBe(1);
    expect(result.stderr).not.toContain("could not extend");
    expect(await depth(p.queueUrl)).toEqual({ visible: 0, inFlight: 0 });
  });

  test("kill -9 after the inbox commit, before DeleteMessageBatch: redelivered after the visibility timeout, N rows, queue empty", async () => {
    const p = await pipeline("crash", { visibility_timeout: 3, wait_time_seconds: 1 });
    await poisonable(db, p.inbox);
    const ids = await sendMany(p.queueUrl, ['{"n":1}', '{"n":2}', '{"n":3}', '{"poison":true}']);
    // Holding this lock parks the relay right after the inbox commit: the next steps are the
    // poison message's dead letter, then the deletes.
    const locker = await db.sql.reserve();
    await locker`BEGIN`;
    await locker`LOCK TABLE pgtrickle.relay_dead_letters IN SHARE MODE`;
    const r = relay();
    try {
      await eventually(async () => (await p.count()) === 3, 20_000, "the inbox commit");
      await r.stop("SIGKILL");
    } finally {
      await locker`ROLLBACK`;
      locker.release();
      await r.stop("SIGKILL");
    }
    expect(await depth(p.queueUrl)).toEqual({ visible: 0, inFlight: 4 });
    // Still invisible (the kill left them undeleted); they come back once the last extension's
    // 3 s run out (fauxqs moves them back lazily, on the next receive).
    await Bun.sleep(3500);
    const result = await p.drain();
    expect(result.exitCode).toBe(0);
    expect((await p.rows()).map((r) => r.event_id)).toEqual(ids.slice(0, 3).map((id) => `sqs:${id}`).sort());
    const letters = await db.sql<{ dedup_key: string }[]>`SELECT dedup_key FROM pgtrickle.relay_dead_letters WHERE pipeline = ${p.name}`;
    expect([...letters]).toEqual([{ dedup_key: `sqs:${ids[3]}` }]);
    expect(await depth(p.queueUrl)).toEqual({ visible: 0, inFlight: 0 });
  });

  test("drain ends without waiting for messages in flight at another consumer", async () => {
    const p = await pipeline("others");
    await sendMany(p.queueUrl, Array.from({ length: 5 }, (_, i) => JSON.stringify({ i })));
    const held = await admin.send(new ReceiveMessageCommand({ QueueUrl: p.queueUrl, MaxNumberOfMessages: 2, VisibilityTimeout: 60 }));
    expect(held.Messages).toHaveLength(2);
    const t0 = Date.now();
    const result = await p.drain(30_000);
    expect(result.exitCode).toBe(0);
    expect(Date.now() - t0).toBeLessThan(15_000);
    expect(await p.count()).toBe(3);
    expect(result.stderr).toContain("2 message(s) in flight at other consumers");
  });
});

describe("the source on its own", () => {
  const ctx = (drain = false) => backendContext(`direct_${tag}`, { direction: "reverse", drain });
  const make = (queueUrl: string, options: Record<string, unknown> = {}, drain = false) =>
    sqsSource.create(v.parse(sqsSource.config, { queue_url: queueUrl, ...connection, ...options }), ctx(drain));

  test("lag(): visible plus in-flight messages (GetQueueAttributes), received by nobody; 0 once drained", async () => {
    const queueUrl = await createQueue("lag");
    const source = make(queueUrl, { batch_size: 10, wait_time_seconds: 1, visibility_timeout: 60 }, true);
    expect(await source.lag!()).toBeNull(); // not started
    await sendMany(queueUrl, Array.from({ length: 25 }, (_, i) => JSON.stringify({ i })));
    await source.start();
    try {
      expect(await source.lag!()).toEqual({ rows: 25, seconds: 0 });
      expect(await source.lag!()).toEqual({ rows: 25, seconds: 0 });
      expect(await depth(queueUrl)).toEqual({ visible: 25, inFlight: 0 }); // asking received nothing
      const it = source.batches(new AbortController().signal)[Symbol.asyncIterator]();
      const first = (await it.next()).value as Batch;
      expect(await source.lag!()).toEqual({ rows: 25, seconds: 0 }); // a batch in hand counts until deleted
      await first.ack();
      expect((await source.lag!())!.rows).toBe(25 - first.messages.length);
      for (let r = await it.next(); !r.done; r = await it.next()) await r.value.ack();
      expect(await source.lag!()).toEqual({ rows: 0, seconds: 0 });
    } finally {
      await source.close();
    }
  });

  test("a batch takes several receives up to batch_size; ack() deletes every message; release() makes them visible at once", async () => {
    const queueUrl = await createQueue("direct");
    await sendMany(queueUrl, Array.from({ length: 30 }, (_, i) => JSON.stringify({ i })));
    const source = make(queueUrl, { batch_size: 25, wait_time_seconds: 1, visibility_timeout: 60 });
    await source.start();
    const stop = new AbortController();
    const it = source.batches(stop.signal)[Symbol.asyncIterator]();
    try {
      const first = (await it.next()).value as Batch;
      expect(first.messages).toHaveLength(25);
      expect(new Set(first.messages.map((m) => m.dedup_key)).size).toBe(25);
      expect(await depth(queueUrl)).toEqual({ visible: 5, inFlight: 25 });
      await first.ack();
      expect(await depth(queueUrl)).toEqual({ visible: 5, inFlight: 0 });

      const second = (await it.next()).value as Batch;
      expect(second.messages).toHaveLength(5);
      await second.release!();
      // Visible again at once, not after the 60 s visibility timeout.
      expect(await depth(queueUrl)).toEqual({ visible: 5, inFlight: 0 });
      const third = (await it.next()).value as Batch;
      expect(third.messages.map((m) => m.dedup_key).sort()).toEqual(second.messages.map((m) => m.dedup_key).sort());
      await third.ack();
      expect(await depth(queueUrl)).toEqual({ visible: 0, inFlight: 0 });
    } finally {
      stop.abort();
      await it.return?.();
      await source.close();
    }
  });

  test("ack() checks every DeleteMessageBatch entry: failed ones are retried, persistent failures fail the ack (nothing lost)", async () => {
    const queueUrl = await createQueue("deletes");
    await sendMany(queueUrl, ['{"n":1}', '{"n":2}', '{"n":3}']);
    const source = make(queueUrl, { batch_size: 3, wait_time_seconds: 1, visibility_timeout: 60 });
    await source.start();
    // Between the source and the server: DeleteMessageBatch answers as a throttled service would.
    const real = (source as unknown as { client: SQSClient }).client;
    const calls: number[] = [];
    let failing: "first entry once" | "everything" = "first entry once";
    (source as unknown as { client: unknown }).client = {
      send: async (command: unknown, options?: unknown) => {
        if (!(command instanceof DeleteMessageBatchCommand)) return real.send(command as never, options as never);
        const entries = command.input.Entries!;
        calls.push(entries.length);
        const refused = failing === "everything" ? entries : calls.length === 1 ? entries.slice(0, 1) : [];
        const passed = entries.filter((e) => !refused.includes(e));
        if (passed.length) await real.send(new DeleteMessageBatchCommand({ QueueUrl: queueUrl, Entries: passed }));
        return {
          Successful: passed.map((e) => ({ Id: e.Id })),
          Failed: refused.map((e) => ({ Id: e.Id, Code: "InternalError", SenderFault: false, Message: "try again" })),
        };
      },
      destroy: () => real.destroy(),
    };
    const stop = new AbortController();
    const it = source.batches(stop.signal)[Symbol.asyncIterator]();
    try {
      const first = (await it.next()).value as Batch;
      expect(first.messages).toHaveLength(3);
      await first.ack();
      expect(calls).toEqual([3, 1]);
      expect(await depth(queueUrl)).toEqual({ visible: 0, inFlight: 0 });

      await sendMany(queueUrl, ['{"n":4}', '{"n":5}']);
      failing = "everything";
      calls.length = 0;
      const second = (await it.next()).value as Batch;
      const err = await second.ack().then(
        () => null,
        (e: unknown) => e,
      );
      expect((err as RelayError).kind).toBe("transient");
      expect((err as RelayError).message).toContain("2 of 2 message(s) still not deleted after 3 attempts (InternalError: try again)");
      expect(calls).toEqual([2, 2, 2]);
      // The pipeline hands a batch it could not acknowledge back: visible again, nothing lost.
      await second.release!();
      expect(await depth(queueUrl)).toEqual({ visible: 2, inFlight: 0 });
    } finally {
      stop.abort();
      await it.return?.();
      await source.close();
    }
  });

  test("the signal aborting ends a long poll promptly", async () => {
    const queueUrl = await createQueue("abort");
    const source = make(queueUrl, { wait_time_seconds: 20 });
    await source.start();
    const stop = new AbortController();
    const it = source.batches(stop.signal)[Symbol.asyncIterator]();
    const t0 = Date.now();
    setTimeout(() => stop.abort(), 300);
    expect((await it.next()).done).toBe(true);
    expect(Date.now() - t0).toBeLessThan(3000);
    await source.close();
  });

  test("unreachable endpoint: transient error naming host:port, never the secret; missing queue: config error", async () => {
    const port = await freePort();
    const secret = `sqs-secret-${run}`;
    const source = sqsSource.create(
      v.parse(sqsSource.config, { queue_url: `http://127.0.0.1:${port}/000000000000/q`, endpoint: `http://127.0.0.1:${port}`, region: "us-east-1", access_key_id: "AKIA", secret_access_key: secret }),
      ctx(),
    );
    const err = await source.start().then(
      () => null,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(RelayError);
    expect((err as RelayError).kind).toBe("transient");
    expect((err as RelayError).message).toContain(`127.0.0.1:${port}`);
    expect((err as RelayError).message).not.toContain(secret);
    await source.close();

    const missing = make(`${SQS_ENDPOINT}/000000000000/relay-src-missing-${run}`);
    const err2 = await missing.start().then(
      () => null,
      (e: unknown) => e,
    );
    expect((err2 as RelayError).kind).toBe("config");
    expect((err2 as RelayError).message).toContain("does not exist");
    await missing.close();
  });

  test("option errors: max_messages above 10, visibility_timeout 0, half a credential pair", () => {
    expect(v.safeParse(sqsSource.config, { queue_url: "http://h/1/q", max_messages: 11 }).success).toBe(false);
    expect(v.safeParse(sqsSource.config, { queue_url: "http://h/1/q", visibility_timeout: 0 }).success).toBe(false);
    expect(v.safeParse(sqsSource.config, { queue_url: "http://h/1/q", wait_time_seconds: 21 }).success).toBe(false);
    const ok = v.parse(sqsSource.config, { queue_url: "http://h/1/q" });
    expect(ok).toMatchObject({ max_messages: 10, wait_time_seconds: 20, visibility_timeout: 30, batch_size: 100 });
    expect(() => sqsSource.create(v.parse(sqsSource.config, { queue_url: "http://h/1/q", access_key_id: "x" }), ctx())).toThrow("set together");
  });
});

describe("pipeline failures", () => {
  test("unreachable endpoint: the pipeline is degraded, the error names host:port, no secret anywhere", async () => {
    const port = await freePort();
    const secret = `sqs-pipeline-secret-${run}`;
    const name = `unreachable_${tag}`;
    await db.sql`SELECT pgtrickle.create_inbox(${`${name}_inbox`})`;
    await db.sql`SELECT pgtrickle.set_relay_inbox(${name}, ${`${name}_inbox`}, ${db.sql.json({
      type: "sqs",
      queue_url: `http://127.0.0.1:${port}/000000000000/q`,
      endpoint: `http://127.0.0.1:${port}`,
      region: "us-east-1",
      access_key_id: "AKIAEXAMPLE",
      secret_access_key: secret,
    } as never)})`;
    const r = relay();
    try {
      await r.waitForLog(new RegExp(`\\[${name}\\] degraded, will retry: .*127\\.0\\.0\\.1:${port}`));
      await eventually(async () => {
        const [s] = await db.sql<{ state: string; last_error: string }[]>`SELECT state, last_error FROM pgtrickle.relay_pipeline_status WHERE pipeline = ${name}`;
        return s?.state === "degraded" && s.last_error.includes(`127.0.0.1:${port}`) && !s.last_error.includes(secret);
      }, 10_000, "the degraded status");
      const status = await relayOnce(["status", "--postgres-url", db.url]);
      expect(status.stdout + status.stderr).not.toContain(secret);
    } finally {
      await r.stop();
    }
    expect(r.stderr + r.stdout).not.toContain(secret);
  });

  test("missing queue: drain fails the pipeline with a config error naming the queue", async () => {
    const name = `missing_${tag}`;
    const queueUrl = `${SQS_ENDPOINT}/000000000000/relay-src-nope-${run}`;
    await db.sql`SELECT pgtrickle.set_relay_inbox(${name}, ${`${name}_inbox`}, ${db.sql.json({ type: "sqs", queue_url: queueUrl, ...connection } as never)})`;
    const result = await relayOnce(["drain", "--postgres-url", db.url, "--pipeline", name]);
    expect(result.exitCode).toBe(1);
    expect(result.stderr).toContain(`sqs queue ${queueUrl} does not exist`);
  });
});
