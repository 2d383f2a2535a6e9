/**
 * The relay catalog beside the real pg_trickle extension (0.45.0 and 0.39.0), which owns the
 * relay tables and functions itself: `catalog install` / `catalog status`, the grants the
 * relay role needs, the config JSON and notifications as the extension writes them, and
 * `demo` on a real stream table. What the extension was seen to do: docs/pg_trickle.md.
 */
import { describe, expect, test } from "bun:test";
import { installCatalog } from "../../src/catalog/install.ts";
import { catalogStatus, formatCatalogStatus, requireCatalog } from "../../src/catalog/status.ts";
import { connect } from "../../src/db.ts";
import type { RelayError } from "../../src/errors.ts";
import type { TestDatabase } from "../helpers/pg.ts";
import { pgTrickleDatabase, PGTRICKLE_VERSIONS, realStreamTable } from "../helpers/pgtrickle.ts";
import { eventually, relayOnce } from "../helpers/relay.ts";

const RELAY_ONLY = [
  "table pgtrickle.relay_dead_letters",
  "table pgtrickle.relay_catalog_version",
  "table pgtrickle.relay_pipeline_status",
  "table pgtrickle.relay_source_positions",
  "index pgtrickle.relay_dead_letters_replay_pending",
  "function pgtrickle.replay_relay_dead_letters(text,bigint)",
];

function urlAs(url: string, user: string): string {
  const u = new URL(url);
  u.username = user;
  return u.toString();
}

/** md5 of every extension function body in schema pgtrickle: install must not change one. */
async function extensionFunctions(db: TestDatabase): Promise<string> {
  const [row] = await db.sql<{ f: string }[]>`
    SELECT string_agg(md5(pg_get_functiondef(p.oid)), ',' ORDER BY p.oid) AS f
      FROM pg_proc p JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
     WHERE p.pronamespace = 'pgtrickle'::regnamespace`;
  return row!.f;
}

async function withDatabase(version: (typeof PGTRICKLE_VERSIONS)[number], label: string, body: (db: TestDatabase) => Promise<void>) {
  const db = await pgTrickleDatabase(label, version, { catalog: false });
  try {
    await body(db);
  } finally {
    await db.drop();
  }
}

