/**
 * One pipeline's life: build its source and sink, run the stages (src/pipeline-loop.ts), and the
 * states around them — retries, the watchdog (docs/WATCHDOG.md), stall detection, dead letters
 * and their replay. Longer than ~400 lines on purpose: these parts read and write the same
 * per-pipeline state (state, lastError, failingSide, the clients being rebuilt), and split apart
 * they would pass it all back and forth.
 */
import type { ConsolaInstance } from "consola";
import { sinkOf, sourceOf } from "./backends/index.ts";
import { LAG_TIMEOUT_MS, type LockHolder, type Batch, type Lag, type DeadLetter, type Direction, type Rejection, type Sink, type Source } from "./backends/types.ts";
import type { Sql } from "./db.ts";
import { markReplayed, markReplayFailed, messageFromStored, replayRequests, storedMessage, writeDeadLetters } from "./deadletters.ts";
import { errorKind, errorMessage, RelayError, transientError } from "./errors.ts";
import type { Message } from "./message.ts";
import type { Metrics } from "./observe/metrics.ts";
import { parseBackendConfig, type PipelineSpec } from "./pipeline-config.ts";
import { runStages, type Written } from "./pipeline-loop.ts";
import { abortableDelay, backoffMs, withTimeout } from "./sleep.ts";

export type PipelineState = "starting" | "running" | "degraded" | "failed" | "stopped" | "drained";

/** `both` while starting fails: the start connects the source and then the sink. */
export type FailingSide = "source" | "sink" | "both";

/** Which side a failing stage belongs to: a commit is the source's (outbox offset, broker ack). */
const SIDE_OF_STAGE: Record<string, FailingSide> = { source: "source", commit: "source", sink: "sink" };

export interface PipelineDeps {
  sql: Sql;
  postgresUrl: string;
  relayGroupId: string;
  metrics: Metrics;
  log: ConsolaInstance;
  /** Drain mode: stop once the source has nothing pending. */
  drain: boolean;
  /** Most messages polled but not yet acknowledged (docs/interface.md §7.9); 0 = unlimited. */
  sinkMaxInflight?: number;
  /** Proof of ownership (the pipeline's advisory lock); absent = unguarded (tests, one-off tools). */
  guard?: LockGuard;
  /** `check`: create nothing on any system, report it (BackendContext.check). */
  check?: { wouldCreate(what: string): void };
  /** Called on every state, last-error or stall change (the coordinator persists it for `status`). */
  onStatus?: (pipeline: Pipeline) => void;
  /** Deadline of every sink write, source poll answer and acknowledgement (docs/WATCHDOG.md). */
  ioTimeoutMs?: number;
  /** Pending work without a commit for this long makes the pipeline stalled (docs/WATCHDOG.md). */
  stallTimeoutMs?: number;
}

/**
 * The pipeline's advisory lock, seen from the worker. `lost` aborts the moment the coordinator
 * knows the lock may be gone; `confirm()` asks the lock's own session, right before each commit,
 * whether it still holds the lock. See Coordinator for the window that remains.
 */
export interface LockGuard {
  readonly lost: AbortSignal;
  confirm(): Promise<boolean>;
  /** The backend holding the lock, for a source that folds the proof into its commit; null once lost. */
  holder(): LockHolder | null;
}

/** The lock is gone: stop at once, publish and commit nothing more; the batch in hand is replayed by the next owner. */
export class LockLost extends Error {
  constructor(pipeline: string, when: string) {
    super(`pipeline '${pipeline}': advisory lock lost ${when}; stopping without acknowledging the batch in hand`);
    this.name = "LockLost";
  }
}

/**
 * Most batches read and not yet committed, for a source that can read ahead (docs/PIPELINE.md):
 * one being committed, one being written, one read ahead, so the writer need not wait for the
 * database (bench/RESULTS.md, "Pipeline depth").
 */
export const PIPELINE_DEPTH = 3;
const DEFAULT_IO_TIMEOUT_MS = 60_000;
const DEFAULT_STALL_TIMEOUT_MS = 300_000;
/** A client being torn down may hang on its dead socket too: it gets this long, then is dropped. */
const CLOSE_TIMEOUT_MS = 5000;

/**
 * A source or sink call that outlived its deadline: the peer stopped answering without closing
 * the connection, so the client is torn down and rebuilt (docs/WATCHDOG.md).
 */
