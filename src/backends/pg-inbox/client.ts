/**
 * The pg-inbox sink's connection to a remote PostgreSQL: libpq TLS parameters turned into
 * postgres.js options, the client, and which errors are the row's rather than the batch's.
 */
import { readFileSync } from "node:fs";
import postgres from "postgres";
import type { Sql } from "../../db.ts";
import { configError, errorMessage, isRowSqlstate, sqlstateOf } from "../../errors.ts";
import { SSL_MODES, type PgInboxSinkOptions, type SslMode } from "./config.ts";

/** This row, not the batch, is bad (classes 22, 23, 54: errors.ts isRowSqlstate). */
export const isRowError = (err: unknown) => isRowSqlstate(sqlstateOf(err));


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

/**
 * TLS for the remote server, all in one place: the URL without its libpq TLS parameters, and the
 * postgres.js `ssl` option from them and the `ssl` / `tls_ca` keys (which win).
 */
export function remoteTls(url: string, cfg: PgInboxSinkOptions): { url: string; ssl: ReturnType<typeof tlsOption> } {
  const tls = splitTlsParams(url);
  const systemCa = tls.sslrootcert === "system";
  const ssl = tlsOption(cfg.ssl === true ? "require" : cfg.ssl === false ? "disable" : (cfg.ssl ?? tls.sslmode), {
    ca: cfg.tls_ca ?? (systemCa ? undefined : tls.sslrootcert),
    cert: tls.sslcert,
    key: tls.sslkey,
    systemCa,
  });
  return { url: tls.url, ssl };
}

/** A client of the remote inbox database at `url`. */
export function connectRemote(url: string, cfg: PgInboxSinkOptions, pipeline: string): Sql {
  const tls = remoteTls(url, cfg);
  // A few connections: a batch is one statement; postgres.js reconnects by itself.
  return postgres(tls.url, {
    max: 2,
    connect_timeout: 10,
    idle_timeout: 0,
    ssl: tls.ssl as never,
    onnotice: () => {},
    connection: { application_name: `pgtrickle-relay pg-inbox ${pipeline}`.slice(0, 63) },
  }) as Sql;
}
