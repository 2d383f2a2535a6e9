import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { createConsola } from "consola";
import { Redis } from "ioredis";
import * as v from "valibot";
import redisSink from "../../src/backends/redis/sink.ts";
import { RedisSinkConfig } from "../../src/backends/redis/config.ts";
import type { Sink } from "../../src/backends/types.ts";
import { RelayError } from "../../src/errors.ts";
import type { Message } from "../../src/message.ts";
import { backendContext, errorOf } from "../helpers/backend.ts";
import { forwardMessages } from "../helpers/messages.ts";
import { freePort, tcpProxy } from "../helpers/proxy.ts";
import { REDIS_URL, requireServer, SERVER_ADDRESSES } from "../helpers/servers.ts";

const RUN = `${process.pid}_${Math.floor(Math.random() * 1e6)}`;
const PREFIX = `rt:${RUN}`;
const ctx = backendContext("redis_sink_test", { log: createConsola({ level: 0 }), postgresUrl: "" });

let r: Redis;
const sinks: Sink[] = [];
const aclUsers: string[] = [];

function sinkFor(options: Record<string, unknown>): Sink {
  const cfg = v.parse(RedisSinkConfig, { type: "redis", url: REDIS_URL, ...options });
  const sink = redisSink.create(cfg, ctx);
  sinks.push(sink);
  return sink;
}

/** Entries of a stream as field objects, in stream order. */
async function entries(key: string): Promise<Record<string, string>[]> {
  const raw = (await r.xrange(key, "-", "+")) as [string, string[]][];
  return raw.map(([, fields]) => {
    const o: Record<string, string> = {};
    for (let i = 0; i < fields.length; i += 2) o[fields[i]!] = fields[i + 1]!;
    return o;
  });
}

async function rawFields(key: string): Promise<string[]> {
  const raw = (await r.xrange(key, "-", "+", "COUNT", 1)) as [string, string[]][];
  return raw[0]![1].filter((_, i) => i % 2 === 0);
}

beforeAll(async () => {
  await requireServer("redis");
  r = new Redis(REDIS_URL);
});

afterAll(async () => {
  for (const s of sinks) await s.close();
  if (!r) return;
  let cursor = "0";
  do {
    const [next, keys] = await r.scan(cursor, "MATCH", `${PREFIX}*`, "COUNT", 1000);
    cursor = next;
    if (keys.length) await r.del(...keys);
  } while (cursor !== "0");
  for (const u of aclUsers) await r.call("ACL", "DELUSER", u).catch(() => {});
  r.disconnect();
});

