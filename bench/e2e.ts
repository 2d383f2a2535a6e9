/**
 * End to end, against the raw client library doing the same safe work in the same run.
 *
 *   node_modules/.bin/bun bench/e2e.ts [--messages 200000] [--source-messages 200000]
 *       [--only nats,kafka,redis,rabbitmq,sqs,http,pg-inbox,file] [--direction forward|reverse|both]
 *       [--sets 10,1] [--rounds 1] [--relay-args="--sink-max-inflight 3000"]
 *
 * Forward, for every sink and for change sets of 10 rows and of 1 row (`--sets`): an outbox of
 * `--messages` messages (a row of ≈ 50 B, an envelope of ≈ 200 B) is written up front, then
 *   - relay: a cold `pgtrickle-relay drain --pipeline …` process (the sources under Bun, or
 *     PGTRICKLE_RELAY_BIN), `batch_size` = 1000 / rows per set so that a batch holds 1000 messages
 *     as the raw loop's do, everything else at its default; the time includes the process start;
 *   - raw: the same outbox read with postgres.js 1000 messages at a time (`id > last ORDER BY id`),
 *     each change set expanded into envelopes as the relay builds them, published the way a careful
 *     user of the client would (windowed/pipelined, every acknowledgement awaited), then the
 *     offset committed (an UPSERT) before the next read.
 *   The HTTP raw loops send the relay's headers (User-Agent, Content-Type, Idempotency-Key) with
 *   a timeout per request (the relay's `timeout_ms`, 10 s), await and check every answer and read
 *   its body: per event 16 requests in flight (every message is a row of its own, so the relay's
 *   per-row order holds no request back), batch mode one request per change set at a time.
 * Reverse, for every source: `--source-messages` events published with the system's client
 * (not timed), then the relay's `drain` into an inbox against a hand-written safe loop (broker read
 * of ≤ 1000 → INSERT … ON CONFLICT DO NOTHING → commit → ack) into another inbox. Both sides are
 * timed from before their connections (broker and PostgreSQL; the consumer-group join) to after
 * their last ack and disconnect, as a cold `drain` is: the raw loop opens its own clients inside
 * its timing. The raw loop stops where the broker's own answers say nothing is left when that
 * costs no extra request (NATS: the last message's `pending` is 0; Kafka: every partition at the
 * high watermark its fetch reported; Redis: an empty read; file: its end); RabbitMQ and SQS give
 * no such answer for free, and their raw loops stop at the event count. The HTTP
 * receiver has no backlog: the relay under `run` and a hand-written receiver (bench/e2e-receiver.ts)
 * each get 8 senders posting arrays of 100 events with an Idempotency-Key (the relay keys the
 * events by it, the hand-written receiver by their event_id), every request answered after the
 * commit.
 *
 * Each source's line also gives the CPU time per event of the relay process and of the raw loop
 * (the bench process while it runs it; its broker and PostgreSQL clients are in-process too).
 *
 * With `--rounds n` each figure is the mean of n runs of each side, alternately relay first and
 * raw first. Every destination is checked to hold every message afterwards. The ratio relay/raw is the figure
 * that counts: the machine is shared, absolute rates vary with its load (printed per table).
 */
import { CreateQueueCommand, DeleteMessageBatchCommand, DeleteQueueCommand, GetQueueAttributesCommand, ReceiveMessageCommand, SendMessageBatchCommand, SQSClient } from "@aws-sdk/client-sqs";
import amqp from "amqplib";
import { Redis } from "ioredis";
import { Kafka, logLevel, Partitioners } from "kafkajs";
import { AckPolicy, connect as natsConnect, headers as natsHeaders, type JsMsg } from "nats";
import { createHash } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { open } from "node:fs/promises";
import { loadavg, tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { connect, type Sql } from "../src/db.ts";
import { createStreamTable, enableOutbox, ident } from "../test/fixtures/outbox.ts";
import { fillOutbox } from "./lib.ts";
import { testDatabase, type TestDatabase } from "../test/helpers/pg.ts";
import { freePort } from "../test/helpers/proxy.ts";
import { relayCommand, RunningRelay } from "../test/helpers/relay.ts";
import { AMQP_URL, AWS_ENV, KAFKA_BROKERS, NATS_URL, REDIS_URL, requireServer, SQS_CLIENT_CONFIG, SQS_ENDPOINT, type ServerName } from "../test/helpers/servers.ts";

const { values: opts } = parseArgs({
  options: {
    messages: { type: "string", default: "200000" },
    "source-messages": { type: "string", default: "200000" },
    only: { type: "string" },
    direction: { type: "string", default: "both" },
    sets: { type: "string", default: "10,1" },
    rounds: { type: "string", default: "1" },
    "relay-args": { type: "string", default: "" },
  },
});
const N = Number(opts.messages);
const SRC_N = Number(opts["source-messages"]);
const SETS = opts.sets!.split(",").map(Number);
const ONLY = opts.only ? new Set(opts.only.split(",")) : null;
const ROUNDS = Number(opts.rounds);
/** Added to every relay command line, e.g. `--relay-args="--sink-max-inflight 3000"`. */
const RELAY_ARGS = opts["relay-args"]!.split(" ").filter(Boolean);
const BATCH = 1000; // messages per read, relay and raw alike
const run = Math.random().toString(36).slice(2, 8);
const wanted = (system: string) => !ONLY || ONLY.has(system);
const load = () => loadavg().map((l) => l.toFixed(2)).join(" ");
const children: { kill(signal?: number | NodeJS.Signals): void }[] = [];
process.on("exit", () => children.forEach((c) => c.kill("SIGKILL"))); // never leave a relay behind

// ---------------------------------------------------------------- shared helpers

/** Runs `fn` over `items` with at most `limit` calls pending; rejects on the first failure. */
async function windowed<T>(items: T[], limit: number, fn: (item: T) => Promise<unknown>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(limit, items.length) }, async () => {
      while (next < items.length) await fn(items[next++]!);
    }),
  );
}

