/**
 * The Amazon SQS source (docs/interface.md §5.4, §6.5, §7.5), also for SQS-compatible servers
 * (`endpoint`): see SqsSource below.
 */
import {
  ChangeMessageVisibilityBatchCommand,
  DeleteMessageBatchCommand,
  GetQueueAttributesCommand,
  ReceiveMessageCommand,
  type SQSClient,
  type BatchResultErrorEntry,
  type Message as SqsMessage,
} from "@aws-sdk/client-sqs";
import { errorMessage, transientError } from "../../errors.ts";
import { inboundMessage, readAheadBatchSize, sha256Hex } from "../../inbound.ts";
import type { Message } from "../../message.ts";
import { Sleeper } from "../../sleep.ts";
import { chunks } from "../concurrency.ts";
import { isNonEmptyString } from "../schema.ts";
import { LAG_TIMEOUT_MS, sourceSpec, type BackendContext, type Batch, type Lag, type Source } from "../types.ts";
import { awsCode, MAX_ENTRIES, SqsConnection, TRANSIENT_CODES } from "./client.ts";
import { SqsSourceConfig, type SqsSourceOptions } from "./config.ts";
import { InFlight, type HandleFailure } from "./in-flight.ts";

/** Drain mode's long-poll wait: long enough that SQS asks every server, short enough to end soon. */
const DRAIN_WAIT_SECONDS = 1;
/** Drain: empty receives in a row while the queue still reports visible messages before giving up on them. */
const DRAIN_EMPTY_POLLS = 3;
const DELETE_ATTEMPTS = 3;
/**
 * Receives in flight at once while a batch fills: one ReceiveMessage returns at most 10 messages,
 * so a batch of hundreds filled one call at a time waits that many round trips.
 */
const FILL_CONCURRENCY = 10;


/**
 * Reads an SQS queue into the inbox (docs/interface.md §5.4, §6.5, §7.5).
 *
 * A batch is up to `batch_size` messages from one long-poll receive plus immediate follow-up
 * receives (`max_messages` each) while they return messages. ack() deletes EVERY receipt handle of
 * the batch with DeleteMessageBatch (10 per call), after the inbox commit, checking each entry and
 * retrying the failed ones; release() sets their visibility to 0. A crash in between leaves them
 * invisible until `visibility_timeout` runs out; they are then received again and the inbox skips
 * them by event_id.
 *
 * It reads ahead (docs/PIPELINE.md): a receive returns only messages not in flight, so the next
 * batch is received while the ones before it are still held, each with its own receipt handles,
 * its own visibility extension and its own delete.
 *
 * Dedup key (event_id): message attribute `pgt_dedup_key` (what the SQS sink sets, so a relayed
 * message keeps its original key), else the FIFO MessageDeduplicationId, else `sqs:<MessageId>`
 * (stable across redeliveries). Event type: message attribute `event_type`, else the queue name.
 * Trace: message attribute `traceparent`.
 *
 * Drain mode ends after a receive (1 s long poll) returns nothing and the queue reports no visible
 * message; messages in flight at other consumers are not waited for, and when the queue keeps
 * reporting visible messages that no receive returns (FIFO groups held by another consumer's
 * in-flight messages) the drain ends after a few empty receives rather than hang.
 */
export class SqsSource implements Source {
  readonly describe: string;
  /** Every ReceiveMessage answer, an empty one too (the pipeline's poll deadline, docs/WATCHDOG.md). */
  readonly reportsPolls = true;
  readonly readAhead = Number.POSITIVE_INFINITY;
  readonly queueUrl: string;
  readonly visibility: number;
  readonly log: BackendContext["log"];
  private client: SQSClient | undefined;
  private readonly conn: SqsConnection;
  private readonly queueName: string;
  private readonly sleeper = new Sleeper();
  /** Messages per batch. */
  private readonly batchSize: number;

  constructor(
    private readonly cfg: SqsSourceOptions,
    private readonly ctx: BackendContext,
  ) {
    this.conn = new SqsConnection(cfg);
    this.queueUrl = cfg.queue_url;
    this.visibility = cfg.visibility_timeout;
    this.batchSize = readAheadBatchSize(cfg.batch_size, ctx);
    this.log = ctx.log;
    const segments = new URL(cfg.queue_url).pathname.split("/").filter(Boolean);
    this.queueName = decodeURIComponent(segments[segments.length - 1] ?? cfg.queue_url);
    const traits = [`visibility ${cfg.visibility_timeout} s`];
    if (cfg.endpoint) traits.push(`via ${this.conn.where}`);
    this.describe = `sqs ${cfg.queue_url} (${traits.join(", ")})`;
  }

