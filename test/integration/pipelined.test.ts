/**
 * The pipelined data path (docs/PIPELINE.md) under failure, outbox → Redis Streams at full speed
 * with read-ahead active: a SIGKILL while several batches are in flight, and the sink's
 * connection cut in the middle of a run. Every row must arrive, in order per key, nothing
 * skipped; the committed offset never passes what Redis holds. And the proof of ownership folded
 * into the outbox's commit statement.
 */
import { afterAll, beforeAll, expect, test } from "bun:test";
import Redis from "ioredis";
import postgres from "postgres";
import * as v from "valibot";
import outboxSource from "../../src/backends/outbox/source.ts";
import { OutboxSourceConfig } from "../../src/backends/outbox/config.ts";
import type { Batch } from "../../src/backends/types.ts";
import { backendContext } from "../helpers/backend.ts";
import { createStreamTable, enableOutbox, writeClaimCheck } from "../fixtures/outbox.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { tcpProxy } from "../helpers/proxy.ts";
import { eventually, relayOnce, RunningRelay } from "../helpers/relay.ts";
import { portOf, REDIS_URL, requireServer } from "../helpers/servers.ts";
import { PIPELINE_DEPTH } from "../../src/pipeline.ts";

const run = Math.random().toString(36).slice(2, 8);
/** Keys of the stream table: every change set updates each of them once. */
const KEYS = 10;
const BATCH = 100;
let db: TestDatabase;
let redis: Redis;
const streams: string[] = [];

beforeAll(async () => {
  await requireServer("postgres");
  await requireServer("redis");
  db = await testDatabase("pipelined");
  redis = new Redis(REDIS_URL);
});
afterAll(async () => {
  for (const s of streams) await redis?.del(s, `${s}:pgt_dedup`);
  redis?.disconnect();
  await db?.drop();
});

/**
 * `changeSets` outbox rows, each updating every key once (`seq` = the change set's number), and
 * an outbox → Redis pipeline for them with batches of BATCH messages.
 */
async function setup(name: string, changeSets: number, sink: Record<string, unknown>): Promise<{ outboxTable: string; stream: string }> {
  await createStreamTable(db.sql, `public.${name}`, "k int primary key, seq int");
  const { outboxTable } = await enableOutbox(db.sql, `public.${name}`);
  await db.sql.unsafe(`INSERT INTO pgtrickle."${outboxTable}" (inserted_count, payload)
    SELECT ${KEYS}, jsonb_build_object('v', 1, 'deleted', '[]'::jsonb, 'inserted',
      (SELECT jsonb_agg(jsonb_build_object('k', k, 'seq', s)) FROM generate_series(1, ${KEYS}) k))
    FROM generate_series(1, ${changeSets}) s`);
  const stream = `pipelined:${run}:${name}`;
  streams.push(stream);
  await db.sql`SELECT pgtrickle.set_relay_outbox(${name}, ${`public.${name}`}, NULL, ${db.sql.json({ type: "redis", stream_key: stream, ...sink } as never)})`;
  await db.sql`UPDATE pgtrickle.relay_outbox_config
    SET config = jsonb_set(config, '{source}', config->'source' || '{"batch_size": 50, "max_batch_messages": ${db.sql.unsafe(String(BATCH))}}'::jsonb)
    WHERE name = ${name}`;
  return { outboxTable, stream };
}

interface Entry {
  dedup_key: string;
  k: number;
  seq: number;
}

async function entries(stream: string): Promise<Entry[]> {
  const raw = await redis.xrange(stream, "-", "+");
  return raw.map(([, fields]) => {
    const f = new Map<string, string>();
    for (let i = 0; i < fields.length; i += 2) f.set(fields[i]!, fields[i + 1]!);
    const payload = JSON.parse(f.get("payload")!) as { k: number; seq: number };
    return { dedup_key: f.get("dedup_key")!, k: payload.k, seq: payload.seq };
  });
}

/** Per key, the change sets in the order their first copies arrived: 1, 2, … changeSets, nothing skipped. */
function expectInOrderPerKey(list: Entry[], changeSets: number): void {
  const firsts = new Map<number, number[]>();
  const seen = new Set<string>();
  for (const e of list) {
    if (seen.has(e.dedup_key)) continue;
    seen.add(e.dedup_key);
    firsts.set(e.k, [...(firsts.get(e.k) ?? []), e.seq]);
  }
  expect([...firsts.keys()].sort((a, b) => a - b)).toEqual(Array.from({ length: KEYS }, (_, i) => i + 1));
  const expected = Array.from({ length: changeSets }, (_, i) => i + 1);
  for (const seqs of firsts.values()) expect(seqs).toEqual(expected);
}

async function offsetOf(name: string): Promise<bigint> {
  const [row] = await db.sql<{ last: string }[]>`SELECT last_change_id::text AS last FROM pgtrickle.relay_consumer_offsets WHERE pipeline_id = ${name}`;
  return BigInt(row?.last ?? "0");
}

