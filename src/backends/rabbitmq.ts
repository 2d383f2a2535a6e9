/**
 * RabbitMQ (AMQP 0-9-1; CONTRACT.md §5.3 rabbitmq, §6.4) through amqplib.
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
 */
import { readFileSync } from "node:fs";
import amqp, { type ChannelModel, type ConfirmChannel, type Options } from "amqplib";
import * as v from "valibot";
import { configError, errorMessage, RelayError, transientError } from "../errors.ts";
import { envelopeJson, renderTemplate, type Message } from "../message.ts";
import { defineBackend, sinkSpec, type BackendContext, type Rejection, type Sink } from "./types.ts";

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
   * Routing key rendered per message (CONTRACT §6.3 variables and top-level row fields). A key
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
  try {
    return readFileSync(value);
  } catch (err) {
    throw configError(`rabbitmq ${key} '${value}' cannot be read (${(err as { code?: string }).code ?? errorMessage(err)})`);
  }
}

/** The URL and socket options amqplib gets (heartbeat goes in the URL, TLS material in the socket). */
export function amqpConnectArgs(cfg: RabbitSinkConfig): { url: string; socket: Record<string, unknown> } {
  const u = new URL(cfg.url);
  if (cfg.tls && u.protocol === "amqp:") {
    u.protocol = "amqps:";
  }
  if (!u.searchParams.has("heartbeat")) u.searchParams.set("heartbeat", String(cfg.heartbeat_seconds));
  const socket: Record<string, unknown> = { timeout: cfg.connection_timeout_ms, noDelay: true, clientProperties: { connection_name: "pgtrickle-relay" } };
  if (cfg.tls_ca) socket.ca = [pem(cfg.tls_ca, "tls_ca")];
  if (cfg.tls_cert) socket.cert = pem(cfg.tls_cert, "tls_cert");
  if (cfg.tls_key) socket.key = pem(cfg.tls_key, "tls_key");
  if (cfg.tls_key_password) socket.passphrase = cfg.tls_key_password;
  return { url: u.toString(), socket };
}

/** Server close codes that an operator has to fix (AMQP reply codes). */
const CONFIG_CODES = new Set([403 /* access refused */, 530 /* not allowed (vhost) */]);

interface Pending {
  message: Message;
  routingKey: string;
}

class RabbitSink implements Sink {
  readonly describe: string;
  private readonly where: string;
  private readonly secrets: string[];
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
    const u = new URL(cfg.url);
    this.secrets = [u.password, decodeURIComponent(u.password), cfg.tls_key_password ?? ""].filter((s) => s.length > 0);
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

  private scrub(text: string): string {
    return this.secrets.reduce((t, s) => t.split(s).join("***"), text).replace(/(amqps?:\/\/[^:/@\s]+:)[^@\s]+@/gi, "$1***@");
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
      if (this.cfg.declare_exchange) await ch.assertExchange(name, this.cfg.exchange_type, { durable: true });
      else await ch.checkExchange(name);
    } catch (err) {
      const code = (err as { code?: number }).code;
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

  /** A RelayError naming host:port; access problems are config, everything else transient. */
  private failure(err: unknown, doing: string): RelayError {
    const code = (err as { code?: unknown }).code;
    const text = this.scrub(errorMessage(err));
    const msg = `rabbitmq ${doing} on ${this.where}: ${text}`;
    if ((typeof code === "number" && CONFIG_CODES.has(code)) || /ACCESS[-_]REFUSED|NOT[-_]ALLOWED/.test(text)) {
      return configError(`${msg} — check the user name, password, vhost and permissions in url`);
    }
    // amqplib reports a refused connection.open without its reason; RabbitMQ refuses it only
    // for a virtual host that is missing or that the user may not access (530 NOT_ALLOWED).
    if (/Expected ConnectionOpenOk; got <ConnectionClose/.test(text)) {
      const vhost = this.where.replace(/^amqps?:\/\/[^/]*\//, "") || "/";
      return configError(`rabbitmq ${doing} on ${this.where}: the server refused virtual host '${decodeURIComponent(vhost)}' (it does not exist, or the user has no permission on it)`);
    }
    return transientError(msg);
  }
}

export default defineBackend({
  type: "rabbitmq",
  sink: sinkSpec({
    config: RabbitSinkConfig,
    create: (cfg, ctx) => new RabbitSink(cfg, ctx),
  }),
});
