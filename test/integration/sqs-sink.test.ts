/** SQS sink against the SQS emulator (fauxqs) that scripts/services starts. */
import {
  CreateQueueCommand,
  DeleteMessageBatchCommand,
  DeleteQueueCommand,
  ReceiveMessageCommand,
  SQSClient,
  type Message as SqsMessage,
} from "@aws-sdk/client-sqs";
import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import { createHash } from "node:crypto";
import * as v from "valibot";
import sqsSink from "../../src/backends/sqs/sink.ts";
import type { Sink } from "../../src/backends/types.ts";
import { envelopeJson, type Message } from "../../src/message.ts";
import { log } from "../../src/observe/log.ts";
import { backendContext, errorOf } from "../helpers/backend.ts";
import { forwardMessages } from "../helpers/messages.ts";
import { AWS_CREDENTIALS, requireServer, SQS_CLIENT_CONFIG, SQS_ENDPOINT } from "../helpers/servers.ts";

const run = `${process.pid}-${Math.random().toString(36).slice(2, 8)}`;
const admin = new SQSClient(SQS_CLIENT_CONFIG);
const queues: string[] = [];
const sinks: Sink[] = [];

const ctx = () => backendContext("orders_sqs");

async function createQueue(name: string, attributes: Record<string, string> = {}): Promise<string> {
  const fifo = name.endsWith(".fifo");
  const out = await admin.send(
    new CreateQueueCommand({ QueueName: `relay-${name.replace(/\.fifo$/, "")}-${run}${fifo ? ".fifo" : ""}`, Attributes: { ...(fifo ? { FifoQueue: "true" } : {}), ...attributes } }),
  );
  queues.push(out.QueueUrl!);
  return out.QueueUrl!;
}

async function makeSink(options: Record<string, unknown>, start = true): Promise<Sink> {
  const cfg = v.parse(sqsSink.config, {
    type: "sqs",
    endpoint: SQS_ENDPOINT,
    region: "us-east-1",
    access_key_id: AWS_CREDENTIALS.accessKeyId,
    secret_access_key: AWS_CREDENTIALS.secretAccessKey,
    ...options,
  });
  const sink = sqsSink.create(cfg, ctx());
  sinks.push(sink);
  if (start) await sink.start();
  return sink;
}

/** Receives and deletes until the queue stays empty; order of arrival is kept. */
async function drain(queueUrl: string): Promise<SqsMessage[]> {
  const got: SqsMessage[] = [];
  for (let empty = 0; empty < 2; ) {
    const out = await admin.send(
      new ReceiveMessageCommand({
        QueueUrl: queueUrl,
        MaxNumberOfMessages: 10,
        WaitTimeSeconds: 0,
        MessageAttributeNames: ["All"],
        MessageSystemAttributeNames: ["MessageGroupId", "MessageDeduplicationId"],
      }),
    );
    const batch = out.Messages ?? [];
    if (batch.length === 0) {
      empty++;
      continue;
    }
    empty = 0;
    got.push(...batch);
    await admin.send(
      new DeleteMessageBatchCommand({ QueueUrl: queueUrl, Entries: batch.map((m, i) => ({ Id: String(i), ReceiptHandle: m.ReceiptHandle! })) }),
    );
  }
  return got;
}

const keys = (ms: SqsMessage[]) => ms.map((m) => m.MessageAttributes?.pgt_dedup_key?.StringValue);

beforeAll(async () => {
  await requireServer("sqs");
});
afterEach(async () => {
  while (sinks.length) await sinks.pop()!.close();
});
afterAll(async () => {
  for (const q of queues) await admin.send(new DeleteQueueCommand({ QueueUrl: q })).catch(() => {});
  admin.destroy();
});

