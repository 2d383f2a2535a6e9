/**
 * Kafka (CONTRACT.md §5.3 kafka, §6.4) through kafkajs.
 *
 * Sink: one idempotent producer; each write renders topics and keys, rejects what Kafka can
 * never take (illegal topic name, record larger than the topic's max.message.bytes), and sends
 * the rest with `sendBatch` in byte-bounded chunks, one chunk after the other so that a key's
 * records keep their order. Record key = dedup key unless `key_template`/`key_field` say
 * otherwise; header `pgt_dedup_key` always carries the dedup key (the Kafka source reads it
 * back) and `pgtrickle-full-refresh: true` marks full-refresh messages.
 */
import { readFileSync } from "node:fs";
import { gzipSync } from "node:zlib";
import {
  CompressionTypes,
  ConfigResourceTypes,
  Kafka,
  logLevel,
  Partitioners,
  type Admin,
  type KafkaConfig,
  type LogEntry,
  type Producer,
  type SASLOptions,
  type TopicMessages,
} from "kafkajs";
import type { ConsolaInstance } from "consola";
import * as v from "valibot";
import { configError, errorMessage, permanentError, RelayError, transientError } from "../errors.ts";
import { envelopeJson, renderTemplate, type Message } from "../message.ts";
import { defineBackend, sinkSpec, type BackendContext, type Rejection, type Sink } from "./types.ts";

/** Kafka's own rule for topic names (plus: not `.` or `..`). */
const TOPIC_NAME = /^[A-Za-z0-9._-]{1,249}$/;
const PLACEHOLDER = /\{[A-Za-z0-9_]+\}/;
export const isLegalTopic = (t: string) => TOPIC_NAME.test(t) && t !== "." && t !== "..";

/** Broker default of message.max.bytes / max.message.bytes, used when the topic's cannot be read. */
const KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1048588;
/** Record batch header (v2), and a generous per-record overhead (varints, attributes, header names). */
const BATCH_OVERHEAD = 61;
const RECORD_OVERHEAD = 64;

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
   * Destination topic. A value with `{…}` placeholders is treated as `topic_template`. A static
   * topic must be a legal Kafka name (`[A-Za-z0-9._-]`, 1–249 characters).
   */
  topic: v.optional(v.string()),
  /**
   * Topic rendered per message, e.g. `pgtrickle.{stream_table}` (variables of CONTRACT §6.3 and
   * top-level row fields). A message whose rendered topic is not a legal name is dead-lettered.
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
   * `none` or `gzip`. snappy, lz4 and zstd need codec packages this relay does not bundle, so
   * they are refused.
   */
  compression: v.optional(
    v.pipe(
      v.string(),
      v.transform(lower),
      v.picklist(["none", "gzip", "snappy", "lz4", "zstd"], "compression must be none or gzip"),
      v.check(
        (c) => c === "none" || c === "gzip",
        "compression snappy/lz4/zstd needs a codec that pgtrickle-relay does not bundle (kafkajs supports only gzip natively); use none or gzip",
      ),
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

function readPem(path: string, key: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    throw configError(`kafka ${key} '${path}' cannot be read (${(err as { code?: string }).code ?? errorMessage(err)})`);
  }
}

/** Removes the SASL password (and TLS key passphrase) from any text kafkajs hands us. */
export function scrubber(cfg: KafkaConnectionOptions): (text: string) => string {
  const secrets = [cfg.sasl_password, cfg.ssl_key_password].filter((s): s is string => !!s && s.length >= 1);
  return (text) => secrets.reduce((t, s) => t.split(s).join("***"), text);
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
  else if (has(["TOPIC_AUTHORIZATION_FAILED", "CLUSTER_AUTHORIZATION_FAILED", "TRANSACTIONAL_ID_AUTHORIZATION_FAILED"])) kind = "denied";
  else if (has(["INVALID_REQUIRED_ACKS", "UNSUPPORTED_COMPRESSION_TYPE", "UNSUPPORTED_VERSION"])) kind = "config";
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
  private readonly compression: CompressionTypes;
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
    this.compression = cfg.compression === "gzip" ? CompressionTypes.GZIP : CompressionTypes.None;
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

  /** Uncompressed size, or with gzip the real compressed size for records that look too big. */
  private compressedEstimate(o: Outgoing): number {
    if (this.compression !== CompressionTypes.GZIP || BATCH_OVERHEAD + o.bytes <= this.topics.get(o.topic)!) return o.bytes;
    return o.bytes - o.value.length + gzipSync(o.value).length;
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
        compression: this.compression,
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
      if (!exists && this.cfg.create_topic) {
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
    const c = classifyKafkaError(err);
    const detail = this.scrub(c.detail);
    const where = `kafka ${doing} on ${this.brokerList}`;
    switch (c.kind) {
      case "auth":
        return configError(
          `${where}: authentication failed (${detail}); check security_protocol (${this.cfg.security_protocol}), sasl_mechanism, sasl_username and sasl_password`,
          undefined,
        );
      case "denied":
        return configError(
          `${where}: not authorised (${detail})${
            c.types.has("CLUSTER_AUTHORIZATION_FAILED") && this.idempotent
              ? "; the idempotent producer needs IDEMPOTENT_WRITE on the cluster (grant it, or set acks to 1)"
              : "; grant the principal WRITE/DESCRIBE on the topic"
          }`,
        );
      case "config":
        return configError(`${where}: ${detail}`);
      case "too_large":
      case "invalid_topic":
        return permanentError(`${where}: ${detail}`);
      default:
        return transientError(`${where}: ${detail}`);
    }
  }
}

export default defineBackend({
  type: "kafka",
  sink: sinkSpec({
    config: KafkaSinkConfig,
    create: (cfg, ctx) => new KafkaSink(cfg, ctx),
  }),
});
