/**
 * HTTP webhook sink (docs/interface.md §5.3, §6.4) and webhook receiver source (§5.4 http; see
 * HttpSource below).
 *
 * Batch mode (default) POSTs a JSON array of envelopes per request. A request holds messages of
 * one change set (outbox row) only, cut from the change set's first message by
 * `max_batch_messages` / `max_batch_bytes`; its `Idempotency-Key` = `batch:` + hex SHA-256 of its
 * newline-joined dedup keys. Why a replay sends the same requests: the outbox source hands a
 * change set over in the same slices every time (whole, or every source `max_batch_messages`
 * from its first message: OutboxSource.fitsBatch), and a replay may hold more change sets than
 * the first attempt (the outbox grew meanwhile) but never other cuts of the same ones. So the
 * key of a request is equal on every replay, after a failed request, a retried batch or a crash,
 * as long as the configuration (both `max_batch_messages`, `max_batch_bytes`, `cloudevents`,
 * `--sink-max-inflight`) is unchanged.
 *
 * Per-event mode sends one request per message with up to `max_in_flight` requests in flight,
 * one at a time per ordering key; `Idempotency-Key` = the dedup key, percent-encoded (UTF-8)
 * outside visible ASCII and for `%` (headerValue), so any outbox name makes a legal header.
 *
 * In both modes a request answered with a `retry_on_status` status is tried again within the
 * write (REQUEST_TRIES, short pauses) before later requests of its ordering key go; a write that
 * still fails is replayed by the pipeline, and the replay sends only the requests not yet answered.
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
import { configError, errorMessage, RelayError, transientError } from "../../errors.ts";
import { bodyDedupKey, decodeBody, inboundMessage, reverseSourceKeys, sha256Hex, TOO_DEEP, type DecodedBody } from "../../inbound.ts";
import { envelopeJson, renderTemplate, type Message } from "../../message.ts";
import { abortableDelay, backoffMs, Sleeper } from "../../sleep.ts";
import { VERSION } from "../../version.ts";
import { runKeyed } from "../concurrency.ts";
import { redact } from "../../redact.ts";
import { sinkSpec, sourceSpec, type BackendContext, type Batch, type Rejection, type Sink, type Source } from "../types.ts";

const HEADER_NAME = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;
/** `application/json` or a `+json` type (`application/cloudevents+json`), parameters ignored. */
const declaresJson = (contentType: string | null) => !!contentType && /^application\/([\w.-]+\+)?json$/i.test(contentType.split(";")[0]!.trim());

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
  /**
   * true: one request carries a JSON array of the envelopes of one change set (outbox row), with
   * `Idempotency-Key` = `batch:` + hex SHA-256 of their newline-joined dedup keys, the same on
   * every replay while the batch options are unchanged; false: one request per message, with
   * `Idempotency-Key` = its dedup key (percent-encoded outside visible ASCII and for `%`).
   */
  batch_mode: v.optional(v.boolean(), true),
  /** Batch mode: at most this many messages per request (a larger change set is split). */
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
   * Response statuses retried as transient failures: the request is tried again (4 tries in all,
   * pauses from 200 ms to 2 s), then the batch is replayed without the requests already
   * answered (a timeout or refused connection goes straight to the replay). 408 and 429 are
   * always transient; any other non-2xx status rejects the request's messages to the dead-letter
   * table (a batch request refused with a 4xx is first split, down to single messages, so only
   * the refused ones go there).
   */
  retry_on_status: v.optional(v.array(v.pipe(v.number(), v.integer(), v.minValue(100), v.maxValue(599))), [
    429, 500, 502, 503, 504,
  ]),
  /**
   * HMAC-SHA256 key of the `X-Pgtrickle-Signature` header. Sink: every request is signed with it.
   * Source: requests without a valid signature made with it answer 401. Never logged.
   */
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

/** One HTTP request of a write: its messages, body, `Idempotency-Key` and ordering keys. */
interface OutgoingRequest {
  messages: Message[];
  /** Each message's JSON, as the body holds it (a refused batch is split along these). */
  elements: string[];
  body: string;
  idempotencyKey: string;
  orderingKeys: string[];
}

