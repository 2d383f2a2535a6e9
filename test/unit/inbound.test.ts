// Section numbers (§…) in test names refer to docs/interface.md.
import { describe, expect, test } from "bun:test";
import * as v from "valibot";
import { splitTlsParams, tlsOption } from "../../src/backends/pg-inbox/client.ts";
import { splitQualifiedName } from "../../src/backends/pg-inbox/config.ts";
import { RecordScanner, type RawRecord } from "../../src/backends/file/scanner.ts";
import {
  aggregateIdOf,
  bodyDedupKey,
  decodeBody,
  exceedsJsonDepth,
  MAX_JSON_DEPTH,
  parseJson,
  eventTypeOf,
  headerValue,
  inboundMessage,
  inboundSourceOf,
  reverseDedupKey,
  reverseSourceKeys,
  sha256Hex,
  traceIdFromTraceparent,
  TOO_DEEP,
  traceIdOf,
} from "../../src/inbound.ts";

const TRACE = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACEPARENT = `00-${TRACE}-00f067aa0ba902b7-01`;

describe("exceedsJsonDepth: the nesting bound of reverse payloads", () => {
  const nested = (depth: number) => JSON.parse("[".repeat(depth) + "]".repeat(depth));
  test("counts arrays and objects; scalars have depth 0", () => {
    expect(exceedsJsonDepth("text", 0)).toBe(false);
    expect(exceedsJsonDepth({ a: [1, { b: 2 }] }, 3)).toBe(false);
    expect(exceedsJsonDepth({ a: [1, { b: 2 }] }, 2)).toBe(true);
  });
  test("MAX_JSON_DEPTH levels pass, one more does not, and 30,000 levels are walked without a stack overflow", () => {
    expect(exceedsJsonDepth(nested(MAX_JSON_DEPTH))).toBe(false);
    expect(exceedsJsonDepth(nested(MAX_JSON_DEPTH + 1))).toBe(true);
    expect(exceedsJsonDepth(nested(30000))).toBe(true);
  });
});

describe("JSON nested too deep is refused at the door", () => {
  const deep = (depth: number) => "[".repeat(depth) + "]".repeat(depth);
  test("parseJson: MAX_JSON_DEPTH levels parse; more are refused, also past what JSON.parse itself can nest", () => {
    expect(parseJson(deep(MAX_JSON_DEPTH)).ok).toBe(true);
    for (const depth of [MAX_JSON_DEPTH + 1, 30000, 200000]) expect(parseJson(deep(depth))).toEqual({ ok: false, error: TOO_DEEP, tooDeep: true });
  });
  test("objects and arrays nested alternately count alike; many brackets side by side are not depth", () => {
    const alternating = (depth: number) => Array.from({ length: depth }, (_, i) => (i % 2 ? '{"a":' : "[")).join("") + "1" + Array.from({ length: depth }, (_, i) => (i % 2 ? "}" : "]")).reverse().join("");
    expect(parseJson(alternating(MAX_JSON_DEPTH)).ok).toBe(true);
    expect(parseJson(alternating(MAX_JSON_DEPTH + 1))).toEqual({ ok: false, error: TOO_DEEP, tooDeep: true });
    // 3 × MAX_JSON_DEPTH flat events, brackets in their strings too: depth 2.
    const flat = JSON.stringify(Array.from({ length: 3 * MAX_JSON_DEPTH }, (_, i) => ({ i, text: "[{" })));
    expect(parseJson(flat).ok).toBe(true);
  });
  test("decodeBody keeps the text and says tooDeep; inboundMessage marks the message refused", () => {
    const body = deep(30000);
    expect(decodeBody(body)).toEqual({ payload: body, json: false, tooDeep: true });
    const m = inboundMessage({ pipeline: "p", sourceType: "kafka", body: Buffer.from(body), synthesizedKey: "kafka:t:0:1", config: { event_type_field: "event_type" } });
    expect(m.refused).toBe(TOO_DEEP);
    expect(m.payload).toBe(body);
    expect(inboundMessage({ pipeline: "p", sourceType: "kafka", body: "[[1]]", synthesizedKey: "k", config: { event_type_field: "event_type" } }).refused).toBeUndefined();
  });
});

