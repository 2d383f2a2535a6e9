/**
 * The outbox side of the relay against the real pg_trickle extension, on both builds that
 * scripts/services runs (0.45.0 and 0.39.0, PostgreSQL 18.6): stream tables refreshed by
 * refresh_stream_table and by the scheduler, inline snapshots, claim-check change sets, FULL
 * refresh mode, NOTIFY from the background worker, consumer groups, hot reload of the
 * extension-owned relay catalog, and the status / check / drain commands. What the extension
 * was seen to do is written in docs/pg_trickle.md.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connect } from "../../src/db.ts";
import { readJsonLines } from "../helpers/messages.ts";
import type { TestDatabase } from "../helpers/pg.ts";
import { outboxRows, pgTrickleDatabase, PGTRICKLE_VERSIONS, realStreamTable, type RealStreamTable } from "../helpers/pgtrickle.ts";
import { eventually, relayOnce, RunningRelay } from "../helpers/relay.ts";

interface Line {
  dedup_key: string;
  payload: Record<string, unknown>;
  op: string;
  is_full_refresh: boolean;
  outbox_id: number | null;
}

const readLines = (path: string) => readJsonLines<Line>(path);

const payloads = (lines: Line[]) => lines.map((l) => l.payload).sort((a, b) => Number(a.id) - Number(b.id));

describe.each(PGTRICKLE_VERSIONS)("pg_trickle %s", (version) => {
  let db: TestDatabase;
  const dir = mkdtempSync(join(tmpdir(), `relay-pgtrickle-${version}-`));

  beforeAll(async () => {
    db = await pgTrickleDatabase("forward", version);
  });
  afterAll(async () => {
    await db?.drop();
  });

  /** A file pipeline `name` for the stream table; `source` options merged into the stored config. */
  async function pipeline(name: string, st: RealStreamTable, source: Record<string, unknown> = {}, group: string | null = null) {
    const output = join(dir, `${name}.jsonl`);
    await db.sql`SELECT pgtrickle.set_relay_outbox(${name}, ${st.name}, ${group}, ${db.sql.json({ type: "file", output })})`;
    if (Object.keys(source).length > 0) {
      await db.sql`UPDATE pgtrickle.relay_outbox_config SET config = jsonb_set(config, '{source}', config->'source' || ${db.sql.json(source as never)}) WHERE name = ${name}`;
    }
    return output;
  }

  const drain = (name: string) => relayOnce(["drain", "--postgres-url", db.url, "--pipeline", name]);
  const refresh = (st: RealStreamTable) => db.sql`SELECT pgtrickle.refresh_stream_table(${st.name})`;

  test("refresh_stream_table: an inline snapshot with __pgt_* columns is relayed row by row, the internal columns stripped", async () => {
    const st = await realStreamTable(db.sql, "inline");
    await db.sql.unsafe(`INSERT INTO ${st.source} VALUES (1, 10), (2, 20)`);
    await refresh(st);
    const [first] = await outboxRows(db.sql, st);
    expect(first).toMatchObject({ inserted_count: "2", deleted_count: "0", is_claim_check: false });
    expect(Array.isArray(first!.payload)).toBe(true);
    expect(Object.keys((first!.payload as object[])[0]!)).toContain("__pgt_row_id");

    const output = await pipeline("inline", st);
    expect((await drain("inline")).exitCode).toBe(0);
    const lines = readLines(output);
    expect(payloads(lines)).toEqual([{ id: 1, amount: 10 }, { id: 2, amount: 20 }]);
    expect(lines.every((l) => l.op === "insert" && l.is_full_refresh)).toBe(true);
    expect(lines.map((l) => l.dedup_key).sort()).toEqual([`${st.outboxTable}:${first!.id}:0`, `${st.outboxTable}:${first!.id}:1`]);

    // A refresh that changes nothing writes no outbox row; the next change is a new snapshot.
    await refresh(st);
    expect(await outboxRows(db.sql, st)).toHaveLength(1);
    await db.sql.unsafe(`UPDATE ${st.source} SET amount = 21 WHERE id = 2`);
    await refresh(st);
    expect((await drain("inline")).exitCode).toBe(0);
    expect(payloads(readLines(output).slice(2))).toEqual([{ id: 1, amount: 10 }, { id: 2, amount: 21 }]);
    // Nothing is delivered twice.
    expect((await drain("inline")).exitCode).toBe(0);
    expect(readLines(output)).toHaveLength(4);

    // Emptying the stream table writes the snapshot [] (counted as one insert): one summary.
    await db.sql.unsafe(`DELETE FROM ${st.source}`);
    await refresh(st);
    const emptied = (await outboxRows(db.sql, st)).at(-1)!;
    expect(emptied).toMatchObject({ inserted_count: "1", deleted_count: "0", payload: [] });
    expect((await drain("inline")).exitCode).toBe(0);
    expect(readLines(output).slice(4).map((l) => [l.outbox_id, l.op, l.is_full_refresh])).toEqual([[Number(emptied.id), "summary", true]]);
  });

  test("FULL refresh mode: inserted_count is the table's row count and the snapshot is relayed", async () => {
    const st = await realStreamTable(db.sql, "full_mode", { mode: "FULL" });
    await db.sql.unsafe(`INSERT INTO ${st.source} VALUES (1, 1), (2, 2), (3, 3)`);
    await refresh(st);
    await db.sql.unsafe(`DELETE FROM ${st.source} WHERE id = 3`);
    await refresh(st);
    const rows = await outboxRows(db.sql, st);
    expect(rows.map((r) => r.inserted_count)).toEqual(["3", "2"]);
    const output = await pipeline("full_mode", st);
    expect((await drain("full_mode")).exitCode).toBe(0);
    const lines = readLines(output);
    expect(lines).toHaveLength(5);
    expect(payloads(lines.filter((l) => l.outbox_id === Number(rows[1]!.id)))).toEqual([{ id: 1, amount: 1 }, { id: 2, amount: 2 }]);
  });

  test("claim-check (threshold lowered by ALTER SYSTEM): payload NULL, the snapshot in outbox_delta_rows, relayed in full, released only on request", async () => {
    const st = await realStreamTable(db.sql, "claim");
    await db.sql.unsafe(`INSERT INTO ${st.source} SELECT g, g * 10 FROM generate_series(1, 5) g`);
    // The setting is cluster-wide and superuser-only: lowered for this refresh only, then reset.
    await db.sql`ALTER SYSTEM SET pg_trickle.outbox_inline_threshold_rows = 0`;
    await db.sql`SELECT pg_reload_conf()`;
    const session = connect(db.url, { max: 1 });
    try {
      const threshold = async () => (await session<{ t: string }[]>`SELECT current_setting('pg_trickle.outbox_inline_threshold_rows') AS t`)[0]!.t;
      await eventually(async () => (await threshold()) === "0", 10_000, "the reloaded threshold");
      await session`SELECT pgtrickle.refresh_stream_table(${st.name})`;
    } finally {
      await session.end({ timeout: 1 });
      await db.sql`ALTER SYSTEM RESET pg_trickle.outbox_inline_threshold_rows`;
      await db.sql`SELECT pg_reload_conf()`;
    }
    const [row] = await outboxRows(db.sql, st);
    expect(row).toMatchObject({ is_claim_check: true, payload: null, inserted_count: "5" });
    const delta = await db.sql`SELECT row_op, count(*)::int AS n FROM ${db.sql(`pgtrickle.outbox_delta_rows_claim`)} GROUP BY row_op`;
    expect([...delta]).toEqual([{ row_op: "INSERT", n: 5 }]);

    const output = await pipeline("claim", st, { claim_check_fetch_size: 2 });
    expect((await drain("claim")).exitCode).toBe(0);
    const lines = readLines(output);
    expect(payloads(lines)).toEqual([1, 2, 3, 4, 5].map((id) => ({ id, amount: id * 10 })));
    expect(lines.map((l) => l.dedup_key)).toEqual([0, 1, 2, 3, 4].map((i) => `${st.outboxTable}:${row!.id}:${i}`));

    // The delta rows stay until a pipeline with release_claim_check calls outbox_rows_consumed.
    const deltaRows = async () => (await db.sql<{ n: number }[]>`SELECT count(*)::int AS n FROM ${db.sql(`pgtrickle.outbox_delta_rows_claim`)}`)[0]!.n;
    expect(await deltaRows()).toBe(5);
    const freeing = await pipeline("claim_free", st, { release_claim_check: true });
    expect((await drain("claim_free")).exitCode).toBe(0);
    expect(readLines(freeing)).toHaveLength(5);
    expect(await deltaRows()).toBe(0);
  });

  test("the scheduler refreshes, its background worker sends NOTIFY pgtrickle_outbox_new, and a running relay (60 s poll) delivers at once; a pipeline added by set_relay_outbox is picked up live", async () => {
    const st = await realStreamTable(db.sql, "scheduled", { schedule: "1s" });
    const output = await pipeline("scheduled", st, { poll_interval_ms: 60_000 });
    const listener = connect(db.url, { max: 1 });
    const notes: string[] = [];
    await listener.listen("pgtrickle_outbox_new", (p) => notes.push(p));
    await db.sql`SELECT pgtrickle.disable_relay(name) FROM pgtrickle.relay_outbox_config WHERE name <> 'scheduled'`;
    const relay = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0", "--max-workers", "100"]);
    try {
      await relay.waitForLog(/\[scheduled\] started/);
      await Bun.sleep(300); // the first (empty) poll is done; the pipeline now sleeps for 60 s
      await db.sql.unsafe(`INSERT INTO ${st.source} VALUES (1, 100)`);
      await eventually(() => readLines(output).length === 1, 30_000, "the scheduled refresh, well before the 60 s poll");
      expect(readLines(output)[0]!.payload).toEqual({ id: 1, amount: 100 });
      expect(notes).toContain(st.outboxTable);

      // Hot reload: a second stream table and pipeline, registered while the relay runs.
      const later = await realStreamTable(db.sql, "added_live", { schedule: "1s" });
      const laterOutput = await pipeline("added_live", later);
      await relay.waitForLog(/\[added_live\] started/);
      await db.sql.unsafe(`INSERT INTO ${later.source} VALUES (7, 70)`);
      await eventually(() => readLines(laterOutput).length === 1, 30_000, "the live-added pipeline's row");
      await db.sql`SELECT pgtrickle.disable_relay('added_live')`;
      await relay.waitForLog(/\[added_live\] stopped/);
    } finally {
      await listener.end({ timeout: 1 });
      expect(await relay.stop("SIGTERM")).toBe(0);
      // No stream table refreshing every second outlives the test; their pipelines go with them.
      await db.sql`SELECT pgtrickle.drop_stream_table(name) FROM unnest(array['public.scheduled', 'public.added_live']) name`;
      await db.sql`SELECT pgtrickle.delete_relay(name) FROM unnest(array['scheduled', 'added_live']) name`;
    }
  }, 90_000);

  test("consumer groups: poll_outbox needs the outbox table name, leases exclude no one; a group pipeline delivers and commits", async () => {
    const st = await realStreamTable(db.sql, "grouped");
    await db.sql.unsafe(`INSERT INTO ${st.source} VALUES (1, 1)`);
    await refresh(st);
    await db.sql.unsafe(`INSERT INTO ${st.source} VALUES (2, 2)`);
    await refresh(st);

    // The quirk: the stream-table name is accepted at creation, but polling then fails.
    await db.sql`SELECT pgtrickle.create_consumer_group('by_st_name', ${st.name}, 'earliest')`;
    const err = await db.sql`SELECT * FROM pgtrickle.poll_outbox('by_st_name', 'c1')`.then(() => null, (e: Error) => e);
    expect(err?.message).toContain(`relation "pgtrickle.public.grouped" does not exist`);

    await db.sql`SELECT pgtrickle.create_consumer_group('by_outbox', ${st.outboxTable}, 'earliest')`;
    const poll = (consumer: string) => db.sql<{ outbox_id: string }[]>`SELECT outbox_id FROM pgtrickle.poll_outbox('by_outbox', ${consumer}, 10, 30)`;
    const a = (await poll("a")).map((r) => r.outbox_id);
    const b = (await poll("b")).map((r) => r.outbox_id);
    expect(a).toHaveLength(2);
    expect(b).toEqual(a); // a's lease did not keep b from the same rows

    const output = await pipeline("grouped", st, {}, "analytics");
    expect((await drain("grouped")).exitCode).toBe(0);
    expect(payloads(readLines(output))).toEqual([{ id: 1, amount: 1 }, { id: 1, amount: 1 }, { id: 2, amount: 2 }]);
    const [group] = await db.sql`SELECT outbox_name, auto_offset_reset FROM pgtrickle.pgt_consumer_groups WHERE group_name = 'analytics'`;
    expect(group).toEqual({ outbox_name: st.outboxTable, auto_offset_reset: "earliest" });
    const offsets = await db.sql`SELECT consumer_id, committed_offset::text AS off FROM pgtrickle.pgt_consumer_offsets WHERE group_name = 'analytics'`;
    expect([...offsets]).toEqual([{ consumer_id: "default:grouped", off: a[1]! }]);
    expect((await drain("grouped")).exitCode).toBe(0);
    expect(readLines(output)).toHaveLength(3);
  });

  test("status, check and drain on the extension-owned catalog", async () => {
    const st = await realStreamTable(db.sql, "commands");
    await db.sql.unsafe(`INSERT INTO ${st.source} VALUES (1, 1)`);
    await refresh(st);
    await pipeline("commands", st);
    await db.sql`SELECT pgtrickle.set_relay_outbox('commands_bad', 'public.no_such_table', NULL, ${db.sql.json({ type: "file" })})`;

    const check = await relayOnce(["check", "--postgres-url", db.url]);
    expect(check.exitCode).toBe(1);
    expect(check.stdout).toMatch(/^ok +commands \(forward\)/m);
    expect(check.stdout).toMatch(/^FAIL +commands_bad \(forward\).*\n.*has no outbox/m);

    const drained = await relayOnce(["drain", "--postgres-url", db.url, "--pipeline", "commands"]);
    expect(drained.exitCode).toBe(0);
    const status = await relayOnce(["status", "--postgres-url", db.url, "--json"]);
    expect(status.exitCode).toBe(0);
    const { pipelines } = JSON.parse(status.stdout) as { pipelines: { name: string; committed_offset: string; lag_rows: number }[] };
    const [header] = await outboxRows(db.sql, st);
    expect(pipelines.find((p) => p.name === "commands")).toMatchObject({ committed_offset: header!.id, lag_rows: 0 });
    await db.sql`SELECT pgtrickle.delete_relay('commands_bad')`;
  });
});
