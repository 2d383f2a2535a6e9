/**
 * Kafka sink (docs/interface.md §5.3, §6.4) through kafkajs: one idempotent producer; each write
 * renders topics and keys, rejects what Kafka can never take (illegal topic name, record larger
 * than the topic's max.message.bytes), and sends the rest with `sendBatch` in byte-bounded
 * chunks, one chunk after the other so that a key's records keep their order. Record key = dedup
 * key unless `key_template`/`key_field` say otherwise; header `pgt_dedup_key` always carries the
 * dedup key (the Kafka source reads it back) and `pgtrickle-full-refresh: true` marks
 * full-refresh messages.
 */
import { ConfigResourceTypes, Kafka, Partitioners, type Admin, type Producer, type TopicMessages } from "kafkajs";
import { configError, errorMessage, RelayError, transientError } from "../../errors.ts";
import { envelopeJson, renderTemplate, type Message } from "../../message.ts";
import { COMPRESSION_TYPES, compressSync } from "./codecs.ts";
import { classifyKafkaError, connectAll, KAFKAJS_RETRY, kafkaClientConfig, kafkaFailure, scrubber } from "./client.ts";
import { isLegalTopic, KafkaSinkConfig } from "./config.ts";
import { sinkSpec, type BackendContext, type Rejection, type Sink } from "../types.ts";

/** Broker default of message.max.bytes / max.message.bytes, used when the topic's cannot be read. */
const KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1048588;
/** Record batch header (v2), and a generous per-record overhead (varints, attributes, header names). */
const BATCH_OVERHEAD = 61;
const RECORD_OVERHEAD = 64;

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
      retry: KAFKAJS_RETRY,
    });
    const admin = this.kafka.admin();
    try {
      await connectAll([producer, admin]);
    } catch (err) {
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

export default sinkSpec({
  type: "kafka",
  config: KafkaSinkConfig,
  create: (cfg, ctx) => new KafkaSink(cfg, ctx),
});
