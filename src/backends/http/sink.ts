/**
 * HTTP webhook sink (docs/interface.md §5.3, §6.4); signing and TLS in client.ts.
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
 */
import { errorMessage, configError, RelayError, transientError } from "../../errors.ts";
import { sha256Hex } from "../../inbound.ts";
import { envelopeJson, renderTemplate, type Message } from "../../message.ts";
import { abortableDelay, backoffMs } from "../../sleep.ts";
import { VERSION } from "../../version.ts";
import { runKeyed } from "../concurrency.ts";
import { scrubberFor, urlSecrets, type Scrub } from "../../redact.ts";
import { sinkSpec, type BackendContext, type Rejection, type Sink } from "../types.ts";
import { describeTlsError, loadTls } from "../../tls.ts";
import { describeHttpUrl, signPayload } from "./client.ts";
import { HttpSinkConfig, type HttpSinkOptions } from "./config.ts";

const RESERVED_HEADERS = ["content-type", "idempotency-key", "x-pgtrickle-signature", "x-pgtrickle-full-refresh"];

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
  private readonly redact: Scrub;
  private readonly retryable: Set<number>;
  private tls: ReturnType<typeof loadTls>;
  /** The headers every request carries: User-Agent, the configured ones, Content-Type. */
  private readonly fixedHeaders: Record<string, string>;
  private closing = new AbortController();
  /** The requests being sent: close() aborts them. */
  private readonly inFlight = new Set<AbortController>();
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
    this.fixedHeaders = { "User-Agent": `pgtrickle-relay/${VERSION}`, ...cfg.headers, "Content-Type": contentType(cfg) };
    // Everything that must never surface in an error: header values, the secret, the URL's
    // password and its whole query (a token may stand there under any name).
    this.redact = scrubberFor([...Object.values(cfg.headers), cfg.signing_secret, ...urlSecrets(cfg.url), new URL(cfg.url).search]);
    for (const name of Object.keys(cfg.headers)) {
      if (RESERVED_HEADERS.includes(name.toLowerCase())) {
        throw configError(`headers: ${name} is set by the relay and cannot be configured`);
      }
    }
  }

  async start(): Promise<void> {
    // A probe request could have side effects on the receiver, so start only checks what can be
    // checked locally; an unreachable receiver shows up as a transient error on the first write.
    this.tls = loadTls(this.cfg, `http sink ${this.target}`, { implied: /^https:/i.test(this.cfg.url) });
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
    for (const request of this.inFlight) request.abort();
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
    const { body } = request;
    const headers = this.requestHeaders(request);
    const what = `${this.cfg.method} ${this.target}`;
    // One controller and one timer per request, aborted by the timeout or by close(): the
    // AbortSignal.any(closing, AbortSignal.timeout) this replaced cost 10 % of a per-event drain's
    // profile (bench/RESULTS.md, "Window and batch fill").
    if (this.closing.signal.aborted) throw transientError(`${what}: aborted, the sink is closing`);
    const abort = new AbortController();
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      abort.abort();
    }, this.cfg.timeout_ms);
    this.inFlight.add(abort);
    let response: Response;
    let text = "";
    try {
      try {
        response = await fetch(this.cfg.url, {
          method: this.cfg.method,
          headers,
          body,
          // A followed 301/302 turns the POST into a body-less GET that may well answer 200.
          redirect: "manual",
          signal: abort.signal,
          ...(this.tls ? { tls: this.tls } : {}),
        });
      } catch (err) {
        if (timedOut) throw transientError(`${what}: no response within ${this.cfg.timeout_ms} ms`);
        if (abort.signal.aborted) throw transientError(`${what}: aborted, the sink is closing`);
        const tls = describeTlsError(err, what);
        if (tls) throw tls;
        const code = (err as { code?: string }).code;
        throw transientError(`${what} failed: ${this.redact(errorMessage(err))}${code ? ` (${code})` : ""}`);
      }
      try {
        text = await response.text();
      } catch (err) {
        if (response.ok) throw transientError(`${what}: connection lost while reading the response (${this.redact(errorMessage(err))})`);
      }
    } finally {
      clearTimeout(timer);
      this.inFlight.delete(abort);
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

  /** The headers of a request: the fixed ones (built once), then the request's own. */
  private requestHeaders(request: OutgoingRequest): Record<string, string> {
    const headers: Record<string, string> = { ...this.fixedHeaders, "Idempotency-Key": request.idempotencyKey };
    if (request.messages.some((m) => m.is_full_refresh)) headers["X-Pgtrickle-Full-Refresh"] = "true";
    if (this.cfg.signing_secret) headers["X-Pgtrickle-Signature"] = signPayload(this.cfg.signing_secret, request.body);
    return headers;
  }
}

/** Every request's Content-Type: relay envelopes, or CloudEvents structured (one event, a batch). */
function contentType(cfg: HttpSinkOptions): string {
  if (!cfg.cloudevents) return "application/json";
  return cfg.batch_mode ? "application/cloudevents-batch+json" : "application/cloudevents+json";
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

export default sinkSpec({
  type: "http",
  aliases: ["webhook"],
  config: HttpSinkConfig,
  create: (cfg, ctx) => new HttpSink(cfg, ctx),
});
