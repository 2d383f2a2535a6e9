// Section numbers (§…) in test names refer to docs/interface.md.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { appendFileSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import net from "node:net";
import tls from "node:tls";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { consola } from "consola";
import * as v from "valibot";
import { PgInboxSinkConfig } from "../../src/backends/pg-inbox/config.ts";
import { PgInboxSink } from "../../src/backends/pg-inbox/sink.ts";
import type { BackendContext } from "../../src/backends/types.ts";
import { RelayError } from "../../src/errors.ts";
import { inboundMessage } from "../../src/inbound.ts";
import type { Message } from "../../src/message.ts";
import { createStreamTable, enableOutbox, writeV1Inline } from "../fixtures/outbox.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { expectPoisonIsolated, LONG_KEY_POISON, POISONS, poisonedStream, TOO_LONG_KEY } from "../helpers/poison.ts";
import { eventually, relayCommand, relayOnce, RunningRelay } from "../helpers/relay.ts";

let db: TestDatabase;
const dir = mkdtempSync(join(tmpdir(), "relay-reverse-"));
const TRACE = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACEPARENT = `00-${TRACE}-00f067aa0ba902b7-01`;

beforeAll(async () => {
  db = await testDatabase("reverse_inbox");
});
afterAll(async () => {
  await db?.drop();
});

const drain = (name: string, database: TestDatabase = db) => relayOnce(["drain", "--postgres-url", database.url, "--pipeline", name]);

function jsonl(values: unknown[]): string {
  return values.map((x) => (typeof x === "string" ? x : JSON.stringify(x)) + "\n").join("");
}

async function inboxRows(table: string, database: TestDatabase = db) {
  return database.sql.unsafe(`SELECT * FROM ${table} ORDER BY event_id`);
}

async function countOf(table: string, database: TestDatabase = db): Promise<number> {
  const [r] = await database.sql.unsafe<{ n: number }[]>(`SELECT count(*)::int AS n FROM ${table}`);
  return r!.n;
}

async function position(pipeline: string): Promise<{ path: string; offset: number; line: number } | null> {
  const [row] = await db.sql<{ position: string }[]>`SELECT position FROM pgtrickle.relay_source_positions WHERE pipeline = ${pipeline} AND direction = 'reverse'`;
  return row ? JSON.parse(row.position) : null;
}

async function deadLetters(pipeline: string) {
  return db.sql<{ dedup_key: string; error_kind: string; error: string; message: Record<string, unknown> }[]>`
    SELECT dedup_key, error_kind, error, message FROM pgtrickle.relay_dead_letters
     WHERE pipeline = ${pipeline} AND direction = 'reverse' ORDER BY id`;
}

/** A sink built the way a pipeline builds it: options through the schema (defaults included). */
const inboxSink = (options: Record<string, unknown>, ctx: BackendContext) => new PgInboxSink(v.parse(PgInboxSinkConfig, options), ctx);

function ctxFor(database: TestDatabase, direction: "forward" | "reverse", counts?: { inserted: number; skipped: number }): BackendContext {
  return {
    pipeline: "direct",
    direction,
    relayGroupId: "default",
    log: consola.create({ level: -999 }),
    sql: database.sql,
    postgresUrl: database.url,
    drain: true,
    onInboxWrite: (inserted, skipped) => {
      if (counts) {
        counts.inserted += inserted;
        counts.skipped += skipped;
      }
    },
  };
}