/** The highest outbox id whose every message is in `list`: the offset may never pass it. */
function confirmedThrough(list: Entry[], outboxTable: string, firstId: bigint): bigint {
  const keys = new Set(list.map((e) => e.dedup_key));
  let id = firstId;
  for (;;) {
    for (let i = 0; i < KEYS; i++) if (!keys.has(`${outboxTable}:${id}:${i}`)) return id - 1n;
    id++;
  }
}

async function firstOutboxId(outboxTable: string): Promise<bigint> {
  const [row] = await db.sql.unsafe<{ min: string }[]>(`SELECT min(id)::text AS min FROM pgtrickle."${outboxTable}"`);
  return BigInt(row!.min);
}

const drain = (name: string) => relayOnce(["drain", "--postgres-url", db.url, "--pipeline", name], {}, 120_000);

test("SIGKILL at full speed with several batches in flight: the restart delivers every row exactly once (the sink dedups the replay), in order per key", async () => {
  const name = "p_kill";
  const changeSets = 3000;
  const { outboxTable, stream } = await setup(name, changeSets, { url: REDIS_URL, dedup_window_seconds: 3600 });
  // Only this pipeline: the database holds the other test's too.
  await db.sql`UPDATE pgtrickle.relay_outbox_config SET enabled = (name = ${name})`;
  const relay = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0", "--log-level", "trace"]);
  try {
    // The proof that batches overlap: the reader logs how many are in flight.
    await relay.waitForLog(new RegExp(`read ahead: ${PIPELINE_DEPTH} batch\\(es\\) in flight`), 60_000);
    await eventually(async () => (await redis.xlen(stream)) >= 5_000, 60_000, "5,000 messages in Redis");
  } finally {
    await relay.stop("SIGKILL");
  }
  const before = await redis.xlen(stream);
  expect(before).toBeLessThan(changeSets * KEYS);
  const offset = await offsetOf(name);
  expect(offset).toBeLessThanOrEqual(confirmedThrough(await entries(stream), outboxTable, await firstOutboxId(outboxTable)));

  const result = await drain(name);
  expect(result.exitCode).toBe(0);
  const list = await entries(stream);
  expect(list.length).toBe(changeSets * KEYS); // the dedup window dropped every re-sent message
  expect(new Set(list.map((e) => e.dedup_key)).size).toBe(changeSets * KEYS);
  expectInOrderPerKey(list, changeSets);
  const [top] = await db.sql.unsafe<{ max: string }[]>(`SELECT max(id)::text AS max FROM pgtrickle."${outboxTable}"`);
  expect(await offsetOf(name)).toBe(BigInt(top!.max));
}, 180_000);

test("the sink's connection frozen mid-run: the offset never passes what Redis holds, and once it is back every row arrives in order per key", async () => {
  const name = "p_cut";
  const changeSets = 3000;
  const proxy = await tcpProxy(portOf(REDIS_URL));
  const { outboxTable, stream } = await setup(name, changeSets, { url: `redis://127.0.0.1:${proxy.port}` });
  await db.sql`UPDATE pgtrickle.relay_outbox_config SET enabled = (name = ${name})`;
  const firstId = await firstOutboxId(outboxTable);
  const relay = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0", "--io-timeout", "10"]);
  try {
    await eventually(async () => (await redis.xlen(stream)) >= 5_000, 60_000, "5,000 messages in Redis");
    // Silent from now on, nothing closed: whatever the relay writes after this never reaches Redis.
    proxy.freeze();
    // The sink's own timeout (command_timeout_ms, 5 s by default) comes before the watchdog's 10 s.
    await relay.waitForLog(/degraded, will retry: sink.*XADD got no reply within 5000 ms/, 60_000);
    // While the sink is unreachable: read the offset repeatedly; it never passes the messages Redis holds.
    for (let i = 0; i < 10; i++) {
      const offset = await offsetOf(name);
      expect(offset).toBeLessThanOrEqual(confirmedThrough(await entries(stream), outboxTable, firstId));
      await Bun.sleep(200);
    }
    const held = await redis.xlen(stream);
    expect(held).toBeLessThan(changeSets * KEYS);
    proxy.thaw(); // new connections work again: the watchdog rebuilds the sink's client (--io-timeout)
    await eventually(async () => (await offsetOf(name)) >= firstId + BigInt(changeSets - 1), 90_000, "the offset to reach the last row");
    await relay.waitForLog(/recovered/, 10_000);
  } finally {
    await relay.stop("SIGKILL");
    await proxy.stop();
  }
  const list = await entries(stream);
  const unique = new Set(list.map((e) => e.dedup_key)).size;
  expect(unique).toBe(changeSets * KEYS);
  // Plain XADD: a batch frozen in the middle is written again whole; nothing beyond the batches in flight.
  expect(list.length - unique).toBeLessThanOrEqual(BATCH * PIPELINE_DEPTH);
  expectInOrderPerKey(list, changeSets);
}, 180_000);

