import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, readFileSync, readdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { readJsonLines } from "../helpers/messages.ts";
import { eventually, relayCommand, relayOnce, RunningRelay } from "../helpers/relay.ts";
import { PIPELINE_DEPTH } from "../../src/pipeline.ts";
import {
  createStreamTable,
  enableOutbox,
  openInsert,
  writeClaimCheck,
  writeNullPayload,
  writePgTideSummary,
  writeRaw,
  writeSnapshotArray,
  writeV1Inline,
  type OutboxTables,
} from "../fixtures/outbox.ts";

// Every pipeline of this file lives in one database and every `run` takes all enabled ones:
// the relays here get --max-workers 100 so that the default of 10 never leaves one out.
let db: TestDatabase;
const dir = mkdtempSync(join(tmpdir(), "relay-forward-"));

beforeAll(async () => {
  db = await testDatabase("forward");
});
afterAll(async () => {
  await db?.drop();
});

interface Line {
  dedup_key: string;
  subject: string;
  payload: unknown;
  op: string;
  is_full_refresh: boolean;
  outbox_id: number | null;
  refresh_id: string | null;
}

const readLines = (path: string) => readJsonLines<Line>(path);

/** A stream table with an outbox and a file pipeline for it. */
async function setup(name: string, source: Record<string, unknown> = {}, sink: Record<string, unknown> = {}) {
  await createStreamTable(db.sql, `public.${name}`, "id int primary key, amount int");
  const tables = await enableOutbox(db.sql, `public.${name}`);
  const output = join(dir, `${name}.jsonl`);
  await configurePipeline(name, `public.${name}`, { type: "file", output, ...sink }, source);
  return { tables, output };
}

async function configurePipeline(name: string, outbox: string, sink: Record<string, unknown>, source: Record<string, unknown> = {}, group: string | null = null) {
  await db.sql`SELECT pgtrickle.set_relay_outbox(${name}, ${outbox}, ${group}, ${db.sql.json(sink as never)})`;
  if (Object.keys(source).length > 0) {
    await db.sql`UPDATE pgtrickle.relay_outbox_config SET config = jsonb_set(config, '{source}', config->'source' || ${db.sql.json(source as never)}) WHERE name = ${name}`;
  }
}

const drain = (name: string, extra: string[] = []) => relayOnce(["drain", "--postgres-url", db.url, "--pipeline", name, ...extra]);

async function offsetOf(name: string): Promise<string | null> {
  const [row] = await db.sql<{ last: string }[]>`SELECT last_change_id::text AS last FROM pgtrickle.relay_consumer_offsets WHERE pipeline_id = ${name}`;
  return row?.last ?? null;
}

