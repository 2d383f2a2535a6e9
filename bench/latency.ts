/**
 * Commit → publish latency of a running relay, for NATS JetStream and Kafka, beside the raw
 * client library's in the same run.
 *
 *   node_modules/.bin/bun bench/latency.ts [--rate 1000] [--seconds 15] [--only nats,kafka] [--rounds 1]
 *
 * `pgtrickle-relay run` (the sources under Bun, or PGTRICKLE_RELAY_BIN) relays one outbox to the
 * broker; a writer commits one-message outbox rows at a steady `--rate` per second (every
 * millisecond the rows due by then, in one transaction: one row while the writer keeps up; from a
 * pool of 16 connections, so a slow commit does not delay the next). Right after each COMMIT
 * returned, the raw publisher sends the same rows' messages with the same client library the
 * relay uses (nats.js JetStream publish with a msgID; a kafkajs idempotent producer, acks=all) to
 * a subject/topic of its own. A consumer of the same kind for each (a JetStream ordered consumer;
 * a kafkajs consumer of a 1-partition topic, maxWaitTimeInMs 100) notes when each message
 * arrives. Latency = arrival − the moment the writer saw its COMMIT succeed, both on this
 * process's clock: it leaves out the commit's own way back to the writer, so it is a slight
 * underestimate. The raw figures are the floor of this way of measuring on this machine
 * (the consumers' own delays, the broker's); "added by the relay" is relay − raw per percentile.
 */
import { Kafka, logLevel, Partitioners, type Consumer } from "kafkajs";
import { connect as natsConnect, DeliverPolicy, type JetStreamClient, type NatsConnection } from "nats";
import { loadavg } from "node:os";
import { parseArgs } from "node:util";
import postgres from "postgres";
import { createStreamTable, enableOutbox, ident } from "../test/fixtures/outbox.ts";
import { testDatabase } from "../test/helpers/pg.ts";
import { relayCommand, RunningRelay } from "../test/helpers/relay.ts";
import { KAFKA_BROKERS, NATS_URL, requireServer } from "../test/helpers/servers.ts";

const { values: opts } = parseArgs({
  options: {
    rate: { type: "string", default: "1000" },
    seconds: { type: "string", default: "15" },
    only: { type: "string", default: "nats,kafka" },
    rounds: { type: "string", default: "1" },
  },
});
const RATE = Number(opts.rate);
const SECONDS = Number(opts.seconds);
const run = Math.random().toString(36).slice(2, 8);

/** The relay's and the raw publisher's messages each arrive with `outbox_id`. */
type Arrived = (outboxId: number) => void;

/**
 * Where the relay publishes, the raw publisher beside it (the same client library, publishing
 * each row right after the writer's COMMIT returned, to a subject/topic of its own) and one
 * consumer of the same kind for each.
 */
interface Broker {
  config: Record<string, unknown>;
  /** Creates both destinations and subscribes to them. */
  start(relayArrived: Arrived, rawArrived: Arrived): Promise<void>;
  /** Publishes these rows' messages to the raw destination; resolves once the broker acknowledged them. */
  publishRaw(ids: number[]): Promise<void>;
  stop(): Promise<void>;
}

/** A body of the relay's envelope's shape and size (src/message.ts), for the raw publisher. */
const rawBody = (id: number) =>
  JSON.stringify({
    dedup_key: `raw:${id}:0`,
    subject: "latraw.insert",
    payload: { id, customer: "c1", amount: id * 1.5 },
    op: "insert",
    is_full_refresh: false,
    outbox_id: id,
    refresh_id: null,
  });

const outboxIdOf = (body: string) => (JSON.parse(body) as { outbox_id: number }).outbox_id;

function natsBroker(relaySubjects: string): Broker {
  const streams = { relay: `LAT_${run}`, raw: `LATRAW_${run}` };
  const rawSubject = `latraw.${run}`;
  let nc: NatsConnection;
  let js: JetStreamClient;
  const consumers: { close(): Promise<void | Error> }[] = [];
  const encoder = new TextEncoder();
  return {
    config: { type: "nats", url: NATS_URL, stream: streams.relay },
    async start(relayArrived, rawArrived) {
      nc = await natsConnect({ servers: NATS_URL });
      js = nc.jetstream();
      const jsm = await nc.jetstreamManager();
      await jsm.streams.add({ name: streams.relay, subjects: [relaySubjects] });
      await jsm.streams.add({ name: streams.raw, subjects: [rawSubject] });
      for (const [stream, arrived] of [[streams.relay, relayArrived], [streams.raw, rawArrived]] as const) {
        const consumer = await js.consumers.get(stream, { deliver_policy: DeliverPolicy.New });
        const messages = await consumer.consume();
        consumers.push(messages);
        void (async () => {
          for await (const m of messages) arrived(outboxIdOf(m.string()));
        })();
      }
    },
    // Every row's publish at once, each awaiting its own PubAck (nats.js pipelines them).
    async publishRaw(ids) {
      await Promise.all(ids.map((id) => js.publish(rawSubject, encoder.encode(rawBody(id)), { msgID: `raw:${id}:0` })));
    },
    async stop() {
      for (const c of consumers) await c.close();
      const jsm = await nc.jetstreamManager();
      for (const stream of Object.values(streams)) await jsm.streams.delete(stream);
      await nc.close();
    },
  };
}

