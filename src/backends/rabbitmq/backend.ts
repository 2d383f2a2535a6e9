/**
 * RabbitMQ (AMQP 0-9-1; docs/interface.md §5.3, §6.4) through amqplib.
 *
 * Sink: one connection with one confirm channel. A write publishes the whole batch on that
 * channel in order (so every queue sees a key's messages in batch order), with at most
 * `max_in_flight` unconfirmed publishes and the socket's `drain` respected, and resolves once
 * RabbitMQ has confirmed every message. Messages are persistent, `message_id` = dedup key,
 * `content_type` application/json, header `pgt_dedup_key` = dedup key, and header
 * `pgtrickle-full-refresh` = true on full-refresh messages.
 *
 * Unroutable messages (mandatory publish, no binding matches): RabbitMQ returns them and then
 * confirms them, so a confirm alone does not mean a queue has them. A missing binding is
 * something an operator fixes, not a property of the message, so by default
 * (`unroutable: "retry"`) the batch fails with a transient error naming exchange and routing key
 * and is retried until a queue is bound; `unroutable: "dead_letter"` sends such messages to the
 * dead-letter table instead, and `mandatory: false` lets RabbitMQ drop them silently.
 *
 * Source: basic.consume with manual acknowledgement on a channel of its own; deliveries are
 * gathered into batches and acknowledged cumulatively (`multiple`) after the inbox commit. See
 * RabbitSource.
 */
import amqp, { type Channel, type ChannelModel, type ConfirmChannel, type ConsumeMessage, type Options } from "amqplib";
import * as v from "valibot";
import { configError, errorMessage, RelayError, transientError } from "../../errors.ts";
import { headerValue, inboundMessage, reverseSourceKeys, sha256Hex, utf8OrNull } from "../../inbound.ts";
import { envelopeJson, renderTemplate, type Message } from "../../message.ts";
import { Sleeper, withTimeout } from "../../sleep.ts";
import { redact, urlSecrets } from "../../redact.ts";
import { readSettingFile } from "../redact.ts";
import { LAG_TIMEOUT_MS, sinkSpec, sourceSpec, type BackendContext, type Batch, type Lag, type Rejection, type Sink, type Source } from "../types.ts";

export const DEFAULT_ROUTING_KEY_TEMPLATE = "{stream_table}.{op}";
/** RabbitMQ 4's default `max_message_size` (3.x allowed 128 MiB). */
const DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024;

const positiveInt = (what: string) => v.pipe(v.number(), v.integer(`${what} must be an integer`), v.minValue(1, `${what} must be ≥ 1`));

