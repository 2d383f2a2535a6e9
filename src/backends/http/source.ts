/** HTTP webhook receiver source (docs/interface.md §5.4 http, §7.5, §7.9); see HttpSource below. */
import { createHash, timingSafeEqual } from "node:crypto";
import { errorMessage, configError, transientError } from "../../errors.ts";
import { bodyDedupKey, decodeBody, inboundMessage, readAheadBatchSize, sha256Hex, TOO_DEEP, type DecodedBody } from "../../inbound.ts";
import type { Message } from "../../message.ts";
import { Sleeper } from "../../sleep.ts";
import { loadServerTls, type ServerTlsOptions } from "../../tls.ts";
import { sourceSpec, type BackendContext, type Batch, type Source } from "../types.ts";
import { verifySignature } from "./client.ts";
import { HttpSourceConfig, parseListenAddr, type HttpSourceOptions } from "./config.ts";

/** `application/json` or a `+json` type (`application/cloudevents+json`), parameters ignored. */
const declaresJson = (contentType: string | null) => !!contentType && /^application\/([\w.-]+\+)?json$/i.test(contentType.split(";")[0]!.trim());

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
 * It reads ahead (docs/PIPELINE.md): the next batch is taken from the queue while the ones before
 * it are written, and each batch's ack() answers for its own events only (a request split over
 * several batches is answered when its last event is committed).
 *
 * The receiver has no backlog, so `drain` skips it (the pipeline ends at once, nothing is bound).
 */
export class HttpSource implements Source {
  readonly readAhead = Number.POSITIVE_INFINITY;
  /** An ack answers requests whose events are committed to the inbox: true whoever holds the lock. */
  readonly ackOnlyAnswers = true;
  private server: ReturnType<typeof Bun.serve> | null = null;
  private readonly listen: { host: string; port: number };
  private readonly base: string;
  private queue: Queued[] = [];
  private readonly waiting = new Set<Waiting>();
  /** Messages of the batches handed to the pipeline and not yet acked/released. */
  private inFlight = 0;
  /** When each batch not yet acked/released was handed out, oldest first. */
  private readonly handedOut = new Set<{ at: number }>();
  /** Events per batch. */
  private readonly batchSize: number;
  /** A batch in flight has outlived a request's timeout: new requests answer 503 until one settles. */
  private stalled = false;
  private consuming = false;
  private closing = false;
  private stallLogged = false;
  private readonly arrivals = new Sleeper();
  /** The request of the last event handed out: a batch starting with more of it is not independent. */
  private lastHanded: Waiting | null = null;
  private readonly authDigest: Buffer | null;
  private readonly tls: ServerTlsOptions | undefined;

  constructor(
    private readonly cfg: HttpSourceOptions,
    private readonly ctx: BackendContext,
  ) {
    this.listen = parseListenAddr(cfg.listen_addr)!;
    this.base = cfg.path.replace(/\/+$/, "");
    this.authDigest = cfg.auth_value ? digest(cfg.auth_value) : null;
    this.batchSize = readAheadBatchSize(cfg.batch_size, ctx);
    this.tls = loadServerTls(cfg, `pipeline '${ctx.pipeline}': http receiver`);
  }

  /** When the oldest batch in flight was handed out; 0 when none is. */
  private get inFlightSince(): number {
    for (const batch of this.handedOut) return batch.at;
    return 0;
  }

  get describe(): string {
    const port = this.server?.port ?? this.listen.port;
    const host = this.listen.host.includes(":") ? `[${this.listen.host}]` : this.listen.host;
    const traits = [];
    if (this.tls) traits.push(this.tls.requestCert ? "https, client certificate required" : "https");
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
        ...(this.tls ? { tls: this.tls } : {}),
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
        // Linger (linger_ms, 0 by default) only while an earlier batch is still being written or
        // committed: with nothing in flight, waiting would only delay the answer. By default the
        // batch goes at once and is written alongside those in flight (docs/PIPELINE.md, "Writes
        // that overlap"): lingering held back the senders waiting for their answers
        // (bench/RESULTS.md, "HTTP receiver: writes that overlap").
        if (this.queue.length < this.batchSize && this.cfg.linger_ms > 0 && this.inFlight > 0) {
          const until = Date.now() + this.cfg.linger_ms;
          while (this.queue.length < this.batchSize && Date.now() < until && !signal.aborted && this.inFlight > 0) {
            await this.arrivals.sleep(until - Date.now());
          }
        }
        if (signal.aborted) break;
        const entries = this.queue.splice(0, this.batchSize);
        if (entries.length > 0) yield this.batch(entries);
      }
    } finally {
      this.consuming = false;
      signal.removeEventListener("abort", onAbort);
    }
  }

  private batch(entries: Queued[]): Batch {
    // Requests that are not answered yet have no order between them (a sender that needs one
    // waits for the answer before it sends the next), so a batch of requests of its own may be
    // written alongside the batches before it; the events of one request keep their order.
    const independent = entries[0]!.request !== this.lastHanded;
    this.lastHanded = entries.at(-1)!.request;
    this.inFlight += entries.length;
    const handed = { at: Date.now() };
    this.handedOut.add(handed);
    let settled = false;
    const settle = () => {
      if (settled) return false;
      settled = true;
      this.inFlight -= entries.length;
      if (this.inFlight === 0) this.arrivals.wake(); // a lingering batch need not wait any longer
      this.handedOut.delete(handed);
      this.stalled = false;
      this.stallLogged = false;
      return true;
    };
    return {
      messages: entries.map((e) => e.message),
      deadLetters: [],
      independent,
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

export default sourceSpec({
  type: "http",
  aliases: ["webhook"],
  config: HttpSourceConfig,
  create: (cfg, ctx) => new HttpSource(cfg, ctx),
});
