/**
 * Kafka (docs/interface.md §5.3, §6.4) through kafkajs.
 *
 * Sink: one idempotent producer; each write renders topics and keys, rejects what Kafka can
 * never take (illegal topic name, record larger than the topic's max.message.bytes), and sends
 * the rest with `sendBatch` in byte-bounded chunks, one chunk after the other so that a key's
 * records keep their order. Record key = dedup key unless `key_template`/`key_field` say
 * otherwise; header `pgt_dedup_key` always carries the dedup key (the Kafka source reads it
 * back) and `pgtrickle-full-refresh: true` marks full-refresh messages.
 *
 * Source: a consumer-group member (kafkajs `eachBatch`, auto-commit off) whose fetched partition
 * batches are held until the pipeline has committed them to the inbox; offsets are committed per
 * partition only in ack(). See KafkaSource.
 */
import {
  ConfigResourceTypes,
  Kafka,
  logLevel,
  Partitioners,
  type Admin,
  type Consumer,
  type EachBatchPayload,
  type IHeaders,
  type KafkaConfig,
  type KafkaMessage,
  type LogEntry,
  type Producer,
  type SASLOptions,
  type TopicMessages,
} from "kafkajs";
import type { ConsolaInstance } from "consola";
import * as v from "valibot";
import { configError, decodeError, errorMessage, permanentError, RelayError, transientError } from "../../errors.ts";
import { headerValue, inboundMessage, reverseSourceKeys, utf8OrNull } from "../../inbound.ts";
import { envelopeJson, renderTemplate, type Message } from "../../message.ts";
import { Sleeper, withTimeout } from "../../sleep.ts";
import { redact } from "../../redact.ts";
import { readSettingFile } from "../redact.ts";
import { COMPRESSION_TYPES, compressSync, registerKafkaCodecs, type KafkaCompression } from "./codecs.ts";
import { LAG_TIMEOUT_MS, sinkSpec, sourceSpec, type BackendContext, type Batch, type DeadLetter, type Lag, type Rejection, type Sink, type Source } from "../types.ts";

/**
 * kafkajs 2.2.4 arms `setTimeout(check, throttledUntil - Date.now())` with no throttle in force
 * (RequestQueue.scheduleCheckPendingRequests), a negative delay that the runtime turns into 1 ms
 * with a `TimeoutNegativeWarning` on stderr for every Kafka pipeline — noise that also breaks
 * `--log-format json`. A negative delay means "now" anyway, so it is passed on as 0. Installed
 * when this module loads, i.e. only in a process that runs a Kafka pipeline.
 */
const runtimeSetTimeout = globalThis.setTimeout;
globalThis.setTimeout = Object.assign(
  (handler: (...args: unknown[]) => void, delay?: number, ...rest: unknown[]) => runtimeSetTimeout(handler, typeof delay === "number" && delay < 0 ? 0 : delay, ...rest),
  runtimeSetTimeout,
) as typeof setTimeout;

/** Kafka's own rule for topic names (plus: not `.` or `..`). */
const TOPIC_NAME = /^[A-Za-z0-9._-]{1,249}$/;
const PLACEHOLDER = /\{[A-Za-z0-9_]+\}/;
export const isLegalTopic = (t: string) => TOPIC_NAME.test(t) && t !== "." && t !== "..";

/** Broker default of message.max.bytes / max.message.bytes, used when the topic's cannot be read. */
const KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1048588;
/** Record batch header (v2), and a generous per-record overhead (varints, attributes, header names). */
const BATCH_OVERHEAD = 61;
const RECORD_OVERHEAD = 64;

// kafkajs ships only gzip; snappy, lz4 and zstd are registered once, for sinks and sources.
registerKafkaCodecs();

const positiveInt = (what: string) => v.pipe(v.number(), v.integer(`${what} must be an integer`), v.minValue(1, `${what} must be ≥ 1`));

const lower = (x: string) => x.toLowerCase();

const KafkaSinkOptions = v.looseObject({
  /** The sink type; ignored here (the loader picks the backend by it). */
  type: v.optional(v.string()),
  /** Bootstrap brokers, `host:port`: a comma-separated string or an array. */
  brokers: v.pipe(
    v.union([v.string(), v.array(v.string())], "brokers must be a string or an array of strings"),
    v.transform((b) => (Array.isArray(b) ? b : b.split(",")).map((s) => s.trim()).filter((s) => s !== "")),
    v.minLength(1, "brokers must name at least one host:port"),
  ),
  /**
   * Sink: the destination topic; a value with `{…}` placeholders is treated as `topic_template`,
   * and a static topic must be a legal Kafka name (`[A-Za-z0-9._-]`, 1–249 characters). Source
   * (required): the topic to consume, or an array of topics.
   */
  topic: v.optional(v.string()),
  /**
   * Topic rendered per message, e.g. `pgtrickle.{stream_table}` (the template variables of the
   * README's "Messages" and top-level row fields). A message whose rendered topic is not a legal name is dead-lettered.
   */
  topic_template: v.optional(v.string()),
  /** Record key rendered per message, e.g. `{op}:{outbox_id}`. Default: the dedup key. */
  key_template: v.optional(v.string()),
  /**
   * Record key = this top-level field of the row (objects as JSON). Messages whose row lacks the
   * field (or holds null) fall back to the dedup key. Exclusive with `key_template`.
   */
  key_field: v.optional(v.string()),
  /**
   * Acknowledgements required per produce request: `all` (-1), `1` or `0`. Only `all` allows the
   * idempotent producer; with `1` or `0` it is switched off (and with `0` the relay cannot know
   * whether Kafka stored anything).
   */
  acks: v.optional(
    v.pipe(
      v.union([v.string(), v.number()], "acks must be all, 1 or 0"),
      v.transform((a) => String(a).toLowerCase()),
      v.picklist(["all", "-1", "1", "0"], "acks must be all, 1 or 0"),
      v.transform((a): -1 | 0 | 1 => (a === "all" || a === "-1" ? -1 : a === "1" ? 1 : 0)),
    ),
    "all",
  ),
  /**
   * Record batch compression: `none`, `gzip`, `snappy` (xerial framing, as Kafka's Java client
   * writes it), `lz4` (LZ4 frames, independent blocks) or `zstd`. The Kafka source reads all of
   * them, whatever codec a producer used.
   */
  compression: v.optional(
    v.pipe(
      v.string(),
      v.transform(lower),
      v.picklist(Object.keys(COMPRESSION_TYPES) as KafkaCompression[], "compression must be none, gzip, snappy, lz4 or zstd"),
    ),
    "none",
  ),
  /**
   * Accepted for compatibility with librdkafka settings; it has no effect: kafkajs has no
   * client-side linger, and the relay sends each pipeline batch as soon as it has it.
   */
  linger_ms: v.optional(v.pipe(v.number(), v.integer(), v.minValue(0))),
  /** Most records in one produce request; larger batches are sent as consecutive requests. */
  batch_num_messages: v.optional(positiveInt("batch_num_messages"), 1000),
  /**
   * Upper bound for one record batch, in bytes. Default: the topic's `max.message.bytes` as the
   * broker reports it (1048588 when it cannot be read). Larger single messages are dead-lettered.
   */
  max_message_bytes: v.optional(positiveInt("max_message_bytes")),
  /** Kafka client id (shows up in broker logs and quotas). */
  client_id: v.optional(v.string(), "pgtrickle-relay"),
  /** `PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL`. */
  security_protocol: v.optional(
    v.pipe(
      v.string(),
      v.transform((s) => s.toUpperCase()),
      v.picklist(["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"], "security_protocol must be PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"),
    ),
    "PLAINTEXT",
  ),
  /** `plain`, `scram-sha-256` or `scram-sha-512` (with a SASL_* security_protocol). */
  sasl_mechanism: v.optional(
    v.pipe(
      v.string(),
      v.transform(lower),
      v.picklist(["plain", "scram-sha-256", "scram-sha-512"], "sasl_mechanism must be plain, scram-sha-256 or scram-sha-512"),
    ),
  ),
  /** SASL user name. */
  sasl_username: v.optional(v.string()),
  /** SASL password; use `${env:NAME}` or `${file:/path}` rather than the literal value. */
  sasl_password: v.optional(v.string()),
  /** PEM file with the CA certificate(s) that signed the brokers' certificates (SSL, SASL_SSL). */
  ssl_ca_file: v.optional(v.string()),
  /** PEM client certificate for mutual TLS. */
  ssl_cert_file: v.optional(v.string()),
  /** PEM private key of `ssl_cert_file`. */
  ssl_key_file: v.optional(v.string()),
  /** Passphrase of an encrypted `ssl_key_file`. */
  ssl_key_password: v.optional(v.string()),
  /** Create a missing topic (at start, and for new rendered topics) instead of failing. */
  create_topic: v.optional(v.boolean(), false),
  /** Partitions of a topic created by `create_topic`; default: the broker's `num.partitions`. */
  num_partitions: v.optional(positiveInt("num_partitions")),
  /** Replication factor of a topic created by `create_topic`; default: the broker's. */
  replication_factor: v.optional(positiveInt("replication_factor")),
  /** Milliseconds to establish a broker connection. */
  connection_timeout_ms: v.optional(positiveInt("connection_timeout_ms"), 5000),
  /** Milliseconds a request (and the broker's wait for acks) may take. */
  request_timeout_ms: v.optional(positiveInt("request_timeout_ms"), 30000),
});