export class Unresponsive extends RelayError {
  constructor(
    readonly side: "source" | "sink",
    what: string,
    ms: number,
  ) {
    super("transient", `${what}: no answer within ${ms / 1000} s; rebuilding the client`);
  }
}

const sourceUnresponsive = (err: unknown) => err instanceof Unresponsive && err.side === "source";

/**
 * Backpressure (docs/interface.md §7.9, docs/PIPELINE.md): a source that reads ahead has up to
 * PIPELINE_DEPTH batches in hand, each of at most this many messages. Undefined = no window.
 */
const batchLimitOf = (window: number) => (window > 0 ? Math.max(1, Math.floor(window / PIPELINE_DEPTH)) : undefined);

/**
 * The window applied to a source's validated options: `batch_size` (rows or broker messages per
 * poll) at most the window, the outbox's `max_batch_messages` at most the batch limit (the other
 * sources take the limit from `ctx.batchLimit`, readAheadBatchSize in src/inbound.ts).
 */
function clipBatchSizes<C>(config: C, window: number): C {
  const limit = batchLimitOf(window);
  if (limit === undefined) return config;
  const options = config as Record<string, unknown>;
  if (typeof options.batch_size === "number" && options.batch_size > window) options.batch_size = window;
  if (typeof options.max_batch_messages === "number" && options.max_batch_messages > limit) options.max_batch_messages = limit;
  return config;
}

/** How often to look for dead letters an operator asked to replay. */
const REPLAY_CHECK_MS = 5000;

/**
 * One pipeline: `for await (batch of source) { write to sink; ack }` — pipelined, in batch order
 * (runOnce, docs/PIPELINE.md) — with the error kinds of
 * docs/interface.md §7.8 around it. Nothing is acknowledged before the sink accepted it (or it sits
 * in the dead-letter table); transient failures pause the pipeline and retry, never skip.
 */
export class Pipeline {
  readonly name: string;
  readonly direction: Direction;
  state: PipelineState = "starting";
  lastError: string | null = null;
  /** The side a degradation is about, null while not degraded (/health's source_healthy, sink_healthy). */
  failingSide: FailingSide | null = null;
  lastPollAt: Date | null = null;
  lastCommitAt: Date | null = null;
  delivered = 0;
  deadLettered = 0;
  /** Since when the pipeline has had pending work without a commit for longer than the stall time. */
  stalledSince: Date | null = null;
  /** Replaced by a fresh client when the old one stopped answering (rebuild). */
  source: Source;
  sink: Sink;
  private sinkStarted = false;
  private sourceStarted = false;
  /** Since when the sink has failed without a success in between. */
  private sinkFailingSince: number | null = null;
  private readonly makeSource: () => Source;
  private readonly makeSink: () => Sink;
  private readonly ioTimeoutMs: number;
  private readonly stallTimeoutMs: number;
  /** When the source last proved alive: started, answered a poll (sources that report polls) or gave a batch. */
  private sourceAnsweredAt = Date.now();
  /** When pending work was first seen since the last moment there was none (stall detection). */
  private pendingSince: number | null = null;
  /** Batches read and not yet committed (stall detection: pending work). */
  private inFlight = 0;
  /** Stages retrying a transient failure right now (see `retrying`). */
  private readonly failingStages = new Set<string>();
  /** Consecutive failed passes over the source (backoff). */
  private sourceAttempt = 0;
  private checkingProgress = false;
  private readonly onPermanentError: "dead_letter" | "halt";
  private lastReplayCheck = 0;

