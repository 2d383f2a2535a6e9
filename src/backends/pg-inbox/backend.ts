/**
 * PostgreSQL inbox sink (docs/interface.md §2.9, §5.3, §5.4, §6.6).
 *
 * Reverse pipelines write into an inbox table of the relay's own database; forward pipelines write
 * into an inbox of a remote PostgreSQL (`url`), with a client of their own. Both resolve the table
 * the same way: a `pgtrickle.pgt_inbox_config` row whose `inbox_name` is the configured name gives
 * the schema and the column names, else schema `pgtrickle` and the default column names, and an
 * explicit `mapping` overrides either. A reverse pipeline whose inbox is missing creates it with
 * `pgtrickle.create_inbox` (what `set_relay_inbox` promises) at start.
 *
 * A batch is ONE statement: `INSERT … SELECT … FROM jsonb_to_recordset($1) … ON CONFLICT (<id>)
 * DO NOTHING RETURNING <id>`, so its rows commit together and the number returned tells inserted
 * from dedup-skipped rows. When a row breaks a constraint or holds data the column type refuses
 * (SQLSTATE classes 23, 22 and 54, e.g. NOT NULL or CHECK on a bring-your-own table, U+0000, a
 * payload nested too deep, a key too long for the index; errors.ts isRowSqlstate), the batch is
 * redone row by row in one transaction with a savepoint per row: the good rows commit together,
 * the bad ones come back as rejections for the dead-letter table. `processed_at`, `error` and
 * `retry_count` are never written; `received_at` is left to the column default.
 */
import { readFileSync } from "node:fs";
import postgres from "postgres";
import * as v from "valibot";
import { describeUrl, explainConnectError, type Sql } from "../../db.ts";
import { redact, urlSecrets } from "../../redact.ts";
import { configError, errorMessage, isRowSqlstate, pgErrorKind, RelayError, transientError } from "../../errors.ts";
import type { Message } from "../../message.ts";
import { sinkSpec, type BackendContext, type Rejection, type Sink } from "../types.ts";

const nonEmpty = v.pipe(v.string(), v.minLength(1));

/** Inbox fields a mapping may rename; `received_at` only matters for tables without a default. */
export const INBOX_FIELDS = ["event_id", "event_type", "source", "aggregate_id", "payload", "trace_id", "received_at"] as const;
export type InboxField = (typeof INBOX_FIELDS)[number];

const SSL_MODES = ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] as const;
type SslMode = (typeof SSL_MODES)[number];

export const PgInboxSinkConfig = v.looseObject({
  /** Inbox table, `name` or `schema.name` (required; `set_relay_inbox` writes this key). Alias `inbox_table`. */
  inbox: v.optional(nonEmpty),
  /** Alias of `inbox`. */
  inbox_table: v.optional(nonEmpty),
  /** Schema of the inbox. Default: `inbox_schema` of its pgt_inbox_config row, else `pgtrickle`. Alias `schema`. */
  inbox_schema: v.optional(nonEmpty),
  /** Alias of `inbox_schema`. */
  schema: v.optional(nonEmpty),
  /** Remote PostgreSQL URL (forward pipelines; required there). Reverse pipelines use the relay's own database. Alias `postgres_url`. */
  url: v.optional(nonEmpty),
  /** Alias of `url`. */
  postgres_url: v.optional(nonEmpty),
  /** TLS to the remote server: a libpq sslmode (`require` encrypts, `verify-full` also checks the certificate and host name), or true for `require`. Default: the URL's `sslmode`. */
  ssl: v.optional(v.union([v.boolean(), v.picklist(SSL_MODES)])),
  /** PEM file of the CA that signed the remote server's certificate (like the URL's `sslrootcert`); with no sslmode given it means `verify-full`. */
  tls_ca: v.optional(nonEmpty),
  /** Conflict handling on the id column; only `DO NOTHING` exists (dedup by event_id). */
  on_conflict: v.optional(
    v.pipe(
      v.string(),
      v.check((s) => /^\s*do\s+nothing\s*$/i.test(s), 'only "DO NOTHING" is supported'),
    ),
    "DO NOTHING",
  ),
  /** create_inbox argument when a reverse pipeline's inbox is missing. */
  max_retries: v.optional(v.pipe(v.number(), v.integer(), v.minValue(0)), 3),
  /** create_inbox argument (schedule of the companion stream tables). */
  schedule: v.optional(nonEmpty, "1s"),
  /** create_inbox argument: also create `<inbox>_dlq`. */
  with_dead_letter: v.optional(v.boolean(), true),
  /** create_inbox argument (`set_relay_inbox` default 24). */
  retention_hours: v.optional(v.pipe(v.number(), v.integer(), v.minValue(1)), 24),
  /**
   * Remote only: most milliseconds start() or one batch write may take; then the connection is
   * dropped and the batch retried (a server that resets connections during startup would
   * otherwise keep postgres.js reconnecting for ever).
   */
  timeout_ms: v.optional(v.pipe(v.number(), v.integer(), v.minValue(1000)), 30000),
  /** Column names by field: `{"event_id": "msg_id", "event_type": "kind", "source": …, "aggregate_id": …, "payload": …, "trace_id": …, "received_at": …}`; wins over pgt_inbox_config. */
  mapping: v.optional(v.record(v.picklist(INBOX_FIELDS), nonEmpty)),
});
export type PgInboxSinkOptions = v.InferOutput<typeof PgInboxSinkConfig>;

