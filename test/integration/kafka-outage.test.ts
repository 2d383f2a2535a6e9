/**
 * A Kafka broker outage at the pipeline level: a forward pipeline outbox → kafka runs under
 * `pgtrickle-relay run`; the broker process (whichever clone's scripts/services started it) is
 * frozen with SIGSTOP while rows keep coming. The pipeline must report itself degraded, and once
 * the broker is thawed (SIGCONT, always, in a finally) every row must arrive — duplicates only as
 * replays of the same dedup keys, never a loss.
 */
import { afterAll, beforeAll, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { Kafka, logLevel, type Admin } from "kafkajs";
import { createStreamTable, enableOutbox, writeV1Inline } from "../fixtures/outbox.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { eventually, RunningRelay } from "../helpers/relay.ts";
import { KAFKA_BROKERS, requireServer, SERVER_ADDRESSES } from "../helpers/servers.ts";
import { topicDedupKeys } from "../helpers/kafka.ts";

const RUN = `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`;
const topic = `relayoutage.${RUN}.orders`;
const client = new Kafka({ clientId: "kafka-outage-test", brokers: KAFKA_BROKERS, logLevel: logLevel.NOTHING });
let admin: Admin;
let db: TestDatabase;
let outboxTable = "";
let relay: RunningRelay | undefined;

const cmdline = (pid: number) => {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").replace(/\0/g, " ");
  } catch {
    return "";
  }
};

/**
 * The pid of the Kafka broker listening on the test port: from `ss` (any clone may have started
 * it), else from this clone's .services pid file; it must be a kafka.Kafka JVM either way.
 */
function brokerPid(): number {
  const port = SERVER_ADDRESSES.kafka.port;
  const candidates: number[] = [];
  const ss = Bun.spawnSync(["ss", "-Hltnp", `sport = :${port}`]);
  const m = /pid=(\d+)/.exec(ss.stdout.toString());
  if (m) candidates.push(Number(m[1]));
  try {
    candidates.push(Number(readFileSync(new URL("../../.services/kafka/kafka.pid", import.meta.url), "utf8").trim()));
  } catch {}
  const pid = candidates.find((p) => p > 0 && cmdline(p).includes("kafka.Kafka"));
  if (!pid) throw new Error(`no kafka.Kafka process found listening on 127.0.0.1:${port} (ss said: ${ss.stdout.toString().trim() || ss.stderr.toString().trim()})`);
  return pid;
}

beforeAll(async () => {
  await requireServer("kafka");
  await requireServer("postgres");
  admin = client.admin();
  await admin.connect();
  db = await testDatabase("kafka_outage");
  await createStreamTable(db.sql, "public.koutage", "id int primary key");
  ({ outboxTable } = await enableOutbox(db.sql, "public.koutage"));
  const sink = {
    type: "kafka",
    brokers: KAFKA_BROKERS.join(","),
    topic,
    create_topic: true,
    // A frozen broker accepts connections (the kernel does) but never answers: short timeouts
    // turn that into errors the pipeline retries, rather than a hang.
    connection_timeout_ms: 1000,
    request_timeout_ms: 3000,
  };
  await db.sql`SELECT pgtrickle.set_relay_outbox('k_outage', 'public.koutage', NULL, ${db.sql.json(sink as never)})`;
});

afterAll(async () => {
  if (relay && relay.proc.exitCode === null) await relay.stop("SIGKILL");
  if (admin) {
    await admin.deleteTopics({ topics: [topic] }).catch(() => {});
    const groups = (await admin.listGroups().catch(() => ({ groups: [] as { groupId: string }[] }))).groups
      .map((g) => g.groupId)
      .filter((g) => g.startsWith(`relayoutage-${RUN}-`));
    if (groups.length) await admin.deleteGroups(groups).catch(() => {});
    await admin.disconnect();
  }
  await db?.drop();
});

/** Every pgt_dedup_key header in the topic so far (duplicates kept), read from the beginning. */
const topicKeys = (expected: number) => topicDedupKeys(client, topic, expected, `relayoutage-${RUN}`);

const keysOf = (ids: string[]) => ids.map((id) => `${outboxTable}:${id}:0`);
const write = async (ids: string[], from: number, to: number) => {
  for (let i = from; i <= to; i++) ids.push(await writeV1Inline(db.sql, outboxTable, { inserted: [{ id: i }], deleted: [] }));
};

test("a frozen Kafka broker (SIGSTOP) degrades the pipeline; after SIGCONT every row arrives", async () => {
  relay = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0"]);
  await relay.waitForLog(/\[k_outage\] started/, 30_000);
  const ids: string[] = [];
  await write(ids, 1, 5);
  await eventually(async () => new Set(await topicKeys(5)).size >= 5, 40_000, "the first rows in the topic");

  const pid = brokerPid();
  process.kill(pid, "SIGSTOP");
  try {
    await write(ids, 6, 15);
    await relay.waitForLog(/\[k_outage\][^\n]*degraded, will retry/, 45_000);
  } finally {
    process.kill(pid, "SIGCONT");
  }

  const want = keysOf(ids);
  let keys: string[] = [];
  await eventually(
    async () => {
      keys = await topicKeys(want.length);
      return want.every((k) => keys.includes(k));
    },
    60_000,
    "every row in the topic after the broker thawed",
  ).catch((err) => {
    throw new Error(`${err.message}: missing ${want.filter((k) => !keys.includes(k)).join(", ")}\n${relay!.stderr.slice(-3000)}`);
  });
  // No stranger records: anything beyond the rows written is a replay of one of them.
  expect(keys.filter((k) => !want.includes(k))).toEqual([]);
  await relay.waitForLog(/\[k_outage\][^\n]*recovered/, 30_000);
}, 180_000);
