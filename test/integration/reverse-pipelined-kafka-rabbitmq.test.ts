/**
 * Broker sources that read ahead (docs/PIPELINE.md), against the real Kafka and RabbitMQ of
 * scripts/services: while one batch's inbox commit hangs (the inbox table locked), the relay reads
 * the next batches, and none of them is acknowledged to the broker; a SIGKILL then, and a restart,
 * leave every message in the inbox exactly once and nothing unacknowledged on the broker.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { PIPELINE_DEPTH } from "../../src/pipeline.ts";
import { KafkaAndRabbit } from "../helpers/brokers.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { eventually, RunningRelay } from "../helpers/relay.ts";
import { drainPipeline, enableOnly, inboxCount, inboxRows, killRelays, setRelayInbox } from "../helpers/reverse.ts";
import { AMQP_URL, KAFKA_BROKERS, requireServer } from "../helpers/servers.ts";

const RUN = `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`;
const TIMEOUT = 180_000;
const BATCH = 50;
/** Sent before the inbox is locked: committed normally. */
const FIRST = BATCH;
/** Sent while the inbox is locked: more than PIPELINE_DEPTH batches, so the reader fills the pipeline. */
const SECOND = 6 * BATCH;

let db: TestDatabase;
const brokers = new KafkaAndRabbit();
const running: RunningRelay[] = [];

beforeAll(async () => {
  await requireServer("postgres");
  await requireServer("kafka");
  await requireServer("rabbitmq");
  db = await testDatabase("reverse_pipelined");
  await brokers.open();
});

afterAll(async () => {
  await killRelays(running);
  await brokers.close();
  await db?.drop();
});

const ids = (from: number, n: number) => Array.from({ length: n }, (_, i) => `ev-${from + i}`);

interface Broker {
  /** The source config of the pipeline. */
  source: Record<string, unknown>;
  send(eventIds: string[]): Promise<void>;
  /** Asserts that exactly the first `n` messages sent are acknowledged to the broker (none after them). */
  expectAcknowledged(n: number, total: number): Promise<void>;
}

async function kafkaBroker(label: string): Promise<Broker> {
  const { topic, group } = await brokers.topic(`relaypipe.${RUN}.${label}`);
  return {
    source: { type: "kafka", brokers: KAFKA_BROKERS.join(","), topic, group_id: group, batch_size: BATCH },
    send: (eventIds) => brokers.sendKafka(topic, eventIds),
    expectAcknowledged: async (n) => {
      const [committed] = await brokers.admin.fetchOffsets({ groupId: group, topics: [topic] });
      expect(committed!.partitions.map((p) => Math.max(0, Number(p.offset)))).toEqual([n]);
    },
  };
}

async function rabbitBroker(label: string): Promise<Broker> {
  const queue = await brokers.queue(`relaypipe.${RUN}.${label}`);
  return {
    source: { type: "rabbitmq", url: AMQP_URL, queue, batch_size: BATCH },
    send: async (eventIds) => brokers.sendRabbit(queue, eventIds),
    // Only ready messages are counted by RabbitMQ: this holds once the consumer is gone, when
    // every delivery it did not acknowledge is ready again.
    expectAcknowledged: async (n, total) => {
      await eventually(async () => (await brokers.ch.checkQueue(queue)).consumerCount === 0, 10_000, "the killed consumer to be gone");
      expect((await brokers.ch.checkQueue(queue)).messageCount).toBe(total - n);
    },
  };
}

/**
 * FIRST messages go through; then the inbox is locked and SECOND more are sent: the relay holds
 * PIPELINE_DEPTH batches (one waiting for the lock, the others read ahead) and acknowledges none of
 * them; it is killed there, the lock let go, and a drain finishes the work.
 */
async function killWithBatchesInFlight(name: string, broker: Broker): Promise<void> {
  const inbox = `${name}_inbox`;
  await setRelayInbox(db, name, inbox, broker.source);
  await enableOnly(db, name);
  await broker.send(ids(0, FIRST));
  const relay = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0", "--log-level", "trace"]);
  running.push(relay);
  const locker = await db.sql.reserve();
  let locked = false;
  try {
    await eventually(async () => (await inboxCount(db, inbox)) === FIRST, 60_000, "the first messages in the inbox");
    await locker`BEGIN`;
    await locker.unsafe(`LOCK TABLE pgtrickle."${inbox}" IN EXCLUSIVE MODE`);
    locked = true;
    const mark = relay.stderr.length;
    await broker.send(ids(FIRST, SECOND));
    const full = `read ahead: ${PIPELINE_DEPTH} batch(es) in flight`;
    await eventually(() => relay.stderr.slice(mark).includes(full), 60_000, "the relay to read ahead while the inbox is locked");
    await eventually(
      async () => {
        const [row] = await db.sql`SELECT count(*)::int AS n FROM pg_locks WHERE NOT granted AND relation = ${`pgtrickle."${inbox}"`}::regclass`;
        return (row as { n: number }).n > 0;
      },
      10_000,
      "the inbox write to wait for the lock",
    );
    expect(relay.proc.exitCode).toBeNull();
    await relay.stop("SIGKILL");
    // Only the first batch was acknowledged: the batches read ahead were not, their inbox commit never came.
    await broker.expectAcknowledged(FIRST, FIRST + SECOND);
  } finally {
    if (relay.proc.exitCode === null) await relay.stop("SIGKILL");
    if (locked) await locker`ROLLBACK`;
    locker.release();
  }
  // The write that waited for the lock may still land now (PostgreSQL runs the killed relay's
  // statement once the lock is free): never acknowledged, so redelivered, and ON CONFLICT absorbs it.
  const result = await drainPipeline(db, name, ["--timeout", "90"]);
  expect(result.exitCode).toBe(0);
  const rows = await inboxRows(db, inbox);
  expect(rows.map((r) => r.event_id).sort()).toEqual(ids(0, FIRST + SECOND).sort());
  await broker.expectAcknowledged(FIRST + SECOND, FIRST + SECOND);
}

describe("reverse sources read ahead", () => {
  test("kafka: batches read ahead are not committed before their inbox commit; kill -9 with them in flight, a restart: every record once", async () => {
    await killWithBatchesInFlight("pkafka", await kafkaBroker("kill"));
  }, TIMEOUT);

  test("rabbitmq: batches read ahead are not acknowledged before their inbox commit; kill -9 with them in flight, a restart: every message once", async () => {
    await killWithBatchesInFlight("prabbit", await rabbitBroker("kill"));
  }, TIMEOUT);
});
