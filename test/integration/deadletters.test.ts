import { afterAll, beforeAll, expect, test } from "bun:test";
import { messageFromStored, replayRequests, storedMessage, writeDeadLetters } from "../../src/deadletters.ts";
import type { Message } from "../../src/message.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";

let db: TestDatabase;
beforeAll(async () => {
  db = await testDatabase("deadletters", { fixture: false });
});
afterAll(async () => {
  await db?.drop();
});

const message: Message = {
  dedup_key: "k1",
  subject: "orders.event",
  payload: { note: "a\u0000b" },
  op: "event",
  is_full_refresh: false,
  outbox_id: null,
  refresh_id: null,
  context: { pipeline: "p" },
  inbound: { source: "kafka:orders", aggregate_id: "7", trace_id: null },
};

test("a message holding U+0000 (which jsonb refuses) still reaches the dead-letter table and replays unchanged", async () => {
  await writeDeadLetters(db.sql, "p", "reverse", [
    { dedup_key: "k1", outbox_id: null, message: storedMessage(message), error: "invalid byte \u0000 in text", kind: "inbox_permanent" },
  ]);
  const [row] = await db.sql<{ error: string }[]>`SELECT error FROM pgtrickle.relay_dead_letters WHERE dedup_key = 'k1'`;
  expect(row!.error).toBe("invalid byte \\0 in text");
  await db.sql`SELECT pgtrickle.replay_relay_dead_letters('p')`;
  const [replay] = await replayRequests(db.sql, "p", "reverse", 10);
  expect(messageFromStored(replay!.message)).toEqual(message);
});

test("a second failure of the same message bumps attempts instead of adding a row", async () => {
  const letter = { dedup_key: "k2", outbox_id: "5", message: { a: 1 }, error: "e1", kind: "sink_permanent" as const };
  await writeDeadLetters(db.sql, "p", "forward", [letter]);
  await writeDeadLetters(db.sql, "p", "forward", [{ ...letter, error: "e2" }]);
  const rows = await db.sql`SELECT attempts, error, outbox_id::text AS outbox_id FROM pgtrickle.relay_dead_letters WHERE dedup_key = 'k2'`;
  expect([...rows]).toEqual([{ attempts: 2, error: "e2", outbox_id: "5" }]);
});
