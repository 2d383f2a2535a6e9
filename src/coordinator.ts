import { createHash } from "node:crypto";
import { hostname } from "node:os";
import postgres from "postgres";
import type { Sql } from "./db.ts";
import { explainConnectError } from "./db.ts";
import { errorKind, errorMessage } from "./errors.ts";
import { log, pipelineLog } from "./observe/log.ts";
import type { Metrics } from "./observe/metrics.ts";
import { forwardProgress } from "./backends/outbox/progress.ts";
import { OutboxSource } from "./backends/outbox/source.ts";
import { Pipeline, type LockGuard, type PipelineState } from "./pipeline.ts";
import { loadBackends } from "./backends/index.ts";
import { normalizePipeline, type CatalogRow, type PipelineSpec } from "./pipeline-config.ts";
import { redact } from "./redact.ts";
import { resolveSecrets } from "./secrets.ts";
import type { Settings } from "./settings.ts";
import { abortableDelay, backoffMs, Sleeper } from "./sleep.ts";

// ── identities and lock keys ──────────────────────────────────────────────────────────────────

/** `<host>:<pid>`: names this process in application_name, relay_pipeline_status and logs. */
export const processIdentity = () => `${hostname()}:${process.pid}`;

/** application_name of the coordinator session, so `status` (pg_stat_activity) can say who owns what. */
export const COORDINATOR_APP = "pgtrickle-relay coordinator";
export const coordinatorAppName = () => `${COORDINATOR_APP} ${processIdentity()}`.slice(0, 63);

/**
 * A pipeline's lock is `pg_try_advisory_lock(hashtext(group), hashtext(name))` (docs/interface.md §7.3);
 * in pg_locks that is classid = hashtext(group), objid = hashtext(name), objsubid = 2, in this
 * database only (advisory locks are per database; pg_locks shows every database).
 */
export const PIPELINE_LOCK_SQL = `l.locktype = 'advisory' AND l.objsubid = 2 AND l.granted
  AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())`;

/**
 * Every `run` coordinator also holds a SHARED advisory lock on one bigint key per relay group:
 * counting its holders tells how many replicas share the work. The single-bigint form lives in a
 * different lock space (objsubid 1) from the two-int pipeline locks, so it cannot collide with one.
 */
export const MEMBER_KEY_SQL = `('x' || left(md5('pgtrickle-relay members:' || $1::text), 16))::bit(64)::bigint`;

const keyOf = (r: { name: string; direction: string }) => `${r.direction}:${r.name}`;

/** The pipeline a catalog row names; none when the row is invalid (startWorker reports that). */
function validSpecs(row: CatalogRow): PipelineSpec[] {
  try {
    return [normalizePipeline(row)];
  } catch {
    return [];
  }
}

/** Who holds each desired pipeline's lock (coordinator backend pid), and which replicas run. */
interface LockSnapshot {
  holders: Map<string, number>;
  /** Coordinator backends of the `run` processes of this relay group (their shared member lock). */
  memberPids: number[];
  perPid: Map<number, number>;
}

const membersKey = (snapshot: LockSnapshot) => [...snapshot.memberPids].sort((x, y) => x - y).join(",");

// ── the lock session ──────────────────────────────────────────────────────────────────────────

/**
 * The one pinned connection that holds every advisory lock of this process. It is never pooled
 * and never recycled (postgres.js would otherwise close it after 30–60 min by default, dropping
 * every lock). Once it closes or answers from a different backend, it is `lost` for good: a new
 * session is opened and the locks are raced for again.
 */
class LockSession {
  readonly sql: Sql;
  pid = 0;
  lost = false;
  private opened = false;
  private closing = false;

  constructor(
    url: string,
    private readonly timeoutMs: number,
    private readonly onLost: (why: string) => void,
  ) {
    this.sql = postgres(url, {
      max: 1,
      idle_timeout: 0,
      max_lifetime: null,
      connect_timeout: 10,
      onnotice: () => {},
      connection: { application_name: coordinatorAppName() },
      // Fires as soon as the socket closes (pg_terminate_backend, server restart, network reset).
      onclose: () => {
        if (this.opened && !this.closing) this.markLost("the coordinator connection closed");
      },
    }) as unknown as Sql;
  }

  async open(groupId: string, member: boolean): Promise<void> {
    const [row] = await this.query<{ pid: number }[]>((q) => q`SELECT pg_backend_pid() AS pid`);
    this.pid = row!.pid;
    this.opened = true;
    if (member) await this.query((q) => q.unsafe(`SELECT pg_advisory_lock_shared(${MEMBER_KEY_SQL})`, [groupId]));
  }