describe("file → pg-inbox (set_relay_inbox, drain)", () => {
  const path = join(dir, "orders.jsonl");
  const lines = [
    { event_type: "order.created", order_id: 1, aggregate_id: "ord-1", source: "shop", traceparent: TRACEPARENT },
    { dedup_key: "outbox_orders:42:0", event_type: "order.paid", order_id: 1, aggregate_id: 1001 },
    { order_id: 2, trace_id: "body-trace" },
    { pgt_dedup_key: "pk-4", event_type: "order.shipped" },
    "[1, 2, 3]",
  ];

  test("the inbox is created by create_inbox and gets one row per line with the §6.6 columns", async () => {
    writeFileSync(path, jsonl(lines));
    await db.sql`SELECT pgtrickle.set_relay_inbox('orders_in', 'orders_inbox', ${db.sql.json({ type: "file", input: path } as never)})`;
    expect((await db.sql`SELECT to_regclass('pgtrickle.orders_inbox') AS t`)[0]!.t).toBeNull();

    const r = await drain("orders_in");
    expect(r.stderr).toContain("drained, 5 delivered");
    expect(r.exitCode).toBe(0);

    const [cfg] = await db.sql`SELECT inbox_schema, max_retries, schedule, with_dead_letter, retention_hours, is_managed FROM pgtrickle.pgt_inbox_config WHERE inbox_name = 'orders_inbox'`;
    // set_relay_inbox's defaults, passed through to create_inbox.
    expect(cfg).toEqual({ inbox_schema: "pgtrickle", max_retries: 3, schedule: "1s", with_dead_letter: true, retention_hours: 24, is_managed: true });

    const rows = await inboxRows("pgtrickle.orders_inbox");
    const byId = Object.fromEntries(rows.map((row) => [row.event_id, row]));
    expect(Object.keys(byId).sort()).toEqual([`file:${path}:1`, `file:${path}:3`, `file:${path}:5`, "outbox_orders:42:0", "pk-4"].sort());
    expect(byId[`file:${path}:1`]).toMatchObject({
      event_type: "order.created",
      source: "shop",
      aggregate_id: "ord-1",
      payload: lines[0],
      trace_id: TRACE,
      processed_at: null,
      error: null,
      retry_count: 0,
    });
    expect(byId["outbox_orders:42:0"]).toMatchObject({ event_type: "order.paid", source: `file:${path}`, aggregate_id: "1001", trace_id: null });
    expect(byId[`file:${path}:3`]).toMatchObject({ event_type: "file", aggregate_id: null, trace_id: "body-trace", payload: lines[2] });
    expect(byId["pk-4"]).toMatchObject({ event_type: "order.shipped" });
    expect(byId[`file:${path}:5`]!.payload).toEqual([1, 2, 3]);
    for (const row of rows) expect(row.received_at).toBeInstanceOf(Date);

    expect(await position("orders_in")).toMatchObject({ path, offset: statSync(path).size, line: 6 });
  });

  test("draining again reads nothing; with the position reset, ON CONFLICT keeps the same rows", async () => {
    const before = await inboxRows("pgtrickle.orders_inbox");
    const again = await drain("orders_in");
    expect(again.exitCode).toBe(0);
    expect(again.stderr).toContain("drained, 0 delivered");
    await db.sql`DELETE FROM pgtrickle.relay_source_positions WHERE pipeline = 'orders_in'`;
    const replay = await drain("orders_in");
    expect(replay.exitCode).toBe(0);
    expect(replay.stderr).toContain("drained, 5 delivered");
    expect(await inboxRows("pgtrickle.orders_inbox")).toEqual(before);
  });

  test("appended lines are read from the stored position on", async () => {
    appendFileSync(path, jsonl([{ n: 6 }, { n: 7 }]));
    const r = await drain("orders_in");
    expect(r.stderr).toContain("drained, 2 delivered");
    expect(await countOf("pgtrickle.orders_inbox")).toBe(7);
    expect((await db.sql`SELECT payload FROM pgtrickle.orders_inbox WHERE event_id = ${`file:${path}:7`}`)[0]!.payload).toEqual({ n: 7 });
  });

  test("a file replaced by a shorter one is read from its beginning", async () => {
    writeFileSync(path, jsonl([{ dedup_key: "after-truncate" }]));
    const r = await drain("orders_in");
    expect(r.exitCode).toBe(0);
    expect(r.stderr).toMatch(/replaced|truncated/);
    expect((await db.sql`SELECT count(*)::int AS n FROM pgtrickle.orders_inbox WHERE event_id = 'after-truncate'`)[0]!.n).toBe(1);
  });
});

describe("follow", () => {
  test("lines of a replaced file get keys of their own, not the old file's (nothing dropped by ON CONFLICT)", async () => {
    const p = join(dir, "replaced.jsonl");
    writeFileSync(p, jsonl([{ n: 1 }, { n: 2 }]));
    await db.sql`SELECT pgtrickle.set_relay_inbox('replaced_in', 'replaced_inbox', ${db.sql.json({ type: "file", input: p } as never)})`;
    expect((await drain("replaced_in")).exitCode).toBe(0);
    rmSync(p);
    writeFileSync(p, jsonl([{ n: 3 }, { n: 4 }]));
    const r = await drain("replaced_in");
    expect(r.exitCode).toBe(0);
    const rows = await db.sql<{ event_id: string; n: number }[]>`SELECT event_id, (payload->>'n')::int AS n FROM pgtrickle.replaced_inbox ORDER BY n`;
    expect(rows.map((x) => [x.event_id, x.n])).toEqual([
      [`file:${p}:1`, 1],
      [`file:${p}:2`, 2],
      [`file:${p}:g1:1`, 3],
      [`file:${p}:g1:2`, 4],
    ]);
  });

  test("run with follow: appended lines arrive, a half-written line waits for its newline, a rotated file is read anew", async () => {
    const path = join(dir, "follow.jsonl");
    writeFileSync(path, jsonl([{ dedup_key: "f1" }]));
    await db.sql`SELECT pgtrickle.set_relay_inbox('follow_in', 'follow_inbox', ${db.sql.json({ type: "file", input: path, follow: true, poll_interval_ms: 50 } as never)})`;
    await db.sql`SELECT pgtrickle.disable_relay(name) FROM pgtrickle.list_relay_configs() WHERE name <> 'follow_in'`;
    const relay = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0"]);
    const ids = async () => (await db.sql`SELECT event_id FROM pgtrickle.follow_inbox ORDER BY received_at, event_id`.catch(() => [])).map((r) => r.event_id as string);
    try {
      await eventually(async () => (await ids()).includes("f1"), 20_000, "f1");
      appendFileSync(path, jsonl([{ dedup_key: "f2" }]) + '{"dedup_key": "f3"');
      await eventually(async () => (await ids()).includes("f2"), 20_000, "f2");
      await Bun.sleep(300);
      expect(await ids()).not.toContain("f3");
      appendFileSync(path, "}\n");
      await eventually(async () => (await ids()).includes("f3"), 20_000, "f3 once complete");
      // logrotate-style: the file is moved away and a new one takes its name.
      const { renameSync } = await import("node:fs");
      renameSync(path, path + ".1");
      writeFileSync(path, jsonl([{ dedup_key: "f4" }]));
      await eventually(async () => (await ids()).includes("f4"), 20_000, "f4 from the new file");
      expect((await ids()).sort()).toEqual(["f1", "f2", "f3", "f4"]);
      expect(relay.stderr).toContain("rotated");
    } finally {
      expect(await relay.stop()).toBe(0);
      await db.sql`SELECT pgtrickle.enable_relay(name) FROM pgtrickle.list_relay_configs() WHERE name <> 'follow_in'`;
    }
    expect(await position("follow_in")).toMatchObject({ path, offset: statSync(path).size });
    // drain with follow stops at the end of what is there.
    appendFileSync(path, jsonl([{ dedup_key: "f5" }]));
    const r = await drain("follow_in");
    expect(r.exitCode).toBe(0);
    expect(r.stderr).toContain("drained, 1 delivered");
  });
});