/** `name`, `schema.name`, `"we.ird"."name"` → parts; quotes only group, they do not fold case. */
export function splitQualifiedName(text: string): { schema: string | null; name: string } {
  const parts: string[] = [];
  let i = 0;
  while (i <= text.length) {
    let part = "";
    if (text[i] === '"') {
      i++;
      for (;;) {
        if (i >= text.length) throw new Error(`unterminated quote in ${JSON.stringify(text)}`);
        if (text[i] === '"') {
          if (text[i + 1] === '"') {
            part += '"';
            i += 2;
            continue;
          }
          i++;
          break;
        }
        part += text[i++];
      }
      if (i < text.length && text[i] !== ".") throw new Error(`unexpected text after a quoted name in ${JSON.stringify(text)}`);
    } else {
      const dot = text.indexOf(".", i);
      part = dot < 0 ? text.slice(i) : text.slice(i, dot);
      i = dot < 0 ? text.length : dot;
    }
    if (part === "") throw new Error(`empty name part in ${JSON.stringify(text)}`);
    parts.push(part);
    if (i >= text.length) break;
    i++; // the dot
  }
  if (parts.length > 2) throw new Error(`${JSON.stringify(text)} has more than two parts; use schema.table`);
  return parts.length === 2 ? { schema: parts[0]!, name: parts[1]! } : { schema: null, name: parts[0]! };
}

interface ConfigRow {
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
const quoteIdent = (name: string) => `"${name.replace(/"/g, '""')}"`;

/** This row, not the batch, is bad (classes 22, 23, 54: errors.ts isRowSqlstate). */
const isRowError = (err: unknown) => isRowSqlstate(sqlstateOf(err));

/** An event_id for an error message: a key of kilobytes (itself a reason for refusal) is cut short. */
const quotedKey = (key: string) => (key.length > 200 ? `${JSON.stringify(key.slice(0, 200))}… (${key.length} characters)` : JSON.stringify(key));

const sqlstateOf = (err: unknown): string | undefined => {
  const code = (err as { code?: unknown })?.code;
  return typeof code === "string" && /^[0-9A-Z]{5}$/.test(code) ? code : undefined;
};

/** TLS options for postgres.js from a libpq sslmode and CA/cert files. */
export function tlsOption(mode: SslMode | undefined, files: { ca?: string; cert?: string; key?: string; systemCa?: boolean }): false | "prefer" | "require" | Record<string, unknown> {
  const read = (what: string, path: string) => {
    try {
      return readFileSync(path, "utf8");
    } catch (err) {
      throw configError(`pg-inbox sink: cannot read ${what} file ${path}: ${(err as { code?: string }).code ?? errorMessage(err)}`);
    }
  };
  const effective: SslMode = mode ?? (files.ca || files.systemCa ? "verify-full" : "disable");
  if (effective === "disable") return false;
  const material: Record<string, unknown> = {};
  if (files.ca) material.ca = read("CA certificate", files.ca);
  if (files.cert) material.cert = read("client certificate", files.cert);
  if (files.key) material.key = read("client key", files.key);
  const hasMaterial = Object.keys(material).length > 0;
  switch (effective) {
    case "allow":
    case "prefer":
      return hasMaterial ? { ...material, rejectUnauthorized: false } : "prefer";
    case "require":
      // libpq: `require` with a root certificate behaves like verify-ca.
      if (files.ca) return { ...material, rejectUnauthorized: true, checkServerIdentity: () => undefined };
      return hasMaterial ? { ...material, rejectUnauthorized: false } : "require";
    case "verify-ca":
      return { ...material, rejectUnauthorized: true, checkServerIdentity: () => undefined };
    case "verify-full":
      return { ...material, rejectUnauthorized: true };
  }
}

/** Splits libpq TLS parameters off a URL (postgres.js would send unknown ones to the server as settings). */
export function splitTlsParams(url: string): { url: string; sslmode?: SslMode; sslrootcert?: string; sslcert?: string; sslkey?: string } {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    return { url };
  }
  const take = (name: string) => {
    const value = u.searchParams.get(name);
    u.searchParams.delete(name);
    return value ?? undefined;
  };
  const mode = take("sslmode");
  const out = { sslrootcert: take("sslrootcert"), sslcert: take("sslcert"), sslkey: take("sslkey") };
  if (mode !== undefined && !(SSL_MODES as readonly string[]).includes(mode)) {
    throw configError(`pg-inbox sink: sslmode=${mode} in the URL is not one of ${SSL_MODES.join(", ")}`);
  }
  return { url: u.toString(), sslmode: mode as SslMode | undefined, ...out };
}