  constructor(
    readonly spec: PipelineSpec,
    private readonly deps: PipelineDeps,
  ) {
    this.name = spec.name;
    this.direction = spec.direction;
    const ctx = {
      pipeline: spec.name,
      direction: spec.direction,
      relayGroupId: deps.relayGroupId,
      log: deps.log,
      sql: deps.sql,
      postgresUrl: deps.postgresUrl,
      drain: deps.drain,
      batchLimit: batchLimitOf(deps.sinkMaxInflight ?? 0),
      check: deps.check,
      onInboxWrite: (inserted: number, dedupSkipped: number) => {
        deps.metrics.inboxWrites.inc({ pipeline: spec.name }, inserted);
        deps.metrics.dedupSkipped.inc({ pipeline: spec.name }, dedupSkipped);
      },
      onClaimCheckFetch: () => deps.metrics.claimCheckFetches.inc({ pipeline: spec.name }),
      onPoll: (seconds: number) => {
        const labels = { pipeline: spec.name, direction: spec.direction };
        deps.metrics.polls.inc(labels);
        deps.metrics.pollDuration.observe(labels, seconds);
        this.lastPollAt = new Date();
        this.sourceAnsweredAt = Date.now();
        // An idle source that answers again has recovered, even before a message comes.
        if (this.state === "degraded" && this.failingSide === "source") this.recovered("source");
      },
    };
    const sourceB = sourceOf(spec.sourceType, spec.name);
    const sinkB = sinkOf(spec.sinkType, spec.name);
    const sourceConfig = clipBatchSizes(parseBackendConfig(spec, "source", sourceB), deps.sinkMaxInflight ?? 0);
    const sinkConfig = parseBackendConfig(spec, "sink", sinkB, ["on_permanent_error"]);
    this.makeSource = () => sourceB.create(sourceConfig, ctx);
    this.makeSink = () => sinkB.create(sinkConfig, ctx);
    this.source = this.makeSource();
    this.sink = this.makeSink();
    this.ioTimeoutMs = deps.ioTimeoutMs ?? DEFAULT_IO_TIMEOUT_MS;
    this.stallTimeoutMs = deps.stallTimeoutMs ?? DEFAULT_STALL_TIMEOUT_MS;
    this.onPermanentError = spec.onPermanentError;
    for (const w of spec.warnings) deps.log.warn(w);
  }

  private get labels() {
    return { pipeline: this.name, direction: this.direction };
  }

  /** Runs until `stop` aborts (finishing the batches in flight), the source is drained, or a config error. */
  async run(stop: AbortSignal): Promise<PipelineState> {
    const log = this.deps.log;
    const progress = setInterval(() => void this.checkProgress(), Math.min(5000, Math.max(250, this.stallTimeoutMs / 4)));
    try {
      await this.retrying(stop, "start", async () => {
        await this.startSource();
        await this.startSink();
      });
      if (stop.aborted) return this.finish("stopped");
      this.deps.metrics.sourceConnected.set({ pipeline: this.name }, 1);
      this.deps.metrics.sinkConnected.set({ pipeline: this.name }, 1);
      this.setState("running");
      log.info(`started: ${this.source.describe} → ${this.sink.describe}`);
      while (!stop.aborted) {
        try {
          await this.startSource();
          await this.runOnce(stop);
          if (!stop.aborted && this.deps.drain) return this.finish("drained");
          if (!stop.aborted && this.source.exhausted) {
            // End of input (stdin EOF, a file without follow). Outside drain mode the pipeline
            // stays owned and idle until stopped or reconfigured: ending would make the
            // coordinator start it again at once, in a loop.
            this.setState("drained");
            log.info(`drained: ${this.source.describe} has reached the end of its input; idle until stopped or reconfigured`);
            while (!stop.aborted) await abortableDelay(3_600_000, stop);
            return this.finish("drained");
          }
        } catch (err) {
          if (errorKind(err) === "config" || stop.aborted || err instanceof LockLost) throw err;
          this.deps.metrics.sourceErrors.inc(this.labels);
          this.transient(err, "source");
          if (sourceUnresponsive(err)) this.rebuildSource();
          await abortableDelay(backoffMs(this.sourceAttempt++), stop);
        }
      }
      return this.finish("stopped");
    } catch (err) {
      if (err instanceof LockLost) {
        log.warn(err.message);
        return this.finish("stopped");
      }
      if (stop.aborted && errorKind(err) !== "config") return this.finish("stopped");
      this.lastError = errorMessage(err);
      this.deps.metrics.errors.inc({ ...this.labels, kind: "config" });
      log.error(`failed: ${this.lastError}`);
      return this.finish("failed");
    } finally {
      clearInterval(progress);
    }
  }

  private async finish(state: PipelineState): Promise<PipelineState> {
    this.setState(state);
    await Promise.allSettled([this.source.close(), this.sink.close()]);
    return state;
  }

  /** The source's lag, or null when it has none or cannot say within LAG_TIMEOUT_MS (a lag query that hangs must not hang its caller). */
  async lag(): Promise<Lag | null> {
    if (!this.source.lag) return null;
    return withTimeout(this.source.lag(), LAG_TIMEOUT_MS, "lag").catch(() => null);
  }