describe("bad input", () => {
  test("a line that is not JSON (or not UTF-8) is a decode dead letter; the lines around it land", async () => {
    const path = join(dir, "bad.jsonl");
    writeFileSync(path, jsonl([{ a: 1 }, "{not json", { a: 3 }]));
    appendFileSync(path, Buffer.from([0xff, 0xfe, 0x7b, 0x7d, 0x0a]));
    appendFileSync(path, jsonl([{ a: 5 }]) + '{"a": 6}'); // the last line has no newline
    await db.sql`SELECT pgtrickle.set_relay_inbox('bad_in', 'bad_inbox', ${db.sql.json({ type: "stdin", input: path, batch_size: 2 } as never)})`;
    const r = await drain("bad_in");
    expect(r.exitCode).toBe(4); // dead letters during the run
    expect(r.stderr).toContain("drained, 4 delivered, 2 dead-lettered");
    expect((await inboxRows("pgtrickle.bad_inbox")).map((x) => x.payload)).toEqual([{ a: 1 }, { a: 3 }, { a: 5 }, { a: 6 }]);
    const dl = await deadLetters("bad_in");
    expect(dl.map((d) => [d.dedup_key, d.error_kind])).toEqual([
      [`file:${path}:2`, "decode"],
      [`file:${path}:4`, "decode"],
    ]);
    expect(dl[0]!.message).toMatchObject({ raw: "{not json", line: 2, input: `file:${path}` });
    expect(dl[1]!.message.raw).toEqual({ base64: Buffer.from([0xff, 0xfe, 0x7b, 0x7d]).toString("base64") });
    expect(dl[1]!.error).toContain("not valid UTF-8");
    expect((await position("bad_in"))!.offset).toBe(statSync(path).size);
  });

  test("poison lines between valid ones (nested 30,000 deep, a lone surrogate, NUL, a key too long for the index) are dead-lettered; every valid line lands", async () => {
    const path = join(dir, "poison.jsonl");
    const poisons = [...POISONS, LONG_KEY_POISON];
    const { bodies, valid } = poisonedStream(poisons);
    writeFileSync(path, bodies.join("\n") + "\n");
    await db.sql`SELECT pgtrickle.set_relay_inbox('poison_in', 'poison_inbox', ${db.sql.json({ type: "file", input: path, batch_size: 4 } as never)})`;
    const r = await drain("poison_in");
    expect(r.exitCode).toBe(4); // caught up, with dead letters written during the run
    // The file source refuses the deep line as it parses it: a decode dead letter, raw line kept.
    await expectPoisonIsolated(db, "poison_in", "poison_inbox", valid, poisons, { [POISONS[0]!.label]: "decode" });
    expect((await position("poison_in"))!.offset).toBe(statSync(path).size);
  });

  test("a fixed dead letter is replayed under its original key", async () => {
    const path = join(dir, "bad.jsonl");
    await db.sql`
      UPDATE pgtrickle.relay_dead_letters SET message = jsonb_set(message, '{raw}', '"{\\"a\\": 2, \\"fixed\\": true}"')
       WHERE pipeline = 'bad_in' AND dedup_key = ${`file:${path}:2`}`;
    expect((await db.sql`SELECT pgtrickle.replay_relay_dead_letters('bad_in') AS n`)[0]!.n).toBe(2);
    // Replays are looked for after a batch: give it one.
    appendFileSync(path, "\n" + jsonl([{ a: 7 }]));
    const r = await drain("bad_in");
    expect(r.exitCode).toBe(0);
    const fixed = await db.sql`SELECT payload FROM pgtrickle.bad_inbox WHERE event_id = ${`file:${path}:2`}`;
    expect(fixed[0]?.payload).toEqual({ a: 2, fixed: true });
    const dl = await db.sql`SELECT dedup_key, resolved_at IS NOT NULL AS resolved, replay_requested_at IS NULL AS unrequested FROM pgtrickle.relay_dead_letters WHERE pipeline = 'bad_in' ORDER BY id`;
    // The fixed one is resolved; the still-invalid one is marked failed again and waits.
    expect(dl.map((d) => [d.resolved, d.unrequested])).toEqual([
      [true, false],
      [false, true],
    ]);
  });

  test("json_pretty input: multi-line values, a garbage line costs one dead letter", async () => {
    const path = join(dir, "pretty.json");
    writeFileSync(
      path,
      JSON.stringify({ a: 1, text: "brace } and quote \" inside" }, null, 2) + "\n" + "garbage here\n" + JSON.stringify({ a: 2, nested: { x: [1, { y: 2 }] } }, null, 2) + "\n",
    );
    await db.sql`SELECT pgtrickle.set_relay_inbox('pretty_in', 'pretty_inbox', ${db.sql.json({ type: "file", input: path, format: "json_pretty", event_type: "pretty.event" } as never)})`;
    const r = await drain("pretty_in");
    expect(r.exitCode).toBe(4); // dead letters during the run
    const rows = await inboxRows("pgtrickle.pretty_inbox");
    expect(rows.map((x) => [x.event_id, x.event_type, x.payload])).toEqual([
      [`file:${path}:1`, "pretty.event", { a: 1, text: 'brace } and quote " inside' }],
      [`file:${path}:6`, "pretty.event", { a: 2, nested: { x: [1, { y: 2 }] } }],
    ]);
    expect((await deadLetters("pretty_in")).map((d) => d.dedup_key)).toEqual([`file:${path}:5`]);
  });

  test("a missing input file without follow is a config error naming it", async () => {
    const path = join(dir, "does-not-exist.jsonl");
    await db.sql`SELECT pgtrickle.set_relay_inbox('missing_file', 'orders_inbox', ${db.sql.json({ type: "file", input: path } as never)})`;
    const r = await drain("missing_file");
    expect(r.exitCode).toBe(1);
    expect(r.stderr).toContain(path);
    expect(r.stderr).toContain("no such file");
  });
});

