/**
 * The Amazon SQS sink (docs/interface.md §5.3, §6.4), also for SQS-compatible servers
 * (`endpoint`).
 *
 * Messages go out with SendMessageBatch: at most 10 entries and `max_batch_bytes` per call, the
 * entry Id being the index within the call. Body = envelope JSON; message attributes
 * `pgt_dedup_key` (every message) and `pgtrickle-full-refresh` = "true" (full-refresh messages).
 * FIFO queues: MessageDeduplicationId = dedup key (hex SHA-256 of it when it is longer than 128
 * characters or uses characters SQS refuses), MessageGroupId = rendered `message_group_id`. Calls
 * carrying the same message group never run concurrently, so a group's order is kept; calls for
 * different groups, and every call to a standard queue, run up to `max_in_flight` at once.
 *
 * Entries a call reports as failed are retried alone a few times inside write() when the failure is
 * the service's (throttling, internal error); entries SQS will never take (SenderFault, e.g.
 * InvalidMessageContents, too large) come back as rejections. The per-message size limit is the
 * queue's own MaximumMessageSize, read at start (AWS raised the ceiling from 256 KiB to 1 MiB).
 */
import {
  GetQueueAttributesCommand,
  SendMessageBatchCommand,
  SendMessageCommand,
  type SQSClient,
  type BatchResultErrorEntry,
  type MessageAttributeValue,
  type SendMessageBatchRequestEntry,
} from "@aws-sdk/client-sqs";
import { configError, errorMessage, RelayError, transientError } from "../../errors.ts";
import { sha256Hex } from "../../inbound.ts";
import { envelopeJson, renderTemplate, type Message } from "../../message.ts";
import { runKeyed } from "../concurrency.ts";
import { sinkSpec, type BackendContext, type Rejection, type Sink } from "../types.ts";
import { AUTH_CODES, awsCode, MAX_ENTRIES, QUEUE_MISSING, SqsConnection, TRANSIENT_CODES } from "./client.ts";
import { SqsSinkConfig, type SqsSinkOptions } from "./config.ts";

const DEFAULT_MESSAGE_LIMIT = 262144;
const ENTRY_RETRIES = 3;
/** MessageDeduplicationId / MessageGroupId: ≤128 of alphanumerics and ASCII punctuation. */
const SQS_ID = /^[\x21-\x7e]{1,128}$/;
export const sqsId = (value: string) => (SQS_ID.test(value) ? value : sha256Hex(value));

interface Entry {
  message: Message;
  body: string;
  attributes: Record<string, MessageAttributeValue>;
  size: number;
  group?: string;
  dedupId?: string;
}

function attributeBytes(attributes: Record<string, MessageAttributeValue>): number {
  let size = 0;
  for (const [name, a] of Object.entries(attributes)) {
    size += Buffer.byteLength(name) + Buffer.byteLength(a.DataType ?? "") + Buffer.byteLength(a.StringValue ?? "");
  }
  return size;
}

class SqsSink implements Sink {
  readonly describe: string;
  private client: SQSClient | undefined;
  private readonly conn: SqsConnection;
  private messageLimit: number;

  constructor(
    private readonly cfg: SqsSinkOptions,
    private readonly ctx: BackendContext,
  ) {
    this.conn = new SqsConnection(cfg);
    this.messageLimit = cfg.max_message_bytes ?? DEFAULT_MESSAGE_LIMIT;
    const traits = [cfg.fifo ? `fifo, group ${cfg.message_group_id}` : "standard"];
    if (cfg.endpoint) traits.push(`via ${this.conn.where}`);
    this.describe = `sqs ${cfg.queue_url} (${traits.join(", ")})`;
  }