  /** The state `status` and /health show: `stalled` overrides `running`, which claims all is well. */
  get reportedState(): string {
    return this.stalledSince && this.state === "running" ? "stalled" : this.state;
  }

  /** `work`, or Unresponsive once the I/O deadline passed. */
  private deadline<T>(side: "source" | "sink", work: Promise<T>, what: string): Promise<T> {
    return withTimeout(work, this.ioTimeoutMs, what, () => new Unresponsive(side, what, this.ioTimeoutMs));
  }

  /**
   * One call of the sink under the watchdog, starting a freshly built sink first. A call past its
   * deadline rebuilds the sink before the retry, and so do transient failures that go on for the
   * I/O timeout: a client whose own timeout fired may still hold a socket that will never answer
   * again, and only a new client is sure to open a new one (docs/WATCHDOG.md). A shorter failure
   * keeps the client and whatever it remembers of the failed write.
   */
  private async onSink<T>(what: string, call: (sink: Sink) => Promise<T>): Promise<T> {
    const sink = this.sink;
    try {
      if (!this.sinkStarted) {
        await this.deadline("sink", sink.start(), `start (${sink.describe})`);
        this.sinkStarted = true;
      }
      const result = await this.deadline("sink", call(sink), `${what} (${sink.describe})`);
      this.sinkFailingSince = null;
      return result;
    } catch (err) {
      if (errorKind(err) === "transient" && this.sink === sink) {
        this.sinkFailingSince ??= Date.now();
        if (err instanceof Unresponsive || Date.now() - this.sinkFailingSince >= this.ioTimeoutMs) this.rebuildSink();
      }
      throw err;
    }
  }

  private startSink(): Promise<void> {
    return this.onSink("start", async () => {});
  }

  /** One call of the source under the watchdog; past the deadline the run loop rebuilds the source. */
  private onSource<T>(what: string, call: (source: Source) => Promise<T>): Promise<T> {
    return this.deadline("source", call(this.source), `${what} (${this.source.describe})`);
  }

  /** Starts the source once (again after a rebuild); a start that hangs rebuilds it for the retry. */
  private async startSource(): Promise<void> {
    if (this.sourceStarted) return;
    try {
      await this.onSource("start", (source) => source.start());
    } catch (err) {
      if (!sourceUnresponsive(err)) throw err;
      this.rebuildSource();
      throw transientError(errorMessage(err));
    }
    this.sourceStarted = true;
    this.sourceAnsweredAt = Date.now();
  }

  private rebuildSink(): void {
    const old = this.sink;
    this.sink = this.makeSink();
    this.sinkStarted = false;
    this.sinkFailingSince = null;
    this.deps.log.debug(`sink client rebuilt: ${old.describe}`);
    void this.closeQuietly(old);
  }

  /** A fresh source replaces one that stopped answering; startSource() starts it. */
  private rebuildSource(): void {
    const old = this.source;
    this.source = this.makeSource();
    this.sourceStarted = false;
    this.deps.log.debug(`source client rebuilt: ${old.describe}`);
    void this.closeQuietly(old);
  }

  private async closeQuietly(side: Source | Sink): Promise<void> {
    await withTimeout(side.close(), CLOSE_TIMEOUT_MS, "close").catch((err) => this.deps.log.debug(`closing a replaced client: ${errorMessage(err)}`));
  }

  /**
   * The source's batches, with a deadline on the source's answers: a reverse source that reports
   * its polls must answer one within the I/O timeout (an idle poll counts; failed polls do not), or
   * it throws Unresponsive. Sources that do not report polls (push receivers, files) wait as long
   * as they like; the outbox source reads the relay's own database.
   */
  private async *watchedBatches(stop: AbortSignal): AsyncGenerator<Batch> {
    const source = this.source;
    const it = source.batches(stop)[Symbol.asyncIterator]();
    for (;;) {
      const next = source.reportsPolls && this.direction === "reverse" ? this.answeredInTime(it.next(), source) : it.next();
      const r = await next;
      if (r.done) return;
      this.sourceAnsweredAt = Date.now();
      yield r.value;
    }
  }