describe("stdin", () => {
  test("EOF ends the pipeline drained; keys are stdin:<sha256 of the line>, producer keys verbatim", async () => {
    await db.sql`SELECT pgtrickle.set_relay_inbox('stdin_in', 'stdin_inbox', ${db.sql.json({ type: "stdin", event_type: "cli.event" } as never)})`;
    const proc = Bun.spawn(relayCommand(["drain", "--postgres-url", db.url, "--pipeline", "stdin_in"]), { stdin: "pipe", stdout: "pipe", stderr: "pipe" });
    proc.stdin.write(jsonl([{ a: 1 }, { dedup_key: "given", a: 2 }, { a: 1 }]));
    await proc.stdin.end();
    const [stderr, code] = await Promise.all([new Response(proc.stderr).text(), proc.exited]);
    expect(code).toBe(0);
    expect(stderr).toContain("drained, 3 delivered");
    const hasher = new Bun.CryptoHasher("sha256");
    hasher.update('{"a":1}');
    // The same line twice is the same event (content-addressed): one row.
    expect((await inboxRows("pgtrickle.stdin_inbox")).map((x) => [x.event_id, x.event_type, x.source])).toEqual(
      [
        [`stdin:${hasher.digest("hex")}`, "cli.event", "stdin"],
        ["given", "cli.event", "stdin"],
      ].sort((a, b) => (a[0]! < b[0]! ? -1 : 1)),
    );
    expect(await position("stdin_in")).toBeNull();
  });

  test("poison lines on standard input (nested 30,000 deep, a lone surrogate, NUL, a key too long for the index) are dead-lettered; every valid line lands", async () => {
    await db.sql`SELECT pgtrickle.set_relay_inbox('stdin_poison', 'stdin_poison_inbox', ${db.sql.json({ type: "stdin", batch_size: 4 } as never)})`;
    const poisons = [...POISONS, LONG_KEY_POISON];
    const { bodies, valid } = poisonedStream(poisons);
    const proc = Bun.spawn(relayCommand(["drain", "--postgres-url", db.url, "--pipeline", "stdin_poison", "--timeout", "50"]), { stdin: "pipe", stdout: "pipe", stderr: "pipe" });
    proc.stdin.write(bodies.join("\n") + "\n");
    await proc.stdin.end();
    const [, code] = await Promise.all([new Response(proc.stderr).text(), proc.exited]);
    expect(code).toBe(4); // caught up, with dead letters written during the run
    await expectPoisonIsolated(db, "stdin_poison", "stdin_poison_inbox", valid, poisons, { [POISONS[0]!.label]: "decode" });
  });

  /** Rows of stdin_inbox with this payload (0 while the relay has not created the table yet). */
  const stdinRows = async (payload: unknown) =>
    (await db.sql`SELECT count(*)::int AS n FROM pgtrickle.stdin_inbox WHERE payload = ${db.sql.json(payload as never)}`.catch(() => [{ n: 0 }]))[0]!.n;

  /** `run` with a stdin pipeline fed `lines`; returns its stderr once `settled` holds. */
  async function runWithStdin(name: string, lines: unknown[], settled: (stderr: string) => Promise<boolean>): Promise<string> {
    await db.sql`SELECT pgtrickle.set_relay_inbox(${name}, 'stdin_inbox', ${db.sql.json({ type: "stdin" } as never)})`;
    await db.sql`SELECT pgtrickle.disable_relay(name) FROM pgtrickle.list_relay_configs() WHERE name <> ${name}`;
    const proc = Bun.spawn(relayCommand(["run", "--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0"]), { stdin: "pipe", stdout: "pipe", stderr: "pipe" });
    let stderr = "";
    void (async () => {
      for await (const chunk of proc.stderr) stderr += new TextDecoder().decode(chunk);
    })();
    try {
      proc.stdin.write(jsonl(lines));
      await proc.stdin.end();
      await eventually(() => settled(stderr), 15_000, `the stdin pipeline to settle; stderr:\n${stderr}`);
    } finally {
      proc.kill("SIGTERM");
      expect(await proc.exited).toBe(0);
      await db.sql`SELECT pgtrickle.enable_relay(name) FROM pgtrickle.list_relay_configs() WHERE name <> ${name}`;
      await db.sql`SELECT pgtrickle.delete_relay(${name})`;
    }
    return stderr;
  }

  test("run: lines from stdin reach the inbox, SIGTERM exits 0", async () => {
    await runWithStdin("stdin_run", [{ run: 1 }], async () => (await stdinRows({ run: 1 })) === 1);
  });

  test("run: at EOF the stdin pipeline is drained and stays so (not restarted)", async () => {
    const stderr = await runWithStdin("stdin_run2", [{ run: 2 }], async (text) => {
      if ((await stdinRows({ run: 2 })) !== 1 || !/\[stdin_run2\] drained: stdin/.test(text)) return false;
      await Bun.sleep(1000);
      return true;
    });
    expect((stderr.match(/\[stdin_run2\] started:/g) ?? []).length).toBe(1);
  });
});

