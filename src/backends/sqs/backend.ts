/**
 * Amazon SQS sink (docs/interface.md §5.3, §6.4) and source (§5.4 sqs; see SqsSource below), also
 * for SQS-compatible servers (`endpoint`). Both share the connection keys and their client setup.
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
  ChangeMessageVisibilityBatchCommand,
  DeleteMessageBatchCommand,
  GetQueueAttributesCommand,
  ReceiveMessageCommand,
  SendMessageBatchCommand,
  SendMessageCommand,
  SQSClient,
  type BatchResultErrorEntry,
  type MessageAttributeValue,
  type Message as SqsMessage,
  type SendMessageBatchRequestEntry,
} from "@aws-sdk/client-sqs";
import { createHash } from "node:crypto";
import * as v from "valibot";
import { configError, errorMessage, RelayError, transientError } from "../../errors.ts";
import { inboundMessage, reverseSourceKeys } from "../../inbound.ts";
import { envelopeJson, renderTemplate, type Message } from "../../message.ts";
import { Sleeper } from "../../sleep.ts";
import { runKeyed } from "../concurrency.ts";
import { redact } from "../../redact.ts";
import { LAG_TIMEOUT_MS, sinkSpec, sourceSpec, type BackendContext, type Batch, type Lag, type Rejection, type Sink, type Source } from "../types.ts";

/** Where the queue is and how to reach it: shared by the sink and the source. */
const sqsConnectionKeys = {
  /** Queue URL, e.g. `https://sqs.eu-west-1.amazonaws.com/123456789012/orders.fifo`. */
  queue_url: v.pipe(
    v.string("queue_url is required"),
    v.check((u) => /^https?:\/\/[^/]+\/.+/i.test(u) && URL.canParse(u), "queue_url must be an http(s) queue URL"),
  ),
  /**
   * AWS region. Default: AWS_REGION / AWS_DEFAULT_REGION, else the region in an AWS queue URL,
   * else the profile's region, else `us-east-1` when `endpoint` is set.
   */
  region: v.optional(v.string()),
  /** Endpoint of an SQS-compatible server (or a VPC endpoint), e.g. `http://127.0.0.1:4566`. */
  endpoint: v.optional(
    v.pipe(v.string(), v.check((u) => /^https?:\/\/[^/]/i.test(u) && URL.canParse(u), "endpoint must be an http(s) URL")),
  ),
  /** Timeout of one SQS request in milliseconds (a source's long poll gets `wait_time_seconds` on top). */
  timeout_ms: v.optional(v.pipe(v.number(), v.integer(), v.minValue(1)), 10000),
  /** Static credentials (e.g. `${env:SQS_KEY_ID}`); default: the AWS credential provider chain. */
  access_key_id: v.optional(v.string("access_key_id must be a string")),
  /** Secret for `access_key_id`; never logged. */
  secret_access_key: v.optional(v.string("secret_access_key must be a string")),
  /** Session token for temporary static credentials; never logged. */
  session_token: v.optional(v.string("session_token must be a string")),
  /** Named profile from ~/.aws/config and ~/.aws/credentials (like AWS_PROFILE). */
  profile: v.optional(v.string()),
};

type SqsConnectionOptions = v.InferOutput<v.ObjectSchema<typeof sqsConnectionKeys, undefined>>;

const SqsSinkConfig = v.pipe(
  v.looseObject({
    /** Sink type (`sqs`); ignored here. */
    type: v.optional(v.string()),
    ...sqsConnectionKeys,
    /** FIFO queue; default: the queue URL ends in `.fifo`. Checked against the queue at start. */
    fifo: v.optional(v.boolean()),
    /** FIFO MessageGroupId template (variables as in subject templates, plus row fields). */
    message_group_id: v.optional(v.string(), "{stream_table}"),
    /** false: one SendMessage call per message instead of SendMessageBatch. */
    batch_send: v.optional(v.boolean(), true),
    /** SQS calls in flight at once (across message groups). */
    max_in_flight: v.optional(v.pipe(v.number(), v.integer(), v.minValue(1)), 16),
    /**
     * Bytes per SendMessageBatch call (bodies plus attributes). 256 KiB suits every
     * SQS-compatible server; a larger message still goes alone in its own call.
     */
    max_batch_bytes: v.optional(v.pipe(v.number(), v.integer(), v.minValue(1024), v.maxValue(1048576)), 262144),
    /** Per-message size limit; default: the queue's MaximumMessageSize. */
    max_message_bytes: v.optional(v.pipe(v.number(), v.integer(), v.minValue(1024), v.maxValue(1048576))),
  }),
  v.transform((cfg) => ({ ...cfg, fifo: cfg.fifo ?? cfg.queue_url.endsWith(".fifo") })),
);

