/**
 * What a cold `drain` pays beside its events: a drain of a small backlog (3,000 events), this
 * tree's relay against another's (PGTRICKLE_RELAY_MAIN, e.g. a checkout of main), alternately.
 *
 *   PGTRICKLE_RELAY_MAIN=/path/to/other/src/main.ts node_modules/.bin/bun bench/drain-end.ts [rounds=3]
 *
 * Kafka (a topic of 3 partitions, a new group per run) and RabbitMQ (a new queue per run). Prints
 * each run's wall time and checks that the inbox holds every event and the queue nothing.
 */
import amqp from "amqplib";
import { Kafka, logLevel } from "kafkajs";
import { loadavg } from "node:os";
import { testDatabase } from "../test/helpers/pg.ts";
import { AMQP_URL, KAFKA_BROKERS, requireServer } from "../test/helpers/servers.ts";

const ROUNDS = Number(process.argv[2] ?? 3);
const N = 3000;
const THIS = new URL("../src/main.ts", import.meta.url).pathname;
const OTHER = process.env.PGTRICKLE_RELAY_MAIN;
if (!OTHER) throw new Error("set PGTRICKLE_RELAY_MAIN to the other tree's src/main.ts");
for (const s of ["postgres", "kafka", "rabbitmq"] as const) await requireServer(s);

const run = Math.random().toString(36).slice(2, 8);
const db = await testDatabase("bench_drain_end");
const kafka = new Kafka({ brokers: KAFKA_BROKERS, logLevel: logLevel.NOTHING });
const admin = kafka.admin();
await admin.connect();
const conn = await amqp.connect(AMQP_URL);
const ch = await conn.createConfirmChannel();
const topic = `drainend_${run}`;
const queues: string[] = [];

/** One cold drain of `name` by `main`; milliseconds. */
async function drain(main: string, name: string): Promise<number> {
  const t0 = performance.now();
  const p = Bun.spawn([process.execPath, main, "drain", "--postgres-url", db.url, "--pipeline", name, "--log-level", "warn", "--metrics-addr", "127.0.0.1:0"], { stdout: "pipe", stderr: "pipe" });
  const [err, code] = await Promise.all([new Response(p.stderr).text(), p.exited]);
  if (code !== 0) throw new Error(`drain ${name}: exit ${code}\n${err}`);
  const ms = performance.now() - t0;
  const [row] = await db.sql.unsafe<{ n: number }[]>(`SELECT count(*)::int AS n FROM pgtrickle."${name}_inbox"`);
  const n = row?.n;
  if (n !== N) throw new Error(`${name}: ${n} rows in the inbox, expected ${N}`);
  await db.sql`SELECT pgtrickle.disable_relay(${name})`;
  return ms;
}

try {
  await admin.createTopics({ topics: [{ topic, numPartitions: 3 }], waitForLeaders: true });
  const producer = kafka.producer();
  await producer.connect();
  await producer.send({ topic, messages: Array.from({ length: N }, (_, i) => ({ value: JSON.stringify({ i }) })) });
  await producer.disconnect();
  console.log(`cold drains of ${N} events; this tree ${THIS}, other ${OTHER}; load average ${loadavg()[0]!.toFixed(2)}`);
  for (let r = 0; r < 2 * ROUNDS; r++) {
    const [label, main] = r % 2 === 0 ? ["other", OTHER] : ["this ", THIS];
    const k = `drainend_${run}_k${r}`;
    await db.sql`SELECT pgtrickle.set_relay_inbox(${k}, ${`${k}_inbox`}, ${db.sql.json({ type: "kafka", brokers: KAFKA_BROKERS.join(","), topic, group_id: k })})`;
    const kafkaMs = await drain(main, k);
    const q = `drainend_${run}_q${r}`;
    queues.push(q);
    await ch.assertQueue(q, { durable: true });
    for (let i = 0; i < N; i++) ch.sendToQueue(q, Buffer.from(JSON.stringify({ i })), { messageId: `${q}-${i}`, persistent: true });
    await ch.waitForConfirms();
    await db.sql`SELECT pgtrickle.set_relay_inbox(${q}, ${`${q}_inbox`}, ${db.sql.json({ type: "rabbitmq", url: AMQP_URL, queue: q })})`;
    const rabbitMs = await drain(main, q);
    const left = (await ch.checkQueue(q)).messageCount;
    if (left !== 0) throw new Error(`${q}: ${left} messages left on the queue`);
    console.log(`${label}: kafka ${kafkaMs.toFixed(0)} ms, rabbitmq ${rabbitMs.toFixed(0)} ms (load average ${loadavg()[0]!.toFixed(2)})`);
  }
} finally {
  for (const q of queues) await ch.deleteQueue(q).catch(() => {});
  await conn.close();
  await admin.deleteTopics({ topics: [topic] }).catch(() => {});
  await admin.disconnect();
  await db.drop();
}
