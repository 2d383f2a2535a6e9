/**
 * Kafka source (docs/interface.md §5.4, §6.5) through kafkajs: a consumer-group member (kafkajs
 * `eachBatch`, auto-commit off) whose fetched partition batches are held until the pipeline has
 * committed them to the inbox; offsets are committed per partition only in ack(). See
 * KafkaSource, and KafkaSession (session.ts) for one membership.
 */
import { Kafka, type Admin } from "kafkajs";
import { decodeError, errorMessage, transientError, type RelayError } from "../../errors.ts";
import type { Message } from "../../message.ts";
import { withTimeout } from "../../sleep.ts";
import { connectAll, groupPosition, kafkaClientConfig, kafkaFailure, scrubber } from "./client.ts";
import { KafkaSourceConfig } from "./config.ts";
import { convertKafkaRecord } from "./records.ts";
import { sessionBatches } from "../session-batches.ts";
import { KafkaSession } from "./session.ts";
import { LAG_TIMEOUT_MS, sourceSpec, type BackendContext, type Batch, type Lag, type Source } from "../types.ts";

/**
 * Reads a topic (or several) as a member of a consumer group, with auto-commit off: a batch's
 * offsets are committed (offset+1 per partition) only by its ack(), after the inbox commit, so a
 * crash anywhere replays at most the batches in hand, under the same dedup keys.
 *
 * Rebalances: while batches are being written, this member keeps heartbeating and does not rejoin,
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
  /**
   * Batches out unacknowledged at once (docs/PIPELINE.md): each continues after the records the
   * last one took, and their acks come in order, so offsets only move forward (KafkaSession).
   * Kafka puts no deadline on a record fetched and not committed; the membership is kept alive
   * by heartbeats while parts are held, so holding three batches changes no timeout's meaning.
   */
  readonly readAhead = 3;
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
        await connectAll([admin]);
      } catch (err) {
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

  async *batches(signal: AbortSignal): AsyncGenerator<Batch> {
    const session = new KafkaSession(this, this.cfg, this.ctx);
    this.session = session;
    yield* sessionBatches(session, signal, () => {
      if (this.session === session) this.session = null;
    });
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
          const position = groupPosition(mine.find((x) => x.partition === h.partition)?.offset ?? "-1", h.low, h.high, this.cfg.auto_offset_reset);
          if (BigInt(h.high) > position) rows += BigInt(h.high) - position;
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

export default sourceSpec({
  type: "kafka",
  config: KafkaSourceConfig,
  create: (cfg, ctx) => new KafkaSource(cfg, ctx),
});