/**
 * One send at a time, each taking every row committed while the one before it was in flight:
 * kafkajs lets an idempotent producer send to a broker only one request after the other (its
 * broker lock), so a send per commit would queue up behind each other at 1,000 commits/s. This
 * is what the relay's loop does too (it publishes what it read while the last write was out).
 */
function coalescing(send: (ids: number[]) => Promise<unknown>): (ids: number[]) => Promise<void> {
  let waiting: { ids: number[]; sent: Promise<void> } | null = null;
  let inFlight: Promise<unknown> = Promise.resolve();
  return (ids) => {
    if (waiting) {
      waiting.ids.push(...ids);
      return waiting.sent;
    }
    const next = { ids: [...ids], sent: Promise.resolve() };
    next.sent = inFlight.then(async () => {
      waiting = null;
      await send(next.ids);
    });
    waiting = next;
    inFlight = next.sent.catch(() => {});
    return next.sent;
  };
}

function kafkaBroker(): Broker {
  const topics = { relay: `lat-${run}`, raw: `latraw-${run}` };
  const kafka = new Kafka({ brokers: KAFKA_BROKERS, logLevel: logLevel.NOTHING });
  const admin = kafka.admin();
  // The relay's producer settings (src/backends/kafka/sink.ts): idempotent, acks=all.
  const producer = kafka.producer({ idempotent: true, maxInFlightRequests: 5, createPartitioner: Partitioners.DefaultPartitioner });
  const consumers: Consumer[] = [];
  return {
    config: { type: "kafka", brokers: KAFKA_BROKERS.join(","), topic: topics.relay },
    async start(relayArrived, rawArrived) {
      await admin.connect();
      await admin.createTopics({ topics: Object.values(topics).map((topic) => ({ topic, numPartitions: 1 })), waitForLeaders: true });
      await producer.connect();
      for (const [topic, arrived] of [[topics.relay, relayArrived], [topics.raw, rawArrived]] as const) {
        const consumer = kafka.consumer({ groupId: topic, maxWaitTimeInMs: 100 });
        consumers.push(consumer);
        await consumer.connect();
        await consumer.subscribe({ topic, fromBeginning: true });
        await consumer.run({ eachMessage: async ({ message }) => arrived(outboxIdOf(message.value!.toString())) });
      }
    },
    publishRaw: coalescing((ids) =>
      producer.send({ topic: topics.raw, acks: -1, messages: ids.map((id) => ({ key: `raw:${id}:0`, value: rawBody(id), headers: { pgt_dedup_key: `raw:${id}:0` } })) }),
    ),
    async stop() {
      for (const c of consumers) await c.disconnect();
      await producer.disconnect();
      await admin.deleteTopics({ topics: Object.values(topics) }).catch(() => {});
      await admin.disconnect();
    },
  };
}

const pct = (xs: number[], p: number) => xs[Math.min(xs.length - 1, Math.floor((p / 100) * xs.length))]!;

/** Latencies (ms, sorted) of the committed rows that arrived. */
function latencies(committed: Map<number, number>, arrivals: Map<number, number>): number[] {
  return [...committed].filter(([id]) => arrivals.has(id)).map(([id, at]) => arrivals.get(id)! - at).sort((a, b) => a - b);
}

