/**
 * HTTP webhook sink against a real HTTP server: a Bun.serve listener on 127.0.0.1 (random port)
 * in this process that records every request it receives. No scripts/services server is needed.
 */
import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import { createHash } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as v from "valibot";
import httpSink from "../../src/backends/http/sink.ts";
import { signPayload, verifySignature } from "../../src/backends/http/client.ts";
import { headerValue } from "../../src/backends/http/sink.ts";
import type { Sink } from "../../src/backends/types.ts";
import { log } from "../../src/observe/log.ts";
import { VERSION } from "../../src/version.ts";
import { backendContext, errorOf } from "../helpers/backend.ts";
import { forwardMessages } from "../helpers/messages.ts";

interface Recorded {
  method: string;
  path: string;
  headers: Record<string, string>;
  body: string;
}

type Handler = (req: Recorded, index: number) => Response | Promise<Response>;

class Recorder {
  requests: Recorded[] = [];
  handler: Handler = () => new Response("ok");
  inFlight = 0;
  maxInFlight = 0;
  /** Requests of an earlier test (a timed-out one still sleeping) must not count as in flight. */
  generation = 0;
  server: ReturnType<typeof Bun.serve>;

  constructor(tls?: { cert: string; key: string }) {
    this.server = Bun.serve({
      hostname: "127.0.0.1",
      port: 0,
      ...(tls ? { tls } : {}),
      fetch: async (request) => {
        const url = new URL(request.url);
        const rec: Recorded = {
          method: request.method,
          path: url.pathname + url.search,
          headers: Object.fromEntries(request.headers),
          body: await request.text(),
        };
        const index = this.requests.push(rec) - 1;
        const generation = this.generation;
        this.inFlight++;
        this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
        try {
          return await this.handler(rec, index);
        } finally {
          if (generation === this.generation) this.inFlight--;
        }
      },
    });
  }

  get url() {
    return `${this.server.url.origin}/hook`;
  }

  reset(handler?: Handler) {
    this.requests = [];
    this.generation++;
    this.inFlight = 0;
    this.maxInFlight = 0;
    this.handler = handler ?? (() => new Response("ok"));
  }
}

const ctx = () => backendContext("orders_hook");

const sinks: Sink[] = [];
async function makeSink(options: Record<string, unknown>): Promise<Sink> {
  const spec = httpSink;
  const cfg = v.parse(spec.config, { type: "webhook", ...options });
  const sink = spec.create(cfg, ctx());
  await sink.start();
  sinks.push(sink);
  return sink;
}

const sleep = (ms: number) => Bun.sleep(ms);
const suffix = Math.random().toString(36).slice(2, 8);

let server: Recorder;
beforeAll(() => {
  server = new Recorder();
});
afterAll(() => server.server.stop(true));
afterEach(async () => {
  while (sinks.length) await sinks.pop()!.close();
  server.reset();
});