export class PgInboxSink implements Sink {
  readonly describe: string;
  private readonly url: string | undefined;
  /** The URL's password and credential parameters, masked in every error this sink raises. */
  private readonly urlSecrets: string[];
  private readonly requested: { schema: string | null; name: string };
  private readonly mapping: Partial<Record<InboxField, string>>;
  private client: Sql | null = null;
  private plan: InboxPlan | null = null;

  constructor(
    private readonly cfg: PgInboxSinkOptions,
    private readonly ctx: BackendContext,
  ) {
    const where = `pipeline '${ctx.pipeline}'`;
    const inbox = cfg.inbox ?? cfg.inbox_table;
    if (!inbox) throw configError(`${where}: pg-inbox sink needs 'inbox' (the inbox table, name or schema.name)`);
    if (cfg.inbox && cfg.inbox_table && cfg.inbox !== cfg.inbox_table) {
      throw configError(`${where}: sink.inbox '${cfg.inbox}' and sink.inbox_table '${cfg.inbox_table}' disagree`);
    }
    let parts: { schema: string | null; name: string };
    try {
      parts = splitQualifiedName(inbox);
    } catch (err) {
      throw configError(`${where}: sink.inbox: ${errorMessage(err)}`);
    }
    const schemaKey = cfg.inbox_schema ?? cfg.schema ?? null;
    if (cfg.inbox_schema && cfg.schema && cfg.inbox_schema !== cfg.schema) {
      throw configError(`${where}: sink.inbox_schema '${cfg.inbox_schema}' and sink.schema '${cfg.schema}' disagree`);
    }
    if (parts.schema && schemaKey && parts.schema !== schemaKey) {
      throw configError(`${where}: sink.inbox names schema '${parts.schema}' but sink.inbox_schema is '${schemaKey}'`);
    }
    this.requested = { schema: parts.schema ?? schemaKey, name: parts.name };
    this.mapping = cfg.mapping ?? {};
    this.url = cfg.url ?? cfg.postgres_url;
    this.urlSecrets = urlSecrets(this.url ?? "");
    if (cfg.url && cfg.postgres_url && cfg.url !== cfg.postgres_url) throw configError(`${where}: sink.url and sink.postgres_url disagree`);
    if (ctx.direction === "forward" && !this.url) {
      throw configError(`${where}: a forward pg-inbox sink writes to a remote database: set sink.url (postgres://…)`);
    }
    const shown = this.requested.schema ? `${this.requested.schema}.${this.requested.name}` : this.requested.name;
    this.describe = this.url ? `pg-inbox ${describeUrl(this.url)} → ${shown}` : `pg-inbox ${shown}`;
  }