test("the outbox commit carries the proof of ownership: refused (nothing written) unless the named backend holds the pipeline's lock", async () => {
  const name = "p_owner";
  await createStreamTable(db.sql, `public.${name}`, "k int primary key, seq int");
  const { outboxTable } = await enableOutbox(db.sql, `public.${name}`);
  await db.sql.unsafe(`INSERT INTO pgtrickle."${outboxTable}" (inserted_count, payload) VALUES (1, '{"v":1,"inserted":[{"k":1,"seq":1}],"deleted":[]}')`);
  const source = outboxSource.create(v.parse(OutboxSourceConfig, { outbox: `public.${name}` }), backendContext(name, { sql: db.sql, drain: true }));
  // The lock's own session: a separate connection, as the coordinator's is.
  const lockSession = postgres(db.url, { max: 1, onnotice: () => {} });
  try {
    await source.start();
    const batches: Batch[] = [];
    for await (const b of source.batches(new AbortController().signal)) batches.push(b);
    expect(batches.map((b) => b.messages.length)).toEqual([1]);
    const [session] = await lockSession<{ pid: number }[]>`SELECT pg_backend_pid() AS pid`;
    const owner = { pid: session!.pid, groupId: "test", pipeline: name };
    const offset = async () => (await db.sql<{ last: string }[]>`SELECT last_change_id::text AS last FROM pgtrickle.relay_consumer_offsets WHERE relay_group_id = 'test' AND pipeline_id = ${name}`)[0]?.last ?? null;

    expect(await batches[0]!.ack(owner)).toBe(false); // the session does not hold the lock (yet)
    expect(await offset()).toBeNull();
    await lockSession`SELECT pg_advisory_lock(hashtext('test'), hashtext(${name}))`;
    expect(await batches[0]!.ack({ ...owner, pipeline: "another" })).toBe(false); // another pipeline's lock proves nothing
    expect(await batches[0]!.ack(owner)).toBe(true);
    const [top] = await db.sql.unsafe<{ max: string }[]>(`SELECT max(id)::text AS max FROM pgtrickle."${outboxTable}"`);
    expect(await offset()).toBe(top!.max);
  } finally {
    await source.close();
    await lockSession.end();
  }
});

test("inside a claim-check change set the position is saved with the same proof of ownership: refused (nothing written) unless the named backend holds the lock", async () => {
  const name = "p_owner_within";
  await createStreamTable(db.sql, `public.${name}`, "k int primary key");
  const { outboxTable, deltaTable } = await enableOutbox(db.sql, `public.${name}`);
  const rows = [1, 2, 3, 4, 5].map((k) => ({ op: "INSERT" as const, data: { k } }));
  const id = await writeClaimCheck(db.sql, outboxTable, deltaTable, rows);
  const source = outboxSource.create(v.parse(OutboxSourceConfig, { outbox: `public.${name}`, max_batch_messages: 2 }), backendContext(name, { sql: db.sql, drain: true }));
  const lockSession = postgres(db.url, { max: 1, onnotice: () => {} });
  try {
    await source.start();
    const batches: Batch[] = [];
    for await (const b of source.batches(new AbortController().signal)) batches.push(b);
    expect(batches.map((b) => b.messages.length)).toEqual([2, 2, 1]);
    const [session] = await lockSession<{ pid: number }[]>`SELECT pg_backend_pid() AS pid`;
    const owner = { pid: session!.pid, groupId: "test", pipeline: name };
    const position = async () =>
      (await db.sql<{ position: string }[]>`SELECT position FROM pgtrickle.relay_source_positions WHERE relay_group_id = 'test' AND pipeline = ${name}`)[0]?.position ?? null;

    expect(await batches[0]!.ack(owner)).toBe(false); // the session does not hold the lock (yet)
    expect(await position()).toBeNull();
    await lockSession`SELECT pg_advisory_lock(hashtext('test'), hashtext(${name}))`;
    expect(await batches[0]!.ack({ ...owner, pipeline: "another" })).toBe(false);
    expect(await position()).toBeNull();
    expect(await batches[0]!.ack(owner)).toBe(true);
    expect(JSON.parse((await position())!)).toEqual({ outbox: outboxTable, outbox_id: id, delivered: 2 });
    expect(await batches[1]!.ack(owner)).toBe(true);
    expect(JSON.parse((await position())!)).toEqual({ outbox: outboxTable, outbox_id: id, delivered: 4 });
    expect(await batches[2]!.ack(owner)).toBe(true); // the change set is done: offset moves, position cleared
    expect(await position()).toBe("null");
  } finally {
    await source.close();
    await lockSession.end();
  }
});