describe.each(PGTRICKLE_VERSIONS)("pg_trickle %s", (version) => {
  test("status before install; install adds only the relay-only objects, grants the relay role, leaves the extension's functions as they are", async () => {
    await withDatabase(version, "cat_install", async (db) => {
      const before = await catalogStatus(db.sql);
      expect(before.extension).toMatchObject({ installed: true, version, schema: "public", functionVersion: version });
      expect(before.era).toBe("0.29-0.45");
      expect(before.outboxApi).toMatchObject({ state: "complete", simpleMode: true, consumerGroups: true });
      expect(before.inboxApi.state).toBe("complete");
      expect(before.relayCatalog).toMatchObject({ state: "complete", owner: "extension", ownerExtension: "pg_trickle", version: null });
      expect(before.relayOnly.state).toBe("missing");
      const functions = await extensionFunctions(db);

      const r = await installCatalog(db.sql);
      expect(r.owner).toBe("extension");
      expect(r.created.sort()).toEqual([...RELAY_ONLY].sort());
      expect(r.skipped).toContain("table pgtrickle.relay_outbox_config");
      expect(r.granted).toContain("GRANT SELECT ON pgtrickle.relay_outbox_config TO pgtrickle_relay");
      expect(r.granted).toContain("GRANT UPDATE ON pgtrickle.relay_consumer_offsets TO pgtrickle_relay");
      expect(r.ownerStatements).toEqual([]);
      expect(await extensionFunctions(db)).toBe(functions);

      const after = await catalogStatus(db.sql);
      expect(after.grants.missing).toEqual([]);
      expect(after.relayOnly.state).toBe("complete");
      expect(formatCatalogStatus(after)).toContain("relay catalog: complete, owned by extension pg_trickle, version 1");
      await requireCatalog(db.sql);
      expect((await installCatalog(db.sql)).nothingToDo).toBe(true);

      // A member missing from the extension's set cannot be repaired by the relay.
      await db.sql.unsafe(`ALTER EXTENSION pg_trickle DROP FUNCTION pgtrickle.delete_relay(text); DROP FUNCTION pgtrickle.delete_relay(text)`).simple();
      const third = await installCatalog(db.sql);
      expect(third.notes.join("\n")).toContain("function pgtrickle.delete_relay(text) is missing, but the relay catalog belongs to extension pg_trickle");
      const err = await requireCatalog(db.sql).then(() => null, (e: unknown) => e as RelayError);
      expect(err?.message).toContain("it belongs to extension pg_trickle: repair or upgrade that extension");
    });
  });

  test("a login that may not grant on the extension's tables gets the exact GRANT statements, one per line; an owner running them completes the grants", async () => {
    await withDatabase(version, "cat_owner", async (db) => {
      const installer = `relay_installer_${process.pid}_${version.replaceAll(".", "")}`;
      // Roles are cluster-wide: pgtrickle_relay may exist from another database already.
      await db.sql.unsafe(`
        DO $$ BEGIN
          IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgtrickle_relay') THEN CREATE ROLE pgtrickle_relay NOLOGIN; END IF;
        END $$;
        DROP ROLE IF EXISTS ${installer};
        CREATE ROLE ${installer} LOGIN;
        GRANT CREATE ON DATABASE "${db.name}" TO ${installer};
        GRANT USAGE, CREATE ON SCHEMA pgtrickle TO ${installer};`).simple();
      try {
        // The extension's ddl_command_end trigger reads pgt_stream_tables as the user running DDL.
        const refused = await relayOnce(["catalog", "install", "--postgres-url", urlAs(db.url, installer)]);
        expect(refused.exitCode).not.toBe(0);
        expect(refused.stderr).toContain("GRANT SELECT ON pgtrickle.pgt_stream_tables to this login");
        await db.sql.unsafe(`GRANT SELECT ON pgtrickle.pgt_stream_tables TO ${installer}`);

        const r = await relayOnce(["catalog", "install", "--postgres-url", urlAs(db.url, installer)]);
        expect(r.exitCode).toBe(0);
        expect(r.stderr).toContain("an owner (a superuser) must run the statements printed below");
        const statements = r.stdout.trim().split("\n");
        expect(statements).toEqual([
          "GRANT USAGE ON SCHEMA pgtrickle TO pgtrickle_relay;",
          "GRANT SELECT ON pgtrickle.relay_outbox_config TO pgtrickle_relay;",
          "GRANT SELECT ON pgtrickle.relay_inbox_config TO pgtrickle_relay;",
          "GRANT SELECT ON pgtrickle.relay_consumer_offsets TO pgtrickle_relay;",
          "GRANT INSERT ON pgtrickle.relay_consumer_offsets TO pgtrickle_relay;",
          "GRANT UPDATE ON pgtrickle.relay_consumer_offsets TO pgtrickle_relay;",
        ]);
        for (const s of statements) await db.sql.unsafe(s);
        expect((await catalogStatus(db.sql)).grants.missing).toEqual([]);
      } finally {
        await db.sql.unsafe(`DROP OWNED BY ${installer} CASCADE; DROP ROLE ${installer}`).simple();
      }
    });
  });

  test("a relay login in pgtrickle_relay with the grants README.md lists relays an outbox (simple mode); without SELECT on pgt_stream_tables it cannot", async () => {
    await withDatabase(version, "cat_login", async (db) => {
      await installCatalog(db.sql);
      const st = await realStreamTable(db.sql, "granted");
      await db.sql.unsafe(`INSERT INTO ${st.source} VALUES (1, 1)`);
      await db.sql`SELECT pgtrickle.refresh_stream_table(${st.name})`;
      await db.sql`SELECT pgtrickle.set_relay_outbox('granted', ${st.name}, NULL, ${db.sql.json({ type: "stdout" })})`;
      const login = `relay_login_${process.pid}_${version.replaceAll(".", "")}`;
      await db.sql.unsafe(`
        DROP ROLE IF EXISTS ${login};
        CREATE ROLE ${login} LOGIN IN ROLE pgtrickle_relay;
        GRANT SELECT ON pgtrickle.pgt_outbox_config, pgtrickle.pgt_inbox_config, pgtrickle.pgt_consumer_groups,
                        pgtrickle.${st.outboxTable}, pgtrickle.outbox_delta_rows_granted TO ${login};
        GRANT SELECT ON SEQUENCE pgtrickle.${st.outboxTable}_id_seq TO ${login};`).simple();
      try {
        const drain = () => relayOnce(["drain", "--postgres-url", urlAs(db.url, login), "--pipeline", "granted"]);
        const refused = await drain();
        expect(refused.exitCode).toBe(1);
        expect(refused.stderr).toContain("permission denied for table pgt_stream_tables");
        await db.sql.unsafe(`GRANT SELECT ON pgtrickle.pgt_stream_tables TO ${login}`);
        const r = await drain();
        expect(r.exitCode).toBe(0);
        expect(r.stdout.trim().split("\n").map((l) => JSON.parse(l).payload)).toEqual([{ id: 1, amount: 1 }]);
      } finally {
        await db.sql.unsafe(`DROP OWNED BY ${login} CASCADE; DROP ROLE ${login}`).simple();
      }
    });
  });

  test("set_relay_outbox / set_relay_inbox store the extension's config JSON and notify pgtrickle_relay_config", async () => {
    await withDatabase(version, "cat_config", async (db) => {
      const listener = connect(db.url, { max: 1 });
      const notes: unknown[] = [];
      await listener.listen("pgtrickle_relay_config", (p) => notes.push(JSON.parse(p)));
      try {
        await db.sql`SELECT pgtrickle.set_relay_outbox('out', 'public.orders', 'g', ${db.sql.json({ type: "stdout" })}, 12, false)`;
        await db.sql`SELECT pgtrickle.set_relay_inbox('in', 'box', ${db.sql.json({ type: "nats", url: "nats://127.0.0.1:4222" })})`;
        await db.sql`SELECT pgtrickle.enable_relay('out')`;
        await db.sql`SELECT pgtrickle.delete_relay('in')`;
        const configs = await db.sql`SELECT name, direction, enabled, config FROM pgtrickle.list_relay_configs() ORDER BY name`;
        expect([...configs]).toEqual([
          {
            name: "out",
            direction: "forward",
            enabled: true,
            config: {
              sink: { type: "stdout" },
              source: { group: "g", outbox: "public.orders", retention_hours: 12 },
              sink_type: "stdout",
              source_type: "outbox",
            },
          },
        ]);
        await eventually(() => notes.length === 4, 5000, "four notifications");
        expect(notes).toEqual([
          { direction: "relay_outbox_config", event: "INSERT", name: "out", enabled: false },
          { direction: "relay_inbox_config", event: "INSERT", name: "in", enabled: true },
          { direction: "relay_outbox_config", event: "UPDATE", name: "out", enabled: true },
          { direction: "relay_inbox_config", event: "DELETE", name: "in", enabled: true },
        ]);
      } finally {
        await listener.end({ timeout: 1 });
      }
    });
  });

  test("demo relays a real stream table refreshed by the scheduler, and --cleanup removes it", async () => {
    await withDatabase(version, "cat_demo", async (db) => {
      const r = await relayOnce(["demo", "--postgres-url", db.url, "--count", "3", "--interval", "100"]);
      expect(r.exitCode).toBe(0);
      const lines = r.stdout.trim().split("\n").map((l) => JSON.parse(l) as { payload: { id: number; amount: number }; op: string; is_full_refresh: boolean });
      // Each refresh relays the whole stream table: the last snapshot holds the three orders.
      const last = new Map(lines.map((l) => [l.payload.id, l.payload.amount]));
      expect([...last.keys()].sort()).toEqual([1, 2, 3]);
      expect(lines.every((l) => l.op === "insert" && l.is_full_refresh)).toBe(true);
      const [st] = await db.sql`SELECT schedule FROM pgtrickle.pgt_stream_tables WHERE pgt_name = 'relay_demo_orders'`;
      expect(st).toEqual({ schedule: "1s" });

      expect((await relayOnce(["demo", "--postgres-url", db.url, "--cleanup"])).exitCode).toBe(0);
      const [left] = await db.sql`
        SELECT to_regclass('public.relay_demo_orders') AS t, to_regclass('public.relay_demo_order_source') AS s,
               (SELECT count(*)::int FROM pgtrickle.pgt_stream_tables) AS streams,
               (SELECT count(*)::int FROM pgtrickle.pgt_outbox_config) AS outboxes,
               (SELECT count(*)::int FROM pgtrickle.relay_outbox_config) AS pipelines`;
      expect(left).toEqual({ t: null, s: null, streams: 0, outboxes: 0, pipelines: 0 });
    });
  });
});
