/**
 * The simple-mode reader of the outbox source: header rows by id after the last one read,
 * never skipping a lower id that commits after a higher one (README "No row skipped";
 * docs/interface.md §7.5). Its offsets live in relay_consumer_offsets, written by the source.
 */
import { qualifiedIdent, type Sql } from "../../db.ts";
import type { HeaderRow } from "./decode.ts";
import type { OutboxTarget } from "./resolve.ts";

/** How far the simple-mode reader may go: see `deliverablePrefix`. */
export interface WriterCheck {
  writers: Set<string>;
  /** Highest id the sequence has handed out at check time. */
  hwm: bigint;
}

/** Bigints as text (exact); ORDER BY must then name `h.id`, or it would sort the text alias. */
const HEADER_COLUMNS =
  "h.id::text AS id, h.refresh_id::text AS refresh_id, h.created_at, h.inserted_count::text AS inserted_count, h.deleted_count::text AS deleted_count, h.is_claim_check, h.payload";

export class SimpleReader {
  /**
   * The last header id this pass has read (yielded or being expanded): the next poll continues
   * after it while earlier batches still await their acknowledgement (read-ahead).
   */
  readPos = 0n;
  /** True when the last poll stopped at a gap that may still be filled. */
  blockedOnGap = false;
  /** Gaps in the id sequence seen earlier, with the writers that could still fill them. */
  private readonly openGaps = new Map<string, Set<string>>();

  constructor(
    private readonly sql: Sql,
    private readonly batchSize: number,
  ) {}

  /**
   * The next rows. Usually one statement: rows whose ids follow `readPos` without a hole cannot
   * have skipped anything, so they need no writer check. Only when the ids have a hole (a
   * transaction that has not committed yet, or rolled back) — or the last poll stopped at one —
   * is the poll made again the careful way: writer check first, then the read. The check costs a
   * round trip and a scan of the server's whole lock table (pg_locks), which on a busy server
   * took longer than the read itself (bench/RESULTS.md, "Commit → publish latency").
   */
  async poll(target: OutboxTarget): Promise<HeaderRow[]> {
    if (!this.blockedOnGap) {
      const rows = await this.read(target);
      if (this.continuesReadPos(rows)) return this.handOut(rows);
    }
    const check = await this.checkWriters(target);
    return this.handOut(this.deliverablePrefix(await this.read(target), check));
  }

  private read(target: OutboxTarget): Promise<HeaderRow[]> {
    return this.sql<HeaderRow[]>`
      SELECT ${this.sql.unsafe(HEADER_COLUMNS)} FROM ${qualifiedIdent(this.sql, "pgtrickle", target.outboxTable)} AS h
      WHERE h.id > ${this.readPos.toString()}::bigint ORDER BY h.id LIMIT ${this.batchSize}`;
  }

  /** True when the rows' ids are readPos+1, readPos+2, … without a hole (also for no rows). */
  private continuesReadPos(rows: HeaderRow[]): boolean {
    let expected = this.readPos + 1n;
    for (const row of rows) {
      if (BigInt(row.id) !== expected) return false;
      expected++;
    }
    return true;
  }

  private handOut(rows: HeaderRow[]): HeaderRow[] {
    if (rows.length > 0) this.readPos = BigInt(rows[rows.length - 1]!.id);
    return rows;
  }

  /**
   * Who is writing to the outbox right now, and how far its id sequence has gone. Taken BEFORE
   * the rows are read: any id up to `hwm` that the read does not see belongs to a transaction
   * that held RowExclusiveLock at check time (the lock is taken before the id is drawn) or
   * rolled back.
   */
  private async checkWriters(target: OutboxTarget): Promise<WriterCheck> {
    const [row] = await this.sql<{ writers: string[]; hwm: string | null }[]>`
      SELECT coalesce(array_agg(DISTINCT l.virtualtransaction), '{}') AS writers,
             (SELECT pg_sequence_last_value(${target.idSequence ?? ""}::regclass)::text
              WHERE ${target.idSequence !== null}) AS hwm
      FROM pg_locks l
      WHERE l.locktype = 'relation' AND l.relation = ${target.headerOid}::oid
        AND l.mode = 'RowExclusiveLock' AND l.pid IS DISTINCT FROM pg_backend_pid()`;
    return { writers: new Set(row?.writers ?? []), hwm: BigInt(row?.hwm ?? "0") };
  }

  /**
   * Rows are handed out in id order, but ids are drawn at insert and become visible at commit,
   * so `id > last` alone would skip a lower id committed after a higher one. A gap in the ids
   * is crossed only once it is known to be permanent (rolled back): every transaction that could
   * fill it has ended and it is still empty. Until then the poll stops at the gap.
   */
  deliverablePrefix(rows: HeaderRow[], check: WriterCheck): HeaderRow[] {
    this.blockedOnGap = false;
    let expected = this.readPos + 1n;
    const out: HeaderRow[] = [];
    for (const row of rows) {
      const id = BigInt(row.id);
      if (id > expected && !this.gapClosed(expected, id - 1n, check)) {
        this.blockedOnGap = true;
        break;
      }
      out.push(row);
      expected = id + 1n;
    }
    return out;
  }

  private gapClosed(first: bigint, last: bigint, check: WriterCheck): boolean {
    const key = first.toString();
    if (last > check.hwm) return false; // drawn after the check: judge it at the next poll
    if (check.writers.size === 0) {
      this.openGaps.delete(key);
      return true;
    }
    const earlier = this.openGaps.get(key);
    if (earlier && ![...earlier].some((w) => check.writers.has(w))) {
      this.openGaps.delete(key);
      return true;
    }
    if (!earlier) this.openGaps.set(key, check.writers);
    return false;
  }

  /** The offset moved to `committed`: the gaps at or below it are behind the reader for good. */
  forgetGapsUpTo(committed: bigint): void {
    for (const key of this.openGaps.keys()) if (BigInt(key) <= committed) this.openGaps.delete(key);
  }
}