describe("bring-your-own inbox table", () => {
  test("enable_inbox_tracking's column names and a mapping are honoured; a CHECK violation dead-letters only its row", async () => {
    await db.sql.unsafe(`
      CREATE SCHEMA app;
      CREATE TABLE app.custom_in (
        msg_id       text PRIMARY KEY,
        kind         text NOT NULL CHECK (kind <> 'forbidden'),
        body         jsonb NOT NULL,
        origin       text,
        received     timestamptz NOT NULL,
        processed_at timestamptz,
        attempts     int NOT NULL DEFAULT 0,
        err          text
      )`);
    await db.sql`SELECT pgtrickle.enable_inbox_tracking('custom_in', 'app.custom_in', p_id_column => 'msg_id',
                   p_retry_count_column => 'attempts', p_error_column => 'err', p_received_at_column => 'received',
                   p_event_type_column => 'kind')`;
    const path = join(dir, "custom.jsonl");
    writeFileSync(path, jsonl([{ event_type: "a", v: 1 }, { event_type: "forbidden", v: 2 }, { event_type: "b", v: 3, source: "crm", trace_id: "t" }]));
    await db.sql`SELECT pgtrickle.set_relay_inbox('custom', 'custom_in', ${db.sql.json({ type: "file", input: path } as never)})`;
    await db.sql`UPDATE pgtrickle.relay_inbox_config SET config = jsonb_set(config, '{sink,mapping}', '{"payload": "body", "source": "origin"}') WHERE name = 'custom'`;
    const r = await drain("custom");
    expect(r.exitCode).toBe(4); // dead letters during the run
    expect(r.stderr).toContain("drained, 2 delivered, 1 dead-lettered");
    const rows = await db.sql`SELECT msg_id, kind, body, origin, received IS NOT NULL AS received, processed_at, attempts, err FROM app.custom_in ORDER BY msg_id`;
    expect(rows.map((x) => ({ ...x }))).toEqual([
      { msg_id: `file:${path}:1`, kind: "a", body: { event_type: "a", v: 1 }, origin: `file:${path}`, received: true, processed_at: null, attempts: 0, err: null },
      { msg_id: `file:${path}:3`, kind: "b", body: { event_type: "b", v: 3, source: "crm", trace_id: "t" }, origin: "crm", received: true, processed_at: null, attempts: 0, err: null },
    ]);
    const dl = await deadLetters("custom");
    expect(dl.map((d) => [d.dedup_key, d.error_kind])).toEqual([[`file:${path}:2`, "inbox_permanent"]]);
    expect(dl[0]!.error).toContain("23514");
    expect((await position("custom"))!.offset).toBe(statSync(path).size);
  });

  test("a mapped column that does not exist is a config error naming it", async () => {
    const path = join(dir, "custom.jsonl");
    await db.sql`SELECT pgtrickle.set_relay_inbox('custom_bad', 'custom_in', ${db.sql.json({ type: "file", input: path } as never)})`;
    await db.sql`UPDATE pgtrickle.relay_inbox_config SET config = jsonb_set(config, '{sink,mapping}', '{"payload": "no_such_column"}') WHERE name = 'custom_bad'`;
    const r = await drain("custom_bad");
    expect(r.exitCode).toBe(1);
    expect(r.stderr).toContain('no column "no_such_column" for payload');
  });

  test("direct sink: counts inserted vs dedup-skipped rows, one statement per batch", async () => {
    const counts = { inserted: 0, skipped: 0 };
    const sink = inboxSink({ inbox: "pgtrickle.orders_inbox", on_conflict: "do nothing" }, ctxFor(db, "reverse", counts));
    await sink.start();
    expect(sink.resolved!.statement).toMatch(/^INSERT INTO "pgtrickle"\."orders_inbox" .* FROM jsonb_to_recordset\(\$1::jsonb\) .* ON CONFLICT \("event_id"\) DO NOTHING$/);
    const msg = (k: string): Message =>
      inboundMessage({ pipeline: "direct", sourceType: "test", body: JSON.stringify({ k }), synthesizedKey: `direct:${k}`, config: { event_type_field: "event_type" } });
    expect(await sink.write([msg("a"), msg("b"), msg("a")])).toEqual([]);
    expect(counts).toEqual({ inserted: 2, skipped: 1 });
    expect(await sink.write([msg("a"), msg("b"), msg("c")])).toEqual([]);
    expect(counts).toEqual({ inserted: 3, skipped: 3 });
    await sink.close();
  });
});

describe("missing inbox without pg_trickle", () => {
  test("no table and no create_inbox → a config error naming the table", async () => {
    const bare = await testDatabase("reverse_bare", { fixture: false });
    try {
      const path = join(dir, "bare.jsonl");
      writeFileSync(path, jsonl([{ a: 1 }]));
      await bare.sql`SELECT pgtrickle.set_relay_inbox('bare', 'nowhere_inbox', ${bare.sql.json({ type: "file", input: path } as never)})`;
      const r = await drain("bare", bare);
      expect(r.exitCode).toBe(1);
      expect(r.stderr).toContain('"pgtrickle"."nowhere_inbox" does not exist');
      expect(r.stderr).toContain("create_inbox");
    } finally {
      await bare.drop();
    }
  });
});