/** A Kafka client, its admin connected, and a new topic of 3 partitions. */
async function kafkaWithTopic(topic: string) {
  const kafka = new Kafka({ brokers: KAFKA_BROKERS, logLevel: logLevel.NOTHING });
  const admin = kafka.admin();
  await admin.connect();
  await admin.createTopics({ topics: [{ topic, numPartitions: 3 }], waitForLeaders: true });
  return { kafka, admin };
}

const chunks = <T>(xs: T[], size: number): T[][] => Array.from({ length: Math.ceil(xs.length / size) }, (_, i) => xs.slice(i * size, (i + 1) * size));

interface Row {
  name: string;
  relay: number;
  raw: number;
  failed?: string;
}
const rate = (n: number, ms: number) => Math.round((n * 1000) / ms);

function printTable(title: string, rows: Row[], unit: string) {
  console.log(`\n${title} (load average now ${load()})`);
  console.log(`| path | relay ${unit} | raw client ${unit}, same run | ratio |`);
  console.log("|---|---|---|---|");
  for (const r of rows) {
    if (r.failed) console.log(`| ${r.name} | failed: ${r.failed.split("\n")[0]} | | |`);
    else console.log(`| ${r.name} | ${r.relay.toLocaleString("en")} | ${r.raw.toLocaleString("en")} | ${(r.relay / r.raw).toFixed(2)} |`);
  }
}

/**
 * One case's row, or a failed row: a case that fails (a server restarted under it, a relay
 * error) is reported in the table and the run goes on with the next; the exit code is then 1.
 */
async function attempt(name: string, bench: () => Promise<Row>): Promise<Row> {
  try {
    return await bench();
  } catch (err) {
    console.error(`  ${name} FAILED: ${(err as Error).stack ?? err}`);
    process.exitCode = 1;
    return { name, relay: 0, raw: 0, failed: (err as Error).message };
  }
}

/** CPU time (user + system, ms) of the relay processes and of the raw loops, summed per case. */
const cpuMs = { relay: 0, raw: 0 };

/** The CPU time (user + system) of a child process that has exited, in ms. */
function cpuOf(proc: { resourceUsage(): { cpuTime: { user: number | bigint; system: number | bigint } } | undefined }): number {
  const cpu = proc.resourceUsage()?.cpuTime;
  return cpu ? (Number(cpu.user) + Number(cpu.system)) / 1000 : 0;
}

/** The relay's `drain` of one pipeline as a cold process; milliseconds, or throws with its output. */
async function relayDrain(pipeline: string, env: Record<string, string> = {}): Promise<number> {
  const t0 = performance.now();
  const args = ["drain", "--postgres-url", db.url, "--pipeline", pipeline, "--log-level", "warn", "--metrics-addr", "127.0.0.1:0", "--timeout", "0", ...RELAY_ARGS];
  const proc = Bun.spawn(relayCommand(args), { stdout: "pipe", stderr: "pipe", env: { ...process.env, ...env } });
  children.push(proc);
  const timer = setTimeout(() => proc.kill("SIGKILL"), 1_800_000);
  const [stdout, stderr, exitCode] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  clearTimeout(timer);
  const ms = performance.now() - t0;
  cpuMs.relay += cpuOf(proc);
  if (exitCode !== 0) throw new Error(`drain ${pipeline}: exit ${exitCode}\n${stdout}\n${stderr}`);
  return ms;
}

/** Throws unless `actual` is `expected` (every message delivered, none twice). */
function expectCount(what: string, actual: number, expected: number) {
  if (actual !== expected) throw new Error(`${what}: ${actual} messages downstream, expected ${expected}`);
}

// ---------------------------------------------------------------- forward

/** A message of the raw loop: its envelope JSON (`body`) and the parts some sinks send apart. */
interface RawMessage {
  dedupKey: string;
  subject: string;
  payload: unknown;
  outboxId: number;
  body: string;
}

interface Outbox {
  rowsPerSet: number;
  streamTable: string; // bare name
  outboxTable: string;
}

/** An outbox of N messages in change sets of `rowsPerSet` rows, v1 inline payloads. */
async function makeOutbox(rowsPerSet: number): Promise<Outbox> {
  const streamTable = `e2e_${run}_set${rowsPerSet}`;
  await createStreamTable(db.sql, `public.${streamTable}`, "id int primary key");
  const { outboxTable } = await enableOutbox(db.sql, `public.${streamTable}`);
  await fillOutbox(db.sql, outboxTable, rowsPerSet, N);
  return { rowsPerSet, streamTable, outboxTable };
}

/**
 * The raw loop: read ≤ 1000 messages' worth of outbox rows after the committed offset, build the
 * envelopes (the keys and order of the relay's, docs/interface.md §6.1), `publish` them (it
 * resolves once every message is acknowledged), commit the offset; until the outbox is empty.
 */
async function rawForward(ob: Outbox, tag: string, subjectPrefix: string, publish: (msgs: RawMessage[]) => Promise<void>): Promise<number> {
  const t0 = performance.now();
  let last = "0";
  for (;;) {
    const rows = await db.sql.unsafe<{ id: string; payload: { inserted: unknown[] } }[]>(
      `SELECT o.id::text AS id, o.payload FROM pgtrickle.${ident(ob.outboxTable)} o WHERE o.id > $1::bigint ORDER BY o.id LIMIT $2`,
      [last, BATCH / ob.rowsPerSet],
    );
    if (rows.length === 0) break;
    const msgs: RawMessage[] = [];
    const subject = `${subjectPrefix}pgtrickle.${ob.streamTable}.insert`;
    for (const row of rows) {
      const outboxId = Number(row.id);
      row.payload.inserted.forEach((payload, i) => {
        const dedupKey = `${ob.outboxTable}:${row.id}:${i}`;
        const body = JSON.stringify({ dedup_key: dedupKey, subject, payload, op: "insert", is_full_refresh: false, outbox_id: outboxId, refresh_id: null });
        msgs.push({ dedupKey, subject, payload, outboxId, body });
      });
    }
    await publish(msgs);
    last = rows[rows.length - 1]!.id;
    await db.sql`INSERT INTO public.e2e_raw_offsets (name, last_id) VALUES (${tag}, ${last}::bigint)
      ON CONFLICT (name) DO UPDATE SET last_id = EXCLUDED.last_id`;
  }
  return performance.now() - t0;
}

