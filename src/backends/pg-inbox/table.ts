/**
 * Which table a pg-inbox sink writes and how (docs/interface.md §6.6): the inbox's
 * pgt_inbox_config row, the table's columns and unique indexes from the catalog, and the one
 * INSERT statement built from them (the plan).
 */
import type { Sql } from "../../db.ts";
import { configError } from "../../errors.ts";
import type { BackendContext } from "../types.ts";
import type { InboxField } from "./config.ts";

/** The inbox a sink was configured with; `schema` null until pgt_inbox_config or the default gives it. */
export interface RequestedInbox {
  schema: string | null;
  name: string;
}

export interface ConfigRow {
  inbox_schema: string;
  id_column: string;
  event_type_column: string;
  received_at_column: string;
  processed_at_column: string;
  retry_count_column: string;
  error_column: string;
}

interface TableColumn {
  name: string;
  type: string;
  has_default: boolean;
  not_null: boolean;
}

/** One column the sink writes: the inbox field, the table column, its SQL type. */
interface Target {
  field: InboxField;
  column: string;
  type: string;
}

/** The table, its columns and the statement, as resolved at start(). */
export interface InboxPlan {
  schema: string;
  table: string;
  idColumn: string;
  targets: Target[];
  /** Optional fields whose column the table lacks (not written). */
  missing: InboxField[];
  /** received_at column without a default: written as now(). */
  receivedAtNow: string | null;
  statement: string;
}

/** Fields each direction writes (§6.6): forward has no aggregate_id/trace_id to offer. */
const FIELDS_BY_DIRECTION = {
  reverse: ["event_id", "event_type", "source", "aggregate_id", "payload", "trace_id"],
  forward: ["event_id", "event_type", "source", "payload"],
} as const satisfies Record<string, readonly InboxField[]>;

const REQUIRED_FIELDS: readonly InboxField[] = ["event_id", "payload"];

/**
 * The quoting of db.ts ident(): the statement is built once as text (its record definition holds
 * the column types), so identifiers are quoted here with the same rule, every `"` doubled.
 */
export const quoteIdent = (name: string) => `"${name.replace(/"/g, '""')}"`;

/** The table as the catalog shows it. */
export interface FoundTable {
  oid: number;
  columns: TableColumn[];
  uniqueColumns: string[];
  canInsert: boolean;
}

/** The pgt_inbox_config row for this inbox name (and schema, when one was given), if any. */
export async function configRow(sql: Sql, requested: RequestedInbox): Promise<ConfigRow | null> {
  const [exists] = await sql<{ ok: boolean }[]>`SELECT to_regclass('pgtrickle.pgt_inbox_config') IS NOT NULL AS ok`;
  if (!exists?.ok) return null;
  const rows = await sql<ConfigRow[]>`
    SELECT inbox_schema, id_column, event_type_column, received_at_column, processed_at_column, retry_count_column, error_column
      FROM pgtrickle.pgt_inbox_config WHERE inbox_name = ${requested.name}`;
  const row = rows[0];
  if (!row) return null;
  // A row for the same name in another schema describes another inbox.
  if (requested.schema && row.inbox_schema !== requested.schema) return null;
  return row;
}

/** The table `schema.name` (plain or partitioned) as the catalog shows it, or null when it does not exist. */
export async function findTable(sql: Sql, schema: string, name: string): Promise<FoundTable | null> {
  const [rel] = await sql<{ oid: number; can_insert: boolean }[]>`
    SELECT c.oid::int AS oid, has_table_privilege(c.oid, 'INSERT') AS can_insert
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = ${schema} AND c.relname = ${name} AND c.relkind IN ('r', 'p')`;
  if (!rel) return null;
  const columns = await sql<TableColumn[]>`
    SELECT a.attname AS name, pg_catalog.format_type(a.atttypid, a.atttypmod) AS type,
           a.atthasdef AS has_default, a.attnotnull AS not_null
      FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = ${rel.oid}::oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
     ORDER BY a.attnum`;
  // Single-column, non-partial unique indexes: what ON CONFLICT (<column>) can infer.
  const unique = await sql<{ name: string }[]>`
    SELECT a.attname AS name
      FROM pg_catalog.pg_index i
      JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
     WHERE i.indrelid = ${rel.oid}::oid AND i.indisunique AND i.indpred IS NULL AND i.indnkeyatts = 1 AND i.indkey[0] > 0`;
  return { oid: rel.oid, columns, uniqueColumns: unique.map((u) => u.name), canInsert: rel.can_insert };
}

