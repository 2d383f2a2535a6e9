import { createHash } from "node:crypto";
import { expect } from "bun:test";
import type { TestDatabase } from "./pg.ts";
import { deadLetters, inboxRows } from "./reverse.ts";

/**
 * Message bodies no inbox can ever take, each with the reason its dead letter must give
 * (docs/LIMITS.md). Every one is valid JSON text, so each source delivers it as it would any
 * event; before issue 10 the first two blocked every reverse pipeline for good.
 */
export const POISONS: { label: string; body: string; reason: RegExp }[] = [
  // The reproduction: PostgreSQL's jsonb parser runs out of stack (SQLSTATE 54001).
  { label: "nested 30,000 deep", body: "[".repeat(30000) + "]".repeat(30000), reason: /JSON nested deeper than 1000 levels/ },
  // A lone UTF-16 surrogate: jsonb refuses it (22P02), and so would the dead-letter table.
  { label: "lone surrogate", body: '{"event_type":"\\ud800","n":-1}', reason: /SQLSTATE 22P02/ },
  // U+0000: jsonb refuses it (22P05).
  { label: "NUL character", body: '{"text":"a\\u0000b","n":-2}', reason: /SQLSTATE 22P05/ },
];

/**
 * Text too long for a btree index entry (SQLSTATE 54000), e.g. as the event_id of the inbox: 12,800
 * hex digits, too many even once compressed. LONG_KEY_POISON carries it as the body's dedup key.
 */
export const TOO_LONG_KEY = Array.from({ length: 400 }, (_, i) => createHash("md5").update(String(i)).digest("hex")).join("");
export const LONG_KEY_POISON = { label: "12,800-character key", body: JSON.stringify({ dedup_key: TOO_LONG_KEY, n: -3 }), reason: /SQLSTATE 54000/ };

/** `{"n": i}` bodies with the poisons between them: ok, ok, poison, ok, poison, ok, …, ok, ok. */
export function poisonedStream(poisons = POISONS): { bodies: string[]; valid: number } {
  const ok = (n: number) => JSON.stringify({ n });
  const bodies = [ok(0), ok(1)];
  let n = 2;
  for (const p of poisons) bodies.push(p.body, ok(n++));
  bodies.push(ok(n++));
  return { bodies, valid: n };
}

/**
 * Every valid event (n = 0…valid-1) is in the inbox, and each poison is one dead letter of
 * `pipeline` with its reason, of kind `inbox_permanent` unless `kinds` names another by label.
 */
export async function expectPoisonIsolated(
  db: TestDatabase,
  pipeline: string,
  inbox: string,
  valid: number,
  poisons = POISONS,
  kinds: Record<string, string> = {},
): Promise<void> {
  const landed = (await inboxRows(db, inbox)).map((r) => (r.payload as { n: number }).n).sort((a, b) => a - b);
  expect(landed).toEqual(Array.from({ length: valid }, (_, i) => i));
  const letters = await deadLetters(db, pipeline);
  expect(letters).toHaveLength(poisons.length);
  for (const p of poisons) {
    expect(letters.filter((d) => p.reason.test(d.error)).map((d) => d.error_kind)).toEqual([kinds[p.label] ?? "inbox_permanent"]);
  }
}