/** One sink: a destination per tag (relay's, raw's), its relay config, the raw publisher, a count. */
interface SinkCase {
  system: string;
  name: string;
  servers: ServerName[];
  env?: Record<string, string>;
  /** Creates the destination `tag`; `subjectPrefix` is what the raw loop puts before the relay's subjects. */
  prepare(tag: string, ob: Outbox): Promise<{
    config: Record<string, unknown>;
    subjectPrefix?: string;
    publisher(): Promise<{ publish(msgs: RawMessage[]): Promise<void>; close(): Promise<void> }>;
    count(): Promise<number>;
    cleanup(): Promise<void>;
  }>;
}

let webhookPort = 0;

const SINKS: SinkCase[] = [
  {
    system: "nats",
    name: "NATS JetStream",
    servers: ["nats"],
    async prepare(tag, ob) {
      const nc = await natsConnect({ servers: NATS_URL });
      const jsm = await nc.jetstreamManager();
      // The relay publishes on its default subjects; the raw loop on the same ones under "raw.".
      const raw = tag.endsWith("raw");
      const prefix = raw ? "raw." : "";
      await jsm.streams.add({ name: tag, subjects: [`${prefix}pgtrickle.${ob.streamTable}.>`] });
      return {
        config: { type: "nats", url: NATS_URL, stream: tag },
        subjectPrefix: prefix,
        async publisher() {
          const pc = await natsConnect({ servers: NATS_URL });
          const js = pc.jetstream();
          return {
            publish: (msgs) =>
              windowed(msgs, 256, (m) => js.publish(m.subject, new TextEncoder().encode(m.body), { msgID: m.dedupKey, headers: natsHeaders(), expect: { streamName: tag } })),
            close: () => pc.close(),
          };
        },
        count: async () => (await jsm.streams.info(tag)).state.messages,
        async cleanup() {
          await jsm.streams.delete(tag);
          await nc.close();
        },
      };
    },
  },
  {
    system: "kafka",
    name: "Kafka (idempotent, acks=all)",
    servers: ["kafka"],
    async prepare(tag) {
      const { kafka, admin } = await kafkaWithTopic(tag);
      return {
        config: { type: "kafka", brokers: KAFKA_BROKERS.join(","), topic: tag },
        async publisher() {
          const producer = kafka.producer({ idempotent: true, maxInFlightRequests: 5, createPartitioner: Partitioners.DefaultPartitioner });
          await producer.connect();
          return {
            publish: async (msgs) => {
              await producer.send({ topic: tag, acks: -1, messages: msgs.map((m) => ({ key: m.dedupKey, value: m.body, headers: { pgt_dedup_key: m.dedupKey } })) });
            },
            close: () => producer.disconnect(),
          };
        },
        count: async () => (await admin.fetchTopicOffsets(tag)).reduce((n, p) => n + Number(p.high) - Number(p.low), 0),
        async cleanup() {
          await admin.deleteTopics({ topics: [tag] }).catch(() => {});
          await admin.disconnect();
        },
      };
    },
  },
  {
    system: "redis",
    name: "Redis Streams",
    servers: ["redis"],
    async prepare(tag) {
      const redis = new Redis(REDIS_URL);
      return {
        config: { type: "redis", url: REDIS_URL, stream_key: tag },
        async publisher() {
          const client = new Redis(REDIS_URL);
          return {
            async publish(msgs) {
              const p = client.pipeline();
              for (const m of msgs) {
                p.xadd(tag, "*", "dedup_key", m.dedupKey, "pgt_dedup_key", m.dedupKey, "subject", m.subject, "op", "insert", "payload", JSON.stringify(m.payload), "full_refresh", "false", "outbox_id", String(m.outboxId));
              }
              for (const [err] of (await p.exec())!) if (err) throw err;
            },
            close: async () => void client.disconnect(),
          };
        },
        count: () => redis.xlen(tag),
        async cleanup() {
          await redis.del(tag);
          redis.disconnect();
        },
      };
    },
  },
  {
    system: "rabbitmq",
    name: "RabbitMQ (confirms, persistent)",
    servers: ["rabbitmq"],
    async prepare(tag) {
      const conn = await amqp.connect(AMQP_URL);
      const ch = await conn.createChannel();
      await ch.assertExchange(tag, "topic", { durable: true });
      await ch.assertQueue(tag, { durable: true });
      await ch.bindQueue(tag, tag, "#");
      return {
        config: { type: "rabbitmq", url: AMQP_URL, exchange: tag },
        async publisher() {
          const pc = await amqp.connect(AMQP_URL);
          const confirm = await pc.createConfirmChannel();
          return {
            async publish(msgs) {
              // One batch is BATCH (1000) messages: the relay's default max_in_flight.
              for (const m of msgs) {
                confirm.publish(tag, m.subject, Buffer.from(m.body), {
                  persistent: true,
                  mandatory: true,
                  messageId: m.dedupKey,
                  contentType: "application/json",
                  headers: { pgt_dedup_key: m.dedupKey },
                });
              }
              await confirm.waitForConfirms();
            },
            close: () => pc.close(),
          };
        },
        count: async () => (await ch.checkQueue(tag)).messageCount,
        async cleanup() {
          await ch.deleteQueue(tag);
          await ch.deleteExchange(tag);
          await conn.close();
        },
      };
    },
  },
  {
    system: "sqs",
    name: "SQS standard (fauxqs)",
    servers: ["sqs"],
    env: AWS_ENV,
    async prepare(tag) {
      const sqs = new SQSClient(SQS_CLIENT_CONFIG);
      const queueUrl = (await sqs.send(new CreateQueueCommand({ QueueName: tag }))).QueueUrl!;
      return {
        config: { type: "sqs", queue_url: queueUrl, endpoint: SQS_ENDPOINT, region: "us-east-1" },
        async publisher() {
          const client = new SQSClient(SQS_CLIENT_CONFIG);
          return {
            publish: (msgs) =>
              windowed(chunks(msgs, 10), 16, async (call) => {
                const r = await client.send(
                  new SendMessageBatchCommand({
                    QueueUrl: queueUrl,
                    Entries: call.map((m, i) => ({ Id: String(i), MessageBody: m.body, MessageAttributes: { pgt_dedup_key: { DataType: "String", StringValue: m.dedupKey } } })),
                  }),
                );
                if (r.Failed?.length) throw new Error(`SQS refused ${r.Failed.length}: ${r.Failed[0]!.Message}`);
              }),
            close: async () => client.destroy(),
          };
        },
        count: async () => {
          const a = await sqs.send(new GetQueueAttributesCommand({ QueueUrl: queueUrl, AttributeNames: ["ApproximateNumberOfMessages"] }));
          return Number(a.Attributes?.ApproximateNumberOfMessages);
        },
        async cleanup() {
          await sqs.send(new DeleteQueueCommand({ QueueUrl: queueUrl }));
          sqs.destroy();
        },
      };
    },
  },
  ...(["batch", "event"] as const).map(
    (mode): SinkCase => ({
      system: "http",
      name: mode === "batch" ? "HTTP webhook, batch mode (a request per change set, in order)" : "HTTP webhook, per event (16 in flight, ordered per row)",
      servers: [],
      async prepare(tag) {
        const url = `http://127.0.0.1:${webhookPort}/${tag}`;
        const config =
          mode === "batch" ? { type: "http", url } : { type: "http", url, batch_mode: false, ordering_key_template: "{stream_table}:{id}" };
        return {
          config,
          async publisher() {
            // The relay's headers, and a timeout per request as the relay's (its timeout_ms, 10 s).
            const headers = { "User-Agent": "e2e-raw", "Content-Type": "application/json" };
            const post = async (body: string, key: string) => {
              const r = await fetch(url, { method: "POST", body, headers: { ...headers, "Idempotency-Key": key }, signal: AbortSignal.timeout(10_000) });
              if (!r.ok) throw new Error(`HTTP ${r.status}`);
              await r.arrayBuffer();
            };
            return {
              async publish(msgs) {
                if (mode === "event") return windowed(msgs, 16, (m) => post(m.body, m.dedupKey));
                // One request per change set (one outbox row), each after the previous one's answer.
                const sets = new Map<string, RawMessage[]>();
                for (const m of msgs) {
                  const row = m.dedupKey.slice(0, m.dedupKey.lastIndexOf(":"));
                  (sets.get(row) ?? sets.set(row, []).get(row)!).push(m);
                }
                for (const set of sets.values()) {
                  const key = `batch:${createHash("sha256").update(set.map((m) => m.dedupKey).join("\n")).digest("hex")}`;
                  await post(`[${set.map((m) => m.body).join(",")}]`, key);
                }
              },
              close: async () => {},
            };
          },
          count: async () => Number(await (await fetch(`http://127.0.0.1:${webhookPort}/count/${tag}`)).text()),
          cleanup: async () => {},
        };
      },
    }),
  ),
  {
    system: "pg-inbox",
    name: "remote pg-inbox (another database)",
    servers: ["postgres"],
    async prepare(tag) {
      const remote = remoteDb!;
      await remote.sql`SELECT pgtrickle.create_inbox(${tag})`;
      return {
        config: { type: "pg-inbox", url: remote.url, inbox: tag },
        async publisher() {
          return {
            async publish(msgs) {
              await remote.sql`INSERT INTO pgtrickle.${remote.sql(tag)} (event_id, event_type, source, payload)
                SELECT x.id, x.type, 'pgtrickle-relay', x.body::jsonb
                  FROM unnest(${msgs.map((m) => m.dedupKey)}::text[], ${msgs.map((m) => m.subject)}::text[],
                              ${msgs.map((m) => JSON.stringify(m.payload))}::text[]) AS x(id, type, body)
                ON CONFLICT (event_id) DO NOTHING`;
            },
            close: async () => {},
          };
        },
        count: async () => (await remote.sql<{ n: number }[]>`SELECT count(*)::int AS n FROM pgtrickle.${remote.sql(tag)}`)[0]!.n,
        cleanup: async () => {},
      };
    },
  },
  {
    system: "file",
    name: "file (JSON Lines, fsync per batch)",
    servers: [],
    async prepare(tag) {
      const path = join(workDir, `${tag}.jsonl`);
      return {
        config: { type: "file", output: path },
        async publisher() {
          const fh = await open(path, "a");
          return {
            async publish(msgs) {
              await fh.write(msgs.map((m) => m.body).join("\n") + "\n");
              await fh.sync();
            },
            close: () => fh.close(),
          };
        },
        count: async () => readFileSync(path, "utf8").split("\n").filter(Boolean).length,
        cleanup: async () => {},
      };
    },
  },
];

