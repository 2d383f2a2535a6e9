/**
 * Kafka source against the real single-node KRaft broker of scripts/services (127.0.0.1:9092) and
 * PostgreSQL: reverse pipelines registered with pgtrickle.set_relay_inbox, run by the relay's own
 * `drain` / `run` commands, checked in the inbox table and in the group's committed offsets.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { AssignerProtocol, Kafka, logLevel, type Admin, type Producer } from "kafkajs";
import * as v from "valibot";
import kafkaSink from "../../src/backends/kafka/sink.ts";
import kafkaSource from "../../src/backends/kafka/source.ts";
import { convertKafkaRecord } from "../../src/backends/kafka/records.ts";
import type { BackendContext } from "../../src/backends/types.ts";
import { log } from "../../src/observe/log.ts";
import { backendContext } from "../helpers/backend.ts";
import { forwardMessages } from "../helpers/messages.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { freePort } from "../helpers/proxy.ts";
import { eventually, RunningRelay } from "../helpers/relay.ts";
import { deadLetters, drainPipeline, enableOnly, inboxCount, inboxRows, killRelays, pickyInbox, setRelayInbox, type InboxRow } from "../helpers/reverse.ts";
import { KAFKA_BROKERS, requireServer } from "../helpers/servers.ts";

const RUN = `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`;
const TIMEOUT = 120_000;

let db: TestDatabase;
const client = new Kafka({ clientId: "kafka-source-test", brokers: KAFKA_BROKERS, logLevel: logLevel.NOTHING });
let admin: Admin;
let producer: Producer;
const running: RunningRelay[] = [];

beforeAll(async () => {
  await requireServer("kafka");
  await requireServer("postgres");
  db = await testDatabase("kafka_source");
  admin = client.admin();
  await admin.connect();
  producer = client.producer();
  await producer.connect();
});

afterAll(async () => {
  await killRelays(running);
  await producer?.disconnect();
  if (admin) {
    const groups = (await admin.listGroups()).groups.map((g) => g.groupId).filter((g) => g.startsWith(`relaysrc-${RUN}-`));
    if (groups.length) await admin.deleteGroups(groups).catch(() => {});
    const mine = (await admin.listTopics()).filter((t) => t.startsWith(`relaysrc.${RUN}.`));
    if (mine.length) await admin.deleteTopics({ topics: mine }).catch(() => {});
    await admin.disconnect();
  }
  await db?.drop();
});

async function newTopic(label: string, partitions = 1): Promise<string> {
  const topic = `relaysrc.${RUN}.${label}`;
  await admin.createTopics({ topics: [{ topic, numPartitions: partitions }], waitForLeaders: true });
  return topic;
}

/** The consumer group of pipeline `name`: unique per run, so runs sharing the broker never meet. */
const groupOf = (name: string) => `relaysrc-${RUN}-${name}`;

/** A reverse pipeline `name` → inbox `<name>_inbox`, consuming `topic`. */
async function pipeline(name: string, topic: string, options: Record<string, unknown> = {}): Promise<string> {
  const source = { type: "kafka", brokers: KAFKA_BROKERS.join(","), topic, group_id: groupOf(name), ...options };
  await setRelayInbox(db, name, `${name}_inbox`, source);
  return `${name}_inbox`;
}

const drain = (name: string, timeoutSecs = 90, extra: string[] = []) => drainPipeline(db, name, ["--timeout", String(timeoutSecs), ...extra]);

/** partition → [committed offset of the group, high watermark]. */
async function offsets(group: string, topic: string): Promise<Map<number, [string, string]>> {
  const [committed] = await admin.fetchOffsets({ groupId: group, topics: [topic] });
  const highs = await admin.fetchTopicOffsets(topic);
  return new Map(highs.map((h) => [h.partition, [committed!.partitions.find((p) => p.partition === h.partition)!.offset, h.high]]));
}

/** Records not yet committed by the group, over all partitions (an empty partition needs no commit). */
async function uncommitted(group: string, topic: string): Promise<number> {
  let n = 0;
  for (const [, [committed, high]] of await offsets(group, topic)) n += Number(high) - Math.max(0, Number(committed));
  return n;
}

