// The relay catalog (docs/interface.md §3, the relay-only objects of §3.5 included) against a real
// PostgreSQL: install/status/require, every SQL function, the NOTIFY trigger and the grants.
import { afterAll, beforeAll, beforeEach, describe, expect, test } from "bun:test";
import { connect, type Sql } from "../../src/db.ts";
import { RelayError } from "../../src/errors.ts";
import { installCatalog } from "../../src/catalog/install.ts";
import { CATALOG_SQL, CATALOG_VERSION, catalogSections } from "../../src/catalog/objects.ts";
import { catalogStatus, formatCatalogStatus, requireCatalog } from "../../src/catalog/status.ts";
import { PG_ADMIN_URL, testDatabase, type TestDatabase } from "../helpers/pg.ts";

const NOT_FOUND = (name: string) => `relay: pipeline "${name}" not found in relay_outbox_config or relay_inbox_config`;
const SINK_TYPE_MSG = 'relay.invalid_config: sink JSONB must contain a "type" key';
const SINK_TYPE_LIST = '(e.g. "nats", "kafka", "http", "redis", "sqs", "rabbitmq", "stdout", "pg-inbox")';
const SOURCE_TYPE_MSG = 'relay.invalid_config: source JSONB must contain a "type" key';
const SOURCE_TYPE_LIST = '(e.g. "kafka", "nats", "http", "redis", "sqs", "rabbitmq", "stdin")';

const CORE_FUNCTIONS = [
  "set_relay_outbox(text,text,text,jsonb,integer,boolean)",
  "set_relay_inbox(text,text,jsonb,integer,text,boolean,integer,boolean)",
  "enable_relay(text)",
  "disable_relay(text)",
  "delete_relay(text)",
  "get_relay_config(text)",
  "list_relay_configs()",
];

interface PgError {
  code: string;
  message: string;
}

async function pgError(p: Promise<unknown>): Promise<PgError> {
  try {
    await p;
  } catch (err) {
    return err as PgError;
  }
  throw new Error("expected the statement to fail");
}

function urlAs(url: string, user: string): string {
  const u = new URL(url);
  u.username = user;
  u.password = "";
  return u.toString();
}

async function waitFor(cond: () => boolean, what: string, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await Bun.sleep(10);
  }
}

async function configOf(sql: Sql, table: "relay_outbox_config" | "relay_inbox_config", name: string) {
  const rows = await sql<{ enabled: boolean; config: unknown }[]>`
    SELECT enabled, config FROM ${sql("pgtrickle")}.${sql(table)} WHERE name = ${name}`;
  return rows[0];
}

let db: TestDatabase;
let sql: Sql;

beforeAll(async () => {
  db = await testDatabase("catalog", { fixture: false, catalog: false });
  sql = db.sql;
}, 30_000);

afterAll(async () => {
  await db?.drop();
});

describe("catalog.sql", () => {
  test("has the common, core and relay sections, in that order", () => {
    const s = catalogSections();
    expect(Object.keys(s)).toEqual(["common", "core", "relay"]);
    expect(s.common).toContain("CREATE SCHEMA IF NOT EXISTS pgtrickle");
    expect(s.core).toContain("CREATE TABLE IF NOT EXISTS pgtrickle.relay_outbox_config");
    expect(s.relay).toContain("CREATE TABLE IF NOT EXISTS pgtrickle.relay_dead_letters");
    expect(s.relay).toContain(`VALUES ('${CATALOG_VERSION}')`);
    expect(CATALOG_SQL.length).toBeGreaterThan(s.common.length + s.core.length + s.relay.length);
  });
});