describe("decodeBody: never null for a non-JSON body", () => {
  test("JSON text and bytes parse to the value", () => {
    expect(decodeBody('{"a":1}')).toEqual({ payload: { a: 1 }, json: true });
    expect(decodeBody(new TextEncoder().encode("[1,2]"))).toEqual({ payload: [1, 2], json: true });
    expect(decodeBody("42")).toEqual({ payload: 42, json: true });
    expect(decodeBody("null")).toEqual({ payload: null, json: true });
  });
  test("a byte-order mark does not make JSON invalid", () => {
    expect(decodeBody(new Uint8Array([0xef, 0xbb, 0xbf, ...new TextEncoder().encode('{"a":1}')])).payload).toEqual({ a: 1 });
  });
  test("valid UTF-8 that is not JSON becomes a JSON string", () => {
    expect(decodeBody("hello wörld")).toEqual({ payload: "hello wörld", json: false });
    expect(decodeBody(new TextEncoder().encode("{broken"))).toEqual({ payload: "{broken", json: false });
    expect(decodeBody("")).toEqual({ payload: "", json: false });
  });
  test("invalid UTF-8 becomes {base64}", () => {
    const bytes = new Uint8Array([0xff, 0xfe, 0x00, 0x41]);
    expect(decodeBody(bytes)).toEqual({ payload: { base64: Buffer.from(bytes).toString("base64") }, json: false });
  });
});

describe("event_type (§6.6)", () => {
  const rule = { field: "event_type", sourceType: "kafka" };
  test("body field wins when it is a non-empty string", () => {
    expect(eventTypeOf({ event_type: "order.created" }, { ...rule, candidate: "topic", configured: "cfg" })).toBe("order.created");
  });
  test("a custom event_type_field is honoured", () => {
    expect(eventTypeOf({ type: "t1", event_type: "ignored" }, { ...rule, field: "type" })).toBe("t1");
  });
  test("then the source's candidate, then the configured type, then the source type", () => {
    expect(eventTypeOf({ event_type: 5 }, { ...rule, candidate: "orders", configured: "cfg" })).toBe("orders");
    expect(eventTypeOf({ event_type: "" }, { ...rule, candidate: null, configured: "cfg" })).toBe("cfg");
    expect(eventTypeOf("plain text", { ...rule, candidate: "", configured: "" })).toBe("kafka");
    expect(eventTypeOf(["event_type"], rule)).toBe("kafka");
  });
});

describe("source, aggregate_id", () => {
  test("source: body string, else <type>:<where>, else the type", () => {
    expect(inboundSourceOf({ source: "billing" }, "nats", "events.>")).toBe("billing");
    expect(inboundSourceOf({ source: 1 }, "nats", "events.>")).toBe("nats:events.>");
    expect(inboundSourceOf(null, "stdin")).toBe("stdin");
  });
  test("aggregate_id: body string or number as text, else the fallback, else null", () => {
    expect(aggregateIdOf({ aggregate_id: "ord-1" }, "key")).toBe("ord-1");
    expect(aggregateIdOf({ aggregate_id: 42 }, "key")).toBe("42");
    expect(aggregateIdOf({ aggregate_id: 1.5 })).toBe("1.5");
    expect(aggregateIdOf({ aggregate_id: { x: 1 } }, "key")).toBe("key");
    expect(aggregateIdOf({ aggregate_id: true })).toBeNull();
    expect(aggregateIdOf("text")).toBeNull();
  });
});

describe("trace_id", () => {
  test("valid W3C traceparent values", () => {
    expect(traceIdFromTraceparent(TRACEPARENT)).toBe(TRACE);
    expect(traceIdFromTraceparent(` ${TRACEPARENT} `)).toBe(TRACE);
    // A later version may carry more fields.
    expect(traceIdFromTraceparent(`01-${TRACE}-00f067aa0ba902b7-01-extra`)).toBe(TRACE);
  });
  test("invalid traceparent values give null", () => {
    for (const bad of [
      "",
      "garbage",
      `00-${TRACE.toUpperCase()}-00f067aa0ba902b7-01`,
      `ff-${TRACE}-00f067aa0ba902b7-01`,
      `00-${"0".repeat(32)}-00f067aa0ba902b7-01`,
      `00-${TRACE}-${"0".repeat(16)}-01`,
      `00-${TRACE}-00f067aa0ba902b7-01-extra`,
      `00-${TRACE.slice(1)}-00f067aa0ba902b7-01`,
    ]) {
      expect(traceIdFromTraceparent(bad)).toBeNull();
    }
    expect(traceIdFromTraceparent(undefined)).toBeNull();
  });
  test("header first (any case), else body trace_id, else a body traceparent", () => {
    expect(traceIdOf({ Traceparent: TRACEPARENT }, { trace_id: "body" })).toBe(TRACE);
    expect(traceIdOf({ traceparent: "invalid" }, { trace_id: "body" })).toBe("body");
    expect(traceIdOf(undefined, { traceparent: TRACEPARENT })).toBe(TRACE);
    expect(traceIdOf({}, { trace_id: 7 })).toBeNull();
  });
  test("headerValue is case-insensitive", () => {
    expect(headerValue({ "X-Event-Type": "a" }, "x-event-type")).toBe("a");
    expect(headerValue(undefined, "x")).toBeNull();
  });
});