describe("decoding every payload shape", () => {
  test("v1 inline, full refresh, snapshot array, NULL, pg_tide summary, claim-check: exact messages in order", async () => {
    const { tables, output } = await setup("shapes", { claim_check_fetch_size: 2, max_batch_messages: 3 });
    const t: OutboxTables = tables;
    const id1 = await writeV1Inline(db.sql, t.outboxTable, {
      inserted: [{ id: 1, amount: 10 }, { id: 2, amount: 20 }],
      deleted: [{ id: 9, amount: 90 }],
      refresh_id: "11111111-1111-1111-1111-111111111111",
    });
    const id2 = await writeV1Inline(db.sql, t.outboxTable, { inserted: [{ id: 3, amount: 30 }], deleted: [], full_refresh: true, pgt_id: "22222222-2222-2222-2222-222222222222" });
    const id3 = await writeSnapshotArray(db.sql, t.outboxTable, [{ id: 4, amount: 40 }, { id: 5, amount: 50 }]);
    const id4 = await writeNullPayload(db.sql, t.outboxTable, { inserted_count: 3, deleted_count: 1 });
    const id5 = await writePgTideSummary(db.sql, t.outboxTable, { inserted: 7, deleted: 2, source: "public.shapes" });
    const id6 = await writeClaimCheck(db.sql, t.outboxTable, t.deltaTable, [
      { op: "INSERT", data: { id: 6, amount: 60 } },
      { op: "DELETE", data: { id: 7, amount: 70 } },
      { op: "INSERT", data: { id: 8, amount: 80, __pgt_row_id: 123 } },
      { op: "INSERT", data: { id: 10, amount: 100 } },
    ], { v1Header: true, refresh_id: "33333333-3333-3333-3333-333333333333" });
    const id7 = await writeClaimCheck(db.sql, t.outboxTable, t.deltaTable, [{ op: "INSERT", data: { id: 11, amount: 110 } }]);

    const result = await drain("shapes");
    expect(result.exitCode).toBe(0);
    const got = readLines(output).map((l) => [l.dedup_key, l.op, JSON.stringify(l.payload), l.is_full_refresh, l.refresh_id]);
    const k = (id: string, i: number) => `${t.outboxTable}:${id}:${i}`;
    const summary = (id: string, ins: number, del: number) =>
      JSON.stringify({ outbox_id: Number(id), inserted_count: ins, deleted_count: del });
    expect(got.map((g) => g.slice(0, 2))).toEqual([
      [k(id1, 2), "delete"],
      [k(id1, 0), "insert"],
      [k(id1, 1), "insert"],
      [k(id2, 0), "insert"],
      [k(id3, 0), "insert"],
      [k(id3, 1), "insert"],
      [k(id4, 0), "summary"],
      [k(id5, 0), "summary"],
      [k(id6, 3), "delete"],
      [k(id6, 0), "insert"],
      [k(id6, 1), "insert"],
      [k(id6, 2), "insert"],
      [k(id7, 0), "insert"],
    ]);
    const lines = readLines(output);
    expect(lines[0]!.payload).toEqual({ id: 9, amount: 90 });
    expect(lines[0]!.refresh_id).toBe("11111111-1111-1111-1111-111111111111");
    expect(lines[0]!.subject).toBe("pgtrickle.shapes.delete");
    expect(lines[3]!.is_full_refresh).toBe(true);
    expect(lines[3]!.refresh_id).toBe("22222222-2222-2222-2222-222222222222");
    expect(lines[4]!.is_full_refresh).toBe(true); // bare snapshot array
    expect(lines[4]!.payload).toEqual({ id: 4, amount: 40 }); // __pgt_row_id stripped
    expect(JSON.stringify(lines[6]!.payload)).toContain(summary(id4, 3, 1).slice(0, -1));
    expect(lines[6]!.payload).toMatchObject({ stream_table: "shapes", refresh_id: null });
    expect(lines[7]!.payload).toMatchObject({ inserted_count: Number(lines[7]!.outbox_id) ? expect.any(Number) : 0 });
    expect(lines[10]!.payload).toEqual({ id: 8, amount: 80 }); // claim-check row, internal column stripped
    expect(lines[8]!.is_full_refresh).toBe(false); // v1 claim-check header without full_refresh
    expect(lines[12]!.is_full_refresh).toBe(true); // 0.37–0.45 claim-check: NULL payload = snapshot
    expect(lines.every((l) => l.outbox_id !== null && Number.isSafeInteger(l.outbox_id))).toBe(true);
    expect(await offsetOf("shapes")).toBe(id7);
  });

  test("subjects: rendered per row field, per outbox row, or once for every row, as the template needs", async () => {
    const templates = { s_fields: "t.{op}.{id}", s_row: "t.{stream_table}.{op}.{outbox_id}", s_fixed: "t.{stream_table}.{op}" };
    for (const [name, subject_template] of Object.entries(templates)) {
      const { tables, output } = await setup(name, { subject_template });
      const first = await writeV1Inline(db.sql, tables.outboxTable, { inserted: [{ id: 1, amount: 1 }, { id: 2, amount: 2 }], deleted: [{ id: 3, amount: 3 }] });
      const second = await writeV1Inline(db.sql, tables.outboxTable, { inserted: [{ id: 4, amount: 4 }], deleted: [] });
      expect((await drain(name)).exitCode).toBe(0);
      const subjects = readLines(output).map((l) => l.subject);
      if (name === "s_fields") expect(subjects).toEqual(["t.delete.3", "t.insert.1", "t.insert.2", "t.insert.4"]);
      if (name === "s_row") expect(subjects).toEqual([`t.${name}.delete.${first}`, `t.${name}.insert.${first}`, `t.${name}.insert.${first}`, `t.${name}.insert.${second}`]);
      if (name === "s_fixed") expect(subjects).toEqual([`t.${name}.delete`, `t.${name}.insert`, `t.${name}.insert`, `t.${name}.insert`]);
    }
  });

  test("claim-check rows that are missing: a v1 header is dead-lettered, a 0.37–0.45 snapshot of an emptied table is a summary", async () => {
    const { tables, output } = await setup("cc_missing");
    const v1 = await writeClaimCheck(db.sql, tables.outboxTable, tables.deltaTable, [{ op: "INSERT", data: { id: 1 } }], { v1Header: true });
    await db.sql.unsafe(`DELETE FROM pgtrickle."${tables.deltaTable}" WHERE outbox_id = ${v1}`);
    const emptied = await writeClaimCheck(db.sql, tables.outboxTable, tables.deltaTable, [], { deleted_count: 10001 });
    const after = await writeV1Inline(db.sql, tables.outboxTable, { inserted: [{ id: 2, amount: 2 }], deleted: [] });
    expect((await drain("cc_missing")).exitCode).toBe(4); // the missing claim-check rows were dead-lettered
    const lines = readLines(output);
    expect(lines.map((l) => [l.outbox_id, l.op, l.is_full_refresh])).toEqual([
      [Number(emptied), "summary", true],
      [Number(after), "insert", false],
    ]);
    const [letter] = await db.sql<{ outbox_id: string; error: string }[]>`
      SELECT outbox_id::text, error FROM pgtrickle.relay_dead_letters WHERE pipeline = 'cc_missing'`;
    expect(letter!.outbox_id).toBe(v1);
    expect(letter!.error).toContain("holds none");
  });

  test("a replay produces identical keys, and a second drain delivers nothing new", async () => {
    const { tables, output } = await setup("replay");
    await writeV1Inline(db.sql, tables.outboxTable, { inserted: [{ id: 1, amount: 1 }, { id: 2, amount: 2 }], deleted: [] });
    expect((await drain("replay")).exitCode).toBe(0);
    const first = readLines(output).map((l) => l.dedup_key);
    await db.sql`UPDATE pgtrickle.relay_consumer_offsets SET last_change_id = 0 WHERE pipeline_id = 'replay'`;
    expect((await drain("replay")).exitCode).toBe(0);
    const all = readLines(output).map((l) => l.dedup_key);
    expect(all).toEqual([...first, ...first]);
    expect((await drain("replay")).exitCode).toBe(0);
    expect(readLines(output).length).toBe(4);
  });
});