describe("forward pg-inbox sink to a remote database", () => {
  let remote: TestDatabase;
  const PASSWORD = "s3cret-Remote-pw";
  beforeAll(async () => {
    remote = await testDatabase("reverse_remote");
    await remote.sql`SELECT pgtrickle.create_inbox('fwd_inbox')`;
  });
  afterAll(async () => {
    await remote?.drop();
  });

  const remoteUrl = () => {
    // Trust auth ignores the password; it is there to prove it never shows up anywhere.
    const u = new URL(remote.url);
    u.password = PASSWORD;
    return u.toString();
  };

  test("outbox rows land in the remote inbox with event_id = dedup key, source = pg_trickle:<schema>.<st>; a replay adds nothing", async () => {
    await createStreamTable(db.sql, "public.orders_fwd", "id int primary key, amount int");
    const t = await enableOutbox(db.sql, "public.orders_fwd");
    await writeV1Inline(db.sql, t.outboxTable, { inserted: [{ id: 1, amount: 10 }, { id: 2, amount: 20 }], deleted: [{ id: 9, amount: 90 }] });
    await writeV1Inline(db.sql, t.outboxTable, { inserted: [{ id: 3, amount: 30 }], deleted: [] });
    await db.sql`SELECT pgtrickle.set_relay_outbox('fwd', 'public.orders_fwd', NULL,
                   ${db.sql.json({ type: "pg-inbox", postgres_url: remoteUrl(), inbox_table: "pgtrickle.fwd_inbox" } as never)})`;
    const r = await drain("fwd");
    expect(r.exitCode).toBe(0);
    expect(r.stderr + r.stdout).not.toContain(PASSWORD);
    const rows = await remote.sql`SELECT event_id, event_type, source, aggregate_id, payload, trace_id, received_at IS NOT NULL AS received FROM pgtrickle.fwd_inbox ORDER BY event_id`;
    const ob = t.outboxTable;
    expect(rows.map((x) => ({ ...x }))).toEqual([
      { event_id: `${ob}:1:0`, event_type: "pgtrickle.orders_fwd.insert", source: "pg_trickle:public.orders_fwd", aggregate_id: null, payload: { id: 1, amount: 10 }, trace_id: null, received: true },
      { event_id: `${ob}:1:1`, event_type: "pgtrickle.orders_fwd.insert", source: "pg_trickle:public.orders_fwd", aggregate_id: null, payload: { id: 2, amount: 20 }, trace_id: null, received: true },
      { event_id: `${ob}:1:2`, event_type: "pgtrickle.orders_fwd.delete", source: "pg_trickle:public.orders_fwd", aggregate_id: null, payload: { id: 9, amount: 90 }, trace_id: null, received: true },
      { event_id: `${ob}:2:0`, event_type: "pgtrickle.orders_fwd.insert", source: "pg_trickle:public.orders_fwd", aggregate_id: null, payload: { id: 3, amount: 30 }, trace_id: null, received: true },
    ]);

    // Replay everything (offset reset): the inbox keeps exactly these rows.
    await db.sql`DELETE FROM pgtrickle.relay_consumer_offsets WHERE pipeline_id = 'fwd'`;
    const replay = await drain("fwd");
    expect(replay.exitCode).toBe(0);
    expect(replay.stderr).toContain("4 delivered");
    expect(await countOf("pgtrickle.fwd_inbox", remote)).toBe(4);
  });

  test("direct: a remote replay is counted as dedup skips", async () => {
    const counts = { inserted: 0, skipped: 0 };
    const sink = inboxSink({ url: remoteUrl(), inbox_table: "fwd_inbox" }, ctxFor(db, "forward", counts));
    await sink.start();
    await sink.write([directMessage("direct:1"), directMessage("direct:2")]);
    await sink.write([directMessage("direct:1"), directMessage("direct:2"), directMessage("direct:3")]);
    expect(counts).toEqual({ inserted: 3, skipped: 2 });
    expect((await remote.sql`SELECT source FROM pgtrickle.fwd_inbox WHERE event_id = 'direct:3'`)[0]!.source).toBe("pg_trickle:s.x");
    await sink.close();
  });

  test("direct: a row the remote inbox can never take (an event_type too long for its index, SQLSTATE 54000) is rejected alone; the others land", async () => {
    await remote.sql`SELECT pgtrickle.create_inbox('fwd_limits_inbox')`;
    await remote.sql`CREATE INDEX ON pgtrickle.fwd_limits_inbox (event_type)`;
    const sink = inboxSink({ url: remoteUrl(), inbox_table: "fwd_limits_inbox" }, ctxFor(db, "forward"));
    await sink.start();
    const rejected = await sink.write([directMessage("limits:1", "ok"), directMessage("limits:2", TOO_LONG_KEY), directMessage("limits:3", "ok")]);
    await sink.close();
    expect(rejected.map((r) => r.message.dedup_key)).toEqual(["limits:2"]);
    expect(rejected[0]!.error).toContain("SQLSTATE 54000");
    expect(rejected[0]!.error).not.toContain(PASSWORD);
    expect((await remote.sql`SELECT event_id FROM pgtrickle.fwd_limits_inbox ORDER BY event_id`).map((r) => r.event_id)).toEqual(["limits:1", "limits:3"]);
  });

  test("a missing remote inbox is a config error naming the table and the server, without the password", async () => {
    const sink = inboxSink({ url: remoteUrl(), inbox: "nope" }, ctxFor(db, "forward"));
    const err = await sink.start().then(() => null, (e) => e);
    await sink.close();
    expect(err).toBeInstanceOf(RelayError);
    expect(err.kind).toBe("config");
    expect(err.message).toContain('"pgtrickle"."nope" does not exist');
    expect(err.message).toContain("127.0.0.1:5432");
    expect(err.message).not.toContain(PASSWORD);
  });

  test("an unreachable remote is a transient error naming host:port, never the password", async () => {
    const url = `postgres://relay:${PASSWORD}@127.0.0.1:1/inboxdb`;
    const sink = inboxSink({ url, inbox: "fwd_inbox" }, ctxFor(db, "forward"));
    const err = await sink.start().then(() => null, (e) => e);
    await sink.close();
    expect(err).toBeInstanceOf(RelayError);
    expect(err.kind).toBe("transient");
    expect(err.message).toContain("127.0.0.1:1");
    expect(err.message).not.toContain(PASSWORD);

    // The same through the relay: the pipeline is degraded and retries; the log names the server.
    await db.sql`SELECT pgtrickle.set_relay_outbox('fwd_down', 'public.orders_fwd', NULL, ${db.sql.json({ type: "pg-inbox", url, inbox_table: "fwd_inbox" } as never)})`;
    await db.sql`SELECT pgtrickle.disable_relay(name) FROM pgtrickle.list_relay_configs() WHERE name <> 'fwd_down'`;
    const relay = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0"]);
    try {
      await relay.waitForLog(/degraded, will retry: .*127\.0\.0\.1:1/);
      expect(relay.stderr).not.toContain(PASSWORD);
    } finally {
      await relay.stop();
      await db.sql`SELECT pgtrickle.enable_relay(name) FROM pgtrickle.list_relay_configs() WHERE name <> 'fwd_down'`;
      await db.sql`SELECT pgtrickle.delete_relay('fwd_down')`;
    }
  });
});