  async start(): Promise<void> {
    this.client?.destroy();
    // The request timeout covers a whole long poll; other calls get their own shorter deadline.
    this.client = this.conn.client(this.cfg.timeout_ms + this.cfg.wait_time_seconds * 1000);
    await this.queueAttributes(["QueueArn"], `checking queue ${this.queueUrl}`);
  }

  async close(): Promise<void> {
    this.sleeper.wake();
    this.client?.destroy();
    this.client = undefined;
  }

  async *batches(signal: AbortSignal): AsyncIterable<Batch> {
    const wake = () => this.sleeper.wake();
    signal.addEventListener("abort", wake, { once: true });
    const wait = this.ctx.drain ? DRAIN_WAIT_SECONDS : this.cfg.wait_time_seconds;
    let emptyPolls = 0;
    try {
      while (!signal.aborted) {
        const first = await this.receive(this.perCall(this.batchSize), wait, signal);
        if (first.length === 0) {
          if (signal.aborted) return;
          if (this.ctx.drain) {
            if (await this.drained(++emptyPolls)) return;
          } else if (wait === 0) await this.sleeper.sleep(this.cfg.poll_interval_ms);
          continue;
        }
        emptyPolls = 0;
        const inFlight = new InFlight(this);
        inFlight.add(first);
        const received = [...first];
        await this.fill(received, inFlight, signal);
        yield this.batch(received, inFlight);
      }
    } finally {
      signal.removeEventListener("abort", wake);
    }
  }

  /** Messages to ask one ReceiveMessage for when `left` are wanted. */
  private perCall(left: number): number {
    return Math.min(this.cfg.max_messages, left);
  }

  /**
   * Fills a batch without waiting while the queue still hands out messages: up to
   * FILL_CONCURRENCY receives at once, in rounds, until the batch is full or a receive comes back
   * empty (nothing more ready, for now). Each round's messages join the batch in call order; on a
   * FIFO queue a message group's messages come in one receive at most until they are deleted
   * (SQS returns none of a group with messages in flight), so the group's order holds.
   */
  private async fill(received: SqsMessage[], inFlight: InFlight, signal: AbortSignal): Promise<void> {
    let more = true;
    while (more && received.length < this.batchSize && !signal.aborted) {
      const counts: number[] = [];
      for (let left = this.batchSize - received.length; left > 0 && counts.length < FILL_CONCURRENCY; left -= this.cfg.max_messages) {
        counts.push(this.perCall(left));
      }
      const results = await Promise.allSettled(counts.map((n) => this.receive(n, 0, signal)));
      results.forEach((r) => {
        if (r.status === "rejected") {
          // What is in hand goes out now; the next receive reports the error.
          this.log.debug(`receive failed while filling a batch (${errorMessage(r.reason)}); delivering the ${received.length} message(s) in hand`);
          more = false;
          return;
        }
        inFlight.add(r.value);
        received.push(...r.value);
        if (r.value.length === 0) more = false;
      });
    }
  }

  private batch(received: SqsMessage[], inFlight: InFlight): Batch {
    const messages: Message[] = [];
    for (const m of received) {
      if (!m.ReceiptHandle) {
        // Cannot be acknowledged; SQS delivers it again after its visibility timeout.
        this.log.warn(`message ${m.MessageId ?? "?"} from ${this.queueUrl} came without a receipt handle; skipped for now`);
        continue;
      }
      messages.push(this.toMessage(m));
    }
    return {
      messages,
      deadLetters: [],
      ack: () => inFlight.ack(),
      release: () => inFlight.release(),
    };
  }

