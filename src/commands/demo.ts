import { defineCommand } from "citty";
import { installCatalog } from "../catalog/install.ts";
import { EXIT, fail, loadSettings, withDatabase } from "../cli-common.ts";
import { connect, type Sql } from "../db.ts";
import { log } from "../observe/log.ts";
import { runRelay } from "../relay.ts";

const DEMO_PIPELINE = "relay_demo";
const DEMO_TABLE = "relay_demo_orders";
/** With pg_trickle, the demo writes here and the stream table DEMO_TABLE selects from it. */
const DEMO_SOURCE = "relay_demo_order_source";
/** Orders the extension demo cycles through: each refresh relays the whole (small) table. */
const DEMO_EXTENSION_ORDERS = 5;
const DEMO_OUTBOX = "outbox_relay_demo_orders";
const DEMO_MARK = "created by pgtrickle-relay demo";

/**
 * Without the extension, the demo builds an outbox of the extension's shape (docs/interface.md §2.2–2.3):
 * a pgt_outbox_config (only if absent, marked as the demo's), a header table that notifies on
 * insert, and a claim-check table, so the relay runs exactly as it would against pg_trickle.
 */
async function createDemoOutbox(sql: Sql): Promise<void> {
  await sql.unsafe(`
    CREATE TABLE IF NOT EXISTS public.${DEMO_TABLE} (id int PRIMARY KEY, customer text NOT NULL, amount numeric NOT NULL);
    DO $$ BEGIN
      IF to_regclass('pgtrickle.pgt_outbox_config') IS NULL THEN
        CREATE TABLE pgtrickle.pgt_outbox_config (
          stream_table_oid OID NOT NULL PRIMARY KEY, stream_table_name TEXT NOT NULL,
          outbox_table_name TEXT NOT NULL UNIQUE, retention_hours INT NOT NULL DEFAULT 24,
          created_at TIMESTAMPTZ NOT NULL DEFAULT now(), last_drained_at TIMESTAMPTZ,
          last_drained_count BIGINT NOT NULL DEFAULT 0);
        COMMENT ON TABLE pgtrickle.pgt_outbox_config IS '${DEMO_MARK}';
      END IF;
    END $$;
    CREATE TABLE IF NOT EXISTS pgtrickle.${DEMO_OUTBOX} (
      id BIGSERIAL PRIMARY KEY, pgt_id UUID NOT NULL DEFAULT gen_random_uuid(), refresh_id UUID,
      created_at TIMESTAMPTZ NOT NULL DEFAULT now(), inserted_count BIGINT NOT NULL DEFAULT 0,
      deleted_count BIGINT NOT NULL DEFAULT 0, is_claim_check BOOL NOT NULL DEFAULT false, payload JSONB);
    COMMENT ON TABLE pgtrickle.${DEMO_OUTBOX} IS '${DEMO_MARK}';
    CREATE TABLE IF NOT EXISTS pgtrickle.outbox_delta_rows_${DEMO_TABLE} (
      outbox_id BIGINT NOT NULL, row_op TEXT NOT NULL CHECK (row_op IN ('INSERT','DELETE')),
      row_data JSONB NOT NULL, row_num BIGINT NOT NULL, PRIMARY KEY (outbox_id, row_num));
    COMMENT ON TABLE pgtrickle.outbox_delta_rows_${DEMO_TABLE} IS '${DEMO_MARK}';
    CREATE OR REPLACE FUNCTION pgtrickle.${DEMO_OUTBOX}_notify() RETURNS trigger LANGUAGE plpgsql AS
      $$ BEGIN PERFORM pg_notify('pgtrickle_outbox_new', TG_TABLE_NAME); RETURN NULL; END $$;
    DROP TRIGGER IF EXISTS notify ON pgtrickle.${DEMO_OUTBOX};
    CREATE TRIGGER notify AFTER INSERT ON pgtrickle.${DEMO_OUTBOX} FOR EACH ROW EXECUTE FUNCTION pgtrickle.${DEMO_OUTBOX}_notify();
    INSERT INTO pgtrickle.pgt_outbox_config (stream_table_oid, stream_table_name, outbox_table_name)
    VALUES ('public.${DEMO_TABLE}'::regclass::oid, '${DEMO_TABLE}', '${DEMO_OUTBOX}')
    ON CONFLICT DO NOTHING;`).simple();
}

/**
 * With pg_trickle installed, the demo outbox is a real one: a stream table over a plain source
 * table, refreshed by the extension's scheduler every second, with its outbox enabled.
 * outbox_status and enable_outbox accept only stream tables (docs/pg_trickle.md).
 */
