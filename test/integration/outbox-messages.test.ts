/**
 * The messages of inline outbox change sets (src/backends/outbox/messages.ts, source.ts) against
 * PostgreSQL: deletes before inserts with the dedup keys of docs/interface.md §6.2, cut into
 * batches of max_batch_messages, and a restart inside a change set resuming after the messages
 * that acknowledged batches carried — on either side of the deletes/inserts boundary.
 */
import { afterAll, beforeAll, expect, test } from "bun:test";
import * as v from "valibot";
import outboxSource from "../../src/backends/outbox/source.ts";
import { OutboxSourceConfig } from "../../src/backends/outbox/config.ts";
import type { Batch } from "../../src/backends/types.ts";
import { backendContext } from "../helpers/backend.ts";
import { createStreamTable, enableOutbox, writeV1Inline } from "../fixtures/outbox.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";

let db: TestDatabase;

beforeAll(async () => {
  db = await testDatabase("outbox_messages");
});
afterAll(async () => {
  await db?.drop();
});

/**
 * The batches with messages that one pass of a new source of pipeline `name` hands out (drain
 * mode); a batch that only moves the offset past a row whose messages went out already is left out.
 */
async function pass(name: string): Promise<Batch[]> {
  const source = outboxSource.create(
    v.parse(OutboxSourceConfig, { outbox: `public.${name}`, max_batch_messages: 2, start_position: "earliest" }),
    backendContext(name, { sql: db.sql, drain: true }),
  );
  await source.start();
  const batches: Batch[] = [];
  try {
    for await (const b of source.batches(new AbortController().signal)) batches.push(b);
  } finally {
    await source.close();
  }
  return batches.filter((b) => b.messages.length > 0);
}

const keys = (batches: Batch[]) => batches.map((b) => b.messages.map((m) => `${m.op}:${m.dedup_key.split(":").pop()}:${JSON.stringify(m.payload)}`));

/** An outbox with one change set of 3 deletes and 4 inserts, then one of a single insert (it joins the first's last batch). */
async function setup(name: string) {
  await createStreamTable(db.sql, `public.${name}`, "k int primary key");
  const { outboxTable } = await enableOutbox(db.sql, `public.${name}`);
  await writeV1Inline(db.sql, outboxTable, { deleted: [{ k: 1 }, { k: 2 }, { k: 3 }], inserted: [{ k: 1 }, { k: 2 }, { k: 4 }, { k: 5 }] });
  await writeV1Inline(db.sql, outboxTable, { deleted: [], inserted: [{ k: 9 }] });
}

test("an inline change set: deletes first (indexes after the inserts'), then inserts, cut every max_batch_messages", async () => {
  await setup("inline_order");
  expect(keys(await pass("inline_order"))).toEqual([
    ['delete:4:{"k":1}', 'delete:5:{"k":2}'],
    ['delete:6:{"k":3}', 'insert:0:{"k":1}'],
    ['insert:1:{"k":2}', 'insert:2:{"k":4}'],
    ['insert:3:{"k":5}', 'insert:0:{"k":9}'],
  ]);
});

test("a restart inside an inline change set resumes after what the acknowledged batches carried, among the deletes or the inserts", async () => {
  await setup("inline_resume");
  const first = await pass("inline_resume");
  expect(await first[0]!.ack()).toBe(true); // 2 of its 3 deletes delivered
  expect(keys(await pass("inline_resume"))).toEqual([
    ['delete:6:{"k":3}', 'insert:0:{"k":1}'],
    ['insert:1:{"k":2}', 'insert:2:{"k":4}'],
    ['insert:3:{"k":5}', 'insert:0:{"k":9}'],
  ]);
  const second = await pass("inline_resume");
  expect(await second[0]!.ack()).toBe(true); // the deletes and the first insert delivered
  expect(keys(await pass("inline_resume"))).toEqual([['insert:1:{"k":2}', 'insert:2:{"k":4}'], ['insert:3:{"k":5}', 'insert:0:{"k":9}']]);
  const third = await pass("inline_resume");
  expect(await third[0]!.ack()).toBe(true);
  expect(await third[1]!.ack()).toBe(true); // the first change set done, the second's only message delivered
  expect(keys(await pass("inline_resume"))).toEqual([]);
});