/** Whether pgtrickle.create_inbox() exists (pg_trickle installed) to create a missing inbox. */
export async function hasCreateInbox(sql: Sql): Promise<boolean> {
  const [r] = await sql<{ ok: boolean }[]>`
    SELECT to_regprocedure('pgtrickle.create_inbox(text,text,integer,text,boolean,boolean,integer)') IS NOT NULL AS ok`;
  return !!r?.ok;
}

/** The columns each inbox field goes to and the INSERT statement; a table that cannot take them is a config error. */
export function planFor(
  inbox: { ctx: Pick<BackendContext, "pipeline" | "direction">; name: string; mapping: Partial<Record<InboxField, string>> },
  schema: string,
  table: FoundTable,
  row: ConfigRow | null,
): InboxPlan {
  const where = `pipeline '${inbox.ctx.pipeline}'`;
  const qualified = `${quoteIdent(schema)}.${quoteIdent(inbox.name)}`;
  const fromRow: Partial<Record<InboxField, string>> = row
    ? { event_id: row.id_column, event_type: row.event_type_column, received_at: row.received_at_column }
    : {};
  const byName = new Map(table.columns.map((c) => [c.name, c]));
  const columnFor = (field: InboxField): { column: string; explicit: boolean } => {
    const mapped = inbox.mapping[field];
    if (mapped !== undefined) {
      // PLAN D spelled the default mapping as inbox column → message field
      // ({"event_id":"dedup_key","event_type":"subject"}); that spelling means "the default".
      const planSpelling = (field === "event_id" && mapped === "dedup_key") || (field === "event_type" && mapped === "subject");
      if (!(planSpelling && !byName.has(mapped))) return { column: mapped, explicit: true };
    }
    return { column: fromRow[field] ?? field, explicit: false };
  };

  const targets: Target[] = [];
  const missing: InboxField[] = [];
  for (const field of FIELDS_BY_DIRECTION[inbox.ctx.direction]) {
    const { column, explicit } = columnFor(field);
    const col = byName.get(column);
    if (!col) {
      if (explicit || REQUIRED_FIELDS.includes(field)) {
        const how = explicit ? `sink.mapping.${field}` : row && fromRow[field] ? `pgt_inbox_config.${field === "event_id" ? "id_column" : `${field}_column`}` : "default";
        throw configError(`${where}: inbox table ${qualified} has no column "${column}" for ${field} (${how}); set sink.mapping.${field} to the right column`);
      }
      missing.push(field);
      continue;
    }
    targets.push({ field, column, type: col.type });
  }

  const seen = new Map<string, InboxField>();
  for (const t of targets) {
    const other = seen.get(t.column);
    if (other) throw configError(`${where}: column "${t.column}" of ${qualified} is mapped to both ${other} and ${t.field}`);
    seen.set(t.column, t.field);
  }
  const reserved = [row?.processed_at_column ?? "processed_at", row?.error_column ?? "error", row?.retry_count_column ?? "retry_count"];
  for (const t of targets) {
    if (reserved.includes(t.column)) throw configError(`${where}: column "${t.column}" of ${qualified} belongs to the inbox processor (processed_at/error/retry_count); the relay never writes it`);
  }

  const idColumn = targets.find((t) => t.field === "event_id")!.column;
  if (!table.uniqueColumns.includes(idColumn)) {
    throw configError(`${where}: inbox table ${qualified} has no primary key or unique index on "${idColumn}" alone; dedup by ON CONFLICT needs one`);
  }
  if (!table.canInsert) throw configError(`${where}: the relay's login may not INSERT into ${qualified} (GRANT INSERT, SELECT ON ${qualified} TO <relay role>)`);

  const received = byName.get(columnFor("received_at").column);
  const receivedAtNow = received && !received.has_default && !seen.has(received.name) ? received.name : null;

  const insertCols = [...targets.map((t) => quoteIdent(t.column)), ...(receivedAtNow ? [quoteIdent(receivedAtNow)] : [])];
  const selectCols = [...targets.map((_, i) => `x.c${i}`), ...(receivedAtNow ? ["now()"] : [])];
  const recordDef = targets.map((t, i) => `c${i} ${t.type}`).join(", ");
  const statement =
    `INSERT INTO ${qualified} (${insertCols.join(", ")}) ` +
    `SELECT ${selectCols.join(", ")} FROM jsonb_to_recordset($1::jsonb) AS x(${recordDef}) ` +
    `ON CONFLICT (${quoteIdent(idColumn)}) DO NOTHING`;
  return { schema, table: inbox.name, idColumn, targets, missing, receivedAtNow, statement };
}
