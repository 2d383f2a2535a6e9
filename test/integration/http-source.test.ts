/**
 * HTTP receiver (reverse `http` source) → inbox, against the real PostgreSQL of scripts/services:
 * reverse pipelines registered with pgtrickle.set_relay_inbox and run by `pgtrickle-relay run`;
 * the senders are fetch() calls and the relay's own http sink (round trip of dedup keys).
 */
import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import { createHash } from "node:crypto";
import * as v from "valibot";
import httpSink from "../../src/backends/http/sink.ts";
import httpSource from "../../src/backends/http/source.ts";
import { signPayload } from "../../src/backends/http/client.ts";
import type { Batch } from "../../src/backends/types.ts";
import { log } from "../../src/observe/log.ts";
import { backendContext } from "../helpers/backend.ts";
import { forwardMessages } from "../helpers/messages.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { freePort } from "../helpers/proxy.ts";
import { eventually, relayOnce, RunningRelay } from "../helpers/relay.ts";
import { expectPoisonIsolated, LONG_KEY_POISON, POISONS, poisonedStream } from "../helpers/poison.ts";
import { disableInboxes, poisonable } from "../helpers/reverse.ts";
import { requireServer } from "../helpers/servers.ts";
import { loadBackends } from "../../src/backends/index.ts";
import { Metrics } from "../../src/observe/metrics.ts";
import { normalizePipeline } from "../../src/pipeline-config.ts";
import { Pipeline, PIPELINE_DEPTH } from "../../src/pipeline.ts";

let db: TestDatabase;
const run = Math.random().toString(36).slice(2, 7);

beforeAll(async () => {
  await requireServer("postgres");
  db = await testDatabase("http_source");
});
afterAll(async () => {
  await db?.drop();
});
// Each test runs its own relay, which would otherwise also run every earlier test's pipeline.
afterEach(() => disableInboxes(db));

interface Row {
  event_id: string;
  event_type: string | null;
  source: string | null;
  aggregate_id: string | null;
  payload: unknown;
  trace_id: string | null;
  received_at: Date;
}

const sha = (data: string | Uint8Array) => createHash("sha256").update(data).digest("hex");

/** A reverse http pipeline on a free port; the inbox exists beforehand so tests can add triggers. */
async function pipeline(label: string, source: Record<string, unknown> = {}) {
  const name = `${label}_${run}`;
  const inbox = `${name}_inbox`;
  const port = await freePort();
  await db.sql`SELECT pgtrickle.create_inbox(${inbox})`;
  await db.sql`SELECT pgtrickle.set_relay_inbox(${name}, ${inbox}, ${db.sql.json({ type: "http", listen_addr: `127.0.0.1:${port}`, path: "/hooks", ...source } as never)})`;
  const url = `http://127.0.0.1:${port}/hooks`;
  const rows = () =>
    db.sql<Row[]>`SELECT event_id, event_type, source, aggregate_id, payload, trace_id, received_at FROM pgtrickle.${db.sql(inbox)} ORDER BY event_id`;
  const count = async () => (await db.sql<{ n: number }[]>`SELECT count(*)::int AS n FROM pgtrickle.${db.sql(inbox)}`)[0]!.n;
  return { name, inbox, port, url, rows, count };
}

function relay(): RunningRelay {
  return new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0"]);
}

async function started(r: RunningRelay, name: string) {
  await r.waitForLog(new RegExp(`\\[${name}\\] started`));
}

/** An inbox whose every INSERT statement first sleeps (a slow database). */
async function slowInbox(inbox: string, seconds: number) {
  await db.sql.unsafe(`
    CREATE OR REPLACE FUNCTION pgtrickle.${inbox}_slow() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN PERFORM pg_sleep(${seconds}); RETURN NULL; END $$;
    CREATE TRIGGER slow BEFORE INSERT ON pgtrickle.${inbox} FOR EACH STATEMENT EXECUTE FUNCTION pgtrickle.${inbox}_slow();`);
}

