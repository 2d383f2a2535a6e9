/**
 * Commit → publish latency of a running relay, for NATS JetStream and Kafka.
 *
 *   node_modules/.bin/bun bench/latency.ts [--rate 1000] [--seconds 15] [--only nats,kafka]
 *
 * `pgtrickle-relay run` (the sources under Bun, or PGTRICKLE_RELAY_BIN) relays one outbox to the
 * broker; a writer commits one-message outbox rows at a steady `--rate` per second (every
 * millisecond the rows due by then, in one transaction: one row while the writer keeps up; from a
 * pool of 16 connections, so a slow commit does not delay the next); a
 * consumer in this process (a JetStream ordered consumer; a Kafka consumer, 1-partition topic)
 * notes when each message arrives. Latency = arrival − the moment the writer saw its COMMIT
 * succeed, both on this process's clock: it leaves out the commit's own way back to the writer,
 * so it is a slight underestimate. Reports p50/p95/p99/max and how many arrived.
 */
import { Kafka, logLevel } from "kafkajs";
import { connect as natsConnect, DeliverPolicy } from "nats";
import { loadavg } from "node:os";
import { parseArgs } from "node:util";
import postgres from "postgres";
import { createStreamTable, enableOutbox, ident } from "../test/fixtures/outbox.ts";
import { testDatabase } from "../test/helpers/pg.ts";
import { relayCommand, RunningRelay } from "../test/helpers/relay.ts";
import { KAFKA_BROKERS, NATS_URL, requireServer } from "../test/helpers/servers.ts";

const { values: opts } = parseArgs({
  options: { rate: { type: "string", default: "1000" }, seconds: { type: "string", default: "15" }, only: { type: "string", default: "nats,kafka" } },
});
const RATE = Number(opts.rate);
const SECONDS = Number(opts.seconds);
const run = Math.random().toString(36).slice(2, 8);

/** Where the relay publishes, and a subscription calling `arrived(outbox_id)` for each message. */
interface Broker {
  config: Record<string, unknown>;
  subscribe(arrived: (outboxId: number) => void): Promise<() => Promise<void>>;
}

function natsBroker(subjects: string): Broker {
  const stream = `LAT_${run}`;
  return {
    config: { type: "nats", url: NATS_URL, stream },
    async subscribe(arrived) {
      const nc = await natsConnect({ servers: NATS_URL });
      const jsm = await nc.jetstreamManager();
      await jsm.streams.add({ name: stream, subjects: [subjects] });
      const consumer = await nc.jetstream().consumers.get(stream, { deliver_policy: DeliverPolicy.New });
      const messages = await consumer.consume();
      void (async () => {
        for await (const m of messages) arrived((m.json() as { outbox_id: number }).outbox_id);
      })();
      return async () => {
        await messages.close();
        await jsm.streams.delete(stream);
        await nc.close();
      };
    },
  };
}

function kafkaBroker(): Broker {
  const topic = `lat-${run}`;
  const kafka = new Kafka({ brokers: KAFKA_BROKERS, logLevel: logLevel.NOTHING });
  return {
    config: { type: "kafka", brokers: KAFKA_BROKERS.join(","), topic },
    async subscribe(arrived) {
      const admin = kafka.admin();
      await admin.connect();
      await admin.createTopics({ topics: [{ topic, numPartitions: 1 }], waitForLeaders: true });
      const consumer = kafka.consumer({ groupId: `lat-${run}`, maxWaitTimeInMs: 100 });
      await consumer.connect();
      await consumer.subscribe({ topic, fromBeginning: true });
      await consumer.run({ eachMessage: async ({ message }) => arrived((JSON.parse(message.value!.toString()) as { outbox_id: number }).outbox_id) });
      return async () => {
        await consumer.disconnect();
        await admin.deleteTopics({ topics: [topic] }).catch(() => {});
        await admin.disconnect();
      };
    },
  };
}

const pct = (xs: number[], p: number) => xs[Math.min(xs.length - 1, Math.floor((p / 100) * xs.length))]!;

async function measure(system: "nats" | "kafka") {
  await requireServer(system);
  const db = await testDatabase(`bench_latency_${system}`);
  const writers = postgres(db.url, { max: 16, onnotice: () => {} });
  let relay: RunningRelay | null = null;
  try {
    const streamTable = `lat_${run}_${system}`;
    await createStreamTable(db.sql, `public.${streamTable}`, "id int primary key");
    const { outboxTable } = await enableOutbox(db.sql, `public.${streamTable}`);
    const broker = system === "nats" ? natsBroker(`pgtrickle.${streamTable}.>`) : kafkaBroker();
    const arrivals = new Map<number, number>();
    const stop = await broker.subscribe((id) => arrivals.set(id, performance.now()));
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
      return rows.map((r) => ({ id: r.id, at }));
    };
    // Warm up: the relay is running and publishing once one row has arrived.
    const [first] = await write(0, 0);
    for (let t = 0; !arrivals.has(first!.id); t++) {
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
        pending.push(write(i, due).then((rows) => rows.forEach((c) => committed.set(c.id, c.at))));
        i = due + 1;
      }
      await Bun.sleep(1);
    }
    await Promise.all(pending);
    const wall = (performance.now() - start) / 1000;
    for (let t = 0; [...committed.keys()].some((id) => !arrivals.has(id)) && t < 200; t++) await Bun.sleep(50);
    const lat = [...committed].filter(([id]) => arrivals.has(id)).map(([id, at]) => arrivals.get(id)! - at).sort((a, b) => a - b);
    const f = (x: number) => x.toFixed(1);
    console.log(
      `${system}: ${lat.length}/${total} at ${Math.round(total / wall)}/s, commit → consumer: p50 ${f(pct(lat, 50))} ms, p95 ${f(pct(lat, 95))} ms, p99 ${f(pct(lat, 99))} ms, max ${f(lat[lat.length - 1]!)} ms (load average ${loadavg().map((l) => l.toFixed(2)).join(" ")})`,
    );
    await relay.stop("SIGTERM");
    await stop();
    if (lat.length !== total) throw new Error(`${total - lat.length} messages did not arrive`);
  } finally {
    relay?.proc.kill("SIGKILL");
    await writers.end({ timeout: 1 });
    await db.drop();
  }
}

console.log(`relay: ${relayCommand([]).join(" ")}; ${RATE} rows/s for ${SECONDS} s`);
for (const system of opts.only!.split(",")) await measure(system as "nats" | "kafka");
