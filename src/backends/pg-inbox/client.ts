/**
 * The pg-inbox sink's connection to a remote PostgreSQL: libpq TLS parameters turned into
 * postgres.js options, the client, and which errors are the row's rather than the batch's.
 */
import type { ConnectionOptions } from "node:tls";
import postgres from "postgres";
import type { Sql } from "../../db.ts";
import { configError, errorMessage, isRowSqlstate, sqlstateOf } from "../../errors.ts";
import { log } from "../../observe/log.ts";
import { loadTls } from "../../tls.ts";
import { SSL_MODES, type PgInboxSinkOptions, type SslMode } from "./config.ts";

/** This row, not the batch, is bad (classes 22, 23, 54: errors.ts isRowSqlstate). */
export const isRowError = (err: unknown) => isRowSqlstate(sqlstateOf(err));


/** postgres.js `ssl` for a libpq sslmode and the TLS material loaded by src/tls.ts (docs/TLS.md). */
export function tlsOption(mode: SslMode | undefined, tls: ConnectionOptions | undefined, systemCa = false): false | "prefer" | "require" | ConnectionOptions {
  const effective: SslMode = mode ?? (tls || systemCa ? "verify-full" : "disable");
  if (effective === "disable") {
    if (tls) throw configError("pg-inbox sink: sslmode=disable, but tls keys are set; drop one of them");
    return false;
  }
  const verified = { ...tls, rejectUnauthorized: tls?.rejectUnauthorized ?? true };
  const caOnly = { ...verified, checkServerIdentity: () => undefined };
  switch (effective) {
    case "allow":
    case "prefer":
      return tls ? { ...tls, rejectUnauthorized: false } : "prefer";
    case "require":
      // libpq: `require` with a root certificate behaves like verify-ca.
      if (tls?.ca !== undefined) return caOnly;
      return tls ? { ...tls, rejectUnauthorized: false } : "require";
    case "verify-ca":
      return caOnly;
    case "verify-full":
      return verified;
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
  const params = splitTlsParams(url);
  const systemCa = params.sslrootcert === "system";
  const { ssl: oldSsl, ...keys } = cfg;
  const material = loadTls(
    { ...keys, tls_ca: cfg.tls_ca ?? (systemCa ? undefined : params.sslrootcert), tls_cert: cfg.tls_cert ?? params.sslcert, tls_key: cfg.tls_key ?? params.sslkey },
    WHERE,
  );
  return { url: params.url, ssl: tlsOption(sslmodeOf(oldSsl, params.sslmode, cfg.tls), material, systemCa) };
}

const WHERE = "pg-inbox sink";

/** The sslmode: the old `ssl` key (with a warning), else the URL's, else `tls: false` as disable. */
function sslmodeOf(ssl: PgInboxSinkOptions["ssl"], fromUrl: SslMode | undefined, tls: boolean | undefined): SslMode | undefined {
  if (ssl !== undefined) {
    log.warn(`${WHERE}: ssl is an old spelling; use the URL's sslmode (or tls, which means verify-full)`);
    return ssl === true ? "require" : ssl === false ? "disable" : ssl;
  }
  return fromUrl ?? (tls === false ? "disable" : undefined);
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