describe("http sink, batch mode", () => {
  test("one request with a JSON array of envelopes; body and Idempotency-Key stable across a replay", async () => {
    const sink = await makeSink({ url: server.url });
    const messages = forwardMessages(50, { stream_table: `orders_${suffix}` });
    expect(await sink.write(messages)).toEqual([]);
    expect(await sink.write(messages)).toEqual([]);
    expect(server.requests).toHaveLength(2);
    const [first, replay] = server.requests as [Recorded, Recorded];
    expect(first.method).toBe("POST");
    expect(first.path).toBe("/hook");
    expect(first.headers["content-type"]).toBe("application/json");
    const body = JSON.parse(first.body);
    expect(body).toHaveLength(50);
    expect(body.map((e: { dedup_key: string }) => e.dedup_key)).toEqual(messages.map((m) => m.dedup_key));
    expect(Object.keys(body[0])).toEqual(["dedup_key", "subject", "payload", "op", "is_full_refresh", "outbox_id", "refresh_id"]);
    expect(body[3].payload).toEqual(messages[3]!.payload);
    const expectedKey = "batch:" + createHash("sha256").update(messages.map((m) => m.dedup_key).join("\n")).digest("hex");
    expect(first.headers["idempotency-key"]).toBe(expectedKey);
    expect(replay.headers["idempotency-key"]).toBe(expectedKey);
    expect(replay.body).toBe(first.body);
    expect(first.headers["x-pgtrickle-full-refresh"]).toBeUndefined();
  });

  test("a big batch is split by message count and bytes, each request with its own stable key", async () => {
    const sink = await makeSink({ url: server.url, max_batch_messages: 10, method: "PUT" });
    const messages = forwardMessages(25);
    await sink.write(messages);
    await sink.write(messages);
    expect(server.requests).toHaveLength(6);
    const keys = server.requests.map((r) => r.headers["idempotency-key"]);
    expect(new Set(keys.slice(0, 3)).size).toBe(3);
    expect(keys.slice(3)).toEqual(keys.slice(0, 3));
    expect(server.requests.every((r) => r.method === "PUT")).toBe(true);
    const delivered = server.requests.slice(0, 3).flatMap((r) => JSON.parse(r.body).map((e: { dedup_key: string }) => e.dedup_key));
    expect(delivered).toEqual(messages.map((m) => m.dedup_key));

    server.reset();
    const bytesSink = await makeSink({ url: server.url, max_batch_bytes: 4096 });
    const big = forwardMessages(20, { payload: (i) => ({ i, pad: "x".repeat(700) }) });
    await bytesSink.write(big);
    expect(server.requests.length).toBeGreaterThan(3);
    for (const r of server.requests) expect(Buffer.byteLength(r.body)).toBeLessThanOrEqual(4096);
    expect(server.requests.flatMap((r) => JSON.parse(r.body).map((e: { payload: { i: number } }) => e.payload.i))).toEqual(
      big.map((_, i) => i),
    );
  });

  test("X-Pgtrickle-Full-Refresh: true on the requests of a full-refresh change set only; custom headers and User-Agent on every request", async () => {
    const sink = await makeSink({ url: server.url, headers: { "X-Tenant": "acme-corp" } });
    const messages = [...forwardMessages(2), ...forwardMessages(1, { outboxId: 2, full_refresh: true }), ...forwardMessages(1, { outboxId: 3 })];
    await sink.write(messages);
    expect(server.requests).toHaveLength(3);
    // The headers every request shares are built once: a request's own must not stay on them.
    expect(server.requests.map((r) => r.headers["x-pgtrickle-full-refresh"])).toEqual([undefined, "true", undefined]);
    for (const r of server.requests) {
      expect(r.headers["x-tenant"]).toBe("acme-corp");
      expect(r.headers["user-agent"]).toBe(`pgtrickle-relay/${VERSION}`);
    }
    expect(new Set(server.requests.map((r) => r.headers["idempotency-key"])).size).toBe(3);
  });

  test("a request holds one change set: a replay that finds more change sets sends the same requests with the same keys", async () => {
    const sink = await makeSink({ url: server.url, max_batch_messages: 4 });
    const table = `grow_${suffix}`;
    const first = [...forwardMessages(3, { stream_table: table, outboxId: 1 }), ...forwardMessages(6, { stream_table: table, outboxId: 2 })];
    // The replay after a crash: the outbox has grown by another change set meanwhile.
    const replay = [...first, ...forwardMessages(2, { stream_table: table, outboxId: 3 })];
    await sink.write(first);
    const firstRequests = server.requests.map((r) => ({ key: r.headers["idempotency-key"], body: r.body }));
    server.reset();
    await sink.write(replay);
    const outboxIds = (r: Recorded) => [...new Set(JSON.parse(r.body).map((e: { outbox_id: number }) => e.outbox_id))];
    expect(server.requests.map(outboxIds)).toEqual([[1], [2], [2], [3]]);
    expect(server.requests.slice(0, 3).map((r) => ({ key: r.headers["idempotency-key"], body: r.body }))).toEqual(firstRequests);
  });

  test("HTTP 500 then success: retried within the write with the same Idempotency-Key", async () => {
    server.reset((_r, i) => (i === 0 ? new Response("database down", { status: 500 }) : new Response("ok")));
    const sink = await makeSink({ url: server.url });
    expect(await sink.write(forwardMessages(5))).toEqual([]);
    expect(server.requests).toHaveLength(2);
    expect(server.requests[1]!.headers["idempotency-key"]).toBe(server.requests[0]!.headers["idempotency-key"]);
    expect(server.requests[1]!.body).toBe(server.requests[0]!.body);
  });

  test("HTTP 500 on every try: a transient error; the replay sends only the change sets not yet accepted", async () => {
    server.reset((r) => (JSON.parse(r.body)[0].outbox_id === 2 ? new Response("database down", { status: 500 }) : new Response("ok")));
    const sink = await makeSink({ url: server.url });
    const messages = [1, 2, 3].flatMap((outboxId) => forwardMessages(2, { outboxId }));
    const err = await errorOf(sink.write(messages));
    expect(err.kind).toBe("transient");
    expect(err.message).toContain("HTTP 500");
    expect(err.message).toContain(`127.0.0.1:${server.server.port}`);
    const firstIds = server.requests.map((r) => JSON.parse(r.body)[0].outbox_id);
    // Change set 1 accepted, 2 tried a few times, 3 never sent: it must not overtake 2.
    expect(firstIds[0]).toBe(1);
    expect(firstIds.slice(1).every((id: number) => id === 2)).toBe(true);
    expect(firstIds.length).toBeGreaterThan(2);
    server.reset();
    expect(await sink.write(messages)).toEqual([]);
    expect(server.requests.map((r) => JSON.parse(r.body)[0].outbox_id)).toEqual([2, 3]);
  });

  test("HTTP 408 and 429 are transient even when not listed in retry_on_status", async () => {
    const sink = await makeSink({ url: server.url, retry_on_status: [503] });
    for (const status of [408, 429, 503]) {
      server.reset(() => new Response("slow down", { status, headers: { "Retry-After": "2" } }));
      const err = await errorOf(sink.write(forwardMessages(1)));
      expect(err.kind).toBe("transient");
      expect(err.message).toContain(`HTTP ${status}`);
    }
    server.reset(() => new Response("nope", { status: 500 }));
    const rejected = await sink.write(forwardMessages(2));
    expect(rejected).toHaveLength(2);
  });

  test("HTTP 400 rejects the whole request's messages (dead-letter), not a thrown error", async () => {
    server.reset(() => new Response(JSON.stringify({ error: "schema mismatch" }), { status: 400 }));
    const sink = await makeSink({ url: server.url });
    const messages = forwardMessages(4);
    const rejected = await sink.write(messages);
    expect(rejected.map((r) => r.message.dedup_key)).toEqual(messages.map((m) => m.dedup_key));
    expect(rejected[0]!.error).toContain("HTTP 400");
    expect(rejected[0]!.error).toContain("schema mismatch");
  });

  test("batch mode: a batch refused with 4xx for one message is split until that message alone is rejected; the others are delivered, in order", async () => {
    server.reset((r) => (JSON.parse(r.body).some((e: { payload: { id: number } }) => e.payload.id === 5) ? new Response("bad row", { status: 422 }) : new Response("ok")));
    const sink = await makeSink({ url: server.url });
    const messages = forwardMessages(8);
    const rejected = await sink.write(messages);
    expect(rejected.map((r) => r.message.dedup_key)).toEqual([messages[5]!.dedup_key]);
    expect(rejected[0]!.error).toContain("HTTP 422");
    const bodies = server.requests.map((r) => (JSON.parse(r.body) as { payload: { id: number } }[]).map((e) => e.payload.id));
    const accepted = bodies.filter((ids) => !ids.includes(5));
    expect(accepted.flat()).toEqual([0, 1, 2, 3, 4, 6, 7]);
  });

  test("a redirect is not followed and rejects the messages", async () => {
    server.reset(() => new Response(null, { status: 302, headers: { Location: "/elsewhere" } }));
    const sink = await makeSink({ url: server.url });
    const rejected = await sink.write(forwardMessages(2));
    expect(rejected).toHaveLength(2);
    expect(rejected[0]!.error).toContain("HTTP 302");
    expect(server.requests).toHaveLength(1);
  });

  test("no response within timeout_ms: transient error at once, not tried again within the write", async () => {
    server.reset(async () => {
      await sleep(1500);
      return new Response("late");
    });
    const sink = await makeSink({ url: server.url, timeout_ms: 200 });
    const err = await errorOf(sink.write(forwardMessages(3)));
    expect(err.kind).toBe("transient");
    expect(err.message).toContain("no response within 200 ms");
    expect(server.requests).toHaveLength(1);
  });

  test("unreachable receiver: transient error naming host:port", async () => {
    const closed = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: () => new Response() });
    const port = closed.port;
    closed.stop(true);
    const sink = await makeSink({ url: `http://127.0.0.1:${port}/hook`, headers: { Authorization: "Bearer s3cr3t-token-value" } });
    const err = await errorOf(sink.write(forwardMessages(2)));
    expect(err.kind).toBe("transient");
    expect(err.message).toContain(`127.0.0.1:${port}`);
    expect(err.message).not.toContain("s3cr3t-token-value");
  });
});