  async start(): Promise<void> {
    this.client?.destroy();
    const cfg = this.cfg;
    this.client = this.conn.client(cfg.timeout_ms);
    let attributes: Record<string, string>;
    try {
      const out = await this.client.send(
        new GetQueueAttributesCommand({
          QueueUrl: cfg.queue_url,
          AttributeNames: ["FifoQueue", "ContentBasedDeduplication", "MaximumMessageSize"],
        }),
      );
      attributes = out.Attributes ?? {};
    } catch (err) {
      throw this.classify(err, `checking queue ${cfg.queue_url}`);
    }
    const queueFifo = attributes.FifoQueue === "true";
    if (queueFifo !== cfg.fifo) {
      throw configError(
        `queue ${cfg.queue_url} is ${queueFifo ? "a FIFO" : "a standard"} queue but fifo is ${cfg.fifo}${
          cfg.fifo && !queueFifo ? " (FIFO queue names end in .fifo)" : ""
        }`,
      );
    }
    if (attributes.ContentBasedDeduplication === "true") {
      this.ctx.log.debug(`sqs queue ${cfg.queue_url} has ContentBasedDeduplication; the relay's explicit deduplication ids take precedence`);
    }
    const queueLimit = Number(attributes.MaximumMessageSize);
    if (cfg.max_message_bytes === undefined) this.messageLimit = Number.isInteger(queueLimit) && queueLimit > 0 ? queueLimit : DEFAULT_MESSAGE_LIMIT;
  }

  async write(messages: Message[]): Promise<Rejection[]> {
    if (messages.length === 0) return [];
    if (!this.client) throw transientError(`sqs sink for ${this.cfg.queue_url} is not started`);
    const rejected: Rejection[] = [];
    const entries: Entry[] = [];
    for (const message of messages) {
      const entry = this.entry(message);
      if (entry.size > this.messageLimit) {
        rejected.push({
          message,
          error: `message is ${entry.size} bytes with its attributes; queue ${this.cfg.queue_url} accepts at most ${this.messageLimit}`,
        });
      } else entries.push(entry);
    }
    // FIFO: a stable sort by group keeps each group's order and packs small groups together.
    if (this.cfg.fifo) {
      const firstSeen = new Map<string, number>();
      entries.forEach((e, i) => firstSeen.has(e.group!) || firstSeen.set(e.group!, i));
      entries.sort((a, b) => firstSeen.get(a.group!)! - firstSeen.get(b.group!)!);
    }
    const calls = this.cfg.batch_send ? this.pack(entries) : entries.map((e) => [e]);
    const tasks = calls.map((call) => ({
      keys: this.cfg.fifo ? [...new Set(call.map((e) => e.group!))] : [],
      run: () => (this.cfg.batch_send ? this.sendBatch(call) : this.sendOne(call[0]!)),
    }));
    const { results, errors } = await runKeyed(tasks, this.cfg.max_in_flight);
    if (errors.length) {
      const first = errors[0];
      if (first instanceof RelayError && first.kind === "config") throw first;
      const more = errors.length > 1 ? ` (and ${errors.length - 1} more failed calls)` : "";
      throw transientError(`${errorMessage(first)}${more}`, first);
    }
    return rejected.concat(results.flat());
  }

  async close(): Promise<void> {
    this.client?.destroy();
    this.client = undefined;
  }

  private entry(message: Message): Entry {
    const body = envelopeJson(message);
    const attributes: Record<string, MessageAttributeValue> = {
      pgt_dedup_key: { DataType: "String", StringValue: message.dedup_key },
    };
    if (message.is_full_refresh) attributes["pgtrickle-full-refresh"] = { DataType: "String", StringValue: "true" };
    const entry: Entry = { message, body, attributes, size: Buffer.byteLength(body) + attributeBytes(attributes) };
    if (this.cfg.fifo) {
      entry.group = sqsId(renderTemplate(this.cfg.message_group_id, message));
      entry.dedupId = sqsId(message.dedup_key);
    }
    return entry;
  }

  /** Consecutive entries into calls of ≤10 entries and ≤ max_batch_bytes (a bigger entry alone). */
  private pack(entries: Entry[]): Entry[][] {
    const calls: Entry[][] = [];
    let current: Entry[] = [];
    let bytes = 0;
    for (const e of entries) {
      if (current.length && (current.length >= MAX_ENTRIES || bytes + e.size > this.cfg.max_batch_bytes)) {
        calls.push(current);
        current = [];
        bytes = 0;
      }
      current.push(e);
      bytes += e.size;
    }
    if (current.length) calls.push(current);
    return calls;
  }

  private toBatchEntry(e: Entry, id: number): SendMessageBatchRequestEntry {
    return {
      Id: String(id),
      MessageBody: e.body,
      MessageAttributes: e.attributes,
      ...(this.cfg.fifo ? { MessageGroupId: e.group, MessageDeduplicationId: e.dedupId } : {}),
    };
  }

