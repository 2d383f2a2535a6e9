import { errorKind, errorMessage } from "./errors.ts";
import { explainConnectError, type Sql } from "./db.ts";
import { log, pipelineLog } from "./observe/log.ts";
import type { Metrics } from "./observe/metrics.ts";
import { forwardProgress } from "./backends/outbox/progress.ts";
import { OutboxSource } from "./backends/outbox/source.ts";
import type { Pipeline, PipelineState } from "./pipeline.ts";
import { normalizePipeline, type CatalogRow } from "./pipeline-config.ts";
import { redact } from "./redact.ts";
import type { Settings } from "./settings.ts";
import { abortableDelay, backoffMs, Sleeper } from "./sleep.ts";
import { keyOf, loadDesired, type Desired } from "./coordinator/catalog.ts";
import { LockSession } from "./coordinator/lock-session.ts";
import { fairShares, membersKey, readLockSnapshot, ShareMemory, type LockSnapshot } from "./coordinator/sharing.ts";
import { StatusTable } from "./coordinator/status.ts";
import { clearPipelineGauges, hardStop, runWorker, type Worker } from "./coordinator/worker.ts";

export interface CoordinatorOptions {
  drain: boolean;
  /** Only these pipeline names (drain --pipeline); all enabled ones otherwise. */
  only?: string[];
}

/** How a pipeline ended (drain summary), or why it could not run. */
export interface Outcome {
  name: string;
  direction: string;
  state: PipelineState | "locked_elsewhere";
  error: string | null;
  delivered: number;
  deadLettered: number;
}

/** A pipeline this process tried and that failed: shown in /health until its config changes. */
export interface FailedPipeline {
  name: string;
  direction: string;
  error: string;
  at: Date;
}

/**
 * Owns pipelines for this process (docs/interface.md §7.3–7.4): reads the catalog, wins each pipeline's
 * advisory lock on one pinned session, runs a Pipeline per lock, and reacts to config NOTIFYs.
 *
 * Ownership and its one window: losing the lock session aborts every worker at once (the
 * socket's close event, a changed backend pid, or a query that goes unanswered), and each worker
 * asks the lock session whether it still holds its lock right before every commit — the outbox
 * source asks inside its commit statement instead (pg_locks by the session's backend pid,
 * docs/PIPELINE.md). What remains is one round trip (for the outbox: the statement itself): a
 * session that dies after answering "held" and before the commit lands on the worker
 * connection. If another replica wins the lock in that instant, it replays that batch with
 * identical dedup keys, and the offset upsert never moves backwards — duplicates, never loss.
 */
export class Coordinator {
  readonly workers = new Map<string, Worker>();
  readonly outcomes: Outcome[] = [];
  readonly failedPipelines = new Map<string, FailedPipeline>();
  postgresConnected = false;
  private session: LockSession | null = null;
  private desired = new Map<string, Desired>();
  /** Pipelines that failed, with the fingerprint they failed with: retried once it changes. */
  private readonly failed = new Map<string, string>();
  private readonly sharing = new ShareMemory();
  private reloadRequested = true;
  private reloadTimer: ReturnType<typeof setTimeout> | undefined;
  private readonly sleeper = new Sleeper();
  private readonly stopAll = new AbortController();
  private readonly status: StatusTable;

  constructor(
    private readonly settings: Settings,
    readonly sql: Sql,
    private readonly metrics: Metrics,
    private readonly options: CoordinatorOptions,
  ) {
    this.status = new StatusTable(sql, settings.relayGroupId);
  }

  private get tickMs(): number {
    return Math.max(this.settings.coordinatorTickMs, 10);
  }

  /** Runs until stop() (or, when draining, until every pipeline is done). */
  async run(): Promise<void> {
    // The lock session and the LISTEN connection are two connections: they open together. The
    // first turn of the loop awaits the session, so its failure is retried like any other.
    let opening: Promise<void> | null = this.newSession();
    opening.catch(() => {});
    try {
      await this.listen();
    } catch (err) {
      await opening.catch(() => {});
      await this.session?.close();
      throw err;
    }
    let lastDiscovery = 0;
    let attempt = 0;
    while (!this.stopAll.signal.aborted) {
      try {
        if (opening) await opening.finally(() => (opening = null));
        if (!this.session || this.session.lost) await this.newSession();
        await this.session!.verify();
        const due = Date.now() - lastDiscovery >= this.settings.discoveryIntervalSecs * 1000;
        if (due || this.reloadRequested) {
          this.reloadRequested = false;
          lastDiscovery = Date.now();
          await this.reconcile();
        }
        const snapshot = await this.lockSnapshot();
        this.sharing.note(snapshot, this.desired, this.graceMs);
        await this.acquire(snapshot);
        if (!this.options.drain) this.handOverExcess(snapshot);
        this.postgresConnected = true;
        attempt = 0;
      } catch (err) {
        if (this.stopAll.signal.aborted) break;
        if (errorKind(err) === "config") throw err;
        this.postgresConnected = false;
        const wait = backoffMs(attempt++, 1000, 60_000);
        log.warn(`coordinator: ${explainConnectError(err, this.settings.postgresUrl)}; retrying in ${(wait / 1000).toFixed(1)} s`);
        await abortableDelay(wait, this.stopAll.signal);
        continue;
      }
      if (this.options.drain && this.drainFinished()) break;
      // stop() wakes the sleeper (no per-tick abort listener: those would pile up for days).
      await this.sleeper.sleep(this.tickMs);
    }
  }

