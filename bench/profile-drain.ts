/**
 * CPU profile and CPU time of a forward `drain` to Redis, NATS, a file or an HTTP webhook, or of a
 * reverse drain from Redis Streams, Kafka or a JSON Lines file into an inbox.
 *
 *   node_modules/.bin/bun bench/profile-drain.ts <redis|nats|file|http|http-batch|redis-in|kafka-in|file-in> [rows-per-set=10] [messages=200000] [runs=1]
 *
 * `http` is the per-event webhook case of bench/e2e.ts (`batch_mode` false, ordered per row),
 * `http-batch` its batch-mode case; both POST to bench/e2e-receiver.ts in a process of its own.
 * Forward: writes an outbox of `messages` messages in change sets of `rows-per-set` rows (as
 * bench/e2e.ts does); reverse (`redis-in`, `kafka-in`, `file-in`: rows-per-set ignored): XADDs
 * `messages` events, produces them to a topic of 3 partitions, or writes them as the lines of a
 * file (as bench/e2e.ts does). Then
 * drains `runs` times (a new pipeline each time, so each run starts from the first row or entry,
 * batch_size 1000) with `bun --cpu-prof src/main.ts drain …` (PGTRICKLE_RELAY_MAIN: another main.ts, e.g. a
 * checkout of an older commit). Prints each run's wall time and the drain process's CPU time
 * (user + system: less sensitive to the machine's load than rates), and the top self-time
 * functions of the last run's profile (bench/cpuprofile.ts). Keeps the profiles in a temporary
 * directory it names.
 */
import { Redis } from "ioredis";
import { Kafka, logLevel, Partitioners } from "kafkajs";
import { connect as natsConnect } from "nats";
import { mkdtempSync, readdirSync, writeFileSync } from "node:fs";
import type { Subprocess } from "bun";
import { loadavg, tmpdir } from "node:os";
import { join } from "node:path";
import { createStreamTable, enableOutbox } from "../test/fixtures/outbox.ts";
import { testDatabase } from "../test/helpers/pg.ts";
import { KAFKA_BROKERS, NATS_URL, REDIS_URL } from "../test/helpers/servers.ts";
import { fillOutbox } from "./lib.ts";

const [system = "redis", setArg = "10", nArg = "200000", runsArg = "1"] = process.argv.slice(2);
const rowsPerSet = Number(setArg);
const N = Number(nArg);
const runs = Number(runsArg);
const MAIN = process.env.PGTRICKLE_RELAY_MAIN ?? new URL("../src/main.ts", import.meta.url).pathname;
const run = Math.random().toString(36).slice(2, 8);
const dir = mkdtempSync(join(tmpdir(), "relay-prof-"));