describe("http sink, per-event mode", () => {
  test("one request per message, key = dedup key; order kept within an ordering key, parallel across keys", async () => {
    server.reset(async () => {
      // Random delays would reorder requests that the sink wrongly sent in parallel.
      await sleep(Math.floor(Math.random() * 8));
      return new Response("ok");
    });
    const sink = await makeSink({ url: server.url, batch_mode: false, max_in_flight: 8 });
    const tables = ["alpha", "beta", "gamma", "delta"];
    const messages = tables.flatMap((t) => forwardMessages(15, { stream_table: `${t}_${suffix}` }));
    // Interleave the tables, as a real batch of several stream tables would be.
    messages.sort((a, b) => Number(a.dedup_key.split(":").at(-1)) - Number(b.dedup_key.split(":").at(-1)));
    expect(await sink.write(messages)).toEqual([]);
    expect(server.requests).toHaveLength(60);
    for (const r of server.requests) {
      const env = JSON.parse(r.body);
      expect(r.headers["idempotency-key"]).toBe(env.dedup_key);
    }
    for (const t of tables) {
      const arrived = server.requests
        .map((r) => JSON.parse(r.body))
        .filter((e) => e.subject === `pgtrickle.${t}_${suffix}.insert`)
        .map((e) => e.payload.id);
      expect(arrived).toEqual([...Array(15).keys()]);
    }
    expect(server.maxInFlight).toBeGreaterThan(1);
    expect(server.maxInFlight).toBeLessThanOrEqual(4);
  });

  test("a 400 for one message rejects only that message; the others are delivered", async () => {
    server.reset((r) => (JSON.parse(r.body).payload.id === 3 ? new Response("bad row", { status: 422 }) : new Response("ok")));
    const sink = await makeSink({ url: server.url, batch_mode: false, ordering_key_template: "{dedup_key}" });
    const messages = forwardMessages(8);
    const rejected = await sink.write(messages);
    expect(rejected.map((r) => r.message.dedup_key)).toEqual([messages[3]!.dedup_key]);
    expect(rejected[0]!.error).toContain("HTTP 422");
    expect(server.requests).toHaveLength(8);
  });

  test("a receiver failing now and then: only the failed requests are sent again, in order per key, within the write", async () => {
    const failedOnce = new Set<number>();
    server.reset((r) => {
      const id = JSON.parse(r.body).payload.id;
      // The first try of every seventh message fails, as a mildly flaky receiver does.
      if (id % 7 === 3 && !failedOnce.has(id)) {
        failedOnce.add(id);
        return new Response("hiccup", { status: 500 });
      }
      return new Response("ok");
    });
    const sink = await makeSink({ url: server.url, batch_mode: false, max_in_flight: 8 });
    const messages = forwardMessages(40);
    expect(await sink.write(messages)).toEqual([]);
    const ids = server.requests.map((r) => JSON.parse(r.body).payload.id);
    expect(ids).toHaveLength(40 + failedOnce.size);
    // One ordering key ({stream_table}): each failed message is tried again before the next one.
    expect(ids).toEqual(messages.flatMap((_, id) => (failedOnce.has(id) ? [id, id] : [id])));
  });

  test("a transient failure stops the later messages of the same key; the replay skips what was accepted", async () => {
    let down = true;
    server.reset((r) => (down && JSON.parse(r.body).payload.id === 2 ? new Response("busy", { status: 503 }) : new Response("ok")));
    const sink = await makeSink({ url: server.url, batch_mode: false });
    const messages = forwardMessages(6);
    const err = await errorOf(sink.write(messages));
    expect(err.kind).toBe("transient");
    const ids = server.requests.map((r) => JSON.parse(r.body).payload.id);
    expect(ids.slice(0, 2)).toEqual([0, 1]);
    expect(ids.length).toBeGreaterThan(3);
    expect(ids.slice(2).every((id: number) => id === 2)).toBe(true);
    down = false;
    server.reset(server.handler);
    expect(await sink.write(messages)).toEqual([]);
    expect(server.requests.map((r) => JSON.parse(r.body).payload.id)).toEqual([2, 3, 4, 5]);
  });

  test("a rejection in a write that then failed is still returned by its replay, without sending it again", async () => {
    server.reset((r) => {
      const id = JSON.parse(r.body).payload.id;
      return id === 1 ? new Response("bad row", { status: 422 }) : id === 4 ? new Response("busy", { status: 503 }) : new Response("ok");
    });
    const sink = await makeSink({ url: server.url, batch_mode: false, ordering_key_template: "{dedup_key}", max_in_flight: 1 });
    const messages = forwardMessages(6);
    expect((await errorOf(sink.write(messages))).kind).toBe("transient");
    server.reset();
    const rejected = await sink.write(messages);
    expect(rejected.map((r) => r.message.dedup_key)).toEqual([messages[1]!.dedup_key]);
    expect(rejected[0]!.error).toContain("HTTP 422");
    expect(server.requests.map((r) => JSON.parse(r.body).payload.id)).toEqual([4, 5]);
  });

  test("any outbox name makes a legal Idempotency-Key: non-ASCII and % are percent-encoded, reversibly", async () => {
    const sink = await makeSink({ url: server.url, batch_mode: false });
    const messages = [
      ...forwardMessages(2, { stream_table: `commandes_été_注文_${suffix}` }),
      ...forwardMessages(1, { stream_table: `taux_100%_${suffix}` }),
      ...forwardMessages(1, { stream_table: `plain_${suffix}` }),
    ];
    expect(await sink.write(messages)).toEqual([]);
    expect(server.requests).toHaveLength(4);
    for (const r of server.requests) {
      const key = r.headers["idempotency-key"]!;
      expect(key).toMatch(/^[\x21-\x7e]+$/);
      expect(decodeURIComponent(key)).toBe(JSON.parse(r.body).dedup_key);
    }
    const plain = server.requests.find((r) => r.body.includes("plain_"))!;
    expect(plain.headers["idempotency-key"]).toBe(messages[3]!.dedup_key);
    expect(headerValue("a b%c")).toBe("a%20b%25c");
  });
});