  markLost(why: string): void {
    if (this.lost) return;
    this.lost = true;
    this.onLost(why);
  }

  /** A query on the session, bounded in time: no answer (a partition) counts as a lost session. */
  async query<T>(run: (sql: Sql) => Promise<T>): Promise<T> {
    if (this.lost) throw new Error("coordinator session lost");
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        const why = `the coordinator connection did not answer within ${this.timeoutMs} ms`;
        if (this.opened) this.markLost(why);
        reject(new Error(why));
      }, this.timeoutMs);
    });
    try {
      return await Promise.race([run(this.sql), timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** Session locks die with their backend: the same pid answering proves the session survived. */
  async verify(): Promise<void> {
    let pid: number;
    try {
      const [row] = await this.query<{ pid: number }[]>((q) => q`SELECT pg_backend_pid() AS pid`);
      pid = row!.pid;
    } catch (err) {
      // Whatever failed, the locks can no longer be proven: treat them as gone.
      this.markLost(`the coordinator connection failed (${errorMessage(err)})`);
      throw err;
    }
    if (pid !== this.pid) this.markLost(`the coordinator connection was replaced (backend ${this.pid} → ${pid})`);
  }

  async tryLock(groupId: string, name: string): Promise<boolean> {
    const [row] = await this.query((q) => q<{ ok: boolean }[]>`SELECT pg_try_advisory_lock(hashtext(${groupId}), hashtext(${name})) AS ok`);
    return row?.ok === true;
  }

  /** True only if THIS backend still holds the lock; a replaced backend answers false. */
  async holds(groupId: string, name: string): Promise<boolean> {
    const [row] = await this.query((q) => q<{ same: boolean; held: boolean }[]>`
      SELECT pg_backend_pid() = ${this.pid}::int AS same,
             EXISTS (SELECT 1 FROM pg_catalog.pg_locks l
                      WHERE l.pid = pg_backend_pid() AND l.locktype = 'advisory' AND l.objsubid = 2 AND l.granted
                        AND l.classid = hashtext(${groupId})::oid AND l.objid = hashtext(${name})::oid) AS held`);
    if (!row?.same) this.markLost("the coordinator connection was replaced");
    return row?.same === true && row.held === true;
  }

  async unlock(groupId: string, name: string): Promise<void> {
    if (this.lost) return;
    await this.query((q) => q`SELECT pg_advisory_unlock(hashtext(${groupId}), hashtext(${name}))`).catch(() => {});
  }

  async close(): Promise<void> {
    this.closing = true;
    // Ending the session releases whatever it still holds (the member lock, stacked locks).
    await this.sql.end({ timeout: 2 }).catch(() => {});
  }
}

// ── the coordinator ───────────────────────────────────────────────────────────────────────────

/** Why a worker is being stopped, which decides what happens to its lock afterwards. */
type EndAction = "unlock" | "restart" | "lost";

interface Worker {
  key: string;
  row: CatalogRow;
  fingerprint: string;
  pipeline: Pipeline | null;
  /** Graceful: finish the batch in hand, commit, stop. */
  stop: AbortController;
  /** Hard: the lock is gone; publish and commit nothing more. */
  lost: AbortController;
  session: LockSession;
  startedAt: number;
  endAction: EndAction;
  /** A newer catalog row to start with once this one has stopped (endAction "restart"). */
  next?: Desired;
  /** Resolves when the pipeline ended and the lock was released (or handed to the restart). */
  ended: Promise<void>;
}

/** A pipeline the catalog wants running, with the fingerprint of its secret-resolved config. */
interface Desired {
  row: CatalogRow;
  fingerprint: string;
  /** Set when a `${env:…}`/`${file:…}` token cannot be resolved: the pipeline fails, others run. */
  secretError: string | null;
}

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
 * asks the lock session whether it still holds its lock right before every commit. What remains
 * is one round trip: a session that dies after answering "held" and before the commit lands on
 * the worker connection. If another replica wins the lock in that instant, it replays that batch
 * with identical dedup keys, and the offset upsert never moves backwards — duplicates, never loss.
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
  /** When each desired pipeline was first seen without any owner (for taking more than a fair share). */
  private readonly unownedSince = new Map<string, number>();
  /**
   * Pipelines this process handed over, with when and the members then: not taken back while
   * the members stay the same (the round), for at most a discovery interval.
   */
  private readonly handedOver = new Map<string, { at: number; members: string }>();
  /**
   * The members (sorted coordinator backends) when this process last took a pipeline beyond its
   * share because nobody else would: no handover while they stay the same, or it would hand the
   * pipeline to a replica that cannot take it (its --max-workers) and take it back, for ever.
   */
  private overflowMembers: string | null = null;
  private reloadRequested = true;
  private reloadTimer: ReturnType<typeof setTimeout> | undefined;
  private readonly sleeper = new Sleeper();
  private readonly stopAll = new AbortController();
  private readonly identity = processIdentity();
  /** Serialises status-table writes per pipeline so they land in order. */
  private readonly statusWrites = new Map<string, Promise<void>>();
  private readonly statusWritten = new Map<string, string>();

  constructor(
    private readonly settings: Settings,
    readonly sql: Sql,
    private readonly metrics: Metrics,
    private readonly options: CoordinatorOptions,
  ) {}

  private get tickMs(): number {
    return Math.max(this.settings.coordinatorTickMs, 10);
  }

  /** Runs until stop() (or, when draining, until every pipeline is done). */
  async run(): Promise<void> {
    await this.listen();
    let lastDiscovery = 0;
    let attempt = 0;
    while (!this.stopAll.signal.aborted) {
      try {
        if (!this.session || this.session.lost) await this.newSession();
        await this.session!.verify();
        const due = Date.now() - lastDiscovery >= this.settings.discoveryIntervalSecs * 1000;
        if (due || this.reloadRequested) {
          this.reloadRequested = false;
          lastDiscovery = Date.now();
          await this.reconcile();
        }
        const snapshot = await this.lockSnapshot();
        this.noteSnapshot(snapshot);
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
    await this.sql.listen("pgtrickle_relay_config", () => this.requestReload(), () => this.requestReload());
    await this.sql.listen(
      "pgtrickle_outbox_new",
      (outboxTable) => {
        for (const w of this.workers.values()) {
          const src = w.pipeline?.source;
          if (src instanceof OutboxSource && src.ready && src.outboxTable === outboxTable) src.wake();
        }
      },
      () => this.workers.forEach((w) => w.pipeline?.source.wake?.()),
    );
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
    for (const w of affected) this.hardStop(w);
    this.metrics.owned.set(this.lockCount());
    this.sleeper.wake();
  }

  private hardStop(w: Worker): void {
    w.endAction = "lost";
    w.next = undefined;
    w.lost.abort();
    w.stop.abort();
  }

  private async loadCatalog(): Promise<CatalogRow[]> {
    const rows = await this.sql<CatalogRow[]>`SELECT name, direction, enabled, config FROM pgtrickle.list_relay_configs()`;
    return rows.filter((r) => r.enabled && (!this.options.only || this.options.only.includes(r.name)));
  }

  /** Resolves secrets now (they may have rotated) and fingerprints the RESOLVED config. */
  private desire(row: CatalogRow): Desired {
    const raw = JSON.stringify(row.config);
    try {
      const resolved = JSON.stringify(resolveSecrets(row.config, `pipeline '${row.name}'`));
      return { row, fingerprint: sha256(resolved), secretError: null };
    } catch (err) {
      return { row, fingerprint: `unresolved:${sha256(raw)}`, secretError: errorMessage(err) };
    }
  }

  /** Brings the running set in line with the catalog: stop removed, restart changed, then acquire. */
  private async reconcile(): Promise<void> {
    const rows = await this.loadCatalog();
    // startWorker builds pipelines synchronously: their backends (client libraries) load here.
    await loadBackends(rows.flatMap(validSpecs));
    const desired = new Map(rows.map((r) => [keyOf(r), this.desire(r)]));
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

  /**
   * Notes since when each desired pipeline has had no owner (one just released counts from now),
   * and forgets handovers of a past round.
   */
  private noteSnapshot(snapshot: LockSnapshot): void {
    const now = Date.now();
    for (const [key, d] of this.desired) {
      if (snapshot.holders.has(d.row.name)) this.unownedSince.delete(key);
      else if (!this.unownedSince.has(key)) this.unownedSince.set(key, now);
    }
    for (const key of [...this.unownedSince.keys()]) if (!this.desired.has(key)) this.unownedSince.delete(key);
    const members = membersKey(snapshot);
    for (const [key, h] of this.handedOver) if (now - h.at >= this.graceMs || h.members !== members) this.handedOver.delete(key);
  }

  /** How long a pipeline may wait for an owner before a replica takes it beyond its share. */
  private get graceMs(): number {
    return this.settings.discoveryIntervalSecs * 1000;
  }

  /**
   * Every member's fair share, the same in every member's eyes: the pipelines split evenly, the
   * remainder going one each to the members with the lowest coordinator backend pids. The shares
   * add up to the whole, so a replica over its share knows another one is under it.
   */
  private shares(snapshot: LockSnapshot): Map<number, number> {
    const members = [...snapshot.memberPids].sort((x, y) => x - y);
    const total = this.desired.size;
    const base = Math.floor(total / Math.max(1, members.length));
    const extra = total % Math.max(1, members.length);
    return new Map(members.map((pid, rank) => [pid, Math.min(this.settings.maxWorkers, base + (rank < extra ? 1 : 0))]));
  }

  /** Tries the locks of unowned pipelines, up to this process's share (docs/interface.md §7.3). */
  private async acquire(snapshot: LockSnapshot): Promise<void> {
    const session = this.session!;
    const group = this.settings.relayGroupId;
    const candidates = [...this.desired.values()].filter((d) => {
      const key = keyOf(d.row);
      if (this.workers.has(key) || this.handedOver.has(key)) return false;
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
      if (beyondShare && now - (this.unownedSince.get(key) ?? now) < this.graceMs) continue;
      if (!(await session.tryLock(group, d.row.name))) {
        if (this.options.drain) this.outcomes.push(outcome(d.row, "locked_elsewhere", "owned by another relay process of this relay group"));
        continue;
      }
      if (beyondShare && !this.options.drain) this.overflowMembers = membersKey(snapshot);
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
    const settling = [...this.desired.keys()].some((key) => !this.failed.has(key) && now - (this.unownedSince.get(key) ?? -Infinity) < this.graceMs);
    if (settling || this.overflowMembers === membersKey(snapshot)) return;
    this.overflowMembers = null;
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
      this.handedOver.set(victim.key, { at: now, members: membersKey(snapshot) });
    }
  }

  /** Who holds each desired pipeline's lock, and how many replicas of this group are running. */
  private async lockSnapshot(): Promise<LockSnapshot> {
    const names = [...new Set([...this.desired.values()].map((d) => d.row.name))];
    const group = this.settings.relayGroupId;
    const rows = await this.sql.unsafe<{ name: string | null; pid: number; member: boolean }[]>(
      `SELECT n.name, l.pid, false AS member
         FROM unnest($2::text[]) AS n(name)
         JOIN pg_catalog.pg_locks l ON ${PIPELINE_LOCK_SQL}
          AND l.classid = hashtext($1)::oid AND l.objid = hashtext(n.name)::oid
       UNION ALL
       SELECT NULL, l.pid, true FROM pg_catalog.pg_locks l
        WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted AND l.mode = 'ShareLock'
          AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
          AND l.classid = ((${MEMBER_KEY_SQL} >> 32) & 4294967295)::oid
          AND l.objid = (${MEMBER_KEY_SQL} & 4294967295)::oid`,
      [group, names],
    );
    const holders = new Map<string, number>();
    const perPid = new Map<number, number>();
    const memberPids: number[] = [];
    for (const r of rows) {
      if (r.member) memberPids.push(r.pid);
      else if (r.name !== null) {
        holders.set(r.name, r.pid);
        perPid.set(r.pid, (perPid.get(r.pid) ?? 0) + 1);
      }
    }
    return { holders, memberPids, perPid };
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
    const plog = pipelineLog(row.name);
    const stop = new AbortController();
    const lost = new AbortController();
    let pipeline: Pipeline | null = null;
    let done: Promise<PipelineState>;
    const worker: Worker = {
      key,
      row,
      fingerprint: d.fingerprint,
      pipeline: null,
      stop,
      lost,
      session,
      startedAt: Date.now(),
      endAction: "unlock",
      ended: Promise.resolve(),
    };
    const guard: LockGuard = {
      lost: lost.signal,
      confirm: async () => {
        if (session.lost) return false;
        const held = await session.holds(this.settings.relayGroupId, row.name).catch(() => false);
        if (!held && !lost.signal.aborted) {
          plog.error("the advisory lock is no longer held by this process: stopping without committing");
          this.hardStop(worker);
        }
        return held;
      },
    };
    try {
      if (d.secretError) throw Object.assign(new Error(d.secretError), { secret: true });
      const spec = normalizePipeline(row);
      pipeline = new Pipeline(spec, {
        sql: this.sql,
        postgresUrl: this.settings.postgresUrl,
        relayGroupId: this.settings.relayGroupId,
        metrics: this.metrics,
        log: plog,
        drain: this.options.drain,
        sinkMaxInflight: this.settings.sinkMaxInflight,
        ioTimeoutMs: this.settings.ioTimeoutSecs * 1000,
        stallTimeoutMs: this.settings.stallTimeoutSecs * 1000,
        guard,
        onStatus: (p) => this.recordStatus(row, p.reportedState, p.lastError),
      });
      worker.pipeline = pipeline;
      this.recordStatus(row, "starting", null);
      done = pipeline.run(stop.signal);
    } catch (err) {
      const message = redact(errorMessage(err));
      const kind = (err as { secret?: boolean }).secret ? "secret" : "config";
      plog.error(`failed: ${message}`);
      this.metrics.errors.inc({ pipeline: row.name, direction: row.direction, kind });
      this.metrics.healthy.set({ pipeline: row.name }, 0);
      this.recordStatus(row, "failed", message);
      done = Promise.resolve("failed");
    }
    this.workers.set(key, worker);
    worker.ended = done
      .then((state) => this.workerEnded(worker, state))
      .catch((err) => log.error(`coordinator: ending pipeline ${row.name}: ${errorMessage(err)}`));
  }

  private async workerEnded(w: Worker, state: PipelineState): Promise<void> {
    const p = w.pipeline;
    const error = p ? p.lastError : this.lastStatusError(w);
    if (state === "failed") {
      this.failed.set(w.key, w.fingerprint);
      this.failedPipelines.set(w.key, { name: w.row.name, direction: w.row.direction, error: redact(error ?? "failed"), at: new Date() });
    }
    if (this.options.drain && w.endAction !== "restart") {
      this.outcomes.push({ ...outcome(w.row, state, error ? redact(error) : null), delivered: p?.delivered ?? 0, deadLettered: p?.deadLettered ?? 0 });
    }
    this.clearPipelineGauges(w.row.name, state);
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
    if (state !== "failed") this.recordStatus(w.row, state, p?.lastError ?? null);
    await this.statusWrites.get(w.key)?.catch(() => {});
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

  private lastStatusError(w: Worker): string | null {
    const written = this.statusWritten.get(w.key);
    return written ? (JSON.parse(written) as { error: string | null }).error : null;
  }

  /** Per-pipeline gauges must not outlive ownership: another replica reports them now. */
  private clearPipelineGauges(name: string, state: PipelineState): void {
    const m = this.metrics;
    for (const g of [m.lagRows, m.lagSeconds, m.lastOffset, m.sourceConnected, m.sinkConnected, m.stalled]) g.remove({ pipeline: name });
    if (state === "failed") m.healthy.set({ pipeline: name }, 0);
    else m.healthy.remove({ pipeline: name });
  }

  /** Persists state and last error for `status` (relay_pipeline_status); best effort, in order. */
  private recordStatus(row: CatalogRow, state: string, error: string | null): void {
    const key = keyOf(row);
    const lastError = error === null ? null : redact(error).slice(0, 2000);
    const text = JSON.stringify({ state, error: lastError });
    if (this.statusWritten.get(key) === text) return;
    this.statusWritten.set(key, text);
    const prev = this.statusWrites.get(key) ?? Promise.resolve();
    const write = prev.then(() =>
      this.sql`
        INSERT INTO pgtrickle.relay_pipeline_status (relay_group_id, pipeline, direction, owner, state, last_error, updated_at)
        VALUES (${this.settings.relayGroupId}, ${row.name}, ${row.direction}, ${this.identity}, ${state}, ${lastError}, now())
        ON CONFLICT (relay_group_id, pipeline, direction) DO UPDATE
          SET owner = EXCLUDED.owner, state = EXCLUDED.state, last_error = EXCLUDED.last_error, updated_at = now()`
        .then(() => {})
        .catch((err) => {
          this.statusWritten.delete(key); // retried at the next change
          log.debug(`relay_pipeline_status not written for ${row.name}: ${errorMessage(err)}`);
        }),
    );
    this.statusWrites.set(key, write);
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

function sha256(text: string): string {
  return createHash("sha256").update(text).digest("hex");
}

function outcome(row: CatalogRow, state: Outcome["state"], error: string | null): Outcome {
  return { name: row.name, direction: row.direction, state, error, delivered: 0, deadLettered: 0 };
}