const KafkaSinkConfig = v.pipe(
  KafkaSinkOptions,
  v.transform((c) => {
    // A `topic` that holds placeholders is a template (users write it that way).
    const topicTemplate = c.topic_template ?? (c.topic !== undefined && PLACEHOLDER.test(c.topic) ? c.topic : undefined);
    const topic = topicTemplate === undefined ? c.topic : undefined;
    return { ...c, topic, topic_template: topicTemplate, topicBoth: c.topic !== undefined && c.topic_template !== undefined };
  }),
  v.check((c) => !c.topicBoth, "set either topic or topic_template, not both"),
  v.check((c) => c.topic !== undefined || c.topic_template !== undefined, "topic (or topic_template) is required"),
  v.check(
    (c) => c.topic === undefined || isLegalTopic(c.topic),
    "topic is not a legal Kafka topic name (letters, digits, '.', '_', '-'; 1–249 characters)",
  ),
  v.check(
    (c) => c.topic_template === undefined || PLACEHOLDER.test(c.topic_template) || isLegalTopic(c.topic_template),
    "topic_template has no placeholder and is not a legal Kafka topic name",
  ),
  v.check((c) => !(c.key_template !== undefined && c.key_field !== undefined), "set either key_template or key_field, not both"),
  v.check(
    (c) => c.sasl_mechanism === undefined || c.security_protocol.startsWith("SASL_"),
    "sasl_mechanism needs security_protocol SASL_PLAINTEXT or SASL_SSL",
  ),
  v.check(
    (c) => !c.security_protocol.startsWith("SASL_") || (c.sasl_mechanism !== undefined && c.sasl_username !== undefined && c.sasl_password !== undefined),
    "security_protocol SASL_* needs sasl_mechanism, sasl_username and sasl_password",
  ),
  v.check(
    (c) =>
      c.security_protocol === "SSL" ||
      c.security_protocol === "SASL_SSL" ||
      (c.ssl_ca_file === undefined && c.ssl_cert_file === undefined && c.ssl_key_file === undefined),
    "ssl_ca_file/ssl_cert_file/ssl_key_file need security_protocol SSL or SASL_SSL",
  ),
  v.check((c) => (c.ssl_cert_file === undefined) === (c.ssl_key_file === undefined), "ssl_cert_file and ssl_key_file go together"),
);

export type KafkaSinkConfig = v.InferOutput<typeof KafkaSinkConfig>;

/** Connection settings shared by the sink and (later) the source. */
export interface KafkaConnectionOptions {
  brokers: string[];
  client_id: string;
  security_protocol: "PLAINTEXT" | "SSL" | "SASL_PLAINTEXT" | "SASL_SSL";
  sasl_mechanism?: "plain" | "scram-sha-256" | "scram-sha-512";
  sasl_username?: string;
  sasl_password?: string;
  ssl_ca_file?: string;
  ssl_cert_file?: string;
  ssl_key_file?: string;
  ssl_key_password?: string;
  connection_timeout_ms: number;
  request_timeout_ms: number;
}

const readPem = (path: string, key: string): Buffer => readSettingFile(path, `kafka ${key}`);

/** Removes the SASL password (and TLS key passphrase) from any text kafkajs hands us. */
export function scrubber(cfg: KafkaConnectionOptions): (text: string) => string {
  const secrets = [cfg.sasl_password, cfg.ssl_key_password].filter((s): s is string => !!s && s.length >= 1);
  return (text) => redact(text, secrets);
}

/**
 * kafkajs logs every retry at ERROR; each failure it finally gives up on reaches the pipeline as
 * a classified RelayError anyway, so its ERROR/INFO go to debug, its WARN stays a warning, and
 * only trace-level relay logging turns on kafkajs's per-request DEBUG lines.
 */
export function kafkaLogCreator(log: ConsolaInstance, scrub: (t: string) => string) {
  return () =>
    ({ namespace, level, log: entry }: LogEntry) => {
      const { message, timestamp: _t, logger: _l, stack: _s, ...extra } = entry as LogEntry["log"] & { stack?: string };
      const details = Object.entries(extra)
        .filter(([, value]) => value !== undefined && typeof value !== "object")
        .map(([k, value]) => `${k}=${String(value)}`)
        .join(" ");
      const line = scrub(`kafkajs ${namespace}: ${message}${details ? ` (${details})` : ""}`);
      // A bounded retry count is deliberate (see the producer below), so this warning is noise.
      if (level === logLevel.WARN && message.startsWith("Limiting retries for the idempotent producer")) return log.debug(line);
      // A rebalance is routine; the source logs it (and what happens to the batch in hand) itself.
      if (level === logLevel.WARN && message.startsWith("The group is rebalancing")) return log.debug(line);
      if (level === logLevel.WARN) return log.warn(line);
      if (level === logLevel.DEBUG) return log.trace(line);
      return log.debug(line);
    };
}

export function kafkaClientConfig(cfg: KafkaConnectionOptions, log: ConsolaInstance): KafkaConfig {
  const tls = cfg.security_protocol === "SSL" || cfg.security_protocol === "SASL_SSL";
  let ssl: KafkaConfig["ssl"] = tls;
  if (tls && (cfg.ssl_ca_file || cfg.ssl_cert_file)) {
    ssl = {
      ...(cfg.ssl_ca_file ? { ca: [readPem(cfg.ssl_ca_file, "ssl_ca_file")] } : {}),
      ...(cfg.ssl_cert_file ? { cert: readPem(cfg.ssl_cert_file, "ssl_cert_file") } : {}),
      ...(cfg.ssl_key_file ? { key: readPem(cfg.ssl_key_file, "ssl_key_file") } : {}),
      ...(cfg.ssl_key_password ? { passphrase: cfg.ssl_key_password } : {}),
    };
  }
  let sasl: SASLOptions | undefined;
  if (cfg.sasl_mechanism && cfg.sasl_username !== undefined && cfg.sasl_password !== undefined) {
    sasl = { mechanism: cfg.sasl_mechanism, username: cfg.sasl_username, password: cfg.sasl_password } as SASLOptions;
  }
  const level = log.level >= 5 ? logLevel.DEBUG : log.level >= 4 ? logLevel.INFO : logLevel.WARN;
  return {
    clientId: cfg.client_id,
    brokers: cfg.brokers,
    ssl,
    sasl,
    connectionTimeout: cfg.connection_timeout_ms,
    authenticationTimeout: cfg.connection_timeout_ms,
    requestTimeout: cfg.request_timeout_ms,
    // A few quick retries inside kafkajs; longer outages go back to the pipeline's backoff.
    retry: { initialRetryTime: 250, retries: 3, maxRetryTime: 5000 },
    logLevel: level,
    logCreator: kafkaLogCreator(log, scrubber(cfg)),
  };
}