const RabbitSinkOptions = v.looseObject({
  /** The sink type; ignored here (the loader picks the backend by it). */
  type: v.optional(v.string()),
  /**
   * `amqp://user:password@host:5672/vhost` or `amqps://…` (TLS). Query parameters amqplib knows
   * (`frameMax`, `channelMax`, `locale`) pass through. Use `${env:…}` for the password.
   */
  url: v.pipe(
    v.string("url is required"),
    v.check((u) => /^amqps?:\/\//i.test(u), "url must start with amqp:// or amqps://"),
    v.check((u) => URL.canParse(u), "url is not a valid URL"),
  ),
  /**
   * Exchange to publish to. Required; `""` (given explicitly) means the default exchange, which
   * routes by queue name (routing key = queue) and is never declared.
   */
  exchange: v.string("exchange is required (\"\" for the default exchange)"),
  /** Type used when declaring the exchange. */
  exchange_type: v.optional(
    v.picklist(["topic", "direct", "fanout", "headers"], "exchange_type must be topic, direct, fanout or headers"),
    "topic",
  ),
  /**
   * Declare the exchange (durable) at start when missing. false: only check that it exists
   * (a missing exchange is then a configuration error).
   */
  declare_exchange: v.optional(v.boolean(), true),
  /**
   * Routing key rendered per message (the README's template variables, top-level row fields). A key
   * longer than 255 bytes sends that message to the dead-letter table. Alias: `routing_key`.
   */
  routing_key_template: v.optional(v.string()),
  /** Alias of `routing_key_template`. */
  routing_key: v.optional(v.string()),
  /** Publish mandatory: RabbitMQ hands back messages that no queue receives (see `unroutable`). */
  mandatory: v.optional(v.boolean(), true),
  /**
   * What a returned (unroutable) message means: `retry` — transient failure of the batch,
   * retried until a queue is bound; `dead_letter` — that message goes to the dead-letter table.
   */
  unroutable: v.optional(v.picklist(["retry", "dead_letter"], "unroutable must be retry or dead_letter"), "retry"),
  /** Connect with TLS even when the URL says `amqp://` (port 5671 unless the URL names one). */
  tls: v.optional(v.boolean(), false),
  /** CA certificate(s) for the server certificate: PEM file path or inline PEM. */
  tls_ca: v.optional(v.string()),
  /** Client certificate for mutual TLS: PEM file path or inline PEM (needs `tls_key`). */
  tls_cert: v.optional(v.string()),
  /** Private key of `tls_cert`: PEM file path or inline PEM. */
  tls_key: v.optional(v.string()),
  /** Passphrase of an encrypted `tls_key`. */
  tls_key_password: v.optional(v.string()),
  /** AMQP heartbeat interval in seconds (0 disables heartbeats). */
  heartbeat_seconds: v.optional(v.pipe(v.number(), v.integer(), v.minValue(0)), 30),
  /** Most published messages awaiting a broker confirm at any time. */
  max_in_flight: v.optional(positiveInt("max_in_flight"), 1000),
  /**
   * Largest message body sent, in bytes; larger messages go to the dead-letter table (RabbitMQ
   * would close the channel on them). Keep it ≤ the broker's `max_message_size`.
   */
  max_message_bytes: v.optional(positiveInt("max_message_bytes"), DEFAULT_MAX_MESSAGE_BYTES),
  /** Milliseconds to open the connection. */
  connection_timeout_ms: v.optional(positiveInt("connection_timeout_ms"), 10000),
  /** Milliseconds a write waits for the broker's confirms before failing (transient). */
  confirm_timeout_ms: v.optional(positiveInt("confirm_timeout_ms"), 30000),
});

const RabbitSinkConfig = v.pipe(
  RabbitSinkOptions,
  v.check(
    (c) => !(c.routing_key !== undefined && c.routing_key_template !== undefined && c.routing_key !== c.routing_key_template),
    "set either routing_key_template or its alias routing_key, not both",
  ),
  v.check((c) => (c.tls_cert === undefined) === (c.tls_key === undefined), "tls_cert and tls_key go together"),
  v.transform((c) => ({ ...c, routing_key_template: c.routing_key_template ?? c.routing_key ?? DEFAULT_ROUTING_KEY_TEMPLATE })),
);

export type RabbitSinkConfig = v.InferOutput<typeof RabbitSinkConfig>;

/** `amqp://user@host:port/vhost` — never the password. */
export function describeAmqpUrl(url: string, tls = false): string {
  try {
    const u = new URL(url);
    const secure = tls || u.protocol === "amqps:";
    const user = u.username ? `${decodeURIComponent(u.username)}@` : "";
    const port = u.port || (secure ? "5671" : "5672");
    const vhost = u.pathname.length > 1 ? decodeURIComponent(u.pathname.slice(1)) : "/";
    return `${secure ? "amqps" : "amqp"}://${user}${u.hostname}:${port}/${vhost === "/" ? "" : encodeURIComponent(vhost)}`;
  } catch {
    return "(unparseable amqp URL)";
  }
}

function pem(value: string, key: string): Buffer {
  if (value.includes("-----BEGIN")) return Buffer.from(value);
  return readSettingFile(value, `rabbitmq ${key}`);
}

/** Connection settings the sink and the source share. */
export interface AmqpConnectionOptions {
  url: string;
  tls: boolean;
  tls_ca?: string;
  tls_cert?: string;
  tls_key?: string;
  tls_key_password?: string;
  heartbeat_seconds: number;
  connection_timeout_ms: number;
}

/** The URL and socket options amqplib gets (heartbeat goes in the URL, TLS material in the socket). */
export function amqpConnectArgs(cfg: AmqpConnectionOptions, connectionName = "pgtrickle-relay"): { url: string; socket: Record<string, unknown> } {
  const u = new URL(cfg.url);
  if (cfg.tls && u.protocol === "amqp:") {
    u.protocol = "amqps:";
  }
  if (!u.searchParams.has("heartbeat")) u.searchParams.set("heartbeat", String(cfg.heartbeat_seconds));
  const socket: Record<string, unknown> = { timeout: cfg.connection_timeout_ms, noDelay: true, clientProperties: { connection_name: connectionName } };
  if (cfg.tls_ca) socket.ca = [pem(cfg.tls_ca, "tls_ca")];
  if (cfg.tls_cert) socket.cert = pem(cfg.tls_cert, "tls_cert");
  if (cfg.tls_key) socket.key = pem(cfg.tls_key, "tls_key");
  if (cfg.tls_key_password) socket.passphrase = cfg.tls_key_password;
  return { url: u.toString(), socket };
}

/** Server close codes that an operator has to fix (AMQP reply codes). */
const CONFIG_CODES = new Set([403 /* access refused */, 530 /* not allowed (vhost) */]);

/** Removes the URL's password (and the TLS key passphrase) from any text amqplib hands us. */
export function amqpScrubber(cfg: AmqpConnectionOptions): (text: string) => string {
  const secrets = [...urlSecrets(cfg.url), cfg.tls_key_password ?? ""].filter((s) => s.length > 0);
  return (text) => redact(text, secrets);
}

/** A RelayError naming host:port (`where`); access problems are config, everything else transient. */
export function amqpFailure(err: unknown, doing: string, where: string, scrub: (t: string) => string): RelayError {
  const code = (err as { code?: unknown }).code;
  const text = scrub(errorMessage(err));
  const msg = `rabbitmq ${doing} on ${where}: ${text}`;
  if ((typeof code === "number" && CONFIG_CODES.has(code)) || /ACCESS[-_]REFUSED|NOT[-_]ALLOWED/.test(text)) {
    return configError(`${msg} — check the user name, password, vhost and permissions in url`);
  }
  // amqplib reports a refused connection.open without its reason; RabbitMQ refuses it only
  // for a virtual host that is missing or that the user may not access (530 NOT_ALLOWED).
  if (/Expected ConnectionOpenOk; got <ConnectionClose/.test(text)) {
    const vhost = where.replace(/^amqps?:\/\/[^/]*\//, "") || "/";
    return configError(`rabbitmq ${doing} on ${where}: the server refused virtual host '${decodeURIComponent(vhost)}' (it does not exist, or the user has no permission on it)`);
  }
  return transientError(msg);
}

interface Pending {
  message: Message;
  routingKey: string;
}

class RabbitSink implements Sink {
  readonly describe: string;
  private readonly where: string;
  private readonly scrub: (text: string) => string;
  private conn?: ChannelModel;
  private channel?: ConfirmChannel;
  /** Why the channel or connection went away (the server's close reason), for error messages. */
  private lastClose?: Error;
  /** message_ids RabbitMQ returned as unroutable during the current write. */
  private returned = new Map<string, number>();

  constructor(
    private readonly cfg: RabbitSinkConfig,
    private readonly ctx: BackendContext,
  ) {
    this.where = describeAmqpUrl(cfg.url, cfg.tls);
    this.describe = `rabbitmq ${this.where} → exchange '${cfg.exchange}' ${cfg.routing_key_template}`;
    this.scrub = amqpScrubber(cfg);
  }

  async start(): Promise<void> {
    await this.connect();
  }

  async write(messages: Message[]): Promise<Rejection[]> {
    if (messages.length === 0) return [];
    const rejections: Rejection[] = [];
    const toSend: { pending: Pending; body: Buffer; options: Options.Publish }[] = [];
    for (const m of messages) {
      const routingKey = renderTemplate(this.cfg.routing_key_template, m);
      if (Buffer.byteLength(routingKey) > 255) {
        rejections.push({ message: m, error: `rabbitmq: routing key is ${Buffer.byteLength(routingKey)} bytes; AMQP allows at most 255` });
        continue;
      }
      const body = Buffer.from(envelopeJson(m));
      if (body.length > this.cfg.max_message_bytes) {
        rejections.push({ message: m, error: `rabbitmq: message of ${body.length} bytes exceeds max_message_bytes ${this.cfg.max_message_bytes}` });
        continue;
      }
      const headers: Record<string, unknown> = { pgt_dedup_key: m.dedup_key };
      if (m.is_full_refresh) headers["pgtrickle-full-refresh"] = true;
      toSend.push({
        pending: { message: m, routingKey },
        body,
        options: {
          persistent: true,
          mandatory: this.cfg.mandatory,
          messageId: m.dedup_key,
          contentType: "application/json",
          type: m.subject,
          appId: "pgtrickle-relay",
          headers,
        },
      });
    }
    if (toSend.length === 0) return rejections;

    if (!this.channel) await this.connect();
    const channel = this.channel!;
    this.returned = new Map();

    // `failed` settles on the first failure (nack, channel closed, confirm timeout), so no wait
    // below can outlive it.
    let failure: Error | undefined;
    let signalFailure!: () => void;
    const failed = new Promise<void>((resolve) => (signalFailure = resolve));
    const fail = (err: Error) => {
      failure ??= err;
      signalFailure();
    };
    let inFlight = 0;
    let slotFreed: (() => void) | undefined;
    const onClose = () => fail(this.lastClose ?? new Error("channel closed"));
    channel.on("close", onClose);
    const timer = setTimeout(
      () => fail(new Error(`no confirm from RabbitMQ within ${this.cfg.confirm_timeout_ms} ms (is the broker blocked by a resource alarm?)`)),
      this.cfg.confirm_timeout_ms,
    );
    const confirms: Promise<void>[] = [];
    try {
      for (const item of toSend) {
        while (!failure && inFlight >= this.cfg.max_in_flight) await Promise.race([new Promise<void>((r) => (slotFreed = r)), failed]);
        if (failure) break;
        inFlight++;
        let writable = true;
        confirms.push(
          new Promise<void>((resolve) => {
            const callback = (err: unknown) => {
              inFlight--;
              if (err) {
                const nacked = err instanceof Error && err.message === "message nacked";
                fail(nacked ? new Error("RabbitMQ nacked a message (broker-side failure)") : (this.lastClose ?? (err as Error)));
              }
              resolve();
              const wake = slotFreed;
              slotFreed = undefined;
              wake?.();
            };
            try {
              writable = channel.publish(this.cfg.exchange, item.pending.routingKey, item.body, item.options, callback);
            } catch (err) {
              // publish throws once the channel is closed (IllegalOperationError).
              inFlight--;
              fail(this.lastClose ?? (err as Error));
              resolve();
            }
          }),
        );
        if (!writable) await Promise.race([new Promise<void>((resolve) => channel.once("drain", resolve)), failed]);
      }
      // Every callback fires (confirm, nack or channel close); the timer covers a silent broker.
      await Promise.race([Promise.all(confirms), failed]);
    } finally {
      clearTimeout(timer);
      channel.off("close", onClose);
    }

    if (failure) {
      // The channel may be half-dead (closed, or waiting on a blocked connection): start afresh.
      await this.disconnect();
      throw this.failure(failure, `publishing to exchange '${this.cfg.exchange}'`);
    }

    const unroutable: Pending[] = [];
    if (this.returned.size > 0) {
      for (const { pending } of toSend) {
        const left = this.returned.get(pending.message.dedup_key);
        if (left) {
          unroutable.push(pending);
          if (left === 1) this.returned.delete(pending.message.dedup_key);
          else this.returned.set(pending.message.dedup_key, left - 1);
        }
      }
    }
    if (unroutable.length > 0) {
      const keys = [...new Set(unroutable.map((p) => p.routingKey))];
      const text = `rabbitmq: exchange '${this.cfg.exchange}' on ${this.where} has no queue bound for routing key${keys.length > 1 ? "s" : ""} ${keys
        .slice(0, 5)
        .map((k) => `'${k}'`)
        .join(", ")}${keys.length > 5 ? ` and ${keys.length - 5} more` : ""}`;
      if (this.cfg.unroutable === "dead_letter") {
        for (const p of unroutable) rejections.push({ message: p.message, error: `${text} (message returned as unroutable)` });
      } else {
        throw transientError(
          `${text}: ${unroutable.length} of ${toSend.length} messages were returned unroutable; bind a queue, or set unroutable: "dead_letter" or mandatory: false`,
        );
      }
    }
    return rejections;
  }

  async close(): Promise<void> {
    await this.disconnect();
  }

  private async connect(): Promise<void> {
    const { url, socket } = amqpConnectArgs(this.cfg);
    let conn: ChannelModel;
    try {
      conn = await amqp.connect(url, socket);
    } catch (err) {
      throw this.failure(err, "connecting");
    }
    this.lastClose = undefined;
    conn.on("error", (err: Error) => {
      this.lastClose = err;
      this.ctx.log.debug(`rabbitmq connection error: ${this.scrub(errorMessage(err))}`);
    });
    conn.on("close", (err?: Error) => {
      if (err) this.lastClose ??= err;
      if (this.conn === conn) {
        this.conn = undefined;
        this.channel = undefined;
      }
    });
    conn.on("blocked", (reason: string) => this.ctx.log.warn(`rabbitmq ${this.where} blocked publishing: ${reason}`));
    conn.on("unblocked", () => this.ctx.log.info(`rabbitmq ${this.where} unblocked`));
    try {
      await this.ensureExchange(conn);
      const channel = await conn.createConfirmChannel();
      channel.on("error", (err: Error) => {
        this.lastClose = err;
      });
      channel.on("close", () => {
        if (this.channel === channel) this.channel = undefined;
      });
      channel.on("return", (msg: { properties: { messageId?: unknown } }) => {
        const id = msg.properties.messageId;
        if (typeof id === "string") this.returned.set(id, (this.returned.get(id) ?? 0) + 1);
      });
      this.conn = conn;
      this.channel = channel;
    } catch (err) {
      await conn.close().catch(() => {});
      throw err instanceof RelayError ? err : this.failure(err, "opening a channel");
    }
  }

  /** Declares or checks the exchange on a throwaway channel (a failed check closes its channel). */
  private async ensureExchange(conn: ChannelModel): Promise<void> {
    const name = this.cfg.exchange;
    if (name === "") return; // the default exchange always exists and cannot be declared
    const ch = await conn.createChannel();
    ch.on("error", () => {});
    try {
      if (this.cfg.declare_exchange && !this.ctx.check) await ch.assertExchange(name, this.cfg.exchange_type, { durable: true });
      else await ch.checkExchange(name);
    } catch (err) {
      const code = (err as { code?: number }).code;
      if (code === 404 && this.cfg.declare_exchange && this.ctx.check) return this.ctx.check.wouldCreate(`rabbitmq exchange '${name}'`);
      if (code === 404) {
        throw configError(`rabbitmq exchange '${name}' does not exist on ${this.where}: create it, or set declare_exchange: true`);
      }
      if (code === 406) {
        throw configError(
          `rabbitmq exchange '${name}' on ${this.where} exists with other settings than type '${this.cfg.exchange_type}', durable: ${this.scrub(errorMessage(err))}; fix exchange_type or set declare_exchange: false`,
        );
      }
      throw this.failure(err, `declaring exchange '${name}'`);
    } finally {
      await ch.close().catch(() => {});
    }
  }

  private async disconnect(): Promise<void> {
    const conn = this.conn;
    this.conn = undefined;
    this.channel = undefined;
    if (conn) await conn.close().catch(() => {});
  }

  private failure(err: unknown, doing: string): RelayError {
    return amqpFailure(err, doing, this.where, this.scrub);
  }
}

// ── RabbitMQ source (reverse) ───────────────────────────────────────────────────────────────

const sinkKeys = RabbitSinkOptions.entries;

const RabbitSourceOptions = v.looseObject({
  ...reverseSourceKeys,
  type: v.optional(v.string()),
  url: sinkKeys.url,
  /** Queue to consume (required). */
  queue: v.pipe(
    v.string("queue is required"),
    v.minLength(1, "queue must not be empty"),
    v.check((q) => Buffer.byteLength(q) <= 255, "queue names are at most 255 bytes"),
  ),
  /** Consumer tag (as the management UI shows it). Default `pgtrickle-relay-<pipeline>`. */
  consumer_tag: v.optional(v.pipe(v.string(), v.minLength(1, "consumer_tag must not be empty"))),
  /**
   * Most unacknowledged deliveries RabbitMQ sends ahead to this consumer (basic.qos). Raised to
   * batch_size when lower, since a batch holds its deliveries unacknowledged until the inbox commit.
   */
  prefetch_count: v.optional(v.pipe(positiveInt("prefetch_count"), v.maxValue(65535, "prefetch_count must be ≤ 65535")), 100),
  /**
   * Declare the queue (durable) at start when it is missing. A queue that already exists with
   * other properties (quorum type, TTL, dead-lettering, non-durable…) is used as it is. false:
   * only check that it exists (a missing queue is then a configuration error).
   */
  declare_queue: v.optional(v.boolean(), true),
  /** Exchange to bind the queue to at start (it must exist). Absent: no binding is declared. */
  bind_exchange: v.optional(v.pipe(v.string(), v.minLength(1, "bind_exchange must not be empty (the default exchange cannot be bound)"))),
  /**
   * Routing key (pattern) of that binding. Default `#`: everything on a topic exchange; a fanout
   * exchange ignores it; a direct exchange needs the exact key.
   */
  bind_routing_key: v.optional(v.string(), "#"),
  /**
   * Must stay false. With automatic acknowledgement RabbitMQ forgets a message the moment it is
   * delivered, before it reaches the inbox, so a crash or a failed insert would lose it.
   */
  auto_ack: v.optional(v.boolean(), false),
  /**
   * After a batch's first delivery, how long (ms) to wait for more before handing out a batch
   * smaller than batch_size.
   */
  batch_wait_ms: v.optional(v.pipe(v.number(), v.integer(), v.minValue(0)), 20),
  tls: sinkKeys.tls,
  tls_ca: sinkKeys.tls_ca,
  tls_cert: sinkKeys.tls_cert,
  tls_key: sinkKeys.tls_key,
  tls_key_password: sinkKeys.tls_key_password,
  heartbeat_seconds: sinkKeys.heartbeat_seconds,
  connection_timeout_ms: sinkKeys.connection_timeout_ms,
});

const RabbitSourceConfig = v.pipe(
  RabbitSourceOptions,
  v.check(
    (c) => c.auto_ack === false,
    "auto_ack must stay false: with automatic acknowledgement RabbitMQ drops each message as soon as it is delivered, before the inbox commit, so a crash or a failed insert would lose it; the relay acknowledges every batch after the inbox commit",
  ),
  v.check((c) => (c.tls_cert === undefined) === (c.tls_key === undefined), "tls_cert and tls_key go together"),
);

export type RabbitSourceConfig = v.InferOutput<typeof RabbitSourceConfig>;

/** AMQP header values as text: strings as they are, byte arrays as UTF-8, numbers and booleans printed, tables as JSON. */
export function amqpHeaders(headers: Record<string, unknown> | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [name, value] of Object.entries(headers ?? {})) {
    if (value === null || value === undefined) continue;
    let text: string | null;
    if (typeof value === "string") text = value;
    else if (Buffer.isBuffer(value)) text = utf8OrNull(value);
    else if (typeof value === "number" || typeof value === "boolean" || typeof value === "bigint") text = String(value);
    else if (value instanceof Date) text = value.toISOString();
    else text = JSON.stringify(value, (_k, x: unknown) => (typeof x === "bigint" ? x.toString() : x));
    if (text !== null) out[name] = text;
  }
  return out;
}

/** What the mapping reads of a delivery (a ConsumeMessage fits). */
export interface AmqpDelivery {
  fields: { exchange: string; routingKey: string };
  properties: { messageId?: unknown; type?: unknown; headers?: Record<string, unknown> };
  content: Buffer;
}

const nonEmpty = (x: unknown): x is string => typeof x === "string" && x !== "";

/**
 * One delivery → its inbox message (docs/interface.md §6.5, §6.6): event_id = property `message_id`,
 * else header `pgt_dedup_key`, else `amqp:` + hex SHA-256 of exchange, routing key and body
 * (NUL-separated); event_type candidate = property `type`, else the routing key; source =
 * `rabbitmq:<queue>`; trace_id from a `traceparent` header.
 */
export function convertAmqpDelivery(d: AmqpDelivery, queue: string, cfg: Pick<RabbitSourceConfig, "event_type" | "event_type_field">, pipeline: string): Message {
  const headers = amqpHeaders(d.properties.headers);
  const producerKey = nonEmpty(d.properties.messageId) ? d.properties.messageId : headerValue(headers, "pgt_dedup_key");
  const nul = Buffer.from([0]);
  return inboundMessage({
    pipeline,
    sourceType: "rabbitmq",
    where: queue,
    body: d.content,
    headers,
    producerKey,
    synthesizedKey: () => `amqp:${sha256Hex(Buffer.concat([Buffer.from(d.fields.exchange), nul, Buffer.from(d.fields.routingKey), nul, d.content]))}`,
    eventTypeCandidate: nonEmpty(d.properties.type) ? d.properties.type : d.fields.routingKey,
    config: cfg,
  });
}

/**
 * One connection and channel, opened by each batches() call and closed when the iteration ends
 * (a lost connection makes the next call start afresh). Deliveries are buffered as they arrive
 * (at most the prefetch window) and handed out in batches, oldest first.
 */
class RabbitSession {
  private conn?: ChannelModel;
  private channel?: Channel;
  private buffer: ConsumeMessage[] = [];
  private readonly sleeper = new Sleeper();
  private failed: RelayError | null = null;
  private lastClose?: Error;
  private lastDeliveryAt = 0;
  private firstBufferedAt = 0;
  private closing = false;
  /** Deliveries handed out in batches and not yet acked or released. */
  private outstanding = 0;

  constructor(
    private readonly src: RabbitSource,
    private readonly cfg: RabbitSourceConfig,
    private readonly ctx: BackendContext,
  ) {}

  async open(): Promise<void> {
    const conn = await this.src.connect();
    this.conn = conn;
    conn.on("error", (err: Error) => (this.lastClose = err));
    conn.on("close", (err?: Error) => this.fail(err ?? this.lastClose, "the connection closed"));
    try {
      await this.src.prepareQueue(conn);
      const channel = await conn.createChannel();
      this.channel = channel;
      channel.on("error", (err: Error) => (this.lastClose = err));
      channel.on("close", () => this.fail(this.lastClose, "the channel closed"));
      await channel.prefetch(this.src.prefetch);
      await channel.consume(this.cfg.queue, (msg) => (msg ? this.deliver(msg) : this.fail(undefined, "RabbitMQ cancelled the consumer (queue deleted?)")), {
        noAck: false,
        consumerTag: this.src.consumerTag,
      });
    } catch (err) {
      throw err instanceof RelayError ? err : this.src.failure(this.lastClose ?? err, `consuming from queue '${this.cfg.queue}'`);
    }
  }

  private deliver(msg: ConsumeMessage): void {
    if (this.buffer.length === 0) this.firstBufferedAt = Date.now();
    this.buffer.push(msg);
    this.lastDeliveryAt = Date.now();
    if (this.buffer.length >= this.cfg.batch_size || this.buffer.length === 1) this.sleeper.wake();
  }

  private fail(cause: Error | undefined, what: string): void {
    if (this.closing || this.failed) return;
    // RabbitMQ requeues every unacknowledged delivery of a closed channel: nothing is lost.
    this.failed = cause ? this.src.failure(cause, `consuming from queue '${this.cfg.queue}'`) : transientError(`rabbitmq ${this.src.where}: ${what} while consuming from queue '${this.cfg.queue}'`);
    this.buffer = [];
    this.sleeper.wake();
  }

  /** The next batch, or null when the signal aborted or (drain) the queue has nothing ready. */
  async next(signal: AbortSignal): Promise<Batch | null> {
    const wake = () => this.sleeper.wake();
    signal.addEventListener("abort", wake, { once: true });
    try {
      let idleSince = Date.now();
      for (;;) {
        if (this.failed) throw this.failed;
        if (signal.aborted) return null;
        if (this.buffer.length >= this.cfg.batch_size) return this.take();
        if (this.buffer.length > 0) {
          const waited = Date.now() - this.firstBufferedAt;
          if (waited >= this.cfg.batch_wait_ms) return this.take();
          await this.sleeper.sleep(this.cfg.batch_wait_ms - waited);
          continue;
        }
        if (this.ctx.drain && Date.now() - idleSince >= this.cfg.poll_interval_ms) {
          if ((await this.nothingReady()) && this.buffer.length === 0 && !this.failed) return null;
          idleSince = Date.now();
        }
        await this.sleeper.sleep(this.cfg.poll_interval_ms);
      }
    } finally {
      signal.removeEventListener("abort", wake);
    }
  }

  /** Drain: no ready message in the queue and no delivery within the last poll interval. */
  private async nothingReady(): Promise<boolean> {
    const channel = this.channel;
    if (!channel || Date.now() - this.lastDeliveryAt < this.cfg.poll_interval_ms) return false;
    try {
      const { messageCount } = await channel.checkQueue(this.cfg.queue);
      return messageCount === 0;
    } catch (err) {
      throw this.failed ?? this.src.failure(this.lastClose ?? err, `checking queue '${this.cfg.queue}'`);
    }
  }

  private take(): Batch {
    const deliveries = this.buffer.splice(0, this.cfg.batch_size);
    this.firstBufferedAt = Date.now();
    const channel = this.channel!;
    const last = deliveries[deliveries.length - 1]!;
    const messages = deliveries.map((d) => convertAmqpDelivery(d, this.cfg.queue, this.cfg, this.ctx.pipeline));
    let state: "open" | "acked" | "released" = "open";
    this.outstanding += deliveries.length;
    // Delivery tags grow with delivery order on a channel, batches are handed out oldest first,
    // and the pipeline acks (or releases) one batch before it asks for the next: so `multiple`
    // up to the batch's last tag covers exactly this batch's deliveries.
    const settle = (what: "ack" | "release") => {
      this.outstanding = Math.max(0, this.outstanding - deliveries.length);
      if (this.failed || this.channel !== channel) {
        this.ctx.log.warn(
          `rabbitmq source: the channel closed before the ${what} of ${deliveries.length} deliveries; RabbitMQ requeues them${what === "ack" ? ", and the inbox's ON CONFLICT absorbs their redelivery" : ""}`,
        );
        return;
      }
      try {
        if (what === "ack") channel.ack(last, true);
        else channel.nack(last, true, true);
      } catch (err) {
        this.ctx.log.warn(`rabbitmq source: ${what} of ${deliveries.length} deliveries failed (${this.src.scrub(errorMessage(err))}); RabbitMQ requeues them with the channel`);
      }
    };
    return {
      messages,
      deadLetters: [],
      ack: async () => {
        if (state !== "open") return;
        state = "acked";
        settle("ack");
      },
      release: async () => {
        if (state !== "open") return;
        state = "released";
        settle("release");
      },
    };
  }

  /** Deliveries this session holds unacknowledged: buffered, or in a batch not yet acked. */
  get unacked(): number {
    return this.failed ? 0 : this.buffer.length + this.outstanding;
  }

  async close(): Promise<void> {
    this.closing = true;
    this.buffer = [];
    this.sleeper.wake();
    const conn = this.conn;
    this.conn = undefined;
    this.channel = undefined;
    // Closing the connection requeues whatever was delivered but not acknowledged.
    if (conn) await conn.close().catch(() => {});
  }
}

/**
 * Consumes a queue with manual acknowledgement (auto_ack is refused). Deliveries are collected
 * into batches of up to batch_size (or what arrived within batch_wait_ms); a batch is
 * acknowledged with one `basic.ack multiple=true` up to its last delivery tag, only after the
 * inbox commit, and handed back with `basic.nack multiple requeue` when the write failed. A lost
 * channel or connection makes RabbitMQ requeue every unacknowledged delivery; the iteration
 * fails transient and the next one opens a new connection. Drain ends once the queue has no
 * ready message and nothing arrived for one poll interval.
 */
export class RabbitSource implements Source {
  readonly describe: string;
  readonly where: string;
  readonly scrub: (text: string) => string;
  readonly consumerTag: string;
  readonly prefetch: number;
  private session: RabbitSession | null = null;
  /** A connection for lag() only, opened on first use; never consumes. */
  private lagConn: Promise<ChannelModel> | null = null;

  constructor(
    private readonly cfg: RabbitSourceConfig,
    private readonly ctx: BackendContext,
  ) {
    this.where = describeAmqpUrl(cfg.url, cfg.tls);
    this.scrub = amqpScrubber(cfg);
    this.consumerTag = cfg.consumer_tag ?? `pgtrickle-relay-${ctx.pipeline}`;
    this.prefetch = Math.min(65535, Math.max(cfg.prefetch_count, cfg.batch_size));
    if (this.prefetch > cfg.prefetch_count) {
      ctx.log.info(`rabbitmq source: prefetch_count ${cfg.prefetch_count} raised to batch_size ${this.prefetch} (a batch holds its deliveries unacknowledged until the inbox commit)`);
    }
    this.describe = `rabbitmq ${this.where} ← queue '${cfg.queue}'${cfg.bind_exchange ? ` (bound to '${cfg.bind_exchange}' ${cfg.bind_routing_key})` : ""}`;
  }

  /** Connects once to prepare the queue (and its binding), so configuration errors show at start. */
  async start(): Promise<void> {
    const conn = await this.connect();
    try {
      await this.prepareQueue(conn);
    } finally {
      await conn.close().catch(() => {});
    }
  }

  async connect(): Promise<ChannelModel> {
    const { url, socket } = amqpConnectArgs(this.cfg, `pgtrickle-relay ${this.ctx.pipeline} (source)`);
    try {
      return await amqp.connect(url, socket);
    } catch (err) {
      throw this.failure(err, "connecting");
    }
  }

  /**
   * declare_queue: declares the queue durable; a queue that exists with other properties makes
   * RabbitMQ answer 406 PRECONDITION_FAILED, and then it is checked (passive declare) and used as
   * it is: the queue's owner decides its arguments, the relay only needs to read from it.
   * Each step runs on a throwaway channel, since a refused declaration closes its channel.
   */
  async prepareQueue(conn: ChannelModel): Promise<void> {
    const q = this.cfg.queue;
    const onChannel = async <T>(work: (ch: Channel) => Promise<T>): Promise<T> => {
      const ch = await conn.createChannel();
      ch.on("error", () => {});
      try {
        return await work(ch);
      } finally {
        await ch.close().catch(() => {});
      }
    };
    const code = (err: unknown) => (err as { code?: number }).code;
    let declared = false;
    if (this.cfg.declare_queue && this.ctx.check) {
      declared = await onChannel((ch) => ch.checkQueue(q)).then(
        () => false,
        (err) => {
          if (code(err) !== 404) throw this.failure(err, `checking queue '${q}'`);
          this.ctx.check!.wouldCreate(`rabbitmq queue '${q}'`);
          return true;
        },
      );
    } else if (this.cfg.declare_queue) {
      try {
        await onChannel((ch) => ch.assertQueue(q, { durable: true }));
        declared = true;
      } catch (err) {
        if (code(err) !== 406) throw this.failure(err, `declaring queue '${q}'`);
        this.ctx.log.info(`rabbitmq source: queue '${q}' exists with other properties than a plain durable queue; using it as it is`);
      }
    }
    if (!declared) {
      try {
        await onChannel((ch) => ch.checkQueue(q));
      } catch (err) {
        if (code(err) === 404) throw configError(`rabbitmq queue '${q}' does not exist on ${this.where}: create it, or set declare_queue: true`);
        throw this.failure(err, `checking queue '${q}'`);
      }
    }
    if (this.cfg.bind_exchange !== undefined && this.ctx.check) {
      this.ctx.check.wouldCreate(`rabbitmq binding of queue '${q}' to exchange '${this.cfg.bind_exchange}' (if missing)`);
    } else if (this.cfg.bind_exchange !== undefined) {
      const ex = this.cfg.bind_exchange;
      try {
        await onChannel((ch) => ch.bindQueue(q, ex, this.cfg.bind_routing_key));
      } catch (err) {
        if (code(err) === 404) throw configError(`rabbitmq cannot bind queue '${q}' to exchange '${ex}' on ${this.where}: the exchange does not exist`);
        throw this.failure(err, `binding queue '${q}' to exchange '${ex}'`);
      }
    }
  }

  batches(signal: AbortSignal): AsyncIterable<Batch> {
    return this.consume(signal);
  }

  private async *consume(signal: AbortSignal): AsyncGenerator<Batch> {
    const session = new RabbitSession(this, this.cfg, this.ctx);
    this.session = session;
    try {
      await session.open();
      for (;;) {
        const batch = await session.next(signal);
        if (!batch) return;
        yield batch;
      }
    } finally {
      if (this.session === session) this.session = null;
      await session.close();
    }
  }

  /**
   * Messages of the queue not yet acknowledged to it by this relay: checkQueue's messageCount
   * (ready messages, on a throwaway channel of a connection kept for this, so a 404 closes
   * nothing the consumer uses) plus the deliveries this source holds unacknowledged (buffered or
   * in a batch in flight; RabbitMQ does not count those as ready). Deliveries held by other
   * consumers of the queue are not counted. Bounded by LAG_TIMEOUT_MS. Seconds: RabbitMQ does not
   * report the oldest message's age, so 0.
   */
  async lag(): Promise<Lag | null> {
    const work = (async () => {
      this.lagConn ??= this.connect().then((conn) => {
        conn.on("error", () => {});
        conn.on("close", () => (this.lagConn = null));
        return conn;
      });
      let conn: ChannelModel;
      try {
        conn = await this.lagConn;
      } catch (err) {
        this.lagConn = null;
        throw err;
      }
      const ch = await conn.createChannel();
      ch.on("error", () => {});
      try {
        const { messageCount } = await ch.checkQueue(this.cfg.queue);
        return { rows: messageCount + (this.session?.unacked ?? 0), seconds: 0 };
      } finally {
        await ch.close().catch(() => {});
      }
    })();
    return withTimeout(work, LAG_TIMEOUT_MS, "rabbitmq lag query");
  }

  async close(): Promise<void> {
    const session = this.session;
    this.session = null;
    await session?.close();
    const lagConn = this.lagConn;
    this.lagConn = null;
    if (lagConn) await lagConn.then((c) => c.close()).catch(() => {});
  }

  failure(err: unknown, doing: string): RelayError {
    return amqpFailure(err, doing, this.where, this.scrub);
  }
}

export const sink = sinkSpec({
  type: "rabbitmq",
  config: RabbitSinkConfig,
  create: (cfg, ctx) => new RabbitSink(cfg, ctx),
});

export const source = sourceSpec({
  type: "rabbitmq",
  config: RabbitSourceConfig,
  create: (cfg, ctx) => new RabbitSource(cfg, ctx),
});
