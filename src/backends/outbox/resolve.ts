import type { Sql } from "../../db.ts";
import { configError } from "../../errors.ts";

/** Where a stream table's outbox lives, read from pgt_outbox_config — never derived (docs/interface.md §2.3). */
export interface OutboxTarget {
  schema: string;
  streamTable: string;
  outboxTable: string;
  /** pgtrickle."outbox_delta_rows_<st48>" — the one name the extension does derive (§2.4). */
  deltaTable: string;
  /** Column names of the delta table: the shipped ones, or the legacy design's (§2.4). */
  deltaColumns: { op: string; data: string; legacyOps: boolean } | null;
  headerOid: number;
  idSequence: string | null;
}

function splitName(name: string): { schema?: string; table: string } {
  const unquote = (s: string) => s.replace(/^"(.*)"$/, "$1");
  const m = /^("(?:[^"]|"")+"|[^.]+)\.("(?:[^"]|"")+"|.+)$/.exec(name);
  return m ? { schema: unquote(m[1]!), table: unquote(m[2]!) } : { table: unquote(name) };
}

/**
 * Checks that the outbox API is there; returns whether pgt_stream_tables is too (where the
 * schema of a stream table comes from, see findOutbox). One round trip: a pipeline's start waits
 * for each of them.
 */
async function requireOutboxApi(sql: Sql, pipeline: string): Promise<{ streamTables: boolean }> {
  const [row] = await sql<{ ok: boolean; st: boolean }[]>`
    SELECT to_regclass('pgtrickle.pgt_outbox_config') IS NOT NULL AS ok, to_regclass('pgtrickle.pgt_stream_tables') IS NOT NULL AS st`;
  if (!row?.ok) {
    throw configError(
      `pipeline '${pipeline}': the pg_trickle outbox API is not in this database (pgtrickle.pgt_outbox_config is missing); pg_trickle 0.28–0.45 provides it`,
    );
  }
  return { streamTables: row.st };
}

interface ConfigRow {
  schema: string | null;
  stream_table_name: string;
  outbox_table_name: string;
}

/**
 * Finds the outbox for `source.outbox`, which may be `schema.table`, a bare stream-table name,
 * or an outbox table name (docs/interface.md §5.2). Returns null when nothing matches.
 */
export async function findOutbox(sql: Sql, pipeline: string, name: string): Promise<OutboxTarget | null> {
  const { streamTables } = await requireOutboxApi(sql, pipeline);
  // stream_table_oid holds the extension's pgt_id (0.28–0.71), not a relation OID: the schema
  // comes from pgt_stream_tables; the pg_class join only serves versions that store a real OID.
  const rows = streamTables
    ? await sql<ConfigRow[]>`
        SELECT coalesce(s.pgt_schema, n.nspname) AS schema, c.stream_table_name, c.outbox_table_name
        FROM pgtrickle.pgt_outbox_config c
        LEFT JOIN pgtrickle.pgt_stream_tables s ON s.pgt_id = c.stream_table_oid::bigint
        LEFT JOIN pg_class k ON s.pgt_id IS NULL AND k.oid = c.stream_table_oid
        LEFT JOIN pg_namespace n ON n.oid = k.relnamespace`
    : await sql<ConfigRow[]>`
        SELECT n.nspname AS schema, c.stream_table_name, c.outbox_table_name
        FROM pgtrickle.pgt_outbox_config c
        LEFT JOIN pg_class k ON k.oid = c.stream_table_oid
        LEFT JOIN pg_namespace n ON n.oid = k.relnamespace`;
  const { schema, table } = splitName(name);
  let matches = rows.filter((r) => r.stream_table_name === table && (schema === undefined || r.schema === schema));
  if (matches.length > 1) {
    const [current] = await sql<{ s: string }[]>`SELECT current_schema() AS s`;
    const inCurrent = matches.filter((r) => r.schema === current?.s);
    if (inCurrent.length !== 1) {
      throw configError(
        `pipeline '${pipeline}': source.outbox '${name}' matches stream tables in several schemas (${matches.map((m) => m.schema).join(", ")}); write it as schema.table`,
      );
    }
    matches = inCurrent;
  }
  if (matches.length === 0 && schema === undefined) matches = rows.filter((r) => r.outbox_table_name === table);
  const hit = matches[0];
  if (!hit) return null;
  return describeOutbox(sql, pipeline, hit);
}

async function describeOutbox(sql: Sql, pipeline: string, row: ConfigRow): Promise<OutboxTarget> {
  const deltaTable = `outbox_delta_rows_${[...row.stream_table_name].slice(0, 48).join("")}`;
  // The delta table's columns from pg_attribute, in the same statement (null: no delta table):
  // information_schema.columns cost a round trip more and several milliseconds of planning on
  // the fresh connection a pipeline starts with.
  const [info] = await sql<{ oid: number | null; seq: string | null; delta_columns: string[] | null }[]>`
    SELECT to_regclass(format('pgtrickle.%I', ${row.outbox_table_name}::text))::oid::int AS oid,
           pg_get_serial_sequence(format('pgtrickle.%I', ${row.outbox_table_name}::text), 'id') AS seq,
           (SELECT array_agg(a.attname::text) FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = to_regclass(format('pgtrickle.%I', ${deltaTable}::text)) AND a.attnum > 0 AND NOT a.attisdropped) AS delta_columns`;
  if (!info?.oid) {
    throw configError(`pipeline '${pipeline}': outbox table pgtrickle."${row.outbox_table_name}" is registered but does not exist`);
  }
  let deltaColumns: OutboxTarget["deltaColumns"] = null;
  if (info.delta_columns) {
    const names = new Set(info.delta_columns);
    if (names.has("row_op") && names.has("row_data")) deltaColumns = { op: "row_op", data: "row_data", legacyOps: false };
    else if (names.has("op") && names.has("payload")) deltaColumns = { op: "op", data: "payload", legacyOps: true };
  }
  return {
    schema: row.schema ?? "public",
    streamTable: row.stream_table_name,
    outboxTable: row.outbox_table_name,
    deltaTable,
    deltaColumns,
    headerOid: info.oid,
    idSequence: info.seq,
  };
}

/** Enables the outbox when the pipeline asks for it (`auto_enable_outbox`, §3.3). */
export async function enableOutbox(sql: Sql, name: string, retentionHours: number): Promise<void> {
  const { schema, table } = splitName(name);
  const [cur] = await sql<{ s: string }[]>`SELECT current_schema() AS s`;
  await sql`SELECT pgtrickle.enable_outbox(${`${schema ?? cur?.s ?? "public"}.${table}`}, ${retentionHours}::int)`;
}
