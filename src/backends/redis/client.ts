/**
 * The connection to Redis through ioredis: the URL, authentication and TLS, one client opened on
 * demand, and how its errors are classified (config or transient).
 */
import type { ConnectionOptions as TlsConnectionOptions } from "node:tls";
import { Redis, type RedisOptions } from "ioredis";
import { configError, errorMessage, RelayError, transientError } from "../../errors.ts";
import { scrubberFor, type Scrub } from "../../redact.ts";
import type { BackendContext } from "../types.ts";
import { describeTlsError, loadTls } from "../../tls.ts";
import type { ConnectionOptionsOf, Side } from "./config.ts";

export interface Target {
  host: string;
  port: number;
  db: number;
  tls: boolean;
  username?: string;
  password?: string;
  /** host:port, the only form of the address that reaches a log line or an error. */
  where: string;
}

export function parseRedisUrl(url: string, side: Side = "sink"): Target {
  let u: URL;
  try {
    u = new URL(/^[a-z][a-z0-9+.-]*:\/\//i.test(url) ? url : `redis://${url}`);
  } catch {
    throw configError(`${side}.url is not a Redis URL (expected redis://host:6379)`);
  }
  const scheme = u.protocol.replace(/:$/, "").toLowerCase();
  if (scheme !== "redis" && scheme !== "rediss") throw configError(`${side}.url: scheme ${scheme}:// is not supported (use redis:// or rediss://)`);
  if (!u.hostname) throw configError(`${side}.url has no host`);
  const dbText = u.pathname.replace(/^\//, "");
  const db = dbText === "" ? 0 : Number(dbText);
  if (!Number.isInteger(db) || db < 0) throw configError(`${side}.url: database "${dbText}" is not a number`);
  const host = u.hostname.replace(/^\[|\]$/g, "");
  const port = Number(u.port || "6379");
  return {
    host,
    port,
    db,
    tls: scheme === "rediss",
    username: u.username ? decodeURIComponent(u.username) : undefined,
    password: u.password ? decodeURIComponent(u.password) : undefined,
    where: `${host.includes(":") ? `[${host}]` : host}:${port}`,
  };
}

function redisOptions(cfg: ConnectionOptionsOf, target: Target, ctx: BackendContext, side: Side, commandTimeoutMs: number | undefined): RedisOptions {
  const opts: RedisOptions = {
    host: target.host,
    port: target.port,
    db: target.db,
    connectionName: `pgtrickle-relay:${ctx.pipeline}`.replace(/\s/g, "_"),
    lazyConnect: true,
    // Commands fail at once while disconnected (a transient error for the pipeline to retry)
    // instead of piling up in an offline queue or being resent behind the batch's back.
    enableOfflineQueue: false,
    maxRetriesPerRequest: 0,
    autoResendUnfulfilledCommands: false,
    connectTimeout: cfg.connect_timeout_ms,
    // ioredis times every command once this is a number; undefined leaves timing to the caller.
    commandTimeout: commandTimeoutMs,
    retryStrategy: (times) => Math.min(times * 200, 2000),
  };
  const username = cfg.username ?? target.username;
  const password = cfg.password ?? target.password;
  if (username !== undefined) opts.username = username;
  if (password !== undefined) opts.password = password;
  const tls = tlsOptions(cfg, target, side);
  if (tls) opts.tls = tls;
  return opts;
}

/** The TLS options of the connection (docs/TLS.md): `rediss://` or a `tls*` key turns TLS on. */
function tlsOptions(cfg: ConnectionOptionsOf, target: Target, side: Side): TlsConnectionOptions | undefined {
  return loadTls(cfg, `redis ${side}`, { implied: target.tls });
}

/** The first word of a Redis error reply (`WRONGTYPE`, `OOM`, `NOPERM`…), if it is one. */
export function replyCode(err: unknown): string {
  const m = /^([A-Z][A-Z_-]+)\b/.exec(errorMessage(err));
  return m ? m[1]! : "";
}

/** Error replies that go away by themselves: retry the batch. */
const TRANSIENT_REPLIES = new Set(["OOM", "LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN", "READONLY", "CLUSTERDOWN", "NOREPLICAS", "MISCONF"]);

/**
 * One ioredis client, opened on demand. While it is disconnected commands fail at once and
 * ioredis reconnects in the background; every error names host:port and never a secret.
 */
export class RedisLink {
  readonly target: Target;
  readonly scrub: Scrub;
  client: Redis | null = null;
  /** The last socket-level error, which ioredis reports only on its `error` event. */
  private lastError: Error | null = null;
  private connecting: Promise<Redis> | null = null;

  constructor(
    private readonly cfg: ConnectionOptionsOf,
    private readonly ctx: BackendContext,
    readonly side: Side,
    /** Per-command timeout; undefined: none, the caller times its calls (the sink). */
    private readonly commandTimeoutMs: number | undefined,
    private readonly onReady?: (client: Redis) => void,
  ) {
    this.target = parseRedisUrl(cfg.url, side);
    this.scrub = scrubberFor([cfg.password, this.target.password]);
  }

  get where(): string {
    return this.target.where;
  }

  async connect(): Promise<Redis> {
    if (this.client && this.client.status === "ready") return this.client;
    if (this.client && ["connecting", "connect", "reconnecting"].includes(this.client.status)) {
      // ioredis is reconnecting by itself after a lost connection; this call fails meanwhile.
      const cause = this.lastError ? `: ${this.describeSocketError(this.lastError)}` : "";
      throw transientError(`not connected to Redis at ${this.target.where} (reconnecting${cause})`, this.lastError ?? undefined);
    }
    this.connecting ??= this.open().finally(() => {
      this.connecting = null;
    });
    return this.connecting;
  }

  private async open(): Promise<Redis> {
    this.client?.disconnect();
    this.client = null;
    this.lastError = null;
    const client = new Redis(redisOptions(this.cfg, this.target, this.ctx, this.side, this.commandTimeoutMs));
    let reported = false;
    client.on("error", (err: Error) => {
      this.lastError = err;
      if (this.client === client && !reported) {
        reported = true; // one line per outage, not one per reconnect attempt
        this.ctx.log.warn(`redis: ${this.target.where}: ${this.scrub(this.describeSocketError(err))}`);
      }
    });
    client.on("ready", () => {
      if (reported) this.ctx.log.info(`redis: reconnected to ${this.target.where}`);
      reported = false;
      this.lastError = null;
    });
    try {
      await client.connect();
    } catch (err) {
      // connect() only says "Connection is closed."; the cause came on the `error` event.
      const cause = this.lastError ?? (err as Error);
      client.disconnect();
      throw this.connectFailure(cause);
    }
    if (this.target.db !== 0) {
      // ioredis reports a failed SELECT only on its `error` event and then carries on in db 0.
      try {
        await client.select(this.target.db);
      } catch (err) {
        client.disconnect();
        throw /out of range/i.test(errorMessage(err))
          ? configError(`Redis at ${this.target.where} has no database ${this.target.db} (${this.side}.url)`, err)
          : this.commandFailure(err, `SELECT ${this.target.db}`);
      }
    }
    this.onReady?.(client);
    this.client = client;
    return client;
  }

  describeSocketError(err: Error): string {
    const code = (err as { code?: string }).code;
    if (code === "ECONNREFUSED") return "connection refused";
    if (code === "ETIMEDOUT") return `no answer within ${this.cfg.connect_timeout_ms} ms`;
    if (code === "ENOTFOUND" || code === "EAI_AGAIN") return `host not found (${code})`;
    return this.scrub(errorMessage(err));
  }

  private connectFailure(err: Error): RelayError {
    const code = replyCode(err);
    const detail = this.scrub(errorMessage(err));
    const side = this.side;
    if (code === "WRONGPASS" || code === "NOAUTH" || code === "NOPERM" || /invalid password|AUTH.*without any password/i.test(detail)) {
      return configError(`Redis at ${this.target.where} refused the credentials: ${detail} (check ${side}.username/password/url)`, err);
    }
    const tls = describeTlsError(err, `Redis at ${this.target.where}`);
    if (tls) return tls;
    return transientError(`cannot connect to Redis at ${this.target.where}: ${this.describeSocketError(err)}`, err);
  }

  /** A failure that concerns the whole call (no reply, or a reply that says so). */
  commandFailure(err: unknown, what: string): RelayError {
    if (err instanceof RelayError) return err;
    const code = replyCode(err);
    const detail = this.scrub(errorMessage(err));
    if (code === "NOPERM" || code === "NOAUTH") {
      return configError(`Redis at ${this.target.where} does not permit ${what}: ${detail} (check the ACL of ${this.side}.username)`, err);
    }
    if (code === "MOVED" || code === "ASK") {
      return configError(`Redis at ${this.target.where} is a cluster node (${code}); Redis Cluster is not supported by this ${this.side}`, err);
    }
    if (code === "NOSCRIPT") return transientError(`Redis at ${this.target.where} lost the dedup script (${what}); retrying`, err);
    if (TRANSIENT_REPLIES.has(code)) return transientError(`Redis at ${this.target.where}: ${what} failed: ${detail}`, err);
    if (/Connection is closed|max retries|Stream isn't writeable|timed out|ECONNRESET|EPIPE/i.test(detail)) {
      const cause = this.lastError ? ` (${this.describeSocketError(this.lastError)})` : "";
      return transientError(`Redis at ${this.target.where}: ${what} failed, connection lost: ${detail}${cause}`, err);
    }
    // An unknown reply: retried rather than dead-lettered, so a message is never skipped by guess.
    return transientError(`Redis at ${this.target.where}: ${what} failed: ${detail}`, err);
  }

  /** Drops the connection at once (a blocked read returns with an error). */
  abort(): void {
    const client = this.client;
    this.client = null;
    client?.disconnect();
  }

  async close(): Promise<void> {
    const client = this.client;
    this.client = null;
    if (!client) return;
    if (client.status === "ready") await client.quit().catch(() => client.disconnect());
    else client.disconnect();
  }
}