describe("dead letters", () => {
  test("a poison row lands in relay_dead_letters while later rows flow, and can be replayed after a fix", async () => {
    const { tables, output } = await setup("poison");
    await writeV1Inline(db.sql, tables.outboxTable, { inserted: [{ id: 1, amount: 1 }], deleted: [] });
    const bad = await writeRaw(db.sql, tables.outboxTable, { v: 99, inserted: [] });
    const last = await writeV1Inline(db.sql, tables.outboxTable, { inserted: [{ id: 3, amount: 3 }], deleted: [] });
    const result = await drain("poison");
    expect(result.exitCode).toBe(4); // the poison row was dead-lettered
    expect(readLines(output).map((l) => l.payload)).toEqual([{ id: 1, amount: 1 }, { id: 3, amount: 3 }]);
    const letters = await db.sql<{ dedup_key: string; error: string; error_kind: string; outbox_id: string }[]>`
      SELECT dedup_key, error, error_kind, outbox_id::text FROM pgtrickle.relay_dead_letters WHERE pipeline = 'poison'`;
    expect(letters).toHaveLength(1);
    expect(letters[0]!.outbox_id).toBe(bad);
    expect(letters[0]!.error_kind).toBe("decode");
    expect(letters[0]!.error).toContain("unsupported payload version 99");
    expect(await offsetOf("poison")).toBe(last);

    // An operator fixes the stored row and asks for a replay; the running relay re-sends it.
    await db.sql`UPDATE pgtrickle.relay_dead_letters
      SET message = jsonb_set(message, '{header,payload}', '{"v":1,"inserted":[{"id":2,"amount":2}],"deleted":[]}')
      WHERE pipeline = 'poison'`;
    const [replayed] = await db.sql<{ n: number }[]>`SELECT pgtrickle.replay_relay_dead_letters('poison') AS n`;
    expect(replayed!.n).toBe(1);
    const relay = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0", "--max-workers", "100"]);
    try {
      await writeV1Inline(db.sql, tables.outboxTable, { inserted: [{ id: 4, amount: 4 }], deleted: [] });
      await eventually(async () => {
        const [r] = await db.sql<{ resolved: boolean }[]>`SELECT resolved_at IS NOT NULL AS resolved FROM pgtrickle.relay_dead_letters WHERE pipeline = 'poison'`;
        return r?.resolved === true;
      }, 20_000, "the dead letter to be replayed");
      expect(readLines(output).map((l) => l.payload)).toContainEqual({ id: 2, amount: 2 });
      expect(readLines(output).find((l) => (l.payload as { id: number }).id === 2)!.dedup_key).toBe(`${tables.outboxTable}:${bad}:0`);
    } finally {
      await relay.stop();
    }
  });

  test("on_decode_error=halt stops the pipeline and drain exits 1 naming it", async () => {
    const { tables } = await setup("halting", { on_decode_error: "halt" });
    await writeRaw(db.sql, tables.outboxTable, "not an object");
    const result = await drain("halting");
    expect(result.exitCode).toBe(1);
    expect(result.stderr).toContain("halting");
    expect(result.stderr).toContain("on_decode_error");
    expect(await offsetOf("halting")).toBeNull();
  });
});

