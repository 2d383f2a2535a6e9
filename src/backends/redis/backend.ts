/**
 * Redis Streams (docs/interface.md §5.3, §5.4, §6.4, §6.5) through ioredis.
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
 *
 * Source: a consumer group member. On every (re)start it reads its own pending entries first,
 * then claims entries other consumers left idle (XAUTOCLAIM), then new ones; each batch is
 * XACKed — every id of it, in one call — only after the inbox committed it.
 */
import { readFileSync } from "node:fs";
import type { ConnectionOptions as TlsConnectionOptions } from "node:tls";
import { Redis, type RedisOptions } from "ioredis";
import * as v from "valibot";
import { configError, errorMessage, RelayError, transientError } from "../../errors.ts";
import { decodeBody, inboundMessage, reverseSourceKeys, type DecodedBody } from "../../inbound.ts";
import { renderTemplate, type Message } from "../../message.ts";
import { redact as scrub } from "../../redact.ts";
import { LAG_TIMEOUT_MS, sinkSpec, sourceSpec, type Batch, type BackendContext, type DeadLetter, type Lag, type Rejection, type Sink, type Source } from "../types.ts";

const positiveInt = (max = Number.MAX_SAFE_INTEGER) => v.pipe(v.number(), v.integer(), v.minValue(1), v.maxValue(max));
const nonEmpty = () => v.pipe(v.string(), v.nonEmpty());

export const DEFAULT_STREAM_KEY = "pgtrickle:{stream_table}";
export const DEFAULT_GROUP = "pgtrickle-relay";

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

/** Connection and authentication keys, the same for the sink and the source. */
const connectionKeys = {
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
  /** Give up connecting after this long. */
  connect_timeout_ms: v.optional(positiveInt(600_000), 5000),
  /** A command without a reply after this long fails as transient (a blocking read gets `block_ms` more). */
  command_timeout_ms: v.optional(positiveInt(600_000), 5000),
};

export const RedisSinkConfig = v.looseObject({
  /** Ignored here: the loader has already chosen this backend by it. */
  type: v.optional(v.string()),
  ...connectionKeys,
  /**
   * Sink: the stream key per message, rendered with {stream_table} {schema} {outbox} {pipeline}
   * {op} {outbox_id} {refresh_id} and row fields. Source (required): the stream to consume.
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
});

export type RedisSinkOptions = v.InferOutput<typeof RedisSinkConfig>;

const RedisSourceObject = v.looseObject({
  type: v.optional(v.string()),
  ...connectionKeys,
  ...reverseSourceKeys,
  // stream_key is documented once, with the sink's keys above.
  stream_key: nonEmpty(),
  /** Consumer group (default `pgtrickle-relay`); created at start when missing. Alias `group`. */
  group_name: v.optional(nonEmpty()),
  /** Alias of `group_name`. */
  group: v.optional(nonEmpty()),
  /**
   * This relay's name in the group. Default `<relay group id>:<pipeline>`: stable, so after a
   * restart the entries it had read but not acknowledged are its own again and read first.
   */
  consumer_name: v.optional(nonEmpty()),
  /** Where a newly created group starts: `0` = the whole stream, `$` = only entries added later, or an entry id. */
  start_id: v.optional(nonEmpty(), "0"),
  /** How long a read waits for new entries (`XREADGROUP … BLOCK`); drain mode does not wait. */
  block_ms: v.optional(positiveInt(600_000), 5000),
  /** Entries per read (`COUNT`); default and upper bound `batch_size`. */
  count: v.optional(positiveInt()),
  /**
   * Entries another consumer of the group has left unacknowledged this long (it crashed, or
   * was renamed) are claimed with XAUTOCLAIM and relayed. 0: never claim.
   */
  claim_idle_ms: v.optional(v.pipe(v.number(), v.integer(), v.minValue(0)), 60_000),
  /** Create the stream along with the group when the key does not exist yet. */
  mkstream: v.optional(v.boolean(), true),
});

/** `group` is an alias of `group_name`; the canonical key wins. */
export const RedisSourceConfig = v.pipe(
  RedisSourceObject,
  v.transform(({ group, ...rest }) => ({ ...rest, group_name: rest.group_name ?? group ?? DEFAULT_GROUP })),
  v.check((c) => c.start_id === "$" || /^\d+(-\d+)?$/.test(c.start_id), "start_id must be 0, $ or an entry id like 1700000000000-0"),
);