/** Protocol error types found anywhere in a kafkajs error's cause chain. */
function kafkaErrorTypes(err: unknown): { types: Set<string>; names: Set<string>; messages: string[] } {
  const types = new Set<string>();
  const names = new Set<string>();
  const messages: string[] = [];
  let e: unknown = err;
  for (let depth = 0; e && depth < 8; depth++) {
    const x = e as { type?: unknown; name?: unknown; message?: unknown; cause?: unknown; errors?: unknown };
    if (typeof x.type === "string") types.add(x.type);
    if (typeof x.name === "string") names.add(x.name);
    if (typeof x.message === "string" && !messages.includes(x.message)) messages.push(x.message);
    if (Array.isArray(x.errors)) for (const inner of x.errors) if (typeof inner?.type === "string") types.add(inner.type);
    e = x.cause === e ? undefined : x.cause;
  }
  return { types, names, messages };
}

const TOO_LARGE = ["MESSAGE_TOO_LARGE", "RECORD_LIST_TOO_LARGE", "INVALID_RECORD"];
const AUTH = ["SASL_AUTHENTICATION_FAILED", "UNSUPPORTED_SASL_MECHANISM", "ILLEGAL_SASL_STATE"];

export type KafkaFailureKind = "too_large" | "invalid_topic" | "auth" | "denied" | "config" | "transient";

/** What a kafkajs failure means for the relay. */
export function classifyKafkaError(err: unknown): { kind: KafkaFailureKind; types: Set<string>; detail: string } {
  const { types, names, messages } = kafkaErrorTypes(err);
  const detail = messages.join(": caused by ") || errorMessage(err);
  const has = (list: string[]) => list.some((t) => types.has(t));
  let kind: KafkaFailureKind = "transient";
  if (has(TOO_LARGE)) kind = "too_large";
  else if (types.has("INVALID_TOPIC_EXCEPTION")) kind = "invalid_topic";
  else if (has(AUTH) || names.has("KafkaJSSASLAuthenticationError")) kind = "auth";
  else if (has(["TOPIC_AUTHORIZATION_FAILED", "CLUSTER_AUTHORIZATION_FAILED", "TRANSACTIONAL_ID_AUTHORIZATION_FAILED", "GROUP_AUTHORIZATION_FAILED"])) kind = "denied";
  else if (has(["INVALID_REQUIRED_ACKS", "UNSUPPORTED_COMPRESSION_TYPE", "UNSUPPORTED_VERSION", "INVALID_SESSION_TIMEOUT", "INVALID_GROUP_ID"])) kind = "config";
  return { kind, types, detail };
}

interface Outgoing {
  message: Message;
  topic: string;
  key: string;
  value: Buffer;
  headers: Record<string, string>;
  /** Upper estimate of the record's size inside a record batch. */
  bytes: number;
}

class KafkaSink implements Sink {
  readonly describe: string;
  private readonly brokerList: string;
  private readonly scrub: (t: string) => string;
  private readonly idempotent: boolean;
  private kafka?: Kafka;
  private producer?: Producer;
  private admin?: Admin;
  /** Topics known to exist → their max.message.bytes. */
  private readonly topics = new Map<string, number>();

  constructor(
    private readonly cfg: KafkaSinkConfig,
    private readonly ctx: BackendContext,
  ) {
    this.brokerList = cfg.brokers.join(",");
    this.describe = `kafka ${this.brokerList} → ${cfg.topic ?? cfg.topic_template}`;
    this.scrub = scrubber(cfg);
    this.idempotent = cfg.acks === -1;
    if (!this.idempotent) ctx.log.info(`kafka sink: acks=${cfg.acks}, so the idempotent producer is off (Kafka allows it only with acks=all)`);
    if (cfg.linger_ms !== undefined) ctx.log.info("kafka sink: linger_ms has no effect (kafkajs sends each batch at once)");
  }

  async start(): Promise<void> {
    await this.connect();
    if (this.cfg.topic !== undefined) await this.ensureTopic(this.cfg.topic, "start");
  }

  async write(messages: Message[]): Promise<Rejection[]> {
    if (messages.length === 0) return [];
    if (!this.producer || !this.admin) await this.connect();
    const rejections: Rejection[] = [];
    const outgoing: Outgoing[] = [];
    for (const m of messages) {
      const topic = this.cfg.topic ?? renderTemplate(this.cfg.topic_template!, m);
      if (!isLegalTopic(topic)) {
        rejections.push({
          message: m,
          error: `kafka: rendered topic '${topic}' is not a legal Kafka topic name (letters, digits, '.', '_', '-'; 1–249 characters)`,
        });
        continue;
      }
      const key = this.keyOf(m);
      const value = Buffer.from(envelopeJson(m));
      const headers: Record<string, string> = { pgt_dedup_key: m.dedup_key };
      if (m.is_full_refresh) headers["pgtrickle-full-refresh"] = "true";
      let bytes = RECORD_OVERHEAD + Buffer.byteLength(key) + value.length;
      for (const [k, hv] of Object.entries(headers)) bytes += k.length + Buffer.byteLength(hv);
      outgoing.push({ message: m, topic, key, value, headers, bytes });
    }

    try {
      for (const topic of new Set(outgoing.map((o) => o.topic))) await this.ensureTopic(topic, "write");
    } catch (err) {
      throw err instanceof RelayError ? err : this.failure(err, "checking topics");
    }

    // A record that cannot fit a record batch on its own is refused before anything is sent.
    const sendable: Outgoing[] = [];
    for (const o of outgoing) {
      const limit = this.topics.get(o.topic)!;
      const size = BATCH_OVERHEAD + this.compressedEstimate(o);
      if (size > limit) {
        rejections.push({
          message: o.message,
          error: `kafka: message of about ${size} bytes exceeds max.message.bytes ${limit} of topic '${o.topic}'`,
        });
      } else sendable.push(o);
    }

    for (const chunk of this.chunks(sendable)) rejections.push(...(await this.send(chunk)));
    return rejections;
  }

  async close(): Promise<void> {
    await this.disconnect();
  }

  private keyOf(m: Message): string {
    if (this.cfg.key_template !== undefined) return renderTemplate(this.cfg.key_template, m);
    if (this.cfg.key_field !== undefined) {
      const p = m.payload;
      if (p && typeof p === "object" && !Array.isArray(p)) {
        const value = (p as Record<string, unknown>)[this.cfg.key_field];
        if (value !== undefined && value !== null) return typeof value === "object" ? JSON.stringify(value) : String(value);
      }
    }
    return m.dedup_key;
  }

  /** Uncompressed size, or with compression the real compressed size for records that look too big. */
  private compressedEstimate(o: Outgoing): number {
    if (this.cfg.compression === "none" || BATCH_OVERHEAD + o.bytes <= this.topics.get(o.topic)!) return o.bytes;
    return o.bytes - o.value.length + compressSync(this.cfg.compression, o.value).length;
  }

  /** Consecutive slices: ≤ batch_num_messages records, estimated bytes ≤ the smallest topic limit. */
  private *chunks(list: Outgoing[]): Generator<Outgoing[]> {
    let chunk: Outgoing[] = [];
    let bytes = BATCH_OVERHEAD;
    let limit = Infinity;
    for (const o of list) {
      const topicLimit = this.topics.get(o.topic)!;
      const nextLimit = Math.min(limit, topicLimit);
      if (chunk.length > 0 && (chunk.length >= this.cfg.batch_num_messages || bytes + o.bytes > nextLimit)) {
        yield chunk;
        chunk = [];
        bytes = BATCH_OVERHEAD;
        limit = topicLimit;
      } else limit = nextLimit;
      chunk.push(o);
      bytes += o.bytes;
    }
    if (chunk.length > 0) yield chunk;
  }

