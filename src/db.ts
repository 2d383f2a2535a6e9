import postgres from "postgres";
import { errorMessage } from "./errors.ts";
import { redact, urlSecrets } from "./redact.ts";

export type Sql = postgres.Sql<Record<string, never>>;

/** `user@host:port/db` — what a log line may say about a URL; never the password. */
export function describeUrl(url: string): string {
  try {
    const u = new URL(url);
    const user = u.username ? `${decodeURIComponent(u.username)}@` : "";
    const db = u.pathname.replace(/^\//, "") || "(default db)";
    return `${user}${u.hostname || "localhost"}:${u.port || "5432"}/${db}`;
  } catch {
    return "(unparseable URL)";
  }
}

export interface ConnectOptions {
  /** Connections in this client's pool; a coordinator or LISTEN session uses 1. */
  max?: number;
  /** Seconds before an attempt to connect gives up. */
  connectTimeout?: number;
  applicationName?: string;
}

/**
 * A postgres.js client with the relay's settings. bigint columns stay strings (outbox ids must
 * stay exact); notices are not printed (extension functions raise NOTICEs on purpose).
 */
export function connect(url: string, options: ConnectOptions = {}): Sql {
  return postgres(url, {
    max: options.max ?? 4,
    connect_timeout: options.connectTimeout ?? 10,
    idle_timeout: 0,
    onnotice: () => {},
    connection: { application_name: options.applicationName ?? "pgtrickle-relay" },
  }) as Sql;
}

/** One line for a failed connection: where to, what failed, what to try. No password, no stack. */
export function explainConnectError(err: unknown, url: string): string {
  const code = (err as { code?: string })?.code;
  const target = describeUrl(url);
  const hint =
    code === "ECONNREFUSED"
      ? "is the server running and listening there?"
      : code === "28P01" || code === "28000"
        ? "check the user name and password"
        : code === "3D000"
          ? "create the database or fix the URL"
          : code === "CONNECT_TIMEOUT" || code === "ETIMEDOUT"
            ? "the host did not answer in time; check host, port and firewall"
            : code === "ENOTFOUND"
              ? "the host name does not resolve"
              : "check the URL";
  return `cannot connect to PostgreSQL at ${target}: ${redact(errorMessage(err), urlSecrets(url))} — ${hint}`;
}

/**
 * One identifier, quoted whole. postgres.js's `sql(name)` splits a name at dots (schema.table),
 * which would turn a table named `a.b` into two identifiers; names from the catalog are single
 * identifiers, so they are quoted here with every `"` doubled.
 */
export function ident(sql: Sql, name: string) {
  return sql.unsafe(`"${name.replace(/"/g, '""')}"`);
}

/** `"schema"."table"`, each part quoted whole. */
export function qualifiedIdent(sql: Sql, schema: string, name: string) {
  return sql.unsafe(`"${schema.replace(/"/g, '""')}"."${name.replace(/"/g, '""')}"`);
}
