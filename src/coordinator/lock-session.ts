/**
 * The advisory locks of this process (docs/interface.md §7.3): the names and lock keys by which
 * the coordinator and `status` find them in pg_locks, and the one pinned session that holds them.
 */
import { hostname } from "node:os";
import postgres from "postgres";
import type { Sql } from "../db.ts";
import { errorMessage } from "../errors.ts";

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

// ── the lock session ──────────────────────────────────────────────────────────────────────────

/**
 * The one pinned connection that holds every advisory lock of this process. It is never pooled
 * and never recycled (postgres.js would otherwise close it after 30–60 min by default, dropping
 * every lock). Once it closes or answers from a different backend, it is `lost` for good: a new
 * session is opened and the locks are raced for again.
 */
export class LockSession {
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
      // Its queries return no arrays: the array type lookup every new connection makes is not needed.
      fetch_types: false,
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