  private answeredInTime<T>(work: Promise<T>, source: Source): Promise<T> {
    let timer: ReturnType<typeof setInterval> | undefined;
    const silent = new Promise<never>((_, reject) => {
      timer = setInterval(() => {
        if (Date.now() - this.sourceAnsweredAt > this.ioTimeoutMs) reject(new Unresponsive("source", `poll (${source.describe})`, this.ioTimeoutMs));
      }, Math.min(1000, this.ioTimeoutMs));
    });
    return Promise.race([work, silent]).finally(() => clearInterval(timer));
  }

  /**
   * Stall detection (docs/WATCHDOG.md): pending work — a batch in flight, or rows the source's lag
   * reports — with no commit for longer than the stall time, whatever the state says.
   */
  private async checkProgress(): Promise<void> {
    if (this.checkingProgress) return;
    this.checkingProgress = true;
    let pending = this.inFlight > 0;
    try {
      if (!pending) pending = ((await this.lag())?.rows ?? 0) > 0;
    } finally {
      this.checkingProgress = false;
    }
    const now = Date.now();
    if (!pending) this.pendingSince = null;
    else this.pendingSince ??= now;
    const since = this.pendingSince === null ? null : Math.max(this.pendingSince, this.lastCommitAt?.getTime() ?? 0);
    const stalled = since !== null && now - since > this.stallTimeoutMs;
    if (stalled === (this.stalledSince !== null)) return;
    this.stalledSince = stalled ? new Date(since!) : null;
    this.deps.metrics.stalled.set({ pipeline: this.name }, stalled ? 1 : 0);
    this.updateHealthy();
    if (stalled) this.deps.log.warn(`stalled: pending work and no commit for ${Math.round((now - since!) / 1000)} s`);
    else this.deps.log.info("no longer stalled");
    this.deps.onStatus?.(this);
  }

  private setState(state: PipelineState): void {
    const changed = state !== this.state;
    this.state = state;
    this.updateHealthy();
    if (changed) this.deps.onStatus?.(this);
  }

  private updateHealthy(): void {
    const ok = (this.state === "running" || this.state === "drained") && this.stalledSince === null;
    this.deps.metrics.healthy.set({ pipeline: this.name }, ok ? 1 : 0);
  }

  private transient(err: unknown, where: string): void {
    const previous = this.lastError;
    this.lastError = `${where}: ${errorMessage(err)}`;
    this.failingSide = SIDE_OF_STAGE[where] ?? "both";
    this.deps.metrics.errors.inc({ ...this.labels, kind: "transient" });
    if (where === "sink") this.deps.metrics.sinkConnected.set({ pipeline: this.name }, 0);
    else this.deps.metrics.sourceConnected.set({ pipeline: this.name }, 0);
    if (this.state !== "degraded") this.deps.log.warn(`degraded, will retry: ${this.lastError}`);
    else this.deps.log.debug(`still failing: ${this.lastError}`);
    if (this.state === "degraded" && previous !== this.lastError) this.deps.onStatus?.(this);
    this.setState("degraded");
  }

  /** Back to running; the outage's error is history now and must not linger in `status`. */
  private recovered(what: string): void {
    this.deps.log.info(`recovered (${what})`);
    this.deps.metrics.sourceConnected.set({ pipeline: this.name }, 1);
    this.deps.metrics.sinkConnected.set({ pipeline: this.name }, 1);
    this.lastError = null;
    this.failingSide = null;
    this.setState("running");
  }

  /** Throws LockLost unless this process still owns the pipeline; `confirm` asks the database. */
  private async ensureOwned(when: string, confirm: boolean): Promise<void> {
    const guard = this.deps.guard;
    if (!guard) return;
    if (guard.lost.aborted || (confirm && !(await guard.confirm()))) throw new LockLost(this.name, when);
  }

  /**
   * Retries transient failures with jittered backoff until success, a config error, or stop.
   * Success ends `degraded` unless another stage is still failing (the writer and the committer
   * retry concurrently: a commit that succeeds says nothing about a sink that is down).
   */
  private async retrying(stop: AbortSignal, what: string, work: () => Promise<void>): Promise<void> {
    try {
      for (let attempt = 0; ; attempt++) {
        try {
          await work();
          this.failingStages.delete(what);
          if (this.state === "degraded" && this.failingStages.size === 0) this.recovered(what);
          return;
        } catch (err) {
          if (errorKind(err) === "config" || err instanceof LockLost || sourceUnresponsive(err)) throw err;
          this.failingStages.add(what);
          this.transient(err, what);
          if (stop.aborted) throw err;
          await abortableDelay(backoffMs(attempt), stop);
          if (stop.aborted) throw err;
        }
      }
    } finally {
      this.failingStages.delete(what);
    }
  }