/** The relay's cold drain of `ob` into a new destination `tag`; milliseconds. */
async function relaySinkRun(sink: SinkCase, ob: Outbox, tag: string, total: number): Promise<number> {
  const dest = await sink.prepare(tag, ob);
  const pipeline = tag.replace(/-/g, "_");
  await db.sql`SELECT pgtrickle.set_relay_outbox(${pipeline}, ${`public.${ob.streamTable}`}, NULL, ${db.sql.json(dest.config as never)})`;
  await db.sql`UPDATE pgtrickle.relay_outbox_config SET config = jsonb_set(config, '{source,batch_size}', ${BATCH / ob.rowsPerSet}::text::jsonb) WHERE name = ${pipeline}`;
  const ms = await relayDrain(pipeline, sink.env);
  await db.sql`SELECT pgtrickle.disable_relay(${pipeline})`;
  expectCount(`${sink.name} relay`, await dest.count(), total);
  await dest.cleanup();
  return ms;
}

/** The raw loop over `ob` into a new destination `tag` (its name ends in "raw"); milliseconds. */
async function rawSinkRun(sink: SinkCase, ob: Outbox, tag: string, total: number): Promise<number> {
  const dest = await sink.prepare(tag, ob);
  const publisher = await dest.publisher();
  const ms = await rawForward(ob, tag, dest.subjectPrefix ?? "", publisher.publish);
  await publisher.close();
  expectCount(`${sink.name} raw`, await dest.count(), total);
  await dest.cleanup();
  return ms;
}