const post = (url: string, body: NonNullable<RequestInit["body"]>, headers: Record<string, string> = {}, method = "POST") => fetch(url, { method, body, headers });

const TRACE = "0af7651916cd43dd8448eb211c80319c";
const TRACEPARENT = `00-${TRACE}-b7ad6b7169203331-01`;

describe("events → inbox rows", () => {
  test("single events, arrays, text and binary bodies: N rows with the contract's columns, each answered only after its commit; a resend stays N", async () => {
    const p = await pipeline("cols", { event_type: "fallback.type" });
    const r = relay();
    try {
      await started(r, p.name);
      const binary = new Uint8Array([0xff, 0xfe, 0x00, 0x80]);
      const requests: { url: string; body: NonNullable<RequestInit["body"]>; headers?: Record<string, string>; method?: string; expect: number }[] = [
        {
          url: p.url,
          body: JSON.stringify({ order_id: 1, aggregate_id: "order-1", source: "billing" }),
          headers: { "X-Event-Type": "order.created", "Idempotency-Key": "idem-1", traceparent: TRACEPARENT, "Content-Type": "application/json" },
          expect: 1,
        },
        {
          url: `${p.url}/order.paid`,
          body: JSON.stringify([{ dedup_key: "elem-key", n: 1 }, { n: 2, aggregate_id: 42 }, { n: 3 }]),
          headers: { "Idempotency-Key": "batch-7" },
          expect: 3,
        },
        { url: p.url, body: "hello world", headers: { "Content-Type": "text/plain" }, method: "PUT", expect: 1 },
        { url: `${p.url}/`, body: JSON.stringify({ event_type: "from.body", x: 1, trace_id: "body-trace" }), headers: { "Content-Type": "application/xml" }, expect: 1 },
        { url: `${p.url}/ignored.suffix`, body: binary, headers: { "X-Event-Type": "blob.uploaded", "Content-Type": "application/octet-stream" }, expect: 1 },
        { url: p.url, body: JSON.stringify([{ pgt_dedup_key: "pgt-key", n: 4 }]), expect: 1 },
      ];
      let total = 0;
      for (const req of requests) {
        const res = await post(req.url, req.body, req.headers, req.method);
        expect(res.status).toBe(200);
        expect(await res.json()).toEqual({ accepted: req.expect });
        total += req.expect;
        // 200 means committed: the rows are there the moment the answer arrives.
        expect(await p.count()).toBe(total);
      }
      const rows = await p.rows();
      const byId = new Map(rows.map((x) => [x.event_id, x]));
      expect(rows).toHaveLength(8);
      expect(byId.get("idem-1")).toMatchObject({
        event_type: "order.created",
        source: "billing",
        aggregate_id: "order-1",
        payload: { order_id: 1, aggregate_id: "order-1", source: "billing" },
        trace_id: TRACE,
      });
      expect(byId.get("elem-key")).toMatchObject({ event_type: "order.paid", source: "http:/hooks/order.paid", payload: { dedup_key: "elem-key", n: 1 }, trace_id: null });
      expect(byId.get("batch-7:1")).toMatchObject({ event_type: "order.paid", aggregate_id: "42", payload: { n: 2, aggregate_id: 42 } });
      expect(byId.get("batch-7:2")).toMatchObject({ payload: { n: 3 } });
      expect(byId.get(`http:${sha("hello world")}`)).toMatchObject({ event_type: "fallback.type", source: "http:/hooks", payload: "hello world" });
      const bodyTyped = JSON.stringify({ event_type: "from.body", x: 1, trace_id: "body-trace" });
      expect(byId.get(`http:${sha(bodyTyped)}`)).toMatchObject({ event_type: "from.body", trace_id: "body-trace" });
      expect(byId.get(`http:${sha(binary)}`)).toMatchObject({ event_type: "blob.uploaded", payload: { base64: Buffer.from(binary).toString("base64") } });
      expect(byId.get("pgt-key")).toMatchObject({ payload: { pgt_dedup_key: "pgt-key", n: 4 } });

      // The senders retry everything (lost answers, at-least-once senders): still 8 rows.
      for (const req of requests) expect((await post(req.url, req.body, req.headers, req.method)).status).toBe(200);
      // Same content without a key, reformatted: the same event (the documented consequence).
      expect((await post(p.url, JSON.stringify({ x: 1, event_type: "from.body", trace_id: "body-trace" }))).status).toBe(200);
      expect((await post(p.url, `  ${bodyTyped}\n`)).status).toBe(200);
      expect(await p.count()).toBe(9); // key order differs: different JSON text, a different event
    } finally {
      await r.stop();
    }
  });

  test("concurrent requests are coalesced into shared batches, each answered after its own commit", async () => {
    const p = await pipeline("coalesce", { batch_size: 100 });
    await slowInbox(p.inbox, 0.5);
    const r = relay();
    try {
      await started(r, p.name);
      const responses = await Promise.all(Array.from({ length: 40 }, (_, i) => post(p.url, JSON.stringify({ i }), { "Idempotency-Key": `c-${i}` })));
      expect(responses.map((x) => x.status)).toEqual(Array(40).fill(200));
      expect(await p.count()).toBe(40);
      // Rows of one batch share one transaction, hence one received_at (now()). Batches go out at
      // once, up to PIPELINE_DEPTH in flight; what arrives meanwhile gathers into the next one.
      const [row] = await db.sql<{ batches: number }[]>`SELECT count(DISTINCT received_at)::int AS batches FROM pgtrickle.${db.sql(p.inbox)}`;
      expect(row!.batches).toBeLessThanOrEqual(PIPELINE_DEPTH + 1);
    } finally {
      await r.stop();
    }
  });

  test("requests not yet answered are written to the inbox at the same time; the parts of one request split over batches are written one after another", async () => {
    const p = await pipeline("overlap", { batch_size: 10, linger_ms: 0 });
    await slowInbox(p.inbox, 1);
    const r = relay();
    try {
      await started(r, p.name);
      const inserting = async () =>
        (await db.sql<{ n: number }[]>`SELECT count(*)::int AS n FROM pg_stat_activity WHERE state = 'active' AND query LIKE 'INSERT%' AND query LIKE ${`%${p.inbox}%`}`)[0]!.n;
      const first = post(p.url, JSON.stringify({ first: true }), { "Idempotency-Key": "first" });
      await eventually(async () => (await inserting()) === 1, 10_000, "the first request's INSERT");
      const second = post(p.url, JSON.stringify({ second: true }), { "Idempotency-Key": "second" });
      // On a relay that writes one batch at a time, the second INSERT starts only after the first one ends.
      let most = 0;
      await eventually(async () => (most = Math.max(most, await inserting())) >= 2 || (await p.count()) > 0, 10_000, "an INSERT or a row");
      expect(most).toBe(2);
      expect((await Promise.all([first, second])).map((x) => x.status)).toEqual([200, 200]);

      // 25 events with batch_size 10: three batches of one request, in its order.
      const split = await post(p.url, JSON.stringify(Array.from({ length: 25 }, (_, i) => ({ i }))), { "Idempotency-Key": "split" });
      expect(split.status).toBe(200);
      const rows = await db.sql<{ i: number; at: Date }[]>`
        SELECT (payload->>'i')::int AS i, received_at AS at FROM pgtrickle.${db.sql(p.inbox)} WHERE event_id LIKE 'split:%' ORDER BY (payload->>'i')::int`;
      expect(rows.map((x) => x.i)).toEqual(Array.from({ length: 25 }, (_, i) => i));
      const starts = [...new Set(rows.map((x) => x.at.getTime()))];
      expect(starts).toHaveLength(3);
      // Each part's transaction began after the one before it had slept its second and committed.
      for (let k = 1; k < 3; k++) expect(starts[k]! - starts[k - 1]!).toBeGreaterThanOrEqual(900);
    } finally {
      await r.stop();
    }
  });

  test("an answer needs no proof of ownership unless dead letters come first; a lock known to be lost stops the pipeline unanswered", async () => {
    const name = `owner_${run}`;
    const port = await freePort();
    const spec = normalizePipeline({ name, direction: "reverse", enabled: true, config: { source: { type: "http", listen_addr: `127.0.0.1:${port}`, path: "/", linger_ms: 0 }, sink: { type: "pg-inbox", inbox: `${name}_inbox` } } });
    await loadBackends([spec]);
    const lost = new AbortController();
    let confirmations = 0;
    const guard = { lost: lost.signal, confirm: async () => (confirmations++, true), holder: () => null };
    const pipe = new Pipeline(spec, { sql: db.sql, postgresUrl: db.url, relayGroupId: "test", metrics: new Metrics(), log, drain: false, guard });
    const stop = new AbortController();
    const running = pipe.run(stop.signal);
    const url = `http://127.0.0.1:${port}/`;
    try {
      await eventually(() => post(url, "[]").then((r) => r.status === 200, () => false), 20_000, "the receiver");
      for (let i = 0; i < 3; i++) expect((await post(url, JSON.stringify({ i }), { "Idempotency-Key": `o-${i}` })).status).toBe(200);
      expect(confirmations).toBe(0);
      // U+0000 cannot go into jsonb: a dead letter, written only by the owner.
      expect((await post(url, '[{"bad": "\\u0000"}, {"good": 1}]', { "Idempotency-Key": "o-poison" })).status).toBe(200);
      expect(confirmations).toBe(1);
      lost.abort();
      const unanswered = await post(url, JSON.stringify({ late: true }), { "Idempotency-Key": "o-late" });
      expect(unanswered.status).toBe(503);
      expect(await running).not.toBe("running");
    } finally {
      stop.abort();
      await running;
    }
    const keys = await db.sql<{ event_id: string }[]>`SELECT event_id FROM pgtrickle.${db.sql(`${name}_inbox`)} ORDER BY event_id`;
    expect(keys.map((k) => k.event_id)).toEqual(["o-0", "o-1", "o-2", "o-poison:1"]);
  });

  test("a poison element goes to relay_dead_letters, the others land, the request is answered 200", async () => {
    const p = await pipeline("poison");
    await poisonable(db, p.inbox);
    const r = relay();
    try {
      await started(r, p.name);
      const res = await post(p.url, '[{"n":1},{"poison":true},{"n":3}]', { "Idempotency-Key": "poison-req" });
      expect(res.status).toBe(200);
      expect((await p.rows()).map((x) => x.event_id)).toEqual(["poison-req:0", "poison-req:2"]);
      const letters = await db.sql<{ dedup_key: string; error_kind: string }[]>`
        SELECT dedup_key, error_kind FROM pgtrickle.relay_dead_letters WHERE pipeline = ${p.name}`;
      expect([...letters]).toEqual([{ dedup_key: "poison-req:1", error_kind: "inbox_permanent" }]);
    } finally {
      await r.stop();
    }
  });
});