export type RedisSourceOptions = v.InferOutput<typeof RedisSourceConfig>;

/** What connecting needs; both sides' options have it. */
type ConnectionOptionsOf = v.InferOutput<v.ObjectSchema<typeof connectionKeys, undefined>>;
type Side = "sink" | "source";

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

/** PEM text as given, or read from the file it names. */
function pem(value: string, key: string, side: Side): string {
  if (value.includes("-----BEGIN")) return value;
  try {
    return readFileSync(value, "utf8");
  } catch (err) {
    throw configError(`${side}.tls.${key}: ${value} cannot be read (${(err as { code?: string }).code ?? "error"})`);
  }
}

function redisOptions(cfg: ConnectionOptionsOf, target: Target, ctx: BackendContext, side: Side, commandTimeoutMs: number): RedisOptions {
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
    commandTimeout: commandTimeoutMs,
    retryStrategy: (times) => Math.min(times * 200, 2000),
  };
  const username = cfg.username ?? target.username;
  const password = cfg.password ?? target.password;
  if (username !== undefined) opts.username = username;
  if (password !== undefined) opts.password = password;
  if (cfg.tls !== undefined && cfg.tls !== false) {
    const t = cfg.tls === true ? undefined : cfg.tls;
    const tls: TlsConnectionOptions = { rejectUnauthorized: t?.reject_unauthorized ?? true };
    if (t?.ca) tls.ca = pem(t.ca, "ca", side);
    if (t?.cert) tls.cert = pem(t.cert, "cert", side);
    if (t?.key) tls.key = pem(t.key, "key", side);
    if (t?.servername) tls.servername = t.servername;
    opts.tls = tls;
  } else if (target.tls) {
    opts.tls = {};
  }
  return opts;
}

/** The first word of a Redis error reply (`WRONGTYPE`, `OOM`, `NOPERM`…), if it is one. */
function replyCode(err: unknown): string {
  const m = /^([A-Z][A-Z_-]+)\b/.exec(errorMessage(err));
  return m ? m[1]! : "";
}

/** Error replies that go away by themselves: retry the batch. */
const TRANSIENT_REPLIES = new Set(["OOM", "LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN", "READONLY", "CLUSTERDOWN", "NOREPLICAS", "MISCONF"]);

/**
 * One ioredis client, opened on demand. While it is disconnected commands fail at once and
 * ioredis reconnects in the background; every error names host:port and never a secret.
 */
class RedisLink {
  readonly target: Target;
  readonly secrets: string[];
  client: Redis | null = null;
  /** The last socket-level error, which ioredis reports only on its `error` event. */
  private lastError: Error | null = null;
  private connecting: Promise<Redis> | null = null;

  constructor(
    private readonly cfg: ConnectionOptionsOf,
    private readonly ctx: BackendContext,
    readonly side: Side,
    private readonly commandTimeoutMs: number,
    private readonly onReady?: (client: Redis) => void,
  ) {
    this.target = parseRedisUrl(cfg.url, side);
    this.secrets = [cfg.password, this.target.password].filter((s): s is string => !!s && s.length >= 3);
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
    return scrub(errorMessage(err), this.secrets);
  }

  private connectFailure(err: Error): RelayError {
    const code = replyCode(err);
    const detail = scrub(errorMessage(err), this.secrets);
    const side = this.side;
    if (code === "WRONGPASS" || code === "NOAUTH" || code === "NOPERM" || /invalid password|AUTH.*without any password/i.test(detail)) {
      return configError(`Redis at ${this.target.where} refused the credentials: ${detail} (check ${side}.username/password/url)`, err);
    }
    if (/certificate|self[- ]signed|SSL|TLS|EPROTO/i.test(detail)) {
      return configError(`TLS with Redis at ${this.target.where} failed: ${detail} (check ${side}.url and ${side}.tls)`, err);
    }
    return transientError(`cannot connect to Redis at ${this.target.where}: ${this.describeSocketError(err)}`, err);
  }