describe("no row skipped", () => {
  test("two writers committing out of id order: both rows are delivered, the later id is held until the earlier commits", async () => {
    const { tables, output } = await setup("ooo", { poll_interval_ms: 50 });
    const relay = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0", "--max-workers", "100"]);
    try {
      await relay.waitForLog(/\[ooo\] started/);
      const writerA = await openInsert(db.sql, tables.outboxTable, [{ id: 1, amount: 1 }]);
      const highId = await writeV1Inline(db.sql, tables.outboxTable, { inserted: [{ id: 2, amount: 2 }], deleted: [] });
      expect(BigInt(highId)).toBeGreaterThan(BigInt(writerA.id));
      // Give the relay several polls while A is open: it must not hand out B's row yet.
      await Bun.sleep(600);
      expect(readLines(output)).toHaveLength(0);
      await writerA.end(true);
      await eventually(() => readLines(output).length === 2, 10_000, "both rows");
      expect(readLines(output).map((l) => l.outbox_id)).toEqual([Number(writerA.id), Number(highId)]);
    } finally {
      await relay.stop();
    }
  });

  test("a rolled-back id leaves a gap that is crossed once no writer can fill it", async () => {
    const { tables, output } = await setup("gaps");
    await writeV1Inline(db.sql, tables.outboxTable, { inserted: [{ id: 1, amount: 1 }], deleted: [] });
    await db.sql.begin(async (tx) => {
      await tx.unsafe(`INSERT INTO pgtrickle."${tables.outboxTable}" (payload) VALUES ('[]')`);
      throw new Error("rollback");
    }).catch(() => {});
    await writeV1Inline(db.sql, tables.outboxTable, { inserted: [{ id: 3, amount: 3 }], deleted: [] });
    expect((await drain("gaps", ["--timeout", "20"])).exitCode).toBe(0);
    expect(readLines(output).map((l) => l.payload)).toEqual([{ id: 1, amount: 1 }, { id: 3, amount: 3 }]);
  });

  test("kill -9 mid-stream and a restart deliver every row; duplicates only from the unacknowledged batches, with identical keys", async () => {
    const { tables, output } = await setup("crash", { batch_size: 20 });
    const total = 1500;
    await db.sql.unsafe(
      `INSERT INTO pgtrickle."${tables.outboxTable}" (payload)
       SELECT jsonb_build_object('v', 1, 'inserted', jsonb_build_array(jsonb_build_object('id', g, 'amount', g)), 'deleted', '[]'::jsonb)
       FROM generate_series(1, ${total}) g`,
    );
    const relay = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0", "--max-workers", "100"]);
    await eventually(() => readLines(output).length >= 200, 20_000, "some rows to be delivered");
    await relay.stop("SIGKILL");
    const beforeRestart = readLines(output).length;
    expect(beforeRestart).toBeLessThan(total);
    const result = await drain("crash");
    expect(result.exitCode).toBe(0);
    const keys = readLines(output).map((l) => l.dedup_key);
    const unique = new Set(keys);
    expect(unique.size).toBe(total);
    expect(keys.length - unique.size).toBeLessThanOrEqual(20 * PIPELINE_DEPTH); // the batches in flight at the kill
    const [top] = await db.sql.unsafe<{ max: string }[]>(`SELECT max(id)::text AS max FROM pgtrickle."${tables.outboxTable}"`);
    expect(await offsetOf("crash")).toBe(top!.max);
  });
});