  private get sql(): Sql {
    if (this.client) return this.client;
    if (!this.url) return this.ctx.sql;
    const tls = splitTlsParams(this.url);
    const systemCa = tls.sslrootcert === "system";
    const ssl = tlsOption(this.cfg.ssl === true ? "require" : this.cfg.ssl === false ? "disable" : (this.cfg.ssl ?? tls.sslmode), {
      ca: this.cfg.tls_ca ?? (systemCa ? undefined : tls.sslrootcert),
      cert: tls.sslcert,
      key: tls.sslkey,
      systemCa,
    });
    // A few connections: a batch is one statement; postgres.js reconnects by itself.
    this.client = postgres(tls.url, {
      max: 2,
      connect_timeout: 10,
      idle_timeout: 0,
      ssl: ssl as never,
      onnotice: () => {},
      connection: { application_name: `pgtrickle-relay pg-inbox ${this.ctx.pipeline}`.slice(0, 63) },
    }) as Sql;
    return this.client;
  }

  /** The resolved table and statement (after start). */
  get resolved(): InboxPlan | null {
    return this.plan;
  }

  private label(plan?: InboxPlan | null, withUrl = true): string {
    const p = plan ?? this.plan;
    const table = p ? `${quoteIdent(p.schema)}.${quoteIdent(p.table)}` : this.requested.schema ? `${this.requested.schema}.${this.requested.name}` : this.requested.name;
    return this.url && withUrl ? `${table} at ${describeUrl(this.url)}` : table;
  }

  /** Any failure → a RelayError with the right kind and a message naming the table, never a password. */
  private wrap(err: unknown, what: string): RelayError {
    if (err instanceof RelayError) return err;
    const state = sqlstateOf(err);
    if (!state) {
      // No SQLSTATE: the connection itself failed (refused, reset, timed out); postgres.js reconnects.
      if (this.url) return transientError(`pg-inbox ${what} ${this.label(null, false)}: ${explainConnectError(err, this.url)}`, err);
      return transientError(`pg-inbox ${what} ${this.label()}: ${redact(errorMessage(err))}`, err);
    }
    // Class 42 (undefined table/column, no unique index for ON CONFLICT, type mismatch): the
    // table does not fit the configuration; retrying cannot help.
    const kind = state.startsWith("42") ? "config" : pgErrorKind(state);
    return new RelayError(kind, `pg-inbox ${what} ${this.label()}: ${redact(errorMessage(err), this.urlSecrets)} (SQLSTATE ${state})`, { cause: err });
  }

  async start(): Promise<void> {
    try {
      this.plan = await this.withDeadline(this.resolve(), "start: inbox");
    } catch (err) {
      throw this.wrap(err, "start: inbox");
    }
    const p = this.plan;
    const written = p.targets.map((t) => (t.field === t.column ? t.column : `${t.field}→${t.column}`)).join(", ");
    this.ctx.log.debug(`inbox ${this.label()}: writing ${written}${p.missing.length ? `; no column for ${p.missing.join(", ")}` : ""}`);
  }

  private async resolve(): Promise<InboxPlan> {
    const sql = this.sql;
    const where = `pipeline '${this.ctx.pipeline}'`;
    let row = await this.configRow(sql);
    let schema = this.requested.schema ?? row?.inbox_schema ?? "pgtrickle";
    let table = await this.findTable(sql, schema);
    if (!table) {
      const hasCreate = await this.hasCreateInbox(sql);
      const qualified = `${quoteIdent(schema)}.${quoteIdent(this.requested.name)}`;
      if (this.ctx.direction === "forward" || this.url) {
        throw configError(`${where}: inbox table ${qualified} does not exist at ${describeUrl(this.url!)}; create it there (pgtrickle.create_inbox('${this.requested.name}', '${schema}'))`);
      }
      if (!hasCreate) {
        throw configError(`${where}: inbox table ${qualified} does not exist and pgtrickle.create_inbox() is not available to create it; create the table or install pg_trickle`);
      }
      if (row) {
        throw configError(`${where}: inbox '${this.requested.name}' is registered in pgtrickle.pgt_inbox_config (schema ${row.inbox_schema}) but table ${qualified} does not exist; drop the inbox or create the table`);
      }
      this.ctx.log.info(`inbox table ${qualified} is missing: creating it with pgtrickle.create_inbox`);
      try {
        await sql`
          SELECT pgtrickle.create_inbox(
            p_name => ${this.requested.name}, p_schema => ${schema}, p_max_retries => ${this.cfg.max_retries}::integer,
            p_schedule => ${this.cfg.schedule}, with_dead_letter => ${this.cfg.with_dead_letter}::boolean,
            with_stats => true, p_retention_hours => ${this.cfg.retention_hours}::integer)`;
      } catch (err) {
        // Another pipeline writing to the same inbox may have created it meanwhile.
        if (!(await this.findTable(sql, schema))) throw configError(`${where}: pgtrickle.create_inbox('${this.requested.name}', '${schema}') failed: ${errorMessage(err)}`, err);
      }
      row = await this.configRow(sql);
      schema = this.requested.schema ?? row?.inbox_schema ?? schema;
      table = await this.findTable(sql, schema);
      if (!table) throw configError(`${where}: pgtrickle.create_inbox did not create ${qualified}`);
    }
    return this.planFor(schema, table, row);
  }