describe("dedup keys (§6.5)", () => {
  test("a producer key is used verbatim", () => {
    expect(reverseDedupKey("outbox_orders:42:3", "file:/x:1")).toBe("outbox_orders:42:3");
  });
  test("otherwise the synthesized key, deterministic", () => {
    expect(reverseDedupKey(null, "kafka:t:0:5")).toBe("kafka:t:0:5");
    expect(reverseDedupKey("", () => `stdin:${sha256Hex("line")}`)).toBe(`stdin:${sha256Hex("line")}`);
    expect(sha256Hex("line")).toBe(sha256Hex(new TextEncoder().encode("line")));
    expect(sha256Hex("line")).toMatch(/^[0-9a-f]{64}$/);
  });
  test("an empty synthesized key is a programming error", () => {
    expect(() => reverseDedupKey(undefined, "")).toThrow();
  });
  test("body dedup fields: dedup_key, then pgt_dedup_key", () => {
    expect(bodyDedupKey({ dedup_key: "a", pgt_dedup_key: "b" })).toBe("a");
    expect(bodyDedupKey({ pgt_dedup_key: "b" })).toBe("b");
    expect(bodyDedupKey({ dedup_key: 1 })).toBeNull();
    expect(bodyDedupKey("x")).toBeNull();
  });
});

describe("inboundMessage", () => {
  const config = { event_type_field: "event_type" };
  test("builds an event message with the §6.6 columns", () => {
    const m = inboundMessage({
      pipeline: "p",
      sourceType: "kafka",
      where: "orders",
      body: new TextEncoder().encode(JSON.stringify({ event_type: "order.created", aggregate_id: 7, id: 1 })),
      headers: { traceparent: TRACEPARENT },
      producerKey: null,
      synthesizedKey: "kafka:orders:0:12",
      eventTypeCandidate: "orders",
      aggregateIdFallback: "rec-key",
      config,
    });
    expect(m).toEqual({
      dedup_key: "kafka:orders:0:12",
      subject: "order.created",
      payload: { event_type: "order.created", aggregate_id: 7, id: 1 },
      op: "event",
      is_full_refresh: false,
      outbox_id: null,
      refresh_id: null,
      context: { pipeline: "p" },
      headers: { traceparent: TRACEPARENT },
      inbound: { source: "kafka:orders", aggregate_id: "7", trace_id: TRACE },
    });
  });
  test("non-JSON body, producer key, fallbacks", () => {
    const m = inboundMessage({
      pipeline: "p",
      sourceType: "http",
      body: "not json",
      producerKey: "idem-1",
      synthesizedKey: () => {
        throw new Error("must not be called when a producer key exists");
      },
      aggregateIdFallback: "k",
      config: { ...config, event_type: "webhook.received" },
    });
    expect(m.dedup_key).toBe("idem-1");
    expect(m.payload).toBe("not json");
    expect(m.subject).toBe("webhook.received");
    expect(m.inbound).toEqual({ source: "http", aggregate_id: "k", trace_id: null });
    expect(m.headers).toBeUndefined();
  });
  test("accepts an already decoded body", () => {
    const m = inboundMessage({ pipeline: "p", sourceType: "file", where: "/x", body: decodeBody('{"source":"crm"}'), synthesizedKey: "file:/x:1", config });
    expect(m.payload).toEqual({ source: "crm" });
    expect(m.inbound?.source).toBe("crm");
    expect(m.subject).toBe("file");
  });
});

test("reverseSourceKeys: defaults of the shared keys", () => {
  const schema = v.looseObject({ ...reverseSourceKeys });
  expect(v.parse(schema, {})).toEqual({ event_type_field: "event_type", batch_size: 100, poll_interval_ms: 1000 });
  expect(v.safeParse(schema, { batch_size: 0 }).success).toBe(false);
  expect(v.safeParse(schema, { event_type: "" }).success).toBe(false);
});

// ── pieces of the stdin/file source and the pg-inbox sink that need no server ─────────────────


function scanAll(format: "jsonl" | "json_pretty", chunks: string[], finish = true): Array<Omit<RawRecord, "bytes"> & { text: string }> {
  const s = new RecordScanner(format, 0, 1);
  const out: RawRecord[] = [];
  for (const c of chunks) {
    s.push(Buffer.from(c));
    for (let r = s.next(); r; r = s.next()) out.push(r);
  }
  if (finish) {
    const last = s.finish();
    if (last) out.push(last);
  }
  return out.map(({ bytes, ...rest }) => ({ text: bytes.toString(), ...rest }));
}

