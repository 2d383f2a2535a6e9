// Section numbers (§…) in test names refer to docs/interface.md.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { createConsola } from "consola";
import { Redis } from "ioredis";
import * as v from "valibot";
import redisSink from "../../src/backends/redis/sink.ts";
import redisSource from "../../src/backends/redis/source.ts";
import { RedisSinkConfig, RedisSourceConfig } from "../../src/backends/redis/config.ts";
import type { Batch, BackendContext, Source } from "../../src/backends/types.ts";
import { backendContext, errorOf } from "../helpers/backend.ts";
import { forwardMessages } from "../helpers/messages.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { expectPoisonIsolated, poisonedStream } from "../helpers/poison.ts";
import { freePort, freezingProxy, tcpProxy } from "../helpers/proxy.ts";
import { eventually, RunningRelay } from "../helpers/relay.ts";
import { drainPipeline, inboxCount, inboxRows, setRelayInbox } from "../helpers/reverse.ts";
import { REDIS_URL, requireServer, SERVER_ADDRESSES } from "../helpers/servers.ts";

const RUN = `${process.pid}_${Math.floor(Math.random() * 1e6)}`;
const PREFIX = `rs:${RUN}`;
const TRACE = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACEPARENT = `00-${TRACE}-00f067aa0ba902b7-01`;
const GROUP = "pgtrickle-relay";

let db: TestDatabase;
let r: Redis;
const sources: Source[] = [];

beforeAll(async () => {
  await requireServer("redis");
  await requireServer("postgres");
  db = await testDatabase("redis_source");
  r = new Redis(REDIS_URL);
});

afterAll(async () => {
  for (const s of sources) await s.close();
  if (r) {
    let cursor = "0";
    do {
      const [next, keys] = await r.scan(cursor, "MATCH", `${PREFIX}*`, "COUNT", 1000);
      cursor = next;
      if (keys.length) await r.del(...keys);
    } while (cursor !== "0");
    r.disconnect();
  }
  await db?.drop();
});

async function xadd(key: string, fields: Record<string, string | Buffer>): Promise<string> {
  return (await r.xadd(key, "*", ...Object.entries(fields).flat()))!;
}

async function pipeline(name: string, inbox: string, source: Record<string, unknown>, database: TestDatabase = db): Promise<void> {
  await setRelayInbox(database, name, inbox, { type: "redis", url: REDIS_URL, ...source });
}

const drain = (name: string, extra: string[] = [], database: TestDatabase = db) => drainPipeline(database, name, extra);

/** Entries read by the group and not yet acknowledged, in total and per consumer. */
async function pending(key: string, group = GROUP): Promise<{ total: number; byConsumer: Record<string, number> }> {
  const [total, , , consumers] = (await r.xpending(key, group)) as [number, string | null, string | null, [string, string][] | null];
  return { total, byConsumer: Object.fromEntries((consumers ?? []).map(([c, n]) => [c, Number(n)])) };
}

function ctxFor(pipelineName: string, drainMode: boolean): BackendContext {
  return backendContext(pipelineName, { direction: "reverse", log: createConsola({ level: 0 }), sql: db.sql, postgresUrl: db.url, drain: drainMode });
}

function sourceFor(options: Record<string, unknown>, drainMode = true, name = `direct_${RUN}`): Source {
  const cfg = v.parse(RedisSourceConfig, { type: "redis", url: REDIS_URL, ...options });
  const source = redisSource.create(cfg, ctxFor(name, drainMode));
  sources.push(source);
  return source;
}

/** Every batch until the iteration ends (drain mode), acknowledging each. */
async function drainDirect(source: Source): Promise<Batch[]> {
  const out: Batch[] = [];
  for await (const b of source.batches(new AbortController().signal)) {
    out.push(b);
    await b.ack();
  }
  return out;
}

