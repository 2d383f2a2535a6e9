import type { TestDatabase } from "./pg.ts";
import { relayOnce, type RunningRelay } from "./relay.ts";

/** The inbox columns reverse-pipeline tests compare (docs/interface.md §6.6). */
export interface InboxRow {
  event_id: string;
  event_type: string | null;
  source: string | null;
  aggregate_id: string | null;
  payload: any;
  trace_id: string | null;
}

/** Registers reverse pipeline `name` → `inbox` with `source` as its config. */
export async function setRelayInbox(db: TestDatabase, name: string, inbox: string, source: Record<string, unknown>): Promise<void> {
  await db.sql`SELECT pgtrickle.set_relay_inbox(${name}, ${inbox}, ${db.sql.json(source as never)})`;
}

/**
 * `pgtrickle-relay drain --pipeline name` against `db`, with `extra` arguments (tests that expect
 * dead letters pass `--allow-dead-letters`, or expect exit 4).
 */
export const drainPipeline = (db: TestDatabase, name: string, extra: string[] = [], timeoutMs?: number) =>
  relayOnce(["drain", "--postgres-url", db.url, "--pipeline", name, ...extra], {}, timeoutMs);

/** The inbox's rows, ordered by event_id. */
export async function inboxRows(db: TestDatabase, inbox: string): Promise<InboxRow[]> {
  const result = await db.sql.unsafe(`SELECT event_id, event_type, source, aggregate_id, payload, trace_id FROM pgtrickle."${inbox}" ORDER BY event_id`);
  return result.map((r) => ({ ...r }) as unknown as InboxRow);
}

/** Rows in the inbox (0 while the relay has not created it yet). */
export async function inboxCount(db: TestDatabase, inbox: string): Promise<number> {
  const [exists] = await db.sql`SELECT to_regclass(${`pgtrickle."${inbox}"`}) IS NOT NULL AS ok`;
  if (!(exists as { ok: boolean }).ok) return 0;
  const [row] = await db.sql.unsafe(`SELECT count(*)::int AS n FROM pgtrickle."${inbox}"`);
  return (row as unknown as { n: number }).n;
}

export interface DeadLetterRow {
  dedup_key: string;
  error_kind: string;
  attempts: number;
  error: string;
}

/** The pipeline's dead letters, ordered by dedup key. */
export async function deadLetters(db: TestDatabase, pipeline: string): Promise<DeadLetterRow[]> {
  const result = await db.sql`SELECT dedup_key, error_kind, attempts, error FROM pgtrickle.relay_dead_letters WHERE pipeline = ${pipeline} ORDER BY dedup_key`;
  return result.map((r) => ({ ...r }) as DeadLetterRow);
}

/** An inbox that refuses rows whose payload has a `bad` field (as a bring-your-own table with a CHECK might). */
export async function pickyInbox(db: TestDatabase, inbox: string): Promise<void> {
  await db.sql`SELECT pgtrickle.create_inbox(${inbox})`;
  await db.sql.unsafe(`ALTER TABLE pgtrickle."${inbox}" ADD CONSTRAINT no_bad CHECK (NOT (payload ? 'bad'))`);
}

/** The inbox refuses events whose payload has a `poison` key (a CHECK constraint: SQLSTATE 23514). */
export async function poisonable(db: TestDatabase, inbox: string): Promise<void> {
  await db.sql.unsafe(`ALTER TABLE pgtrickle.${inbox} ADD CONSTRAINT no_poison CHECK (NOT (payload ? 'poison'))`);
}

/** Only `names` run when a `run` relay starts (other tests' pipelines stay idle). */
export async function enableOnly(db: TestDatabase, ...names: string[]): Promise<void> {
  await db.sql`UPDATE pgtrickle.relay_inbox_config SET enabled = (name = ANY(${names}))`;
  await db.sql`UPDATE pgtrickle.relay_outbox_config SET enabled = false`;
}

/** No reverse pipeline runs any more (after each test that starts its own relay). */
export async function disableInboxes(db: TestDatabase): Promise<void> {
  await db.sql`UPDATE pgtrickle.relay_inbox_config SET enabled = false WHERE enabled`;
}

/** Kills every relay of the file still running (afterAll). */
export async function killRelays(running: RunningRelay[]): Promise<void> {
  for (const r of running) if (r.proc.exitCode === null) await r.stop("SIGKILL");
}
