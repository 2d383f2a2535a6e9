import type { Sql } from "../../src/db.ts";
import { testDatabase, type TestDatabase } from "./pg.ts";
import { PGTRICKLE_URLS, requireServer, type PgTrickleVersion } from "./servers.ts";

export { PGTRICKLE_VERSIONS, type PgTrickleVersion } from "./servers.ts";

/**
 * A database of its own on the PostgreSQL 18.6 cluster that runs the real pg_trickle `version`
 * (scripts/services pgtrickle), with `CREATE EXTENSION pg_trickle` done and, unless
 * `catalog: false`, the relay catalog installed beside the extension's own.
 */
export async function pgTrickleDatabase(
  label: string,
  version: PgTrickleVersion,
  options: { catalog?: boolean } = {},
): Promise<TestDatabase> {
  await requireServer(`pgtrickle-${version}`);
  return testDatabase(`${label}_${version.replaceAll(".", "")}`, {
    fixture: false,
    catalog: options.catalog ?? true,
    adminUrl: PGTRICKLE_URLS[version],
    setup: (sql) => sql`CREATE EXTENSION pg_trickle`,
  });
}

export interface RealStreamTable {
  /** `public.<name>`, the stream table. */
  name: string;
  /** `public.<name>_src`, the plain table it selects from: write here, then refresh. */
  source: string;
  /** The outbox header table in schema pgtrickle, as pgt_outbox_config names it. */
  outboxTable: string;
}

/**
 * A real stream table `public.<name>` = `SELECT id, amount FROM public.<name>_src`, with its
 * outbox enabled. `schedule` '1h' leaves refreshes to refresh_stream_table; '1s' to the scheduler.
 */
export async function realStreamTable(
  sql: Sql,
  name: string,
  options: { schedule?: string; mode?: "DIFFERENTIAL" | "FULL" } = {},
): Promise<RealStreamTable> {
  const st = `public.${name}`;
  const source = `public.${name}_src`;
  await sql.unsafe(`CREATE TABLE ${source} (id int PRIMARY KEY, amount int NOT NULL)`);
  await sql`SELECT pgtrickle.create_stream_table(${st}, ${`SELECT id, amount FROM ${source}`},
              schedule => ${options.schedule ?? "1h"}, refresh_mode => ${options.mode ?? "DIFFERENTIAL"})`;
  await sql`SELECT pgtrickle.enable_outbox(${st}, 24)`;
  const [row] = await sql<{ outbox_table_name: string }[]>`
    SELECT outbox_table_name FROM pgtrickle.pgt_outbox_config WHERE stream_table_name = ${name}`;
  return { name: st, source, outboxTable: row!.outbox_table_name };
}

/** The outbox header rows of `st`, oldest first. */
export async function outboxRows(sql: Sql, st: RealStreamTable) {
  return sql<{ id: string; inserted_count: string; deleted_count: string; is_claim_check: boolean; payload: unknown }[]>`
    SELECT id, inserted_count, deleted_count, is_claim_check, payload FROM ${sql(`pgtrickle.${st.outboxTable}`)} ORDER BY id`;
}
