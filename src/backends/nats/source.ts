/**
 * NATS JetStream source (docs/interface.md §5.4, §6.5): a durable pull consumer with explicit
 * acks. Each message of a batch is acknowledged (and the server's confirmation awaited) only
 * after the inbox committed it; `Nats-Msg-Id` is the dedup key, so what this relay's sink
 * published keeps its original key. The stream and consumer are set up in consumer.ts.
 *
 * It reads ahead (docs/PIPELINE.md): a pull delivers the messages the consumer has not delivered
 * yet, so the next fetch continues after the batches in hand, acknowledged or not, and each
 * batch's ack() acknowledges its own messages. Every batch in hand is kept from redelivery by
 * "working" signals until its ack or release, however long the batches ahead of it take.
 */
import type { ConsumerInfo, JetStreamClient, JetStreamManager, JsMsg, MsgHdrs, NatsConnection } from "nats";
import { writeDeadLetters, storedMessage } from "../../deadletters.ts";
import { configError, errorMessage, RelayError, transientError } from "../../errors.ts";
import { headerValue, inboundMessage, readAheadBatchSize } from "../../inbound.ts";
import type { Message } from "../../message.ts";
import { abortableDelay, Sleeper, sleepUntil, withTimeout } from "../../sleep.ts";
import { natsCode, NatsLink } from "./client.ts";
import { BAD_DURABLE, defaultDurableName, NatsSourceConfig, type NatsSourceOptions } from "./config.ts";
import { ensureConsumer, resolveStream, type ConsumerSetup } from "./consumer.ts";
import { LAG_TIMEOUT_MS, sourceSpec, type Batch, type BackendContext, type DeadLetter, type Lag, type Source } from "../types.ts";

const ACK = new TextEncoder().encode("+ACK");

/**
 * Longest a fetch waits for its first message. Kept below the ack wait, because a message
 * delivered early in a long fetch would otherwise time out (and be redelivered) before the
 * batch even reaches the inbox.
 */
const MAX_FETCH_WAIT_MS = 5000;
/** Wait of a drain-mode fetch: just long enough for the server to answer. */
const DRAIN_FETCH_WAIT_MS = 500;

/** The headers of a message as a plain object (first value of each). */
function headerObject(h: MsgHdrs | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  if (!h) return out;
  for (const k of h.keys()) out[k] = h.get(k);
  return out;
}

/** The ack subject of a delivered message (`$JS.ACK.<stream>.<consumer>.…`). */
const replyOf = (m: JsMsg) => (m as JsMsg & { reply?: string }).reply ?? "";

/** How a message that could not be mapped is kept in the dead-letter table, for decodeStored(). */
interface StoredNatsMessage {
  nats: { stream: string; seq: number; subject: string; headers: Record<string, string>; data_base64: string };
}

/** A batch between fetch and acknowledgement. */
interface InFlight {
  msgs: JsMsg[];
  confirmed: Set<JsMsg>;
  keepAlive: ReturnType<typeof setInterval> | null;
}

class NatsSource implements Source {
  readonly describe: string;
  /** Every fetch the server answered, an empty one too (the pipeline's poll deadline, docs/WATCHDOG.md). */
  readonly reportsPolls = true;
  readonly readAhead = Number.POSITIVE_INFINITY;
  private readonly link: NatsLink;
  private readonly durable: string;
  private readonly ackWaitMs: number;
  private readonly fetchWaitMs: number;
  private readonly setup: ConsumerSetup;
  private stream: string | null = null;
  private jsm: JetStreamManager | null = null;
  private js: JetStreamClient | null = null;
  private jsOf: NatsConnection | null = null;
  /** Batches handed out and not yet acknowledged or released. */
  private readonly inFlight = new Set<InFlight>();
  /** Woken whenever a batch leaves `inFlight` (a drain waits for the batches in hand). */
  private readonly handEmptied = new Sleeper();
  /** Messages per fetch. */
  private readonly batchSize: number;

  constructor(
    private readonly cfg: NatsSourceOptions,
    private readonly ctx: BackendContext,
  ) {
    this.link = new NatsLink(cfg, ctx, "source");
    this.durable = cfg.durable_name ?? defaultDurableName(ctx.pipeline);
    if (BAD_DURABLE.test(this.durable)) {
      throw configError(`source.durable_name "${this.durable}" is not a valid consumer name (no ".", "*", ">", slashes or whitespace)`);
    }
    this.ackWaitMs = cfg.ack_wait_seconds * 1000;
    this.batchSize = readAheadBatchSize(cfg.batch_size, ctx);
    this.fetchWaitMs = Math.max(100, Math.min(MAX_FETCH_WAIT_MS, Math.floor(this.ackWaitMs / 2)));
    this.setup = { cfg, ctx, link: this.link, durable: this.durable, ackWaitMs: this.ackWaitMs };
    const stream = cfg.stream ? `stream ${cfg.stream}, ` : "";
    this.describe = `nats ${this.link.scheme}${this.link.where} ← ${cfg.subject} (${stream}consumer ${this.durable})`;
  }