  /** A (debounced ~100 ms) full re-read of the catalog: notifications, SIGHUP, reconnects. */
  requestReload(immediate = false): void {
    clearTimeout(this.reloadTimer);
    const go = () => {
      this.reloadRequested = true;
      this.sleeper.wake();
    };
    if (immediate) go();
    else this.reloadTimer = setTimeout(go, 100);
  }

  private async listen(): Promise<void> {
    // onlisten fires again after the LISTEN connection reconnects: notifications sent meanwhile
    // are lost, so re-read everything and wake every pipeline once.
    // Both on postgres.js's one LISTEN connection, sent together.
    await Promise.all([
      this.sql.listen("pgtrickle_relay_config", () => this.requestReload(), () => this.requestReload()),
      this.sql.listen(
        "pgtrickle_outbox_new",
        (outboxTable) => {
          for (const w of this.workers.values()) {
            const src = w.pipeline?.source;
            if (src instanceof OutboxSource && src.ready && src.outboxTable === outboxTable) src.wake();
          }
        },
        () => this.workers.forEach((w) => w.pipeline?.source.wake?.()),
      ),
    ]);
  }

  private async newSession(): Promise<void> {
    const old = this.session;
    this.session = null;
    if (old) void old.close();
    const timeout = Math.max(10_000, 4 * this.tickMs);
    const session = new LockSession(this.settings.postgresUrl, timeout, (why) => this.sessionLost(session, why));
    try {
      await session.open(this.settings.relayGroupId, !this.options.drain);
    } catch (err) {
      await session.close();
      throw err;
    }
    this.session = session;
    this.reloadRequested = true;
    if (old) log.info(`coordinator: new session (backend ${session.pid}); racing for the pipelines again`);
  }

  /** Every lock of the session is gone: stop every worker at once, no commit after this. */
  private sessionLost(session: LockSession, why: string): void {
    const affected = [...this.workers.values()].filter((w) => w.session === session);
    if (!this.stopAll.signal.aborted) {
      log.error(`coordinator: ${why}: every advisory lock is gone; stopping ${affected.length} pipeline(s) at once`);
    }
    for (const w of affected) hardStop(w);
    this.metrics.owned.set(this.lockCount());
    this.sleeper.wake();
  }

  /** Brings the running set in line with the catalog: stop removed, restart changed, then acquire. */
  private async reconcile(): Promise<void> {
    const desired = await loadDesired(this.sql, this.options.only);
    for (const [key, d] of desired) {
      // An unresolved secret may resolve at the next reload (a file appears): try again each time.
      if (d.secretError) this.failed.delete(key);
      else if (this.failed.has(key) && this.failed.get(key) !== d.fingerprint) this.failed.delete(key);
      // What failed it may be fixed outside the catalog (a stream, topic or queue created later,
      // a grant given): try again once per discovery interval.
      else if (this.failed.has(key) && Date.now() - (this.failedPipelines.get(key)?.at.getTime() ?? 0) >= this.settings.discoveryIntervalSecs * 1000) {
        this.failed.delete(key);
      }
    }
    for (const key of [...this.failed.keys()]) if (!desired.has(key)) this.failed.delete(key);
    for (const key of [...this.failedPipelines.keys()]) if (!this.failed.has(key)) this.failedPipelines.delete(key);

    for (const w of this.workers.values()) {
      if (w.stop.signal.aborted) {
        // Already stopping: a pending restart picks up the newest row.
        if (w.endAction === "restart") {
          const d = desired.get(w.key);
          if (d) w.next = d;
          else w.endAction = "unlock";
        }
        continue;
      }
      const d = desired.get(w.key);
      if (!d) {
        pipelineLog(w.row.name).info("disabled or deleted: stopping after the batch in hand");
        w.endAction = "unlock";
        w.stop.abort();
      } else if (d.fingerprint !== w.fingerprint) {
        pipelineLog(w.row.name).info("config changed: restarting after the batch in hand");
        w.endAction = "restart";
        w.next = d;
        w.stop.abort();
      }
    }
    this.desired = desired;
  }