  private toMessage(m: SqsMessage): Message {
    const attributes: Record<string, string> = {};
    for (const [name, a] of Object.entries(m.MessageAttributes ?? {})) {
      if (typeof a.StringValue === "string" && /^(String|Number)/.test(a.DataType ?? "")) attributes[name] = a.StringValue;
    }
    const dedupId = (m.Attributes as Record<string, string> | undefined)?.MessageDeduplicationId;
    return inboundMessage({
      pipeline: this.ctx.pipeline,
      sourceType: "sqs",
      where: this.queueName,
      body: m.Body ?? "",
      headers: attributes,
      producerKey: [attributes.pgt_dedup_key, dedupId].find(isNonEmptyString) ?? null,
      synthesizedKey: () => `sqs:${m.MessageId ?? `md5:${m.MD5OfBody ?? sha256Hex(m.Body ?? "")}`}`,
      eventTypeCandidate: isNonEmptyString(attributes.event_type) ? attributes.event_type : this.queueName,
      config: this.cfg,
    });
  }

  private async receive(count: number, waitSeconds: number, signal: AbortSignal): Promise<SqsMessage[]> {
    const client = this.client;
    if (!client) throw transientError(`sqs source for ${this.queueUrl} is not started`);
    const started = performance.now();
    try {
      const out = await client.send(
        new ReceiveMessageCommand({
          QueueUrl: this.queueUrl,
          MaxNumberOfMessages: count,
          WaitTimeSeconds: waitSeconds,
          VisibilityTimeout: this.visibility,
          MessageAttributeNames: ["All"],
          MessageSystemAttributeNames: ["MessageDeduplicationId", "MessageGroupId", "ApproximateReceiveCount", "SentTimestamp"],
        }),
        { abortSignal: signal },
      );
      this.ctx.onPoll?.((performance.now() - started) / 1000);
      return out.Messages ?? [];
    } catch (err) {
      // Messages a cancelled receive may have taken stay invisible until their visibility timeout.
      if (signal.aborted) return [];
      throw this.conn.classify(err, `ReceiveMessage from ${this.queueUrl}`);
    }
  }

  /** Drain: true once the queue has nothing visible left, or nothing receivable after a few tries. */
  private async drained(emptyPolls: number): Promise<boolean> {
    const attrs = await this.queueAttributes(["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"], `GetQueueAttributes of ${this.queueUrl}`);
    const visible = Number(attrs.ApproximateNumberOfMessages ?? 0);
    const invisible = Number(attrs.ApproximateNumberOfMessagesNotVisible ?? 0);
    if (!(visible > 0)) {
      if (invisible > 0) {
        this.log.info(`drain: ${this.queueUrl} has nothing visible; ${invisible} message(s) in flight at other consumers (or awaiting a visibility timeout) are not waited for`);
      }
      return true;
    }
    if (emptyPolls >= DRAIN_EMPTY_POLLS) {
      this.log.info(
        `drain: ${this.queueUrl} reports ${visible} visible message(s) but ${emptyPolls} receives in a row returned none (FIFO groups held by another consumer's in-flight messages, or a lagging approximate count); drain ends here`,
      );
      return true;
    }
    return false;
  }

  /**
   * Messages not yet deleted from the queue: ApproximateNumberOfMessages (visible) plus
   * ApproximateNumberOfMessagesNotVisible (in flight: held by a batch of this relay, another
   * consumer, or waiting out a visibility timeout). SQS's own approximate counts, which can trail
   * a send or delete by a moment. One GetQueueAttributes call bounded by LAG_TIMEOUT_MS; nothing
   * is received. Seconds: SQS does not report the oldest message's age here (CloudWatch does),
   * so 0. Null before start().
   */
  async lag(): Promise<Lag | null> {
    if (!this.client) return null;
    const attrs = await this.queueAttributes(["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"], `GetQueueAttributes of ${this.queueUrl}`, LAG_TIMEOUT_MS);
    const rows = Number(attrs.ApproximateNumberOfMessages ?? 0) + Number(attrs.ApproximateNumberOfMessagesNotVisible ?? 0);
    return { rows: Number.isFinite(rows) ? rows : 0, seconds: 0 };
  }

  private async queueAttributes(names: ("QueueArn" | "ApproximateNumberOfMessages" | "ApproximateNumberOfMessagesNotVisible")[], doing: string, timeoutMs = this.cfg.timeout_ms) {
    const client = this.client;
    if (!client) throw transientError(`sqs source for ${this.queueUrl} is not started`);
    try {
      const out = await client.send(new GetQueueAttributesCommand({ QueueUrl: this.queueUrl, AttributeNames: names }), {
        abortSignal: AbortSignal.timeout(timeoutMs),
      });
      return out.Attributes ?? {};
    } catch (err) {
      throw this.conn.classify(err, doing);
    }
  }

