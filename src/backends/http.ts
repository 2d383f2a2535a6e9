/**
 * HTTP webhook sink (CONTRACT.md §5.3 http, §6.4).
 *
 * Batch mode (default) POSTs a JSON array of envelopes per request; a batch larger than
 * `max_batch_messages` / `max_batch_bytes` is split into several requests, each with its own
 * `Idempotency-Key` = `batch:` + hex SHA-256 of its newline-joined dedup keys, so a replay of the
 * same messages carries the same key. Per-event mode sends one request per message
 * (`Idempotency-Key` = the dedup key) with up to `max_in_flight` requests in flight, one at a time
 * per ordering key.
 *
 * Signing (`signing_secret`), Stripe style:
 *   X-Pgtrickle-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>
 * A receiver verifies it by recomputing the HMAC over the exact raw request body bytes (before any
 * JSON parsing), comparing in constant time, and refusing timestamps older than a tolerance
 * (5 minutes is usual) to block replays of captured requests. `verifySignature` below does that.
 */
import { createHash, createHmac, timingSafeEqual } from "node:crypto";
import { readFileSync } from "node:fs";
import * as v from "valibot";
import { configError, errorMessage, RelayError, transientError } from "../errors.ts";
import { envelopeJson, renderTemplate, type Message } from "../message.ts";
import { VERSION } from "../version.ts";
import { defineBackend, sinkSpec, type BackendContext, type Rejection, type Sink } from "./types.ts";

const HEADER_NAME = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;
const RESERVED_HEADERS = ["content-type", "idempotency-key", "x-pgtrickle-signature", "x-pgtrickle-full-refresh"];

// Custom messages throughout: valibot's defaults echo the received value, and header values and
// the signing secret are secrets.
const HttpSinkConfig = v.looseObject({
  /** Sink type (`http` or `webhook`); ignored here. */
  type: v.optional(v.string()),
  /** Destination URL, `http://` or `https://`. Query strings are sent but never logged. */
  url: v.pipe(
    v.string("url must be a string"),
    v.check((u) => /^https?:\/\/[^/]/i.test(u) && URL.canParse(u), "url must be an absolute http:// or https:// URL"),
  ),
  /** HTTP method of every request. */
  method: v.optional(v.picklist(["POST", "PUT"], "method must be POST or PUT"), "POST"),
  /**
   * Extra request headers, e.g. `{"Authorization": "Bearer ${env:HOOK_TOKEN}"}`. Values may hold
   * secrets and are never logged. Content-Type, Idempotency-Key and the X-Pgtrickle-* headers are
   * set by the relay and cannot be overridden.
   */
  headers: v.optional(
    v.pipe(
      v.record(v.string(), v.string("header values must be strings"), "headers must be an object of strings"),
      v.check(
        (h) => Object.keys(h).every((k) => HEADER_NAME.test(k)),
        "headers: a header name contains characters not allowed in HTTP header names",
      ),
      v.check(
        (h) => Object.values(h).every((x) => !/[\r\n\0]/.test(x)),
        "headers: a header value contains a line break or NUL",
      ),
    ),
    {},
  ),
  /** Per-request timeout in milliseconds; a timeout is a transient failure. */
  timeout_ms: v.optional(v.pipe(v.number(), v.integer(), v.minValue(1)), 10000),
  /** true: one request carries a JSON array of envelopes; false: one request per message. */
  batch_mode: v.optional(v.boolean(), true),
  /** Batch mode: at most this many messages per request (larger batches are split). */
  max_batch_messages: v.optional(v.pipe(v.number(), v.integer(), v.minValue(1)), 500),
  /**
   * Batch mode: a request body stays under this many bytes where possible (a single larger
   * message still goes alone in one request).
   */
  max_batch_bytes: v.optional(v.pipe(v.number(), v.integer(), v.minValue(1024)), 1048576),
  /** Requests in flight at once (across ordering keys). */
  max_in_flight: v.optional(v.pipe(v.number(), v.integer(), v.minValue(1)), 16),
  /**
   * Messages with the same rendered key are delivered one after another, in order; different keys
   * go in parallel. Variables as in subject templates plus row fields and `{dedup_key}`; the
   * default keeps a whole stream table in order, `{stream_table}:{id}` keeps order per row id.
   */
  ordering_key_template: v.optional(v.string(), "{stream_table}"),
  /**
   * Response statuses retried as transient failures (the batch is replayed). 408 and 429 are
   * always transient; any other non-2xx status rejects the request's messages to the dead-letter table.
   */
  retry_on_status: v.optional(v.array(v.pipe(v.number(), v.integer(), v.minValue(100), v.maxValue(599))), [
    429, 500, 502, 503, 504,
  ]),
  /** HMAC-SHA256 key for the `X-Pgtrickle-Signature` header; never logged. */
  signing_secret: v.optional(v.pipe(v.string("signing_secret must be a string"), v.minLength(1, "signing_secret is empty"))),
  /** Send CloudEvents 1.0 in structured JSON mode instead of relay envelopes. */
  cloudevents: v.optional(v.boolean(), false),
  /** CloudEvents `source` (template); default `pgtrickle-relay/<pipeline>`. */
  ce_source: v.optional(v.string()),
  /** CloudEvents `type` (template). */
  ce_type: v.optional(v.string(), "pgtrickle.{op}"),
  /** CA certificate(s) to trust for https: a PEM file path or inline PEM. */
  tls_ca: v.optional(v.string()),
  /** Client certificate for mutual TLS: PEM file path or inline PEM (needs `tls_key`). */
  tls_cert: v.optional(v.string()),
  /** Client private key for mutual TLS: PEM file path or inline PEM. */
  tls_key: v.optional(v.string()),
});