// Wake-up through NOTIFY, consumer-group delivery and claim-check release: pgtrickle-forward.test.ts,
// on the real extension.

describe("failed pipelines", () => {
  test("a pipeline failed by something outside its config (no outbox yet) is tried again each discovery interval", async () => {
    await createStreamTable(db.sql, "public.later", "id int primary key");
    const output = join(dir, "later.jsonl");
    await configurePipeline("later", "public.later", { type: "file", output });
    const relay = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0", "--max-workers", "100", "--discovery-interval", "1"]);
    try {
      await relay.waitForLog(/\[later\] failed: .*has no outbox/);
      const t = await enableOutbox(db.sql, "public.later");
      await writeV1Inline(db.sql, t.outboxTable, { inserted: [{ id: 1 }], deleted: [] });
      await eventually(() => readLines(output).length === 1, 15_000, "the row once the outbox exists");
    } finally {
      await relay.stop();
    }
  });
});

describe("consumer-group leases", () => {
  test("a batch slower than visibility_seconds keeps its lease: extend_lease runs until the commit", async () => {
    await createStreamTable(db.sql, "public.slow", "id int primary key");
    const t = await enableOutbox(db.sql, "public.slow");
    await writeV1Inline(db.sql, t.outboxTable, { inserted: [{ id: 1 }], deleted: [] });
    let release!: () => void;
    const held = new Promise<void>((r) => (release = r));
    const receiver = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: async () => (await held, new Response("ok")) });
    await configurePipeline("slow", "public.slow", { type: "http", url: `http://127.0.0.1:${receiver.port}/`, timeout_ms: 60_000 }, { visibility_seconds: 2 }, "slowpokes");
    const relay = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0", "--max-workers", "100"]);
    try {
      const lease = async () =>
        (await db.sql<{ expires: Date; polled: Date }[]>`
          SELECT l.lease_expires AS expires, o.last_heartbeat_at AS polled FROM pgtrickle.pgt_consumer_leases l
          JOIN pgtrickle.pgt_consumer_offsets o USING (group_name, consumer_id) WHERE l.group_name = 'slowpokes'`)[0];
      await eventually(async () => (await lease()) !== undefined, 15_000, "the batch to be polled");
      const first = (await lease())!.expires.getTime();
      // poll_outbox leased 2 s; half-way the relay adds 2 s, and again, while the sink is stuck.
      await eventually(async () => ((await lease())?.expires.getTime() ?? 0) >= first + 3000, 10_000, "the lease to be extended twice");
      release();
      await eventually(async () => (await lease()) === undefined, 10_000, "the commit to end the lease");
      const [off] = await db.sql<{ off: string }[]>`SELECT committed_offset::text AS off FROM pgtrickle.pgt_consumer_offsets WHERE group_name = 'slowpokes'`;
      expect(off!.off).not.toBe("0");
    } finally {
      release();
      await relay.stop();
      receiver.stop(true);
      await db.sql`SELECT pgtrickle.disable_relay('slow')`;
    }
  }, 60_000);
});