  /** ChangeMessageVisibilityBatch over every handle, 10 per call; never throws, returns what failed. */
  async changeVisibility(handles: string[], seconds: number): Promise<HandleFailure[]> {
    const client = this.client;
    if (!client) return handles.map((handle) => ({ handle, code: "NotStarted", message: "the source is closed", senderFault: false }));
    const failures: HandleFailure[] = [];
    await Promise.all(
      chunks(handles, MAX_ENTRIES).map(async (chunk) => {
        try {
          const out = await client.send(
            new ChangeMessageVisibilityBatchCommand({
              QueueUrl: this.queueUrl,
              Entries: chunk.map((h, i) => ({ Id: String(i), ReceiptHandle: h, VisibilityTimeout: seconds })),
            }),
            { abortSignal: AbortSignal.timeout(this.cfg.timeout_ms) },
          );
          for (const f of out.Failed ?? []) failures.push(this.failure(chunk, f));
        } catch (err) {
          const e = this.conn.classify(err, `ChangeMessageVisibilityBatch on ${this.queueUrl}`);
          for (const handle of chunk) failures.push({ handle, code: awsCode(err), message: e.message, senderFault: false });
        }
      }),
    );
    return failures;
  }

  private failure(chunk: string[], f: BatchResultErrorEntry): HandleFailure {
    return { handle: chunk[Number(f.Id)] ?? "?", code: f.Code ?? "UnknownError", message: this.conn.redact(f.Message ?? ""), senderFault: f.SenderFault === true };
  }

  /**
   * Deletes every held message, 10 per DeleteMessageBatch call, checking each entry. Entries that
   * failed for the service's reasons are retried; a receipt handle SQS calls invalid (the message
   * was received again elsewhere after its visibility ran out) cannot be deleted with it: that copy
   * comes back and the inbox skips it. Throws a transient error if some remain after a few attempts.
   */
  async deleteAll(held: Map<string, string>): Promise<void> {
    const client = this.client;
    if (!client) throw transientError(`sqs source for ${this.queueUrl} is closed; its batch cannot be acknowledged`);
    const total = held.size;
    let lastError = "";
    for (let attempt = 0; held.size > 0 && attempt < DELETE_ATTEMPTS; attempt++) {
      if (attempt > 0) await Bun.sleep(200 * 2 ** attempt * (0.8 + Math.random() * 0.4));
      await Promise.all(
        chunks([...held.keys()], MAX_ENTRIES).map(async (chunk) => {
          let out;
          try {
            out = await client.send(
              new DeleteMessageBatchCommand({ QueueUrl: this.queueUrl, Entries: chunk.map((h, i) => ({ Id: String(i), ReceiptHandle: h })) }),
              { abortSignal: AbortSignal.timeout(this.cfg.timeout_ms) },
            );
          } catch (err) {
            const e = this.conn.classify(err, `DeleteMessageBatch on ${this.queueUrl}`);
            if (e.kind === "config") throw e;
            lastError = e.message;
            return;
          }
          for (const ok of out.Successful ?? []) {
            const handle = chunk[Number(ok.Id)];
            if (handle !== undefined) held.delete(handle);
          }
          for (const entry of out.Failed ?? []) {
            const f = this.failure(chunk, entry);
            if (f.senderFault && !TRANSIENT_CODES.has(f.code)) {
              this.log.warn(
                `cannot delete message ${held.get(f.handle) ?? "?"} from ${this.queueUrl}: ${f.code}: ${f.message}; it will be received again and skipped by the inbox`,
              );
              held.delete(f.handle);
            } else lastError = `${f.code}: ${f.message}`;
          }
        }),
      );
    }
    if (held.size > 0) {
      throw transientError(`DeleteMessageBatch on ${this.queueUrl}: ${held.size} of ${total} message(s) still not deleted after ${DELETE_ATTEMPTS} attempts (${lastError || "no answer for them"})`);
    }
  }
}

export default sourceSpec({
  type: "sqs",
  config: SqsSourceConfig,
  create: (cfg, ctx) => new SqsSource(cfg, ctx),
});