export type HttpSinkOptions = v.InferOutput<typeof HttpSinkConfig>;

// ---------------------------------------------------------------------------------------------
// Signing

/** The `X-Pgtrickle-Signature` value for `body` signed at `timestamp` (unix seconds). */
export function signPayload(secret: string, body: string | Uint8Array, timestamp: number = Math.floor(Date.now() / 1000)): string {
  const mac = createHmac("sha256", secret).update(`${timestamp}.`).update(body).digest("hex");
  return `t=${timestamp},v1=${mac}`;
}

/**
 * Checks an `X-Pgtrickle-Signature` header against the raw body. Accepts any of several `v1=`
 * entries (secret rotation) and refuses timestamps further than `toleranceSeconds` from now.
 */
export function verifySignature(
  secret: string,
  body: string | Uint8Array,
  header: string | null | undefined,
  options: { toleranceSeconds?: number; now?: number } = {},
): boolean {
  if (!header) return false;
  let timestamp: number | undefined;
  const candidates: string[] = [];
  for (const part of header.split(",")) {
    const eq = part.indexOf("=");
    if (eq < 0) continue;
    const name = part.slice(0, eq).trim();
    const value = part.slice(eq + 1).trim();
    if (name === "t" && /^\d+$/.test(value)) timestamp = Number(value);
    else if (name === "v1" && /^[0-9a-f]{64}$/i.test(value)) candidates.push(value.toLowerCase());
  }
  if (timestamp === undefined || candidates.length === 0) return false;
  const now = options.now ?? Math.floor(Date.now() / 1000);
  if (Math.abs(now - timestamp) > (options.toleranceSeconds ?? 300)) return false;
  const expected = Buffer.from(createHmac("sha256", secret).update(`${timestamp}.`).update(body).digest("hex"));
  return candidates.some((c) => timingSafeEqual(Buffer.from(c), expected));
}

// ---------------------------------------------------------------------------------------------
// Ordered, bounded concurrency

/**
 * Runs tasks with at most `limit` in flight; a task starts only after every earlier task sharing
 * one of its keys has finished. After the first throw no further task starts (the batch will be
 * replayed anyway, and later messages of a key must not overtake a failed earlier one).
 */
async function runKeyed<T>(tasks: { keys: string[]; run: () => Promise<T> }[], limit: number): Promise<{ results: T[]; errors: unknown[] }> {
  const results: T[] = [];
  const errors: unknown[] = [];
  const tails = new Map<string, Promise<unknown>>();
  const waiting: (() => void)[] = [];
  let active = 0;
  let stopped = false;
  const acquire = () => (active < limit ? (active++, Promise.resolve()) : new Promise<void>((r) => waiting.push(r)));
  const release = () => {
    const next = waiting.shift();
    if (next) next();
    else active--;
  };
  const all = tasks.map((task) => {
    const deps = task.keys.map((k) => tails.get(k)).filter((p): p is Promise<unknown> => p !== undefined);
    const done = (async () => {
      if (deps.length) await Promise.all(deps);
      await acquire();
      try {
        if (stopped) return;
        results.push(await task.run());
      } catch (err) {
        stopped = true;
        errors.push(err);
      } finally {
        release();
      }
    })();
    for (const k of task.keys) tails.set(k, done);
    return done;
  });
  await Promise.all(all);
  return { results, errors };
}

// ---------------------------------------------------------------------------------------------
// The sink