describe("claim-check progress", () => {
  /** The committed offset of a pipeline: its own row in simple mode, the extension's in group mode. */
  async function committed(name: string, group: string | null): Promise<string | null> {
    if (!group) return offsetOf(name);
    const [row] = await db.sql<{ off: string }[]>`
      SELECT committed_offset::text AS off FROM pgtrickle.pgt_consumer_offsets WHERE group_name = ${group} AND consumer_id = ${`default:${name}`}`;
    return row?.off ?? null;
  }

  for (const group of [null, "cc_resume_group"]) {
    const mode = group ? "consumer-group mode" : "simple mode";
    test(`${mode}: kill -9 in the middle of a 30,000-row change set; the restart resumes near where it stopped, same keys, nothing missing`, async () => {
      const name = group ? "cc_resume_g" : "cc_resume";
      const batch = 200;
      await createStreamTable(db.sql, `public.${name}`, "id int primary key, amount int");
      const tables = await enableOutbox(db.sql, `public.${name}`);
      const output = join(dir, `${name}.jsonl`);
      await configurePipeline(name, `public.${name}`, { type: "file", output }, { claim_check_fetch_size: 150, max_batch_messages: batch }, group);
      // 10,000 deletes then 20,000 inserts: the kill may land in either part.
      const rows = Array.from({ length: 30_000 }, (_, i) => ({ op: i < 10_000 ? ("DELETE" as const) : ("INSERT" as const), data: { id: i, amount: i } }));
      const id = await writeClaimCheck(db.sql, tables.outboxTable, tables.deltaTable, rows, { v1Header: true });
      const relay = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0", "--max-workers", "100"]);
      try {
        // Newlines, not parsed lines: the relay may be in the middle of writing one.
        const written = () => (existsSync(output) ? readFileSync(output, "utf8").split("\n").length - 1 : 0);
        await eventually(() => written() >= 6_000, 60_000, "6,000 messages of the set");
      } finally {
        await relay.stop("SIGKILL");
      }
      expect(readLines(output).length).toBeLessThan(rows.length);
      expect(await committed(name, group)).not.toBe(id); // the set is not finished: not committed

      expect((await drain(name)).exitCode).toBe(0);
      const lines = readLines(output);
      const resent = lines.length - rows.length;
      expect(resent).toBeGreaterThanOrEqual(0);
      expect(resent).toBeLessThanOrEqual(batch * PIPELINE_DEPTH); // at most the batches in flight at the kill
      const byKey = new Map<string, Line>();
      for (const line of lines) {
        const first = byKey.get(line.dedup_key);
        if (first) expect(line).toEqual(first); // a re-sent message is the same message
        else byKey.set(line.dedup_key, line);
      }
      expect(byKey.size).toBe(rows.length);
      // Deletes first (indexes 20,000…29,999), then inserts (0…19,999), each in row_num order.
      const keys = [...byKey.keys()];
      expect(keys[0]).toBe(`${tables.outboxTable}:${id}:20000`);
      expect(keys[9_999]).toBe(`${tables.outboxTable}:${id}:29999`);
      expect(keys[10_000]).toBe(`${tables.outboxTable}:${id}:0`);
      expect(keys[29_999]).toBe(`${tables.outboxTable}:${id}:19999`);
      expect([...byKey.values()].map((l) => (l.payload as { id: number }).id)).toEqual(rows.map((r) => r.data.id));
      expect(await committed(name, group)).toBe(id);
      const [position] = await db.sql<{ position: string }[]>`SELECT position FROM pgtrickle.relay_source_positions WHERE pipeline = ${name}`;
      expect(position?.position).toBe("null"); // the set is done: no position within a row left
    }, 120_000);
  }
});