describe("redis source → inbox (set_relay_inbox, drain)", () => {
  test("every entry lands once with the §6.6 columns; a re-read group and a producer retry add nothing", async () => {
    const key = `${PREFIX}:basic`;
    const ids: string[] = [];
    // Keyed entries, the event in `payload` (as the relay's sink writes them), trace context as a field.
    for (let i = 0; i < 100; i++) {
      ids.push(
        await xadd(key, {
          pgt_dedup_key: `order-${i}`,
          event_type: "order.created",
          payload: JSON.stringify({ aggregate_id: `ord-${i}`, amount: i }),
          ...(i % 2 === 0 ? { traceparent: TRACEPARENT } : {}),
        }),
      );
    }
    for (let i = 0; i < 50; i++) ids.push(await xadd(key, { dedup_key: `legacy-${i}`, payload: JSON.stringify({ n: i, event_type: "body.type" }) }));
    // No key and no `payload`: the fields are the event; the key comes from the entry id.
    for (let i = 0; i < 50; i++) ids.push(await xadd(key, { amount: String(i), aggregate_id: `agg-${i}`, trace_id: `t-${i}` }));
    const textId = await xadd(key, { payload: "plain text, not json" });
    const binId = await xadd(key, { payload: Buffer.from([0xff, 0xfe, 0x00, 0x41]) });

    await pipeline("redis_basic", "redis_basic_inbox", { stream_key: key, batch_size: 64 });
    const res = await drain("redis_basic");
    expect(res.stderr).toContain("drained, 202 delivered, 0 dead-lettered");
    expect(res.exitCode).toBe(0);

    const all = await inboxRows(db, "redis_basic_inbox");
    expect(all.length).toBe(202);
    const byId = Object.fromEntries(all.map((row) => [row.event_id, row]));
    expect(byId["order-0"]).toEqual({
      event_id: "order-0",
      event_type: "order.created",
      source: `redis:${key}`,
      aggregate_id: "ord-0",
      payload: { aggregate_id: "ord-0", amount: 0 },
      trace_id: TRACE,
    });
    expect(byId["order-1"]!.trace_id).toBeNull();
    expect(byId["legacy-3"]).toMatchObject({ event_type: "body.type", payload: { n: 3, event_type: "body.type" } });
    expect(byId[`redis:${key}:${ids[150]}`]).toEqual({
      event_id: `redis:${key}:${ids[150]}`,
      event_type: key,
      source: `redis:${key}`,
      aggregate_id: "agg-0",
      payload: { amount: "0", aggregate_id: "agg-0", trace_id: "t-0" },
      trace_id: "t-0",
    });
    expect(byId[`redis:${key}:${textId}`]!.payload).toBe("plain text, not json");
    expect(byId[`redis:${key}:${binId}`]!.payload).toEqual({ base64: Buffer.from([0xff, 0xfe, 0x00, 0x41]).toString("base64") });
    expect(await pending(key)).toEqual({ total: 0, byConsumer: {} });
    expect((await drain("redis_basic")).stderr).toContain("drained, 0 delivered");

    // Redelivery: the group is moved back to the start; every entry keeps its key.
    await r.call("XGROUP", "SETID", key, GROUP, "0");
    expect((await drain("redis_basic")).stderr).toContain("drained, 202 delivered");
    expect(await inboxRows(db, "redis_basic_inbox")).toEqual(all);

    // A producer retrying the first 50 appends them again: new entries, same keys.
    for (let i = 0; i < 50; i++) {
      await xadd(key, { pgt_dedup_key: `order-${i}`, event_type: "order.created", payload: JSON.stringify({ aggregate_id: `ord-${i}`, amount: i }) });
    }
    expect((await drain("redis_basic")).stderr).toContain("drained, 50 delivered");
    expect(await inboxCount(db, "redis_basic_inbox")).toBe(202);
    expect(await pending(key)).toEqual({ total: 0, byConsumer: {} });
  }, 60_000);

  test("what this relay's redis sink wrote comes back with its original dedup keys and row payloads", async () => {
    const key = `${PREFIX}:roundtrip`;
    const sink = redisSink.create(v.parse(RedisSinkConfig, { type: "redis", url: REDIS_URL, stream_key: key }), { ...ctxFor("forward_leg", false), direction: "forward" });
    await sink.start();
    const sent = forwardMessages(30, { outboxId: 9 });
    expect(await sink.write(sent)).toEqual([]);
    expect(await sink.write(sent.slice(0, 10))).toEqual([]); // a forward replay appends duplicates
    await sink.close();

    await pipeline("redis_roundtrip", "redis_roundtrip_inbox", { stream_key: key, group: `rt_${RUN}` });
    const res = await drain("redis_roundtrip");
    expect(res.stderr).toContain("drained, 40 delivered");
    const got = await inboxRows(db, "redis_roundtrip_inbox");
    expect(got.map((row) => row.event_id).sort()).toEqual(sent.map((m) => m.dedup_key).sort());
    const first = got.find((row) => row.event_id === sent[0]!.dedup_key)!;
    expect(first).toMatchObject({ payload: sent[0]!.payload, event_type: key, source: `redis:${key}` });
    expect(await pending(key, `rt_${RUN}`)).toEqual({ total: 0, byConsumer: {} });
  }, 30_000);

  test("poison entries between valid ones (nested 30,000 deep, a lone surrogate, NUL) are dead-lettered and acked; every valid one lands", async () => {
    const key = `${PREFIX}:poisonany`;
    const { bodies, valid } = poisonedStream();
    for (const body of bodies) await xadd(key, { payload: body });
    await pipeline("redis_poison_any", "redis_poison_any_inbox", { stream_key: key });
    const res = await drain("redis_poison_any", ["--allow-dead-letters"]);
    expect(res.exitCode).toBe(0);
    await expectPoisonIsolated(db, "redis_poison_any", "redis_poison_any_inbox", valid);
    expect(await pending(key)).toEqual({ total: 0, byConsumer: {} });
  }, 60_000);

  test("a poison entry goes to relay_dead_letters and is acked while the others land", async () => {
    const key = `${PREFIX}:poison`;
    // The inbox refuses negative amounts: that row, and only that row, can never be written.
    await db.sql`SELECT pgtrickle.create_inbox('redis_poison_inbox')`;
    await db.sql`ALTER TABLE pgtrickle.redis_poison_inbox ADD CHECK ((payload->>'amount')::numeric >= 0)`;
    const ids: string[] = [];
    for (let i = 0; i < 10; i++) ids.push(await xadd(key, { payload: JSON.stringify({ i, amount: i === 4 ? -1 : i }) }));
    await pipeline("redis_poison", "redis_poison_inbox", { stream_key: key });
    const res = await drain("redis_poison", ["--allow-dead-letters"]);
    expect(res.stderr).toContain("drained, 9 delivered, 1 dead-lettered");
    expect(res.exitCode).toBe(0);
    expect(await inboxCount(db, "redis_poison_inbox")).toBe(9);
    const dl = await db.sql`SELECT dedup_key, error_kind FROM pgtrickle.relay_dead_letters WHERE pipeline = 'redis_poison'`;
    expect([...dl]).toEqual([{ dedup_key: `redis:${key}:${ids[4]}`, error_kind: "inbox_permanent" }]);
    expect(await pending(key)).toEqual({ total: 0, byConsumer: {} });
  }, 30_000);

  test("kill -9 between the inbox commit and XACK, then a restart: every row once, nothing pending", async () => {
    const own = await testDatabase("redis_source_kill");
    const proxy = await freezingProxy(SERVER_ADDRESSES.redis.port, (chunk) => /XACK/i.test(chunk.toString("latin1")));
    try {
      const key = `${PREFIX}:kill`;
      for (let i = 0; i < 300; i++) await xadd(key, { pgt_dedup_key: `kill-${i}`, payload: JSON.stringify({ i }) });
      await pipeline("redis_kill", "redis_kill_inbox", { stream_key: key, batch_size: 100, url: `redis://127.0.0.1:${proxy.port}` }, own);
      const relay = new RunningRelay(["--postgres-url", own.url, "--metrics-addr", "127.0.0.1:0"]);
      try {
        // The first batch commits; its XACK never reaches the server. Batches read ahead of it
        // (docs/PIPELINE.md) may be in the inbox too: none of them is acknowledged either.
        await eventually(async () => proxy.frozen && (await inboxCount(own, "redis_kill_inbox").catch(() => 0)) >= 100, 20_000, "the first batch in the inbox");
        const committed = await inboxCount(own, "redis_kill_inbox");
        const left = await pending(key);
        expect(Object.keys(left.byConsumer)).toEqual(["default:redis_kill"]);
        expect(left.total).toBeGreaterThanOrEqual(committed);
      } finally {
        await relay.stop("SIGKILL");
      }
      // The same consumer name after the restart: its own pending entries are read first.
      await pipeline("redis_kill", "redis_kill_inbox", { stream_key: key, batch_size: 100 }, own);
      const res = await drain("redis_kill", [], own);
      expect(res.stderr).toContain("drained, 300 delivered");
      expect(res.exitCode).toBe(0);
      expect(await inboxCount(own, "redis_kill_inbox")).toBe(300);
      expect(await pending(key)).toEqual({ total: 0, byConsumer: {} });
    } finally {
      await proxy.stop();
      await own.drop();
    }
  }, 60_000);

  test("entries a crashed consumer left pending are claimed (XAUTOCLAIM); deleted ones are acknowledged away", async () => {
    const key = `${PREFIX}:claim`;
    await r.call("XGROUP", "CREATE", key, GROUP, "0", "MKSTREAM");
    const ids: string[] = [];
    for (let i = 0; i < 30; i++) ids.push(await xadd(key, { pgt_dedup_key: `claim-${i}`, payload: JSON.stringify({ i }) }));
    // Another consumer reads them and dies without acknowledging.
    const read = (await r.xreadgroup("GROUP", GROUP, "crashed-consumer", "COUNT", 100, "STREAMS", key, ">")) as [string, unknown[]][];
    expect(read[0]![1].length).toBe(30);
    await r.xdel(key, ids[7]!);
    expect(await pending(key)).toEqual({ total: 30, byConsumer: { "crashed-consumer": 30 } });
    await Bun.sleep(400);

    await pipeline("redis_claim", "redis_claim_inbox", { stream_key: key, claim_idle_ms: 300 });
    const res = await drain("redis_claim");
    expect(res.stderr).toContain("drained, 29 delivered");
    expect(res.exitCode).toBe(0);
    expect((await inboxRows(db, "redis_claim_inbox")).map((row) => row.event_id).sort()).toEqual(
      Array.from({ length: 30 }, (_, i) => `claim-${i}`).filter((k) => k !== "claim-7").sort(),
    );
    expect(await pending(key)).toEqual({ total: 0, byConsumer: {} });
  }, 30_000);

  test("an unreachable broker: the pipeline is degraded, the error names host:port and no secret", async () => {
    const port = await freePort();
    await pipeline("redis_down", "redis_down_inbox", { url: `redis://alice:pw-s3cret-42@127.0.0.1:${port}`, stream_key: `${PREFIX}:down` });
    const res = await drain("redis_down", ["--timeout", "3"]);
    expect(res.exitCode).toBe(1);
    expect(res.stderr).toContain("degraded");
    expect(res.stderr).toContain(`127.0.0.1:${port}`);
    expect(res.stderr).not.toContain("s3cret");
  }, 30_000);

  test("a key that is not a stream, or a missing stream without mkstream, is a config error naming the key", async () => {
    const notStream = `${PREFIX}:string`;
    await r.set(notStream, "x");
    await pipeline("redis_wrongtype", "redis_wrongtype_inbox", { stream_key: notStream });
    const res = await drain("redis_wrongtype");
    expect(res.exitCode).toBe(1);
    expect(res.stderr).toContain(notStream);
    expect(res.stderr).toContain("not a stream");

    const missing = `${PREFIX}:missing`;
    const err = await errorOf(sourceFor({ stream_key: missing, mkstream: false }).start());
    expect(err.kind).toBe("config");
    expect(err.message).toContain(missing);
    expect(err.message).toContain("mkstream");
    expect(await r.exists(missing)).toBe(0);
  }, 30_000);
});

