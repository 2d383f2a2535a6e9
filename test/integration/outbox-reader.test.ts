/**
 * The simple-mode outbox reader (src/backends/outbox/simple.ts) against PostgreSQL: rows whose
 * ids follow the last one read are handed out after one statement, without the writer check;
 * a hole in the ids still gets the check before the read, and is crossed only as before.
 */
import { afterAll, beforeAll, expect, test } from "bun:test";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { createStreamTable, enableOutbox, openInsert, writeV1Inline } from "../fixtures/outbox.ts";
import { findOutbox, type OutboxTarget } from "../../src/backends/outbox/resolve.ts";
import { SimpleReader } from "../../src/backends/outbox/simple.ts";
import type { Sql } from "../../src/db.ts";

let db: TestDatabase;

beforeAll(async () => {
  db = await testDatabase("outbox_reader");
});
afterAll(async () => {
  await db?.drop();
});

/** `sql`, noting the text of every tagged statement it runs. */
function recording(sql: Sql): { sql: Sql; statements: string[] } {
  const statements: string[] = [];
  const proxy = new Proxy(sql, {
    apply(target, thisArg, args: unknown[]) {
      const strings = args[0];
      if (Array.isArray(strings) && "raw" in strings) statements.push(strings.join("$"));
      return Reflect.apply(target as never, thisArg, args);
    },
  });
  return { sql: proxy, statements };
}

const writerChecks = (statements: string[]) => statements.filter((s) => s.includes("pg_locks")).length;

/** A fresh outbox and a reader of it whose statements are recorded. */
async function setup(name: string) {
  await createStreamTable(db.sql, `public.${name}`, "id int primary key");
  const { outboxTable } = await enableOutbox(db.sql, `public.${name}`);
  const target: OutboxTarget = (await findOutbox(db.sql, name, `public.${name}`))!;
  const { sql, statements } = recording(db.sql);
  return { target, outboxTable, statements, reader: new SimpleReader(sql, 100) };
}

const write = (outboxTable: string, id: number) => writeV1Inline(db.sql, outboxTable, { inserted: [{ id }], deleted: [] });

test("rows that follow the last one read without a hole are read in one statement, without the writer check", async () => {
  const { target, outboxTable, statements, reader } = await setup("contiguous");
  const ids = [await write(outboxTable, 1), await write(outboxTable, 2), await write(outboxTable, 3)];
  expect((await reader.poll(target)).map((r) => r.id)).toEqual(ids);
  expect((await reader.poll(target)).map((r) => r.id)).toEqual([]);
  const next = await write(outboxTable, 4);
  expect((await reader.poll(target)).map((r) => r.id)).toEqual([next]);
  expect(statements).toHaveLength(3);
  expect(writerChecks(statements)).toBe(0);
});

test("a hole left by an open transaction: the writer check runs before the read, and the rows after the hole wait for it", async () => {
  const { target, outboxTable, statements, reader } = await setup("holes");
  const first = await write(outboxTable, 1);
  const open = await openInsert(db.sql, outboxTable, [{ id: 2 }]);
  const high = await write(outboxTable, 3);

  // The read sees first, (hole), high: it is made again after the writer check, which finds the
  // open transaction, so only the rows before the hole are handed out.
  expect((await reader.poll(target)).map((r) => r.id)).toEqual([first]);
  expect(reader.blockedOnGap).toBe(true);
  expect(writerChecks(statements)).toBe(1);
  // Stopped at a hole: the next poll goes the careful way at once.
  expect(await reader.poll(target)).toEqual([]);
  expect(writerChecks(statements)).toBe(2);

  await open.end(true);
  expect((await reader.poll(target)).map((r) => r.id)).toEqual([open.id, high]);
  expect(reader.blockedOnGap).toBe(false);
  expect(writerChecks(statements)).toBe(3);
  // Past the hole, contiguous again: no check.
  const after = await write(outboxTable, 4);
  expect((await reader.poll(target)).map((r) => r.id)).toEqual([after]);
  expect(writerChecks(statements)).toBe(3);
});

test("a hole left by a rolled-back insert is crossed in the same poll once no writer can fill it", async () => {
  const { target, outboxTable, statements, reader } = await setup("rolled_back");
  const first = await write(outboxTable, 1);
  await (await openInsert(db.sql, outboxTable, [{ id: 2 }])).end(false);
  const third = await write(outboxTable, 3);
  expect((await reader.poll(target)).map((r) => r.id)).toEqual([first, third]);
  expect(BigInt(third) - BigInt(first)).toBe(2n);
  expect(writerChecks(statements)).toBe(1);
});