describe("poison requests", () => {
  test("a body nested 30,000 deep is answered 400 for that request only; lone surrogate, NUL and over-long key events are dead-lettered; every valid request lands", async () => {
    const p = await pipeline("poisonany");
    const r = relay();
    try {
      await started(r, p.name);
      const [deep, ...dead] = [...POISONS, LONG_KEY_POISON];
      const { bodies, valid } = poisonedStream([deep!, ...dead]);
      const statuses: number[] = [];
      for (const body of bodies) {
        const res = await post(p.url, body);
        statuses.push(res.status);
        if (body === deep!.body) expect(((await res.json()) as { error: string }).error).toBe("JSON nested deeper than 1000 levels");
      }
      expect(statuses).toEqual(bodies.map((b) => (b === deep!.body ? 400 : 200)));
      await expectPoisonIsolated(db, p.name, p.inbox, valid, dead);
    } finally {
      await r.stop();
    }
  });
});

describe("refusals", () => {
  test("auth header and signature: 401 without saying which part was wrong, nothing written, secrets never logged", async () => {
    const token = `Bearer tok-${run}-s3cr3t`;
    const secret = `sign-${run}-s3cr3t`;
    const p = await pipeline("auth", { auth_header: "Authorization", auth_value: token, signing_secret: secret });
    const r = relay();
    try {
      await started(r, p.name);
      const body = JSON.stringify({ a: 1 });
      const cases: Record<string, string>[] = [
        {},
        { Authorization: "Bearer wrong" },
        { Authorization: token.slice(0, -1) },
        { Authorization: token },
        { Authorization: token, "X-Pgtrickle-Signature": signPayload("other-secret", body) },
        { Authorization: "Bearer wrong", "X-Pgtrickle-Signature": signPayload(secret, body) },
        { Authorization: token, "X-Pgtrickle-Signature": signPayload(secret, body, Math.floor(Date.now() / 1000) - 3600) },
        { Authorization: token, "X-Pgtrickle-Signature": signPayload(secret, JSON.stringify({ a: 2 })) },
      ];
      for (const headers of cases) {
        const res = await post(p.url, body, headers);
        expect(res.status).toBe(401);
        expect(await res.json()).toEqual({ error: "unauthorized" });
      }
      expect(await p.count()).toBe(0);
      const ok = await post(p.url, body, { Authorization: token, "X-Pgtrickle-Signature": signPayload(secret, body) });
      expect(ok.status).toBe(200);
      expect(await p.count()).toBe(1);
      await r.stop();
      expect(r.stderr + r.stdout).not.toContain(token);
      expect(r.stderr + r.stdout).not.toContain(secret);
      expect(r.stderr).toContain("auth Authorization, signed");
    } finally {
      await r.stop();
    }
  });

  test("404 off the path, 405 for other methods, 413 past max_body_bytes or max_pending, 400 for an empty body; nothing written", async () => {
    const p = await pipeline("refuse", { max_body_bytes: 1024, max_pending: 5 });
    const r = relay();
    try {
      await started(r, p.name);
      const base = `http://127.0.0.1:${p.port}`;
      expect((await post(`${base}/other`, "{}")).status).toBe(404);
      expect((await post(`${base}/hooksx`, "{}")).status).toBe(404);
      expect((await post(`${base}/`, "{}")).status).toBe(404);
      const get = await fetch(p.url);
      expect(get.status).toBe(405);
      expect(get.headers.get("allow")).toBe("POST, PUT");
      expect((await post(p.url, "x".repeat(2000))).status).toBe(413);
      const chunked = new ReadableStream({
        start(c) {
          for (let i = 0; i < 4; i++) c.enqueue(new TextEncoder().encode("y".repeat(600)));
          c.close();
        },
      });
      expect((await fetch(p.url, { method: "POST", body: chunked })).status).toBe(413);
      expect((await post(p.url, "")).status).toBe(400);
      const tooMany = await post(p.url, JSON.stringify([1, 2, 3, 4, 5, 6]));
      expect(tooMany.status).toBe(413);
      expect(((await tooMany.json()) as { error: string }).error).toContain("max_pending");
      expect(await p.count()).toBe(0);
      // An empty array is a valid request with nothing to write.
      expect(await (await post(p.url, "[]")).json()).toEqual({ accepted: 0 });
    } finally {
      await r.stop();
    }
  });

  test("backpressure: past max_pending waiting events, 503 with Retry-After; the accepted ones land", async () => {
    const p = await pipeline("pressure", { max_pending: 3, batch_size: 2, linger_ms: 0 });
    await slowInbox(p.inbox, 1.5);
    const r = relay();
    try {
      await started(r, p.name);
      const a = post(p.url, JSON.stringify([{ a: 1 }, { a: 2 }]));
      await Bun.sleep(300); // taken by the pipeline, now in its slow write
      const b = post(p.url, JSON.stringify({ b: 1 }));
      await Bun.sleep(100);
      const c = await post(p.url, JSON.stringify({ c: 1 }));
      expect(c.status).toBe(503);
      expect(c.headers.get("retry-after")).toBe("1");
      expect(((await c.json()) as { error: string }).error).toContain("max_pending");
      expect((await a).status).toBe(200);
      expect((await b).status).toBe(200);
      expect(await p.count()).toBe(3);
    } finally {
      await r.stop();
    }
  });
});