const db = await testDatabase("bench_profile");
const nc = system === "nats" ? await natsConnect({ servers: NATS_URL }) : null;
const redis = system.startsWith("redis") ? new Redis(REDIS_URL) : null;
const kafka = system === "kafka-in" ? new Kafka({ brokers: KAFKA_BROKERS, logLevel: logLevel.NOTHING }) : null;
const admin = kafka?.admin();
const webhook = system.startsWith("http") ? await startWebhook() : null;
try {
  const streamTable = `prof_${run}`;
  await createStreamTable(db.sql, `public.${streamTable}`, "id int primary key");
  const { outboxTable } = await enableOutbox(db.sql, `public.${streamTable}`);
  await fillOutbox(db.sql, outboxTable, rowsPerSet, N);
  const events = `prof_${run}_events`;
  const eventBody = (i: number) => JSON.stringify({ event_id: `e-${i}`, event_type: "bench", order_id: i, customer: `c${i % 97}`, amount: i * 1.5 });
  if (admin) {
    await admin.connect();
    await admin.createTopics({ topics: [{ topic: events, numPartitions: 3 }], waitForLeaders: true });
    const producer = kafka!.producer({ createPartitioner: Partitioners.DefaultPartitioner });
    await producer.connect();
    for (let at = 0; at < N; at += 1000) {
      await producer.send({ topic: events, messages: Array.from({ length: Math.min(1000, N - at) }, (_, k) => ({ value: eventBody(at + k) })) });
    }
    await producer.disconnect();
  }
  const eventsFile = join(dir, `${events}.jsonl`);
  if (system === "file-in") writeFileSync(eventsFile, Array.from({ length: N }, (_, i) => eventBody(i)).join("\n") + "\n");
  if (system === "redis-in") {
    for (let at = 0; at < N; at += 1000) {
      const p = redis!.pipeline();
      for (let i = at; i < Math.min(N, at + 1000); i++) p.xadd(events, "*", "payload", eventBody(i));
      await p.exec();
    }
  }
  for (let r = 0; r < runs; r++) {
    const name = `prof_${run}_${r}`;
    if (system.endsWith("-in")) {
      const config =
        system === "kafka-in"
          ? { type: "kafka", brokers: KAFKA_BROKERS.join(","), topic: events, group_id: name, auto_offset_reset: "earliest", batch_size: 1000 }
          : system === "file-in"
            ? { type: "file", input: eventsFile, batch_size: 1000 }
            : { type: "redis", url: REDIS_URL, stream_key: events, group_name: name, batch_size: 1000 };
      await db.sql`SELECT pgtrickle.set_relay_inbox(${name}, ${`${name}_inbox`}, ${db.sql.json(config)})`;
      await drain(name, `${system}, ${N} events`);
      await db.sql`SELECT pgtrickle.disable_relay(${name})`;
      continue;
    }
    const config = forwardSinkConfig(name);
    if (nc) await (await nc.jetstreamManager()).streams.add({ name: name.toUpperCase(), subjects: [`pgtrickle.${streamTable}.>`] });
    await db.sql`SELECT pgtrickle.set_relay_outbox(${name}, ${`public.${streamTable}`}, NULL, ${db.sql.json(config)})`;
    await db.sql`UPDATE pgtrickle.relay_outbox_config SET config = jsonb_set(config, '{source,batch_size}', ${1000 / rowsPerSet}::text::jsonb) WHERE name = ${name}`;
    await drain(name, `${system}, ${rowsPerSet}-row sets, ${N} messages`);
    await db.sql`SELECT pgtrickle.disable_relay(${name})`;
    if (nc) await (await nc.jetstreamManager()).streams.delete(name.toUpperCase());
    if (redis) await redis.del(name);
  }
  const last = readdirSync(dir).filter((f) => f.endsWith(".cpuprofile")).sort().pop();
  console.log(`profiles in ${dir}`);
  if (last) await Bun.spawn([process.execPath, new URL("./cpuprofile.ts", import.meta.url).pathname, join(dir, last), "30"], { stdout: "inherit" }).exited;
} finally {
  await nc?.close();
  if (redis) await redis.del(`prof_${run}_events`);
  redis?.disconnect();
  if (admin) {
    await admin.deleteTopics({ topics: [`prof_${run}_events`] }).catch(() => {});
    await admin.disconnect();
  }
  webhook?.proc.kill("SIGTERM");
  await db.drop();
}

/** The sink of the forward pipeline `name`. */
function forwardSinkConfig(name: string): Record<string, string | boolean> {
  if (system === "nats") return { type: "nats", url: NATS_URL, stream: name.toUpperCase() };
  if (system === "file") return { type: "file", output: join(dir, `${name}.jsonl`) };
  if (webhook) {
    const url = `http://127.0.0.1:${webhook.port}/${name}`;
    return system === "http" ? { type: "http", url, batch_mode: false, ordering_key_template: "{stream_table}:{id}" } : { type: "http", url };
  }
  return { type: "redis", url: REDIS_URL, stream_key: name };
}

/** bench/e2e-receiver.ts's webhook in a process of its own; its port. */
async function startWebhook(): Promise<{ proc: Subprocess<"ignore", "pipe", "inherit">; port: number }> {
  const proc = Bun.spawn([process.execPath, new URL("./e2e-receiver.ts", import.meta.url).pathname, "webhook"], { stdout: "pipe", stderr: "inherit" });
  const { value } = await proc.stdout.getReader().read();
  const port = Number(new TextDecoder().decode(value).trim());
  if (!port) throw new Error("bench/e2e-receiver.ts webhook did not start");
  return { proc, port };
}

/** One profiled drain of `name`; prints its wall and CPU time. */
async function drain(name: string, what: string) {
  const t0 = performance.now();
  const proc = Bun.spawn(
    [process.execPath, "--cpu-prof", `--cpu-prof-dir=${dir}`, `--cpu-prof-name=${name}.cpuprofile`, MAIN, "drain", "--postgres-url", db.url, "--pipeline", name, "--log-level", "warn", "--metrics-addr", "127.0.0.1:0"],
    { stdout: "inherit", stderr: "inherit" },
  );
  if ((await proc.exited) !== 0) throw new Error(`drain exited ${proc.exitCode}`);
  const wall = (performance.now() - t0) / 1000;
  const cpu = proc.resourceUsage()!.cpuTime;
  console.log(
    `${what}: wall ${wall.toFixed(2)} s (${Math.round(N / wall)} msg/s), CPU user ${(Number(cpu.user) / 1e6).toFixed(2)} s + system ${(Number(cpu.system) / 1e6).toFixed(2)} s (load average ${loadavg()[0]!.toFixed(2)})`,
  );
}