export type SqsSinkOptions = v.InferOutput<typeof SqsSinkConfig>;

const MAX_ENTRIES = 10;
const DEFAULT_MESSAGE_LIMIT = 262144;
const ENTRY_RETRIES = 3;
/** MessageDeduplicationId / MessageGroupId: ≤128 of alphanumerics and ASCII punctuation. */
const SQS_ID = /^[\x21-\x7e]{1,128}$/;

const sha256Hex = (text: string) => createHash("sha256").update(text).digest("hex");
export const sqsId = (value: string) => (SQS_ID.test(value) ? value : sha256Hex(value));

/** Failure codes that say "try again later": the service's fault, not the message's. */
const TRANSIENT_CODES = new Set([
  "ThrottlingException",
  "Throttling",
  "RequestThrottled",
  "RequestThrottledException",
  "TooManyRequestsException",
  "ServiceUnavailable",
  "InternalError",
  "InternalFailure",
  "RequestTimeout",
  "RequestTimeoutException",
  "KmsThrottled",
  "KMS.ThrottlingException",
]);
const QUEUE_MISSING = new Set(["QueueDoesNotExist", "AWS.SimpleQueueService.NonExistentQueue", "NonExistentQueue"]);
const AUTH_CODES = new Set([
  "CredentialsProviderError",
  "InvalidClientTokenId",
  "UnrecognizedClientException",
  "SignatureDoesNotMatch",
  "IncompleteSignature",
  "MissingAuthenticationToken",
  "AccessDenied",
  "AccessDeniedException",
  "InvalidSecurity",
  "ExpiredToken",
  "KmsAccessDenied",
  "KmsDisabled",
  "KmsNotFound",
  "KmsInvalidKeyUsage",
  "KmsInvalidState",
  "KMS.AccessDeniedException",
  "KMS.DisabledException",
  "KMS.NotFoundException",
]);
const NETWORK_CODES = new Set(["ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "EPIPE", "ENOTFOUND", "EAI_AGAIN", "EHOSTUNREACH", "ENETUNREACH", "ConnectionRefused", "ConnectionClosed"]);


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

/** The AWS error code of anything the SDK throws (`name` for service errors, `code` for sockets). */
function awsCode(err: unknown): string {
  const e = err as { name?: string; code?: string; Code?: string };
  return e?.Code ?? (e?.name && e.name !== "Error" ? e.name : undefined) ?? e?.code ?? "Error";
}

function regionFromQueueUrl(url: string): string | undefined {
  const host = new URL(url).hostname;
  return /^sqs\.([a-z]{2}(?:-[a-z]+)+-\d+)\.amazonaws\.com/.exec(host)?.[1] ?? /^([a-z]{2}(?:-[a-z]+)+-\d+)\.queue\.amazonaws\.com/.exec(host)?.[1];
}

/**
 * The client side shared by the sink and the source: region and endpoint resolution, the client,
 * and the error classification (the endpoint's host:port in every connection error, no secret ever).
 */
class SqsConnection {
  readonly region: string | undefined;
  /** host:port of the endpoint the client talks to. */
  readonly where: string;
  private readonly secrets: string[];

  constructor(private readonly cfg: SqsConnectionOptions) {
    if (Boolean(cfg.access_key_id) !== Boolean(cfg.secret_access_key)) {
      throw configError("access_key_id and secret_access_key must be set together");
    }
    if (cfg.session_token && !cfg.access_key_id) throw configError("session_token needs access_key_id and secret_access_key");
    this.region =
      cfg.region ??
      process.env.AWS_REGION ??
      process.env.AWS_DEFAULT_REGION ??
      regionFromQueueUrl(cfg.queue_url) ??
      (cfg.endpoint ? "us-east-1" : undefined);
    const endpoint = new URL(cfg.endpoint ?? (this.region ? `https://sqs.${this.region}.amazonaws.com` : cfg.queue_url));
    this.where = `${endpoint.hostname}:${endpoint.port || (endpoint.protocol === "https:" ? "443" : "80")}`;
    this.secrets = [cfg.secret_access_key ?? "", cfg.session_token ?? ""].filter((s) => s.length >= 4);
  }

  /** A new client; `requestTimeoutMs` must cover a long poll where the caller long-polls. */
  client(requestTimeoutMs: number): SQSClient {
    const cfg = this.cfg;
    return new SQSClient({
      ...(this.region ? { region: this.region } : {}),
      ...(cfg.endpoint ? { endpoint: cfg.endpoint } : {}),
      ...(cfg.profile ? { profile: cfg.profile } : {}),
      ...(cfg.access_key_id && cfg.secret_access_key
        ? {
            credentials: {
              accessKeyId: cfg.access_key_id,
              secretAccessKey: cfg.secret_access_key,
              ...(cfg.session_token ? { sessionToken: cfg.session_token } : {}),
            },
          }
        : {}),
      maxAttempts: 3,
      requestHandler: { connectionTimeout: Math.min(cfg.timeout_ms, 5000), requestTimeout: requestTimeoutMs },
    });
  }

  classify(err: unknown, doing: string): RelayError {
    if (err instanceof RelayError) return err;
    const code = awsCode(err);
    const text = this.redact(errorMessage(err));
    if (QUEUE_MISSING.has(code)) {
      return configError(`sqs queue ${this.cfg.queue_url} does not exist (${doing} at ${this.where}); create it or fix queue_url`);
    }
    if (AUTH_CODES.has(code) || /could not load credentials/i.test(text)) {
      return configError(`${doing} at ${this.where}: credentials or permissions refused: ${code}: ${text}`);
    }
    if (/region is missing/i.test(text)) {
      return configError(`region: no AWS region configured (set region, AWS_REGION or the profile's region)`);
    }
    if (NETWORK_CODES.has(code) || code === "TimeoutError" || /ECONNREFUSED|socket|timed? ?out|connect/i.test(text)) {
      return transientError(`${doing}: sqs endpoint ${this.where} unreachable: ${code}: ${text}`);
    }
    return transientError(`${doing} at ${this.where} failed: ${code}: ${text}`);
  }

  redact(text: string): string {
    return redact(text, this.secrets);
  }
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

// ---------------------------------------------------------------------------------------------
// The source (reverse)

/** Options of the SQS source (docs/interface.md §5.4). */
const SqsSourceConfig = v.looseObject({
  /** Source type (`sqs`); ignored here. */
  type: v.optional(v.string()),
  ...reverseSourceKeys,
  ...sqsConnectionKeys,
  /** Messages per ReceiveMessage call (SQS allows at most 10); a larger `batch_size` takes several calls per batch. */
  max_messages: v.optional(v.pipe(v.number(), v.integer(), v.minValue(1), v.maxValue(10)), 10),
  /**
   * Long-poll wait of a receive in seconds (0–20); an empty receive is followed by the next one at
   * once. 0 = short polls, `poll_interval_ms` apart when empty. Drain mode always waits 1 s.
   */
  wait_time_seconds: v.optional(v.pipe(v.number(), v.integer(), v.minValue(0), v.maxValue(20)), 20),
  /**
   * Seconds received messages stay invisible to other consumers. While their batch is being
   * written it is extended every `visibility_timeout`/2, so a slow inbox causes no redelivery; a
   * crashed relay's messages come back after it.
   */
  visibility_timeout: v.optional(v.pipe(v.number(), v.integer(), v.minValue(1), v.maxValue(43200)), 30),
});
export type SqsSourceOptions = v.InferOutput<typeof SqsSourceConfig>;

/** Drain mode's long-poll wait: long enough that SQS asks every server, short enough to end soon. */
const DRAIN_WAIT_SECONDS = 1;
/** Drain: empty receives in a row while the queue still reports visible messages before giving up on them. */
const DRAIN_EMPTY_POLLS = 3;
const DELETE_ATTEMPTS = 3;

const chunks = <T>(items: T[], size: number): T[][] => {
  const out: T[][] = [];
  for (let i = 0; i < items.length; i += size) out.push(items.slice(i, i + size));
  return out;
};

const nonEmpty = (s: string | undefined | null): string | null => (typeof s === "string" && s !== "" ? s : null);

interface HandleFailure {
  handle: string;
  code: string;
  message: string;
  senderFault: boolean;
}

/**
 * The messages of one batch from their receipt until they are deleted (ack) or handed back
 * (release). Meanwhile their visibility is extended every visibility_timeout/2, so however long
 * the inbox write takes, no other consumer (nor this one) receives them again.
 */
class InFlight {
  /** receipt handle → message id (for logs). */
  readonly held = new Map<string, string>();
  private timer: ReturnType<typeof setInterval> | null = null;
  private extending: Promise<void> | null = null;
  private acking = false;

  constructor(private readonly source: SqsSource) {}

  add(messages: SqsMessage[]): void {
    for (const m of messages) if (m.ReceiptHandle) this.held.set(m.ReceiptHandle, m.MessageId ?? "?");
    if (!this.timer && this.held.size > 0) {
      this.timer = setInterval(() => void this.extend(), (this.source.visibility * 1000) / 2);
      this.timer.unref?.();
    }
  }

  private extend(): Promise<void> {
    if (this.extending || this.acking || this.held.size === 0) return this.extending ?? Promise.resolve();
    this.extending = (async () => {
      const failures = await this.source.changeVisibility([...this.held.keys()], this.source.visibility);
      for (const f of failures) {
        this.source.log.warn(
          `could not extend the visibility of message ${this.held.get(f.handle) ?? "?"} on ${this.source.queueUrl}: ${f.code}: ${f.message}; it may be delivered again (the inbox deduplicates it)`,
        );
      }
    })().finally(() => {
      this.extending = null;
    });
    return this.extending;
  }

  private stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  /** Deletes every message still held; what cannot be deleted after a few attempts fails the ack (the pipeline retries it). */
  async ack(): Promise<void> {
    this.acking = true;
    try {
      await this.extending;
      await this.source.deleteAll(this.held);
      this.stop();
    } finally {
      this.acking = false;
    }
  }

  /** Makes the messages visible again at once, so they are redelivered promptly. */
  async release(): Promise<void> {
    this.stop();
    this.acking = true;
    await this.extending;
    const handles = [...this.held.keys()];
    this.held.clear();
    if (handles.length === 0) return;
    const failures = await this.source.changeVisibility(handles, 0);
    if (failures.length > 0) {
      this.source.log.warn(
        `could not hand ${failures.length} message(s) back to ${this.source.queueUrl} (${failures[0]!.code}: ${failures[0]!.message}); they return after their visibility timeout`,
      );
    }
  }
}


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
class SqsSource implements Source {
  readonly describe: string;
  /** Every ReceiveMessage answer, an empty one too (the pipeline's poll deadline, docs/WATCHDOG.md). */
  readonly reportsPolls = true;
  readonly queueUrl: string;
  readonly visibility: number;
  readonly log: BackendContext["log"];
  private client: SQSClient | undefined;
  private readonly conn: SqsConnection;
  private readonly queueName: string;
  private readonly sleeper = new Sleeper();

  constructor(
    private readonly cfg: SqsSourceOptions,
    private readonly ctx: BackendContext,
  ) {
    this.conn = new SqsConnection(cfg);
    this.queueUrl = cfg.queue_url;
    this.visibility = cfg.visibility_timeout;
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
    const perCall = (left: number) => Math.min(this.cfg.max_messages, left);
    let emptyPolls = 0;
    try {
      while (!signal.aborted) {
        const first = await this.receive(perCall(this.cfg.batch_size), wait, signal);
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
        // Fill the batch without waiting while the queue still hands out messages.
        for (let last = first.length; received.length < this.cfg.batch_size && last > 0 && !signal.aborted; ) {
          let more: SqsMessage[];
          try {
            more = await this.receive(perCall(this.cfg.batch_size - received.length), 0, signal);
          } catch (err) {
            // What is in hand goes out now; the next receive reports the error.
            this.log.debug(`receive failed while filling a batch (${errorMessage(err)}); delivering the ${received.length} message(s) in hand`);
            break;
          }
          inFlight.add(more);
          received.push(...more);
          last = more.length;
        }
        yield this.batch(received, inFlight);
      }
    } finally {
      signal.removeEventListener("abort", wake);
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
      producerKey: nonEmpty(attributes.pgt_dedup_key) ?? nonEmpty(dedupId),
      synthesizedKey: () => `sqs:${m.MessageId ?? `md5:${m.MD5OfBody ?? sha256Hex(m.Body ?? "")}`}`,
      eventTypeCandidate: nonEmpty(attributes.event_type) ?? this.queueName,
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

export const sink = sinkSpec({
  type: "sqs",
  config: SqsSinkConfig,
  create: (cfg, ctx) => new SqsSink(cfg, ctx),
});

export const source = sourceSpec({
  type: "sqs",
  config: SqsSourceConfig,
  create: (cfg, ctx) => new SqsSource(cfg, ctx),
});
