/**
 * The Redis Streams source (docs/interface.md §5.3, §5.4, §6.5): a consumer group member. On
 * every (re)start it reads its own pending entries first, then claims entries other consumers
 * left idle (XAUTOCLAIM), then new ones; each batch is XACKed — every id of it, in one call —
 * only after the inbox committed it.
 *
 * It reads ahead (docs/PIPELINE.md): `XREADGROUP >` moves the group's last-delivered id on at
 * every read, so the next read continues after the last batch handed out whether or not that one
 * was acknowledged yet, and each batch's XACK names its own ids only. Entries handed out and not
 * yet acknowledged are this consumer's pending entries at Redis, as before, only for the few
 * milliseconds longer that the batches ahead of them take.
 */
import type { Redis } from "ioredis";
import { configError, errorMessage, RelayError, transientError } from "../../errors.ts";
import { decodeBody, inboundMessage, readAheadBatchSize, utf8OrNull, type DecodedBody } from "../../inbound.ts";
import type { Message } from "../../message.ts";
import { Sleeper, sleepUntil } from "../../sleep.ts";
import { LAG_TIMEOUT_MS, sourceSpec, type Batch, type BackendContext, type DeadLetter, type Lag, type Source } from "../types.ts";
import { RedisLink, replyCode } from "./client.ts";
import { RedisSourceConfig, type RedisSourceOptions } from "./config.ts";

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

/** A field's value as UTF-8 text; null when absent or not UTF-8. */
const text = (b: Buffer | undefined): string | null => (b === undefined ? null : utf8OrNull(b));

/** How an entry that could not be mapped is kept in the dead-letter table, for decodeStored(). */
interface StoredRedisEntry {
  redis: { stream_key: string; id: string; fields_base64: Record<string, string> };
}

type Phase = "own" | "claim" | "new";


class RedisSource implements Source {
  readonly describe: string;
  /** Every XREADGROUP answer, an empty one too (the pipeline's poll deadline, docs/WATCHDOG.md). */
  readonly reportsPolls = true;
  readonly readAhead = Number.POSITIVE_INFINITY;
  private readonly link: RedisLink;
  /** A connection for lag() only, opened on first use. */
  private readonly lagLink: RedisLink;
  /**
   * A connection for the batches' XACKs: on the reading one an XACK would wait behind the
   * blocking XREADGROUP of the batch read ahead (up to block_ms).
   */
  private readonly ackLink: RedisLink;
  private readonly key: string;
  private readonly group: string;
  private readonly consumer: string;
  private readonly count: number;
  /** When the next XAUTOCLAIM pass is due. */
  private nextClaimAt = 0;
  /** Ids of the entries handed out in batches not yet acknowledged or released. */
  private readonly inHand = new Set<string>();
  /** Woken whenever a batch is acknowledged or released (a drain waits for the batches in hand). */
  private readonly handEmptied = new Sleeper();

  constructor(
    private readonly cfg: RedisSourceOptions,
    private readonly ctx: BackendContext,
  ) {
    // A blocking read legitimately stays unanswered for block_ms.
    this.link = new RedisLink(cfg, ctx, "source", cfg.command_timeout_ms + cfg.block_ms);
    this.lagLink = new RedisLink(cfg, ctx, "source", Math.min(cfg.command_timeout_ms, LAG_TIMEOUT_MS));
    this.ackLink = new RedisLink(cfg, ctx, "source", cfg.command_timeout_ms);
    this.key = cfg.stream_key;
    this.group = cfg.group_name;
    this.consumer = cfg.consumer_name ?? `${ctx.relayGroupId}:${ctx.pipeline}`;
    const batchSize = readAheadBatchSize(cfg.batch_size, ctx);
    this.count = Math.min(cfg.count ?? batchSize, batchSize);
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
        // Entries of our own batches still in hand turn idle too when a write is slow: they are on their way.
        entries = claimed.entries.filter((e) => !this.inHand.has(e.id));
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
            // Our batches still in hand are pending too: let them be acknowledged (or handed back) first.
            if (await sleepUntil(() => this.inHand.size === 0, this.handEmptied, signal)) return;
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
    for (const id of ids) this.inHand.add(id);
    const settle = () => {
      for (const id of ids) this.inHand.delete(id);
      this.handEmptied.wake();
    };
    return {
      messages,
      deadLetters,
      // Every id of the batch in one XACK, and only once the inbox has committed them.
      ack: async () => {
        try {
          await this.xack(await this.ackLink.connect(), ids);
        } catch (err) {
          // A connection that timed out may never answer again: the retry opens a new one.
          this.ackLink.abort();
          throw err;
        }
        settle();
      },
      // Unacknowledged entries stay in this consumer's pending list; the next start reads them first.
      release: async () => settle(),
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
    await Promise.all([this.link.close(), this.lagLink.close(), this.ackLink.close()]);
  }
}

export default sourceSpec({
  type: "redis",
  config: RedisSourceConfig,
  create: (cfg, ctx) => new RedisSource(cfg, ctx),
});