  /** How long a pipeline may wait for an owner before a replica takes it beyond its share. */
  private get graceMs(): number {
    return this.settings.discoveryIntervalSecs * 1000;
  }

  /** Every member's fair share of the desired pipelines (see fairShares). */
  private shares(snapshot: LockSnapshot): Map<number, number> {
    return fairShares(snapshot, this.desired.size, this.settings.maxWorkers);
  }

  /** Tries the locks of unowned pipelines, up to this process's share (docs/interface.md §7.3). */
  private async acquire(snapshot: LockSnapshot): Promise<void> {
    const session = this.session!;
    const group = this.settings.relayGroupId;
    const candidates = [...this.desired.values()].filter((d) => {
      const key = keyOf(d.row);
      if (this.workers.has(key) || this.sharing.handedOver.has(key)) return false;
      if (this.options.drain) return !this.outcomes.some((o) => keyOf(o) === key);
      return this.failed.get(key) !== d.fingerprint;
    });
    const now = Date.now();
    const share = this.options.drain ? this.settings.maxWorkers : (this.shares(snapshot).get(session.pid) ?? 0);
    for (const d of candidates) {
      if (session.lost || this.stopAll.signal.aborted) break;
      const key = keyOf(d.row);
      const holder = snapshot.holders.get(d.row.name);
      if (holder !== undefined && holder !== session.pid) {
        if (this.options.drain) this.outcomes.push(outcome(d.row, "locked_elsewhere", "owned by another relay process of this relay group"));
        continue;
      }
      if (this.lockCount() >= this.settings.maxWorkers) break;
      // Beyond the fair share only for a pipeline nobody has taken for a whole discovery interval.
      const beyondShare = this.keptCount() >= share;
      if (beyondShare && now - (this.sharing.unownedSince.get(key) ?? now) < this.graceMs) continue;
      if (!(await session.tryLock(group, d.row.name))) {
        if (this.options.drain) this.outcomes.push(outcome(d.row, "locked_elsewhere", "owned by another relay process of this relay group"));
        continue;
      }
      if (beyondShare && !this.options.drain) this.sharing.overflowMembers = membersKey(snapshot);
      pipelineLog(d.row.name).debug(`advisory lock won (coordinator backend ${session.pid})`);
      this.startWorker(d, session);
    }
    this.metrics.owned.set(this.lockCount());
  }

  /**
   * After a replica joins (or comes back), the others own more than their share: each hands its
   * excess over at once, but never more than the other members lack, and never while a pipeline
   * is waiting for an owner (the replicas under their share are taking it). Each released
   * pipeline finishes its batch first; a replica under its share takes it at its next tick, and
   * this process does not take it back while the members stay the same.
   */
  private handOverExcess(snapshot: LockSnapshot): void {
    const session = this.session;
    if (!session || session.lost || this.stopAll.signal.aborted) return;
    const now = Date.now();
    // A pipeline that failed here is retried once per discovery interval, unowned in between: it
    // is not one the others are about to take.
    const settling = [...this.desired.keys()].some((key) => !this.failed.has(key) && now - (this.sharing.unownedSince.get(key) ?? -Infinity) < this.graceMs);
    if (settling || this.sharing.overflowMembers === membersKey(snapshot)) return;
    this.sharing.overflowMembers = null;
    const shares = this.shares(snapshot);
    const share = shares.get(session.pid) ?? 0;
    let lacking = 0;
    for (const [pid, s] of shares) if (pid !== session.pid) lacking += Math.max(0, s - (snapshot.perPid.get(pid) ?? 0));
    const kept = this.keptCount();
    const count = Math.min(kept - share, lacking);
    if (count <= 0) return;
    const mine = [...this.workers.values()].filter((w) => !w.stop.signal.aborted && w.pipeline?.state === "running");
    for (const victim of mine.sort((a, b) => b.startedAt - a.startedAt).slice(0, count)) {
      pipelineLog(victim.row.name).info(`handing over to a replica with fewer pipelines (${kept} here, fair share ${share})`);
      victim.endAction = "unlock";
      victim.stop.abort();
      this.sharing.handedOver.set(victim.key, { at: now, members: membersKey(snapshot) });
    }
  }

  /** Who holds each desired pipeline's lock, and how many replicas of this group are running. */
  private async lockSnapshot(): Promise<LockSnapshot> {
    const names = [...new Set([...this.desired.values()].map((d) => d.row.name))];
    return readLockSnapshot(this.sql, this.settings.relayGroupId, names);
  }

  /** Locks this process holds: one per worker until its end action released it. */
  private lockCount(): number {
    return [...this.workers.values()].filter((w) => w.endAction !== "lost").length;
  }