describe("failures and crashes", () => {
  test("inbox write failing: 503 after request_timeout_ms and at once for new requests; after recovery the retries land exactly once", async () => {
    const p = await pipeline("failing", { request_timeout_ms: 1500 });
    await db.sql.unsafe(`
      CREATE FUNCTION pgtrickle.${p.inbox}_fail() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN RAISE EXCEPTION 'simulated outage' USING ERRCODE = 'serialization_failure'; END $$;
      CREATE TRIGGER fail BEFORE INSERT ON pgtrickle.${p.inbox} FOR EACH STATEMENT EXECUTE FUNCTION pgtrickle.${p.inbox}_fail();`);
    const r = relay();
    try {
      await started(r, p.name);
      const body = JSON.stringify([{ n: 1 }, { n: 2 }]);
      const t0 = Date.now();
      const first = await post(p.url, body, { "Idempotency-Key": "outage" });
      expect(first.status).toBe(503);
      expect(first.headers.get("retry-after")).toBe("5");
      expect(Date.now() - t0).toBeGreaterThanOrEqual(1400);
      const t1 = Date.now();
      const second = await post(p.url, JSON.stringify({ other: 1 }));
      expect(second.status).toBe(503);
      // Answered at once, not after another request_timeout_ms.
      expect(Date.now() - t1).toBeLessThan(1400);
      await r.waitForLog(/degraded, will retry: sink: .*simulated outage/);
      await db.sql.unsafe(`DROP TRIGGER fail ON pgtrickle.${p.inbox}`);
      // The batch in flight lands on the pipeline's next retry; the sender's retry is deduplicated.
      await eventually(async () => (await p.count()) === 2, 20_000, "the retried batch to land");
      // The receiver answers 503 until the landed batch is also acknowledged; a sender retries.
      let retry = await post(p.url, body, { "Idempotency-Key": "outage" });
      for (let i = 0; i < 20 && retry.status === 503; i++) {
        await Bun.sleep(250);
        retry = await post(p.url, body, { "Idempotency-Key": "outage" });
      }
      expect(retry.status).toBe(200);
      expect((await p.rows()).map((x) => x.event_id)).toEqual(["outage:0", "outage:1"]);
    } finally {
      await r.stop();
    }
  });

  test("kill -9 after the inbox commit, before the answer: the sender's retry to the restarted relay leaves N rows", async () => {
    const p = await pipeline("crash");
    await poisonable(db, p.inbox);
    const body = '[{"n":1},{"n":2},{"poison":true}]';
    const headers = { "Idempotency-Key": "crash-req" };
    // Holding this lock parks the relay right after the inbox commit: the next step writes the
    // poison element's dead letter, then acknowledges (answers) the batch.
    const locker = await db.sql.reserve();
    await locker`BEGIN`;
    await locker`LOCK TABLE pgtrickle.relay_dead_letters IN SHARE MODE`;
    const first = relay();
    try {
      await started(first, p.name);
      const pending = post(p.url, body, headers).then(
        (res) => res.status,
        () => "connection lost",
      );
      await eventually(async () => (await p.count()) === 2, 10_000, "the inbox commit");
      await first.stop("SIGKILL");
      expect(await pending).toBe("connection lost");
    } finally {
      await locker`ROLLBACK`;
      locker.release();
      await first.stop("SIGKILL");
    }
    const second = relay();
    try {
      await started(second, p.name);
      const retry = await post(p.url, body, headers);
      expect(retry.status).toBe(200);
      expect(await retry.json()).toEqual({ accepted: 3 });
      expect((await p.rows()).map((x) => x.event_id)).toEqual(["crash-req:0", "crash-req:1"]);
      const letters = await db.sql<{ dedup_key: string }[]>`SELECT dedup_key FROM pgtrickle.relay_dead_letters WHERE pipeline = ${p.name}`;
      expect([...letters]).toEqual([{ dedup_key: "crash-req:2" }]);
    } finally {
      await second.stop();
    }
  });

  test("SIGTERM: the batches in hand are committed and answered, queued requests get 503, the port is closed", async () => {
    const p = await pipeline("shutdown", { batch_size: 1, linger_ms: 0 });
    await slowInbox(p.inbox, 1.5);
    const r = relay();
    await started(r, p.name);
    // One batch being written, two read ahead of it (docs/PIPELINE.md), then one left in the queue.
    const inHand: Promise<Response>[] = [];
    for (let i = 0; i < PIPELINE_DEPTH; i++) {
      inHand.push(post(p.url, JSON.stringify({ in_hand: i })));
      await Bun.sleep(300);
    }
    const queued = post(p.url, JSON.stringify({ queued: true }));
    await Bun.sleep(100);
    r.proc.kill("SIGTERM");
    const [b, ...a] = await Promise.all([queued, ...inHand]);
    for (const answer of a) expect(answer.status).toBe(200);
    expect(b.status).toBe(503);
    expect(b.headers.get("retry-after")).toBe("5");
    expect(await r.proc.exited).toBe(0);
    expect(await p.count()).toBe(PIPELINE_DEPTH);
    await expect(post(p.url, "{}")).rejects.toThrow();
  });

  test("listen address in use: pipeline degraded naming host:port, no secret printed; it recovers once the port is free", async () => {
    const blocker = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: () => new Response("not the relay") });
    const port = blocker.port;
    const token = `tok-${run}-hidden`;
    const p = await pipeline("inuse", { listen_addr: `127.0.0.1:${port}`, auth_header: "X-Token", auth_value: token });
    const r = relay();
    try {
      await r.waitForLog(new RegExp(`\\[${p.name}\\] degraded, will retry: start: http receiver cannot listen on 127\\.0\\.0\\.1:${port}: the address is in use`));
      await eventually(async () => {
        const [s] = await db.sql<{ state: string; last_error: string }[]>`SELECT state, last_error FROM pgtrickle.relay_pipeline_status WHERE pipeline = ${p.name}`;
        return s?.state === "degraded" && s.last_error.includes(`127.0.0.1:${port}`);
      }, 10_000, "the degraded status");
      await blocker.stop(true);
      await started(r, p.name);
      const res = await post(`http://127.0.0.1:${port}/hooks`, "{}", { "X-Token": token });
      expect(res.status).toBe(200);
      await r.stop();
      expect(r.stderr + r.stdout).not.toContain(token);
    } finally {
      blocker.stop(true);
      await r.stop();
    }
  });

  test("drain skips HTTP receivers: exits 0 at once with an info line, nothing bound", async () => {
    const p = await pipeline("drain");
    const result = await relayOnce(["drain", "--postgres-url", db.url, "--pipeline", p.name], {}, 20_000);
    expect(result.exitCode).toBe(0);
    expect(result.stderr).toContain("HTTP receivers have no backlog to drain; skipped");
    expect(result.stderr).not.toContain("listening");
  });
});