  /**
   * One pass over the source's batches (until its end, stop, or a failure), in three concurrent
   * stages (src/pipeline-loop.ts, docs/PIPELINE.md). Batches read ahead and not committed when
   * it ends are released and read again by the next pass.
   */
  private async runOnce(stop: AbortSignal): Promise<void> {
    const epoch = new AbortController();
    const onStop = () => epoch.abort();
    stop.addEventListener("abort", onStop, { once: true });
    const it = this.watchedBatches(epoch.signal)[Symbol.asyncIterator]();
    const depth = Math.max(1, Math.min(this.source.readAhead ?? 1, PIPELINE_DEPTH));
    try {
      await runStages<Batch, Rejection[]>(
        {
          read: async () => {
            const r = await it.next();
            if (r.done) return null;
            this.batchRead(r.value, depth);
            return r.value;
          },
          // A write retrying a transient failure gives up once the pass has failed elsewhere (its
          // batch is abandoned and read again), as the writes that overlap it may have.
          write: (batch) => this.write(batch, epoch.signal),
          commit: (batch, rejections, covered) => this.commit(batch, rejections, covered, stop),
          covers: coversEarlier,
          independent: (batch) => !!batch.independent,
          abandon: (batch) => this.abandon(batch),
        },
        depth,
        () => epoch.abort(),
      );
    } finally {
      stop.removeEventListener("abort", onStop);
      this.inFlight = 0;
      await it.return?.(undefined).catch(() => {});
    }
  }

  private batchRead(batch: Batch, depth: number): void {
    const m = this.deps.metrics;
    this.sourceAttempt = 0;
    if (!this.source.reportsPolls) {
      m.polls.inc(this.labels);
      this.lastPollAt = new Date();
    }
    m.consumed.inc(this.labels, batch.messages.length);
    if (batch.messages.some((x) => x.is_full_refresh)) m.fullRefreshBatches.inc({ pipeline: this.name });
    this.inFlight++;
    // The proof that batches overlap (the pipelined kill test reads it at trace level).
    if (depth > 1) this.deps.log.trace(`read ahead: ${this.inFlight} batch(es) in flight`);
  }

  /** The sink write of one batch, retried as a whole on transient errors; then any requested replays. */
  private async write(batch: Batch, stop: AbortSignal): Promise<Rejection[]> {
    const m = this.deps.metrics;
    let rejections: Rejection[] = [];
    await this.retrying(stop, "sink", async () => {
      await this.ensureOwned("before publishing", false);
      const timer = m.publishDuration.startTimer(this.labels);
      try {
        rejections = batch.messages.length > 0 ? await this.onSink("write", (sink) => sink.write(batch.messages)) : [];
      } catch (err) {
        m.publishErrors.inc(this.labels);
        if (errorKind(err) !== "permanent") throw err;
        // The system refused the batch as a whole: every message of it is undeliverable.
        rejections = batch.messages.map((message) => ({ message, error: errorMessage(err) }));
      } finally {
        timer();
      }
    });
    await this.replayRequested(stop);
    return rejections;
  }

  /**
   * Proof of ownership → dead letters → acknowledgement, after the batch's own write resolved;
   * `covered`: earlier written batches its ack commits too (coversEarlier), counted with it.
   */
  private async commit(batch: Batch, rejections: Rejection[], covered: Written<Batch, Rejection[]>[], stop: AbortSignal): Promise<void> {
    const m = this.deps.metrics;
    const letters = [...batch.deadLetters, ...rejections.map(rejectionLetter)];
    await this.retrying(stop, "commit", async () => {
      // The commit is the step a stale owner must not take: ask the lock's session first — or,
      // when the source proves it in its commit statement and no dead letter comes first, there;
      // an ack that only answers senders (Source.ackOnlyAnswers) needs no proof.
      const holder = this.source.foldsOwnership && letters.length === 0 ? this.deps.guard?.holder() : undefined;
      const needsNoProof = !!this.source.ackOnlyAnswers && letters.length === 0;
      await this.ensureOwned("before committing", !holder && !needsNoProof);
      await this.deadLetter(letters, rejections.length);
      const acked = await this.onSource("acknowledgement", () => batch.ack(holder ?? undefined));
      if (acked === false) {
        await this.deps.guard?.confirm(); // lets the coordinator stop the worker as it does for a failed confirmation
        throw new LockLost(this.name, "at the commit");
      }
    });
    for (const done of [...covered, { batch, written: rejections }]) {
      this.inFlight--;
      m.published.inc(this.labels, done.batch.messages.length - done.written.length);
      m.batchesCommitted.inc(this.labels);
      this.delivered += done.batch.messages.length - done.written.length;
    }
    const offset = this.source.committedOffset;
    if (offset !== undefined) m.lastOffset.set({ pipeline: this.name }, Number(offset));
    this.lastCommitAt = new Date();
  }