  /**
   * One sendBatch for the chunk. A record the broker still refuses (size estimate off, invalid
   * record) is isolated by halving the chunk; everything else fails the write.
   */
  private async send(chunk: Outgoing[]): Promise<Rejection[]> {
    const producer = this.producer;
    if (!producer) await this.connect();
    const byTopic = new Map<string, TopicMessages>();
    for (const o of chunk) {
      let t = byTopic.get(o.topic);
      if (!t) byTopic.set(o.topic, (t = { topic: o.topic, messages: [] }));
      t.messages.push({ key: o.key, value: o.value, headers: o.headers });
    }
    try {
      await this.producer!.sendBatch({
        topicMessages: [...byTopic.values()],
        acks: this.cfg.acks,
        timeout: this.cfg.request_timeout_ms,
        compression: COMPRESSION_TYPES[this.cfg.compression],
      });
      return [];
    } catch (err) {
      // After any failed produce the idempotent producer's sequence numbers may no longer match
      // the broker's; a fresh producer (new producer id) is the safe state for what follows.
      await this.disconnect();
      const c = classifyKafkaError(err);
      if (c.kind === "too_large" || c.kind === "invalid_topic") {
        if (chunk.length === 1) {
          return [{ message: chunk[0]!.message, error: `kafka refused the message for topic '${chunk[0]!.topic}': ${this.scrub(c.detail)}` }];
        }
        await this.connect();
        const half = Math.ceil(chunk.length / 2);
        const first = await this.send(chunk.slice(0, half));
        return [...first, ...(await this.send(chunk.slice(half)))];
      }
      throw this.failure(err, `producing ${chunk.length} messages`);
    }
  }

  private async ensureTopic(topic: string, phase: "start" | "write"): Promise<void> {
    if (this.topics.has(topic)) return;
    const admin = this.admin!;
    let exists: boolean;
    try {
      exists = (await admin.listTopics()).includes(topic);
      if (!exists && this.cfg.create_topic && this.ctx.check) {
        this.ctx.check.wouldCreate(`kafka topic '${topic}'`);
        exists = true;
      } else if (!exists && this.cfg.create_topic) {
        await admin.createTopics({
          topics: [{ topic, numPartitions: this.cfg.num_partitions ?? -1, replicationFactor: this.cfg.replication_factor ?? -1 }],
          waitForLeaders: true,
        });
        this.ctx.log.info(`kafka sink: created topic '${topic}'`);
        exists = true;
      }
    } catch (err) {
      throw this.failure(err, `checking topic '${topic}'`);
    }
    if (!exists) {
      const text = `kafka topic '${topic}' does not exist on ${this.brokerList}: create it, or set create_topic: true`;
      // At start it is plainly configuration; a topic rendered from a row may be created later
      // by an operator, so the batch waits (retried) rather than the pipeline failing.
      throw phase === "start" ? configError(text) : transientError(text);
    }
    this.topics.set(topic, this.cfg.max_message_bytes ?? (await this.maxMessageBytes(topic)));
  }

  private async maxMessageBytes(topic: string): Promise<number> {
    try {
      const { resources } = await this.admin!.describeConfigs({
        resources: [{ type: ConfigResourceTypes.TOPIC, name: topic, configNames: ["max.message.bytes"] }],
        includeSynonyms: false,
      });
      const value = Number(resources[0]?.configEntries.find((e) => e.configName === "max.message.bytes")?.configValue);
      if (Number.isFinite(value) && value > 0) return value;
    } catch (err) {
      this.ctx.log.debug(`kafka sink: cannot read max.message.bytes of '${topic}' (${this.scrub(errorMessage(err))}); assuming ${KAFKA_DEFAULT_MAX_MESSAGE_BYTES}`);
    }
    return KAFKA_DEFAULT_MAX_MESSAGE_BYTES;
  }

  private async connect(): Promise<void> {
    this.kafka ??= new Kafka(kafkaClientConfig(this.cfg, this.ctx.log));
    const producer = this.kafka.producer({
      createPartitioner: Partitioners.DefaultPartitioner,
      idempotent: this.idempotent,
      // Kafka keeps idempotent ordering for up to 5 requests in flight; without idempotence a
      // retried request could overtake a later one, so then only one at a time.
      maxInFlightRequests: this.idempotent ? 5 : 1,
      allowAutoTopicCreation: false,
      retry: { initialRetryTime: 250, retries: 3, maxRetryTime: 5000 },
    });
    const admin = this.kafka.admin();
    try {
      await producer.connect();
      await admin.connect();
    } catch (err) {
      await Promise.allSettled([producer.disconnect(), admin.disconnect()]);
      throw this.failure(err, "connecting");
    }
    this.producer = producer;
    this.admin = admin;
  }

  private async disconnect(): Promise<void> {
    const { producer, admin } = this;
    this.producer = undefined;
    this.admin = undefined;
    await Promise.allSettled([producer?.disconnect(), admin?.disconnect()]);
  }

  /** A RelayError naming the brokers, the kind decided by the kafkajs error; no secret in it. */
  private failure(err: unknown, doing: string): RelayError {
    return kafkaFailure(err, `kafka ${doing} on ${this.brokerList}`, this.cfg, this.scrub, (types) =>
      types.has("CLUSTER_AUTHORIZATION_FAILED") && this.idempotent
        ? "; the idempotent producer needs IDEMPOTENT_WRITE on the cluster (grant it, or set acks to 1)"
        : "; grant the principal WRITE/DESCRIBE on the topic",
    );
  }
}

/** A kafkajs failure as a RelayError: `where` names the operation and the brokers; secrets scrubbed. */
export function kafkaFailure(
  err: unknown,
  where: string,
  cfg: Pick<KafkaConnectionOptions, "security_protocol">,
  scrub: (t: string) => string,
  deniedHint: (types: Set<string>) => string,
): RelayError {
  const c = classifyKafkaError(err);
  const detail = scrub(c.detail);
  switch (c.kind) {
    case "auth":
      return configError(
        `${where}: authentication failed (${detail}); check security_protocol (${cfg.security_protocol}), sasl_mechanism, sasl_username and sasl_password`,
        undefined,
      );
    case "denied":
      return configError(`${where}: not authorised (${detail})${deniedHint(c.types)}`);
    case "config":
      return configError(`${where}: ${detail}`);
    case "too_large":
    case "invalid_topic":
      return permanentError(`${where}: ${detail}`);
    default:
      return transientError(`${where}: ${detail}`);
  }
}

// ── Kafka source (reverse) ──────────────────────────────────────────────────────────────────

const sinkKeys = KafkaSinkOptions.entries;

