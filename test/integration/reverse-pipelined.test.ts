/**
 * The reverse sources that read ahead (docs/PIPELINE.md) — NATS JetStream, Redis Streams, SQS,
 * file and the HTTP receiver — with batches in flight and the inbox commit hanging: a first part
 * of the events is relayed, then the inbox is locked (EXCLUSIVE: reads pass, inserts wait) and
 * the rest published. The relay reads ahead up to three batches, none of which may be
 * acknowledged to the broker while its commit hangs; it is then SIGKILLed, the lock dropped, and
 * a restart must leave every event exactly once in the inbox, nothing left pending.
 */
import { CreateQueueCommand, DeleteQueueCommand, GetQueueAttributesCommand, SendMessageBatchCommand, SQSClient } from "@aws-sdk/client-sqs";
import { afterAll, afterEach, beforeAll, expect, test } from "bun:test";
import Redis from "ioredis";
import { connect as natsConnect, type NatsConnection } from "nats";
import { appendFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { PIPELINE_DEPTH } from "../../src/pipeline.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { freePort } from "../helpers/proxy.ts";
import { eventually, RunningRelay } from "../helpers/relay.ts";
import { deadLetters, disableInboxes, drainPipeline, enableOnly, inboxCount, killRelays, setRelayInbox } from "../helpers/reverse.ts";
import { AWS_CREDENTIALS, NATS_URL, REDIS_URL, requireServer, SQS_CLIENT_CONFIG, SQS_ENDPOINT } from "../helpers/servers.ts";

const run = Math.random().toString(36).slice(2, 8);
/** Events per batch, relayed before the lock, and in all. */
const BATCH = 100;
const FIRST = 300;
const TOTAL = 1000;
let db: TestDatabase;
const relays: RunningRelay[] = [];
const workDir = mkdtempSync(join(tmpdir(), "reverse-pipelined-"));

beforeAll(async () => {
  await requireServer("postgres");
  db = await testDatabase("reverse_pipelined");
});
afterEach(async () => {
  await killRelays(relays);
  await disableInboxes(db);
});
afterAll(async () => {
  await killRelays(relays);
  await db?.drop();
  rmSync(workDir, { recursive: true, force: true });
});

const body = (i: number) => JSON.stringify({ dedup_key: `${run}-${i}`, i });
const range = (from: number, to: number) => Array.from({ length: to - from }, (_, k) => from + k);

/** Locks the inbox against inserts (reads still pass) until the returned function is called. */
async function lockInbox(inbox: string): Promise<() => Promise<void>> {
  const conn = await db.sql.reserve();
  await conn`BEGIN`;
  await conn.unsafe(`LOCK TABLE pgtrickle."${inbox}" IN EXCLUSIVE MODE`);
  return async () => {
    await conn`ROLLBACK`;
    conn.release();
  };
}

function startRelay(): RunningRelay {
  // A long I/O deadline: the hanging inbox write must not be given up on during the test.
  const relay = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0", "--log-level", "trace", "--io-timeout", "300"]);
  relays.push(relay);
  return relay;
}

/** Waits until the relay, after `mark` characters of its log, holds PIPELINE_DEPTH batches read and uncommitted. */
async function waitForReadAhead(relay: RunningRelay, mark: number): Promise<void> {
  const full = new RegExp(`read ahead: ${PIPELINE_DEPTH} batch\\(es\\) in flight`);
  await eventually(() => full.test(relay.stderr.slice(mark)), 60_000, `${PIPELINE_DEPTH} batches in flight; stderr:\n${relay.stderr.slice(-2000)}`);
}

interface Case {
  /** Events acknowledged to the broker (for a file: the lines before the stored position). */
  acknowledged(): Promise<number>;
  /** Makes events [from, to) available to the relay. */
  publish(from: number, to: number): Promise<void>;
}

/**
 * The common course: FIRST events relayed and acknowledged; the inbox locked; the rest published;
 * PIPELINE_DEPTH batches read and held, unacknowledged, while the commit hangs; SIGKILL; then
 * `restart` must leave all TOTAL events once in the inbox.
 */
async function killWithBatchesInFlight(name: string, c: Case, restart: () => Promise<void>): Promise<void> {
  const inbox = `${name}_inbox`;
  await db.sql`SELECT pgtrickle.create_inbox(${inbox})`;
  await c.publish(0, FIRST);
  await enableOnly(db, name);
  const relay = startRelay();
  await eventually(async () => (await inboxCount(db, inbox)) === FIRST, 60_000, `the first ${FIRST} events in the inbox`);
  await eventually(async () => (await c.acknowledged()) === FIRST, 20_000, "the first events acknowledged");

  const unlock = await lockInbox(inbox);
  try {
    const mark = relay.stderr.length;
    await c.publish(FIRST, TOTAL);
    await waitForReadAhead(relay, mark);
    // Read, and held: acknowledged neither before nor while their commit hangs.
    for (let check = 0; check < 3; check++) {
      expect(await inboxCount(db, inbox)).toBe(FIRST);
      expect(await c.acknowledged()).toBe(FIRST);
      await Bun.sleep(300);
    }
    await relay.stop("SIGKILL");
  } finally {
    await unlock();
  }
  await restart();
  expect(await inboxCount(db, inbox)).toBe(TOTAL);
  const [{ n }] = (await db.sql.unsafe(`SELECT count(DISTINCT payload->>'i')::int AS n FROM pgtrickle."${inbox}"`)) as unknown as [{ n: number }];
  expect(n).toBe(TOTAL);
  expect(await deadLetters(db, name)).toEqual([]);
  expect(await c.acknowledged()).toBe(TOTAL);
}

async function drainOk(name: string): Promise<void> {
  const res = await drainPipeline(db, name, [], 120_000);
  if (res.exitCode !== 0) throw new Error(`drain ${name}: exit ${res.exitCode}\n${res.stderr}`);
}

test("redis: batches read ahead stay pending until their inbox commit; SIGKILL with them in flight, restart: every event once", async () => {
  await requireServer("redis");
  const redis = new Redis(REDIS_URL);
  const key = `reverse-pipelined:${run}`;
  const name = "rp_redis";
  try {
    await setRelayInbox(db, name, `${name}_inbox`, { type: "redis", url: REDIS_URL, stream_key: key, batch_size: BATCH, block_ms: 200 });
    const c: Case = {
      async publish(from, to) {
        const p = redis.pipeline();
        for (const i of range(from, to)) p.xadd(key, "*", "payload", body(i));
        await p.exec();
      },
      // Entries delivered to the group minus those still pending.
      async acknowledged() {
        const [group] = (await redis.call("XINFO", "GROUPS", key)) as unknown[][];
        const info = new Map<string, unknown>();
        for (let i = 0; i + 1 < group!.length; i += 2) info.set(String(group![i]), group![i + 1]);
        return Number(info.get("entries-read") ?? 0) - Number(info.get("pending"));
      },
    };
    // The same consumer name after the restart: its own pending entries are read first.
    await killWithBatchesInFlight(name, c, () => drainOk(name));
  } finally {
    await redis.del(key);
    redis.disconnect();
  }
}, 180_000);

test("nats: batches read ahead stay unacknowledged until their inbox commit; SIGKILL with them in flight, restart: every event once", async () => {
  await requireServer("nats");
  const nc: NatsConnection = await natsConnect({ servers: NATS_URL });
  const stream = `RP_${run}`;
  const name = "rp_nats";
  const jsm = await nc.jetstreamManager();
  try {
    await jsm.streams.add({ name: stream, subjects: [`rp.${run}.>`] });
    const js = nc.jetstream();
    // A short ack wait: the killed relay's messages come back to the restart within seconds.
    await setRelayInbox(db, name, `${name}_inbox`, { type: "nats", url: NATS_URL, stream, subject: `rp.${run}.>`, durable_name: name, batch_size: BATCH, ack_wait_seconds: 2 });
    const c: Case = {
      async publish(from, to) {
        await Promise.all(range(from, to).map((i) => js.publish(`rp.${run}.e`, new TextEncoder().encode(body(i)), { msgID: `${run}-${i}` })));
      },
      // Acks come in stream order: the ack floor is their count.
      async acknowledged() {
        return (await jsm.consumers.info(stream, name)).ack_floor.stream_seq;
      },
    };
    await killWithBatchesInFlight(name, c, () => drainOk(name));
  } finally {
    await jsm.streams.delete(stream).catch(() => {});
    await nc.close();
  }
}, 180_000);

test("sqs: batches read ahead stay in flight until their inbox commit; SIGKILL with them in flight, restart: every event once", async () => {
  await requireServer("sqs");
  const sqs = new SQSClient(SQS_CLIENT_CONFIG);
  const queueUrl = (await sqs.send(new CreateQueueCommand({ QueueName: `rp-${run}` }))).QueueUrl!;
  const name = "rp_sqs";
  const attribute = async (a: "ApproximateNumberOfMessages" | "ApproximateNumberOfMessagesNotVisible") =>
    Number((await sqs.send(new GetQueueAttributesCommand({ QueueUrl: queueUrl, AttributeNames: [a] }))).Attributes?.[a] ?? 0);
  try {
    await setRelayInbox(db, name, `${name}_inbox`, {
      type: "sqs",
      queue_url: queueUrl,
      endpoint: SQS_ENDPOINT,
      region: "us-east-1",
      access_key_id: AWS_CREDENTIALS.accessKeyId,
      secret_access_key: AWS_CREDENTIALS.secretAccessKey,
      batch_size: BATCH,
      wait_time_seconds: 1,
      // Short: the killed relay's messages become visible again within seconds.
      visibility_timeout: 3,
    });
    let sent = 0;
    const c: Case = {
      async publish(from, to) {
        sent = to;
        const ids = range(from, to);
        for (let at = 0; at < ids.length; at += 10) {
          const part = ids.slice(at, at + 10);
          await sqs.send(new SendMessageBatchCommand({ QueueUrl: queueUrl, Entries: part.map((i, k) => ({ Id: String(k), MessageBody: body(i) })) }));
        }
      },
      // Deleted: neither visible nor in flight any more.
      acknowledged: async () => sent - (await attribute("ApproximateNumberOfMessages")) - (await attribute("ApproximateNumberOfMessagesNotVisible")),
    };
    await killWithBatchesInFlight(name, c, async () => {
      // A drain does not wait for messages in flight elsewhere: a running relay receives the
      // killed one's once their visibility timeout has passed.
      startRelay();
      await eventually(async () => (await inboxCount(db, `${name}_inbox`)) === TOTAL, 60_000, "every event in the inbox");
      await eventually(async () => (await c.acknowledged()) === TOTAL, 20_000, "every event deleted from the queue");
    });
  } finally {
    await sqs.send(new DeleteQueueCommand({ QueueUrl: queueUrl })).catch(() => {});
    sqs.destroy();
  }
}, 180_000);

test("file: batches read ahead do not move the stored position before their inbox commit; SIGKILL with them in flight, restart: every line once", async () => {
  const path = join(workDir, "events.jsonl");
  writeFileSync(path, "");
  const name = "rp_file";
  const lines = (from: number, to: number) => range(from, to).map((i) => `${body(i)}\n`).join("");
  const storedOffset = async () => {
    const [row] = await db.sql<{ position: string }[]>`SELECT position FROM pgtrickle.relay_source_positions WHERE pipeline = ${name}`;
    return row ? (JSON.parse(row.position) as { offset: number }).offset : 0;
  };
  await setRelayInbox(db, name, `${name}_inbox`, { type: "file", input: path, follow: true, batch_size: BATCH, poll_interval_ms: 100 });
  const c: Case = {
    publish: async (from, to) => appendFileSync(path, lines(from, to)),
    acknowledged: async () => readFileSync(path).subarray(0, await storedOffset()).toString().split("\n").length - 1,
  };
  await killWithBatchesInFlight(name, c, async () => {
    // `drain` reads the followed file to its current end.
    await drainOk(name);
  });
}, 180_000);

test("http: requests whose events are read ahead are answered only after their inbox commit; SIGKILL with them in flight, the senders' retries: every event once", async () => {
  const port = await freePort();
  const name = "rp_http";
  const inbox = `${name}_inbox`;
  const url = `http://127.0.0.1:${port}/in`;
  await setRelayInbox(db, name, inbox, { type: "http", listen_addr: `127.0.0.1:${port}`, path: "/in", batch_size: BATCH, linger_ms: 0 });
  await db.sql`SELECT pgtrickle.create_inbox(${inbox})`;
  await enableOnly(db, name);
  /** The status each request (by its first event) was answered with. */
  const answers = new Map<number, number | "no answer">();
  const post = (from: number) =>
    fetch(url, { method: "POST", body: `[${range(from, from + BATCH).map(body).join(",")}]`, headers: { "Content-Type": "application/json" } }).then(
      (r) => void answers.set(from, r.status),
      () => void answers.set(from, "no answer"),
    );
  const listening = () => fetch(url, { method: "POST", body: "[]" }).then((r) => r.status === 200, () => false);
  const requests = (from: number, to: number) => range(from / BATCH, to / BATCH).map((k) => k * BATCH);

  const relay = startRelay();
  await eventually(listening, 30_000, "the receiver listening");
  await Promise.all(requests(0, FIRST).map(post));
  expect([...answers.values()]).toEqual(requests(0, FIRST).map(() => 200));
  expect(await inboxCount(db, inbox)).toBe(FIRST);

  const unlock = await lockInbox(inbox);
  let late: Promise<void>[] = [];
  try {
    const mark = relay.stderr.length;
    late = requests(FIRST, TOTAL).map(post);
    await waitForReadAhead(relay, mark);
    for (let check = 0; check < 3; check++) {
      expect(await inboxCount(db, inbox)).toBe(FIRST);
      expect(answers.size).toBe(FIRST / BATCH); // no later request answered
      await Bun.sleep(300);
    }
    await relay.stop("SIGKILL");
    await Promise.all(late);
  } finally {
    await unlock();
  }
  // None was told its events were taken: the senders retry them all.
  for (const from of requests(FIRST, TOTAL)) expect(answers.get(from)).toBe("no answer");
  startRelay();
  await eventually(listening, 30_000, "the restarted receiver listening");
  await Promise.all(requests(FIRST, TOTAL).map(post));
  for (const from of requests(0, TOTAL)) expect(answers.get(from)).toBe(200);
  expect(await inboxCount(db, inbox)).toBe(TOTAL);
  const [{ n }] = (await db.sql.unsafe(`SELECT count(DISTINCT payload->>'i')::int AS n FROM pgtrickle."${inbox}"`)) as unknown as [{ n: number }];
  expect(n).toBe(TOTAL);
}, 180_000);