/** Every partition's committed offset is its high watermark: nothing left unacknowledged. */
async function expectAllCommitted(group: string, topic: string): Promise<void> {
  for (const [partition, [committed, high]] of await offsets(group, topic)) {
    expect({ partition, committed: high === "0" && committed === "-1" ? "0" : committed }).toEqual({ partition, committed: high });
  }
}

const TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

describe("kafka source: mapping, acknowledgement, redelivery", () => {
  test("N records → N inbox rows with the right columns; offsets committed per partition; replays leave N rows", async () => {
    const topic = await newTopic("columns", 3);
    const inbox = await pipeline("kcols", topic, { batch_size: 25 });
    const N = 240;
    // Explicit partitions, one send: offsets within a partition follow the order below.
    const nextOffset = [0, 0, 0];
    const expected = new Map<string, Partial<InboxRow>>();
    const records = Array.from({ length: N }, (_, i) => {
      const partition = i % 3;
      const offset = nextOffset[partition]!++;
      const synthesized = `kafka:${topic}:${partition}:${offset}`;
      switch (i % 6) {
        case 0:
          expected.set(`ext-${i}`, { event_type: topic, aggregate_id: null, payload: { i } });
          return { partition, value: JSON.stringify({ i }), headers: { pgt_dedup_key: `ext-${i}` } };
        case 1:
          expected.set(`idem-${i}`, { event_type: topic, payload: { i } });
          return { partition, value: JSON.stringify({ i }), headers: { "Idempotency-Key": `idem-${i}` } };
        case 2:
          expected.set(synthesized, { event_type: "order.created", aggregate_id: `agg-${i}`, source: `kafka:${topic}`, payload: { i } });
          return { partition, key: `agg-${i}`, value: JSON.stringify({ i }), headers: { "event-type": "order.created" } };
        case 3:
          expected.set(synthesized, { event_type: "shipped", aggregate_id: "42", source: "shop", trace_id: "4bf92f3577b34da6a3ce929d0e0e4736" });
          return {
            partition,
            key: "ignored-key",
            value: JSON.stringify({ i, event_type: "shipped", aggregate_id: 42, source: "shop" }),
            headers: { traceparent: TRACEPARENT, "event-type": "loses-to-body" },
          };
        case 4:
          expected.set(synthesized, { event_type: topic, payload: `plain text ${i}`, trace_id: null });
          return { partition, value: `plain text ${i}` };
        default:
          expected.set(synthesized, { event_type: topic, payload: { base64: Buffer.from([0xff, 0xfe, i]).toString("base64") } });
          return { partition, value: Buffer.from([0xff, 0xfe, i]) };
      }
    });
    await producer.send({ topic, messages: records });

    const result = await drain("kcols");
    expect(result.stderr).toContain(`kcols (reverse): drained, ${N} delivered, 0 dead-lettered`);
    expect(result.exitCode).toBe(0);
    const got = await inboxRows(db, inbox);
    expect(got.length).toBe(N);
    for (const row of got) {
      const want = expected.get(row.event_id);
      expect(want).toBeDefined();
      expect(row).toMatchObject(want!);
      if (!("source" in want!)) expect(row.source).toBe(`kafka:${topic}`);
    }
    await expectAllCommitted(groupOf("kcols"), topic);

    // Redelivery: the group starts over from the beginning; every record keeps its key.
    await admin.resetOffsets({ groupId: groupOf("kcols"), topic, earliest: true });
    expect((await offsets(groupOf("kcols"), topic)).get(0)![0]).toBe("-2"); // "earliest"
    expect((await drain("kcols")).exitCode).toBe(0);
    expect(await inboxCount(db, inbox)).toBe(N);
    await expectAllCommitted(groupOf("kcols"), topic);

    // A producer retry: the same events sent again (new offsets, same dedup headers).
    const retried = records.filter((_, i) => i % 6 <= 1);
    await producer.send({ topic, messages: retried });
    const again = await drain("kcols");
    expect(again.stderr).toContain(`drained, ${retried.length} delivered`);
    expect(await inboxCount(db, inbox)).toBe(N);
    await expectAllCommitted(groupOf("kcols"), topic);
  }, TIMEOUT);

  test("round trip: records written by this relay's Kafka sink keep their original dedup keys", async () => {
    const topic = `relaysrc.${RUN}.roundtrip`;
    const sink = kafkaSink.create(v.parse(kafkaSink.config, { brokers: KAFKA_BROKERS, topic, create_topic: true, num_partitions: 2, key_field: "customer" }), ctx("forward"));
    const sent = forwardMessages(40);
    try {
      await sink.start();
      expect(await sink.write(sent)).toEqual([]);
    } finally {
      await sink.close();
    }
    const inbox = await pipeline("kround", topic, { batch_size: 15 });
    expect((await drain("kround")).exitCode).toBe(0);
    const got = await inboxRows(db, inbox);
    expect(got.map((r) => r.event_id).sort()).toEqual(sent.map((m) => m.dedup_key).sort());
    const byKey = new Map(sent.map((m) => [m.dedup_key, m]));
    for (const row of got) {
      const m = byKey.get(row.event_id)!;
      // The body is the envelope; with no aggregate_id in it the record key (key_field) is used.
      expect(row.payload).toEqual(JSON.parse(JSON.stringify({ dedup_key: m.dedup_key, subject: m.subject, payload: m.payload, op: m.op, is_full_refresh: false, outbox_id: m.outbox_id, refresh_id: null })));
      expect(row.aggregate_id).toBe((m.payload as { customer: string }).customer);
    }
  }, TIMEOUT);

  test("a tombstone and a value the inbox refuses go to relay_dead_letters; the rest land and everything is committed", async () => {
    const topic = await newTopic("poison");
    const inbox = await pipeline("kpoison", topic, { batch_size: 50 });
    await pickyInbox(db, inbox);
    await producer.send({
      topic,
      messages: [
        ...Array.from({ length: 5 }, (_, i) => ({ value: JSON.stringify({ good: i }) })),
        { key: "deleted-entity", value: null }, // offset 5
        { value: JSON.stringify({ good: 5 }) },
        { value: JSON.stringify({ bad: true }) }, // offset 7: the inbox's CHECK refuses it
        ...Array.from({ length: 2 }, (_, i) => ({ value: JSON.stringify({ good: 6 + i }) })),
      ],
    });
    const result = await drain("kpoison", 90, ["--allow-dead-letters"]);
    expect(result.exitCode).toBe(0);
    expect(await inboxCount(db, inbox)).toBe(8);
    const letters = await deadLetters(db, "kpoison");
    expect(letters.map((d) => [d.dedup_key, d.error_kind])).toEqual([
      [`kafka:${topic}:0:5`, "decode"],
      [`kafka:${topic}:0:7`, "inbox_permanent"],
    ]);
    expect(letters[0]!.error).toContain("tombstone");
    await expectAllCommitted(groupOf("kpoison"), topic);
  }, TIMEOUT);

  test("auto_offset_reset latest skips what was there before the first start, but not what arrives between runs", async () => {
    const topic = await newTopic("latest");
    await producer.send({ topic, messages: [{ value: JSON.stringify({ old: 1 }) }, { value: JSON.stringify({ old: 2 }) }] });
    const inbox = await pipeline("klatest", topic, { auto_offset_reset: "latest" });
    expect((await drain("klatest")).exitCode).toBe(0);
    expect(await inboxCount(db, inbox)).toBe(0);
    // Produced while no relay runs: the start position was committed by the first run.
    await producer.send({ topic, messages: [{ value: JSON.stringify({ fresh: 1 }) }, { value: JSON.stringify({ fresh: 2 }) }] });
    expect((await drain("klatest")).exitCode).toBe(0);
    expect((await inboxRows(db, inbox)).map((r) => r.payload)).toEqual([{ fresh: 1 }, { fresh: 2 }]);
    await expectAllCommitted(groupOf("klatest"), topic);
  }, TIMEOUT);
});