/**
 * `--rounds` rounds of relay and raw, in the order relay-raw, raw-relay, … so that a load that
 * rises or falls during the run weighs on both alike; the mean time of each side.
 */
async function alternate(relay: (round: number) => Promise<number>, raw: (round: number) => Promise<number>) {
  const relayMs: number[] = [];
  const rawMs: number[] = [];
  for (let r = 0; r < ROUNDS; r++) {
    if (r % 2 === 0) {
      relayMs.push(await relay(r));
      rawMs.push(await raw(r));
    } else {
      rawMs.push(await raw(r));
      relayMs.push(await relay(r));
    }
  }
  const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
  return { relayMs: mean(relayMs), rawMs: mean(rawMs) };
}

async function benchSink(sink: SinkCase, ob: Outbox): Promise<Row> {
  const base = `e2e-${run}-${sink.system}${sink.name.includes("per event") ? "-ev" : ""}-s${ob.rowsPerSet}`.replace(/[^A-Za-z0-9-]/g, "-");
  const total = Math.ceil(N / ob.rowsPerSet) * ob.rowsPerSet;
  const { relayMs, rawMs } = await alternate(
    (r) => relaySinkRun(sink, ob, `${base}-${r}-relay`, total),
    (r) => rawSinkRun(sink, ob, `${base}-${r}-raw`, total),
  );
  const row = { name: `${sink.name}, ${ob.rowsPerSet}-row sets`, relay: rate(total, relayMs), raw: rate(total, rawMs) };
  console.log(`  ${row.name}: relay ${row.relay} msg/s (${(relayMs / 1000).toFixed(1)} s), raw ${row.raw} msg/s (${(rawMs / 1000).toFixed(1)} s), ratio ${(row.relay / row.raw).toFixed(2)}`);
  return row;
}

// ---------------------------------------------------------------- reverse

const eventBody = (i: number) => JSON.stringify({ event_id: `e-${run}-${i}`, event_type: "bench", order_id: i, customer: `c${i % 97}`, amount: i * 1.5, note: "e2e bench" });

/** The hand-written loop's inbox write: one statement, deduplicated by event_id, committed. */
async function rawInboxInsert(sql: Sql, inbox: string, events: { id: string; type: string; source: string; body: string }[]) {
  if (events.length === 0) return;
  await sql`INSERT INTO pgtrickle.${sql(inbox)} (event_id, event_type, source, payload)
    SELECT x.id, x.type, x.source, x.body::jsonb
      FROM unnest(${events.map((e) => e.id)}::text[], ${events.map((e) => e.type)}::text[], ${events.map((e) => e.source)}::text[], ${events.map((e) => e.body)}::text[]) AS x(id, type, source, body)
    ON CONFLICT (event_id) DO NOTHING`;
}

/** The body's event id and type, as the relay derives them from these bodies. */
function eventOf(body: string, source: string) {
  const parsed = JSON.parse(body) as { event_id: string; event_type: string };
  return { id: parsed.event_id, type: parsed.event_type, source, body };
}

interface SourceCase {
  system: string;
  name: string;
  servers: ServerName[];
  env?: Record<string, string>;
  /**
   * Publishes SRC_N events (untimed) for the relay and for the raw loop. `raw` is timed whole: it
   * opens its own broker client; `sql` is a PostgreSQL client of its own, not yet connected.
   */
  prepare(tag: string): Promise<{ config: Record<string, unknown>; raw(sql: Sql, inbox: string): Promise<void>; cleanup(): Promise<void> }>;
}