/**
 * Tries of one request within a write while the receiver answers a `retry_on_status` status.
 * A receiver that fails now and then (a random 500) is absorbed here, request by request,
 * instead of making the pipeline replay the batch with its backoff, which grows to a minute.
 * No answer at all (timeout, refused connection) fails the write at once: the pipeline shows
 * the outage and retries.
 */
const REQUEST_TRIES = 4;

/** A permanent refusal of one request: the error recorded for its messages, and the status. */
interface Refusal {
  error: string;
  status: number;
}

/** The receiver answered with a status it wants retried. */
class RetryStatus extends RelayError {
  constructor(message: string) {
    super("transient", message);
  }
}
/** Pause before the n-th retry of a request: 200 ms doubling, at most 2 s (jittered). */
const retryPauseMs = (retry: number) => backoffMs(retry, 200, 2000);

class HttpSink implements Sink {
  readonly describe: string;
  private readonly target: string;
  private readonly secrets: string[];
  private readonly retryable: Set<number>;
  private tls: { ca?: string; cert?: string; key?: string } | undefined;
  private closing = new AbortController();
  /**
   * Outcome per dedup key of the messages a failed write did settle: null = accepted (2xx),
   * else the rejection error. The pipeline replays a failed batch whole; the replay sends only
   * what is not in here, so what the receiver accepted is not sent again. Emptied by the next
   * write that succeeds.
   */
  private readonly settled = new Map<string, string | null>();

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
      .filter((s) => s.length >= 4);
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
    const requests = this.cfg.batch_mode ? this.batchRequests(messages) : messages.map((m) => this.eventRequest(m));
    // `settled` is empty but after a failed write: only a replay has requests to skip.
    const unsettled = this.settled.size === 0 ? requests : requests.filter((r) => r.messages.some((m) => !this.settled.has(m.dedup_key)));
    const tasks = unsettled.map((r) => ({ keys: r.orderingKeys, run: () => this.sendWithRetries(r) }));
    const { errors } = await runKeyed(tasks, this.cfg.max_in_flight);
    if (errors.length) {
      const first = errors[0];
      if (first instanceof RelayError && first.kind === "config") throw first;
      const more = errors.length > 1 ? ` (and ${errors.length - 1} more failed requests)` : "";
      throw transientError(`${errorMessage(first)}${more}`, first);
    }
    const rejected: Rejection[] = [];
    for (const message of messages) {
      const error = this.settled.get(message.dedup_key);
      if (error) rejected.push({ message, error });
    }
    this.settled.clear();
    return rejected;
  }

  async close(): Promise<void> {
    this.closing.abort();
    this.settled.clear();
  }

  private orderingKey(m: Message): string {
    return renderOrderingKey(this.cfg.ordering_key_template, m);
  }

  private eventRequest(m: Message): OutgoingRequest {
    const element = this.elementJson(m);
    return { messages: [m], elements: [element], body: element, idempotencyKey: headerValue(m.dedup_key), orderingKeys: [this.orderingKey(m)] };
  }

  /**
   * Batch mode: one request never holds messages of two change sets (outbox rows), and a change
   * set is cut into requests from its first message on. A replay after a crash may find more
   * change sets than the first attempt saw (the outbox kept growing), but each request it sends
   * holds the same messages as before, so its Idempotency-Key is the same.
   */
  private batchRequests(messages: Message[]): OutgoingRequest[] {
    return changeSets(messages).flatMap((set) =>
      this.chunk(set).map((group) => this.batchRequest(group.map((g) => g.message), group.map((g) => g.json))),
    );
  }

  private batchRequest(messages: Message[], elements: string[]): OutgoingRequest {
    return {
      messages,
      elements,
      body: `[${elements.join(",")}]`,
      idempotencyKey: `batch:${sha256Hex(messages.map((m) => m.dedup_key).join("\n"))}`,
      orderingKeys: [...new Set(messages.map((m) => this.orderingKey(m)))],
    };
  }

  /**
   * Sends a request, retrying a few times while the receiver asks to; records the outcome in
   * `settled`. A batch request refused as a whole with a 4xx may owe that to one message: its
   * halves are sent one after the other, down to single messages, so only a message the
   * receiver will never take is dead-lettered (docs/LIMITS.md).
   */
  private async sendWithRetries(request: OutgoingRequest): Promise<void> {
    for (let retry = 0; ; retry++) {
      try {
        const refusal = await this.send(request);
        if (refusal && refusal.status >= 400 && refusal.status < 500 && request.messages.length > 1) {
          for (const half of this.halves(request)) await this.sendWithRetries(half);
          return;
        }
        for (const m of request.messages) this.settled.set(m.dedup_key, refusal?.error ?? null);
        return;
      } catch (err) {
        if (!(err instanceof RetryStatus) || retry + 1 >= REQUEST_TRIES || this.closing.signal.aborted) throw err;
        await abortableDelay(retryPauseMs(retry), this.closing.signal);
      }
    }
  }

  /** A batch request cut in two, each half with the Idempotency-Key of its own messages. */
  private halves(request: OutgoingRequest): OutgoingRequest[] {
    const middle = Math.ceil(request.messages.length / 2);
    return [
      this.batchRequest(request.messages.slice(0, middle), request.elements.slice(0, middle)),
      this.batchRequest(request.messages.slice(middle), request.elements.slice(middle)),
    ];
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

  /** One request: null once the receiver accepted it, the refusal for a permanent one. */
  private async send(request: OutgoingRequest): Promise<Refusal | null> {
    const { messages, body } = request;
    const batch = this.cfg.batch_mode;
    const headers: Record<string, string> = {
      "User-Agent": `pgtrickle-relay/${VERSION}`,
      ...this.cfg.headers,
      "Content-Type": this.cfg.cloudevents
        ? batch
          ? "application/cloudevents-batch+json"
          : "application/cloudevents+json"
        : "application/json",
      "Idempotency-Key": request.idempotencyKey,
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
    if (response.ok) return null;
    const snippet = this.redact(text.replace(/\s+/g, " ").trim().slice(0, 200));
    const detail = `${what} answered HTTP ${response.status}${snippet ? `: ${snippet}` : ""}`;
    if (this.retryable.has(response.status)) {
      const retryAfter = response.headers.get("retry-after");
      throw new RetryStatus(`${detail}${retryAfter ? ` (Retry-After: ${retryAfter.slice(0, 40)})` : ""}`);
    }
    const error = response.status >= 300 && response.status < 400
      ? `${what} answered HTTP ${response.status} (redirect not followed; point url at the final address)`
      : detail;
    return { error, status: response.status };
  }

  private redact(text: string): string {
    return redact(text, this.secrets);
  }
}

/**
 * Consecutive messages of one change set (outbox row) together; a message without an outbox id
 * (a replayed dead letter of unknown origin) stands alone.
 */
function changeSets(messages: Message[]): Message[][] {
  const sets: Message[][] = [];
  let previous: string | null = null;
  for (const m of messages) {
    const set = m.outbox_id === null ? null : `${m.context.outbox ?? ""}:${m.outbox_id}`;
    if (set === null || set !== previous) sets.push([m]);
    else sets.at(-1)!.push(m);
    previous = set;
  }
  return sets;
}

/**
 * A dedup key as a legal header value whatever the outbox is called: every character outside
 * visible ASCII, and `%` itself, is percent-encoded as UTF-8, so decodeURIComponent gives the key
 * back; a key of visible ASCII without `%` (the usual case) is sent unchanged.
 */
export function headerValue(key: string): string {
  return key.replace(/[^\x21-\x24\x26-\x7e]/gu, (c) =>
    [...Buffer.from(c, "utf8")].map((b) => `%${b.toString(16).toUpperCase().padStart(2, "0")}`).join(""),
  );
}

function renderOrderingKey(template: string, m: Message): string {
  if (!template.includes("{dedup_key}")) return renderTemplate(template, m);
  return template
    .split("{dedup_key}")
    .map((part) => renderTemplate(part, m))
    .join(m.dedup_key);
}

// ---------------------------------------------------------------------------------------------
// The receiver (reverse source)

/** `host:port`, `[v6]:port` or `:port` (all interfaces) → parts, or null. */
export function parseListenAddr(addr: string): { host: string; port: number } | null {
  const m = /^(?:\[([0-9A-Fa-f:.]+)\]|([^:[\]\s]*)):(\d{1,5})$/.exec(addr.trim());
  if (!m) return null;
  const port = Number(m[3]);
  if (port > 65535) return null;
  return { host: m[1] ?? (m[2] || "0.0.0.0"), port };
}

const HttpSourceConfig = v.pipe(
  v.looseObject({
    /** Source type (`http` or `webhook`); ignored here. */
    type: v.optional(v.string()),
    ...reverseSourceKeys,
    /**
     * Address the receiver listens on, `host:port` (`[::1]:8080` for IPv6; port 0 = any free
     * port, logged at start). Must differ from the relay's metrics address.
     */
    listen_addr: v.optional(
      v.pipe(v.string("listen_addr must be a string"), v.check((a) => parseListenAddr(a) !== null, "listen_addr must be host:port, e.g. 0.0.0.0:8080 or [::1]:8080")),
      "0.0.0.0:8080",
    ),
    /**
     * Requests to `<path>` and `<path>/<suffix>` are accepted (POST or PUT); the suffix is the
     * event type when the request has no event-type header. Any other path answers 404.
     */
    path: v.optional(
      v.pipe(v.string("path must be a string"), v.check((p) => /^\/[^\s?#]*$/.test(p), "path must start with / and hold no query, fragment or spaces")),
      "/inbox",
    ),
    /** Header that must carry `auth_value` (e.g. `Authorization`); requests without it answer 401. */
    auth_header: v.optional(
      v.pipe(v.string("auth_header must be a string"), v.check((h) => HEADER_NAME.test(h), "auth_header is not a valid HTTP header name")),
    ),
    /** The value `auth_header` must hold exactly (e.g. `Bearer ${env:INBOX_TOKEN}`); compared in constant time, never logged. */
    auth_value: v.optional(v.pipe(v.string("auth_value must be a string"), v.minLength(1, "auth_value is empty"))),
    /** Requests must carry a valid `X-Pgtrickle-Signature` made with this secret (as the http sink signs); others answer 401. */
    signing_secret: v.optional(v.pipe(v.string("signing_secret must be a string"), v.minLength(1, "signing_secret is empty"))),
    /** Oldest accepted `X-Pgtrickle-Signature` timestamp, in seconds from now (replay protection). */
    signature_tolerance_seconds: v.optional(v.pipe(v.number(), v.integer(), v.minValue(1)), 300),
    /** Larger request bodies answer 413. */
    max_body_bytes: v.optional(v.pipe(v.number(), v.integer(), v.minValue(1)), 10485760),
    /** Request header naming the event type (before the path suffix). */
    event_type_header: v.optional(
      v.pipe(v.string(), v.check((h) => HEADER_NAME.test(h), "event_type_header is not a valid HTTP header name")),
      "X-Event-Type",
    ),
    /** A top-level JSON array body is one event per element; false: the array is one event. */
    split_arrays: v.optional(v.boolean(), true),
    /**
     * Messages accepted but not yet committed to the inbox, across requests; a request that does not
     * fit answers 503 with Retry-After (backpressure). A single request with more events answers 413.
     */
    max_pending: v.optional(v.pipe(v.number(), v.integer(), v.minValue(1)), 1000),
    /** How long an idle receiver waits for more requests to join a batch once one arrived. */
    linger_ms: v.optional(v.pipe(v.number(), v.integer(), v.minValue(0)), 5),
    /**
     * A request not committed within this time answers 503 (its events may still land: a retry is
     * deduplicated). While a batch has been in flight this long, new requests answer 503 at once.
     */
    request_timeout_ms: v.optional(v.pipe(v.number(), v.integer(), v.minValue(100)), 30000),
  }),
  v.check((c) => Boolean(c.auth_header) === Boolean(c.auth_value), "auth_header and auth_value must be set together"),
);
export type HttpSourceOptions = v.InferOutput<typeof HttpSourceConfig>;

const RETRY_AFTER_FULL = "1";
const RETRY_AFTER_UNAVAILABLE = "5";

const jsonResponse = (status: number, body: unknown, headers: Record<string, string> = {}) =>
  new Response(JSON.stringify(body), { status, headers: { "Content-Type": "application/json", ...headers } });

/** A request waiting for its events to be committed. */
interface Waiting {
  total: number;
  remaining: number;
  done: boolean;
  respond(response: Response): void;
  timer: ReturnType<typeof setTimeout> | null;
}

interface Queued {
  message: Message;
  request: Waiting;
}

const digest = (text: string) => createHash("sha256").update(text).digest();

/**
 * The webhook receiver (docs/interface.md §5.4, §7.5, §7.9): a request is answered only after
 * its events are in the inbox.
 *
 * Requests queue their events; the pipeline takes them in batches of up to `batch_size` (requests
 * arriving together share a batch) and a request is answered 200 `{"accepted": n}` only once every
 * one of its events was committed to the inbox (the batch's ack()). A failed write that the
 * pipeline gives up on (release()), a request still uncommitted after `request_timeout_ms`, a full
 * queue and shutdown answer 503 with Retry-After: the sender retries, and the dedup keys make the
 * retry harmless when part of it had landed. Any Content-Type is accepted: a body that is not
 * JSON is one event whose payload is the text (or `{"base64": …}`).
 *
 * Dedup key (event_id), per event: for a single-event body the `Idempotency-Key` header verbatim,
 * else the body's `dedup_key` / `pgt_dedup_key`; for an array element its own `dedup_key` /
 * `pgt_dedup_key` first (the HTTP sink's batch requests carry one key per request, the elements
 * carry the original keys), else `<Idempotency-Key>:<index>`; else `http:` + SHA-256 of the
 * event's JSON text (of the raw body when it is not JSON). Consequence: without a key, the same
 * content sent twice is ONE event — the second is deduplicated — even when the sender meant two;
 * senders of repeatable events must send an Idempotency-Key or a dedup_key field.
 * Event type: body field, else the `event_type_header` header, else the path suffix, else
 * `event_type`, else `http`. Trace: the `traceparent` header.
 *
 * The receiver has no backlog, so `drain` skips it (the pipeline ends at once, nothing is bound).
 */
export class HttpSource implements Source {
  private server: ReturnType<typeof Bun.serve> | null = null;
  private readonly listen: { host: string; port: number };
  private readonly base: string;
  private queue: Queued[] = [];
  private readonly waiting = new Set<Waiting>();
  /** Messages of the batch handed to the pipeline and not yet acked/released. */
  private inFlight = 0;
  private inFlightSince = 0;
  /** The batch in flight has outlived a request's timeout: new requests answer 503 until it settles. */
  private stalled = false;
  private consuming = false;
  private closing = false;
  private stallLogged = false;
  private readonly arrivals = new Sleeper();
  private readonly authDigest: Buffer | null;

  constructor(
    private readonly cfg: HttpSourceOptions,
    private readonly ctx: BackendContext,
  ) {
    this.listen = parseListenAddr(cfg.listen_addr)!;
    this.base = cfg.path.replace(/\/+$/, "");
    this.authDigest = cfg.auth_value ? digest(cfg.auth_value) : null;
  }

  get describe(): string {
    const port = this.server?.port ?? this.listen.port;
    const host = this.listen.host.includes(":") ? `[${this.listen.host}]` : this.listen.host;
    const traits = [];
    if (this.cfg.auth_header) traits.push(`auth ${this.cfg.auth_header}`);
    if (this.cfg.signing_secret) traits.push("signed");
    return `http receiver ${host}:${port}${this.base || "/"}${traits.length ? ` (${traits.join(", ")})` : ""}`;
  }

  async start(): Promise<void> {
    if (this.ctx.drain || this.server) return;
    const where = `${this.listen.host.includes(":") ? `[${this.listen.host}]` : this.listen.host}:${this.listen.port}`;
    try {
      this.server = Bun.serve({
        hostname: this.listen.host,
        port: this.listen.port,
        // Bun answers 413 itself past this, even for chunked bodies.
        maxRequestBodySize: this.cfg.max_body_bytes,
        fetch: (req) => this.handle(req),
        error: (err) => {
          this.ctx.log.warn(`http receiver: ${errorMessage(err)}`);
          return jsonResponse(500, { error: "internal error" });
        },
      });
    } catch (err) {
      const code = (err as { code?: string }).code;
      if (code === "EADDRINUSE") {
        throw transientError(`http receiver cannot listen on ${where}: the address is in use (another process, or the relay's own metrics address)`, err);
      }
      if (code === "EADDRNOTAVAIL" || code === "EACCES" || code === "EPERM") {
        throw configError(`http receiver cannot listen on ${where}: ${code === "EADDRNOTAVAIL" ? "no such local address" : "permission denied"}`, err);
      }
      throw transientError(`http receiver cannot listen on ${where}: ${code ?? errorMessage(err)}`, err);
    }
    this.closing = false;
    this.ctx.log.info(`listening: ${this.describe}`);
  }

  async close(): Promise<void> {
    this.shutDown("the receiver is shutting down", true);
    const server = this.server;
    this.server = null;
    if (!server) return;
    // Every waiting request has its answer now; give the responses a moment to be written.
    let timer: ReturnType<typeof setTimeout> | undefined;
    const graceful = server.stop(false);
    const forced = new Promise<void>((resolve) => (timer = setTimeout(resolve, 5000)));
    await Promise.race([graceful, forced]);
    clearTimeout(timer);
    await server.stop(true);
  }

  async *batches(signal: AbortSignal): AsyncIterable<Batch> {
    if (this.ctx.drain) {
      this.ctx.log.info("drain: HTTP receivers have no backlog to drain; skipped");
      return;
    }
    if (!this.server) throw transientError("http receiver is not listening (start() not called)");
    const onAbort = () => {
      this.shutDown("the relay is stopping", false);
      this.arrivals.wake();
    };
    if (signal.aborted) {
      onAbort();
      return;
    }
    signal.addEventListener("abort", onAbort, { once: true });
    this.consuming = true;
    try {
      while (!signal.aborted) {
        if (this.queue.length === 0) {
          await this.arrivals.sleep(60_000);
          continue;
        }
        if (this.queue.length < this.cfg.batch_size && this.cfg.linger_ms > 0) {
          const until = Date.now() + this.cfg.linger_ms;
          while (this.queue.length < this.cfg.batch_size && Date.now() < until && !signal.aborted) {
            await this.arrivals.sleep(until - Date.now());
          }
        }
        if (signal.aborted) break;
        const entries = this.queue.splice(0, this.cfg.batch_size);
        if (entries.length > 0) yield this.batch(entries);
      }
    } finally {
      this.consuming = false;
      signal.removeEventListener("abort", onAbort);
    }
  }

  private batch(entries: Queued[]): Batch {
    this.inFlight += entries.length;
    this.inFlightSince = Date.now();
    let settled = false;
    const settle = () => {
      if (settled) return false;
      settled = true;
      this.inFlight -= entries.length;
      this.inFlightSince = 0;
      this.stalled = false;
      this.stallLogged = false;
      return true;
    };
    return {
      messages: entries.map((e) => e.message),
      deadLetters: [],
      ack: async () => {
        if (!settle()) return;
        const counts = new Map<Waiting, number>();
        for (const e of entries) counts.set(e.request, (counts.get(e.request) ?? 0) + 1);
        for (const [request, n] of counts) {
          request.remaining -= n;
          if (request.remaining === 0) this.answer(request, jsonResponse(200, { accepted: request.total }));
        }
      },
      release: async () => {
        if (!settle()) return;
        for (const request of new Set(entries.map((e) => e.request))) {
          this.fail(request, "the events could not be written to the inbox; retry later", RETRY_AFTER_UNAVAILABLE);
        }
      },
    };
  }

  private answer(request: Waiting, response: Response): void {
    if (request.done) return;
    request.done = true;
    if (request.timer) clearTimeout(request.timer);
    this.waiting.delete(request);
    request.respond(response);
  }

  /** 503 for the request; its events still queued are dropped (the sender retries them). */
  private fail(request: Waiting, error: string, retryAfter: string): void {
    if (request.done) return;
    this.queue = this.queue.filter((e) => e.request !== request);
    this.answer(request, jsonResponse(503, { error }, { "Retry-After": retryAfter }));
  }

  /**
   * Refuses new requests and answers 503 to every request with events still queued; requests whose
   * events are all in the batch in flight wait for its ack/release, unless `everything` (closing).
   */
  private shutDown(reason: string, everything: boolean): void {
    this.closing = true;
    const queued = new Set(this.queue.map((e) => e.request));
    this.queue = [];
    for (const w of [...this.waiting]) if (everything || queued.has(w)) this.fail(w, `${reason}; retry later`, RETRY_AFTER_UNAVAILABLE);
  }

  private authorized(req: Request): boolean {
    if (!this.authDigest || !this.cfg.auth_header) return true;
    const got = req.headers.get(this.cfg.auth_header);
    // Digests have equal lengths, so the comparison time says nothing about the value.
    return timingSafeEqual(digest(got ?? ""), this.authDigest) && got !== null;
  }

  /** The path suffix (possibly empty) when the path is ours, else null. */
  private suffixOf(pathname: string): string | null {
    if (pathname === this.base || pathname === `${this.base}/` || (this.base === "" && pathname === "/")) return "";
    if (!pathname.startsWith(`${this.base}/`)) return null;
    const raw = pathname.slice(this.base.length + 1).replace(/\/+$/, "");
    try {
      return decodeURIComponent(raw);
    } catch {
      return raw;
    }
  }

  private async handle(req: Request): Promise<Response> {
    const url = new URL(req.url);
    const suffix = this.suffixOf(url.pathname);
    if (suffix === null) return jsonResponse(404, { error: "not found" });
    if (req.method !== "POST" && req.method !== "PUT") return jsonResponse(405, { error: "method not allowed" }, { Allow: "POST, PUT" });
    // The same answer whatever was wrong: a prober learns nothing about the header or the value.
    if (!this.authorized(req)) return jsonResponse(401, { error: "unauthorized" });
    const unavailable = this.unavailable();
    if (unavailable) return unavailable;
    const declared = Number(req.headers.get("content-length") ?? "0");
    if (declared > this.cfg.max_body_bytes) return jsonResponse(413, { error: `body larger than ${this.cfg.max_body_bytes} bytes` });

    let body: Uint8Array;
    try {
      body = new Uint8Array(await req.arrayBuffer());
    } catch (err) {
      return jsonResponse(400, { error: `cannot read the body: ${errorMessage(err)}` });
    }
    if (body.length > this.cfg.max_body_bytes) return jsonResponse(413, { error: `body larger than ${this.cfg.max_body_bytes} bytes` });
    if (this.cfg.signing_secret) {
      const ok = verifySignature(this.cfg.signing_secret, body, req.headers.get("x-pgtrickle-signature"), {
        toleranceSeconds: this.cfg.signature_tolerance_seconds,
      });
      if (!ok) return jsonResponse(401, { error: "unauthorized" });
    }
    if (body.length === 0) return jsonResponse(400, { error: "empty body: send one JSON event, a JSON array of events, or any non-empty text" });
    const decoded = decodeBody(body);
    // Refused here, for this request only: queued, it would only be dead-lettered by the inbox.
    if (decoded.tooDeep) return jsonResponse(400, { error: TOO_DEEP });
    // A sender that declares JSON and sends something else has a bug: refused, nothing written,
    // rather than kept as a JSON string where nobody would notice (other types are kept as sent).
    if (declaresJson(req.headers.get("content-type")) && !decoded.json) {
      return jsonResponse(400, { error: "the body is declared application/json but is not valid JSON" });
    }
    const messages = this.toMessages(req, url.pathname, suffix, body, decoded);
    if (messages.length === 0) return jsonResponse(200, { accepted: 0 });
    if (messages.length > this.cfg.max_pending) {
      return jsonResponse(413, { error: `${messages.length} events in one request; at most ${this.cfg.max_pending} (max_pending) fit` });
    }
    // Checked again: the pipeline may have stopped while the body was read.
    const late = this.unavailable(messages.length);
    if (late) return late;

    return new Promise<Response>((respond) => {
      const request: Waiting = { total: messages.length, remaining: messages.length, done: false, respond, timer: null };
      request.timer = setTimeout(() => {
        // A batch that outlived a request's whole timeout: the inbox is failing or crawling.
        if (this.inFlight > 0) this.stalled = true;
        this.fail(request, `not committed to the inbox within ${this.cfg.request_timeout_ms} ms; retry (a retry is deduplicated)`, RETRY_AFTER_UNAVAILABLE);
      }, this.cfg.request_timeout_ms);
      this.waiting.add(request);
      for (const message of messages) this.queue.push({ message, request });
      this.arrivals.wake();
    });
  }

  /** A 503 when the receiver cannot take `count` more events now, else null. */
  private unavailable(count = 1): Response | null {
    if (this.closing || !this.server) return jsonResponse(503, { error: "the receiver is shutting down; retry later" }, { "Retry-After": RETRY_AFTER_UNAVAILABLE });
    if (!this.consuming) return jsonResponse(503, { error: "the pipeline is not running yet; retry later" }, { "Retry-After": RETRY_AFTER_UNAVAILABLE });
    if (this.stalled || (this.inFlightSince > 0 && Date.now() - this.inFlightSince > this.cfg.request_timeout_ms)) {
      if (!this.stallLogged) {
        this.stallLogged = true;
        this.ctx.log.warn(`http receiver: a batch has waited for the inbox for over ${this.cfg.request_timeout_ms} ms; answering 503 until it is written`);
      }
      return jsonResponse(503, { error: "the inbox is not accepting writes right now; retry later" }, { "Retry-After": RETRY_AFTER_UNAVAILABLE });
    }
    if (this.queue.length + this.inFlight + count > this.cfg.max_pending) {
      return jsonResponse(503, { error: `too many events waiting for the inbox (max_pending ${this.cfg.max_pending}); retry later` }, { "Retry-After": RETRY_AFTER_FULL });
    }
    return null;
  }

  private toMessages(req: Request, pathname: string, suffix: string, body: Uint8Array, decoded: DecodedBody): Message[] {
    const split = this.cfg.split_arrays && decoded.json && Array.isArray(decoded.payload);
    const events: unknown[] = split ? (decoded.payload as unknown[]) : [decoded.payload];
    const idempotencyKey = req.headers.get("idempotency-key")?.trim() || null;
    const headers: Record<string, string> = {};
    for (const name of ["traceparent", "tracestate"]) {
      const value = req.headers.get(name);
      if (value) headers[name] = value;
    }
    const eventTypeCandidate = req.headers.get(this.cfg.event_type_header)?.trim() || suffix || null;
    return events.map((event, index) =>
      inboundMessage({
        pipeline: this.ctx.pipeline,
        sourceType: "http",
        where: pathname,
        body: split ? { payload: event, json: true } : decoded,
        headers,
        producerKey: split
          ? (bodyDedupKey(event) ?? (idempotencyKey ? `${idempotencyKey}:${index}` : null))
          : (idempotencyKey ?? bodyDedupKey(event)),
        synthesizedKey: () => `http:${sha256Hex(decoded.json ? JSON.stringify(event) : body)}`,
        eventTypeCandidate,
        config: this.cfg,
      }),
    );
  }
}

export const sink = sinkSpec({
  type: "http",
  aliases: ["webhook"],
  config: HttpSinkConfig,
  create: (cfg, ctx) => new HttpSink(cfg, ctx),
});

export const source = sourceSpec({
  type: "http",
  aliases: ["webhook"],
  config: HttpSourceConfig,
  create: (cfg, ctx) => new HttpSource(cfg, ctx),
});
