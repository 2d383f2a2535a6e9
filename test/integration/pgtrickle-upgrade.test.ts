/**
 * A running relay across `ALTER EXTENSION pg_trickle UPDATE` from 0.39.0 to 0.45.0. The update
 * needs the 0.45.0 library loaded, and the library is preloaded, so the server restarts with
 * the 0.45.0 tree on the same data directory first (docs/pg_trickle.md). The test runs its own
 * cluster: the shared ones must keep their versions.
 */
import { afterAll, expect, test } from "bun:test";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { readJsonLines } from "../helpers/messages.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { privateCluster, realStreamTable, type RealStreamTable } from "../helpers/pgtrickle.ts";
import { eventually, RunningRelay } from "../helpers/relay.ts";

const output = join(mkdtempSync(join(tmpdir(), "relay-pgtrickle-upgrade-")), "upgraded.jsonl");
const cleanups: (() => Promise<unknown>)[] = [];
afterAll(async () => {
  for (const c of cleanups.reverse()) await c().catch(() => {});
});

const deliveredKeys = () => readJsonLines<{ dedup_key: string }>(output).map((l) => l.dedup_key);

/** Every message the outbox holds: one per element of each snapshot payload. */
async function expectedKeys(db: TestDatabase, st: RealStreamTable): Promise<string[]> {
  const rows = await db.sql<{ id: string; n: number }[]>`
    SELECT id::text, jsonb_array_length(payload) AS n FROM ${db.sql(`pgtrickle.${st.outboxTable}`)} ORDER BY id`;
  return rows.flatMap((r) => Array.from({ length: r.n }, (_, i) => `${st.outboxTable}:${r.id}:${i}`));
}

async function changes(db: TestDatabase, st: RealStreamTable, ids: number[]): Promise<void> {
  for (const id of ids) {
    await db.sql.unsafe(`INSERT INTO ${st.source} VALUES (${id}, ${id * 10})`);
    await db.sql`SELECT pgtrickle.refresh_stream_table(${st.name})`;
  }
}

test("a relay running against 0.39.0 keeps relaying while the extension is updated to 0.45.0: nothing lost or repeated", async () => {
  const cluster = await privateCluster("0.39.0");
  cleanups.push(() => cluster.destroy());
  const db = await testDatabase("upgrade", { fixture: false, adminUrl: cluster.url, setup: (sql) => sql`CREATE EXTENSION pg_trickle` });
  cleanups.push(() => db.drop());
  const version = async () => (await db.sql<{ v: string }[]>`SELECT extversion AS v FROM pg_extension WHERE extname = 'pg_trickle'`)[0]!.v;
  expect(await version()).toBe("0.39.0");

  const st = await realStreamTable(db.sql, "upgraded");
  await db.sql`SELECT pgtrickle.set_relay_outbox('upgraded', ${st.name}, NULL, ${db.sql.json({ type: "file", output })})`;
  const relay = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0"]);
  cleanups.push(() => relay.stop("SIGKILL"));
  await relay.waitForLog(/\[upgraded\] started/);

  await changes(db, st, [1, 2, 3]);
  const before = await expectedKeys(db, st);
  await eventually(() => deliveredKeys().length === before.length, 30_000, "the 0.39.0 changes");

  await cluster.restart("0.45.0");
  await db.sql`ALTER EXTENSION pg_trickle UPDATE`;
  expect(await version()).toBe("0.45.0");

  await changes(db, st, [4, 5]);
  const all = await expectedKeys(db, st);
  expect(all.length).toBe(before.length + 4 + 5);
  await eventually(() => deliveredKeys().length >= all.length, 90_000, "the 0.45.0 changes, after the relay reconnected");
  await Bun.sleep(500); // a repeat would come right after
  expect(deliveredKeys()).toEqual(all);
  expect(await relay.stop("SIGTERM")).toBe(0);
}, 180_000);