describe("http sink, signing and CloudEvents", () => {
  test("X-Pgtrickle-Signature verifies against the raw body with the secret, and only with it", async () => {
    const secret = `whsec_${suffix}_0123456789`;
    const sink = await makeSink({ url: server.url, signing_secret: secret });
    await sink.write(forwardMessages(3));
    const req = server.requests[0]!;
    const header = req.headers["x-pgtrickle-signature"]!;
    expect(header).toMatch(/^t=\d+,v1=[0-9a-f]{64}$/);
    expect(verifySignature(secret, req.body, header)).toBe(true);
    expect(verifySignature("another-secret", req.body, header)).toBe(false);
    expect(verifySignature(secret, req.body + " ", header)).toBe(false);
    const t = Number(header.slice(2, header.indexOf(",")));
    expect(verifySignature(secret, req.body, header, { now: t + 301 })).toBe(false);
    expect(verifySignature(secret, "x", signPayload(secret, "x", 1000), { now: 1100 })).toBe(true);
    expect(sink.describe).not.toContain(secret);
  });

  test("CloudEvents structured mode: per-event and batch shapes", async () => {
    const sink = await makeSink({ url: server.url, batch_mode: false, cloudevents: true });
    const [m] = forwardMessages(1, { full_refresh: true, outboxId: 42 });
    await sink.write([m!]);
    const req = server.requests[0]!;
    expect(req.headers["content-type"]).toBe("application/cloudevents+json");
    const ce = JSON.parse(req.body);
    expect(ce).toMatchObject({
      specversion: "1.0",
      id: m!.dedup_key,
      source: "pgtrickle-relay/orders_hook",
      type: "pgtrickle.insert",
      subject: m!.subject,
      datacontenttype: "application/json",
      data: m!.payload,
      pgtfullrefresh: true,
      pgtoutboxid: "42",
    });
    expect(Number.isNaN(Date.parse(ce.time))).toBe(false);
    for (const name of Object.keys(ce)) if (name !== "data") expect(name).toMatch(/^[a-z][a-z0-9]{0,19}$/);

    server.reset();
    const batchSink = await makeSink({ url: server.url, cloudevents: true, ce_source: "urn:shop:{stream_table}", ce_type: "com.shop.{stream_table}.{op}" });
    await batchSink.write(forwardMessages(3));
    const batchReq = server.requests[0]!;
    expect(batchReq.headers["content-type"]).toBe("application/cloudevents-batch+json");
    const events = JSON.parse(batchReq.body);
    expect(events).toHaveLength(3);
    expect(events[2]).toMatchObject({ source: "urn:shop:orders", type: "com.shop.orders.insert", pgtfullrefresh: false });
  });
});

