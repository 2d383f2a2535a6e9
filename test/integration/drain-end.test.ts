/**
 * How a `drain` of a broker source decides it is done (docs/PIPELINE.md, "How a drain ends"),
 * against the real Kafka, RabbitMQ and NATS of scripts/services. Every inbox write is slowed down
 * (a statement trigger sleeps), so that when the broker has nothing left to deliver, batches are
 * still being written and deliveries still sit in the relay's hands; and events keep being
 * published while the drain runs. The drain must then
 *   - deliver every event present when it started,
 *   - acknowledge exactly what it wrote to the inbox before it exits (nothing acknowledged and
 *     not written: lost; nothing written and left unacknowledged: delivered again),
 *   - leave everything else on the broker.
 * A drain that ends as soon as the broker reports nothing ready, while batches are in hand, fails
 * here: their acknowledgements come after the connection closed, and they are left on the broker.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { AckPolicy, connect as natsConnect, type JetStreamManager, type NatsConnection } from "nats";
import { KafkaAndRabbit } from "../helpers/brokers.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { drainPipeline, inboxRows, setRelayInbox } from "../helpers/reverse.ts";
import { AMQP_URL, KAFKA_BROKERS, NATS_URL, requireServer } from "../helpers/servers.ts";

const RUN = `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`;
const TIMEOUT = 180_000;
const BATCH = 50;
/** Published before the drain starts: all of them must be delivered. */
const BEFORE = 600;
/** Published while the drain runs, 10 every 50 ms, until it exits (at most this many). */
const DURING = 400;

let db: TestDatabase;
const brokers = new KafkaAndRabbit();
let nc: NatsConnection;
let jsm: JetStreamManager;
const streams: string[] = [];

beforeAll(async () => {
  await requireServer("postgres");
  await requireServer("kafka");
  await requireServer("rabbitmq");
  await requireServer("nats");
  db = await testDatabase("drain_end");
  await db.sql`CREATE FUNCTION public.slow_write() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.05); RETURN NULL; END $$`;
  await brokers.open();
  nc = await natsConnect({ servers: NATS_URL });
  jsm = await nc.jetstreamManager();
});

afterAll(async () => {
  await brokers.close();
  if (nc) {
    for (const s of streams) await jsm.streams.delete(s).catch(() => {});
    await nc.close();
  }
  await db?.drop();
});

const ids = (from: number, n: number) => Array.from({ length: n }, (_, i) => `ev-${String(from + i).padStart(5, "0")}`);

interface Broker {
  source: Record<string, unknown>;
  send(eventIds: string[]): Promise<void>;
  /**
   * After the drain: the event ids the broker still holds for the relay (not acknowledged), in
   * publishing order. Ends the broker side of the case.
   */
  left(published: string[]): Promise<string[]>;
}

async function kafkaBroker(): Promise<Broker> {
  const { topic, group } = await brokers.topic(`relaydrainend.${RUN}`);
  return {
    source: { type: "kafka", brokers: KAFKA_BROKERS.join(","), topic, group_id: group, batch_size: BATCH },
    send: (eventIds) => brokers.sendKafka(topic, eventIds),
    // One partition, offsets in publishing order: what is at or after the committed offset is left.
    left: async (published) => {
      const [committed] = await brokers.admin.fetchOffsets({ groupId: group, topics: [topic] });
      return published.slice(Math.max(0, Number(committed!.partitions[0]!.offset)));
    },
  };
}

async function rabbitBroker(): Promise<Broker> {
  const queue = await brokers.queue(`relaydrainend.${RUN}`);
  return {
    source: { type: "rabbitmq", url: AMQP_URL, queue, batch_size: BATCH },
    send: async (eventIds) => brokers.sendRabbit(queue, eventIds),
    // The drain's connection is closed: whatever it did not acknowledge is ready again.
    left: async () => {
      const out: string[] = [];
      for (let m = await brokers.ch.get(queue, { noAck: true }); m; m = await brokers.ch.get(queue, { noAck: true })) out.push(m.properties.messageId as string);
      return out;
    },
  };
}

async function natsBroker(): Promise<Broker> {
  const stream = `relaydrainend_${RUN}`;
  await jsm.streams.add({ name: stream, subjects: [`${stream}.>`] });
  streams.push(stream);
  const js = nc.jetstream();
  return {
    source: { type: "nats", url: NATS_URL, stream, subject: `${stream}.>`, durable_name: "relay", batch_size: BATCH },
    send: async (eventIds) => {
      await Promise.all(eventIds.map((id) => js.publish(`${stream}.e`, new TextEncoder().encode(JSON.stringify({ id })), { msgID: id })));
    },
    // Acknowledged in order, and nothing may be left delivered and unacknowledged.
    left: async (published) => {
      const info = await jsm.consumers.info(stream, "relay");
      expect(info.num_ack_pending).toBe(0);
      return published.slice(info.ack_floor.stream_seq);
    },
  };
}

async function drainWhilePublishing(name: string, broker: Broker): Promise<void> {
  const inbox = `${name}_inbox`;
  await db.sql`SELECT pgtrickle.create_inbox(${inbox})`;
  await db.sql.unsafe(`CREATE TRIGGER slow AFTER INSERT ON pgtrickle."${inbox}" FOR EACH STATEMENT EXECUTE FUNCTION public.slow_write()`);
  await setRelayInbox(db, name, inbox, broker.source);
  const published = ids(0, BEFORE);
  await broker.send(published);

  const drain = drainPipeline(db, name, ["--timeout", "120"]);
  let exited = false;
  void drain.finally(() => (exited = true));
  while (!exited && published.length < BEFORE + DURING) {
    const more = ids(published.length, 10);
    await broker.send(more);
    published.push(...more);
    await Bun.sleep(50);
  }
  const result = await drain;
  expect(result.exitCode).toBe(0);

  const written = (await inboxRows(db, inbox)).map((r) => r.event_id).sort();
  const left = await broker.left(published);
  // Every event present at the start was delivered and acknowledged.
  expect(written.slice(0, BEFORE)).toEqual(ids(0, BEFORE));
  expect(left.filter((id) => id < ids(BEFORE, 1)[0]!)).toEqual([]);
  // Acknowledged = written: the two partition what was published, nothing lost, nothing left written.
  expect([...written, ...left].sort()).toEqual([...published].sort());
  expect(result.stderr).toContain(`${name} (reverse): drained, ${written.length} delivered`);
}

describe("a drain ends with every batch in hand acknowledged, and everything present at its start delivered", () => {
  test("rabbitmq", async () => {
    await drainWhilePublishing("drabbit", await rabbitBroker());
  }, TIMEOUT);

  test("kafka", async () => {
    await drainWhilePublishing("dkafka", await kafkaBroker());
  }, TIMEOUT);

  test("nats", async () => {
    await drainWhilePublishing("dnats", await natsBroker());
  }, TIMEOUT);
});
