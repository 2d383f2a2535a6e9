import { createHash } from "node:crypto";
import type { DeadLetter, Direction } from "./backends/types.ts";
import type { Sql } from "./db.ts";
import type { Message } from "./message.ts";
import { toEnvelope } from "./message.ts";
import { nestedTooDeep } from "./inbound.ts";
import { redact } from "./redact.ts";

/**
 * Writes undeliverable messages to pgtrickle.relay_dead_letters, in one statement, before the
 * batch is acknowledged: nothing is dropped. A message that fails again bumps `attempts`.
 */
export async function writeDeadLetters(sql: Sql, pipeline: string, direction: Direction, letters: DeadLetter[]): Promise<void> {
  if (letters.length === 0) return;
  const rows = letters.map((d) => ({
    pipeline,
    direction,
    dedup_key: storableKey(d.dedup_key),
    outbox_id: d.outbox_id,
    message: storable(d.message),
    error: storableText(redact(d.error)),
    error_kind: d.kind,
  }));
  await sql`
    INSERT INTO pgtrickle.relay_dead_letters (pipeline, direction, dedup_key, outbox_id, message, error, error_kind)
    SELECT pipeline, direction, dedup_key, outbox_id::bigint, message, error, error_kind
    FROM jsonb_to_recordset(${sql.json(rows as never)}::jsonb)
      AS x(pipeline text, direction text, dedup_key text, outbox_id text, message jsonb, error text, error_kind text)
    ON CONFLICT (pipeline, direction, dedup_key) DO UPDATE
      SET attempts = relay_dead_letters.attempts + 1, last_seen_at = now(), error = EXCLUDED.error,
          message = EXCLUDED.message, error_kind = EXCLUDED.error_kind, resolved_at = NULL, replay_requested_at = NULL`;
}

/**
 * jsonb cannot hold the character U+0000 nor a lone UTF-16 surrogate, and PostgreSQL refuses
 * values nested deeper than its stack allows (docs/LIMITS.md); a message carrying any of them
 * (often the very reason it was rejected) must still reach the dead-letter table: such a message
 * is stored as base64 of its JSON text, which messageFromStored() reads back unchanged.
 * JSON.stringify writes a lone surrogate, and only a lone one, as a `\udXXX` escape.
 */
function storable(message: unknown): unknown {
  const json = JSON.stringify(message) ?? "null";
  const refusedByJsonb = json.includes("\\u0000") || /\\ud[89a-f][0-9a-f]{2}/i.test(json) || nestedTooDeep(json, message);
  return refusedByJsonb ? { encoding: "base64-json", data: Buffer.from(json).toString("base64") } : message;
}

function fromStorable(stored: unknown): unknown {
  const s = stored as { encoding?: unknown; data?: unknown } | null;
  return s?.encoding === "base64-json" && typeof s.data === "string" ? JSON.parse(Buffer.from(s.data, "base64").toString()) : stored;
}

/**
 * text columns refuse U+0000 and the row travels as JSON, where a lone surrogate is refused: an
 * error message or key keeps a visible marker instead (the stored message keeps the original).
 */
const storableText = (text: string) => text.replace(/\u0000/g, "\\0").replace(/\p{Surrogate}/gu, "\uFFFD");

/** Longest dedup_key stored as it is, in UTF-8 bytes; the unique index on it refuses entries over about 2,700. */
const MAX_STORED_KEY_BYTES = 1000;

/**
 * A key too long for the table's unique index (a producer's key of several kilobytes is often
 * why the inbox refused the message: docs/LIMITS.md) is stored as its start and its SHA-256, the
 * same for every failure of the same message; the stored message keeps the whole key.
 */
function storableKey(key: string): string {
  const text = storableText(key);
  if (Buffer.byteLength(text) <= MAX_STORED_KEY_BYTES) return text;
  return `${text.slice(0, 200)}…sha256:${createHash("sha256").update(key).digest("hex")}`;
}

/** The form a rejected message is stored in: its envelope plus the template context. */
export function storedMessage(m: Message): unknown {
  return { ...toEnvelope(m), context: m.context, ...(m.headers ? { headers: m.headers } : {}), ...(m.inbound ? { inbound: m.inbound } : {}) };
}

export function messageFromStored(stored: unknown): Message | null {
  const s = stored as Partial<Message> | null;
  if (!s || typeof s.dedup_key !== "string" || typeof s.op !== "string") return null;
  return {
    dedup_key: s.dedup_key,
    subject: s.subject ?? "",
    payload: s.payload ?? null,
    op: s.op,
    is_full_refresh: s.is_full_refresh === true,
    outbox_id: typeof s.outbox_id === "number" ? s.outbox_id : null,
    refresh_id: s.refresh_id ?? null,
    context: s.context ?? { pipeline: "" },
    ...(s.headers ? { headers: s.headers } : {}),
    ...(s.inbound ? { inbound: s.inbound } : {}),
  };
}

export interface ReplayRow {
  id: string;
  dedup_key: string;
  error_kind: string;
  message: unknown;
}

/** Dead letters an operator asked to replay (pgtrickle.replay_relay_dead_letters). */
export async function replayRequests(sql: Sql, pipeline: string, direction: Direction, limit: number): Promise<ReplayRow[]> {
  const rows = await sql<ReplayRow[]>`
    SELECT id::text AS id, dedup_key, error_kind, message FROM pgtrickle.relay_dead_letters
    WHERE pipeline = ${pipeline} AND direction = ${direction} AND replay_requested_at IS NOT NULL AND resolved_at IS NULL
    ORDER BY id LIMIT ${limit}`;
  return rows.map((r) => ({ ...r, message: fromStorable(r.message) }));
}

export async function markReplayed(sql: Sql, ids: string[]): Promise<void> {
  if (ids.length === 0) return;
  await sql`UPDATE pgtrickle.relay_dead_letters SET resolved_at = now() WHERE id = ANY(${ids}::bigint[])`;
}

export async function markReplayFailed(sql: Sql, id: string, error: string): Promise<void> {
  await sql`
    UPDATE pgtrickle.relay_dead_letters
    SET replay_requested_at = NULL, attempts = attempts + 1, last_seen_at = now(), error = ${redact(error)}
    WHERE id = ${id}::bigint`;
}