const KafkaSourceOptions = v.looseObject({
  ...reverseSourceKeys,
  type: v.optional(v.string()),
  brokers: sinkKeys.brokers,
  topic: v.pipe(
    v.union([v.string(), v.array(v.string())], "topic (a topic name, or an array of them) is required"),
    v.transform((t) => [...new Set((Array.isArray(t) ? t : [t]).map((x) => x.trim()))]),
    v.minLength(1, "topic must name at least one topic"),
    v.check((ts) => ts.every(isLegalTopic), "topic is not a legal Kafka topic name (letters, digits, '.', '_', '-'; 1–249 characters)"),
  ),
  /**
   * Consumer group. Default `pgtrickle-relay-<pipeline>`: one group per pipeline, so two
   * pipelines never split a topic between them (or starve each other's partitions). To take over
   * the offsets of the old relay, set `pgtrickle-inbox-writer`, its fixed group.
   */
  group_id: v.optional(v.pipe(v.string(), v.minLength(1, "group_id must not be empty"))),
  /**
   * Where a group without a committed offset starts: `earliest` (the oldest record Kafka still
   * holds) or `latest` (records produced from the pipeline's first start on; that position is
   * committed right away, so a restart does not skip what arrived in between).
   */
  auto_offset_reset: v.optional(
    v.pipe(v.string(), v.transform(lower), v.picklist(["earliest", "latest"], "auto_offset_reset must be earliest or latest")),
    "earliest",
  ),
  /**
   * Use the record key as the dedup key (event_id) when the record has no `pgt_dedup_key`,
   * `dedup_key` or `Idempotency-Key` header. Only for topics whose keys are unique per event:
   * Kafka keys are partitioning keys, and distinct events sharing one would collapse into one row.
   */
  dedup_from_key: v.optional(v.boolean(), false),
  /**
   * Milliseconds without a heartbeat after which the broker drops this member and hands its
   * partitions to others. Heartbeats go on while a batch is being written to the inbox.
   */
  session_timeout_ms: v.optional(positiveInt("session_timeout_ms"), 30000),
  /** Milliseconds between heartbeats; must be below session_timeout_ms (a third of it or less is usual). */
  heartbeat_interval_ms: v.optional(positiveInt("heartbeat_interval_ms"), 3000),
  /**
   * Milliseconds the group waits for its members to rejoin during a rebalance. A batch being
   * written when a rebalance starts is finished and committed within this time.
   */
  rebalance_timeout_ms: v.optional(positiveInt("rebalance_timeout_ms"), 60000),
  /** Longest time the broker holds a fetch open while the partitions have nothing new (new records end it at once). */
  max_wait_ms: v.optional(positiveInt("max_wait_ms"), 1000),
  client_id: sinkKeys.client_id,
  security_protocol: sinkKeys.security_protocol,
  sasl_mechanism: sinkKeys.sasl_mechanism,
  sasl_username: sinkKeys.sasl_username,
  sasl_password: sinkKeys.sasl_password,
  ssl_ca_file: sinkKeys.ssl_ca_file,
  ssl_cert_file: sinkKeys.ssl_cert_file,
  ssl_key_file: sinkKeys.ssl_key_file,
  ssl_key_password: sinkKeys.ssl_key_password,
  connection_timeout_ms: sinkKeys.connection_timeout_ms,
  request_timeout_ms: sinkKeys.request_timeout_ms,
});

/** Security settings that do not fit together (the same rules as the sink's), or null. */
export function kafkaSecurityProblem(c: KafkaConnectionOptions): string | null {
  if (c.sasl_mechanism !== undefined && !c.security_protocol.startsWith("SASL_")) return "sasl_mechanism needs security_protocol SASL_PLAINTEXT or SASL_SSL";
  if (c.security_protocol.startsWith("SASL_") && (c.sasl_mechanism === undefined || c.sasl_username === undefined || c.sasl_password === undefined)) {
    return "security_protocol SASL_* needs sasl_mechanism, sasl_username and sasl_password";
  }
  const tls = c.security_protocol === "SSL" || c.security_protocol === "SASL_SSL";
  if (!tls && (c.ssl_ca_file !== undefined || c.ssl_cert_file !== undefined || c.ssl_key_file !== undefined)) {
    return "ssl_ca_file/ssl_cert_file/ssl_key_file need security_protocol SSL or SASL_SSL";
  }
  if ((c.ssl_cert_file === undefined) !== (c.ssl_key_file === undefined)) return "ssl_cert_file and ssl_key_file go together";
  return null;
}

const KafkaSourceConfig = v.pipe(
  KafkaSourceOptions,
  v.rawCheck(({ dataset, addIssue }) => {
    if (!dataset.typed) return;
    const problem = kafkaSecurityProblem(dataset.value);
    if (problem) addIssue({ message: problem });
    if (dataset.value.heartbeat_interval_ms >= dataset.value.session_timeout_ms) addIssue({ message: "heartbeat_interval_ms must be below session_timeout_ms" });
  }),
);

export type KafkaSourceConfig = v.InferOutput<typeof KafkaSourceConfig>;

/** Headers that carry a producer's dedup key, in order of preference (docs/interface.md §6.5). */
export const KAFKA_DEDUP_HEADERS = ["pgt_dedup_key", "dedup_key", "Idempotency-Key"] as const;

/** kafkajs headers as text: a repeated header keeps its first value; a value that is not UTF-8 is left out. */
export function kafkaHeaders(headers: IHeaders | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [name, raw] of Object.entries(headers ?? {})) {
    const first = Array.isArray(raw) ? raw[0] : raw;
    if (first === undefined || first === null) continue;
    const text = typeof first === "string" ? first : utf8OrNull(first);
    if (text !== null) out[name] = text;
  }
  return out;
}

/** The parts of a record the mapping reads (a KafkaMessage, or one rebuilt from a dead letter). */
export interface KafkaRecord {
  topic: string;
  partition: number;
  offset: string;
  key: Buffer | null;
  value: Buffer | null;
  headers?: IHeaders;
  timestamp?: string;
}

export type Converted = { ok: true; message: Message } | { ok: false; deadLetter: DeadLetter };

/**
 * One record → its inbox message (docs/interface.md §6.5, §6.6): event_id = header `pgt_dedup_key` /
 * `dedup_key` / `Idempotency-Key` verbatim, else the record key with `dedup_from_key`, else
 * `kafka:<topic>:<partition>:<offset>`; event_type candidate = header `event-type`, else the
 * topic; aggregate_id fallback = the record key; trace_id from a `traceparent` header. A record
 * without a value (a tombstone) has nothing to put in the inbox: it becomes a `decode` dead letter.
 */
export function convertKafkaRecord(r: KafkaRecord, cfg: Pick<KafkaSourceConfig, "dedup_from_key" | "event_type" | "event_type_field">, pipeline: string): Converted {
  const headers = kafkaHeaders(r.headers);
  const key = r.key ? utf8OrNull(r.key) : null;
  let producerKey: string | null = null;
  for (const name of KAFKA_DEDUP_HEADERS) {
    const value = headerValue(headers, name);
    if (value) {
      producerKey = value;
      break;
    }
  }
  if (!producerKey && cfg.dedup_from_key && key) producerKey = key;
  const synthesized = `kafka:${r.topic}:${r.partition}:${r.offset}`;
  if (r.value === null) {
    return {
      ok: false,
      deadLetter: {
        dedup_key: producerKey ?? synthesized,
        outbox_id: null,
        message: { topic: r.topic, partition: r.partition, offset: r.offset, key, headers, timestamp: r.timestamp ?? null, value: null },
        error: `kafka record ${r.topic}/${r.partition}@${r.offset} has no value (a tombstone): there is no event to put in the inbox`,
        kind: "decode",
      },
    };
  }
  const message = inboundMessage({
    pipeline,
    sourceType: "kafka",
    where: r.topic,
    body: r.value,
    headers,
    producerKey,
    synthesizedKey: synthesized,
    eventTypeCandidate: headerValue(headers, "event-type") ?? r.topic,
    aggregateIdFallback: key,
    config: cfg,
  });
  return { ok: true, message };
}

/** Commit refusals that mean this member no longer owns the partitions (the batch goes to their new owner). */
const OWNERSHIP_LOST = ["REBALANCE_IN_PROGRESS", "ILLEGAL_GENERATION", "UNKNOWN_MEMBER_ID", "FENCED_INSTANCE_ID"];

/**
 * A partition batch kafkajs handed to eachBatch. eachBatch does not return before the part is
 * settled, so kafkajs fetches nothing more (for this fetch) and cannot rejoin the group while
 * the part's records are on their way to the inbox.
 */
interface Part {
  topic: string;
  partition: number;
  messages: KafkaMessage[];
  /** Committed once every message is acknowledged: also past control records at the batch's end. */
  endOffset: string;
  /** Messages handed out in batches, and acknowledged, so far (a prefix of `messages`). */
  handed: number;
  acked: number;
  /** The group join it was fetched under (see KafkaSession.joins). */
  join: number;
  payload: EachBatchPayload;
  settled: boolean;
  /** Lets eachBatch return; kafkajs continues from the last resolved (acknowledged) offset. */
  settle(): void;
}

interface Segment {
  part: Part;
  from: number;
  to: number;
}

const tp = (topic: string, partition: number) => `${topic}|${partition}`;

