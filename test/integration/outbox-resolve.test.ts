/**
 * Finding a pipeline's outbox (src/backends/outbox/resolve.ts) against PostgreSQL: the outbox
 * table, its id sequence, and the columns of its claim-check delta table — the shipped ones, the
 * legacy design's, or none when the table is missing or has neither (docs/interface.md §2.4).
 */
import { afterAll, beforeAll, expect, test } from "bun:test";
import { findOutbox } from "../../src/backends/outbox/resolve.ts";
import { createStreamTable, enableOutbox, ident } from "../fixtures/outbox.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";

let db: TestDatabase;

beforeAll(async () => {
  db = await testDatabase("outbox_resolve");
});
afterAll(async () => {
  await db?.drop();
});

test("the delta table's columns: shipped, legacy, none when it has neither or is missing", async () => {
  await createStreamTable(db.sql, "public.resolved", "id int primary key");
  const { outboxTable, deltaTable } = await enableOutbox(db.sql, "public.resolved");
  const delta = `pgtrickle.${ident(deltaTable)}`;
  const found = await findOutbox(db.sql, "p", "public.resolved");
  expect(found).toMatchObject({ schema: "public", streamTable: "resolved", outboxTable, deltaTable, deltaColumns: { op: "row_op", data: "row_data", legacyOps: false } });
  expect(found!.idSequence).toContain(outboxTable);

  await db.sql.unsafe(`DROP TABLE ${delta}; CREATE TABLE ${delta} (outbox_id bigint, op text, payload jsonb, row_num bigint)`);
  expect((await findOutbox(db.sql, "p", "public.resolved"))!.deltaColumns).toEqual({ op: "op", data: "payload", legacyOps: true });

  await db.sql.unsafe(`ALTER TABLE ${delta} DROP COLUMN payload`);
  expect((await findOutbox(db.sql, "p", "public.resolved"))!.deltaColumns).toBeNull();
  await db.sql.unsafe(`DROP TABLE ${delta}`);
  expect((await findOutbox(db.sql, "p", "public.resolved"))!.deltaColumns).toBeNull();
});
