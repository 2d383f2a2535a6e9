/**
 * NATS connections: the URL list split into servers and credentials (so no secret reaches a log
 * line), the client's options (user/password, token, .creds file, TLS), and NatsLink, the one
 * lazily opened connection a sink or source shares, with its errors classified. Shared by the
 * sink and the source.
 */
import { readFileSync } from "node:fs";
import { connect, credsAuthenticator, type ConnectionOptions, type NatsConnection } from "nats";
import { configError, errorMessage, RelayError, transientError } from "../../errors.ts";
import { scrubberFor, type Scrub } from "../../redact.ts";
import type { ConnectionOptionsOf } from "./config.ts";
import type { BackendContext } from "../types.ts";
import { describeTlsError, loadTls } from "../../tls.ts";

export type Side = "sink" | "source";

interface Target {
  /** host:port of each server, the only form that reaches a log line or an error. */
  hostports: string[];
  tls: boolean;
  user?: string;
  pass?: string;
  token?: string;
}

/** Splits the URL list into host:port entries and credentials, so no secret rides in `servers`. */
export function parseNatsUrl(url: string, side: Side = "sink"): Target {
  const target: Target = { hostports: [], tls: false };
  for (const raw of url.split(",").map((s) => s.trim()).filter(Boolean)) {
    const withScheme = /^[a-z][a-z0-9+.-]*:\/\//i.test(raw) ? raw : `nats://${raw}`;
    let u: URL;
    try {
      u = new URL(withScheme);
    } catch {
      throw configError(`${side}.url: "${describeRawServer(raw)}" is not a NATS URL (expected nats://host:4222)`);
    }
    const scheme = u.protocol.replace(/:$/, "").toLowerCase();
    if (scheme !== "nats" && scheme !== "tls") throw configError(`${side}.url: scheme ${scheme}:// is not supported (use nats:// or tls://)`);
    if (scheme === "tls") target.tls = true;
    if (!u.hostname) throw configError(`${side}.url: "${describeRawServer(raw)}" has no host`);
    const host = u.hostname.includes(":") && !u.hostname.startsWith("[") ? `[${u.hostname}]` : u.hostname;
    target.hostports.push(`${host}:${u.port || "4222"}`);
    if (u.username && u.password) {
      target.user = decodeURIComponent(u.username);
      target.pass = decodeURIComponent(u.password);
    } else if (u.username) {
      target.token = decodeURIComponent(u.username);
    }
  }
  if (target.hostports.length === 0) throw configError(`${side}.url: no server given`);
  return target;
}

/** A server entry without anything before `@`, for error messages about unparseable URLs. */
const describeRawServer = (raw: string) => raw.replace(/^([^/]*\/\/)?[^@/]*@/, "$1***@");

/** The client's `tls` option (docs/TLS.md), or undefined without TLS: `tls://` or a `tls*` key turns it on. */
function natsTls(cfg: ConnectionOptionsOf, target: Target, side: Side): ConnectionOptions["tls"] | undefined {
  // nats.js hands these options to Node's tls.connect as they are
  return loadTls(cfg, `nats ${side}`, { implied: target.tls }) as ConnectionOptions["tls"] | undefined;
}

function connectionOptions(cfg: ConnectionOptionsOf, target: Target, ctx: BackendContext, side: Side): ConnectionOptions {
  const opts: ConnectionOptions = {
    servers: target.hostports,
    name: `pgtrickle-relay:${ctx.pipeline}`,
    timeout: cfg.connect_timeout_ms,
    // The client keeps reconnecting by itself; requests meanwhile time out as transient errors.
    maxReconnectAttempts: -1,
    reconnectTimeWait: 1000,
  };
  const user = cfg.user ?? target.user;
  const pass = cfg.pass ?? target.pass;
  const token = cfg.token ?? target.token;
  if (user !== undefined) {
    opts.user = user;
    opts.pass = pass ?? "";
  } else if (token !== undefined) {
    opts.token = token;
  }
  if (cfg.credentials_file) {
    let creds: Uint8Array;
    try {
      creds = readFileSync(cfg.credentials_file);
    } catch (err) {
      throw configError(`${side}.credentials_file: ${cfg.credentials_file} cannot be read (${(err as { code?: string }).code ?? "error"})`);
    }
    opts.authenticator = credsAuthenticator(creds);
  }
  const tls = natsTls(cfg, target, side);
  if (tls) opts.tls = tls;
  return opts;
}

export function natsCode(err: unknown): string | undefined {
  const code = (err as { code?: unknown })?.code;
  return typeof code === "string" ? code : undefined;
}

/** The JetStream API error (`{code, err_code, description}`) a publish or manager call got back. */
export function apiError(err: unknown): { code?: number; err_code?: number; description?: string } | undefined {
  return (err as { api_error?: { code?: number; err_code?: number; description?: string } })?.api_error;
}

