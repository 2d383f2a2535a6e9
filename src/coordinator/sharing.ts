/**
 * How the replicas of one relay group share the pipelines (README "How it works", "Several
 * relays, one database"; docs/interface.md §7.3): who holds which lock and which replicas run,
 * read from pg_locks; each replica's fair share; and what a replica remembers between ticks so
 * that pipelines are not handed back and forth.
 */
import type { Sql } from "../db.ts";
import { MEMBER_KEY_SQL, PIPELINE_LOCK_SQL } from "./lock-session.ts";

/** Who holds each desired pipeline's lock (coordinator backend pid), and which replicas run. */
export interface LockSnapshot {
  holders: Map<string, number>;
  /** Coordinator backends of the `run` processes of this relay group (their shared member lock). */
  memberPids: number[];
  perPid: Map<number, number>;
}

export const membersKey = (snapshot: LockSnapshot) => [...snapshot.memberPids].sort((x, y) => x - y).join(",");

/** Who holds each of the `names` pipelines' lock, and how many replicas of this group are running. */
export async function readLockSnapshot(sql: Sql, group: string, names: string[]): Promise<LockSnapshot> {
  const rows = await sql.unsafe<{ name: string | null; pid: number; member: boolean }[]>(
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

/**
 * Every member's fair share of `total` pipelines, the same in every member's eyes: the pipelines
 * split evenly, the remainder going one each to the members with the lowest coordinator backend
 * pids. The shares add up to the whole, so a replica over its share knows another one is under it.
 */
export function fairShares(snapshot: LockSnapshot, total: number, maxWorkers: number): Map<number, number> {
  const members = [...snapshot.memberPids].sort((x, y) => x - y);
  const base = Math.floor(total / Math.max(1, members.length));
  const extra = total % Math.max(1, members.length);
  return new Map(members.map((pid, rank) => [pid, Math.min(maxWorkers, base + (rank < extra ? 1 : 0))]));
}

/** What this process remembers between ticks about the sharing, keyed like the desired pipelines. */
export class ShareMemory {
  /** When each desired pipeline was first seen without any owner (for taking more than a fair share). */
  readonly unownedSince = new Map<string, number>();
  /**
   * Pipelines this process handed over, with when and the members then: not taken back while
   * the members stay the same (the round), for at most a discovery interval.
   */
  readonly handedOver = new Map<string, { at: number; members: string }>();
  /**
   * The members (sorted coordinator backends) when this process last took a pipeline beyond its
   * share because nobody else would: no handover while they stay the same, or it would hand the
   * pipeline to a replica that cannot take it (its --max-workers) and take it back, for ever.
   */
  overflowMembers: string | null = null;

  /**
   * Notes since when each desired pipeline has had no owner (one just released counts from now),
   * and forgets handovers of a past round (older than `graceMs`, or among other members).
   */
  note(snapshot: LockSnapshot, desired: Map<string, { row: { name: string } }>, graceMs: number): void {
    const now = Date.now();
    for (const [key, d] of desired) {
      if (snapshot.holders.has(d.row.name)) this.unownedSince.delete(key);
      else if (!this.unownedSince.has(key)) this.unownedSince.set(key, now);
    }
    for (const key of [...this.unownedSince.keys()]) if (!desired.has(key)) this.unownedSince.delete(key);
    const members = membersKey(snapshot);
    for (const [key, h] of this.handedOver) if (now - h.at >= graceMs || h.members !== members) this.handedOver.delete(key);
  }
}