const SOURCES: SourceCase[] = [
  {
    system: "nats",
    name: "NATS JetStream → inbox",
    servers: ["nats"],
    async prepare(tag) {
      const nc = await natsConnect({ servers: NATS_URL });
      const jsm = await nc.jetstreamManager();
      await jsm.streams.add({ name: tag, subjects: [`${tag}.>`] });
      const js = nc.jetstream();
      const ids = Array.from({ length: SRC_N }, (_, i) => i);
      await windowed(ids, 256, (i) => js.publish(`${tag}.e`, new TextEncoder().encode(eventBody(i)), { msgID: `e-${run}-${i}` }));
      return {
        config: { type: "nats", url: NATS_URL, stream: tag, subject: `${tag}.>`, durable_name: "relay" },
        async raw(sql, inbox) {
          const rc = await natsConnect({ servers: NATS_URL });
          const rjsm = await rc.jetstreamManager();
          await rjsm.consumers.add(tag, { durable_name: "raw", ack_policy: AckPolicy.Explicit, filter_subject: `${tag}.>`, max_ack_pending: BATCH * 2 });
          const consumer = await rc.jetstream().consumers.get(tag, "raw");
          for (let pending = 1; pending > 0; ) {
            const msgs: JsMsg[] = [];
            for await (const m of await consumer.fetch({ max_messages: BATCH, expires: 1000 })) msgs.push(m);
            await rawInboxInsert(sql, inbox, msgs.map((m) => eventOf(m.string(), "nats")));
            const last = msgs.pop();
            for (const m of msgs) m.ack();
            if (last) await last.ackAck(); // the server handles a consumer's acks in order: one round trip per batch
            // What the consumer had left to deliver when it sent the last message: 0 is the end.
            pending = last ? last.info.pending : 0;
          }
          await rc.close();
        },
        async cleanup() {
          await jsm.streams.delete(tag);
          await nc.close();
        },
      };
    },
  },
  {
    system: "kafka",
    name: "Kafka (3 partitions) → inbox",
    servers: ["kafka"],
    async prepare(tag) {
      const { kafka, admin } = await kafkaWithTopic(tag);
      const producer = kafka.producer({ createPartitioner: Partitioners.DefaultPartitioner });
      await producer.connect();
      for (const part of chunks(Array.from({ length: SRC_N }, (_, i) => i), 1000)) {
        await producer.send({ topic: tag, messages: part.map((i) => ({ value: eventBody(i) })) });
      }
      await producer.disconnect();
      return {
        config: { type: "kafka", brokers: KAFKA_BROKERS.join(","), topic: tag, group_id: `${tag}-relay` },
        async raw(sql, inbox) {
          const consumer = kafka.consumer({ groupId: `${tag}-raw` });
          await consumer.connect();
          await consumer.subscribe({ topic: tag, fromBeginning: true });
          // Partitions whose committed offset reached the high watermark their last fetch reported.
          const caughtUp = new Set<number>();
          await new Promise<void>((resolve, reject) => {
            consumer
              .run({
                autoCommit: false,
                eachBatchAutoResolve: false,
                eachBatch: async ({ batch, resolveOffset, heartbeat }) => {
                  for (const part of chunks(batch.messages, BATCH)) {
                    await rawInboxInsert(sql, inbox, part.map((m) => eventOf(m.value!.toString(), "kafka")));
                    const last = part[part.length - 1]!.offset;
                    await consumer.commitOffsets([{ topic: batch.topic, partition: batch.partition, offset: String(Number(last) + 1) }]);
                    resolveOffset(last);
                    await heartbeat();
                  }
                  if (Number(batch.lastOffset()) + 1 >= Number(batch.highWatermark)) caughtUp.add(batch.partition);
                  if (caughtUp.size === 3) resolve(); // every partition of the topic holds events
                },
              })
              .catch(reject);
          });
          await consumer.disconnect();
        },
        async cleanup() {
          await admin.deleteTopics({ topics: [tag] }).catch(() => {});
          await admin.deleteGroups([`${tag}-relay`, `${tag}-raw`]).catch(() => {});
          await admin.disconnect();
        },
      };
    },
  },
  {
    system: "redis",
    name: "Redis Streams → inbox",
    servers: ["redis"],
    async prepare(tag) {
      const redis = new Redis(REDIS_URL);
      for (const part of chunks(Array.from({ length: SRC_N }, (_, i) => i), 1000)) {
        const p = redis.pipeline();
        for (const i of part) p.xadd(tag, "*", "payload", eventBody(i));
        await p.exec();
      }
      return {
        config: { type: "redis", url: REDIS_URL, stream_key: tag, group_name: "relay" },
        async raw(sql, inbox) {
          const rr = new Redis(REDIS_URL);
          await rr.xgroup("CREATE", tag, "raw", "0");
          for (;;) {
            const reply = (await rr.xreadgroup("GROUP", "raw", "bench", "COUNT", BATCH, "STREAMS", tag, ">")) as [string, [string, string[]][]][] | null;
            const entries = reply?.[0]?.[1] ?? [];
            if (entries.length === 0) break;
            await rawInboxInsert(sql, inbox, entries.map(([, fields]) => eventOf(fields[fields.indexOf("payload") + 1]!, "redis")));
            await rr.xack(tag, "raw", ...entries.map(([id]) => id));
          }
          await rr.quit();
        },
        async cleanup() {
          await redis.del(tag);
          redis.disconnect();
        },
      };
    },
  },
  {
    system: "rabbitmq",
    name: "RabbitMQ → inbox",
    servers: ["rabbitmq"],
    async prepare(tag) {
      const conn = await amqp.connect(AMQP_URL);
      const ch = await conn.createConfirmChannel();
      for (const q of [`${tag}-relay`, `${tag}-raw`]) {
        await ch.assertQueue(q, { durable: true });
        for (let i = 0; i < SRC_N; i++) ch.sendToQueue(q, Buffer.from(eventBody(i)), { persistent: true, messageId: `e-${run}-${i}` });
        await ch.waitForConfirms();
      }
      return {
        config: { type: "rabbitmq", url: AMQP_URL, queue: `${tag}-relay` },
        async raw(sql, inbox) {
          const rc = await amqp.connect(AMQP_URL);
          const consumer = await rc.createChannel();
          await consumer.prefetch(BATCH);
          let got = 0;
          let pending: amqp.ConsumeMessage[] = [];
          let flushing = Promise.resolve();
          let timer: ReturnType<typeof setTimeout> | null = null;
          await new Promise<void>((resolve, reject) => {
            // A batch is written when it is full or 20 ms after its first delivery (the relay's batch_wait_ms).
            const flush = () => {
              if (timer) clearTimeout(timer);
              timer = null;
              const batch = pending;
              pending = [];
              if (batch.length === 0) return;
              flushing = flushing.then(async () => {
                await rawInboxInsert(sql, inbox, batch.map((m) => eventOf(m.content.toString(), "rabbitmq")));
                consumer.ack(batch[batch.length - 1]!, true);
                got += batch.length;
                if (got >= SRC_N) resolve();
              }).catch(reject);
            };
            void consumer.consume(`${tag}-raw`, (m) => {
              if (!m) return;
              pending.push(m);
              if (pending.length >= BATCH) flush();
              else timer ??= setTimeout(flush, 20);
            });
          });
          await rc.close();
        },
        async cleanup() {
          await ch.deleteQueue(`${tag}-relay`);
          await ch.deleteQueue(`${tag}-raw`);
          await conn.close();
        },
      };
    },
  },
  {
    system: "sqs",
    name: "SQS (fauxqs) → inbox",
    servers: ["sqs"],
    env: AWS_ENV,
    async prepare(tag) {
      const sqs = new SQSClient(SQS_CLIENT_CONFIG);
      const urls: Record<string, string> = {};
      for (const side of ["relay", "raw"]) {
        const url = (await sqs.send(new CreateQueueCommand({ QueueName: `${tag}-${side}` }))).QueueUrl!;
        urls[side] = url;
        await windowed(chunks(Array.from({ length: SRC_N }, (_, i) => i), 10), 16, (call) =>
          sqs.send(new SendMessageBatchCommand({ QueueUrl: url, Entries: call.map((i, k) => ({ Id: String(k), MessageBody: eventBody(i) })) })),
        );
      }
      return {
        config: { type: "sqs", queue_url: urls.relay, endpoint: SQS_ENDPOINT, region: "us-east-1" },
        async raw(sql, inbox) {
          const sqs = new SQSClient(SQS_CLIENT_CONFIG);
          let got = 0;
          while (got < SRC_N) {
            // ≤ 1000 messages: 100 receives of 10 in flight, 10 at a time.
            const received = (
              await Promise.all(
                Array.from({ length: 10 }, () =>
                  sqs.send(new ReceiveMessageCommand({ QueueUrl: urls.raw, MaxNumberOfMessages: 10, WaitTimeSeconds: 1, VisibilityTimeout: 30 })),
                ),
              )
            ).flatMap((r) => r.Messages ?? []);
            await rawInboxInsert(sql, inbox, received.map((m) => eventOf(m.Body!, "sqs")));
            await windowed(chunks(received, 10), 10, async (call) => {
              const r = await sqs.send(new DeleteMessageBatchCommand({ QueueUrl: urls.raw, Entries: call.map((m, k) => ({ Id: String(k), ReceiptHandle: m.ReceiptHandle! })) }));
              if (r.Failed?.length) throw new Error(`SQS delete failed: ${r.Failed[0]!.Message}`);
            });
            got += received.length;
          }
          sqs.destroy();
        },
        async cleanup() {
          for (const url of Object.values(urls)) await sqs.send(new DeleteQueueCommand({ QueueUrl: url }));
          sqs.destroy();
        },
      };
    },
  },
  {
    system: "file",
    name: "file (JSON Lines) → inbox",
    servers: [],
    async prepare(tag) {
      const path = join(workDir, `${tag}.in.jsonl`);
      writeFileSync(path, Array.from({ length: SRC_N }, (_, i) => eventBody(i)).join("\n") + "\n");
      return {
        config: { type: "file", input: path },
        async raw(sql, inbox) {
          // Read, write ≤ 1000 lines per transaction, and keep the position with them.
          const lines = readFileSync(path, "utf8").split("\n").filter(Boolean);
          for (let at = 0; at < lines.length; at += BATCH) {
            const part = lines.slice(at, at + BATCH);
            await sql.begin(async (tx) => {
              await tx`INSERT INTO pgtrickle.${tx(inbox)} (event_id, event_type, source, payload)
                SELECT x.id, x.type, 'file', x.body::jsonb
                  FROM unnest(${part.map((l) => eventOf(l, "file").id)}::text[], ${part.map(() => "bench")}::text[], ${part}::text[]) AS x(id, type, body)
                ON CONFLICT (event_id) DO NOTHING`;
              await tx`INSERT INTO public.e2e_raw_offsets (name, last_id) VALUES (${tag}, ${at + part.length}) ON CONFLICT (name) DO UPDATE SET last_id = EXCLUDED.last_id`;
            });
          }
        },
        cleanup: async () => {},
      };
    },
  },
];