/** `https://host:port/path` without credentials or query: what logs and errors may show. */
export function describeHttpUrl(url: string): string {
  try {
    const u = new URL(url);
    const port = u.port || (u.protocol === "https:" ? "443" : "80");
    return `${u.protocol}//${u.hostname}:${port}${u.pathname}`;
  } catch {
    return "(unparseable URL)";
  }
}

function readPem(value: string, key: string): string {
  if (value.includes("-----BEGIN")) return value;
  try {
    return readFileSync(value, "utf8");
  } catch (err) {
    throw configError(`${key}: cannot read ${value} (${(err as { code?: string }).code ?? errorMessage(err)})`);
  }
}

const sha256Hex = (text: string) => createHash("sha256").update(text).digest("hex");

interface Outcome {
  rejected: Rejection[];
}

class HttpSink implements Sink {
  readonly describe: string;
  private readonly target: string;
  private readonly secrets: string[];
  private readonly retryable: Set<number>;
  private tls: { ca?: string; cert?: string; key?: string } | undefined;
  private closing = new AbortController();

  constructor(
    private readonly cfg: HttpSinkOptions,
    private readonly ctx: BackendContext,
  ) {
    this.target = describeHttpUrl(cfg.url);
    const traits = [cfg.batch_mode ? "batch" : `per-event, ${cfg.max_in_flight} in flight`];
    if (cfg.cloudevents) traits.push("cloudevents");
    if (cfg.signing_secret) traits.push("signed");
    this.describe = `http ${cfg.method} ${this.target} (${traits.join(", ")})`;
    this.retryable = new Set([408, 429, ...cfg.retry_on_status]);
    // Everything that must never surface in an error: header values, the secret, the raw URL
    // (its query or userinfo may carry a token).
    const u = new URL(cfg.url);
    const urlSecrets = u.search || u.username || u.password ? [cfg.url, u.search, u.password, decodeURIComponent(u.password)] : [];
    this.secrets = [...Object.values(cfg.headers), cfg.signing_secret ?? "", ...urlSecrets]
      .filter((s) => s.length >= 4)
      .sort((a, b) => b.length - a.length);
    for (const name of Object.keys(cfg.headers)) {
      if (RESERVED_HEADERS.includes(name.toLowerCase())) {
        throw configError(`headers: ${name} is set by the relay and cannot be configured`);
      }
    }
    if (Boolean(cfg.tls_cert) !== Boolean(cfg.tls_key)) throw configError("tls_cert and tls_key must be set together");
  }

  async start(): Promise<void> {
    // A probe request could have side effects on the receiver, so start only checks what can be
    // checked locally; an unreachable receiver shows up as a transient error on the first write.
    const tls: { ca?: string; cert?: string; key?: string } = {};
    if (this.cfg.tls_ca) tls.ca = readPem(this.cfg.tls_ca, "tls_ca");
    if (this.cfg.tls_cert) tls.cert = readPem(this.cfg.tls_cert, "tls_cert");
    if (this.cfg.tls_key) tls.key = readPem(this.cfg.tls_key, "tls_key");
    this.tls = Object.keys(tls).length ? tls : undefined;
    this.closing = new AbortController();
  }

  async write(messages: Message[]): Promise<Rejection[]> {
    if (messages.length === 0) return [];
    const orderingKey = (m: Message) => renderOrderingKey(this.cfg.ordering_key_template, m);
    const tasks = this.cfg.batch_mode
      ? this.chunk(messages).map((group) => ({
          keys: [...new Set(group.map((g) => orderingKey(g.message)))],
          run: () => this.send(group.map((g) => g.message), `[${group.map((g) => g.json).join(",")}]`),
        }))
      : messages.map((m) => ({ keys: [orderingKey(m)], run: () => this.send([m], this.elementJson(m)) }));
    const { results, errors } = await runKeyed(tasks, this.cfg.max_in_flight);
    if (errors.length) {
      const first = errors[0];
      if (first instanceof RelayError && first.kind === "config") throw first;
      const more = errors.length > 1 ? ` (and ${errors.length - 1} more failed requests)` : "";
      throw transientError(`${errorMessage(first)}${more}`, first);
    }
    return results.flatMap((r) => r.rejected);
  }

  async close(): Promise<void> {
    this.closing.abort();
  }