  async start(): Promise<void> {
    await this.prepare();
  }

  /** Connects, finds (or creates, when told to) the stream, and creates or updates the consumer. */
  private async prepare(): Promise<{ js: JetStreamClient; jsm: JetStreamManager; stream: string }> {
    const nc = await this.link.connect();
    if (this.jsOf !== nc || !this.jsm || !this.js) {
      try {
        this.jsm = await nc.jetstreamManager({ timeout: this.cfg.request_timeout_ms });
      } catch (err) {
        throw this.link.fail(err, "JetStream is not available");
      }
      this.js = nc.jetstream({ timeout: this.cfg.request_timeout_ms });
      this.jsOf = nc;
    }
    const stream = await resolveStream(this.jsm, this.setup);
    await ensureConsumer(this.jsm, stream, this.setup);
    this.stream = stream;
    return { js: this.js, jsm: this.jsm, stream };
  }


  async *batches(signal: AbortSignal): AsyncGenerator<Batch> {
    const { js, jsm, stream } = await this.prepare();
    const drain = this.ctx.drain;
    /** Since when a drain has seen nothing but deliveries outstanding at the server. */
    let outstandingSince: number | null = null;
    while (!signal.aborted) {
      if (this.link.disconnected) throw transientError(`NATS at ${this.link.where}: connection lost; the client is reconnecting`);
      const started = Date.now();
      const msgs = await this.fetch(js, stream, drain ? DRAIN_FETCH_WAIT_MS : this.fetchWaitMs, signal);
      // An empty fetch also ends when the client stops waiting, so only a round trip proves the
      // server answered.
      if (msgs.length === 0 && !signal.aborted) await this.jsOf?.flush();
      this.ctx.onPoll?.((Date.now() - started) / 1000);
      if (signal.aborted) {
        // Fetched after the stop was asked for: hand them straight back for the next start.
        for (const m of msgs) m.nak();
        return;
      }
      if (msgs.length > 0) {
        outstandingSince = null;
        // Tracked until its ack or release (or close), not just while the generator is suspended here.
        yield this.batchOf(msgs, stream, this.track(msgs));
        continue;
      }
      // An empty answer long before the wait was up (the server refusing pulls for a while):
      // pause rather than spin.
      const waited = Date.now() - started;
      if (waited < (drain ? DRAIN_FETCH_WAIT_MS : this.fetchWaitMs) / 2) await abortableDelay(this.cfg.poll_interval_ms, signal);
      if (!drain || signal.aborted) continue;
      // Our batches in hand count as unacknowledged at the server: let them be acknowledged (or handed back) first.
      if (await sleepUntil(() => this.inFlight.size === 0, this.handEmptied, signal)) return;
      const info = await this.consumerInfo(jsm, stream);
      if (info.num_pending === 0 && info.num_ack_pending === 0) return;
      if (info.num_pending > 0) {
        outstandingSince = null;
        continue;
      }
      // Only deliveries made before (to a relay that crashed) are left: the server redelivers
      // them once their ack wait has passed. Give up waiting when even that has gone by.
      outstandingSince ??= Date.now();
      if (Date.now() - outstandingSince > this.ackWaitMs + 2 * MAX_FETCH_WAIT_MS) {
        this.ctx.log.warn(
          `nats: drain ends with ${info.num_ack_pending} message(s) delivered elsewhere and unacknowledged on consumer "${this.durable}" (held by another client, or out of deliveries)`,
        );
        return;
      }
    }
  }

  /**
   * One pull: `no_wait` with `expires` makes the server answer as soon as it has delivered what
   * it has (up to `batch_size`), and wait up to `waitMs` only while it has nothing — never the
   * whole wait for a batch that cannot fill.
   */
  private async fetch(js: JetStreamClient, stream: string, waitMs: number, signal: AbortSignal): Promise<JsMsg[]> {
    const out: JsMsg[] = [];
    let it: ReturnType<JetStreamClient["fetch"]>;
    try {
      it = js.fetch(stream, this.durable, { batch: this.batchSize, no_wait: true, expires: waitMs });
    } catch (err) {
      throw this.fetchFailure(err, stream);
    }
    const stop = () => it.stop();
    signal.addEventListener("abort", stop, { once: true });
    try {
      for await (const m of it) out.push(m);
    } catch (err) {
      for (const m of out) m.nak();
      throw this.fetchFailure(err, stream);
    } finally {
      signal.removeEventListener("abort", stop);
    }
    return out;
  }