describe("sqs sink, standard queue", () => {
  test("N messages → N on the queue with envelope body and attributes", async () => {
    const queue = await createQueue("std");
    const sink = await makeSink({ queue_url: queue });
    expect(sink.describe).toContain("standard");
    const messages = [...forwardMessages(30), ...forwardMessages(7, { outboxId: 2, full_refresh: true })];
    expect(await sink.write(messages)).toEqual([]);
    const got = await drain(queue);
    expect(got).toHaveLength(37);
    const byKey = new Map(got.map((m) => [m.MessageAttributes!.pgt_dedup_key!.StringValue!, m]));
    expect(new Set(byKey.keys())).toEqual(new Set(messages.map((m) => m.dedup_key)));
    for (const m of messages) {
      const received = byKey.get(m.dedup_key)!;
      expect(received.Body).toBe(envelopeJson(m));
      expect(received.MessageAttributes!["pgtrickle-full-refresh"]?.StringValue).toBe(m.is_full_refresh ? "true" : undefined);
      expect(received.Attributes?.MessageGroupId).toBeUndefined();
    }
  });

  test("batch_send: false sends one SendMessage per message, all delivered", async () => {
    const queue = await createQueue("single");
    const sink = await makeSink({ queue_url: queue, batch_send: false, max_in_flight: 4 });
    const messages = forwardMessages(12);
    expect(await sink.write(messages)).toEqual([]);
    expect(new Set(keys(await drain(queue)))).toEqual(new Set(messages.map((m) => m.dedup_key)));
  });

  test("a message larger than the queue's MaximumMessageSize (256 KiB) is rejected, the rest arrive", async () => {
    const queue = await createQueue("small", { MaximumMessageSize: "262144" });
    const sink = await makeSink({ queue_url: queue });
    const messages = forwardMessages(6, { payload: (i) => ({ i, blob: i === 2 ? "x".repeat(270 * 1024) : "small" }) });
    const rejected = await sink.write(messages);
    expect(rejected.map((r) => r.message.dedup_key)).toEqual([messages[2]!.dedup_key]);
    expect(rejected[0]!.error).toContain("262144");
    const got = await drain(queue);
    expect(new Set(keys(got))).toEqual(new Set(messages.filter((_, i) => i !== 2).map((m) => m.dedup_key)));
  });

  test("big messages within the queue limit are split across calls and all delivered", async () => {
    const queue = await createQueue("big"); // fauxqs, like AWS since 2025, defaults to 1 MiB
    const sink = await makeSink({ queue_url: queue });
    const messages = forwardMessages(9, { payload: (i) => ({ i, blob: "y".repeat(i === 4 ? 600 * 1024 : 90 * 1024) }) });
    expect(await sink.write(messages)).toEqual([]);
    const got = await drain(queue);
    expect(new Set(keys(got))).toEqual(new Set(messages.map((m) => m.dedup_key)));
    expect(got.find((m) => m.MessageAttributes!.pgt_dedup_key!.StringValue === messages[4]!.dedup_key)!.Body).toBe(envelopeJson(messages[4]!));
  });

  test("a body SQS refuses (InvalidMessageContents, SenderFault) is rejected by the server, the rest arrive", async () => {
    const queue = await createQueue("badchars");
    const sink = await makeSink({ queue_url: queue });
    const messages = forwardMessages(5, { payload: (i) => ({ i, text: i === 1 ? "bad \uFFFF char" : "fine" }) });
    const rejected = await sink.write(messages);
    expect(rejected.map((r) => r.message.dedup_key)).toEqual([messages[1]!.dedup_key]);
    expect(rejected[0]!.error).toContain("InvalidMessageContents");
    expect(new Set(keys(await drain(queue)))).toEqual(new Set(messages.filter((_, i) => i !== 1).map((m) => m.dedup_key)));
  });
});