async function measure(system: "nats" | "kafka") {
  await requireServer(system);
  const db = await testDatabase(`bench_latency_${system}`);
  const writers = postgres(db.url, { max: 16, onnotice: () => {} });
  let relay: RunningRelay | null = null;
  const streamTable = `lat_${run}_${system}`;
  const broker = system === "nats" ? natsBroker(`pgtrickle.${streamTable}.>`) : kafkaBroker();
  try {
    await createStreamTable(db.sql, `public.${streamTable}`, "id int primary key");
    const { outboxTable } = await enableOutbox(db.sql, `public.${streamTable}`);
    const arrivals = { relay: new Map<number, number>(), raw: new Map<number, number>() };
    await broker.start(
      (id) => arrivals.relay.set(id, performance.now()),
      (id) => arrivals.raw.set(id, performance.now()),
    );
    await db.sql`SELECT pgtrickle.set_relay_outbox('latency', ${`public.${streamTable}`}, NULL, ${db.sql.json(broker.config as never)})`;
    relay = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0", "--log-level", "warn"]);
    process.on("exit", () => relay?.proc.kill("SIGKILL"));

    // Rows first..last (one normally; several when the writer fell behind its schedule) in one transaction.
    const insert = `INSERT INTO pgtrickle.${ident(outboxTable)} (inserted_count, payload)
      SELECT 1, jsonb_build_object('v', 1, 'deleted', '[]'::jsonb, 'inserted', jsonb_build_array(jsonb_build_object('id', g, 'customer', 'c1', 'amount', g * 1.5)))
        FROM generate_series($1::int, $2::int) g
      RETURNING id::int AS id`;
    const write = async (first: number, last: number) => {
      const rows = await writers.unsafe<{ id: number }[]>(insert, [first, last]);
      const at = performance.now();
      return { ids: rows.map((r) => r.id), at };
    };
    // Warm up: the relay is running and publishing once one row has arrived.
    const { ids: [first] } = await write(0, 0);
    await broker.publishRaw([first!]);
    for (let t = 0; !arrivals.relay.has(first!) || !arrivals.raw.has(first!); t++) {
      if (t > 600) throw new Error(`the relay did not publish within 30 s:\n${relay.stderr}`);
      await Bun.sleep(50);
    }
    await Bun.sleep(500);

    const committed = new Map<number, number>();
    const pending: Promise<void>[] = [];
    const total = RATE * SECONDS;
    const start = performance.now();
    for (let i = 1; i <= total; ) {
      const due = Math.min(total, Math.floor(((performance.now() - start) * RATE) / 1000));
      if (due >= i) {
        pending.push(
          write(i, due).then(({ ids, at }) => {
            for (const id of ids) committed.set(id, at);
            return broker.publishRaw(ids);
          }),
        );
        i = due + 1;
      }
      await Bun.sleep(1);
    }
    await Promise.all(pending);
    const wall = (performance.now() - start) / 1000;
    const missing = () => [...committed.keys()].some((id) => !arrivals.relay.has(id) || !arrivals.raw.has(id));
    for (let t = 0; missing() && t < 200; t++) await Bun.sleep(50);
    const relayLat = latencies(committed, arrivals.relay);
    const rawLat = latencies(committed, arrivals.raw);
    const f = (x: number) => x.toFixed(1);
    const line = (lat: number[]) => `p50 ${f(pct(lat, 50))} ms, p95 ${f(pct(lat, 95))} ms, p99 ${f(pct(lat, 99))} ms, max ${f(lat[lat.length - 1]!)} ms`;
    const added = [50, 95, 99].map((p) => `p${p} ${f(pct(relayLat, p) - pct(rawLat, p))} ms`).join(", ");
    console.log(`${system}: ${relayLat.length}/${total} rows at ${Math.round(total / wall)}/s (load average ${loadavg().map((l) => l.toFixed(2)).join(" ")})`);
    console.log(`  relay: commit → consumer: ${line(relayLat)}`);
    console.log(`  raw:   commit → consumer: ${line(rawLat)} (${rawLat.length}/${total})`);
    console.log(`  added by the relay: ${added}`);
    await relay.stop("SIGTERM");
    if (relayLat.length !== total || rawLat.length !== total) {
      const lost = (arrived: Map<number, number>) => [...committed.keys()].filter((id) => !arrived.has(id)).slice(0, 10);
      throw new Error(`relayed messages that did not arrive: outbox ids ${lost(arrivals.relay).join(", ")}; raw: ${lost(arrivals.raw).join(", ")}\n${relay.stderr}`);
    }
  } finally {
    relay?.proc.kill("SIGKILL");
    await broker.stop().catch(() => {});
    await writers.end({ timeout: 1 });
    await db.drop();
  }
}

console.log(`relay: ${relayCommand([]).join(" ")}; ${RATE} rows/s for ${SECONDS} s`);
for (let round = 1; round <= Number(opts.rounds); round++) {
  for (const system of opts.only!.split(",")) await measure(system as "nats" | "kafka");
}