  private fetchFailure(err: unknown, stream: string): RelayError {
    if (err instanceof RelayError) return err;
    const code = natsCode(err);
    const detail = this.link.scrub(errorMessage(err));
    const what = `fetching from consumer "${this.durable}" on stream "${stream}" at NATS ${this.link.where}`;
    if (code === "409" && /MaxRequest/i.test(detail)) {
      return configError(`${what}: ${detail} — the consumer limits pull requests; lower batch_size`, err);
    }
    // No responders (consumer or stream deleted, JetStream restarting), a lost connection:
    // the pipeline backs off and calls batches() again, which recreates a missing consumer.
    return transientError(`${what} failed: ${detail}`, err);
  }

  private async consumerInfo(jsm: JetStreamManager, stream: string): Promise<ConsumerInfo> {
    try {
      return await jsm.consumers.info(stream, this.durable);
    } catch (err) {
      const e = this.link.fail(err, `reading consumer "${this.durable}" on stream "${stream}" failed`);
      // A consumer deleted under a running relay is recreated by the next batches() call.
      throw e.kind === "config" ? transientError(e.message, err) : e;
    }
  }

  /**
   * Messages the durable consumer has not had acknowledged: not yet delivered (num_pending) plus
   * delivered and unacknowledged (num_ack_pending). One consumer-info request, bounded by
   * LAG_TIMEOUT_MS; it never fetches, acks or creates anything (null before start() found the
   * stream). Seconds: 0 when nothing is left; otherwise the age of the oldest unacknowledged
   * message is not in the consumer info, and reading it would cost a message fetch, so it is
   * reported as 0 (unknown) too.
   */
  async lag(): Promise<Lag | null> {
    const jsm = this.jsm;
    const stream = this.stream;
    if (!jsm || !stream || this.link.disconnected) return null;
    const info = await withTimeout(jsm.consumers.info(stream, this.durable), LAG_TIMEOUT_MS, "nats lag query");
    return { rows: info.num_pending + info.num_ack_pending, seconds: 0 };
  }

  /** Keeps the server from redelivering a batch while the relay works on it. */
  private track(msgs: JsMsg[]): InFlight {
    const flight: InFlight = { msgs, confirmed: new Set(), keepAlive: null };
    const every = Math.max(200, Math.floor(this.ackWaitMs / 3));
    flight.keepAlive = setInterval(() => {
      for (const m of msgs) if (!flight.confirmed.has(m)) m.working();
    }, every);
    flight.keepAlive.unref?.();
    this.inFlight.add(flight);
    return flight;
  }

  private untrack(flight: InFlight): void {
    if (flight.keepAlive) clearInterval(flight.keepAlive);
    flight.keepAlive = null;
    this.inFlight.delete(flight);
    this.handEmptied.wake();
  }

  private batchOf(msgs: JsMsg[], stream: string, flight: InFlight): Batch {
    const messages: Message[] = [];
    const deadLetters: DeadLetter[] = [];
    for (const m of msgs) {
      try {
        messages.push(this.toMessage(m));
      } catch (err) {
        deadLetters.push({
          dedup_key: this.keyOf(m),
          outbox_id: null,
          message: this.stored(m),
          error: `NATS message ${stream}#${m.info.streamSequence} cannot be mapped: ${errorMessage(err)}`,
          kind: "decode",
        });
      }
    }
    return {
      messages,
      deadLetters,
      ack: () => this.ack(flight),
      release: () => this.release(flight, messages),
    };
  }

  private keyOf(m: JsMsg): string {
    return m.headers?.get("Nats-Msg-Id") || `nats:${m.info.stream}:${m.info.streamSequence}`;
  }

  private toMessage(m: JsMsg): Message {
    return this.mapped(m.subject, m.data, headerObject(m.headers), m.info.stream, m.info.streamSequence);
  }

  /** The inbound mapping of one stream message, delivered or replayed from the dead-letter table. */
  private mapped(subject: string, body: Uint8Array, headers: Record<string, string>, stream: string, seq: number): Message {
    return inboundMessage({
      pipeline: this.ctx.pipeline,
      sourceType: "nats",
      where: subject,
      body,
      headers,
      producerKey: headerValue(headers, "Nats-Msg-Id"),
      synthesizedKey: `nats:${stream}:${seq}`,
      eventTypeCandidate: subject,
      config: this.cfg,
    });
  }

