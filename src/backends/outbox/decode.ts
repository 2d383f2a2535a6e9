import { decodeError } from "../../errors.ts";

/** One header row of `pgtrickle."outbox_<st>"` (docs/interface.md §2.3); bigints stay strings. */
export interface HeaderRow {
  id: string;
  refresh_id: string | null;
  created_at: Date | string;
  inserted_count: string;
  deleted_count: string;
  is_claim_check: boolean;
  payload: unknown;
}

export interface DecodeOptions {
  summaryMessages: boolean;
  keepInternalColumns: boolean;
}

/**
 * What one header row turns into (docs/interface.md §4.3):
 * - inline rows (designed v1 object, or the 0.37–0.45 bare snapshot array),
 * - claim-check (rows live in the delta table and are paged by the source),
 * - a single summary message (NULL payload, pg_tide count envelope, the empty snapshot of an
 *   emptied stream table),
 * - nothing (a summary when summary_messages is off) — the offset still advances.
 */
export type Plan =
  | { kind: "rows"; fullRefresh: boolean; refreshId: string | null; inserted: unknown[]; deleted: unknown[] }
  | { kind: "claim_check"; fullRefresh: boolean; refreshId: string | null }
  | { kind: "summary"; fullRefresh: boolean; refreshId: string | null; payload: Record<string, unknown> }
  | { kind: "none" };

const isObject = (x: unknown): x is Record<string, unknown> => typeof x === "object" && x !== null && !Array.isArray(x);

function refreshIdOf(payload: unknown, column: string | null): string | null {
  if (isObject(payload)) {
    for (const key of ["refresh_id", "pgt_id"]) {
      const value = payload[key];
      if (typeof value === "string" && value !== "") return value;
    }
  }
  return column;
}

export function summaryPayload(row: HeaderRow, streamTable: string, refreshId: string | null): Record<string, unknown> {
  return {
    outbox_id: safeOutboxId(row.id),
    inserted_count: Number(row.inserted_count),
    deleted_count: Number(row.deleted_count),
    refresh_id: refreshId,
    created_at: row.created_at instanceof Date ? row.created_at.toISOString() : row.created_at,
    stream_table: streamTable,
  };
}

/** Outbox ids are bigints; the envelope carries a JSON number, so refuse what a double cannot hold. */
export function safeOutboxId(id: string): number {
  const n = Number(id);
  if (!Number.isSafeInteger(n)) throw decodeError(`outbox id ${id} exceeds 2^53-1 and cannot be carried exactly in JSON`);
  return n;
}

function rowsOf(value: unknown, key: string, id: string): unknown[] | number {
  if (value === undefined || value === null) return [];
  if (Array.isArray(value)) return value;
  if (typeof value === "number") return value;
  throw decodeError(`outbox row id=${id}: "${key}" must be an array of rows or a count, got ${typeof value}`);
}

/** Decides how a header row is to be expanded. Throws a `decode` RelayError for unknown shapes. */
export function planFor(row: HeaderRow, streamTable: string, options: DecodeOptions): Plan {
  const payload = row.payload;
  const refreshId = refreshIdOf(payload, row.refresh_id);

  if (row.is_claim_check || (isObject(payload) && payload.claim_check === true)) {
    // 0.37–0.45 write claim-checks with a NULL payload holding the whole table: a snapshot.
    const fullRefresh = isObject(payload) ? payload.full_refresh === true : true;
    return { kind: "claim_check", fullRefresh, refreshId };
  }
  const summary = (fullRefresh: boolean): Plan =>
    options.summaryMessages ? { kind: "summary", fullRefresh, refreshId, payload: summaryPayload(row, streamTable, refreshId) } : { kind: "none" };
  if (payload === null || payload === undefined) return summary(false);
  if (Array.isArray(payload)) {
    // A refresh that emptied the stream table writes the snapshot `[]` (docs/pg_trickle.md):
    // no row says so, a full-refresh summary does (as for an emptied claim-check snapshot).
    if (payload.length === 0) return summary(true);
    return { kind: "rows", fullRefresh: true, refreshId, inserted: payload, deleted: [] };
  }
  if (isObject(payload)) {
    if (payload.v !== 1) {
      throw decodeError(`outbox row id=${row.id}: unsupported payload version ${JSON.stringify(payload.v ?? null)}`);
    }
    const inserted = rowsOf(payload.inserted, "inserted", row.id);
    const deleted = rowsOf(payload.deleted, "deleted", row.id);
    if (typeof inserted === "number" || typeof deleted === "number") {
      // pg_tide's count-only envelope: the rows are not in the message.
      return summary(false);
    }
    return { kind: "rows", fullRefresh: payload.full_refresh === true, refreshId, inserted, deleted };
  }
  throw decodeError(`outbox row id=${row.id}: payload is a JSON ${typeof payload}, expected an object or an array`);
}

/** Drops the extension's internal `__pgt_*` columns from a row object. */
export function cleanRow(row: unknown, keepInternal: boolean): unknown {
  if (keepInternal || !isObject(row)) return row;
  let hasInternal = false;
  for (const key in row) if (key.startsWith("__pgt_")) hasInternal = true;
  if (!hasInternal) return row;
  const out: Record<string, unknown> = {};
  for (const [k, val] of Object.entries(row)) if (!k.startsWith("__pgt_")) out[k] = val;
  return out;
}