  /** Locks this process keeps: those not being handed over, disabled or lost (a restart keeps its lock). */
  private keptCount(): number {
    return [...this.workers.values()].filter((w) => w.endAction === "restart" || (w.endAction === "unlock" && !w.stop.signal.aborted)).length;
  }

  private startWorker(d: Desired, session: LockSession): void {
    const row = d.row;
    const key = keyOf(row);
    const worker: Worker = {
      key,
      row,
      fingerprint: d.fingerprint,
      pipeline: null,
      stop: new AbortController(),
      lost: new AbortController(),
      session,
      startedAt: Date.now(),
      endAction: "unlock",
      ended: Promise.resolve(),
    };
    const done = runWorker(worker, d, { settings: this.settings, sql: this.sql, metrics: this.metrics, drain: this.options.drain, status: this.status });
    this.workers.set(key, worker);
    worker.ended = done
      .then((state) => this.workerEnded(worker, state))
      .catch((err) => log.error(`coordinator: ending pipeline ${row.name}: ${errorMessage(err)}`));
  }

  private async workerEnded(w: Worker, state: PipelineState): Promise<void> {
    const p = w.pipeline;
    const error = p ? p.lastError : this.status.lastError(w.key);
    if (state === "failed") {
      this.failed.set(w.key, w.fingerprint);
      this.failedPipelines.set(w.key, { name: w.row.name, direction: w.row.direction, error: redact(error ?? "failed"), at: new Date() });
    }
    if (this.options.drain && w.endAction !== "restart") {
      this.outcomes.push({ ...outcome(w.row, state, error ? redact(error) : null), delivered: p?.delivered ?? 0, deadLettered: p?.deadLettered ?? 0 });
    }
    clearPipelineGauges(this.metrics, w.row.name, state);
    if (state !== "failed") {
      const why = w.endAction === "lost" ? " at once: its lock was lost (a batch in hand stays uncommitted, for the next owner to replay)" : w.endAction === "restart" ? "; restarting" : "";
      pipelineLog(w.row.name).info(`${state}${why}`);
    }
    if (w.endAction === "lost") {
      this.workers.delete(w.key);
      this.metrics.owned.set(this.lockCount());
      return;
    }
    // The state is written before the lock goes, so the next owner's "starting" lands after it.
    if (state !== "failed") this.status.record(w.row, state, p?.lastError ?? null);
    await this.status.settled(w.key);
    const next = w.endAction === "restart" && !this.stopAll.signal.aborted && !w.session.lost ? w.next : undefined;
    this.workers.delete(w.key);
    if (next && next.row && this.desired.has(w.key)) {
      this.startWorker(next, w.session); // keeps the lock: no other replica can slip in between
    } else {
      await w.session.unlock(this.settings.relayGroupId, w.row.name);
      pipelineLog(w.row.name).debug("advisory lock released");
    }
    this.metrics.owned.set(this.lockCount());
    this.sleeper.wake();
  }

  private drainFinished(): boolean {
    return this.workers.size === 0 && [...this.desired.values()].every((d) => this.outcomes.some((o) => keyOf(o) === keyOf(d.row)));
  }

  /** Graceful stop: every worker finishes its batch and commits, then each lock is released explicitly. */
  async stop(): Promise<void> {
    this.stopAll.abort();
    clearTimeout(this.reloadTimer);
    this.sleeper.wake();
    for (const w of this.workers.values()) {
      if (w.endAction === "restart") w.endAction = "unlock";
      w.next = undefined;
      w.stop.abort();
    }
    await Promise.all([...this.workers.values()].map((w) => w.ended));
    await this.session?.close();
  }

  /**
   * Rows still pending behind each pipeline that failed here (/health/drained): a forward
   * pipeline's lag is read from its committed offset and outbox, as `status` reads it; a reverse
   * one's is unknown (null) — its source could not be built to ask the broker.
   */
  async failedLag(): Promise<{ name: string; direction: string; rows: number | null; error: string }[]> {
    return Promise.all(
      [...this.failedPipelines.entries()].map(async ([key, f]) => {
        const row = this.desired.get(key)?.row;
        let rows: number | null = null;
        if (row && f.direction === "forward") {
          try {
            rows = (await forwardProgress(this.sql, this.settings.relayGroupId, normalizePipeline(row))).rows;
          } catch {
            // an invalid config or a missing outbox: the lag stays unknown
          }
        }
        return { name: f.name, direction: f.direction, rows, error: f.error };
      }),
    );
  }

  /** Running pipelines (for /health and /metrics). */
  get pipelines(): Pipeline[] {
    return [...this.workers.values()].flatMap((w) => (w.pipeline && w.endAction !== "lost" ? [w.pipeline] : []));
  }
}

function outcome(row: CatalogRow, state: Outcome["state"], error: string | null): Outcome {
  return { name: row.name, direction: row.direction, state, error, delivered: 0, deadLettered: 0 };
}