/** 8 senders POSTing arrays of 100 events to `url`, each with an Idempotency-Key, each request answered after the commit. */
async function postEvents(url: string): Promise<number> {
  let next = 0;
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: 8 }, async () => {
      while (next < SRC_N) {
        const from = next;
        next += 100;
        const body = `[${Array.from({ length: Math.min(100, SRC_N - from) }, (_, k) => eventBody(from + k)).join(",")}]`;
        // The key a careful sender gives (the relay keys each element `<key>:<index>`); the
        // hand-written receiver trusts the events' own event_id instead. Without one the relay
        // would derive each key from a SHA-256 of the event (docs/interface.md §6.5).
        const headers = { "Content-Type": "application/json", "Idempotency-Key": `r-${run}-${from}` };
        const r = await fetch(url, { method: "POST", body, headers });
        if (r.status !== 200) throw new Error(`HTTP ${r.status}: ${await r.text()}`);
      }
    }),
  );
  return performance.now() - t0;
}

const inboxCount = async (inbox: string) => (await db.sql<{ n: number }[]>`SELECT count(*)::int AS n FROM pgtrickle.${db.sql(inbox)}`)[0]!.n;

async function benchSource(src: SourceCase): Promise<Row> {
  cpuMs.relay = cpuMs.raw = 0;
  const prepared: Awaited<ReturnType<SourceCase["prepare"]>>[] = [];
  const round = async (r: number) => (prepared[r] ??= await src.prepare(`e2e-${run}-src-${src.system}-${r}`));
  const { relayMs, rawMs } = await alternate(
    async (r) => {
      const { config } = await round(r);
      const pipeline = `e2e_${run}_src_${src.system}_${r}`;
      await db.sql`SELECT pgtrickle.set_relay_inbox(${pipeline}, ${`${pipeline}_relay_inbox`}, ${db.sql.json({ ...config, batch_size: BATCH } as never)})`;
      const ms = await relayDrain(pipeline, src.env);
      await db.sql`SELECT pgtrickle.disable_relay(${pipeline})`;
      expectCount(`${src.name} relay`, await inboxCount(`${pipeline}_relay_inbox`), SRC_N);
      return ms;
    },
    async (r) => {
      const { raw } = await round(r);
      const inbox = `e2e_${run}_src_${src.system}_${r}_raw_inbox`;
      await db.sql`SELECT pgtrickle.create_inbox(${inbox})`;
      const t0 = performance.now();
      const cpu0 = process.cpuUsage();
      const sql = connect(db.url, { max: 1 });
      await raw(sql, inbox);
      await sql.end();
      const ms = performance.now() - t0;
      const cpu = process.cpuUsage(cpu0);
      cpuMs.raw += (cpu.user + cpu.system) / 1000;
      expectCount(`${src.name} raw`, await inboxCount(inbox), SRC_N);
      return ms;
    },
  );
  for (const p of prepared) await p.cleanup();
  const row = { name: src.name, relay: rate(SRC_N, relayMs), raw: rate(SRC_N, rawMs) };
  const perEvent = (ms: number) => ((ms * 1000) / (SRC_N * ROUNDS)).toFixed(1);
  console.log(
    `  ${row.name}: relay ${row.relay} rows/s (${(relayMs / 1000).toFixed(1)} s), raw ${row.raw} rows/s (${(rawMs / 1000).toFixed(1)} s), ratio ${(row.relay / row.raw).toFixed(2)}; CPU per event: relay ${perEvent(cpuMs.relay)} µs, raw ${perEvent(cpuMs.raw)} µs`,
  );
  return row;
}