describe("round trip with the http sink", () => {
  test("batch and per-event sink requests (signed) keep the original dedup keys; replays stay N", async () => {
    const secret = `rt-${run}-secret`;
    const p = await pipeline("roundtrip", { signing_secret: secret, auth_header: "Authorization", auth_value: "Bearer rt" });
    const r = relay();
    const ctx = backendContext("fwd");
    try {
      await started(r, p.name);
      const messages = forwardMessages(12, { stream_table: `rt_${run}` });
      const send = async (batchMode: boolean, extra: Record<string, unknown> = {}) => {
        const cfg = v.parse(httpSink.config, { url: p.url, signing_secret: secret, headers: { Authorization: "Bearer rt" }, batch_mode: batchMode, ...extra });
        const sink = httpSink.create(cfg, ctx);
        await sink.start();
        expect(await sink.write(messages)).toEqual([]);
        await sink.close();
      };
      await send(true, { max_batch_messages: 5 });
      const rows = await p.rows();
      expect(rows.map((x) => x.event_id)).toEqual(messages.map((m) => m.dedup_key).sort());
      expect(rows.find((x) => x.event_id === messages[3]!.dedup_key)!.payload).toMatchObject({ dedup_key: messages[3]!.dedup_key, payload: messages[3]!.payload });
      // Replays with other batch boundaries and per event: the same 12 rows.
      await send(true, { max_batch_messages: 7 });
      await send(false);
      expect(await p.count()).toBe(12);
    } finally {
      await r.stop();
    }
  });
});