/**
 * One connection to the servers, opened lazily and shared by concurrent callers; the client
 * reconnects by itself after a loss. Errors name host:port and never a secret.
 */
export class NatsLink {
  readonly target: Target;
  readonly where: string;
  readonly scrub: Scrub;
  nc: NatsConnection | null = null;
  /** True between a `disconnect` and the next `reconnect` status of the current connection. */
  disconnected = false;
  private connecting: Promise<NatsConnection> | null = null;

  constructor(
    private readonly cfg: ConnectionOptionsOf,
    private readonly ctx: BackendContext,
    readonly side: Side,
  ) {
    this.target = parseNatsUrl(cfg.url, side);
    // Every secret the options hold, so driver messages can be scrubbed before they are shown.
    this.scrub = scrubberFor([cfg.pass, cfg.token, this.target.pass, this.target.token]);
    this.where = this.target.hostports.join(",");
  }

  get scheme(): string {
    return this.target.tls ? "tls://" : "nats://";
  }

  async connect(): Promise<NatsConnection> {
    if (this.nc && !this.nc.isClosed()) return this.nc;
    // Concurrent callers share one attempt instead of opening several connections.
    this.connecting ??= this.open().finally(() => {
      this.connecting = null;
    });
    return this.connecting;
  }

  private async open(): Promise<NatsConnection> {
    let nc: NatsConnection;
    try {
      nc = await connect(connectionOptions(this.cfg, this.target, this.ctx, this.side));
    } catch (err) {
      throw this.connectFailure(err);
    }
    this.nc = nc;
    this.disconnected = false;
    void this.watch(nc);
    return nc;
  }

  /** Logs what the client does by itself (reconnects, async errors); never holds a secret. */
  private async watch(nc: NatsConnection): Promise<void> {
    try {
      for await (const s of nc.status()) {
        if (s.type === "disconnect") {
          if (this.nc === nc) this.disconnected = true;
          this.ctx.log.warn(`nats: disconnected from ${s.data}; reconnecting`);
        } else if (s.type === "reconnect") {
          if (this.nc === nc) this.disconnected = false;
          this.ctx.log.info(`nats: reconnected to ${s.data}`);
        } else if (s.type === "error") this.ctx.log.warn(`nats: ${this.scrub(errorMessage(s.data))}`);
      }
    } catch {
      /* the status iterator ends with the connection */
    }
  }

  connectFailure(err: unknown): RelayError {
    if (err instanceof RelayError) return err;
    const code = natsCode(err);
    const detail = this.scrub(errorMessage(err));
    const side = this.side;
    switch (code) {
      case "CONNECTION_REFUSED":
        return transientError(`cannot connect to NATS at ${this.where}: connection refused — is the server running there?`, err);
      case "TIMEOUT":
      case "CONNECTION_TIMEOUT":
        return transientError(`cannot connect to NATS at ${this.where}: no answer within ${this.cfg.connect_timeout_ms} ms`, err);
      case "AUTHORIZATION_VIOLATION":
      case "AUTHENTICATION_EXPIRED":
      case "BAD_AUTHENTICATION":
      case "BAD_CREDS":
      case "ACCOUNT_EXPIRED":
        return configError(`NATS at ${this.where} refused the credentials (${code}): check ${side}.user/pass/token/credentials_file`, err);
      case "TLS":
        return configError(`TLS with NATS at ${this.where} failed: ${detail} (check ${side}.url and ${side}.tls_*)`, err);
    }
    // Node socket errors (ENOTFOUND, EHOSTUNREACH, TLS handshake…) arrive with their own codes.
    const sys = (err as { code?: string })?.code;
    if (sys === "ENOTFOUND" || sys === "EAI_AGAIN") return transientError(`cannot connect to NATS at ${this.where}: host not found (${sys})`, err);
    const tls = describeTlsError(err, `NATS at ${this.where}`);
    if (tls) return tls;
    return transientError(`cannot connect to NATS at ${this.where}: ${detail}`, err);
  }

  /** A failure of a manager call: JetStream off, permissions and API errors are config errors. */
  fail(err: unknown, what: string): RelayError {
    if (err instanceof RelayError) return err;
    const code = natsCode(err);
    const detail = this.scrub(errorMessage(err));
    if (code === "503") return configError(`${what} at NATS ${this.where}: is the server started with JetStream (-js)?`, err);
    if (code === "PERMISSIONS_VIOLATION") return configError(`${what} at NATS ${this.where}: ${detail}`, err);
    if (apiError(err)) return configError(`${what} at NATS ${this.where}: ${detail}`, err);
    return transientError(`${what} at NATS ${this.where}: ${detail}`, err);
  }

  async close(): Promise<void> {
    const nc = this.nc;
    this.nc = null;
    if (nc && !nc.isClosed()) await nc.close().catch(() => {});
  }
}