/** The HTTP receiver: the relay under `run` against the hand-written receiver, 8 senders each. */
async function benchHttpSource(): Promise<Row> {
  cpuMs.relay = cpuMs.raw = 0;
  const { relayMs, rawMs } = await alternate(httpRelayRun, httpRawRun);
  const row = { name: "HTTP receiver → inbox (8 senders × arrays of 100)", relay: rate(SRC_N, relayMs), raw: rate(SRC_N, rawMs) };
  const perEvent = (ms: number) => ((ms * 1000) / (SRC_N * ROUNDS)).toFixed(1);
  console.log(
    `  ${row.name}: relay ${row.relay} rows/s, raw ${row.raw} rows/s, ratio ${(row.relay / row.raw).toFixed(2)}; CPU per event (the receiving process): relay ${perEvent(cpuMs.relay)} µs, raw ${perEvent(cpuMs.raw)} µs`,
  );
  return row;
}

async function httpRelayRun(round: number): Promise<number> {
  const pipeline = `e2e_${run}_src_http_${round}`;
  const port = await freePort();
  await db.sql`SELECT pgtrickle.set_relay_inbox(${pipeline}, ${`${pipeline}_relay_inbox`}, ${db.sql.json({ type: "http", listen_addr: `127.0.0.1:${port}`, path: "/in", batch_size: BATCH })})`;
  await db.sql`UPDATE pgtrickle.relay_outbox_config SET enabled = false`;
  await db.sql`UPDATE pgtrickle.relay_inbox_config SET enabled = (name = ${pipeline})`;
  const relay = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0", "--log-level", "warn", ...RELAY_ARGS]);
  children.push(relay.proc);
  let ms: number;
  try {
    await waitForPost(`http://127.0.0.1:${port}/in`);
    ms = await postEvents(`http://127.0.0.1:${port}/in`);
  } finally {
    await relay.stop("SIGTERM");
  }
  cpuMs.relay += cpuOf(relay.proc);
  expectCount("HTTP relay", await inboxCount(`${pipeline}_relay_inbox`), SRC_N);
  return ms;
}

async function httpRawRun(round: number): Promise<number> {
  const rawInbox = `e2e_${run}_src_http_${round}_raw_inbox`;
  await db.sql`SELECT pgtrickle.create_inbox(${rawInbox})`;
  const receiver = await startReceiver(["inbox", db.url, rawInbox]);
  let ms: number;
  try {
    ms = await postEvents(`http://127.0.0.1:${receiver.port}/`);
  } finally {
    receiver.proc.kill("SIGTERM");
  }
  await receiver.proc.exited;
  cpuMs.raw += cpuOf(receiver.proc);
  expectCount("HTTP raw", await inboxCount(rawInbox), SRC_N);
  return ms;
}

async function waitForPost(url: string) {
  for (let i = 0; i < 400; i++) {
    if (await fetch(url, { method: "POST", body: "[]" }).then((r) => r.status === 200, () => false)) return;
    await Bun.sleep(50);
  }
  throw new Error(`nothing answers at ${url}`);
}

/** bench/e2e-receiver.ts in a process of its own; resolves with the port it listens on. */
async function startReceiver(args: string[]) {
  const proc = Bun.spawn([process.execPath, new URL("./e2e-receiver.ts", import.meta.url).pathname, ...args], { stdout: "pipe", stderr: "inherit" });
  children.push(proc);
  const reader = proc.stdout.getReader();
  const { value } = await reader.read();
  reader.releaseLock();
  const port = Number(new TextDecoder().decode(value).trim());
  if (!port) throw new Error(`e2e-receiver ${args[0]} did not start`);
  return { proc, port };
}

// ---------------------------------------------------------------- main

const forward = opts.direction !== "reverse";
const reverse = opts.direction !== "forward";
const sinks = forward ? SINKS.filter((s) => wanted(s.system)) : [];
const sources = reverse ? SOURCES.filter((s) => wanted(s.system)) : [];
for (const server of new Set(["postgres" as ServerName, ...sinks.flatMap((s) => s.servers), ...sources.flatMap((s) => s.servers)])) await requireServer(server);

const db: TestDatabase = await testDatabase("bench_e2e");
const remoteDb: TestDatabase | null = sinks.some((s) => s.system === "pg-inbox") ? await testDatabase("bench_e2e_remote", { catalog: false }) : null;
const workDir = mkdtempSync(join(tmpdir(), "relay-e2e-"));
console.log(`relay: ${relayCommand(RELAY_ARGS).join(" ")}; ${N} messages per forward run, ${SRC_N} per source; load average ${load()}`);
try {
  await db.sql`CREATE TABLE public.e2e_raw_offsets (name text PRIMARY KEY, last_id bigint NOT NULL)`;
  if (sinks.some((s) => s.system === "http")) webhookPort = (await startReceiver(["webhook"])).port;
  for (const rowsPerSet of sinks.length ? SETS : []) {
    const t0 = performance.now();
    const ob = await makeOutbox(rowsPerSet);
    console.log(`outbox of ${N} messages in ${rowsPerSet}-row change sets written in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    const rows: Row[] = [];
    for (const sink of sinks) rows.push(await attempt(`${sink.name}, ${rowsPerSet}-row sets`, () => benchSink(sink, ob)));
    printTable(`Forward, ${rowsPerSet}-row change sets, ${N} messages`, rows, "msg/s");
  }
  if (sources.length || (reverse && wanted("http"))) {
    const rows: Row[] = [];
    for (const src of sources) rows.push(await attempt(src.name, () => benchSource(src)));
    if (wanted("http")) rows.push(await attempt("HTTP receiver → inbox", benchHttpSource));
    printTable(`Reverse, ${SRC_N} events`, rows, "rows/s");
  }
} finally {
  children.forEach((c) => c.kill("SIGKILL"));
  await db.drop();
  await remoteDb?.drop();
  rmSync(workDir, { recursive: true, force: true });
}