describe("redis sink", () => {
  test("XADDs every message with the contract's fields to the default key pgtrickle:{stream_table}", async () => {
    const stream_table = `orders_${RUN}`;
    const key = `pgtrickle:${stream_table}`;
    const sink = sinkFor({});
    expect(sink.describe).toContain(`127.0.0.1:6379`);
    await sink.start();
    const batch = [...forwardMessages(300, { stream_table, outboxId: 11 }), ...forwardMessages(40, { stream_table, outboxId: 12, full_refresh: true })];
    try {
      expect(await sink.write(batch)).toEqual([]);
      const got = await entries(key);
      expect(got.length).toBe(340);
      got.forEach((e, i) => {
        const m = batch[i]!;
        expect(e).toEqual({
          dedup_key: m.dedup_key,
          pgt_dedup_key: m.dedup_key,
          subject: m.subject,
          op: "insert",
          payload: JSON.stringify(m.payload),
          full_refresh: m.is_full_refresh ? "true" : "false",
          outbox_id: String(m.outbox_id),
        });
      });
      expect(await rawFields(key)).toEqual(["dedup_key", "pgt_dedup_key", "subject", "op", "payload", "full_refresh", "outbox_id"]);
    } finally {
      await r.del(key);
    }
  });

  test("plain XADD appends a replay again (consumers dedup on pgt_dedup_key); dedup_window_seconds absorbs it", async () => {
    const plainKey = `${PREFIX}:plain`;
    const plain = sinkFor({ stream_key: plainKey });
    await plain.start();
    const batch = forwardMessages(100, { outboxId: 13 });
    await plain.write(batch);
    await plain.write(batch);
    const got = await entries(plainKey);
    expect(got.length).toBe(200);
    expect(new Set(got.map((e) => e.pgt_dedup_key)).size).toBe(100);

    const dedupKey = `${PREFIX}:dedup`;
    const dedup = sinkFor({ stream_key: dedupKey, dedup_window_seconds: 60, maxlen: 100000 });
    await dedup.start();
    expect(await dedup.write(batch)).toEqual([]);
    expect(await dedup.write(batch)).toEqual([]);
    const more = forwardMessages(150, { outboxId: 13 }); // the first 100 again, then 50 new
    expect(await dedup.write(more)).toEqual([]);
    const kept = await entries(dedupKey);
    expect(kept.map((e) => e.pgt_dedup_key)).toEqual(more.map((m) => m.dedup_key));
    expect(kept.map((e) => e.payload)).toEqual(more.map((m) => JSON.stringify(m.payload)));
    const ttl = await r.pttl(`${dedupKey}:pgt_dedup`);
    expect(ttl).toBeGreaterThan(0);
    expect(ttl).toBeLessThanOrEqual(60_000);
  });

  test("MAXLEN ~ n trims the stream", async () => {
    const key = `${PREFIX}:capped`;
    const sink = sinkFor({ stream_key: key, maxlen: 100 });
    await sink.start();
    for (let b = 0; b < 4; b++) await sink.write(forwardMessages(500, { outboxId: 100 + b }));
    const len = await r.xlen(key);
    expect(len).toBeGreaterThanOrEqual(100);
    expect(len).toBeLessThan(400);
  });

  test.each([0, 60])("keeps batch order within each key across pipeline chunks (dedup_window_seconds %d)", async (window) => {
    const sink = sinkFor({ stream_key: `${PREFIX}:ord${window}:{customer}`, max_in_flight: 64, dedup_window_seconds: window });
    await sink.start();
    const batch = forwardMessages(1000, { outboxId: 14 });
    expect(await sink.write(batch)).toEqual([]);
    let total = 0;
    for (let c = 0; c < 7; c++) {
      const got = await entries(`${PREFIX}:ord${window}:c${c}`);
      total += got.length;
      const ids = got.map((e) => (JSON.parse(e.payload!) as { id: number }).id);
      expect(ids).toEqual(batch.filter((m) => (m.payload as { customer: string }).customer === `c${c}`).map((m) => (m.payload as { id: number }).id));
    }
    expect(total).toBe(1000);
  });

  test.each([0, 60])("a templated key holding another type rejects only its messages (dedup_window_seconds %d)", async (window) => {
    const prefix = `${PREFIX}:wt${window}`;
    await r.set(`${prefix}:c2`, "not a stream");
    const sink = sinkFor({ stream_key: `${prefix}:{customer}`, dedup_window_seconds: window });
    await sink.start();
    const batch = forwardMessages(21, { outboxId: 15 });
    const rejections = await sink.write(batch);
    const isC2 = (m: Message) => (m.payload as { customer: string }).customer === "c2";
    expect(rejections.map((x) => x.message.dedup_key)).toEqual(batch.filter(isC2).map((m) => m.dedup_key));
    expect(rejections[0]!.error).toContain("WRONGTYPE");
    const lengths = await Promise.all([0, 1, 3, 4, 5, 6].map((c) => r.xlen(`${prefix}:c${c}`)));
    expect(lengths.reduce((a, b) => a + b, 0)).toBe(batch.filter((m) => !isC2(m)).length);
  });

  test("a fixed stream_key holding another type is a config error at start and at write", async () => {
    const fixed = `${PREFIX}:wt:fixed`;
    await r.hset(fixed, "a", "b");
    const e1 = await errorOf(sinkFor({ stream_key: fixed }).start());
    expect(e1.kind).toBe("config");
    expect(e1.message).toContain(fixed);
    expect(e1.message).toContain("stream_key");

    // The key became something else after start: the whole batch fails as config.
    const later = `${PREFIX}:wt:later`;
    const s2 = sinkFor({ stream_key: later });
    await s2.start();
    await r.set(later, "x");
    const e2 = await errorOf(s2.write(forwardMessages(3)));
    expect(e2.kind).toBe("config");
    expect(e2.message).toContain("WRONGTYPE");
  });

  test("writes to the URL's database, and refuses one the server does not have", async () => {
    const key = `${PREFIX}:db3`;
    const sink = sinkFor({ url: "redis://127.0.0.1:6379/3", stream_key: key });
    await sink.start();
    await sink.write(forwardMessages(4, { outboxId: 19 }));
    const db3 = new Redis("redis://127.0.0.1:6379/3");
    try {
      expect(await db3.xlen(key)).toBe(4);
      expect(await r.exists(key)).toBe(0);
      await db3.del(key);
    } finally {
      db3.disconnect();
    }
    const err = await errorOf(sinkFor({ url: "redis://127.0.0.1:6379/4000" }).start());
    expect(err.kind).toBe("config");
    expect(err.message).toContain("database 4000");
  });

  test("an unreachable server is a transient error naming host:port and no secret", async () => {
    const port = await freePort();
    const sink = sinkFor({ url: `redis://relay:pw-s3cret-1@127.0.0.1:${port}/0`, password: "pw-s3cret-2" });
    expect(sink.describe).toContain(`127.0.0.1:${port}`);
    expect(sink.describe).not.toContain("s3cret");
    const err = await errorOf(sink.start());
    expect(err.kind).toBe("transient");
    expect(err.message).toContain(`127.0.0.1:${port}`);
    expect(err.message).toContain("connection refused");
    expect(err.message).not.toContain("s3cret");
    const err2 = await errorOf(sink.write(forwardMessages(1)));
    expect(err2.kind).toBe("transient");
    expect(err2.message).toContain(`127.0.0.1:${port}`);
  });

  test("wrong credentials and missing ACL permissions are config errors without the secret", async () => {
    const user = `rt_${RUN}`;
    aclUsers.push(user);
    await r.call("ACL", "SETUSER", user, "reset", "on", ">right-s3cret-pw", `~${PREFIX}:acl:*`, "+@all");

    const wrong = await errorOf(sinkFor({ url: `redis://127.0.0.1:6379`, username: user, password: "wrong-s3cret-pw", stream_key: `${PREFIX}:acl:x` }).start());
    expect(wrong.kind).toBe("config");
    expect(wrong.message).toContain("127.0.0.1:6379");
    expect(wrong.message).not.toContain("s3cret");

    const ok = sinkFor({ url: `redis://${user}:right-s3cret-pw@127.0.0.1:6379`, stream_key: `${PREFIX}:acl:{customer}` });
    await ok.start();
    expect(await ok.write(forwardMessages(7, { outboxId: 16 }))).toEqual([]);
    expect(await r.xlen(`${PREFIX}:acl:c3`)).toBe(1);

    const denied = sinkFor({ url: `redis://${user}:right-s3cret-pw@127.0.0.1:6379`, stream_key: `${PREFIX}:elsewhere:{customer}` });
    await denied.start();
    const e = await errorOf(denied.write(forwardMessages(3)));
    expect(e.kind).toBe("config");
    expect(e.message).toContain("NOPERM");
    expect(e.message).not.toContain("s3cret");
  });

  test("after a lost connection writes fail as transient, then succeed once it is back", async () => {
    const proxy = await tcpProxy(SERVER_ADDRESSES.redis.port);
    try {
      const key = `${PREFIX}:reconnect`;
      const sink = sinkFor({ url: `redis://127.0.0.1:${proxy.port}`, stream_key: key, dedup_window_seconds: 60 });
      await sink.start();
      expect(await sink.write(forwardMessages(10, { outboxId: 17 }))).toEqual([]);

      await proxy.stop();
      const batch = forwardMessages(20, { outboxId: 18 });
      const err = await errorOf(sink.write(batch));
      expect(err.kind).toBe("transient");
      expect(err.message).toContain(`127.0.0.1:${proxy.port}`);

      await proxy.resume();
      let rejections: unknown = null;
      for (let attempt = 0; attempt < 30 && rejections === null; attempt++) {
        rejections = await sink.write(batch).catch(async (e: RelayError) => {
          expect(e.kind).toBe("transient");
          await Bun.sleep(200);
          return null;
        });
      }
      expect(rejections).toEqual([]);
      expect(await r.xlen(key)).toBe(30);
    } finally {
      await proxy.stop();
    }
  });
});
