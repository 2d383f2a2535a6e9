/**
 * Redis Streams (CONTRACT.md §5.3 redis, §6.4) through ioredis.
 *
 * Sink: one `XADD <key> [MAXLEN ~ n] * dedup_key <k> pgt_dedup_key <k> subject <s> op <op>
 * payload <row JSON> full_refresh true|false outbox_id <id or "">` per message, sent as
 * pipelines of `max_in_flight` commands over one connection (Redis runs them in order, so each
 * stream key keeps batch order), every reply checked.
 *
 * XADD has no deduplication: a replayed batch appends its entries again. Consumers dedup on
 * `pgt_dedup_key` (the relay's Redis source and the inbox do, by `event_id`). Setting
 * `dedup_window_seconds` makes the sink itself idempotent within that window, at a cost (see
 * DEDUP_XADD below and bench/redis-sink.ts).
 */
import { readFileSync } from "node:fs";
import type { ConnectionOptions as TlsConnectionOptions } from "node:tls";
import { Redis, type RedisOptions } from "ioredis";
import * as v from "valibot";
import { configError, errorMessage, RelayError, transientError } from "../errors.ts";
import { renderTemplate, type Message } from "../message.ts";
import { defineBackend, sinkSpec, type BackendContext, type Rejection, type Sink } from "./types.ts";

const positiveInt = (max = Number.MAX_SAFE_INTEGER) => v.pipe(v.number(), v.integer(), v.minValue(1), v.maxValue(max));
const nonEmpty = () => v.pipe(v.string(), v.nonEmpty());

export const DEFAULT_STREAM_KEY = "pgtrickle:{stream_table}";

const TlsObject = v.looseObject({
  /** CA certificate: a PEM file path, or the PEM text itself. */
  ca: v.optional(nonEmpty()),
  /** Client certificate for mutual TLS: a PEM file path or PEM text. */
  cert: v.optional(nonEmpty()),
  /** Client private key for mutual TLS: a PEM file path or PEM text. */
  key: v.optional(nonEmpty()),
  /** Server name to verify the certificate against (default: the URL's host). */
  servername: v.optional(nonEmpty()),
  /** Verify the server certificate. Turn off only for testing. */
  reject_unauthorized: v.optional(v.boolean(), true),
});

export const RedisSinkConfig = v.looseObject({
  /** Ignored here: the loader has already chosen this backend by it. */
  type: v.optional(v.string()),
  /**
   * `redis://[user:password@]host:6379[/db]`; `rediss://` turns TLS on. Prefer the `password`
   * key with a `${env:…}` secret over a password in the URL.
   */
  url: nonEmpty(),
  /** ACL user name (Redis 6+); overrides the URL's. */
  username: v.optional(nonEmpty()),
  /** Password (`AUTH`); overrides the URL's. */
  password: v.optional(v.string()),
  /** TLS: `true`, or an object with `ca`, `cert`, `key`, `servername`, `reject_unauthorized`. */
  tls: v.optional(v.union([v.boolean(), TlsObject])),
  /**
   * Stream key per message, rendered with {stream_table} {schema} {outbox} {pipeline} {op}
   * {outbox_id} {refresh_id} and row fields.
   */
  stream_key: v.optional(nonEmpty(), DEFAULT_STREAM_KEY),
  /** Cap each stream near this many entries (`XADD … MAXLEN ~ n`). Absent: no trimming. */
  maxlen: v.optional(positiveInt()),
  /**
   * Seconds within which a dedup key already added to a stream is not added again (a Lua
   * script keeps recent keys in a sorted set `<stream key>:pgt_dedup`). 0: plain XADD, and a
   * replayed batch appends duplicates that consumers drop by `pgt_dedup_key`.
   */
  dedup_window_seconds: v.optional(v.pipe(v.number(), v.integer(), v.minValue(0), v.maxValue(7 * 86400)), 0),
  /** XADD commands sent before their replies are awaited (one pipeline). */
  max_in_flight: v.optional(positiveInt(100_000), 1000),
  /** Give up connecting after this long. */
  connect_timeout_ms: v.optional(positiveInt(600_000), 5000),
  /** A command without a reply after this long fails the batch as transient. */
  command_timeout_ms: v.optional(positiveInt(600_000), 5000),
});

export type RedisSinkOptions = v.InferOutput<typeof RedisSinkConfig>;

// ---------------------------------------------------------------------------------------------
// Connection

