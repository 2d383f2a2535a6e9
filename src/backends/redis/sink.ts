/**
 * The Redis Streams sink (docs/interface.md §6.4): one `XADD <key> [MAXLEN ~ n] * dedup_key <k>
 * pgt_dedup_key <k> subject <s> op <op> payload <row JSON> full_refresh true|false outbox_id <id
 * or "">` per message, sent as pipelines of `max_in_flight` commands over one connection (Redis
 * runs them in order, so each stream key keeps batch order), every reply checked.
 *
 * XADD has no deduplication: a replayed batch appends its entries again. Consumers dedup on
 * `pgt_dedup_key` (the relay's Redis source and the inbox do, by `event_id`). Setting
 * `dedup_window_seconds` makes the sink itself idempotent within that window, at a cost (see
 * DEDUP_XADD below and bench/redis-sink.ts).
 */
import type { ChainableCommander, Redis } from "ioredis";
import { configError, RelayError, transientError, worseError } from "../../errors.ts";
import { hasPlaceholder, renderTemplate, type Message } from "../../message.ts";
import { withTimeout } from "../../sleep.ts";
import { chunks } from "../concurrency.ts";
import { sinkSpec, type BackendContext, type Rejection, type Sink } from "../types.ts";
import { RedisLink, replyCode, type Target } from "./client.ts";
import { RedisSinkConfig, type RedisSinkOptions } from "./config.ts";

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
export function entryFields(m: Message): string[] {
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


class RedisSink implements Sink {
  readonly describe: string;
  private readonly link: RedisLink;
  private readonly target: Target;
  private readonly fixedKey: boolean;

  constructor(
    private readonly cfg: RedisSinkOptions,
    ctx: BackendContext,
  ) {
    // No per-command timer: the sink times its calls itself, one timer per pipeline instead of
    // one per XADD (bench/RESULTS.md, "Window and batch fill").
    this.link = new RedisLink(cfg, ctx, "sink", undefined, (client) => {
      if (cfg.dedup_window_seconds > 0) client.defineCommand("pgtDedupXadd", { numberOfKeys: 2, lua: DEDUP_XADD });
    });
    this.target = this.link.target;
    this.fixedKey = !hasPlaceholder(cfg.stream_key);
    const extras = [cfg.maxlen ? `MAXLEN ~ ${cfg.maxlen}` : "", cfg.dedup_window_seconds ? `dedup ${cfg.dedup_window_seconds}s` : ""].filter(Boolean);
    this.describe = `redis ${this.target.tls || cfg.tls ? "rediss" : "redis"}://${this.target.where}/${this.target.db} → ${cfg.stream_key}${extras.length ? ` (${extras.join(", ")})` : ""}`;
  }

  async start(): Promise<void> {
    const client = await this.connect();
    if (!this.fixedKey) return; // keys depend on the messages; WRONGTYPE is judged per message
    let type: string;
    try {
      type = await this.timed(client.type(this.cfg.stream_key), "TYPE");
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

  /**
   * `call`, or after command_timeout_ms a transient error; the connection is dropped then, so
   * that no late reply can be taken for the answer to a later command.
   */
  private timed<T>(call: Promise<T>, what: string): Promise<T> {
    return withTimeout(call, this.cfg.command_timeout_ms, what, () => {
      this.link.abort();
      return transientError(`Redis at ${this.target.where}: ${what} got no reply within ${this.cfg.command_timeout_ms} ms (sink.command_timeout_ms); reconnecting`);
    });
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
    for (const chunk of chunks(messages, this.cfg.max_in_flight)) {
      if (failure !== null) break;
      const pipeline = client.pipeline();
      // With dedup one script call per stream key; without, one XADD per message of the chunk,
      // in its order (no record per message: a reply's messages are found from its index).
      const scripts = windowMs > 0 ? this.queueDedupXadds(pipeline, chunk, windowMs, maxlen) : null;
      if (scripts === null) {
        for (const m of chunk) {
          const key = this.keyOf(m);
          if (maxlen) pipeline.xadd(key, "MAXLEN", "~", maxlen, "*", ...entryFields(m));
          else pipeline.xadd(key, "*", ...entryFields(m));
        }
      }
      const commandCount = scripts?.length ?? chunk.length;
      let replies: [Error | null, unknown][] | null;
      try {
        replies = await this.timed(pipeline.exec(), "XADD");
      } catch (err) {
        throw this.commandFailure(err, "XADD");
      }
      if (replies === null || replies.length !== commandCount) {
        throw transientError(`Redis at ${this.target.where}: XADD pipeline returned ${replies?.length ?? "no"} replies for ${commandCount} commands`);
      }
      for (const [i, [err]] of replies.entries()) {
        if (!err) continue;
        const { key, messages: affected } = scripts?.[i] ?? { key: this.keyOf(chunk[i]!), messages: [chunk[i]!] };
        if (replyCode(err) !== "WRONGTYPE") {
          failure = worseError(failure, this.commandFailure(err, "XADD"));
        } else if (this.fixedKey) {
          failure = worseError(failure, configError(`Redis key "${key}" (sink.stream_key) at ${this.target.where} is not a stream (WRONGTYPE)`, err));
        } else {
          // A templated key: only the messages rendered to that key can never be added.
          for (const m of affected) rejections.push({ message: m, error: `Redis: key "${key}" holds another type than a stream (WRONGTYPE)` });
        }
      }
    }
    if (failure !== null) throw failure;
    return rejections;
  }

  /** The stream key of `m`: the configured one as it is when it has no placeholder. */
  private keyOf(m: Message): string {
    return this.fixedKey ? this.cfg.stream_key : renderTemplate(this.cfg.stream_key, m);
  }

  /** Queues one dedup script call per stream key of `chunk`; returns each call's key and messages, in queue order. */
  private queueDedupXadds(pipeline: ChainableCommander, chunk: Message[], windowMs: number, maxlen: string): { key: string; messages: Message[] }[] {
    const byKey = new Map<string, { key: string; messages: Message[] }>();
    for (const m of chunk) {
      const key = this.keyOf(m);
      let command = byKey.get(key);
      if (!command) byKey.set(key, (command = { key, messages: [] }));
      command.messages.push(m);
    }
    for (const command of byKey.values()) {
      const args: string[] = [String(windowMs), maxlen, String(FIELD_ITEMS)];
      for (const m of command.messages) args.push(m.dedup_key, ...entryFields(m));
      (pipeline as unknown as DedupPipeline).pgtDedupXadd(command.key, `${command.key}:pgt_dedup`, ...args);
    }
    return [...byKey.values()];
  }

  async close(): Promise<void> {
    await this.link.close();
  }
}

export default sinkSpec({
  type: "redis",
  config: RedisSinkConfig,
  create: (cfg, ctx) => new RedisSink(cfg, ctx),
});