/**
 * One consumer-group membership: created by each batches() call, closed when the iteration ends
 * (so a transient failure is followed by a fresh consumer). Bridges kafkajs's push model to the
 * pipeline's pull: eachBatch parks each fetched partition batch as a Part and waits; next()
 * builds a Batch of at most batch_size records from the parked parts (several partitions of one
 * fetch arrive together, since every partition may be processed concurrently); ack() commits
 * offset+1 per partition and only then lets the parts go. At most one Batch is out at a time
 * (the pipeline acks or releases before asking for the next).
 */
class KafkaSession {
  private consumer?: Consumer;
  private parts: Part[] = [];
  private readonly sleeper = new Sleeper();
  private crashed: RelayError | null = null;
  private closing = false;
  /** Group joins so far: a batch fetched under an earlier join is never committed under a later one. */
  private joins = 0;
  /** topic → partitions assigned at the last join; null until the first join. */
  private assignment: Map<string, number[]> | null = null;
  private rebalancing = false;
  private rebalancingSince = 0;
  private beating = false;
  private heartbeatTimer?: ReturnType<typeof setInterval>;
  /** Next offset per partition known here: acknowledged records, and batches kafkajs skipped entirely (control records). */
  private readonly position = new Map<string, bigint>();

  constructor(
    private readonly src: KafkaSource,
    private readonly cfg: KafkaSourceConfig,
    private readonly ctx: BackendContext,
  ) {}

  async open(): Promise<void> {
    const cfg = this.cfg;
    const partitions = await this.src.partitionCount();
    const consumer = this.src.client().consumer({
      groupId: this.src.groupId,
      sessionTimeout: cfg.session_timeout_ms,
      rebalanceTimeout: cfg.rebalance_timeout_ms,
      heartbeatInterval: cfg.heartbeat_interval_ms,
      maxWaitTimeInMs: cfg.max_wait_ms,
      allowAutoTopicCreation: false,
      // A crash ends this session; the pipeline's backoff starts the next one (never kafkajs itself,
      // whose restarted consumer this session would not see).
      retry: { initialRetryTime: 250, retries: 5, maxRetryTime: 5000, restartOnFailure: async () => false },
    });
    this.consumer = consumer;
    const ev = consumer.events;
    consumer.on(ev.GROUP_JOIN, ({ payload }) => {
      this.joins++;
      this.assignment = new Map(Object.entries(payload.memberAssignment));
      this.rebalancing = false;
      const mine = [...this.assignment].map(([t, ps]) => `${t}[${ps.join(",")}]`).join(" ") || "no partitions";
      this.ctx.log.debug(`kafka source: joined group '${this.src.groupId}' (member ${payload.memberId}): ${mine}`);
      this.sleeper.wake();
    });
    consumer.on(ev.REBALANCING, () => this.onRebalance("the group is rebalancing"));
    consumer.on(ev.FETCH, ({ payload }) => this.ctx.onPoll?.(payload.duration / 1000));
    consumer.on(ev.CRASH, ({ payload }) => {
      this.crashed = this.src.failure(payload.error, "consuming");
      this.sleeper.wake();
    });
    consumer.on(ev.START_BATCH_PROCESS, ({ payload }) => {
      // A fetched batch of only control records or aborted transactions: kafkajs moves past it
      // without calling eachBatch. Remembered so that drain does not wait for a commit there.
      if (payload.batchSize === 0) this.advance(payload.topic, payload.partition, BigInt(payload.lastOffset) + 1n);
    });
    try {
      await consumer.connect();
      if (cfg.auto_offset_reset === "latest") await this.src.pinLatest();
      await consumer.subscribe({ topics: cfg.topic, fromBeginning: cfg.auto_offset_reset === "earliest" });
      await consumer.run({
        autoCommit: false,
        eachBatchAutoResolve: false,
        partitionsConsumedConcurrently: Math.max(1, Math.min(partitions, 1024)),
        eachBatch: (payload) => this.eachBatch(payload),
      });
    } catch (err) {
      throw err instanceof RelayError ? err : this.src.failure(err, "starting the consumer");
    }
    // run() resolves after a failed join too (kafkajs reports it as a crash).
    if (this.crashed) throw this.crashed;
    this.heartbeatTimer = setInterval(() => this.heartbeat(), Math.max(100, Math.floor(cfg.heartbeat_interval_ms / 3)));
  }

  private advance(topic: string, partition: number, next: bigint): void {
    const key = tp(topic, partition);
    const known = this.position.get(key);
    if (known === undefined || next > known) this.position.set(key, next);
  }

  private async eachBatch(payload: EachBatchPayload): Promise<void> {
    const { batch } = payload;
    if (this.closing || this.rebalancing || batch.messages.length === 0 || !payload.isRunning() || payload.isStale()) return;
    let resolve!: () => void;
    const settled = new Promise<void>((r) => (resolve = r));
    const part: Part = {
      topic: batch.topic,
      partition: batch.partition,
      messages: batch.messages,
      endOffset: (BigInt(batch.lastOffset()) + 1n).toString(),
      handed: 0,
      acked: 0,
      join: this.joins,
      payload,
      settled: false,
      settle() {
        if (part.settled) return;
        part.settled = true;
        resolve();
      },
    };
    this.parts.push(part);
    this.sleeper.wake();
    await settled;
  }

  /** Keeps the membership alive while parts are held (kafkajs itself heartbeats only between batches). */
  private heartbeat(): void {
    const held = this.parts.find((p) => !p.settled);
    if (!held || this.beating) return;
    this.beating = true;
    held.payload
      .heartbeat()
      .catch((err: unknown) => {
        const { types } = kafkaErrorTypes(err);
        if (OWNERSHIP_LOST.some((t) => types.has(t))) this.onRebalance(`heartbeat answered ${[...types].join("/")}`);
        else this.ctx.log.debug(`kafka source: heartbeat failed: ${this.src.scrub(errorMessage(err))}`);
      })
      .finally(() => (this.beating = false));
  }

  /**
   * A rebalance started: the group waits for this member to rejoin, which it can only do once
   * every part is settled. The batch in hand is finished and committed (the broker accepts the
   * old generation's commit until the rebalance completes); everything not yet handed out is let
   * go at once and fetched again by whoever owns the partition after the rebalance.
   */
  private onRebalance(why: string): void {
    if (this.rebalancing || this.closing) return;
    this.rebalancing = true;
    this.rebalancingSince = Date.now();
    const inHand = this.parts.some((p) => p.handed > p.acked);
    this.ctx.log.info(`kafka source: ${why}; ${inHand ? "finishing the batch in hand, " : ""}handing back what is not yet handed out`);
    this.letGoIdle();
    this.sleeper.wake();
  }

  /** Settles every part none of whose records is in the batch in hand. */
  private letGoIdle(): void {
    for (const p of this.parts) if (p.handed === p.acked) p.settle();
    this.parts = this.parts.filter((p) => !p.settled);
  }

  private available(): number {
    let n = 0;
    for (const p of this.parts) if (!p.settled) n += p.messages.length - p.handed;
    return n;
  }

  /** The next batch, or null when the signal aborted or (drain) the group has caught up. */
  async next(signal: AbortSignal): Promise<Batch | null> {
    const wake = () => this.sleeper.wake();
    signal.addEventListener("abort", wake, { once: true });
    try {
      let idleSince = Date.now();
      for (;;) {
        if (this.crashed) throw this.crashed;
        if (signal.aborted) return null;
        if (this.rebalancing && this.parts.length === 0 && Date.now() - this.rebalancingSince > this.cfg.rebalance_timeout_ms + this.cfg.session_timeout_ms) {
          // kafkajs rejoins as soon as nothing is held; if it has not, start over with a new consumer.
          throw transientError(`kafka group '${this.src.groupId}' on ${this.src.brokerList}: not rejoined ${this.cfg.rebalance_timeout_ms + this.cfg.session_timeout_ms} ms after a rebalance began`);
        }
        if (!this.rebalancing && this.available() > 0) {
          // The other partitions of the same fetch reach eachBatch within this turn of the event loop.
          if (this.available() < this.cfg.batch_size) await new Promise<void>((r) => setImmediate(r));
          if (this.crashed) throw this.crashed;
          if (!this.rebalancing && this.available() > 0) return this.take();
          idleSince = Date.now();
        }
        if (this.ctx.drain && Date.now() - idleSince >= this.cfg.max_wait_ms && (await this.caughtUp())) return null;
        await this.sleeper.sleep(this.ctx.drain ? Math.min(this.cfg.poll_interval_ms, this.cfg.max_wait_ms) : this.cfg.poll_interval_ms);
      }
    } finally {
      signal.removeEventListener("abort", wake);
    }
  }

