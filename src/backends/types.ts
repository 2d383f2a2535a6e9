import type { ConsolaInstance } from "consola";
import type * as v from "valibot";
import type { Sql } from "../db.ts";
import type { Message } from "../message.ts";

export type Direction = "forward" | "reverse";

/** What a backend gets besides its own options. */
export interface BackendContext {
  pipeline: string;
  direction: Direction;
  relayGroupId: string;
  log: ConsolaInstance;
  /** The relay's own database (the outbox source and the inbox sink use it). */
  sql: Sql;
  postgresUrl: string;
  /**
   * Most messages one batch may hold when the source reads ahead: a PIPELINE_DEPTH-th of
   * `--sink-max-inflight` (docs/PIPELINE.md); absent when there is no window.
   */
  batchLimit?: number;
  /** Drain mode: a source ends its iteration once it has nothing pending. */
  drain: boolean;
  /**
   * Set by `check`: connect and verify, but create nothing on any system (no topic, stream,
   * consumer group, queue, exchange or binding); report what `run` would create instead.
   */
  check?: { wouldCreate(what: string): void };
  /** Inbox sinks report each committed write: rows inserted, rows skipped by ON CONFLICT (metrics). */
  onInboxWrite?(inserted: number, dedupSkipped: number): void;
  /** Sources report each poll of their system (empty ones too) with its duration (metrics). */
  onPoll?(seconds: number): void;
  /** The outbox source reports each page of claim-check rows it reads (metrics). */
  onClaimCheckFetch?(): void;
}

/** A message that can never be delivered, on its way to pgtrickle.relay_dead_letters. */
export interface DeadLetter {
  dedup_key: string;
  outbox_id: string | null;
  message: unknown;
  error: string;
  kind: "sink_permanent" | "decode" | "inbox_permanent";
}

/** A message the sink's system will never accept (too large, invalid name, HTTP 4xx…). */
export interface Rejection {
  message: Message;
  error: string;
}

/**
 * A sink writes a whole batch or throws. It resolves only when every message it does not return
 * as rejected was durably accepted downstream (broker ack, fsync, commit). Throwing a
 * `transient` RelayError makes the pipeline retry the whole batch; the dedup keys make the
 * replay harmless. Permanent per-message failures are returned, not thrown.
 */
export interface Sink {
  /** e.g. `nats nats://127.0.0.1:4222 → pgtrickle.{stream_table}.{op}`; never holds a secret. */
  readonly describe: string;
  /** Connects and checks the destination exists (or creates it when configured to). */
  start(): Promise<void>;
  write(messages: Message[]): Promise<Rejection[]>;
  close(): Promise<void>;
}

export interface Batch {
  messages: Message[];
  /** Source data that could not be decoded; written to the dead-letter table before ack. */
  deadLetters: DeadLetter[];
  /**
   * Commits the source position; called only after the sink accepted the batch. With `owner`
   * (sources that set `foldsOwnership`) the commit is conditioned on that backend holding the
   * pipeline's lock, in the same statement: false = it did not, nothing was committed.
   */
  ack(owner?: LockHolder): Promise<boolean | void>;
  /**
   * This batch's ack also commits every earlier batch of the pass, and its own ack may be left to
   * a later batch's with this flag (an outbox offset: moving it past later rows commits the
   * earlier ones). The pipeline then commits written batches that queued up behind a slow commit
   * with the newest one's ack alone (docs/PIPELINE.md) — never a batch that has dead letters.
   */
  cumulativeAck?: boolean;
  /**
   * The batch has no order with the batches handed out before it, so its write may run while
   * theirs still do (docs/PIPELINE.md, "Writes that overlap"): set by the HTTP receiver for a
   * batch that holds no part of an earlier batch's request. Only reverse sources set it; their
   * sink, the inbox, takes concurrent writes (one INSERT each, on connections of a pool).
   */
  independent?: boolean;
  /** Hands the messages back after a failed write (e.g. AMQP nack with requeue). */
  release?(): Promise<void>;
}