describe("the source on its own", () => {
  const ctx = () => backendContext(`direct_${run}`, { direction: "reverse" });

  test("release() answers the batch's requests 503; ack() answers 200 only for requests whose every event was acked", async () => {
    const port = await freePort();
    const source = httpSource.create(v.parse(httpSource.config, { listen_addr: `127.0.0.1:${port}`, batch_size: 2, linger_ms: 50 }), ctx());
    await source.start();
    const stop = new AbortController();
    const it = source.batches(stop.signal)[Symbol.asyncIterator]();
    try {
      const url = `http://127.0.0.1:${port}/inbox`;
      const a = post(url, JSON.stringify([{ a: 1 }, { a: 2 }, { a: 3 }]));
      const first = (await it.next()).value as Batch;
      expect(first.messages.map((m) => m.payload)).toEqual([{ a: 1 }, { a: 2 }]);
      await first.ack();
      const second = (await it.next()).value as Batch;
      expect(second.messages.map((m) => m.payload)).toEqual([{ a: 3 }]);
      // Two of three events committed, the third not: the sender must retry (and is deduplicated).
      await second.release!();
      const res = await a;
      expect(res.status).toBe(503);
      expect(res.headers.get("retry-after")).toBe("5");

      const b = post(url, JSON.stringify({ b: 1 }));
      const third = (await it.next()).value as Batch;
      await third.ack();
      expect(await (await b).json()).toEqual({ accepted: 1 });
    } finally {
      stop.abort();
      await it.return?.();
      await source.close();
    }
    await expect(post(`http://127.0.0.1:${port}/inbox`, "{}")).rejects.toThrow();
  });

  test("option errors: half an auth pair, a bad listen_addr or path", () => {
    const parse = (o: Record<string, unknown>) => v.safeParse(httpSource.config, o);
    expect(parse({ auth_header: "Authorization" }).success).toBe(false);
    expect(parse({ auth_value: "x" }).success).toBe(false);
    expect(parse({ listen_addr: "8080" }).success).toBe(false);
    expect(parse({ listen_addr: "[::1]:8080" }).success).toBe(true);
    expect(parse({ path: "inbox" }).success).toBe(false);
    const ok = parse({});
    expect(ok.success && ok.output).toMatchObject({ listen_addr: "0.0.0.0:8080", path: "/inbox", max_body_bytes: 10485760, event_type_header: "X-Event-Type", max_pending: 1000 });
  });
});