  private stored(m: JsMsg): StoredNatsMessage {
    return {
      nats: {
        stream: m.info.stream,
        seq: m.info.streamSequence,
        subject: m.subject,
        headers: headerObject(m.headers),
        data_base64: Buffer.from(m.data).toString("base64"),
      },
    };
  }

  async decodeStored(stored: unknown): Promise<Message[]> {
    const s = (stored as Partial<StoredNatsMessage> | null)?.nats;
    if (!s || typeof s.subject !== "string" || typeof s.data_base64 !== "string") {
      throw configError("the stored message is not a NATS message of this source");
    }
    const headers = s.headers ?? {};
    return [this.mapped(s.subject, Buffer.from(s.data_base64, "base64"), headers, s.stream, s.seq)];
  }

  /**
   * Acknowledges every message of the batch, then waits for the server's answer to the last
   * one (sent as a request). The server reads a connection's messages in order and handles a
   * consumer's acks in order, so that answer means it has taken every ack of the batch: one round
   * trip per batch, not per message (confirming each ack on its own measured 35–50 % slower
   * here). Were an ack lost anyway, the message would only be redelivered and
   * absorbed by the inbox's dedup; the confirmation is what lets a drain trust the consumer's
   * unacknowledged count. Acks are idempotent, so a retry after a failure sends them all again.
   */
  private async ack(flight: InFlight): Promise<void> {
    if (flight.msgs.length === 0) return;
    const nc = await this.link.connect();
    const last = flight.msgs[flight.msgs.length - 1]!;
    try {
      for (const m of flight.msgs) if (m !== last) nc.publish(replyOf(m), ACK);
      await nc.request(replyOf(last), ACK, { timeout: this.cfg.request_timeout_ms });
    } catch (err) {
      throw transientError(
        `NATS at ${this.link.where}: acknowledging ${flight.msgs.length} message(s) on consumer "${this.durable}" was not confirmed: ${this.link.scrub(errorMessage(err))}`,
        err,
      );
    }
    for (const m of flight.msgs) flight.confirmed.add(m);
    this.untrack(flight);
  }

  /**
   * Hands an unwritten batch back: a nak makes the server redeliver at once. A message on its
   * last delivery would never come back, so it goes to the dead-letter table (and is acked)
   * instead, where an operator can replay it.
   */
  private async release(flight: InFlight, messages: Message[]): Promise<void> {
    this.untrack(flight);
    const max = this.cfg.max_deliver;
    const last = new Set(flight.msgs.filter((m) => !flight.confirmed.has(m) && max > 0 && m.info.deliveryCount >= max));
    for (const m of flight.msgs) if (!flight.confirmed.has(m) && !last.has(m)) m.nak();
    if (last.size > 0) {
      const byKey = new Map(messages.map((msg) => [msg.dedup_key, msg]));
      const letters: DeadLetter[] = [...last].map((m) => {
        const msg = byKey.get(this.keyOf(m));
        return {
          dedup_key: this.keyOf(m),
          outbox_id: null,
          message: msg ? storedMessage(msg) : this.stored(m),
          error: `NATS delivered this message for the last time (max_deliver ${max}) and the relay stopped before the inbox accepted it`,
          kind: msg ? "inbox_permanent" : "decode",
        };
      });
      try {
        await writeDeadLetters(this.ctx.sql, this.ctx.pipeline, "reverse", letters);
        await this.ack({ msgs: [...last], confirmed: new Set(), keepAlive: null });
        this.ctx.log.warn(`nats: ${letters.length} message(s) on their last delivery written to pgtrickle.relay_dead_letters instead of being handed back`);
      } catch (err) {
        this.ctx.log.error(
          `nats: ${letters.length} message(s) on their last delivery could not be dead-lettered (${errorMessage(err)}); JetStream will not redeliver them (stream ${this.stream}, consumer ${this.durable})`,
        );
      }
    }
    await this.link.nc?.flush().catch(() => {});
  }

  async close(): Promise<void> {
    for (const f of this.inFlight) this.untrack(f);
    this.jsm = null;
    this.js = null;
    this.jsOf = null;
    await this.link.close();
  }
}

export default sourceSpec({
  type: "nats",
  config: NatsSourceConfig,
  create: (cfg, ctx) => new NatsSource(cfg, ctx),
});