  /** One call's entries; failed entries retried alone (service faults) or rejected (sender faults). */
  private async sendBatch(call: Entry[]): Promise<Rejection[]> {
    const rejected: Rejection[] = [];
    let pending = call;
    for (let attempt = 0; pending.length; attempt++) {
      let failed: { Id?: string; Code?: string; Message?: string; SenderFault?: boolean }[];
      try {
        const out = await this.client!.send(
          new SendMessageBatchCommand({ QueueUrl: this.cfg.queue_url, Entries: pending.map((e, i) => this.toBatchEntry(e, i)) }),
        );
        failed = out.Failed ?? [];
      } catch (err) {
        const kind = this.kindOf(err);
        if (kind === "rejected" && pending.length > 1) {
          // A whole call refused as malformed (e.g. a server whose batch size limit is lower):
          // send its entries one by one, in order, so only the culprits are rejected.
          for (const e of pending) rejected.push(...(await this.sendOne(e)));
          return rejected;
        }
        if (kind === "rejected") return [...rejected, { message: pending[0]!.message, error: this.describeFailure(err) }];
        throw this.classify(err, `SendMessageBatch to ${this.cfg.queue_url}`);
      }
      const retry: Entry[] = [];
      let lastTransient = "";
      for (const f of failed) {
        const entry = pending[Number(f.Id)];
        if (!entry) throw transientError(`SendMessageBatch to ${this.cfg.queue_url}: the response names an unknown entry id ${f.Id}`);
        const code = f.Code ?? "UnknownError";
        const text = `${code}: ${this.redact(f.Message ?? "")}`;
        if (AUTH_CODES.has(code)) throw configError(`SendMessageBatch to ${this.cfg.queue_url} refused: ${text}`);
        if (f.SenderFault && !TRANSIENT_CODES.has(code)) rejected.push({ message: entry.message, error: `SQS refused the message: ${text}` });
        else {
          retry.push(entry);
          lastTransient = text;
        }
      }
      if (retry.length && attempt + 1 >= ENTRY_RETRIES) {
        throw transientError(
          `SendMessageBatch to ${this.cfg.queue_url}: ${retry.length} entries still failing after ${ENTRY_RETRIES} attempts (${lastTransient})`,
        );
      }
      if (retry.length) await Bun.sleep(100 * 2 ** attempt * (0.8 + Math.random() * 0.4));
      pending = retry;
    }
    return rejected;
  }

  private async sendOne(e: Entry): Promise<Rejection[]> {
    try {
      await this.client!.send(
        new SendMessageCommand({
          QueueUrl: this.cfg.queue_url,
          MessageBody: e.body,
          MessageAttributes: e.attributes,
          ...(this.cfg.fifo ? { MessageGroupId: e.group, MessageDeduplicationId: e.dedupId } : {}),
        }),
      );
      return [];
    } catch (err) {
      if (this.kindOf(err) === "rejected") return [{ message: e.message, error: this.describeFailure(err) }];
      throw this.classify(err, `SendMessage to ${this.cfg.queue_url}`);
    }
  }

  /** "rejected" only for a client fault that is about the request itself, not access or the queue. */
  private kindOf(err: unknown): "rejected" | "other" {
    const code = awsCode(err);
    const fault = (err as { $fault?: string }).$fault;
    if (fault !== "client" || QUEUE_MISSING.has(code) || AUTH_CODES.has(code) || TRANSIENT_CODES.has(code)) return "other";
    const status = (err as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode;
    return status === 429 || (err as { $retryable?: unknown }).$retryable ? "other" : "rejected";
  }

  private describeFailure(err: unknown): string {
    return `SQS refused the message: ${awsCode(err)}: ${this.redact(errorMessage(err))}`;
  }

  private classify(err: unknown, doing: string): RelayError {
    return this.conn.classify(err, doing);
  }

  private redact(text: string): string {
    return this.conn.redact(text);
  }
}

export default sinkSpec({
  type: "sqs",
  config: SqsSinkConfig,
  create: (cfg, ctx) => new SqsSink(cfg, ctx),
});