  private elementJson(m: Message): string {
    if (!this.cfg.cloudevents) return envelopeJson(m);
    const event: Record<string, unknown> = {
      specversion: "1.0",
      id: m.dedup_key,
      source: this.cfg.ce_source ? renderTemplate(this.cfg.ce_source, m) : `pgtrickle-relay/${this.ctx.pipeline}`,
      type: renderTemplate(this.cfg.ce_type, m),
      subject: m.subject,
      time: new Date().toISOString(),
      datacontenttype: "application/json",
      data: m.payload,
      pgtfullrefresh: m.is_full_refresh,
    };
    // CloudEvents Integer is 32-bit; outbox ids are bigints, so the id travels as a String.
    if (m.outbox_id !== null) event.pgtoutboxid = String(m.outbox_id);
    return JSON.stringify(event);
  }

  /** Splits a batch into requests by message count and body size, keeping message order. */
  private chunk(messages: Message[]): { message: Message; json: string }[][] {
    const chunks: { message: Message; json: string }[][] = [];
    let current: { message: Message; json: string }[] = [];
    let bytes = 2;
    for (const message of messages) {
      const json = this.elementJson(message);
      const size = Buffer.byteLength(json) + 1;
      if (current.length > 0 && (current.length >= this.cfg.max_batch_messages || bytes + size > this.cfg.max_batch_bytes)) {
        chunks.push(current);
        current = [];
        bytes = 2;
      }
      current.push({ message, json });
      bytes += size;
    }
    if (current.length) chunks.push(current);
    return chunks;
  }

  private async send(messages: Message[], body: string): Promise<Outcome> {
    const batch = this.cfg.batch_mode;
    const headers: Record<string, string> = {
      "User-Agent": `pgtrickle-relay/${VERSION}`,
      ...this.cfg.headers,
      "Content-Type": this.cfg.cloudevents
        ? batch
          ? "application/cloudevents-batch+json"
          : "application/cloudevents+json"
        : "application/json",
      "Idempotency-Key": batch ? `batch:${sha256Hex(messages.map((m) => m.dedup_key).join("\n"))}` : messages[0]!.dedup_key,
    };
    if (messages.some((m) => m.is_full_refresh)) headers["X-Pgtrickle-Full-Refresh"] = "true";
    if (this.cfg.signing_secret) headers["X-Pgtrickle-Signature"] = signPayload(this.cfg.signing_secret, body);

    const what = `${this.cfg.method} ${this.target}`;
    let response: Response;
    try {
      response = await fetch(this.cfg.url, {
        method: this.cfg.method,
        headers,
        body,
        // A followed 301/302 turns the POST into a body-less GET that may well answer 200.
        redirect: "manual",
        signal: AbortSignal.any([this.closing.signal, AbortSignal.timeout(this.cfg.timeout_ms)]),
        ...(this.tls ? { tls: this.tls } : {}),
      });
    } catch (err) {
      const name = (err as { name?: string }).name;
      if (name === "TimeoutError") throw transientError(`${what}: no response within ${this.cfg.timeout_ms} ms`);
      if (name === "AbortError") throw transientError(`${what}: aborted, the sink is closing`);
      const code = (err as { code?: string }).code;
      throw transientError(`${what} failed: ${this.redact(errorMessage(err))}${code ? ` (${code})` : ""}`);
    }

    let text = "";
    try {
      text = await response.text();
    } catch (err) {
      if (response.ok) throw transientError(`${what}: connection lost while reading the response (${this.redact(errorMessage(err))})`);
    }
    if (response.ok) return { rejected: [] };
    const snippet = this.redact(text.replace(/\s+/g, " ").trim().slice(0, 200));
    const detail = `${what} answered HTTP ${response.status}${snippet ? `: ${snippet}` : ""}`;
    if (this.retryable.has(response.status)) {
      const retryAfter = response.headers.get("retry-after");
      throw transientError(`${detail}${retryAfter ? ` (Retry-After: ${retryAfter.slice(0, 40)})` : ""}`);
    }
    const error =
      response.status >= 300 && response.status < 400
        ? `${what} answered HTTP ${response.status} (redirect not followed; point url at the final address)`
        : detail;
    return { rejected: messages.map((message) => ({ message, error })) };
  }

  private redact(text: string): string {
    let out = text;
    for (const s of this.secrets) if (s) out = out.split(s).join("***");
    return out;
  }
}

function renderOrderingKey(template: string, m: Message): string {
  if (!template.includes("{dedup_key}")) return renderTemplate(template, m);
  return template
    .split("{dedup_key}")
    .map((part) => renderTemplate(part, m))
    .join(m.dedup_key);
}

export default defineBackend({
  type: "http",
  aliases: ["webhook"],
  sink: sinkSpec({
    config: HttpSinkConfig,
    create: (cfg, ctx) => new HttpSink(cfg, ctx),
  }),
});