describe("redis source (direct)", () => {
  test("options: stream_key is required, group alias, defaults", () => {
    expect(v.safeParse(RedisSourceConfig, { url: REDIS_URL }).success).toBe(false);
    expect(v.safeParse(RedisSourceConfig, { url: REDIS_URL, stream_key: "k", start_id: "latest" }).success).toBe(false);
    expect(v.parse(RedisSourceConfig, { url: REDIS_URL, stream_key: "k", group: "g" })).toMatchObject({
      group_name: "g",
      start_id: "0",
      block_ms: 5000,
      claim_idle_ms: 60_000,
      mkstream: true,
      batch_size: 100,
    });
    expect(v.parse(RedisSourceConfig, { url: REDIS_URL, stream_key: "k" }).group_name).toBe("pgtrickle-relay");
    const src = sourceFor({ stream_key: "k" }, true, "orders_in");
    expect(src.describe).toContain("group pgtrickle-relay, consumer test:orders_in");
  });

  test("batches hold at most batch_size (and count); start_id $ skips what was there; a released batch is read first after a restart", async () => {
    const key = `${PREFIX}:release`;
    await xadd(key, { payload: '"before the group"' });
    const src = sourceFor({ stream_key: key, group_name: `rel_${RUN}`, start_id: "$", batch_size: 10, count: 50 }, true, `release_${RUN}`);
    await src.start();
    for (let i = 0; i < 25; i++) await xadd(key, { pgt_dedup_key: `rel-${i}`, payload: JSON.stringify({ i }) });
    const it = src.batches(new AbortController().signal)[Symbol.asyncIterator]();
    const b1 = (await it.next()).value as Batch;
    expect(b1.messages.map((m) => m.dedup_key)).toEqual(Array.from({ length: 10 }, (_, i) => `rel-${i}`));
    await b1.release!();
    await it.return!(undefined);
    expect((await pending(key, `rel_${RUN}`)).total).toBe(10);
    // The pipeline calls batches() again: this consumer's own pending entries come first.
    const batches = await drainDirect(src);
    expect(batches.map((b) => b.messages.length)).toEqual([10, 10, 5]);
    expect(batches.flatMap((b) => b.messages.map((m) => m.dedup_key))).toEqual(Array.from({ length: 25 }, (_, i) => `rel-${i}`));
    expect(await pending(key, `rel_${RUN}`)).toEqual({ total: 0, byConsumer: {} });
  });

  test("lag(): the group's undelivered entries (XINFO GROUPS lag) plus its pending ones, read without reading the group; 0 once drained", async () => {
    const key = `${PREFIX}:lag`;
    const src = sourceFor({ stream_key: key, group_name: `lag_${RUN}`, start_id: "0", mkstream: true, batch_size: 10 }, true, `lag_${RUN}`);
    await src.start();
    expect(await src.lag!()).toEqual({ rows: 0, seconds: 0 });
    for (let i = 0; i < 25; i++) await xadd(key, { payload: JSON.stringify({ i }) });
    expect(await src.lag!()).toEqual({ rows: 25, seconds: 0 });
    expect(await src.lag!()).toEqual({ rows: 25, seconds: 0 }); // asking again read nothing
    expect((await pending(key, `lag_${RUN}`)).total).toBe(0);
    const it = src.batches(new AbortController().signal)[Symbol.asyncIterator]();
    const b1 = (await it.next()).value as Batch;
    expect(await src.lag!()).toEqual({ rows: 25, seconds: 0 }); // a batch in hand is pending until its XACK
    await b1.ack();
    expect((await src.lag!())!.rows).toBe(15);
    for (let r = await it.next(); !r.done; r = await it.next()) await r.value.ack();
    expect(await src.lag!()).toEqual({ rows: 0, seconds: 0 });
  });

  test("an own pending entry deleted from the stream is acknowledged away, never blocking", async () => {
    const key = `${PREFIX}:owngone`;
    const group = `og_${RUN}`;
    const src = sourceFor({ stream_key: key, group_name: group, consumer_name: "me" });
    await src.start();
    const ids: string[] = [];
    for (let i = 0; i < 5; i++) ids.push(await xadd(key, { pgt_dedup_key: `og-${i}` }));
    await r.xreadgroup("GROUP", group, "me", "COUNT", 10, "STREAMS", key, ">");
    await r.xdel(key, ids[1]!, ids[3]!);
    const batches = await drainDirect(src);
    expect(batches.flatMap((b) => b.messages.map((m) => m.dedup_key))).toEqual(["og-0", "og-2", "og-4"]);
    expect(await pending(key, group)).toEqual({ total: 0, byConsumer: {} });
  });

  test("run mode: a blocked read returns as soon as an entry arrives, and aborting ends the iteration promptly", async () => {
    const key = `${PREFIX}:block`;
    const src = sourceFor({ stream_key: key, group_name: `bl_${RUN}`, block_ms: 30_000 }, false);
    await src.start();
    const stop = new AbortController();
    const it = src.batches(stop.signal)[Symbol.asyncIterator]();
    const next = it.next();
    await Bun.sleep(300);
    await xadd(key, { pgt_dedup_key: "late-1" });
    const res = await next;
    expect((res.value as Batch).messages.map((m) => m.dedup_key)).toEqual(["late-1"]);
    await (res.value as Batch).ack();
    const waiting = it.next();
    await Bun.sleep(200);
    stop.abort();
    // Within the test's 5 s timeout, not after the 30 s block.
    expect((await waiting).done).toBe(true);
    expect(await pending(key, `bl_${RUN}`)).toEqual({ total: 0, byConsumer: {} });
  });

  test("a lost connection fails as transient naming host:port; after it is back nothing is lost", async () => {
    const proxy = await tcpProxy(SERVER_ADDRESSES.redis.port);
    try {
      const key = `${PREFIX}:reconnect`;
      const group = `rc_${RUN}`;
      for (let i = 0; i < 20; i++) await xadd(key, { pgt_dedup_key: `rc-${i}` });
      const src = sourceFor({ url: `redis://127.0.0.1:${proxy.port}`, stream_key: key, group_name: group, batch_size: 10 });
      const it = src.batches(new AbortController().signal)[Symbol.asyncIterator]();
      const b1 = (await it.next()).value as Batch;
      await b1.ack();
      const b2 = (await it.next()).value as Batch;
      await proxy.stop();
      const ackErr = await errorOf(b2.ack());
      expect(ackErr.kind).toBe("transient");
      expect(ackErr.message).toContain(`127.0.0.1:${proxy.port}`);
      await proxy.resume();
      await eventually(async () => b2.ack().then(() => true, () => false), 20_000, "the XACK after reconnecting");
      await eventually(async () => drainDirect(src).then(() => true, () => false), 20_000, "a drained iteration after reconnecting");
      expect(await pending(key, group)).toEqual({ total: 0, byConsumer: {} });
    } finally {
      await proxy.stop();
    }
  }, 30_000);
});