describe("kafka source: crashes and rebalances", () => {
  test("a batch held past the rebalance timeout: its commit is refused, the partition's new owner redelivers it, N rows", async () => {
    const topic = await newTopic("held");
    const name = "khold";
    const group = groupOf(name);
    const inbox = await pipeline(name, topic, { batch_size: 100, session_timeout_ms: 6000, heartbeat_interval_ms: 500, rebalance_timeout_ms: 6000, max_wait_ms: 200 });
    await producer.send({ topic, messages: [...Array.from({ length: 20 }, (_, i) => ({ value: JSON.stringify({ n: i }) })), { value: null }] });
    await enableOnly(db, name);
    const waitingForLock = async () => {
      const [row] = await db.sql`SELECT count(*)::int AS n FROM pg_locks WHERE NOT granted AND relation = 'pgtrickle.relay_dead_letters'::regclass`;
      return (row as { n: number }).n;
    };
    const locker = await db.sql.reserve();
    await locker`BEGIN`;
    await locker`LOCK TABLE pgtrickle.relay_dead_letters IN EXCLUSIVE MODE`;
    const a = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0", "--relay-group-id", `ha${RUN}`]);
    running.push(a);
    let b: RunningRelay | undefined;
    let locked = true;
    try {
      // A has written the batch to the inbox and waits (holding the partition) before its commit.
      await eventually(async () => (await inboxCount(db, inbox)) === 20 && (await waitingForLock()) === 1, 30_000, "relay A to hold its batch");
      b = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0", "--relay-group-id", `hb${RUN}`]);
      running.push(b);
      // A cannot rejoin while it holds the batch: after rebalance_timeout_ms the group goes on
      // without it and B, the partition's new owner, fetches the same records (and waits too).
      await eventually(async () => (await waitingForLock()) === 2, 40_000, "relay B to take over the partition and reach the same point");
      await locker`ROLLBACK`;
      locked = false;
      await eventually(async () => (await uncommitted(group, topic)) === 0, 30_000, "the partition to be committed");
      await eventually(() => /offsets for 21 records not committed \((UNKNOWN_MEMBER_ID|ILLEGAL_GENERATION|REBALANCE_IN_PROGRESS)/.test(a.stderr), 10_000, "relay A to report its refused commit");
      expect(await inboxCount(db, inbox)).toBe(20);
      expect((await deadLetters(db, name)).map((d) => [d.dedup_key, d.attempts])).toEqual([[`kafka:${topic}:0:20`, 2]]);
      expect(await a.stop("SIGTERM")).toBe(0);
      expect(await b.stop("SIGTERM")).toBe(0);
      await expectAllCommitted(group, topic);
    } finally {
      if (locked) await locker`ROLLBACK`;
      locker.release();
      for (const r of [a, b]) if (r && r.proc.exitCode === null) await r.stop("SIGKILL");
    }
  }, TIMEOUT);

  test("a second relay joining the group and the first one leaving mid-stream: exactly N rows, every partition committed", async () => {
    const topic = await newTopic("rebalance", 4);
    const name = "krebal";
    const group = groupOf(name);
    const inbox = await pipeline(name, topic, { batch_size: 10, session_timeout_ms: 6000, heartbeat_interval_ms: 500, rebalance_timeout_ms: 10000, max_wait_ms: 200 });
    await enableOnly(db, name);
    let sent = 0;
    /** `n` records, round-robin over the partitions, 5 per send with a pause between sends. */
    const produce = async (n: number, pauseMs: number) => {
      for (let i = 0; i < n; i += 5) {
        await producer.send({ topic, messages: Array.from({ length: 5 }, () => ({ partition: sent % 4, value: JSON.stringify({ seq: sent++ }) })) });
        if (pauseMs) await Bun.sleep(pauseMs);
      }
    };
    /** Members of the group that hold partitions, once it is stable. */
    const stableMembers = async () => {
      const [g] = (await admin.describeGroups([group])).groups;
      if (!g || g.state !== "Stable") return -1;
      return g.members.filter((m) => (AssignerProtocol.MemberAssignment.decode(m.memberAssignment)?.assignment[topic]?.length ?? 0) > 0).length;
    };
    const published = async (relay: RunningRelay) => {
      const url = /metrics and health on (http:\/\/\S+)/.exec(relay.stderr)?.[1];
      if (!url) return 0;
      const text = await (await fetch(`${url}/metrics`)).text();
      return Number(/pgtrickle_relay_messages_published_total\{[^}]*pipeline="krebal"[^}]*\} (\d+)/.exec(text)?.[1] ?? 0);
    };
    await produce(100, 0);
    // Two relay groups share the database, so both run the pipeline: Kafka splits the partitions.
    const a = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0", "--relay-group-id", `a${RUN}`]);
    running.push(a);
    let b: RunningRelay | undefined;
    try {
      await eventually(async () => (await inboxCount(db, inbox)) >= 100, 30_000, "relay A to consume");
      b = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0", "--relay-group-id", `b${RUN}`]);
      running.push(b);
      // B joins while A is busy: A finishes (and commits) its batch in hand before rejoining.
      await Promise.all([produce(100, 20), eventually(async () => (await stableMembers()) === 2, 40_000, "both relays to hold partitions")]);
      await produce(200, 20);
      await eventually(async () => (await inboxCount(db, inbox)) >= 400, 30_000, "both relays to consume");
      const byA = await published(a);
      const byB = await published(b);
      expect(byA).toBeGreaterThan(100);
      expect(byB).toBeGreaterThan(0);
      // A leaves while records keep coming: its partitions move to B.
      const producing = produce(200, 20);
      await Bun.sleep(300);
      expect(await a.stop("SIGTERM")).toBe(0);
      await producing;
      expect(a.stderr).not.toMatch(/ERROR/);
      await eventually(async () => (await inboxCount(db, inbox)) >= 600, 60_000, "all 600 rows");
      await eventually(async () => (await uncommitted(group, topic)) === 0, 30_000, "every partition to be committed");
      expect(await published(b)).toBeGreaterThan(byB);
      expect(await b.stop("SIGTERM")).toBe(0);
      const got = await inboxRows(db, inbox);
      expect(got.length).toBe(600);
      expect(new Set(got.map((r) => (r.payload as { seq: number }).seq)).size).toBe(600);
      await expectAllCommitted(group, topic);
    } finally {
      for (const r of [a, b]) if (r && r.proc.exitCode === null) await r.stop("SIGKILL");
    }
  }, TIMEOUT);
});