describe("sqs sink, FIFO queue", () => {
  test("group id and dedup id per message; a replay of the same batch stays N (dedup)", async () => {
    const queue = await createQueue("orders.fifo");
    const sink = await makeSink({ queue_url: queue });
    expect(sink.describe).toContain("fifo");
    const messages = [...forwardMessages(14, { stream_table: "orders" }), ...forwardMessages(9, { stream_table: "customers" })];
    expect(await sink.write(messages)).toEqual([]);
    expect(await sink.write(messages)).toEqual([]);
    const got = await drain(queue);
    expect(got).toHaveLength(23);
    for (const m of got) {
      const key = m.MessageAttributes!.pgt_dedup_key!.StringValue!;
      expect(m.Attributes!.MessageDeduplicationId).toBe(key);
      expect(m.Attributes!.MessageGroupId).toBe(key.startsWith("outbox_orders:") ? "orders" : "customers");
    }
  });

  test("order is kept within each message group while groups are sent in parallel", async () => {
    const queue = await createQueue("ordered.fifo");
    // The emulator answers in arrival order within microseconds, which would hide calls of one
    // group sent concurrently; a forwarder that holds each request a random few ms exposes them.
    const jitter = Bun.serve({
      hostname: "127.0.0.1",
      port: 0,
      fetch: async (req) => {
        const body = await req.arrayBuffer();
        await Bun.sleep(Math.random() * 15);
        const url = new URL(req.url);
        const headers = new Headers(req.headers);
        headers.delete("host");
        return fetch(`${SQS_ENDPOINT}${url.pathname}${url.search}`, { method: req.method, headers, body });
      },
    });
    const sink = await makeSink({
      queue_url: queue,
      endpoint: `http://127.0.0.1:${jitter.port}`,
      message_group_id: "{stream_table}-{customer}",
      max_in_flight: 8,
    });
    // Interleaved rows of 7 customers (the group template uses the row field `customer`).
    const messages = forwardMessages(140, { stream_table: "orders" });
    try {
      expect(await sink.write(messages)).toEqual([]);
    } finally {
      jitter.stop(true);
    }
    const got = await drain(queue);
    expect(got).toHaveLength(140);
    const perGroup = new Map<string, number[]>();
    for (const m of got) {
      const id = JSON.parse(m.Body!).payload.id as number;
      const group = m.Attributes!.MessageGroupId!;
      perGroup.set(group, [...(perGroup.get(group) ?? []), id]);
    }
    expect(perGroup.size).toBe(7);
    for (const [group, ids] of perGroup) {
      expect(group).toMatch(/^orders-c[0-6]$/);
      expect(ids).toEqual([...ids].sort((a, b) => a - b));
      expect(ids).toHaveLength(20);
    }
  });

  test("a dedup key longer than 128 characters becomes its SHA-256; the attribute keeps the original", async () => {
    const queue = await createQueue("longkey.fifo");
    const sink = await makeSink({ queue_url: queue });
    const [m] = forwardMessages(1);
    const long: Message = { ...m!, dedup_key: `outbox_${"z".repeat(140)}:1:0` };
    expect(await sink.write([long])).toEqual([]);
    expect(await sink.write([long])).toEqual([]);
    const got = await drain(queue);
    expect(got).toHaveLength(1);
    expect(got[0]!.Attributes!.MessageDeduplicationId).toBe(createHash("sha256").update(long.dedup_key).digest("hex"));
    expect(got[0]!.MessageAttributes!.pgt_dedup_key!.StringValue).toBe(long.dedup_key);
  });
});

describe("sqs sink, configuration and failures", () => {
  test("start() on a missing queue: config error naming the queue", async () => {
    const missing = `${SQS_ENDPOINT}/000000000000/relay-missing-${run}`;
    const sink = await makeSink({ queue_url: missing }, false);
    const err = await errorOf(sink.start());
    expect(err.kind).toBe("config");
    expect(err.message).toContain(`relay-missing-${run}`);
    expect(err.message).toContain("does not exist");
  });

  test("start(): FIFO setting that contradicts the queue is a config error", async () => {
    const queue = await createQueue("plain");
    const sink = await makeSink({ queue_url: queue, fifo: true }, false);
    const err = await errorOf(sink.start());
    expect(err.kind).toBe("config");
    expect(err.message).toContain("fifo");
    expect(err.message).toContain(queue);
  });

  test("unreachable endpoint: transient error naming host:port, never the secret key", async () => {
    const closed = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: () => new Response() });
    const port = closed.port;
    closed.stop(true);
    const secret = `wJalrXUtnFEMI-${run}-EXAMPLEKEY`;
    const queue = await createQueue("unreach");
    const sink = await makeSink({ queue_url: queue }, true);
    // Started against the real server; now point a second sink at a dead port.
    const dead = await makeSink({ queue_url: queue, endpoint: `http://127.0.0.1:${port}`, secret_access_key: secret, timeout_ms: 2000 }, false);
    const err = await errorOf(dead.start());
    expect(err.kind).toBe("transient");
    expect(err.message).toContain(`127.0.0.1:${port}`);
    expect(err.message).not.toContain(secret);
    expect(dead.describe).not.toContain(secret);
    expect(await sink.write(forwardMessages(1))).toEqual([]);
  });

  test("option errors: half a credential pair, bad queue_url", () => {
    expect(() => sqsSink.create(v.parse(sqsSink.config, { queue_url: "http://x/1/q", access_key_id: "AKIA" }), ctx())).toThrow(
      /access_key_id and secret_access_key/,
    );
    expect(() => v.parse(sqsSink.config, { queue_url: "not a url" })).toThrow(/queue_url/);
    expect(() => v.parse(sqsSink.config, {})).toThrow(/queue_url/);
    expect(v.parse(sqsSink.config, { queue_url: "https://sqs.eu-west-1.amazonaws.com/1/a.fifo" }).fifo).toBe(true);
  });
});