  /** A batch read but never committed (the pass ended early): handed back where the source can. */
  private async abandon(batch: Batch): Promise<void> {
    if (batch.release) await withTimeout(batch.release(), this.ioTimeoutMs, "release").catch(() => {});
  }

  private async deadLetter(letters: DeadLetter[], rejected: number): Promise<void> {
    if (letters.length === 0) return;
    if (rejected > 0 && this.onPermanentError === "halt") {
      throw new RelayError("config", `sink rejected ${rejected} message(s) and on_permanent_error is "halt": ${letters[0]!.error}`);
    }
    await writeDeadLetters(this.deps.sql, this.name, this.direction, letters);
    this.deadLettered += letters.length;
    for (const d of letters) {
      this.deps.metrics.deadLetters.inc({ ...this.labels, kind: d.kind });
      this.deps.metrics.errors.inc({ ...this.labels, kind: d.kind });
    }
    this.deps.log.warn(`${letters.length} message(s) written to pgtrickle.relay_dead_letters; first: ${letters[0]!.dedup_key}: ${letters[0]!.error}`);
  }

  /** Re-sends dead letters an operator marked with pgtrickle.replay_relay_dead_letters(). */
  private async replayRequested(stop: AbortSignal): Promise<void> {
    if (Date.now() - this.lastReplayCheck < REPLAY_CHECK_MS || stop.aborted || this.deps.guard?.lost.aborted) return;
    this.lastReplayCheck = Date.now();
    const rows = await replayRequests(this.deps.sql, this.name, this.direction, 100);
    for (const row of rows) {
      let messages: Message[] | null;
      try {
        messages = await this.replayMessages(row.error_kind, row.message);
      } catch (err) {
        // Still undecodable (the operator has not fixed it yet): the row stays, marked failed.
        await markReplayFailed(this.deps.sql, row.id, errorMessage(err));
        continue;
      }
      if (!messages) {
        await markReplayFailed(this.deps.sql, row.id, "stored message cannot be replayed (unknown shape)");
        continue;
      }
      try {
        const rejections = messages.length > 0 ? await this.onSink("replay write", (sink) => sink.write(messages)) : [];
        if (rejections.length > 0) await markReplayFailed(this.deps.sql, row.id, rejections[0]!.error);
        else {
          await markReplayed(this.deps.sql, [row.id]);
          this.deps.log.info(`dead letter ${row.dedup_key} replayed`);
        }
      } catch (err) {
        await markReplayFailed(this.deps.sql, row.id, errorMessage(err));
      }
    }
  }

  private async replayMessages(kind: string, stored: unknown): Promise<Message[] | null> {
    if (kind === "decode") return this.source.decodeStored ? this.source.decodeStored(stored) : null;
    const m = messageFromStored(stored);
    return m ? [m] : null;
  }
}

/** Whether `newer`'s ack commits `older` too (Batch.cumulativeAck): only when `older` has no dead letter to write first. */
function coversEarlier(newer: Batch, older: Written<Batch, Rejection[]>): boolean {
  return !!newer.cumulativeAck && !!older.batch.cumulativeAck && older.batch.deadLetters.length === 0 && older.written.length === 0;
}

function rejectionLetter(r: Rejection): DeadLetter {
  return {
    dedup_key: r.message.dedup_key,
    outbox_id: r.message.outbox_id === null ? null : String(r.message.outbox_id),
    message: storedMessage(r.message),
    error: r.error,
    kind: r.message.op === "event" ? "inbox_permanent" : "sink_permanent",
  };
}