describe("http sink, secrets and configuration", () => {
  test("no header value, signing secret or URL token appears in errors or describe", async () => {
    const token = `tok-${suffix}-9f8e7d6c5b4a`;
    const secret = `sig-${suffix}-a1b2c3d4e5`;
    // A receiver that echoes the request headers back in its error body.
    server.reset((r) => new Response(JSON.stringify(r), { status: r.path.includes("fail=500") ? 500 : 401 }));
    const sink = await makeSink({
      url: `${server.url}?key=${token}`,
      headers: { Authorization: `Bearer ${token}` },
      signing_secret: secret,
    });
    const rejected = await sink.write(forwardMessages(1));
    expect(rejected).toHaveLength(1);
    expect(rejected[0]!.error).toContain("HTTP 401");
    for (const text of [rejected[0]!.error, sink.describe]) {
      expect(text).not.toContain(token);
      expect(text).not.toContain(secret);
    }
    const failing = await makeSink({ url: `${server.url}?fail=500&key=${token}`, headers: { "X-Api-Key": token } });
    const err = await errorOf(failing.write(forwardMessages(1)));
    expect(err.message).toContain("HTTP 500");
    expect(err.message).not.toContain(token);
  });

  test("configuration errors name the key and never echo a header value", async () => {
    expect(() => v.parse(httpSink.config, { url: "ftp://example.com/x" })).toThrow(/url must be an absolute http/);
    let message = "";
    try {
      v.parse(httpSink.config, { url: "http://127.0.0.1/x", headers: { Authorization: "Bearer top\nsecret" } });
    } catch (err) {
      message = (err as Error).message;
    }
    expect(message).toContain("line break");
    expect(message).not.toContain("secret");
    expect(() => httpSink.create(v.parse(httpSink.config, { url: server.url, headers: { "Idempotency-Key": "x" } }), ctx())).toThrow(
      /Idempotency-Key is set by the relay/,
    );
    const sink = httpSink.create(v.parse(httpSink.config, { url: "https://127.0.0.1:1/x", tls_ca: "/nonexistent/ca.pem" }), ctx());
    const err = await errorOf(sink.start());
    expect(err.kind).toBe("config");
    expect(err.message).toContain("tls_ca");
  });

  test("https with a custom CA (tls_ca) is trusted; without it the certificate is refused (a config error: docs/TLS.md)", async () => {
    const dir = mkdtempSync(join(tmpdir(), "relay-http-tls-"));
    try {
      const run = (args: string[]) => {
        const p = Bun.spawnSync(["openssl", ...args], { cwd: dir, stderr: "pipe" });
        if (p.exitCode !== 0) throw new Error(`openssl ${args[0]} failed: ${p.stderr.toString()}`);
      };
      run(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=relay test CA"]);
      run(["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=127.0.0.1"]);
      await Bun.write(join(dir, "ext.cnf"), "subjectAltName=IP:127.0.0.1\n");
      run(["x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "srv.pem", "-days", "2", "-extfile", "ext.cnf"]);
      const secure = new Recorder({ cert: readFileSync(join(dir, "srv.pem"), "utf8"), key: readFileSync(join(dir, "srv.key"), "utf8") });
      try {
        const url = `https://127.0.0.1:${secure.server.port}/hook`;
        const trusted = await makeSink({ url, tls_ca: join(dir, "ca.pem") });
        expect(await trusted.write(forwardMessages(2))).toEqual([]);
        expect(secure.requests).toHaveLength(1);
        const untrusted = await makeSink({ url });
        const err = await errorOf(untrusted.write(forwardMessages(2)));
        expect(err.kind).toBe("config");
        expect(err.message).toContain(`127.0.0.1:${secure.server.port}`);
        expect(err.message).toContain("TLS: the server's certificate is not signed by tls_ca");
        expect(secure.requests).toHaveLength(1);
      } finally {
        secure.server.stop(true);
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