describe("install and status on an empty database", () => {
  test("status says missing and requireCatalog fails with a config error naming the fix", async () => {
    const st = await catalogStatus(sql);
    expect(st.database).toBe(db.name);
    expect(st.relayCatalog.state).toBe("missing");
    expect(st.relayCatalog.owner).toBeNull();
    expect(st.relayCatalog.version).toBeNull();
    expect(st.relayOnly.state).toBe("missing");
    expect(st.outboxApi.state).toBe("missing");
    expect(st.inboxApi.state).toBe("missing");
    expect(st.extension.installed).toBe(false);
    expect(st.era).toBe("none");
    expect(formatCatalogStatus(st)).toContain("relay catalog: missing — run `pgtrickle-relay catalog install`");

    const err = await requireCatalog(sql).then(
      () => null,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(RelayError);
    expect((err as RelayError).kind).toBe("config");
    expect((err as RelayError).message).toStartWith(`relay catalog not found in database "${db.name}"`);
    expect((err as RelayError).message).toEndWith(": run `pgtrickle-relay catalog install`");
  });

  test("the first install creates every object and grant", async () => {
    const r = await installCatalog(sql);
    expect(r.database).toBe(db.name);
    expect(r.owner).toBe("relay");
    expect(r.ownerExtension).toBeNull();
    expect(r.version).toBe(CATALOG_VERSION);
    expect(r.previousVersion).toBeNull();
    expect(r.nothingToDo).toBe(false);
    expect(r.skipped).toEqual([]);
    const expected = [
      "schema pgtrickle",
      "table pgtrickle.relay_outbox_config",
      "table pgtrickle.relay_inbox_config",
      "table pgtrickle.relay_consumer_offsets",
      "function pgtrickle.relay_config_notify()",
      "trigger relay_outbox_config_notify on pgtrickle.relay_outbox_config",
      "trigger relay_inbox_config_notify on pgtrickle.relay_inbox_config",
      ...CORE_FUNCTIONS.map((f) => `function pgtrickle.${f}`),
      "table pgtrickle.relay_dead_letters",
      "table pgtrickle.relay_catalog_version",
      "index pgtrickle.relay_dead_letters_replay_pending",
      "function pgtrickle.replay_relay_dead_letters(text,bigint)",
    ];
    for (const label of expected) expect(r.created).toContain(label);
    expect(r.granted).toContain("GRANT USAGE ON SCHEMA pgtrickle TO pgtrickle_relay");
    expect(r.granted).toContain("GRANT SELECT ON pgtrickle.relay_outbox_config TO pgtrickle_relay");
    expect(r.granted).toContain("GRANT UPDATE ON pgtrickle.relay_consumer_offsets TO pgtrickle_relay");
    expect(r.granted).toContain("GRANT INSERT ON pgtrickle.relay_dead_letters TO pgtrickle_relay");
    expect(r.granted).toContain("GRANT USAGE ON SEQUENCE pgtrickle.relay_dead_letters_id_seq TO pgtrickle_relay");
    expect(r.summary).toContain(`relay catalog version 1 installed in database ${db.name}: created`);
  });

  test("a second install changes nothing and says so", async () => {
    const r = await installCatalog(sql);
    expect(r.nothingToDo).toBe(true);
    expect(r.created).toEqual([]);
    expect(r.updated).toEqual([]);
    expect(r.granted).toEqual([]);
    expect(r.revoked).toEqual([]);
    expect(r.previousVersion).toBe("1");
    expect(r.unchanged).toContain("table pgtrickle.relay_outbox_config");
    expect(r.summary).toBe(`relay catalog version 1 already installed in database ${db.name}: nothing to do`);
  });

  test("status after install: complete, owned by the relay, version 1, every grant held", async () => {
    const st = await catalogStatus(sql);
    expect(st.relayCatalog.state).toBe("complete");
    expect(st.relayCatalog.owner).toBe("relay");
    expect(st.relayCatalog.version).toBe("1");
    expect(st.relayCatalog.missing).toEqual([]);
    expect(st.relayOnly.state).toBe("complete");
    expect(st.grants.roleExists).toBe(true);
    expect(st.grants.missing).toEqual([]);
    expect(st.grants.publicExecute).toEqual([]);
    expect(st.access.missing).toEqual([]);
    const text = formatCatalogStatus(st);
    expect(text).toContain("relay catalog: complete, installed by the relay, version 1");
    expect(text).toContain("dead letters:  present");
    const ok = await requireCatalog(sql);
    expect(ok.relayCatalog.state).toBe("complete");
  });

  test("tables have exactly the contract's columns", async () => {
    const cols = await sql<{ table_name: string; column_name: string; data_type: string; is_nullable: string; column_default: string | null }[]>`
      SELECT table_name, column_name, data_type, is_nullable, column_default
        FROM information_schema.columns
       WHERE table_schema = 'pgtrickle'
         AND table_name IN ('relay_outbox_config', 'relay_inbox_config', 'relay_consumer_offsets', 'relay_dead_letters', 'relay_source_positions')
       ORDER BY table_name, ordinal_position`;
    const shape = (t: string) =>
      cols.filter((c) => c.table_name === t).map((c) => [c.column_name, c.data_type, c.is_nullable, c.column_default]);
    const config = [
      ["name", "text", "NO", null],
      ["enabled", "boolean", "NO", "true"],
      ["config", "jsonb", "NO", null],
    ];
    expect(shape("relay_outbox_config")).toEqual(config);
    expect(shape("relay_inbox_config")).toEqual(config);
    expect(shape("relay_consumer_offsets")).toEqual([
      ["relay_group_id", "text", "NO", null],
      ["pipeline_id", "text", "NO", null],
      ["last_change_id", "bigint", "NO", "0"],
      ["worker_id", "text", "YES", null],
      ["updated_at", "timestamp with time zone", "NO", "now()"],
    ]);
    expect(shape("relay_dead_letters")).toEqual([
      ["id", "bigint", "NO", "nextval('pgtrickle.relay_dead_letters_id_seq'::regclass)"],
      ["pipeline", "text", "NO", null],
      ["direction", "text", "NO", null],
      ["dedup_key", "text", "NO", null],
      ["outbox_id", "bigint", "YES", null],
      ["message", "jsonb", "YES", null],
      ["error", "text", "NO", null],
      ["error_kind", "text", "NO", null],
      ["attempts", "integer", "NO", "1"],
      ["first_seen_at", "timestamp with time zone", "NO", "now()"],
      ["last_seen_at", "timestamp with time zone", "NO", "now()"],
      ["replay_requested_at", "timestamp with time zone", "YES", null],
      ["resolved_at", "timestamp with time zone", "YES", null],
    ]);
    expect(shape("relay_source_positions")).toEqual([
      ["relay_group_id", "text", "NO", null],
      ["pipeline", "text", "NO", null],
      ["direction", "text", "NO", null],
      ["position", "text", "NO", null],
      ["updated_at", "timestamp with time zone", "NO", "now()"],
    ]);
    const pks = await sql<{ rel: string; def: string }[]>`
      SELECT conrelid::regclass::text AS rel, pg_get_constraintdef(oid) AS def FROM pg_constraint
       WHERE connamespace = 'pgtrickle'::regnamespace AND contype IN ('p', 'u') ORDER BY 1, 2`;
    expect(pks.map((p) => `${p.rel} ${p.def}`)).toEqual([
      "pgtrickle.relay_catalog_version PRIMARY KEY (singleton)",
      "pgtrickle.relay_consumer_offsets PRIMARY KEY (relay_group_id, pipeline_id)",
      "pgtrickle.relay_dead_letters PRIMARY KEY (id)",
      "pgtrickle.relay_dead_letters UNIQUE (pipeline, direction, dedup_key)",
      "pgtrickle.relay_inbox_config PRIMARY KEY (name)",
      "pgtrickle.relay_outbox_config PRIMARY KEY (name)",
      "pgtrickle.relay_pipeline_status PRIMARY KEY (relay_group_id, pipeline, direction)",
      "pgtrickle.relay_source_positions PRIMARY KEY (relay_group_id, pipeline, direction)",
    ]);
  });

  test("functions: exact arguments and defaults, SECURITY DEFINER, pinned search_path, not executable by PUBLIC", async () => {
    const fns = await sql<{ sig: string; args: string; result: string; definer: boolean; config: string[] | null; lang: string; public_exec: boolean }[]>`
      SELECT p.oid::regprocedure::text AS sig, pg_get_function_arguments(p.oid) AS args,
             pg_get_function_result(p.oid) AS result, p.prosecdef AS definer, p.proconfig AS config,
             l.lanname AS lang, has_function_privilege('public', p.oid, 'EXECUTE') AS public_exec
        FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
       WHERE p.pronamespace = 'pgtrickle'::regnamespace ORDER BY 1`;
    const bySig = Object.fromEntries(fns.map((f) => [f.sig.replace(/^pgtrickle\./, ""), f]));
    expect(Object.keys(bySig).sort()).toEqual(
      [
        "delete_relay(text)",
        "disable_relay(text)",
        "enable_relay(text)",
        "get_relay_config(text)",
        "list_relay_configs()",
        "relay_config_notify()",
        "replay_relay_dead_letters(text,bigint)",
        "set_relay_inbox(text,text,jsonb,integer,text,boolean,integer,boolean)",
        "set_relay_outbox(text,text,text,jsonb,integer,boolean)",
      ].sort(),
    );
    for (const f of fns) {
      expect(f.definer).toBe(true);
      expect(f.lang).toBe("plpgsql");
      expect(f.config).toEqual(["search_path=pgtrickle, pg_catalog, pg_temp"]);
      expect(f.public_exec).toBe(false);
    }
    expect(bySig["set_relay_outbox(text,text,text,jsonb,integer,boolean)"]!.args).toBe(
      "p_name text, p_outbox text, p_group text, p_sink jsonb, p_retention_hours integer DEFAULT 24, p_enabled boolean DEFAULT true",
    );
    expect(bySig["set_relay_inbox(text,text,jsonb,integer,text,boolean,integer,boolean)"]!.args).toBe(
      "p_name text, p_inbox text, p_source jsonb, p_max_retries integer DEFAULT 3, p_schedule text DEFAULT '1s'::text, " +
        "p_with_dead_letter boolean DEFAULT true, p_retention_hours integer DEFAULT 24, p_enabled boolean DEFAULT true",
    );
    expect(bySig["get_relay_config(text)"]!.result).toBe("TABLE(name text, direction text, enabled boolean, config jsonb)");
    expect(bySig["list_relay_configs()"]!.result).toBe("TABLE(name text, direction text, enabled boolean, config jsonb)");
    expect(bySig["replay_relay_dead_letters(text,bigint)"]!.args).toBe("p_pipeline text, p_id bigint DEFAULT NULL::bigint");
    expect(bySig["replay_relay_dead_letters(text,bigint)"]!.result).toBe("integer");
    expect(bySig["relay_config_notify()"]!.result).toBe("trigger");

    const trg = await sql<{ tgname: string; def: string }[]>`
      SELECT tgname, pg_get_triggerdef(oid) AS def FROM pg_trigger
       WHERE tgrelid IN ('pgtrickle.relay_outbox_config'::regclass, 'pgtrickle.relay_inbox_config'::regclass)
         AND NOT tgisinternal ORDER BY 1`;
    expect(trg.map((t) => t.def)).toEqual([
      "CREATE TRIGGER relay_inbox_config_notify AFTER INSERT OR DELETE OR UPDATE ON pgtrickle.relay_inbox_config FOR EACH ROW EXECUTE FUNCTION pgtrickle.relay_config_notify()",
      "CREATE TRIGGER relay_outbox_config_notify AFTER INSERT OR DELETE OR UPDATE ON pgtrickle.relay_outbox_config FOR EACH ROW EXECUTE FUNCTION pgtrickle.relay_config_notify()",
    ]);
    const role = await sql`SELECT rolcanlogin FROM pg_roles WHERE rolname = 'pgtrickle_relay'`;
    expect(role[0]?.rolcanlogin).toBe(false);
  });
});

describe("SQL functions", () => {
  beforeEach(async () => {
    // TRUNCATE fires no row triggers, so no stray notifications.
    await sql`TRUNCATE pgtrickle.relay_outbox_config, pgtrickle.relay_inbox_config,
                       pgtrickle.relay_consumer_offsets, pgtrickle.relay_dead_letters`;
  });

  test("set_relay_outbox stores the exact config JSON with the defaults", async () => {
    const sink = { type: "nats", url: "nats://127.0.0.1:4222", subject: "orders.{op}", nested: { a: [1, 2] } };
    await sql`SELECT pgtrickle.set_relay_outbox('orders', 'outbox_orders', NULL, ${sql.json(sink)})`;
    expect(await configOf(sql, "relay_outbox_config", "orders")).toEqual({
      enabled: true,
      config: {
        source_type: "outbox",
        source: { outbox: "outbox_orders", group: null, retention_hours: 24 },
        sink_type: "nats",
        sink,
      },
    });
  });

  test("set_relay_outbox upserts: a second call overwrites enabled AND config", async () => {
    await sql`SELECT pgtrickle.set_relay_outbox('p', 'outbox_a', NULL, '{"type":"nats","subject":"a"}')`;
    await sql`SELECT pgtrickle.set_relay_outbox('p', 'outbox_b', 'grp', '{"type":"kafka","topic":"b"}', 48, false)`;
    expect(await configOf(sql, "relay_outbox_config", "p")).toEqual({
      enabled: false,
      config: {
        source_type: "outbox",
        source: { outbox: "outbox_b", group: "grp", retention_hours: 48 },
        sink_type: "kafka",
        sink: { type: "kafka", topic: "b" },
      },
    });
    await sql`SELECT pgtrickle.set_relay_outbox('p', 'outbox_b', 'grp', '{"type":"kafka","topic":"b"}', 48)`;
    expect((await configOf(sql, "relay_outbox_config", "p"))?.enabled).toBe(true);
    const n = await sql`SELECT count(*)::int AS n FROM pgtrickle.relay_outbox_config`;
    expect(n[0]?.n).toBe(1);
  });

  test("set_relay_outbox rejects a sink without type, with an empty type, and an empty/NULL outbox (P0001)", async () => {
    const noType = await pgError(sql`SELECT pgtrickle.set_relay_outbox('x', 'outbox_x', NULL, '{"url":"u"}')`);
    expect(noType.code).toBe("P0001");
    expect(noType.message).toStartWith(SINK_TYPE_MSG);
    expect(noType.message).toBe(`${SINK_TYPE_MSG} ${SINK_TYPE_LIST}. Got an object with keys url`); // keys only: values may be secrets

    const emptyType = await pgError(sql`SELECT pgtrickle.set_relay_outbox('x', 'outbox_x', NULL, '{"type":""}')`);
    expect(emptyType.code).toBe("P0001");
    expect(emptyType.message).toBe(`${SINK_TYPE_MSG} ${SINK_TYPE_LIST}. Got an object with keys type`);

    const emptyOutbox = await pgError(sql`SELECT pgtrickle.set_relay_outbox('x', '', NULL, '{"type":"nats"}')`);
    expect(emptyOutbox.code).toBe("P0001");
    expect(emptyOutbox.message).toBe("relay.invalid_config: outbox name must not be empty");

    const nullOutbox = await pgError(sql`SELECT pgtrickle.set_relay_outbox('x', NULL, NULL, '{"type":"nats"}')`);
    expect(nullOutbox.code).toBe("P0001");
    expect(nullOutbox.message).toBe("relay.invalid_config: outbox name must not be empty");

    expect(await configOf(sql, "relay_outbox_config", "x")).toBeUndefined();
  });

  test("set_relay_inbox stores the exact config JSON with the defaults, and overrides", async () => {
    const source = { type: "kafka", brokers: ["127.0.0.1:9092"], topic: "orders" };
    await sql`SELECT pgtrickle.set_relay_inbox('in1', 'orders_inbox', ${sql.json(source)})`;
    expect(await configOf(sql, "relay_inbox_config", "in1")).toEqual({
      enabled: true,
      config: {
        source_type: "kafka",
        source,
        sink_type: "pg-inbox",
        sink: { inbox: "orders_inbox", max_retries: 3, schedule: "1s", with_dead_letter: true, retention_hours: 24 },
      },
    });
    await sql`SELECT pgtrickle.set_relay_inbox('in1', 'other_inbox', '{"type":"nats","subject":"s"}', 5, '10s', false, 72, false)`;
    expect(await configOf(sql, "relay_inbox_config", "in1")).toEqual({
      enabled: false,
      config: {
        source_type: "nats",
        source: { type: "nats", subject: "s" },
        sink_type: "pg-inbox",
        sink: { inbox: "other_inbox", max_retries: 5, schedule: "10s", with_dead_letter: false, retention_hours: 72 },
      },
    });
  });

  test("set_relay_inbox rejects a source without type, with an empty type, and an empty/NULL inbox (P0001)", async () => {
    const noType = await pgError(sql`SELECT pgtrickle.set_relay_inbox('x', 'inbox_x', '{"topic":"t"}')`);
    expect(noType.code).toBe("P0001");
    expect(noType.message).toStartWith(SOURCE_TYPE_MSG);
    expect(noType.message).toBe(`${SOURCE_TYPE_MSG} ${SOURCE_TYPE_LIST}. Got an object with keys topic`);

    const emptyType = await pgError(sql`SELECT pgtrickle.set_relay_inbox('x', 'inbox_x', '{"type":""}')`);
    expect(emptyType.code).toBe("P0001");
    expect(emptyType.message).toStartWith(SOURCE_TYPE_MSG);

    const emptyInbox = await pgError(sql`SELECT pgtrickle.set_relay_inbox('x', '', '{"type":"nats"}')`);
    expect(emptyInbox.code).toBe("P0001");
    expect(emptyInbox.message).toBe("relay.invalid_config: inbox name must not be empty");

    for (const name of ["", "a b", "-x"]) {
      const badName = await pgError(sql`SELECT pgtrickle.set_relay_inbox(${name}, 'inbox_x', '{"type":"nats"}')`);
      expect(badName.code).toBe("P0001");
      expect(badName.message).toContain(`pipeline name '${name}' is not valid`);
    }

    const nullInbox = await pgError(sql`SELECT pgtrickle.set_relay_inbox('x', NULL, '{"type":"nats"}')`);
    expect(nullInbox.code).toBe("P0001");
    expect(nullInbox.message).toBe("relay.invalid_config: inbox name must not be empty");

    expect(await configOf(sql, "relay_inbox_config", "x")).toBeUndefined();
  });

  test("enable_relay / disable_relay act on both tables; unknown names fail with P0002", async () => {
    await sql`SELECT pgtrickle.set_relay_outbox('both', 'outbox_b', NULL, '{"type":"stdout"}')`;
    await sql`SELECT pgtrickle.set_relay_inbox('both', 'inbox_b', '{"type":"stdin"}')`;
    await sql`SELECT pgtrickle.set_relay_outbox('fwd_only', 'outbox_f', NULL, '{"type":"stdout"}')`;

    await sql`SELECT pgtrickle.disable_relay('both')`;
    expect((await configOf(sql, "relay_outbox_config", "both"))?.enabled).toBe(false);
    expect((await configOf(sql, "relay_inbox_config", "both"))?.enabled).toBe(false);
    expect((await configOf(sql, "relay_outbox_config", "fwd_only"))?.enabled).toBe(true);

    await sql`SELECT pgtrickle.enable_relay('both')`;
    expect((await configOf(sql, "relay_outbox_config", "both"))?.enabled).toBe(true);
    expect((await configOf(sql, "relay_inbox_config", "both"))?.enabled).toBe(true);

    await sql`SELECT pgtrickle.disable_relay('fwd_only')`;
    expect((await configOf(sql, "relay_outbox_config", "fwd_only"))?.enabled).toBe(false);
    // Enabling an enabled pipeline still matches a row: no error.
    await sql`SELECT pgtrickle.enable_relay('both')`;

    for (const fn of ["enable_relay", "disable_relay", "delete_relay"]) {
      const e = await pgError(sql`SELECT ${sql("pgtrickle")}.${sql(fn)}('nope')`);
      expect(e.code).toBe("P0002");
      expect(e.message).toBe(NOT_FOUND("nope"));
    }
  });

  test("delete_relay removes the name from both tables and keeps its offsets", async () => {
    await sql`SELECT pgtrickle.set_relay_outbox('both', 'outbox_b', NULL, '{"type":"stdout"}')`;
    await sql`SELECT pgtrickle.set_relay_inbox('both', 'inbox_b', '{"type":"stdin"}')`;
    await sql`SELECT pgtrickle.set_relay_outbox('keep', 'outbox_k', NULL, '{"type":"stdout"}')`;
    await sql`INSERT INTO pgtrickle.relay_consumer_offsets (relay_group_id, pipeline_id, last_change_id) VALUES ('default', 'both', 42)`;

    await sql`SELECT pgtrickle.delete_relay('both')`;
    expect(await configOf(sql, "relay_outbox_config", "both")).toBeUndefined();
    expect(await configOf(sql, "relay_inbox_config", "both")).toBeUndefined();
    expect(await configOf(sql, "relay_outbox_config", "keep")).toBeDefined();
    const off = await sql`SELECT last_change_id FROM pgtrickle.relay_consumer_offsets WHERE pipeline_id = 'both'`;
    expect(off[0]?.last_change_id).toBe("42");

    const again = await pgError(sql`SELECT pgtrickle.delete_relay('both')`);
    expect(again.code).toBe("P0002");
    expect(again.message).toBe(NOT_FOUND("both"));
  });

  test("get_relay_config returns forward and reverse rows; unknown names fail with P0002", async () => {
    await sql`SELECT pgtrickle.set_relay_outbox('both', 'outbox_b', NULL, '{"type":"stdout"}', 24, false)`;
    await sql`SELECT pgtrickle.set_relay_inbox('both', 'inbox_b', '{"type":"stdin"}')`;
    await sql`SELECT pgtrickle.set_relay_outbox('fwd', 'outbox_f', 'g', '{"type":"http","url":"http://x"}')`;

    const both = await sql<{ name: string; direction: string; enabled: boolean; config: { sink_type: string } }[]>`
      SELECT * FROM pgtrickle.get_relay_config('both') ORDER BY direction`;
    expect(both.map((r) => [r.name, r.direction, r.enabled, r.config.sink_type])).toEqual([
      ["both", "forward", false, "stdout"],
      ["both", "reverse", true, "pg-inbox"],
    ]);
    const fwd = await sql`SELECT * FROM pgtrickle.get_relay_config('fwd')`;
    expect(fwd.length).toBe(1);
    expect(fwd[0]).toEqual({
      name: "fwd",
      direction: "forward",
      enabled: true,
      config: {
        source_type: "outbox",
        source: { outbox: "outbox_f", group: "g", retention_hours: 24 },
        sink_type: "http",
        sink: { type: "http", url: "http://x" },
      },
    });
    const e = await pgError(sql`SELECT * FROM pgtrickle.get_relay_config('nope')`);
    expect(e.code).toBe("P0002");
    expect(e.message).toBe(NOT_FOUND("nope"));
  });

  test("list_relay_configs returns every pipeline of both tables ordered by name, disabled ones included", async () => {
    expect((await sql`SELECT * FROM pgtrickle.list_relay_configs()`).length).toBe(0);
    await sql`SELECT pgtrickle.set_relay_outbox('c', 'outbox_c', NULL, '{"type":"stdout"}')`;
    await sql`SELECT pgtrickle.set_relay_inbox('a', 'inbox_a', '{"type":"stdin"}', 3, '1s', true, 24, false)`;
    await sql`SELECT pgtrickle.set_relay_outbox('b', 'outbox_b', NULL, '{"type":"stdout"}', 24, false)`;
    await sql`SELECT pgtrickle.set_relay_inbox('b', 'inbox_b', '{"type":"stdin"}')`;
    const rows = await sql<{ name: string; direction: string; enabled: boolean }[]>`SELECT * FROM pgtrickle.list_relay_configs()`;
    expect(rows.map((r) => [r.name, r.direction, r.enabled])).toEqual([
      ["a", "reverse", false],
      ["b", "forward", false],
      ["b", "reverse", true],
      ["c", "forward", true],
    ]);
    expect(Object.keys(rows[0]!)).toEqual(["name", "direction", "enabled", "config"]);
  });

  test("every row change sends NOTIFY pgtrickle_relay_config with direction = table name, event, name, enabled", async () => {
    const listener = connect(db.url, { max: 1 });
    const got: unknown[] = [];
    const raw: string[] = [];
    try {
      await listener.listen("pgtrickle_relay_config", (payload) => {
        raw.push(payload);
        got.push(JSON.parse(payload));
      });
      await sql`SELECT pgtrickle.set_relay_outbox('n1', 'outbox_n', NULL, '{"type":"stdout"}')`; // INSERT
      await sql`SELECT pgtrickle.set_relay_outbox('n1', 'outbox_n', NULL, '{"type":"stdout"}', 24, false)`; // UPDATE
      await sql`SELECT pgtrickle.enable_relay('n1')`; // UPDATE
      await sql`UPDATE pgtrickle.relay_outbox_config SET enabled = enabled WHERE name = 'n1'`; // no-op UPDATE fires too
      await sql`SELECT pgtrickle.set_relay_inbox('n1', 'inbox_n', '{"type":"stdin"}', 3, '1s', true, 24, false)`; // INSERT
      await sql`SELECT pgtrickle.disable_relay('n1')`; // two UPDATEs
      await sql`SELECT pgtrickle.enable_relay('n1')`; // two UPDATEs
      await sql`SELECT pgtrickle.disable_relay('n1')`; // two UPDATEs
      await sql`UPDATE pgtrickle.relay_inbox_config SET enabled = true WHERE name = 'n1'`;
      await sql`UPDATE pgtrickle.relay_outbox_config SET name = 'n2' WHERE name = 'n1'`; // rename: new name
      await sql`SELECT pgtrickle.delete_relay('n2')`; // DELETE reports the deleted row's flag (false)
      await sql`SELECT pgtrickle.delete_relay('n1')`; // DELETE of the inbox row (true)
      await waitFor(() => got.length >= 15, "15 notifications");
      await Bun.sleep(100);
    } finally {
      await listener.end({ timeout: 1 });
    }
    const O = "relay_outbox_config";
    const I = "relay_inbox_config";
    const n = (direction: string, event: string, name: string, enabled: boolean) => ({ direction, event, name, enabled });
    expect(got).toEqual([
      n(O, "INSERT", "n1", true),
      n(O, "UPDATE", "n1", false),
      n(O, "UPDATE", "n1", true),
      n(O, "UPDATE", "n1", true),
      n(I, "INSERT", "n1", false),
      n(O, "UPDATE", "n1", false),
      n(I, "UPDATE", "n1", false),
      n(O, "UPDATE", "n1", true),
      n(I, "UPDATE", "n1", true),
      n(O, "UPDATE", "n1", false),
      n(I, "UPDATE", "n1", false),
      n(I, "UPDATE", "n1", true),
      n(O, "UPDATE", "n2", false),
      n(O, "DELETE", "n2", false),
      n(I, "DELETE", "n1", true),
    ]);
    for (const p of raw) expect(Object.keys(JSON.parse(p))).toEqual(["direction", "event", "name", "enabled"]);
  });

  test("replay_relay_dead_letters marks unresolved rows of a pipeline (or one id) and returns the count", async () => {
    const ids = await sql<{ id: string; dedup_key: string }[]>`
      INSERT INTO pgtrickle.relay_dead_letters (pipeline, direction, dedup_key, outbox_id, message, error, error_kind, resolved_at)
      VALUES ('p', 'forward', 'k1', 1, '{"a":1}', 'HTTP 400', 'permanent', NULL),
             ('p', 'forward', 'k2', 2, '{"a":2}', 'HTTP 400', 'permanent', NULL),
             ('p', 'reverse', 'k1', NULL, '"raw"', 'bad row', 'inbox_permanent', NULL),
             ('p', 'forward', 'k3', 3, NULL, 'gone', 'decode', now()),
             ('q', 'forward', 'k1', 1, NULL, 'HTTP 400', 'permanent', NULL)
      RETURNING id, dedup_key`;
    expect(ids.every((r) => typeof r.id === "string")).toBe(true);
    const resolvedId = ids[3]!.id;

    expect((await sql`SELECT pgtrickle.replay_relay_dead_letters('p') AS n`)[0]?.n).toBe(3);
    const marked = await sql<{ pipeline: string; dedup_key: string; direction: string; requested: boolean }[]>`
      SELECT pipeline, dedup_key, direction, replay_requested_at IS NOT NULL AS requested
        FROM pgtrickle.relay_dead_letters ORDER BY id`;
    expect(marked.map((m) => m.requested)).toEqual([true, true, true, false, false]);

    expect((await sql`SELECT pgtrickle.replay_relay_dead_letters('p', ${ids[1]!.id}::bigint) AS n`)[0]?.n).toBe(1);
    expect((await sql`SELECT pgtrickle.replay_relay_dead_letters('p', ${resolvedId}::bigint) AS n`)[0]?.n).toBe(0);
    expect((await sql`SELECT pgtrickle.replay_relay_dead_letters('q', ${ids[0]!.id}::bigint) AS n`)[0]?.n).toBe(0);
    expect((await sql`SELECT pgtrickle.replay_relay_dead_letters('nope') AS n`)[0]?.n).toBe(0);
    expect((await sql`SELECT pgtrickle.replay_relay_dead_letters(NULL) AS n`)[0]?.n).toBe(0);

    // The replay index covers exactly the rows the relay polls for.
    const pending = await sql`SELECT count(*)::int AS n FROM pgtrickle.relay_dead_letters
                               WHERE replay_requested_at IS NOT NULL AND resolved_at IS NULL`;
    expect(pending[0]?.n).toBe(3);
  });

  test("relay_dead_letters: one row per (pipeline, direction, dedup_key), direction checked", async () => {
    const ins = (dir: string, key: string) =>
      sql`INSERT INTO pgtrickle.relay_dead_letters (pipeline, direction, dedup_key, error, error_kind)
          VALUES ('p', ${dir}, ${key}, 'e', 'permanent')`;
    await ins("forward", "k");
    await ins("reverse", "k");
    expect((await pgError(ins("forward", "k"))).code).toBe("23505");
    expect((await pgError(ins("sideways", "k"))).code).toBe("23514");
    const row = await sql`SELECT attempts, first_seen_at IS NOT NULL AS f, last_seen_at IS NOT NULL AS l,
                                 replay_requested_at, resolved_at FROM pgtrickle.relay_dead_letters LIMIT 1`;
    expect(row[0]).toEqual({ attempts: 1, f: true, l: true, replay_requested_at: null, resolved_at: null });
  });
});

describe("grants", () => {
  const suffix = `${process.pid}_${Math.floor(Math.random() * 1e6)}`;
  const member = `relay_cat_login_${suffix}`;
  const outsider = `relay_cat_outsider_${suffix}`;
  let asMember: Sql;
  let asOutsider: Sql;

  beforeAll(async () => {
    await sql.unsafe(`CREATE ROLE ${member} LOGIN; GRANT pgtrickle_relay TO ${member}; CREATE ROLE ${outsider} LOGIN`).simple();
    asMember = connect(urlAs(db.url, member), { max: 1 });
    asOutsider = connect(urlAs(db.url, outsider), { max: 1 });
  });

  afterAll(async () => {
    await asMember?.end({ timeout: 1 });
    await asOutsider?.end({ timeout: 1 });
    const admin = connect(PG_ADMIN_URL, { max: 1 });
    try {
      await admin.unsafe(`DROP ROLE IF EXISTS ${member}; DROP ROLE IF EXISTS ${outsider}`).simple();
    } finally {
      await admin.end();
    }
  });

  test("a login granted pgtrickle_relay can manage pipelines, read the config tables, write offsets and dead letters", async () => {
    await sql`TRUNCATE pgtrickle.relay_outbox_config, pgtrickle.relay_inbox_config, pgtrickle.relay_consumer_offsets, pgtrickle.relay_dead_letters`;
    await asMember`SELECT pgtrickle.set_relay_outbox('g1', 'outbox_g', NULL, '{"type":"stdout"}')`;
    await asMember`SELECT pgtrickle.set_relay_inbox('g2', 'inbox_g', '{"type":"stdin"}')`;
    await asMember`SELECT pgtrickle.disable_relay('g2')`;
    await asMember`SELECT pgtrickle.enable_relay('g2')`;
    const list = await asMember<{ name: string }[]>`SELECT name FROM pgtrickle.list_relay_configs()`;
    expect(list.map((r) => r.name)).toEqual(["g1", "g2"]);
    expect((await asMember`SELECT * FROM pgtrickle.get_relay_config('g1')`).length).toBe(1);
    expect((await asMember`SELECT name FROM pgtrickle.relay_outbox_config`).length).toBe(1);
    expect((await asMember`SELECT name FROM pgtrickle.relay_inbox_config`).length).toBe(1);
    expect((await asMember`SELECT version FROM pgtrickle.relay_catalog_version`)[0]?.version).toBe("1");

    // The offset commit of docs/interface.md §3.1, never moving backwards.
    const commit = (id: number) => asMember`
      INSERT INTO pgtrickle.relay_consumer_offsets AS o (relay_group_id, pipeline_id, last_change_id, worker_id, updated_at)
      VALUES ('default', 'g1', ${id}, 'host:1', now())
      ON CONFLICT (relay_group_id, pipeline_id) DO UPDATE
         SET last_change_id = EXCLUDED.last_change_id, worker_id = EXCLUDED.worker_id, updated_at = EXCLUDED.updated_at
       WHERE o.last_change_id <= EXCLUDED.last_change_id`;
    await commit(10);
    await commit(20);
    await commit(15);
    const off = await asMember`SELECT last_change_id FROM pgtrickle.relay_consumer_offsets WHERE pipeline_id = 'g1'`;
    expect(off[0]?.last_change_id).toBe("20");

    const dl = await asMember<{ id: string; attempts: number }[]>`
      INSERT INTO pgtrickle.relay_dead_letters (pipeline, direction, dedup_key, outbox_id, message, error, error_kind)
      VALUES ('g1', 'forward', 'k', 7, '{"x":1}', 'HTTP 400', 'permanent')
      ON CONFLICT (pipeline, direction, dedup_key) DO UPDATE
         SET attempts = relay_dead_letters.attempts + 1, last_seen_at = now(), error = EXCLUDED.error
      RETURNING id, attempts`;
    expect(dl[0]?.attempts).toBe(1);
    const again = await asMember<{ id: string; attempts: number }[]>`
      INSERT INTO pgtrickle.relay_dead_letters (pipeline, direction, dedup_key, outbox_id, message, error, error_kind)
      VALUES ('g1', 'forward', 'k', 7, '{"x":1}', 'HTTP 400 again', 'permanent')
      ON CONFLICT (pipeline, direction, dedup_key) DO UPDATE
         SET attempts = relay_dead_letters.attempts + 1, last_seen_at = now(), error = EXCLUDED.error
      RETURNING id, attempts`;
    expect(again[0]).toEqual({ id: dl[0]!.id, attempts: 2 });
    expect((await asMember`SELECT pgtrickle.replay_relay_dead_letters('g1') AS n`)[0]?.n).toBe(1);
    await asMember`UPDATE pgtrickle.relay_dead_letters SET resolved_at = now() WHERE id = ${dl[0]!.id}`;

    // The file source's position commit (src/backends/file/source.ts).
    for (const position of ['{"offset":10}', '{"offset":20}']) {
      await asMember`
        INSERT INTO pgtrickle.relay_source_positions (relay_group_id, pipeline, direction, position, updated_at)
        VALUES ('default', 'g2', 'reverse', ${position}, now())
        ON CONFLICT (relay_group_id, pipeline, direction) DO UPDATE SET position = EXCLUDED.position, updated_at = now()`;
    }
    expect((await asMember`SELECT position FROM pgtrickle.relay_source_positions WHERE pipeline = 'g2'`)[0]?.position).toBe('{"offset":20}');

    await asMember`SELECT pgtrickle.delete_relay('g1')`;

    const st = await catalogStatus(asMember);
    expect(st.currentUser).toBe(member);
    expect(st.access.missing).toEqual([]);
    expect(st.relayCatalog.state).toBe("complete");
  });

  test("a login outside pgtrickle_relay can neither call the functions nor read the tables", async () => {
    const call = await pgError(asOutsider`SELECT pgtrickle.list_relay_configs()`);
    expect(call.code).toBe("42501");
    const set = await pgError(asOutsider`SELECT pgtrickle.set_relay_outbox('x', 'o', NULL, '{"type":"stdout"}')`);
    expect(set.code).toBe("42501");
    const read = await pgError(asOutsider`SELECT * FROM pgtrickle.relay_outbox_config`);
    expect(read.code).toBe("42501");
    const st = await catalogStatus(asOutsider);
    expect(st.relayCatalog.state).toBe("complete");
    expect(st.access.missing).toContain(`GRANT USAGE ON SCHEMA pgtrickle TO ${outsider}`);
    expect(st.access.missing).toContain(`GRANT SELECT ON pgtrickle.relay_outbox_config TO ${outsider}`);
    expect(formatCatalogStatus(st)).toContain(`access:        ${outsider} lacks:`);
  });
});

describe("repair, updates and detection", () => {
  test("install repairs a dropped function and reports a changed definition as updated", async () => {
    await sql`DROP FUNCTION pgtrickle.enable_relay(text)`;
    await sql.unsafe(`
      CREATE OR REPLACE FUNCTION pgtrickle.list_relay_configs()
      RETURNS TABLE (name TEXT, direction TEXT, enabled BOOLEAN, config JSONB)
      LANGUAGE plpgsql AS $$ BEGIN RETURN; END $$`);
    const st = await catalogStatus(sql);
    expect(st.relayCatalog.state).toBe("partial");
    expect(st.relayCatalog.missing).toEqual(["function pgtrickle.enable_relay(text)"]);
    const err = await requireCatalog(sql).then(
      () => null,
      (e: unknown) => e as RelayError,
    );
    expect(err?.kind).toBe("config");
    expect(err?.message).toBe(
      `relay catalog incomplete in database "${db.name}" (missing function pgtrickle.enable_relay(text)): run \`pgtrickle-relay catalog install\``,
    );

    const r = await installCatalog(sql);
    expect(r.created).toEqual(["function pgtrickle.enable_relay(text)"]);
    expect(r.updated).toEqual(["function pgtrickle.list_relay_configs()"]);
    expect(r.granted).toEqual(["GRANT EXECUTE ON FUNCTION pgtrickle.enable_relay(text) TO pgtrickle_relay"]);
    expect(r.nothingToDo).toBe(false);
    expect((await installCatalog(sql)).nothingToDo).toBe(true);
    expect((await catalogStatus(sql)).relayCatalog.state).toBe("complete");
  });

  test("install restores a revoked grant and PUBLIC revocation", async () => {
    await sql`REVOKE SELECT ON pgtrickle.relay_outbox_config FROM pgtrickle_relay`;
    await sql`GRANT EXECUTE ON FUNCTION pgtrickle.delete_relay(text) TO PUBLIC`;
    const st = await catalogStatus(sql);
    expect(st.grants.missing).toEqual(["GRANT SELECT ON pgtrickle.relay_outbox_config TO pgtrickle_relay"]);
    expect(st.grants.publicExecute).toEqual(["pgtrickle.delete_relay(text)"]);
    expect(formatCatalogStatus(st)).toContain("warning: PUBLIC may execute pgtrickle.delete_relay(text)");
    const r = await installCatalog(sql);
    expect(r.granted).toEqual(["GRANT SELECT ON pgtrickle.relay_outbox_config TO pgtrickle_relay"]);
    expect(r.revoked).toEqual(["pgtrickle.delete_relay(text)"]);
    expect(r.created).toEqual([]);
    const after = await catalogStatus(sql);
    expect(after.grants.missing).toEqual([]);
    expect(after.grants.publicExecute).toEqual([]);
  });

  test("a missing dead-letter table fails requireCatalog even with a complete catalog", async () => {
    await sql`DROP TABLE pgtrickle.relay_dead_letters`;
    const err = await requireCatalog(sql).then(
      () => null,
      (e: unknown) => e as RelayError,
    );
    expect(err?.kind).toBe("config");
    expect(err?.message).toStartWith(`relay dead-letter objects not found in database "${db.name}"`);
    expect(err?.message).toEndWith(": run `pgtrickle-relay catalog install`");
    const r = await installCatalog(sql);
    expect(r.created).toEqual(["table pgtrickle.relay_dead_letters", "index pgtrickle.relay_dead_letters_replay_pending"]);
    await requireCatalog(sql);
  });

  test("schema tide means the 0.46+ era", async () => {
    await sql`CREATE SCHEMA tide`;
    try {
      const st = await catalogStatus(sql);
      expect(st.era).toBe("0.46+");
      expect(st.tide.schema).toBe(true);
      expect(formatCatalogStatus(st)).toContain("pg_tide:       schema tide present");
    } finally {
      await sql`DROP SCHEMA tide`;
    }
  });
});

describe("concurrent installs", () => {
  test("several replicas installing at once into a fresh database: one creates, the rest find nothing to do", async () => {
    const fresh = await testDatabase("catalog_concurrent", { fixture: false, catalog: false });
    const clients = [0, 1, 2, 3].map(() => connect(fresh.url, { max: 1 }));
    try {
      const results = await Promise.all(clients.map((c) => installCatalog(c)));
      expect(results.filter((r) => r.created.length > 0).length).toBe(1);
      expect(results.filter((r) => r.nothingToDo).length).toBe(3);
      expect((await catalogStatus(fresh.sql)).relayCatalog.state).toBe("complete");
    } finally {
      await Promise.all(clients.map((c) => c.end({ timeout: 1 })));
      await fresh.drop();
    }
  }, 30_000);
});

// Beside the real pg_trickle (which owns the relay tables): test/integration/pgtrickle-catalog.test.ts.