describe("drain", () => {
  test("exits 1 with a summary naming a pipeline whose config is invalid, 0 for the healthy one", async () => {
    await setup("healthy");
    await db.sql`SELECT pgtrickle.set_relay_outbox('broken', 'public.healthy', NULL, '{"type":"file","format":"xml"}'::jsonb)`;
    const ok = await drain("healthy");
    expect(ok.exitCode).toBe(0);
    const bad = await drain("broken");
    expect(bad.exitCode).toBe(1);
    expect(bad.stderr).toContain("broken");
    expect(bad.stderr).toContain("sink.format");
  });

  test("on a terminal it shows the rows each pipeline has left; in a log it stays plain", async () => {
    const { tables } = await setup("progress", { batch_size: 20 });
    await db.sql.unsafe(
      `INSERT INTO pgtrickle."${tables.outboxTable}" (payload)
       SELECT jsonb_build_object('v', 1, 'inserted', jsonb_build_array(jsonb_build_object('id', g)), 'deleted', '[]'::jsonb)
       FROM generate_series(1, 30000) g`,
    );
    // `script` runs the drain under a pseudo-terminal, as a person at a shell would.
    const command = relayCommand(["drain", "--postgres-url", db.url, "--pipeline", "progress"]).map((a) => `'${a}'`).join(" ");
    const proc = Bun.spawn(["script", "-qec", command, "/dev/null"], { stdout: "pipe", stderr: "pipe" });
    const [out, code] = await Promise.all([new Response(proc.stdout).text(), proc.exited]);
    expect(code).toBe(0);
    expect(out).toMatch(/\rdrain: progress: \d+ rows remaining/);
    const plain = await drain("progress");
    expect(plain.stderr).not.toContain("\r");
  }, 120_000);

  test("an unreachable database is one clear line and exit 3", async () => {
    const result = await relayOnce(["drain", "--postgres-url", "postgres://nobody:secret-pw@127.0.0.1:1/x"]);
    expect(result.exitCode).toBe(3);
    expect(result.stderr).toContain("127.0.0.1:1");
    expect(result.stderr).not.toContain("secret-pw");
    expect(result.stderr).not.toContain("    at ");
  });
});

describe("demo", () => {
  test("relays its changes live to stdout (an update as delete + insert) and --cleanup removes its objects", async () => {
    const demoDb = await testDatabase("demo", { fixture: false, catalog: false });
    try {
      const r = await relayOnce(["demo", "--postgres-url", demoDb.url, "--count", "3", "--interval", "100"]);
      expect(r.exitCode).toBe(0);
      const lines = r.stdout.trim().split("\n").map((l) => JSON.parse(l) as Line);
      expect(lines.map((l) => l.op)).toEqual(["insert", "delete", "insert", "insert"]);
      expect(lines.map((l) => l.dedup_key)).toEqual([
        "outbox_relay_demo_orders:1:0",
        "outbox_relay_demo_orders:2:1",
        "outbox_relay_demo_orders:2:0",
        "outbox_relay_demo_orders:3:0",
      ]);
      expect((await relayOnce(["demo", "--postgres-url", demoDb.url, "--cleanup"])).exitCode).toBe(0);
      const left = await demoDb.sql`
        SELECT to_regclass('public.relay_demo_orders') AS t, to_regclass('pgtrickle.pgt_outbox_config') AS c,
               (SELECT count(*)::int FROM pgtrickle.relay_outbox_config) AS pipelines`;
      expect([...left]).toEqual([{ t: null, c: null, pipelines: 0 }]);
    } finally {
      await demoDb.drop();
    }
  });
});

describe("file sink", () => {
  test("csv writes the header once per file and rotates by size", async () => {
    const { tables, output } = await setup("csvout", { batch_size: 1 }, { format: "csv", output: join(dir, "csvout.csv"), rotate_bytes: 300 });
    for (let i = 0; i < 6; i++) await writeV1Inline(db.sql, tables.outboxTable, { inserted: [{ id: i, amount: i }], deleted: [] });
    expect((await relayOnce(["drain", "--postgres-url", db.url, "--pipeline", "csvout"])).exitCode).toBe(0);
    void output;
    const files = readdirSync(dir).filter((f) => f.startsWith("csvout.csv"));
    expect(files.length).toBeGreaterThan(1);
    let rows = 0;
    for (const f of files) {
      const lines = readFileSync(join(dir, f), "utf8").trim().split("\n");
      expect(lines[0]).toBe("dedup_key,subject,op,is_full_refresh,outbox_id,refresh_id,payload");
      expect(lines.filter((l) => l.startsWith("dedup_key"))).toHaveLength(1);
      rows += lines.length - 1;
    }
    expect(rows).toBe(6);
  });
});