  private take(): Batch {
    const segments: Segment[] = [];
    let room = this.cfg.batch_size;
    for (const part of this.parts) {
      if (room === 0) break;
      const n = Math.min(room, part.messages.length - part.handed);
      if (part.settled || n <= 0) continue;
      segments.push({ part, from: part.handed, to: part.handed + n });
      part.handed += n;
      room -= n;
    }
    const messages: Message[] = [];
    const deadLetters: DeadLetter[] = [];
    for (const { part, from, to } of segments) {
      for (let i = from; i < to; i++) {
        const m = part.messages[i]!;
        const item = convertKafkaRecord(
          { topic: part.topic, partition: part.partition, offset: m.offset, key: m.key, value: m.value, headers: m.headers, timestamp: m.timestamp },
          this.cfg,
          this.ctx.pipeline,
        );
        if (item.ok) messages.push(item.message);
        else {
          this.ctx.log.warn(`${item.deadLetter.error}; dead-lettered as ${item.deadLetter.dedup_key}`);
          deadLetters.push(item.deadLetter);
        }
      }
    }
    let state: "open" | "acked" | "released" = "open";
    return {
      messages,
      deadLetters,
      ack: async () => {
        if (state !== "open") return;
        await this.commit(segments);
        state = "acked";
      },
      release: async () => {
        if (state !== "open") return;
        state = "released";
        this.handBack(segments);
      },
    };
  }

  /** Commits offset+1 of each partition's last record of the batch, then lets finished parts go. */
  private async commit(segments: Segment[]): Promise<void> {
    if (segments.length === 0) return;
    const offsets = new Map<string, { topic: string; partition: number; offset: string }>();
    for (const { part, to } of segments) {
      const offset = to === part.messages.length ? part.endOffset : (BigInt(part.messages[to - 1]!.offset) + 1n).toString();
      offsets.set(tp(part.topic, part.partition), { topic: part.topic, partition: part.partition, offset });
    }
    const count = segments.reduce((n, s) => n + s.to - s.from, 0);
    if (segments.some((s) => s.part.join !== this.joins)) {
      // Cannot happen while a part is held (kafkajs rejoins only after eachBatch returned), but if
      // it did, committing now would attribute these offsets to the new membership.
      this.ctx.log.warn(`kafka source: the group was rejoined while ${count} records were being written; not committing them (their partitions' owners fetch them again, and the inbox's ON CONFLICT absorbs the repeat)`);
      this.handBack(segments);
      return;
    }
    const byTopic = new Map<string, { partition: number; offset: string }[]>();
    for (const o of offsets.values()) {
      const list = byTopic.get(o.topic) ?? [];
      list.push({ partition: o.partition, offset: o.offset });
      byTopic.set(o.topic, list);
    }
    try {
      // The commit function of the eachBatch payload: the membership that fetched the records,
      // one attempt, errors reported (consumer.commitOffsets would silently skip a stopped consumer).
      await segments[0]!.part.payload.commitOffsetsIfNecessary({ topics: [...byTopic].map(([topic, partitions]) => ({ topic, partitions })) });
    } catch (err) {
      const { types } = kafkaErrorTypes(err);
      if (OWNERSHIP_LOST.some((t) => types.has(t))) {
        this.ctx.log.warn(
          `kafka source: offsets for ${count} records not committed (${[...types].filter((t) => OWNERSHIP_LOST.includes(t)).join("/")}): their partitions went to another member of group '${this.src.groupId}', which fetches them again; the inbox already holds them, so ON CONFLICT absorbs the repeat`,
        );
        this.onRebalance("the group moved on without this member");
        this.handBack(segments);
        return;
      }
      throw this.src.failure(err, `committing offsets of group '${this.src.groupId}'`);
    }
    for (const { part, to } of segments) {
      part.payload.resolveOffset(part.messages[to - 1]!.offset);
      part.acked = to;
      if (part.acked === part.messages.length || this.rebalancing || this.closing) part.settle();
    }
    for (const o of offsets.values()) this.advance(o.topic, o.partition, BigInt(o.offset));
    this.parts = this.parts.filter((p) => !p.settled);
    this.sleeper.wake();
  }

  /** The batch's records go back unacknowledged: their parts are let go without resolving them. */
  private handBack(segments: Segment[]): void {
    for (const { part } of segments) {
      part.handed = part.acked;
      part.settle();
    }
    this.parts = this.parts.filter((p) => !p.settled);
  }

  /**
   * Drain: every assigned partition's high watermark is at or below this group's position
   * (committed offset, or what this member knows it is past), nothing is held, no rebalance is on.
   */
  private async caughtUp(): Promise<boolean> {
    if (!this.assignment || this.rebalancing || this.parts.length > 0) return false;
    const admin = await this.src.adminClient();
    for (const [topic, partitions] of this.assignment) {
      if (partitions.length === 0) continue;
      let highs: Awaited<ReturnType<Admin["fetchTopicOffsets"]>>;
      let committed: Awaited<ReturnType<Admin["fetchOffsets"]>>;
      try {
        [highs, committed] = await Promise.all([admin.fetchTopicOffsets(topic), admin.fetchOffsets({ groupId: this.src.groupId, topics: [topic] })]);
      } catch (err) {
        await this.src.resetAdmin();
        throw this.src.failure(err, `reading the offsets of '${topic}'`);
      }
      for (const p of partitions) {
        const h = highs.find((x) => x.partition === p);
        if (!h) return false;
        const high = BigInt(h.high);
        const low = BigInt(h.low);
        const c = BigInt(committed.find((t) => t.topic === topic)?.partitions.find((x) => x.partition === p)?.offset ?? "-1");
        let position = c >= 0n ? c : this.cfg.auto_offset_reset === "earliest" ? low : high;
        if (position < low) position = low; // what retention deleted can never be delivered
        const known = this.position.get(tp(topic, p));
        if (known !== undefined && known > position) position = known;
        if (position < high) return false;
      }
    }
    return this.parts.length === 0 && !this.rebalancing;
  }

  async close(): Promise<void> {
    this.closing = true;
    clearInterval(this.heartbeatTimer);
    for (const p of this.parts) p.settle();
    this.parts = [];
    const consumer = this.consumer;
    this.consumer = undefined;
    if (!consumer) return;
    // disconnect() waits for a fetch in progress (≤ max_wait_ms) and leaves the group, which hands
    // the partitions to the other members at once; bounded in case the broker is gone.
    let timer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([
      consumer.disconnect().catch((err: unknown) => this.ctx.log.debug(`kafka source: disconnect: ${this.src.scrub(errorMessage(err))}`)),
      new Promise<void>((r) => (timer = setTimeout(r, this.cfg.max_wait_ms + this.cfg.request_timeout_ms))),
    ]);
    clearTimeout(timer);
  }
}

/**
 * Reads a topic (or several) as a member of a consumer group, with auto-commit off: a batch's
 * offsets are committed (offset+1 per partition) only by its ack(), after the inbox commit, so a
 * crash anywhere replays at most the batch in hand, under the same dedup keys.
 *
 * Rebalances: while a batch is being written, this member keeps heartbeating and does not rejoin,
 * so the group waits for it (up to rebalance_timeout_ms) and the commit, made under the old
 * generation while the rebalance is still preparing, is accepted. If the group moved on anyway
 * (the commit is refused with REBALANCE_IN_PROGRESS, ILLEGAL_GENERATION or UNKNOWN_MEMBER_ID),
 * nothing is committed for partitions this member no longer owns: the new owner fetches those
 * records again and the inbox's ON CONFLICT absorbs them. Offsets are only ever committed past
 * records that are already in the inbox, so no interleaving can skip a record.
 */