interface Target {
  host: string;
  port: number;
  db: number;
  tls: boolean;
  username?: string;
  password?: string;
  /** host:port, the only form of the address that reaches a log line or an error. */
  where: string;
}

export function parseRedisUrl(url: string): Target {
  let u: URL;
  try {
    u = new URL(/^[a-z][a-z0-9+.-]*:\/\//i.test(url) ? url : `redis://${url}`);
  } catch {
    throw configError(`sink.url is not a Redis URL (expected redis://host:6379)`);
  }
  const scheme = u.protocol.replace(/:$/, "").toLowerCase();
  if (scheme !== "redis" && scheme !== "rediss") throw configError(`sink.url: scheme ${scheme}:// is not supported (use redis:// or rediss://)`);
  if (!u.hostname) throw configError("sink.url has no host");
  const dbText = u.pathname.replace(/^\//, "");
  const db = dbText === "" ? 0 : Number(dbText);
  if (!Number.isInteger(db) || db < 0) throw configError(`sink.url: database "${dbText}" is not a number`);
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

/** PEM text as given, or read from the file it names. */
function pem(value: string, key: string): string {
  if (value.includes("-----BEGIN")) return value;
  try {
    return readFileSync(value, "utf8");
  } catch (err) {
    throw configError(`sink.tls.${key}: ${value} cannot be read (${(err as { code?: string }).code ?? "error"})`);
  }
}

function redisOptions(cfg: RedisSinkOptions, target: Target, ctx: BackendContext): RedisOptions {
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
    commandTimeout: cfg.command_timeout_ms,
    retryStrategy: (times) => Math.min(times * 200, 2000),
  };
  const username = cfg.username ?? target.username;
  const password = cfg.password ?? target.password;
  if (username !== undefined) opts.username = username;
  if (password !== undefined) opts.password = password;
  if (cfg.tls !== undefined && cfg.tls !== false) {
    const t = cfg.tls === true ? undefined : cfg.tls;
    const tls: TlsConnectionOptions = { rejectUnauthorized: t?.reject_unauthorized ?? true };
    if (t?.ca) tls.ca = pem(t.ca, "ca");
    if (t?.cert) tls.cert = pem(t.cert, "cert");
    if (t?.key) tls.key = pem(t.key, "key");
    if (t?.servername) tls.servername = t.servername;
    opts.tls = tls;
  } else if (target.tls) {
    opts.tls = {};
  }
  return opts;
}

function scrub(text: string, secrets: string[]): string {
  let out = text.replace(/(\w+:\/\/)[^@\s/]+@/g, "$1***@");
  for (const s of secrets) out = out.split(s).join("***");
  return out;
}

/** The first word of a Redis error reply (`WRONGTYPE`, `OOM`, `NOPERM`…), if it is one. */
function replyCode(err: unknown): string {
  const m = /^([A-Z][A-Z_-]+)\b/.exec(errorMessage(err));
  return m ? m[1]! : "";
}

/** Error replies that go away by themselves: retry the batch. */
const TRANSIENT_REPLIES = new Set(["OOM", "LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN", "READONLY", "CLUSTERDOWN", "NOREPLICAS", "MISCONF"]);

// ---------------------------------------------------------------------------------------------
// Idempotent XADD

/**
 * One call per stream key and chunk. KEYS[1] stream, KEYS[2] its dedup set; ARGV[1] window in
 * ms, ARGV[2] MAXLEN ("" for none), ARGV[3] field/value items per message, then per message its
 * dedup key followed by those items. Returns how many entries it added. Each message's XADD
 * comes before its key is recorded: when XADD fails (WRONGTYPE, OOM) the script stops there
 * with the earlier messages added and recorded and the failed one not, so the batch retry adds
 * exactly what is missing. Scripts run atomically, so two relays cannot both add a key.
 */
const DEDUP_XADD = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local width = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
local added = 0
for i = 4, #ARGV, width + 1 do
  if not redis.call('ZSCORE', KEYS[2], ARGV[i]) then
    local args = {KEYS[1]}
    if ARGV[2] ~= '' then args[2] = 'MAXLEN'; args[3] = '~'; args[4] = ARGV[2] end
    args[#args + 1] = '*'
    for j = i + 1, i + width do args[#args + 1] = ARGV[j] end
    redis.call('XADD', unpack(args))
    redis.call('ZADD', KEYS[2], now, ARGV[i])
    added = added + 1
  end
end
if added > 0 then redis.call('PEXPIRE', KEYS[2], window) end
return added
`;

type DedupPipeline = { pgtDedupXadd(stream: string, set: string, ...args: string[]): unknown };

/** The entry's field/value items (CONTRACT §6.4), in this order. */
function entryFields(m: Message): string[] {
  return [
    "dedup_key", m.dedup_key,
    "pgt_dedup_key", m.dedup_key,
    "subject", m.subject,
    "op", m.op,
    "payload", JSON.stringify(m.payload ?? null),
    "full_refresh", m.is_full_refresh ? "true" : "false",
    "outbox_id", m.outbox_id === null ? "" : String(m.outbox_id),
  ];
}
const FIELD_ITEMS = 14;

// ---------------------------------------------------------------------------------------------
// Sink

/** The error a failed batch reports: a config error wins, since retrying cannot cure it. */
const worse = (a: RelayError | null, b: RelayError): RelayError => (a === null || (b.kind === "config" && a.kind !== "config") ? b : a);

const HAS_PLACEHOLDER = /\{[A-Za-z0-9_]+\}/;

class RedisSink implements Sink {
  readonly describe: string;
  private readonly target: Target;
  private readonly secrets: string[];
  private readonly fixedKey: boolean;
  private client: Redis | null = null;
  /** The last socket-level error, which ioredis reports only on its `error` event. */
  private lastError: Error | null = null;
  private connecting: Promise<Redis> | null = null;

  constructor(
    private readonly cfg: RedisSinkOptions,
    private readonly ctx: BackendContext,
  ) {
    this.target = parseRedisUrl(cfg.url);
    this.secrets = [cfg.password, this.target.password].filter((s): s is string => !!s && s.length >= 3);
    this.fixedKey = !HAS_PLACEHOLDER.test(cfg.stream_key);
    const extras = [cfg.maxlen ? `MAXLEN ~ ${cfg.maxlen}` : "", cfg.dedup_window_seconds ? `dedup ${cfg.dedup_window_seconds}s` : ""].filter(Boolean);
    this.describe = `redis ${this.target.tls || cfg.tls ? "rediss" : "redis"}://${this.target.where}/${this.target.db} → ${cfg.stream_key}${extras.length ? ` (${extras.join(", ")})` : ""}`;
  }

  async start(): Promise<void> {
    const client = await this.connect();
    if (!this.fixedKey) return; // keys depend on the messages; WRONGTYPE is judged per message
    let type: string;
    try {
      type = await client.type(this.cfg.stream_key);
    } catch (err) {
      throw this.commandFailure(err, "TYPE");
    }
    if (type !== "stream" && type !== "none") {
      throw configError(`Redis key "${this.cfg.stream_key}" (sink.stream_key) at ${this.target.where} holds a ${type}, not a stream`);
    }
  }

  private async connect(): Promise<Redis> {
    if (this.client && this.client.status === "ready") return this.client;
    if (this.client && ["connecting", "connect", "reconnecting"].includes(this.client.status)) {
      // ioredis is reconnecting by itself after a lost connection; this batch fails meanwhile.
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
    const client = new Redis(redisOptions(this.cfg, this.target, this.ctx));
    let reported = false;
    client.on("error", (err: Error) => {
      this.lastError = err;
      if (this.client === client && !reported) {
        reported = true; // one line per outage, not one per reconnect attempt
        this.ctx.log.warn(`redis: ${this.target.where}: ${scrub(this.describeSocketError(err), this.secrets)}`);
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
          ? configError(`Redis at ${this.target.where} has no database ${this.target.db} (sink.url)`, err)
          : this.commandFailure(err, `SELECT ${this.target.db}`);
      }
    }
    if (this.cfg.dedup_window_seconds > 0) client.defineCommand("pgtDedupXadd", { numberOfKeys: 2, lua: DEDUP_XADD });
    this.client = client;
    return client;
  }

  private describeSocketError(err: Error): string {
    const code = (err as { code?: string }).code;
    if (code === "ECONNREFUSED") return "connection refused";
    if (code === "ETIMEDOUT") return `no answer within ${this.cfg.connect_timeout_ms} ms`;
    if (code === "ENOTFOUND" || code === "EAI_AGAIN") return `host not found (${code})`;
    return scrub(errorMessage(err), this.secrets);
  }

  private connectFailure(err: Error): RelayError {
    const code = replyCode(err);
    const detail = scrub(errorMessage(err), this.secrets);
    if (code === "WRONGPASS" || code === "NOAUTH" || code === "NOPERM" || /invalid password|AUTH.*without any password/i.test(detail)) {
      return configError(`Redis at ${this.target.where} refused the credentials: ${detail} (check sink.username/password/url)`, err);
    }
    if (/certificate|self[- ]signed|SSL|TLS|EPROTO/i.test(detail)) {
      return configError(`TLS with Redis at ${this.target.where} failed: ${detail} (check sink.url and sink.tls)`, err);
    }
    return transientError(`cannot connect to Redis at ${this.target.where}: ${this.describeSocketError(err)}`, err);
  }

  /** A failure that concerns the whole batch (no reply, or a reply that says so). */
  private commandFailure(err: unknown, what: string): RelayError {
    const code = replyCode(err);
    const detail = scrub(errorMessage(err), this.secrets);
    if (code === "NOPERM" || code === "NOAUTH") {
      return configError(`Redis at ${this.target.where} does not permit ${what}: ${detail} (check the ACL of sink.username)`, err);
    }
    if (code === "MOVED" || code === "ASK") {
      return configError(`Redis at ${this.target.where} is a cluster node (${code}); Redis Cluster is not supported by this sink`, err);
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

  async write(messages: Message[]): Promise<Rejection[]> {
    if (messages.length === 0) return [];
    const client = await this.connect();
    const rejections: Rejection[] = [];
    let failure: RelayError | null = null;
    const windowMs = this.cfg.dedup_window_seconds * 1000;
    const maxlen = this.cfg.maxlen === undefined ? "" : String(this.cfg.maxlen);

    // Chunks go one after the other: a chunk's replies are in before the next is sent, which
    // bounds memory and keeps every stream key's entries in batch order.
    for (let start = 0; start < messages.length && failure === null; start += this.cfg.max_in_flight) {
      const chunk = messages.slice(start, start + this.cfg.max_in_flight);
      // One command per message, or with dedup one script call per stream key.
      const commands: { key: string; messages: Message[] }[] = [];
      const pipeline = client.pipeline();
      if (windowMs > 0) {
        const byKey = new Map<string, { key: string; messages: Message[] }>();
        for (const m of chunk) {
          const key = renderTemplate(this.cfg.stream_key, m);
          let command = byKey.get(key);
          if (!command) byKey.set(key, (command = { key, messages: [] }));
          command.messages.push(m);
        }
        for (const command of byKey.values()) {
          const args: string[] = [String(windowMs), maxlen, String(FIELD_ITEMS)];
          for (const m of command.messages) args.push(m.dedup_key, ...entryFields(m));
          (pipeline as unknown as DedupPipeline).pgtDedupXadd(command.key, `${command.key}:pgt_dedup`, ...args);
          commands.push(command);
        }
      } else {
        for (const m of chunk) {
          const key = renderTemplate(this.cfg.stream_key, m);
          if (maxlen) pipeline.xadd(key, "MAXLEN", "~", maxlen, "*", ...entryFields(m));
          else pipeline.xadd(key, "*", ...entryFields(m));
          commands.push({ key, messages: [m] });
        }
      }
      let replies: [Error | null, unknown][] | null;
      try {
        replies = await pipeline.exec();
      } catch (err) {
        throw this.commandFailure(err, "XADD");
      }
      if (replies === null || replies.length !== commands.length) {
        throw transientError(`Redis at ${this.target.where}: XADD pipeline returned ${replies?.length ?? "no"} replies for ${commands.length} commands`);
      }
      for (const [i, [err]] of replies.entries()) {
        if (!err) continue;
        const { key, messages: affected } = commands[i]!;
        if (replyCode(err) !== "WRONGTYPE") {
          failure = worse(failure, this.commandFailure(err, "XADD"));
        } else if (this.fixedKey) {
          failure = worse(failure, configError(`Redis key "${key}" (sink.stream_key) at ${this.target.where} is not a stream (WRONGTYPE)`, err));
        } else {
          // A templated key: only the messages rendered to that key can never be added.
          for (const m of affected) rejections.push({ message: m, error: `Redis: key "${key}" holds another type than a stream (WRONGTYPE)` });
        }
      }
    }
    if (failure !== null) throw failure;
    return rejections;
  }

  async close(): Promise<void> {
    const client = this.client;
    this.client = null;
    if (!client) return;
    if (client.status === "ready") await client.quit().catch(() => client.disconnect());
    else client.disconnect();
  }
}

export default defineBackend({
  type: "redis",
  sink: sinkSpec({
    config: RedisSinkConfig,
    create: (cfg, ctx) => new RedisSink(cfg, ctx),
  }),
});