async function createDemoStreamTable(sql: Sql): Promise<void> {
  const st = `public.${DEMO_TABLE}`;
  await sql.unsafe(`CREATE TABLE IF NOT EXISTS public.${DEMO_SOURCE} (id int PRIMARY KEY, customer text NOT NULL, amount numeric NOT NULL)`);
  const [state] = await sql<{ table: boolean; stream: boolean; outbox: boolean }[]>`
    SELECT to_regclass(${st}) IS NOT NULL AS table,
           EXISTS (SELECT 1 FROM pgtrickle.pgt_stream_tables WHERE pgt_schema = 'public' AND pgt_name = ${DEMO_TABLE}) AS stream,
           EXISTS (SELECT 1 FROM pgtrickle.pgt_outbox_config WHERE stream_table_name = ${DEMO_TABLE}) AS outbox`;
  if (state!.table && !state!.stream) {
    fail(`${st} exists but is not a pg_trickle stream table (left from a demo run before the extension was installed?); run demo --cleanup first`, EXIT.config);
  }
  if (!state!.stream) {
    await sql`SELECT pgtrickle.create_stream_table(${st}, ${`SELECT id, customer, amount FROM public.${DEMO_SOURCE}`},
                schedule => '1s', refresh_mode => 'DIFFERENTIAL')`;
  }
  if (!state!.outbox) await sql`SELECT pgtrickle.enable_outbox(${st}, 24)`;
}

interface DemoRow {
  id: number;
  customer: string;
  amount: number;
}

/** One extension demo change: an order of the few the demo cycles through, inserted or its amount changed. */
async function writeSourceChange(sql: Sql, n: number): Promise<DemoRow> {
  const customers = ["ada", "grace", "linus", "margaret"];
  const id = ((n - 1) % DEMO_EXTENSION_ORDERS) + 1;
  const row = { id, customer: customers[id % customers.length]!, amount: (n * 7.5) % 100 };
  await sql`INSERT INTO ${sql(`public.${DEMO_SOURCE}`)} ${sql(row)} ON CONFLICT (id) DO UPDATE SET amount = EXCLUDED.amount`;
  return row;
}

/** One demo change: an order inserted, or (every third change) an amount updated = delete + insert. */
async function writeChange(sql: Sql, n: number, outboxTable: string): Promise<void> {
  const customers = ["ada", "grace", "linus", "margaret"];
  const id = n % 3 === 2 ? n - 1 : n;
  const row = { id, customer: customers[id % customers.length], amount: (n * 7.5) % 100 };
  await sql.begin(async (tx) => {
    const [old] = await tx<{ id: number; customer: string; amount: string }[]>`SELECT id, customer, amount FROM ${tx(`public.${DEMO_TABLE}`)} WHERE id = ${id}`;
    await tx`INSERT INTO ${tx(`public.${DEMO_TABLE}`)} ${tx(row)} ON CONFLICT (id) DO UPDATE SET amount = EXCLUDED.amount`;
    const payload = { v: 1, inserted: [row], deleted: old ? [{ ...old, amount: Number(old.amount) }] : [] };
    await tx`INSERT INTO ${tx("pgtrickle." + outboxTable)} (inserted_count, deleted_count, payload)
             VALUES (1, ${old ? 1 : 0}, ${tx.json(payload)})`;
  });
}

/**
 * Before a --count demo stops: its last change reached the outbox (with the extension, once the
 * scheduler refreshed the stream table) and the relay committed past it. Gives up after 30 s.
 */
async function waitUntilRelayed(sql: Sql, outboxTable: string, lastSourceRow: DemoRow | null): Promise<void> {
  const until = Date.now() + 30_000;
  const streamTable = sql(`public.${DEMO_TABLE}`);
  const outbox = sql(`pgtrickle.${outboxTable}`);
  while (Date.now() < until) {
    const [row] = await sql<{ done: boolean }[]>`
      SELECT (${lastSourceRow === null}
              OR EXISTS (SELECT 1 FROM ${streamTable} WHERE id = ${lastSourceRow?.id ?? 0} AND amount = ${lastSourceRow?.amount ?? 0}))
         AND coalesce((SELECT last_change_id FROM pgtrickle.relay_consumer_offsets
                        WHERE relay_group_id = 'demo' AND pipeline_id = ${DEMO_PIPELINE}), 0)
             >= (SELECT coalesce(max(id), 0) FROM ${outbox}) AS done`;
    if (row?.done) return;
    await Bun.sleep(100);
  }
}

async function dropDemo(sql: Sql): Promise<void> {
  await sql`DELETE FROM pgtrickle.relay_outbox_config WHERE name = ${DEMO_PIPELINE}`;
  await sql`DELETE FROM pgtrickle.relay_consumer_offsets WHERE pipeline_id = ${DEMO_PIPELINE}`;
  await sql.unsafe(`
    DO $$ BEGIN
      IF obj_description(to_regclass('pgtrickle.pgt_outbox_config'), 'pg_class') = '${DEMO_MARK}' THEN
        DELETE FROM pgtrickle.pgt_outbox_config WHERE outbox_table_name = '${DEMO_OUTBOX}';
        IF NOT EXISTS (SELECT 1 FROM pgtrickle.pgt_outbox_config) THEN DROP TABLE pgtrickle.pgt_outbox_config; END IF;
        DROP TABLE IF EXISTS pgtrickle.${DEMO_OUTBOX}, pgtrickle.outbox_delta_rows_${DEMO_TABLE};
        DROP FUNCTION IF EXISTS pgtrickle.${DEMO_OUTBOX}_notify();
      ELSIF to_regclass('pgtrickle.pgt_stream_tables') IS NOT NULL
        AND EXISTS (SELECT 1 FROM pgtrickle.pgt_stream_tables WHERE pgt_schema = 'public' AND pgt_name = '${DEMO_TABLE}') THEN
        PERFORM pgtrickle.disable_outbox('public.${DEMO_TABLE}', true);
        PERFORM pgtrickle.drop_stream_table('public.${DEMO_TABLE}');
      END IF;
      DROP TABLE IF EXISTS public.${DEMO_TABLE}, public.${DEMO_SOURCE};
    END $$;`).simple();
}