export class KafkaSource implements Source {
  readonly describe: string;
  /** Every fetch the broker answered, an empty one too (the pipeline's poll deadline, docs/WATCHDOG.md). */
  readonly reportsPolls = true;
  readonly groupId: string;
  readonly scrub: (t: string) => string;
  readonly brokerList: string;
  private kafka?: Kafka;
  private admin?: Admin;
  private adminConnecting?: Promise<Admin>;
  private session: KafkaSession | null = null;

  constructor(
    private readonly cfg: KafkaSourceConfig,
    private readonly ctx: BackendContext,
  ) {
    this.brokerList = cfg.brokers.join(",");
    this.groupId = cfg.group_id ?? `pgtrickle-relay-${ctx.pipeline}`;
    this.scrub = scrubber(cfg);
    this.describe = `kafka ${this.brokerList} ← ${cfg.topic.join(",")} (group ${this.groupId})`;
  }

  client(): Kafka {
    return (this.kafka ??= new Kafka(kafkaClientConfig(this.cfg, this.ctx.log)));
  }

  async adminClient(): Promise<Admin> {
    if (this.admin) return this.admin;
    this.adminConnecting ??= (async () => {
      const admin = this.client().admin();
      try {
        await admin.connect();
      } catch (err) {
        await admin.disconnect().catch(() => {});
        throw this.failure(err, "connecting");
      }
      this.admin = admin;
      return admin;
    })().finally(() => (this.adminConnecting = undefined));
    return this.adminConnecting;
  }

  /** Checks that the brokers answer and the topics exist. */
  async start(): Promise<void> {
    const admin = await this.adminClient();
    let existing: string[];
    try {
      existing = await admin.listTopics();
    } catch (err) {
      await this.resetAdmin();
      throw this.failure(err, "listing topics");
    }
    const missing = this.cfg.topic.filter((t) => !existing.includes(t));
    if (missing.length > 0) {
      // Producers often create their topic on first use: wait for it (the pipeline shows degraded
      // with this message) rather than fail the pipeline.
      throw transientError(`kafka topic${missing.length > 1 ? "s" : ""} ${missing.map((t) => `'${t}'`).join(", ")} not found on ${this.brokerList}; the source never creates topics, waiting for ${missing.length > 1 ? "them" : "it"} to exist`);
    }
  }

  /** Total partitions of the topics (how many partitions kafkajs may hand over at once). */
  async partitionCount(): Promise<number> {
    const admin = await this.adminClient();
    try {
      const meta = await admin.fetchTopicMetadata({ topics: this.cfg.topic });
      return meta.topics.reduce((n, t) => n + t.partitions.length, 0);
    } catch (err) {
      await this.resetAdmin();
      throw this.failure(err, "reading topic metadata");
    }
  }

  /**
   * auto_offset_reset latest: a partition without a committed offset gets the current end
   * committed before the first join, so "latest" means "from the pipeline's first start", not
   * "from whenever the relay last (re)started". Skipped when other members are active (they own
   * the group's offsets).
   */
  async pinLatest(): Promise<void> {
    const admin = await this.adminClient();
    for (const topic of this.cfg.topic) {
      try {
        const [committed] = await admin.fetchOffsets({ groupId: this.groupId, topics: [topic] });
        const missing = (committed?.partitions ?? []).filter((p) => BigInt(p.offset) < 0n).map((p) => p.partition);
        if (missing.length === 0) continue;
        const ends = await admin.fetchTopicOffsets(topic);
        const partitions = missing.map((partition) => ({ partition, offset: ends.find((e) => e.partition === partition)?.high ?? "-1" })).filter((p) => p.offset !== "-1");
        await admin.setOffsets({ groupId: this.groupId, topic, partitions });
        this.ctx.log.info(`kafka source: group '${this.groupId}' starts '${topic}' at its current end (auto_offset_reset latest; partitions ${missing.join(",")})`);
      } catch (err) {
        this.ctx.log.debug(`kafka source: not pinning the start of '${topic}': ${this.scrub(errorMessage(err))}`);
      }
    }
  }

  batches(signal: AbortSignal): AsyncIterable<Batch> {
    return this.consume(signal);
  }

  private async *consume(signal: AbortSignal): AsyncGenerator<Batch> {
    const session = new KafkaSession(this, this.cfg, this.ctx);
    this.session = session;
    try {
      await session.open();
      for (;;) {
        const batch = await session.next(signal);
        if (!batch) return;
        yield batch;
      }
    } finally {
      if (this.session === session) this.session = null;
      await session.close();
    }
  }

  async close(): Promise<void> {
    const session = this.session;
    this.session = null;
    await session?.close();
    await this.resetAdmin();
  }

  /**
   * Records of the topics this group has not committed: per partition, high watermark − the
   * group's committed offset (a partition without one counts from where auto_offset_reset would
   * start it; what retention deleted is not counted). Two admin requests per topic on the admin
   * client the source already holds, bounded by LAG_TIMEOUT_MS; nothing is committed or joined.
   * Records held by a batch in flight count until its commit. Seconds: not known without reading
   * records, reported as 0.
   */
  async lag(): Promise<Lag | null> {
    const work = (async () => {
      const admin = await this.adminClient();
      let rows = 0n;
      for (const topic of this.cfg.topic) {
        const [highs, committed] = await Promise.all([admin.fetchTopicOffsets(topic), admin.fetchOffsets({ groupId: this.groupId, topics: [topic] })]);
        const mine = committed.find((t) => t.topic === topic)?.partitions ?? [];
        for (const h of highs) {
          const high = BigInt(h.high);
          const low = BigInt(h.low);
          const c = BigInt(mine.find((x) => x.partition === h.partition)?.offset ?? "-1");
          let position = c >= 0n ? c : this.cfg.auto_offset_reset === "earliest" ? low : high;
          if (position < low) position = low;
          if (high > position) rows += high - position;
        }
      }
      return { rows: Number(rows), seconds: 0 };
    })();
    return withTimeout(work, LAG_TIMEOUT_MS, "kafka lag query");
  }

  /** Drops the admin client after a failure; the next use connects afresh. */
  async resetAdmin(): Promise<void> {
    const admin = this.admin;
    this.admin = undefined;
    await admin?.disconnect().catch(() => {});
  }

  /** A fixed `decode` dead letter (an operator set `message.value` to the record's text) → its message, under the original key. */
  async decodeStored(stored: unknown): Promise<Message[]> {
    const s = stored as { topic?: unknown; partition?: unknown; offset?: unknown; key?: unknown; headers?: unknown; value?: unknown } | null;
    if (typeof s?.value !== "string") throw decodeError("dead letter holds no record value: set message.value to the event's text (JSON) to replay it");
    if (typeof s.topic !== "string" || typeof s.partition !== "number" || typeof s.offset !== "string") throw decodeError("dead letter lacks the record's topic/partition/offset");
    const headers = s.headers && typeof s.headers === "object" ? (s.headers as Record<string, string>) : undefined;
    const item = convertKafkaRecord(
      { topic: s.topic, partition: s.partition, offset: s.offset, key: typeof s.key === "string" ? Buffer.from(s.key) : null, value: Buffer.from(s.value), headers },
      this.cfg,
      this.ctx.pipeline,
    );
    if (!item.ok) throw decodeError(item.deadLetter.error);
    return [item.message];
  }

  failure(err: unknown, doing: string): RelayError {
    return kafkaFailure(err, `kafka ${doing} on ${this.brokerList}`, this.cfg, this.scrub, () => `; grant the principal READ/DESCRIBE on the topic and READ on group '${this.groupId}'`);
  }
}

export const sink = sinkSpec({
  type: "kafka",
  config: KafkaSinkConfig,
  create: (cfg, ctx) => new KafkaSink(cfg, ctx),
});

export const source = sourceSpec({
  type: "kafka",
  config: KafkaSourceConfig,
  create: (cfg, ctx) => new KafkaSource(cfg, ctx),
});
