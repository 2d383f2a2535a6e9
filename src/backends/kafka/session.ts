/**
 * One consumer-group membership of the Kafka source (see KafkaSession): kafkajs's push model
 * (eachBatch) bridged to the pipeline's pull, offsets committed only in a batch's ack(), and
 * rebalances handled without skipping a record.
 */
import { readAheadBatchSize } from "../../inbound.ts";
import type { Admin, Consumer, EachBatchPayload, KafkaMessage } from "kafkajs";
import { errorMessage, RelayError, transientError } from "../../errors.ts";
import type { Message } from "../../message.ts";
import { Sleeper } from "../../sleep.ts";
import { groupPosition, kafkaErrorTypes } from "./client.ts";
import type { KafkaSourceConfig } from "./config.ts";
import { convertKafkaRecord } from "./records.ts";
import type { KafkaSource } from "./source.ts";
import type { BackendContext, Batch, DeadLetter } from "../types.ts";

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
 * Longest a drain lets the broker hold an empty fetch open. Records end a fetch at once, so this
 * only matters once the partitions are caught up, where it is what close() waits for: kafkajs's
 * disconnect waits for the fetch in progress (see close()).
 */
const DRAIN_MAX_WAIT_MS = 100;

/**
 * One consumer-group membership: created by each batches() call, closed when the iteration ends
 * (so a transient failure is followed by a fresh consumer). Bridges kafkajs's push model to the
 * pipeline's pull: eachBatch parks each fetched partition batch as a Part and waits; next()
 * builds a Batch of at most `batchLimit` records from the parked parts (several partitions of one
 * fetch arrive together, since every partition may be processed concurrently); ack() commits
 * offset+1 per partition and only then lets the parts go.
 *
 * Read-ahead (docs/PIPELINE.md): several Batches may be out at once. Each takes the records after
 * the last one handed out (`Part.handed`), and the pipeline acks them in the order they were
 * handed out, each after its own inbox commit, so a partition's committed offset only moves
 * forward and only past records already in the inbox. A part is let go (eachBatch returns, and
 * kafkajs may fetch again or rejoin) only once nothing of it is out unacknowledged.
 */
export class KafkaSession {
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
  /** Most records in one Batch: batch_size, or less within the pipeline's window (ctx.batchLimit). */
  private readonly batchLimit: number;
  /** The fetch's max_wait_ms, shorter in a drain (DRAIN_MAX_WAIT_MS). */
  private readonly maxWaitMs: number;

  constructor(
    private readonly src: KafkaSource,
    private readonly cfg: KafkaSourceConfig,
    private readonly ctx: BackendContext,
  ) {
    this.batchLimit = readAheadBatchSize(cfg.batch_size, ctx);
    this.maxWaitMs = ctx.drain ? Math.min(cfg.max_wait_ms, DRAIN_MAX_WAIT_MS) : cfg.max_wait_ms;
  }

  async open(): Promise<void> {
    const cfg = this.cfg;
    const partitions = await this.src.partitionCount();
    const consumer = this.src.client().consumer({
      groupId: this.src.groupId,
      sessionTimeout: cfg.session_timeout_ms,
      rebalanceTimeout: cfg.rebalance_timeout_ms,
      heartbeatInterval: cfg.heartbeat_interval_ms,
      maxWaitTimeInMs: this.maxWaitMs,
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
   * every part is settled. The batches in hand are finished and committed (the broker accepts the
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

  /** Settles every part none of whose records is in a batch in hand. */
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
    return this.sleeper.wakingOn(signal, () => this.waitForBatch(signal));
  }

  private async waitForBatch(signal: AbortSignal): Promise<Batch | null> {
    for (;;) {
      if (this.crashed) throw this.crashed;
      if (signal.aborted) return null;
      if (this.rebalancing && this.parts.length === 0 && Date.now() - this.rebalancingSince > this.cfg.rebalance_timeout_ms + this.cfg.session_timeout_ms) {
        // kafkajs rejoins as soon as nothing is held; if it has not, start over with a new consumer.
        throw transientError(`kafka group '${this.src.groupId}' on ${this.src.brokerList}: not rejoined ${this.cfg.rebalance_timeout_ms + this.cfg.session_timeout_ms} ms after a rebalance began`);
      }
      if (!this.rebalancing && this.available() > 0) {
        // The other partitions of the same fetch reach eachBatch within this turn of the event loop.
        if (this.available() < this.batchLimit) await new Promise<void>((r) => setImmediate(r));
        if (this.crashed) throw this.crashed;
        if (!this.rebalancing && this.available() > 0) return this.take();
      }
      // caughtUp() compares committed positions with the high watermarks, so it is exact at any
      // moment, and it asks the broker only when nothing is held: checked at once when idle.
      if (this.ctx.drain && (await this.caughtUp())) return null;
      await this.sleeper.sleep(this.ctx.drain ? Math.min(this.cfg.poll_interval_ms, this.maxWaitMs) : this.cfg.poll_interval_ms);
    }
  }

  private take(): Batch {
    const segments: Segment[] = [];
    let room = this.batchLimit;
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
      // While a rebalance waits, a part goes as soon as no later batch holds records of it.
      if (part.acked === part.messages.length || ((this.rebalancing || this.closing) && part.acked === part.handed)) part.settle();
    }
    for (const o of offsets.values()) this.advance(o.topic, o.partition, BigInt(o.offset));
    this.parts = this.parts.filter((p) => !p.settled);
    this.sleeper.wake();
  }

  /**
   * The batch's records go back unacknowledged: their parts are let go without resolving them, so
   * kafkajs fetches again from the last acknowledged record. A batch read ahead of this one holds
   * records after it: it is released too (the pipeline releases in order) or, if its ack comes,
   * its records are in the inbox and committing past them is safe.
   */
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
        const mine = committed.find((t) => t.topic === topic)?.partitions.find((x) => x.partition === p)?.offset ?? "-1";
        let position = groupPosition(mine, h.low, h.high, this.cfg.auto_offset_reset);
        const known = this.position.get(tp(topic, p));
        if (known !== undefined && known > position) position = known;
        if (position < BigInt(h.high)) return false;
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
    // disconnect() waits for a fetch in progress (≤ the fetch's max wait) and leaves the group,
    // which hands the partitions to the other members at once; bounded in case the broker is gone.
    let timer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([
      consumer.disconnect().catch((err: unknown) => this.ctx.log.debug(`kafka source: disconnect: ${this.src.scrub(errorMessage(err))}`)),
      new Promise<void>((r) => (timer = setTimeout(r, this.maxWaitMs + this.cfg.request_timeout_ms))),
    ]);
    clearTimeout(timer);
  }
}
