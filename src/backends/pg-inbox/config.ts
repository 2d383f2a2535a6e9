/**
 * Options of the PostgreSQL inbox sink (docs/interface.md §5.3, §6.6) and the pure helpers about
 * them: inbox field names, sslmodes, `schema.name` splitting.
 */
import * as v from "valibot";
import { TLS_ENTRIES } from "../../tls.ts";
import { intInRange, nonEmptyString, positiveInt } from "../schema.ts";

/** Inbox fields a mapping may rename; `received_at` only matters for tables without a default. */
export const INBOX_FIELDS = ["event_id", "event_type", "source", "aggregate_id", "payload", "trace_id", "received_at"] as const;
export type InboxField = (typeof INBOX_FIELDS)[number];

export const SSL_MODES = ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] as const;
export type SslMode = (typeof SSL_MODES)[number];

export const PgInboxSinkConfig = v.looseObject({
  inbox: v.pipe(
    v.optional(nonEmptyString()),
    v.description("Inbox table, `name` or `schema.name` (required; `set_relay_inbox` writes this key). Alias `inbox_table`."),
  ),
  inbox_table: v.pipe(v.optional(nonEmptyString()), v.description("Alias of `inbox`.")),
  inbox_schema: v.pipe(
    v.optional(nonEmptyString()),
    v.description("Schema of the inbox. Default: `inbox_schema` of its pgt_inbox_config row, else `pgtrickle`. Alias `schema`."),
  ),
  schema: v.pipe(v.optional(nonEmptyString()), v.description("Alias of `inbox_schema`.")),
  url: v.pipe(
    v.optional(nonEmptyString()),
    v.description("Remote PostgreSQL URL (forward pipelines; required there). Reverse pipelines use the relay's own database. Alias `postgres_url`."),
  ),
  postgres_url: v.pipe(v.optional(nonEmptyString()), v.description("Alias of `url`.")),
  ssl: v.pipe(
    v.optional(v.union([v.boolean(), v.picklist(SSL_MODES)])),
    v.description("Old spelling of the URL's libpq `sslmode` (`true` meant `require`), accepted with a warning; it wins over the URL's."),
  ),
  ...TLS_ENTRIES,
  on_conflict: v.pipe(
    v.optional(
      v.pipe(
        v.string(),
        v.check((s) => /^\s*do\s+nothing\s*$/i.test(s), 'only "DO NOTHING" is supported'),
      ),
      "DO NOTHING",
    ),
    v.description("Conflict handling on the id column; only `DO NOTHING` exists (dedup by event_id)."),
  ),
  max_retries: v.pipe(
    v.optional(intInRange(0), 3),
    v.description("create_inbox argument when a reverse pipeline's inbox is missing."),
  ),
  schedule: v.pipe(v.optional(nonEmptyString(), "1s"), v.description("create_inbox argument (schedule of the companion stream tables).")),
  with_dead_letter: v.pipe(v.optional(v.boolean(), true), v.description("create_inbox argument: also create `<inbox>_dlq`.")),
  retention_hours: v.pipe(
    v.optional(positiveInt(), 24),
    v.description("create_inbox argument (`set_relay_inbox` default 24)."),
  ),
  timeout_ms: v.pipe(
    v.optional(intInRange(1000), 30000),
    v.description("Remote only: most milliseconds start() or one batch write may take; then the connection is dropped and the batch retried (a server that resets connections during startup would otherwise keep postgres.js reconnecting for ever)."),
  ),
  mapping: v.pipe(
    v.optional(v.record(v.picklist(INBOX_FIELDS), nonEmptyString())),
    v.description("Column names by field: `{\"event_id\": \"msg_id\", \"event_type\": \"kind\", \"source\": …, \"aggregate_id\": …, \"payload\": …, \"trace_id\": …, \"received_at\": …}`; wins over pgt_inbox_config."),
  ),
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

