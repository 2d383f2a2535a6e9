/**
 * The whole round trip: outbox → forward pipeline → NATS JetStream → reverse pipeline → inbox, in
 * one relay process. Every outbox row must arrive exactly once, under its forward dedup key.
 */
import { afterAll, beforeAll, expect, test } from "bun:test";
import { connect as natsConnect } from "nats";
import { createStreamTable, enableOutbox, writeV1Inline } from "../fixtures/outbox.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { eventually, RunningRelay } from "../helpers/relay.ts";
import { NATS_URL, requireServer } from "../helpers/servers.ts";

const run = Math.random().toString(36).slice(2, 8);
const stream = `CHAIN_${run}`;
let db: TestDatabase;

beforeAll(async () => {
  await requireServer("postgres");
  await requireServer("nats");
  db = await testDatabase("chain");
});
afterAll(async () => {
  const nc = await natsConnect({ servers: NATS_URL });
  await (await nc.jetstreamManager()).streams.delete(stream).catch(() => {});
  await nc.close();
  await db?.drop();
});

test("outbox → NATS → inbox carries every row once, with the forward keys intact", async () => {
  await createStreamTable(db.sql, "public.chained", "id int primary key");
  const { outboxTable } = await enableOutbox(db.sql, "public.chained");
  const forward = { type: "nats", url: NATS_URL, stream, create_stream: true, subject_template: `chain${run}.{stream_table}.{op}` };
  const reverse = { type: "nats", url: NATS_URL, stream, subject: `chain${run}.>`, durable_name: `chain-${run}` };
  await db.sql`SELECT pgtrickle.set_relay_outbox('chain_out', 'public.chained', NULL, ${db.sql.json(forward)})`;
  await db.sql`SELECT pgtrickle.set_relay_inbox('chain_in', 'chain_inbox', ${db.sql.json(reverse)})`;
  const ids: string[] = [];
  for (let i = 1; i <= 20; i++) {
    ids.push(await writeV1Inline(db.sql, outboxTable, { inserted: [{ id: i }, { id: 100 + i }], deleted: i % 5 === 0 ? [{ id: i - 1 }] : [] }));
  }
  const expected = ids.flatMap((id, n) => [0, 1, ...((n + 1) % 5 === 0 ? [2] : [])].map((k) => `${outboxTable}:${id}:${k}`)).sort();

  // The reverse pipeline may start before the forward one created the stream: it fails, and is
  // tried again at the next discovery interval (1 s here).
  const relay = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0", "--discovery-interval", "1"]);
  try {
    const count = async () => (await db.sql<{ n: number }[]>`SELECT count(*)::int AS n FROM pgtrickle.chain_inbox`.catch(() => [{ n: 0 }]))[0]!.n;
    await eventually(async () => (await count()) >= expected.length, 30_000, `${expected.length} inbox rows`).catch((err) => {
      throw new Error(`${err.message}; relay said:\n${relay.stderr}`);
    });
    // A restart replays nothing new: the reverse consumer acknowledged, the forward offset moved.
    await relay.stop("SIGTERM");
    const again = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0"]);
    await again.waitForLog(/\[chain_in\] started/);
    await Bun.sleep(1000);
    await again.stop("SIGTERM");
  } finally {
    if (relay.proc.exitCode === null) await relay.stop("SIGKILL");
  }
  const rows = await db.sql<{ event_id: string; event_type: string; payload: { dedup_key: string; op: string; payload: { id: number } } }[]>`
    SELECT event_id, event_type, payload FROM pgtrickle.chain_inbox ORDER BY event_id`;
  expect(rows.map((r) => r.event_id)).toEqual(expected);
  for (const r of rows) {
    expect(r.payload.dedup_key).toBe(r.event_id);
    expect(r.event_type).toBe(`chain${run}.chained.${r.payload.op}`);
  }
}, 90_000);