describe("RecordScanner", () => {
  test("jsonl: lines with offsets past their newline; blank lines skipped; CRLF trimmed; split chunks", () => {
    expect(scanAll("jsonl", ['{"a":1}\n\n{"b"', ':2}\r\n', "  \n", "tail"])).toEqual([
      { text: '{"a":1}', line: 1, end: 8, endLine: 2 },
      { text: '{"b":2}', line: 3, end: 18, endLine: 4 },
      { text: "tail", line: 5, end: 25, endLine: 5 },
    ]);
  });
  test("jsonl: a last line without newline waits until finish()", () => {
    const s = new RecordScanner("jsonl", 100, 7);
    s.push(Buffer.from('{"a":1}'));
    expect(s.next()).toBeNull();
    expect(s.pending).toBe(true);
    expect(s.finish()).toMatchObject({ line: 7, end: 107, endLine: 7 });
  });
  test("json_pretty: values spanning lines, brackets inside strings, garbage costs one line", () => {
    const a = JSON.stringify({ a: "}{][\"\\", b: [1, { c: 2 }] }, null, 2);
    const text = `${a}\nnot json at all\n  [1,\n 2]\n"scalar"\n`;
    const out = scanAll("json_pretty", [text.slice(0, 10), text.slice(10, 33), text.slice(33)]);
    expect(out.map((r) => [r.text, r.line])).toEqual([
      [a, 1],
      ["not json at all", a.split("\n").length + 1],
      ["[1,\n 2]", a.split("\n").length + 2],
      ['"scalar"', a.split("\n").length + 4],
    ]);
    expect(out.at(-1)!.end).toBe(Buffer.byteLength(text));
  });
  test("json_pretty: an unterminated value is handed out by finish()", () => {
    expect(scanAll("json_pretty", ['{"a": [1, 2'], true).map((r) => r.text)).toEqual(['{"a": [1, 2']);
    expect(scanAll("json_pretty", ['{"a": [1, 2'], false)).toEqual([]);
  });
});

describe("pg-inbox helpers", () => {
  test("splitQualifiedName", () => {
    expect(splitQualifiedName("orders_inbox")).toEqual({ schema: null, name: "orders_inbox" });
    expect(splitQualifiedName("app.orders_inbox")).toEqual({ schema: "app", name: "orders_inbox" });
    expect(splitQualifiedName('"we.ird"."Na""me"')).toEqual({ schema: "we.ird", name: 'Na"me' });
    expect(() => splitQualifiedName("a.b.c")).toThrow();
    expect(() => splitQualifiedName("a.")).toThrow();
    expect(() => splitQualifiedName('"open')).toThrow();
  });
  test("splitTlsParams takes libpq TLS parameters off the URL", () => {
    const r = splitTlsParams("postgres://u:p@h:5433/db?sslmode=verify-full&sslrootcert=%2Fca.pem&application_name=x");
    expect(r).toEqual({ url: "postgres://u:p@h:5433/db?application_name=x", sslmode: "verify-full", sslrootcert: "/ca.pem", sslcert: undefined, sslkey: undefined });
    expect(() => splitTlsParams("postgres://h/db?sslmode=maybe")).toThrow();
  });
  test("tlsOption per sslmode, with the material loadTls read", () => {
    expect(tlsOption(undefined, undefined)).toBe(false);
    expect(tlsOption("disable", undefined)).toBe(false);
    expect(() => tlsOption("disable", { ca: "PEM" })).toThrow("sslmode=disable, but tls keys are set");
    expect(tlsOption("prefer", undefined)).toBe("prefer");
    expect(tlsOption("require", undefined)).toBe("require");
    expect(tlsOption("verify-full", undefined)).toEqual({ rejectUnauthorized: true });
    expect(tlsOption(undefined, undefined, true)).toEqual({ rejectUnauthorized: true });
    // tls keys alone mean verify-full; tls_insecure_skip_verify still turns the check off
    expect(tlsOption(undefined, { ca: "PEM", rejectUnauthorized: true })).toEqual({ ca: "PEM", rejectUnauthorized: true });
    expect(tlsOption("verify-full", { rejectUnauthorized: false })).toEqual({ rejectUnauthorized: false });
    for (const [mode, tls] of [["verify-ca", undefined], ["require", { ca: "PEM", rejectUnauthorized: true }]] as const) {
      const verifyCa = tlsOption(mode, tls) as { rejectUnauthorized: boolean; checkServerIdentity: () => unknown };
      expect(verifyCa.rejectUnauthorized).toBe(true);
      expect(verifyCa.checkServerIdentity()).toBeUndefined();
    }
  });
});