/**
 * The backend holding a pipeline's advisory lock `pg_try_advisory_lock(hashtext(groupId),
 * hashtext(pipeline))` (docs/interface.md §7.3), for a proof of ownership folded into a commit.
 */
export interface LockHolder {
  pid: number;
  groupId: string;
  pipeline: string;
}

export interface Lag {
  rows: number;
  seconds: number;
}

/** Bound of one lag() call of a broker source: /health and the metrics must stay quick. */
export const LAG_TIMEOUT_MS = 2000;

export interface Source {
  readonly describe: string;
  start(): Promise<void>;
  /** Yields batches until the signal aborts, or in drain mode until nothing is pending. */
  batches(signal: AbortSignal): AsyncIterable<Batch>;
  close(): Promise<void>;
  /** The position the last acknowledgement committed, where it is a number (the outbox id): a metric. */
  readonly committedOffset?: string;
  /** Rows and age of what is still to be relayed, where the source can know it. */
  lag?(): Promise<Lag | null>;
  /** Cuts an idle sleep short (LISTEN notification, push). */
  wake?(): void;
  /** True when the source calls ctx.onPoll itself; otherwise every batch counts as one poll. */
  readonly reportsPolls?: boolean;
  /** Rebuilds messages from a `decode` dead letter (after an operator fixed it) for replay. */
  decodeStored?(stored: unknown): Promise<Message[]>;
  /**
   * How many yielded batches may await their acknowledgement at once (docs/PIPELINE.md). Absent =
   * 1: the generator is not resumed before the previous batch was acknowledged. A source above 1
   * continues from the last batch it yielded, its `ack()` commits the position of its own batch
   * (acks come in yield order), and every batch holds at most `ctx.batchLimit` messages (the
   * outbox: its `max_batch_messages`, which the pipeline clips to that limit), so that the batches
   * in hand fit `--sink-max-inflight`.
   */
  readonly readAhead?: number;
  /**
   * True when `ack(owner)` proves ownership itself, in its commit statement (the outbox source
   * in the relay's own database): the pipeline then skips the separate round trip to the lock's
   * session before that commit (docs/PIPELINE.md).
   */
  readonly foldsOwnership?: boolean;
  /**
   * True when `ack()` only tells senders what is already durable in the inbox (the HTTP
   * receiver's answers): a process that has lost the lock harms no other owner by giving it, so
   * the pipeline skips the round trip to the lock's session before an ack with no dead letters to
   * write first (docs/PIPELINE.md). A lock already known to be lost still stops it.
   */
  readonly ackOnlyAnswers?: boolean;
  /**
   * True once the source can never yield again (stdin at EOF, a file read to its end without
   * `follow`): the pipeline then ends `drained` even outside drain mode.
   */
  readonly exhausted?: boolean;
}

/**
 * One side of a backend, as src/backends/index.ts loads it: each `<system>/sink.ts` and
 * `<system>/source.ts` default-exports one. `type` and `aliases` are the names a pipeline's
 * `sink.type` / `source.type` may use.
 */
export interface SinkSpec<S extends v.GenericSchema = v.GenericSchema> {
  type: string;
  aliases?: string[];
  config: S;
  create(config: v.InferOutput<S>, ctx: BackendContext): Sink;
}

export interface SourceSpec<S extends v.GenericSchema = v.GenericSchema> {
  type: string;
  aliases?: string[];
  config: S;
  create(config: v.InferOutput<S>, ctx: BackendContext): Source;
}

/** Keeps each sink's shape checked by the compiler. */
export function sinkSpec<S extends v.GenericSchema>(spec: SinkSpec<S>): SinkSpec<S> {
  return spec;
}

/** Keeps each source's shape checked by the compiler. */
export function sourceSpec<S extends v.GenericSchema>(spec: SourceSpec<S>): SourceSpec<S> {
  return spec;
}