  /** A failure that concerns the whole call (no reply, or a reply that says so). */
  commandFailure(err: unknown, what: string): RelayError {
    if (err instanceof RelayError) return err;
    const code = replyCode(err);
    const detail = scrub(errorMessage(err), this.secrets);
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

  scrub(text: string): string {
    return scrub(text, this.secrets);
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

/** The entry's field/value items (docs/interface.md §6.4), in this order. */
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
  private readonly link: RedisLink;
  private readonly target: Target;
  private readonly fixedKey: boolean;

  constructor(
    private readonly cfg: RedisSinkOptions,
    ctx: BackendContext,
  ) {
    this.link = new RedisLink(cfg, ctx, "sink", cfg.command_timeout_ms, (client) => {
      if (cfg.dedup_window_seconds > 0) client.defineCommand("pgtDedupXadd", { numberOfKeys: 2, lua: DEDUP_XADD });
    });
    this.target = this.link.target;
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

  private connect(): Promise<Redis> {
    return this.link.connect();
  }

  private commandFailure(err: unknown, what: string): RelayError {
    return this.link.commandFailure(err, what);
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
    await this.link.close();
  }
}

// ---------------------------------------------------------------------------------------------
// Source

type RawEntry = [id: Buffer, fields: Buffer[] | null];

/** A stream entry as read: its id, and its fields (null when the entry was deleted meanwhile). */
interface Entry {
  id: string;
  fields: Map<string, Buffer> | null;
}

function toEntries(raw: unknown): Entry[] {
  if (!Array.isArray(raw)) return [];
  return (raw as (RawEntry | null)[]).filter((e): e is RawEntry => Array.isArray(e)).map(([id, flat]) => {
    if (!Array.isArray(flat)) return { id: id.toString(), fields: null };
    const fields = new Map<string, Buffer>();
    for (let i = 0; i + 1 < flat.length; i += 2) fields.set(flat[i]!.toString(), flat[i + 1]!);
    return { id: id.toString(), fields };
  });
}

/**
 * The entries of the one stream an XREADGROUP asked for: RESP2 replies `[[key, entries]]`, RESP3
 * (ioredis' default) a map that arrives flattened as `[key, entries]`; nothing new is null.
 */
function entriesOfStream(raw: unknown): unknown {
  if (!Array.isArray(raw) || raw.length === 0) return [];
  return Array.isArray(raw[0]) ? (raw[0] as unknown[])[1] : raw[1];
}

const utf8 = new TextDecoder("utf-8", { fatal: true });
function text(b: Buffer | undefined): string | null {
  if (b === undefined) return null;
  try {
    return utf8.decode(b);
  } catch {
    return null;
  }
}

/** How an entry that could not be mapped is kept in the dead-letter table, for decodeStored(). */
interface StoredRedisEntry {
  redis: { stream_key: string; id: string; fields_base64: Record<string, string> };
}

type Phase = "own" | "claim" | "new";


class RedisSource implements Source {
  readonly describe: string;
  /** Every XREADGROUP answer, an empty one too (the pipeline's poll deadline, docs/WATCHDOG.md). */
  readonly reportsPolls = true;
  private readonly link: RedisLink;
  /** A connection for lag() only, opened on first use. */
  private readonly lagLink: RedisLink;
  private readonly key: string;
  private readonly group: string;
  private readonly consumer: string;
  private readonly count: number;
  /** When the next XAUTOCLAIM pass is due. */
  private nextClaimAt = 0;

  constructor(
    private readonly cfg: RedisSourceOptions,
    private readonly ctx: BackendContext,
  ) {
    // A blocking read legitimately stays unanswered for block_ms.
    this.link = new RedisLink(cfg, ctx, "source", cfg.command_timeout_ms + cfg.block_ms);
    this.lagLink = new RedisLink(cfg, ctx, "source", Math.min(cfg.command_timeout_ms, LAG_TIMEOUT_MS));
    this.key = cfg.stream_key;
    this.group = cfg.group_name;
    this.consumer = cfg.consumer_name ?? `${ctx.relayGroupId}:${ctx.pipeline}`;
    this.count = Math.min(cfg.count ?? cfg.batch_size, cfg.batch_size);
    const t = this.link.target;
    this.describe = `redis ${t.tls || cfg.tls ? "rediss" : "redis"}://${t.where}/${t.db} ← ${this.key} (group ${this.group}, consumer ${this.consumer})`;
  }

  async start(): Promise<void> {
    await this.ensureGroup(await this.link.connect());
  }

  /**
   * Entries of the stream the group has not had acknowledged: `XINFO GROUPS` → the group's `lag`
   * (entries not yet delivered to any consumer, Redis ≥ 7; nil when Redis cannot tell, e.g. after
   * XDEL) plus `pending` (delivered, unacknowledged). Without a `lag` field only `pending` is
   * known and reported. Runs on a connection of its own (the source's may sit in a blocking
   * XREADGROUP) with a short command timeout; reads nothing from the group. Seconds: reported 0.
   */
  async lag(): Promise<Lag | null> {
    const client = await this.lagLink.connect();
    const groups = (await client.call("XINFO", "GROUPS", this.key)) as unknown[][];
    for (const g of groups) {
      const info = new Map<string, unknown>();
      for (let i = 0; i + 1 < g.length; i += 2) info.set(String(g[i]), g[i + 1]);
      if (String(info.get("name")) !== this.group) continue;
      const pending = Number(info.get("pending") ?? 0);
      const undelivered = info.get("lag");
      const rows = pending + (typeof undelivered === "number" ? undelivered : 0);
      return { rows, seconds: 0 };
    }
    return null;
  }

  /** `XGROUP CREATE key group <start_id> [MKSTREAM]`; an existing group is fine, anything else is not. */
  private async ensureGroup(client: Redis): Promise<void> {
    const args: (string | number)[] = ["CREATE", this.key, this.group, this.cfg.start_id];
    if (this.cfg.mkstream) args.push("MKSTREAM");
    if (this.ctx.check) return this.reportGroup(client, this.ctx.check);
    try {
      await client.call("XGROUP", ...args);
      this.ctx.log.info(`redis: created consumer group "${this.group}" on "${this.key}" at ${this.cfg.start_id}`);
    } catch (err) {
      const message = errorMessage(err);
      if (replyCode(err) === "BUSYGROUP") return;
      if (replyCode(err) === "WRONGTYPE") {
        const type = await client.type(this.key).catch(() => "another type");
        throw configError(`Redis key "${this.key}" (source.stream_key) at ${this.link.where} holds a ${type}, not a stream`, err);
      }
      if (/requires the key to exist/i.test(message)) {
        throw configError(`Redis stream "${this.key}" (source.stream_key) does not exist at ${this.link.where} and source.mkstream is false`, err);
      }
      if (/Invalid stream ID/i.test(message)) throw configError(`source.start_id "${this.cfg.start_id}" is not a valid stream id`, err);
      throw this.link.commandFailure(err, `XGROUP CREATE ${this.key} ${this.group}`);
    }
  }

  /** `check`: whether the stream and group exist, creating neither. */
  private async reportGroup(client: Redis, check: { wouldCreate(what: string): void }): Promise<void> {
    const type = await client.type(this.key).catch((err) => {
      throw this.link.commandFailure(err, `TYPE ${this.key}`);
    });
    if (type === "none") {
      if (!this.cfg.mkstream) throw configError(`Redis stream "${this.key}" (source.stream_key) does not exist at ${this.link.where} and source.mkstream is false`);
      check.wouldCreate(`Redis stream "${this.key}" with consumer group "${this.group}"`);
      return;
    }
    if (type !== "stream") throw configError(`Redis key "${this.key}" (source.stream_key) at ${this.link.where} holds a ${type}, not a stream`);
    const groups = (await client.call("XINFO", "GROUPS", this.key)) as unknown[][];
    const names = groups.map((g) => String(g[g.indexOf("name") + 1]));
    if (!names.includes(this.group)) check.wouldCreate(`Redis consumer group "${this.group}" on "${this.key}"`);
  }

  /**
   * On every (re)start: this consumer's own pending entries first (read before a crash or a
   * failed write, never acknowledged), then entries other consumers left idle, then new ones.
   */
  async *batches(signal: AbortSignal): AsyncGenerator<Batch> {
    const client = await this.link.connect();
    await this.ensureGroup(client);
    const drain = this.ctx.drain;
    let phase: Phase = "own";
    let ownCursor = "0";
    let claimCursor = "0-0";
    /** Drain: own pending entries are being read once more (XPENDING still listed some), no progress yet. */
    let rereadOwn = false;
    while (!signal.aborted) {
      let entries: Entry[];
      if (phase === "own") {
        entries = await this.readGroup(client, ownCursor, false, signal);
        if (entries.length === 0) {
          phase = "claim";
          continue;
        }
        ownCursor = entries[entries.length - 1]!.id;
      } else if (phase === "claim") {
        if (this.cfg.claim_idle_ms === 0 || Date.now() < this.nextClaimAt) {
          phase = "new";
          continue;
        }
        const claimed = await this.autoclaim(client, claimCursor);
        entries = claimed.entries;
        claimCursor = claimed.next;
        if (claimCursor === "0-0") {
          this.nextClaimAt = Date.now() + Math.max(1000, Math.floor(this.cfg.claim_idle_ms / 2));
          phase = "new";
        }
        if (entries.length === 0) continue;
      } else {
        // Due claims come first even under steady traffic, which never leaves a read empty.
        if (this.cfg.claim_idle_ms > 0 && Date.now() >= this.nextClaimAt) {
          phase = "claim";
          continue;
        }
        entries = await this.readGroup(client, ">", !drain, signal);
        if (entries.length === 0) {
          if (signal.aborted) return;
          if (drain) {
            const left = await this.ownPending(client);
            if (left === 0) return;
            if (rereadOwn) {
              throw transientError(`Redis at ${this.link.where}: ${left} entr${left === 1 ? "y" : "ies"} pending for consumer "${this.consumer}" of "${this.group}" on "${this.key}" cannot be read back`);
            }
            // Something of ours is still unacknowledged: read it again before finishing.
            rereadOwn = true;
            phase = "own";
            ownCursor = "0";
            continue;
          }
          continue;
        }
      }
      rereadOwn = false;
      const batch = await this.batchOf(client, entries);
      if (batch) yield batch;
    }
  }

  private async readGroup(client: Redis, id: string, block: boolean, signal: AbortSignal): Promise<Entry[]> {
    const started = performance.now();
    const args: (string | number)[] = ["GROUP", this.group, this.consumer, "COUNT", this.count];
    if (block) args.push("BLOCK", this.cfg.block_ms);
    args.push("STREAMS", this.key, id);
    // A blocked read would hold a stopping pipeline for up to block_ms: drop the connection instead.
    const abort = () => this.link.abort();
    if (block) signal.addEventListener("abort", abort, { once: true });
    let raw: unknown;
    try {
      raw = await client.callBuffer("XREADGROUP", ...args);
    } catch (err) {
      if (signal.aborted) return [];
      throw this.readFailure(err, `XREADGROUP ${this.key} ${id}`);
    } finally {
      if (block) signal.removeEventListener("abort", abort);
    }
    this.ctx.onPoll?.((performance.now() - started) / 1000);
    return toEntries(entriesOfStream(raw));
  }

  private async autoclaim(client: Redis, start: string): Promise<{ next: string; entries: Entry[] }> {
    let raw: unknown;
    try {
      raw = await client.callBuffer("XAUTOCLAIM", this.key, this.group, this.consumer, this.cfg.claim_idle_ms, start, "COUNT", this.count);
    } catch (err) {
      throw this.readFailure(err, `XAUTOCLAIM ${this.key}`);
    }
    const [next, claimed, deleted] = raw as [Buffer, unknown, Buffer[] | undefined];
    const entries = toEntries(claimed);
    // Redis 7 removes entries deleted from the stream from the PEL itself and lists them here;
    // acknowledging them as well keeps older servers (nil entries) and newer ones alike clean.
    const gone = (deleted ?? []).map((b) => b.toString());
    if (gone.length > 0) await this.xack(client, gone);
    if (entries.length > 0) this.ctx.log.info(`redis: claimed ${entries.length} entr${entries.length === 1 ? "y" : "ies"} idle for ${this.cfg.claim_idle_ms} ms from other consumers of "${this.group}"`);
    return { next: next.toString(), entries };
  }

  private readFailure(err: unknown, what: string): RelayError {
    if (replyCode(err) === "NOGROUP") {
      // The group (or the stream) was deleted under the relay: the next batches() recreates it.
      return transientError(`Redis at ${this.link.where}: consumer group "${this.group}" on "${this.key}" vanished (${what}); recreating it`, err);
    }
    if (replyCode(err) === "WRONGTYPE") return configError(`Redis key "${this.key}" (source.stream_key) at ${this.link.where} is not a stream`, err);
    return this.link.commandFailure(err, what);
  }

  private async ownPending(client: Redis): Promise<number> {
    try {
      const rows = (await client.call("XPENDING", this.key, this.group, "-", "+", 1, this.consumer)) as unknown[];
      return rows.length;
    } catch (err) {
      throw this.readFailure(err, `XPENDING ${this.key}`);
    }
  }

  private async xack(client: Redis, ids: string[]): Promise<void> {
    if (ids.length === 0) return;
    try {
      await client.xack(this.key, this.group, ...ids);
    } catch (err) {
      throw this.readFailure(err, `XACK ${this.key} (${ids.length} ids)`);
    }
  }

  /** Maps entries to a batch; deleted entries (no fields) are acknowledged away at once. */
  private async batchOf(client: Redis, entries: Entry[]): Promise<Batch | null> {
    const deleted = entries.filter((e) => e.fields === null).map((e) => e.id);
    if (deleted.length > 0) {
      await this.xack(client, deleted);
      this.ctx.log.debug(`redis: acknowledged ${deleted.length} entr${deleted.length === 1 ? "y" : "ies"} deleted from "${this.key}" before they were relayed`);
    }
    const live = entries.filter((e): e is Entry & { fields: Map<string, Buffer> } => e.fields !== null);
    if (live.length === 0) return null;
    const messages: Message[] = [];
    const deadLetters: DeadLetter[] = [];
    for (const e of live) {
      try {
        messages.push(this.toMessage(e.id, e.fields));
      } catch (err) {
        deadLetters.push({
          dedup_key: this.producerKey(e.fields) ?? `redis:${this.key}:${e.id}`,
          outbox_id: null,
          message: this.stored(e.id, e.fields),
          error: `Redis entry ${this.key} ${e.id} cannot be mapped: ${errorMessage(err)}`,
          kind: "decode",
        });
      }
    }
    const ids = live.map((e) => e.id);
    return {
      messages,
      deadLetters,
      // Every id of the batch in one XACK, and only once the inbox has committed them.
      ack: async () => this.xack(await this.link.connect(), ids),
      // Unacknowledged entries stay in this consumer's pending list; the next start reads them first.
      release: async () => {},
    };
  }

  private producerKey(fields: Map<string, Buffer>): string | null {
    return text(fields.get("pgt_dedup_key")) || text(fields.get("dedup_key")) || null;
  }

  private toMessage(id: string, fields: Map<string, Buffer>): Message {
    const headers: Record<string, string> = {};
    for (const [name, value] of fields) {
      if (name === "payload") continue;
      const t = text(value);
      if (t !== null) headers[name] = t;
    }
    const payloadField = fields.get("payload");
    // The sink (and most producers) put the event in `payload`; otherwise the entry itself is the event.
    const body: Buffer | DecodedBody = payloadField ?? { payload: this.fieldsObject(fields), json: true };
    const message = inboundMessage({
      pipeline: this.ctx.pipeline,
      sourceType: "redis",
      where: this.key,
      body,
      headers,
      producerKey: this.producerKey(fields),
      synthesizedKey: `redis:${this.key}:${id}`,
      eventTypeCandidate: headers.event_type || this.key,
      aggregateIdFallback: headers.aggregate_id ?? null,
      config: this.cfg,
    });
    if (message.inbound && message.inbound.trace_id === null && headers.trace_id) message.inbound.trace_id = headers.trace_id;
    return message;
  }

  /** All fields as one object: text values as strings, binary ones as `{"base64": …}`. */
  private fieldsObject(fields: Map<string, Buffer>): Record<string, unknown> {
    const out: Record<string, unknown> = {};
    for (const [name, value] of fields) out[name] = text(value) ?? decodeBody(value).payload;
    return out;
  }

  private stored(id: string, fields: Map<string, Buffer>): StoredRedisEntry {
    const fields_base64: Record<string, string> = {};
    for (const [name, value] of fields) fields_base64[name] = value.toString("base64");
    return { redis: { stream_key: this.key, id, fields_base64 } };
  }

  async decodeStored(stored: unknown): Promise<Message[]> {
    const s = (stored as Partial<StoredRedisEntry> | null)?.redis;
    if (!s || typeof s.id !== "string" || typeof s.fields_base64 !== "object" || s.fields_base64 === null) {
      throw configError("the stored message is not a Redis entry of this source");
    }
    const fields = new Map(Object.entries(s.fields_base64).map(([k, b64]) => [k, Buffer.from(String(b64), "base64")] as const));
    return [this.toMessage(s.id, fields)];
  }

  async close(): Promise<void> {
    await Promise.all([this.link.close(), this.lagLink.close()]);
  }
}

export const sink = sinkSpec({
  type: "redis",
  config: RedisSinkConfig,
  create: (cfg, ctx) => new RedisSink(cfg, ctx),
});

export const source = sourceSpec({
  type: "redis",
  config: RedisSourceConfig,
  create: (cfg, ctx) => new RedisSource(cfg, ctx),
});