describe("kafka source: lag", () => {
  test(
    "lag(): high watermark − committed offset over the group's partitions, read without joining or committing; 0 once drained",
    async () => {
      const topic = await newTopic("lag", 3);
      await producer.send({ topic, messages: Array.from({ length: 30 }, (_, i) => ({ key: `k${i}`, value: JSON.stringify({ i }) })) });
      const cfg = v.parse(kafkaSource.config, { brokers: KAFKA_BROKERS, topic, group_id: groupOf("lag_p") });
      const source = kafkaSource.create(cfg, { ...ctx("reverse"), pipeline: "lag_p" });
      try {
        await source.start();
        // No offset committed yet: counted from where auto_offset_reset (earliest) starts.
        expect(await source.lag!()).toEqual({ rows: 30, seconds: 0 });
        expect(await source.lag!()).toEqual({ rows: 30, seconds: 0 });
        expect(await uncommitted(groupOf("lag_p"), topic)).toBe(30); // nothing was committed by asking
        await pipeline("lag_p", topic);
        const r = await drain("lag_p");
        expect(r.exitCode).toBe(0);
        expect(await inboxCount(db, "lag_p_inbox")).toBe(30);
        expect(await source.lag!()).toEqual({ rows: 0, seconds: 0 });
        await producer.send({ topic, messages: [{ value: "{}" }, { value: "{}" }] });
        expect((await source.lag!())!.rows).toBe(2);
      } finally {
        await source.close();
      }
    },
    TIMEOUT,
  );
});