  /** The pgt_inbox_config row for this inbox name (and schema, when one was given), if any. */
  private async configRow(sql: Sql): Promise<ConfigRow | null> {
    const [exists] = await sql<{ ok: boolean }[]>`SELECT to_regclass('pgtrickle.pgt_inbox_config') IS NOT NULL AS ok`;
    if (!exists?.ok) return null;
    const rows = await sql<ConfigRow[]>`
      SELECT inbox_schema, id_column, event_type_column, received_at_column, processed_at_column, retry_count_column, error_column
        FROM pgtrickle.pgt_inbox_config WHERE inbox_name = ${this.requested.name}`;
    const row = rows[0];
    if (!row) return null;
    // A row for the same name in another schema describes another inbox.
    if (this.requested.schema && row.inbox_schema !== this.requested.schema) return null;
    return row;
  }

  private async findTable(sql: Sql, schema: string): Promise<{ oid: number; columns: TableColumn[]; uniqueColumns: string[]; canInsert: boolean } | null> {
    const [rel] = await sql<{ oid: number; can_insert: boolean }[]>`
      SELECT c.oid::int AS oid, has_table_privilege(c.oid, 'INSERT') AS can_insert
        FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
       WHERE n.nspname = ${schema} AND c.relname = ${this.requested.name} AND c.relkind IN ('r', 'p')`;
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

  private async hasCreateInbox(sql: Sql): Promise<boolean> {
    const [r] = await sql<{ ok: boolean }[]>`
      SELECT to_regprocedure('pgtrickle.create_inbox(text,text,integer,text,boolean,boolean,integer)') IS NOT NULL AS ok`;
    return !!r?.ok;
  }

  private planFor(schema: string, table: { columns: TableColumn[]; uniqueColumns: string[]; canInsert: boolean }, row: ConfigRow | null): InboxPlan {
    const where = `pipeline '${this.ctx.pipeline}'`;
    const qualified = `${quoteIdent(schema)}.${quoteIdent(this.requested.name)}`;
    const fromRow: Partial<Record<InboxField, string>> = row
      ? { event_id: row.id_column, event_type: row.event_type_column, received_at: row.received_at_column }
      : {};
    const byName = new Map(table.columns.map((c) => [c.name, c]));
    const columnFor = (field: InboxField): { column: string; explicit: boolean } => {
      const mapped = this.mapping[field];
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
    for (const field of FIELDS_BY_DIRECTION[this.ctx.direction]) {
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
      `ON CONFLICT (${quoteIdent(idColumn)}) DO NOTHING RETURNING ${quoteIdent(idColumn)}`;
    return { schema, table: this.requested.name, idColumn, targets, missing, receivedAtNow, statement };
  }

  /** The JSON record of one message, keyed c0…cN in the plan's column order. */
  private record(plan: InboxPlan, m: Message): Record<string, unknown> {
    const out: Record<string, unknown> = {};
    plan.targets.forEach((t, i) => {
      out[`c${i}`] = this.fieldValue(t.field, m);
    });
    return out;
  }

  private fieldValue(field: InboxField, m: Message): unknown {
    switch (field) {
      case "event_id":
        return m.dedup_key;
      case "event_type":
        return m.subject;
      case "payload":
        return m.payload === undefined ? null : m.payload;
      case "source":
        if (this.ctx.direction === "forward") {
          return m.context.stream_table ? `pg_trickle:${m.context.schema ?? "public"}.${m.context.stream_table}` : null;
        }
        return m.inbound?.source ?? null;
      case "aggregate_id":
        return m.inbound?.aggregate_id ?? null;
      case "trace_id":
        return m.inbound?.trace_id ?? null;
      case "received_at":
        return null;
    }
  }

  async write(batch: Message[]): Promise<Rejection[]> {
    if (batch.length === 0) return [];
    const plan = this.plan;
    if (!plan) throw transientError(`pg-inbox ${this.label()}: write before start`);
    const sql = this.sql;
    const refused = this.refusedAtTheDoor(batch);
    const refusedSet = new Set(refused.map((r) => r.message));
    const messages = refused.length === 0 ? batch : batch.filter((m) => !refusedSet.has(m));
    if (messages.length === 0) return refused;
    const records = messages.map((m) => this.record(plan, m));
    let inserted: number;
    let rejections: Rejection[] = [];
    try {
      inserted = (await this.withDeadline(sql.unsafe(plan.statement, [records as never], { prepare: true }), "write to")).length;
    } catch (err) {
      if (!isRowError(err)) throw this.wrap(err, "write to");
      try {
        ({ inserted, rejections } = await this.withDeadline(this.isolate(sql, plan, messages, records), "write to"));
      } catch (err2) {
        throw this.wrap(err2, "write to");
      }
    }
    this.ctx.onInboxWrite?.(inserted, messages.length - inserted - rejections.length);
    return [...refused, ...rejections];
  }

  /** Messages a source marked as never writable (e.g. JSON nested too deep: docs/LIMITS.md), not sent to the server. */
  private refusedAtTheDoor(messages: Message[]): Rejection[] {
    return messages
      .filter((m) => m.refused !== undefined)
      .map((message) => ({ message, error: `inbox ${this.label()} refused event_id ${quotedKey(message.dedup_key)}: ${message.refused}` }));
  }

  /** Row by row in one transaction, a savepoint per row: good rows commit together, bad ones are returned. */
  private async isolate(sql: Sql, plan: InboxPlan, messages: Message[], records: Record<string, unknown>[]) {
    return sql.begin(async (tx) => {
      let inserted = 0;
      const rejections: Rejection[] = [];
      for (let i = 0; i < messages.length; i++) {
        try {
          const rows = await tx.savepoint((sp) => sp.unsafe(plan.statement, [[records[i]] as never], { prepare: true }));
          inserted += rows.length;
        } catch (err) {
          if (!isRowError(err)) throw err;
          rejections.push({
            message: messages[i]!,
            error: `inbox ${this.label(plan)} refused event_id ${quotedKey(messages[i]!.dedup_key)}: ${redact(errorMessage(err), this.urlSecrets)} (SQLSTATE ${sqlstateOf(err)})`,
          });
        }
      }
      return { inserted, rejections };
    });
  }

  /**
   * Remote only: gives up after timeout_ms, dropping the client (postgres.js then rejects what is
   * pending and stops reconnecting); the next call connects afresh. A statement that did commit
   * meanwhile is harmless: the retry's rows are skipped by ON CONFLICT.
   */
  private async withDeadline<T>(work: Promise<T>, what: string): Promise<T> {
    if (!this.url) return work;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const expired = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        const client = this.client;
        this.client = null;
        void client?.end({ timeout: 0 }).catch(() => {});
        reject(transientError(`pg-inbox ${what} ${this.label(null, false)}: no answer from ${describeUrl(this.url!)} within ${this.cfg.timeout_ms / 1000} s; reconnecting`));
      }, this.cfg.timeout_ms);
    });
    work.catch(() => {}); // settled after the deadline: nobody is listening any more
    try {
      return await Promise.race([work, expired]);
    } finally {
      clearTimeout(timer);
    }
  }

  async close(): Promise<void> {
    const c = this.client;
    this.client = null;
    await c?.end({ timeout: 5 }).catch(() => {});
  }
}

export const sink = sinkSpec({
  type: "pg-inbox",
  aliases: ["inbox"],
  config: PgInboxSinkConfig,
  create: (cfg, ctx) => new PgInboxSink(cfg, ctx),
});
