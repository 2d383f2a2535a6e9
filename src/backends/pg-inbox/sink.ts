/**
 * PostgreSQL inbox sink (docs/interface.md §2.9, §5.3, §5.4, §6.6); the table and its statement
 * are resolved in table.ts, the remote connection in client.ts.
 *
 * Reverse pipelines write into an inbox table of the relay's own database; forward pipelines write
 * into an inbox of a remote PostgreSQL (`url`), with a client of their own. Both resolve the table
 * the same way: a `pgtrickle.pgt_inbox_config` row whose `inbox_name` is the configured name gives
 * the schema and the column names, else schema `pgtrickle` and the default column names, and an
 * explicit `mapping` overrides either. A reverse pipeline whose inbox is missing creates it with
 * `pgtrickle.create_inbox` (what `set_relay_inbox` promises) at start.
 *
 * A batch is ONE statement: `INSERT … SELECT … FROM jsonb_to_recordset($1) … ON CONFLICT (<id>)
 * DO NOTHING`, so its rows commit together and the row count of its command tag tells inserted
 * from dedup-skipped rows (no RETURNING: sending the ids back cost ≈ 0.7 µs of CPU per event).
 * When a row breaks a constraint or holds data the column type refuses
 * (SQLSTATE classes 23, 22 and 54, e.g. NOT NULL or CHECK on a bring-your-own table, U+0000, a
 * payload nested too deep, a key too long for the index; errors.ts isRowSqlstate), the batch is
 * redone row by row in one transaction with a savepoint per row: the good rows commit together,
 * the bad ones come back as rejections for the dead-letter table. `processed_at`, `error` and
 * `retry_count` are never written; `received_at` is left to the column default.
 */
import { describeUrl, explainConnectError, type Sql } from "../../db.ts";
import { scrubberFor, urlSecrets, type Scrub } from "../../redact.ts";
import { configError, errorMessage, pgErrorKind, RelayError, sqlstateOf, transientError } from "../../errors.ts";
import type { Message } from "../../message.ts";
import { withTimeout } from "../../sleep.ts";
import { sinkSpec, type BackendContext, type Rejection, type Sink } from "../types.ts";
import { describeTlsError } from "../../tls.ts";
import { connectRemote, isRowError } from "./client.ts";
import { PgInboxSinkConfig, splitQualifiedName, type InboxField, type PgInboxSinkOptions } from "./config.ts";
import { configRow, findTable, hasCreateInbox, planFor, quoteIdent, type InboxPlan } from "./table.ts";

/** An event_id for an error message: a key of kilobytes (itself a reason for refusal) is cut short. */
const quotedKey = (key: string) => (key.length > 200 ? `${JSON.stringify(key.slice(0, 200))}… (${key.length} characters)` : JSON.stringify(key));

export class PgInboxSink implements Sink {
  readonly describe: string;
  private readonly url: string | undefined;
  /** The URL's password and credential parameters, masked in every error this sink raises. */
  private readonly redact: Scrub;
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
    this.redact = scrubberFor(urlSecrets(this.url ?? ""));
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
    this.client = connectRemote(this.url, this.cfg, this.ctx.pipeline);
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
    const tls = describeTlsError(err, `pg-inbox ${what} ${this.label()}`);
    if (tls) return tls;
    const state = sqlstateOf(err);
    if (!state) {
      // No SQLSTATE: the connection itself failed (refused, reset, timed out); postgres.js reconnects.
      if (this.url) return transientError(`pg-inbox ${what} ${this.label(null, false)}: ${explainConnectError(err, this.url)}`, err);
      return transientError(`pg-inbox ${what} ${this.label()}: ${this.redact(errorMessage(err))}`, err);
    }
    // Class 42 (undefined table/column, no unique index for ON CONFLICT, type mismatch): the
    // table does not fit the configuration; retrying cannot help.
    const kind = state.startsWith("42") ? "config" : pgErrorKind(state);
    return new RelayError(kind, `pg-inbox ${what} ${this.label()}: ${this.redact(errorMessage(err))} (SQLSTATE ${state})`, { cause: err });
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
    let row = await configRow(sql, this.requested);
    let schema = this.requested.schema ?? row?.inbox_schema ?? "pgtrickle";
    let table = await findTable(sql, schema, this.requested.name);
    if (!table) {
      const hasCreate = await hasCreateInbox(sql);
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
        if (!(await findTable(sql, schema, this.requested.name))) throw configError(`${where}: pgtrickle.create_inbox('${this.requested.name}', '${schema}') failed: ${errorMessage(err)}`, err);
      }
      row = await configRow(sql, this.requested);
      schema = this.requested.schema ?? row?.inbox_schema ?? schema;
      table = await findTable(sql, schema, this.requested.name);
      if (!table) throw configError(`${where}: pgtrickle.create_inbox did not create ${qualified}`);
    }
    return planFor({ ctx: this.ctx, name: this.requested.name, mapping: this.mapping }, schema, table, row);
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
      inserted = (await this.withDeadline(sql.unsafe(plan.statement, [records as never], { prepare: true }), "write to")).count;
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
          inserted += rows.count;
        } catch (err) {
          if (!isRowError(err)) throw err;
          rejections.push({
            message: messages[i]!,
            error: `inbox ${this.label(plan)} refused event_id ${quotedKey(messages[i]!.dedup_key)}: ${this.redact(errorMessage(err))} (SQLSTATE ${sqlstateOf(err)})`,
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
  private withDeadline<T>(work: Promise<T>, what: string): Promise<T> {
    if (!this.url) return work;
    return withTimeout(work, this.cfg.timeout_ms, what, () => {
      const client = this.client;
      this.client = null;
      void client?.end({ timeout: 0 }).catch(() => {});
      return transientError(`pg-inbox ${what} ${this.label(null, false)}: no answer from ${describeUrl(this.url!)} within ${this.cfg.timeout_ms / 1000} s; reconnecting`);
    });
  }

  async close(): Promise<void> {
    const c = this.client;
    this.client = null;
    await c?.end({ timeout: 5 }).catch(() => {});
  }
}

export default sinkSpec({
  type: "pg-inbox",
  aliases: ["inbox"],
  config: PgInboxSinkConfig,
  create: (cfg, ctx) => new PgInboxSink(cfg, ctx),
});