describe("kafka source: failures and configuration", () => {
  test("an unreachable broker leaves the pipeline degraded (transient), with host:port named and no secret in the output", async () => {
    const port = await freePort();
    const secret = `pw-${RUN}-do-not-print`;
    await pipeline("kdown", "some.topic", {
      brokers: `127.0.0.1:${port}`,
      security_protocol: "SASL_PLAINTEXT",
      sasl_mechanism: "plain",
      sasl_username: "relay",
      sasl_password: secret,
      connection_timeout_ms: 1000,
    });
    const result = await drain("kdown", 6);
    expect(result.exitCode).toBe(1);
    const output = result.stdout + result.stderr;
    expect(output).toMatch(new RegExp(`\\[kdown\\] degraded, will retry: start: kafka connecting on 127\\.0\\.0\\.1:${port}: .*ECONNREFUSED`));
    expect(output).toMatch(/kdown \(reverse\): stopped, 0 delivered/);
    expect(output).not.toContain(secret);
  }, TIMEOUT);

  test("a topic that does not exist: degraded, waiting for it, with the name in the error", async () => {
    await pipeline("kmissing", `relaysrc.${RUN}.never-created`);
    const result = await drain("kmissing", 4);
    expect(result.exitCode).toBe(1);
    expect(result.stderr).toMatch(/\[kmissing\] degraded, will retry: start: kafka topic '.*never-created' not found on 127\.0\.0\.1:9092/);
  }, TIMEOUT);

  test("options are validated with messages naming the key", () => {
    const issue = (options: Record<string, unknown>) => {
      const parsed = v.safeParse(kafkaSource.config, { brokers: KAFKA_BROKERS, topic: "t", ...options });
      return parsed.success ? undefined : parsed.issues.map((i) => i.message).join("; ");
    };
    expect(issue({})).toBeUndefined();
    expect(issue({ topic: undefined })).toContain("topic");
    expect(issue({ topic: ["ok", "not ok"] })).toContain("legal Kafka topic name");
    expect(issue({ auto_offset_reset: "middle" })).toContain("earliest or latest");
    expect(issue({ heartbeat_interval_ms: 30000, session_timeout_ms: 10000 })).toContain("heartbeat_interval_ms must be below session_timeout_ms");
    expect(issue({ security_protocol: "SASL_SSL" })).toContain("needs sasl_mechanism");
    expect(issue({ security_protocol: "SSL", tls: false })).toContain("security_protocol SSL or SASL_SSL is TLS, but tls is false");
    expect(issue({ tls_ca: "/ca.pem" })).toBeUndefined(); // a tls key turns TLS on (docs/TLS.md)
    const parsed = v.parse(kafkaSource.config, { brokers: "a:1, b:2", topic: ["x", "y", "x"], auto_offset_reset: "LATEST" });
    expect(parsed.brokers).toEqual(["a:1", "b:2"]);
    expect(parsed.topic).toEqual(["x", "y"]);
    expect(parsed.auto_offset_reset).toBe("latest");
    expect(parsed.batch_size).toBe(100);
    // One consumer group per pipeline unless group_id says otherwise.
    const source = kafkaSource.create(parsed, { ...ctx("reverse"), pipeline: "orders_in" });
    expect(source.describe).toBe("kafka a:1,b:2 ← x,y (group pgtrickle-relay-orders_in)");
  });

  test("dedup key precedence: dedup header, then the record key only with dedup_from_key, then coordinates", () => {
    const cfg = v.parse(kafkaSource.config, { brokers: KAFKA_BROKERS, topic: "t" });
    const record = (headers: Record<string, string>, key: string | null) => ({ topic: "t", partition: 2, offset: "17", key: key === null ? null : Buffer.from(key), value: Buffer.from("{}"), headers });
    const keyOf = (r: ReturnType<typeof record>, fromKey = false) => {
      const c = convertKafkaRecord(r, { ...cfg, dedup_from_key: fromKey }, "p");
      if (!c.ok) throw new Error("unexpected dead letter");
      return c.message.dedup_key;
    };
    expect(keyOf(record({ pgt_dedup_key: "a", dedup_key: "b", "Idempotency-Key": "c" }, "k"))).toBe("a");
    expect(keyOf(record({ DEDUP_KEY: "b", "idempotency-key": "c" }, "k"))).toBe("b");
    expect(keyOf(record({ "idempotency-key": "c" }, "k"), true)).toBe("c");
    expect(keyOf(record({}, "k"))).toBe("kafka:t:2:17");
    expect(keyOf(record({}, "k"), true)).toBe("k");
    expect(keyOf(record({}, null), true)).toBe("kafka:t:2:17");
  });
});

function ctx(direction: "forward" | "reverse"): BackendContext {
  return backendContext("kafka_source_test", { direction, log: log.withTag("kafka-source-test"), sql: db.sql, postgresUrl: db.url, drain: true });
}