/** openssl: a CA and two server certificates it signed (one for 127.0.0.1, one for another name). */
function makeCertificates(into: string) {
  const run = (args: string[]) => {
    const r = Bun.spawnSync(["openssl", ...args], { cwd: into, stderr: "pipe" });
    if (r.exitCode !== 0) throw new Error(`openssl ${args[0]} failed: ${r.stderr.toString()}`);
  };
  run(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=relay-test-ca"]);
  for (const [name, san] of [
    ["local", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
    ["elsewhere", "subjectAltName=DNS:elsewhere.example"],
  ] as const) {
    run(["req", "-newkey", "rsa:2048", "-nodes", "-keyout", `${name}.key`, "-out", `${name}.csr`, "-subj", `/CN=${name}`]);
    writeFileSync(join(into, `${name}.ext`), san + "\n");
    run(["x509", "-req", "-in", `${name}.csr`, "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", `${name}.pem`, "-days", "2", "-extfile", `${name}.ext`]);
  }
  return { ca: join(into, "ca.pem"), cert: (name: "local" | "elsewhere") => ({ key: readFileSync(join(into, `${name}.key`)), cert: readFileSync(join(into, `${name}.pem`)) }) };
}

/**
 * A TLS-only PostgreSQL front (the test server has no TLS): answers the client's SSLRequest with
 * `S`, terminates TLS with the given certificate and pipes the plaintext to 127.0.0.1:5432.
 * Anything that does not start with an SSLRequest is cut off, so a plaintext client fails.
 */
async function tlsFront(material: { key: Buffer; cert: Buffer }) {
  let handshakes = 0;
  const server = net.createServer((socket) => {
    socket.once("data", (first: Buffer) => {
      if (first.length !== 8 || first.readInt32BE(4) !== 80877103) return void socket.destroy();
      socket.write("S");
      const secure = new tls.TLSSocket(socket, { isServer: true, ...material });
      secure.on("secure", () => handshakes++);
      const upstream = net.connect(5432, "127.0.0.1");
      secure.pipe(upstream).pipe(secure);
      secure.on("error", () => upstream.destroy());
      upstream.on("error", () => secure.destroy());
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    port: (server.address() as net.AddressInfo).port,
    get handshakes() {
      return handshakes;
    },
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

describe("forward pg-inbox sink over TLS", () => {
  let remote: TestDatabase;
  let certs: ReturnType<typeof makeCertificates>;
  let good: Awaited<ReturnType<typeof tlsFront>>;
  let misnamed: Awaited<ReturnType<typeof tlsFront>>;
  beforeAll(async () => {
    remote = await testDatabase("reverse_tls");
    await remote.sql`SELECT pgtrickle.create_inbox('tls_inbox')`;
    certs = makeCertificates(mkdtempSync(join(tmpdir(), "relay-tls-")));
    good = await tlsFront(certs.cert("local"));
    misnamed = await tlsFront(certs.cert("elsewhere"));
  });
  afterAll(async () => {
    await good?.close();
    await misnamed?.close();
    await remote?.drop();
  });

  const urlVia = (port: number, query = "") => `postgres://postgres:tls-Secret-pw@127.0.0.1:${port}/${remote.name}${query}`;
  const base = { inbox_table: "tls_inbox" };
  const msg = (k: string): Message => ({ dedup_key: k, subject: "tls", payload: { k }, op: "insert", is_full_refresh: false, outbox_id: 1, refresh_id: null, context: { pipeline: "tls" } });

  async function attempt(cfg: Record<string, unknown>, key: string): Promise<RelayError | null> {
    const sink = inboxSink({ ...base, ...cfg }, ctxFor(db, "forward"));
    try {
      await sink.start();
      await sink.write([msg(key)]);
      return null;
    } catch (err) {
      return err as RelayError;
    } finally {
      await sink.close();
    }
  }

  test("verify-full with the CA (tls_ca, or sslrootcert in the URL) writes through TLS", async () => {
    const before = good.handshakes;
    expect(await attempt({ url: urlVia(good.port, "?sslmode=verify-full"), tls_ca: certs.ca }, "tls:1")).toBeNull();
    expect(await attempt({ url: urlVia(good.port, `?sslmode=verify-full&sslrootcert=${encodeURIComponent(certs.ca)}`) }, "tls:2")).toBeNull();
    expect(await attempt({ url: urlVia(good.port), ssl: "verify-full", tls_ca: certs.ca }, "tls:3")).toBeNull();
    // tls_ca alone means verify-full.
    expect(await attempt({ url: urlVia(good.port), tls_ca: certs.ca }, "tls:4")).toBeNull();
    expect(good.handshakes).toBeGreaterThanOrEqual(before + 4);
    expect((await remote.sql`SELECT event_id FROM pgtrickle.tls_inbox ORDER BY 1`).map((r) => r.event_id)).toEqual(["tls:1", "tls:2", "tls:3", "tls:4"]);
  });

  test("require encrypts without verifying; verify-full without the CA is refused", async () => {
    expect(await attempt({ url: urlVia(good.port, "?sslmode=require") }, "tls:5")).toBeNull();
    const err = await attempt({ url: urlVia(good.port, "?sslmode=verify-full") }, "tls:6");
    expect(err).toBeInstanceOf(RelayError);
    expect(err!.message).toContain(`127.0.0.1:${good.port}`);
    expect(err!.message).toContain("certificate");
    expect(err!.message).not.toContain("tls-Secret-pw");
  });

  test("verify-full checks the host name, verify-ca does not", async () => {
    expect(await attempt({ url: urlVia(misnamed.port, "?sslmode=verify-ca"), tls_ca: certs.ca }, "tls:7")).toBeNull();
    const err = await attempt({ url: urlVia(misnamed.port, "?sslmode=verify-full"), tls_ca: certs.ca }, "tls:8");
    expect(err).toBeInstanceOf(RelayError);
    expect(err!.message).toMatch(/altnames|host ?name/i);
    expect(await countOf("pgtrickle.tls_inbox WHERE event_id = 'tls:8'", remote)).toBe(0);
  });

  test("without TLS the TLS-only server cannot be reached; a bad sslmode or CA path is a config error", async () => {
    // The front drops a plaintext startup; postgres.js would reconnect for ever: timeout_ms ends it.
    const plain = await attempt({ url: urlVia(good.port, "?sslmode=disable"), timeout_ms: 1000 }, "tls:9");
    expect(plain?.kind).toBe("transient");
    expect(plain?.message).toContain(`127.0.0.1:${good.port}`);
    const badMode = await attempt({ url: urlVia(good.port, "?sslmode=sometimes") }, "tls:9");
    expect(badMode?.kind).toBe("config");
    expect(badMode?.message).toContain("sslmode=sometimes");
    const missingCa = await attempt({ url: urlVia(good.port), tls_ca: "/nonexistent/ca.pem" }, "tls:10");
    expect(missingCa?.kind).toBe("config");
    expect(missingCa?.message).toContain("/nonexistent/ca.pem");
  }, 30_000);
});

describe("crash safety", () => {
  test("kill -9 mid-file, then drain again: every line exactly once", async () => {
    const N = 20_000;
    const path = join(dir, "big.jsonl");
    writeFileSync(path, Array.from({ length: N }, (_, i) => JSON.stringify({ i, pad: "x".repeat(40) }) + "\n").join(""));
    await db.sql`SELECT pgtrickle.set_relay_inbox('big', 'big_inbox', ${db.sql.json({ type: "file", input: path, batch_size: 50 } as never)})`;
    // Create the inbox first, so the kill lands in the middle of the copying.
    await db.sql`SELECT pgtrickle.create_inbox('big_inbox')`;
    const proc = Bun.spawn(relayCommand(["drain", "--postgres-url", db.url, "--pipeline", "big"]), { stdout: "ignore", stderr: "ignore" });
    await eventually(async () => (await countOf("pgtrickle.big_inbox")) >= N / 10, 30_000, "a tenth of the file in the inbox");
    proc.kill("SIGKILL");
    await proc.exited;
    const landed = await countOf("pgtrickle.big_inbox");
    expect(landed).toBeLessThan(N);
    const pos = await position("big");
    // The committed position never runs ahead of the inbox.
    expect(pos ? pos.line - 1 : 0).toBeLessThanOrEqual(landed);

    const r = await drain("big");
    expect(r.exitCode).toBe(0);
    const [stats] = await db.sql`SELECT count(*)::int AS n, count(DISTINCT event_id)::int AS d, min((payload->>'i')::int) AS lo, max((payload->>'i')::int) AS hi FROM pgtrickle.big_inbox`;
    expect(stats).toEqual({ n: N, d: N, lo: 0, hi: N - 1 });
    expect((await position("big"))!.offset).toBe(statSync(path).size);
  }, 120_000);
});

/** A forward message written straight into a remote inbox by the sink's own write(). */
function directMessage(key: string, subject = "s"): Message {
  return {
    dedup_key: key,
    subject,
    payload: { k: key },
    op: "insert",
    is_full_refresh: false,
    outbox_id: 1,
    refresh_id: null,
    context: { pipeline: "direct", stream_table: "x", schema: "s" },
  };
}