export const demoCommand = defineCommand({
  meta: {
    name: "demo",
    description:
      "See the relay work in a minute: installs the catalog, creates a demo outbox (public.relay_demo_orders; through pg_trickle when installed), registers a stdout pipeline 'relay_demo', writes an order change every --interval ms and relays each live to stdout until Ctrl-C. Touches only its own demo objects; --cleanup removes them.",
  },
  args: {
    "postgres-url": { type: "string", description: "database to use (env PGTRICKLE_RELAY_POSTGRES_URL, default postgres://postgres@127.0.0.1:5432/postgres, the server scripts/services starts)" },
    interval: { type: "string", description: "milliseconds between demo changes (default 1000)" },
    count: { type: "string", description: "stop after this many changes have been relayed (default: run until Ctrl-C)" },
    cleanup: { type: "boolean", description: "remove every demo object and exit" },
    "log-level": { type: "string", description: "log level (default info)" },
  },
  async run({ args }) {
    const settings = loadSettings({
      ...args,
      "postgres-url": args["postgres-url"] ?? process.env.PGTRICKLE_RELAY_POSTGRES_URL ?? "postgres://postgres@127.0.0.1:5432/postgres",
      "relay-group-id": "demo",
    });
    const interval = Number(args.interval ?? 1000);
    const count = args.count === undefined ? Infinity : Number(args.count);
    if (!(interval > 0) || !(count > 0)) fail("--interval and --count must be positive numbers", EXIT.config);

    const demo = await withDatabase(settings, async (sql) => {
      if (args.cleanup) {
        await dropDemo(sql);
        log.info("demo objects removed");
        return null;
      }
      await installCatalog(sql);
      const [ext] = await sql<{ real: boolean }[]>`
        SELECT to_regclass('pgtrickle.pgt_outbox_config') IS NOT NULL
           AND obj_description(to_regclass('pgtrickle.pgt_outbox_config'), 'pg_class') IS DISTINCT FROM ${DEMO_MARK} AS real`;
      const extension = !!ext?.real && !!(await sql`SELECT to_regprocedure('pgtrickle.enable_outbox(text,integer)') IS NOT NULL AS ok`)[0]?.ok;
      if (extension) await createDemoStreamTable(sql);
      else await createDemoOutbox(sql);
      await sql`SELECT pgtrickle.set_relay_outbox(${DEMO_PIPELINE}, ${`public.${DEMO_TABLE}`}, NULL, ${sql.json({ type: "stdout", format: "jsonl" })})`;
      const [row] = await sql<{ outbox_table_name: string }[]>`
        SELECT outbox_table_name FROM pgtrickle.pgt_outbox_config WHERE stream_table_name = ${DEMO_TABLE}`;
      return { outboxTable: row!.outbox_table_name, extension };
    });
    if (!demo) return;
    const { outboxTable, extension } = demo;
    const how = extension ? `stream table public.${DEMO_TABLE} (refreshed every second) of public.${DEMO_SOURCE}` : "its outbox";
    log.info(`demo: pipeline '${DEMO_PIPELINE}' relays pgtrickle.${outboxTable}, the outbox of ${how}, to stdout; a change every ${interval} ms (Ctrl-C to stop)`);

    const writer = connect(settings.postgresUrl, { max: 1 });
    const done = Promise.withResolvers<void>();
    const writing = (async () => {
      const [start] = await writer<{ n: number }[]>`SELECT coalesce(max(id), 0)::int AS n FROM ${writer(`public.${DEMO_TABLE}`)}`;
      let lastSourceRow: DemoRow | null = null;
      for (let i = 1; i <= count; i++) {
        await Bun.sleep(interval);
        if (extension) lastSourceRow = await writeSourceChange(writer, start!.n + i);
        else await writeChange(writer, start!.n + i, outboxTable);
      }
      await waitUntilRelayed(writer, outboxTable, lastSourceRow);
      done.resolve();
    })();
    writing.catch((err) => log.error(`demo writer: ${err.message}`));
    const result = await runRelay(settings, { drain: false, only: [DEMO_PIPELINE], http: false, retryConnect: false, stopWhen: done.promise });
    await writer.end({ timeout: 1 });
    process.exit(result.exitCode);
  },
});
