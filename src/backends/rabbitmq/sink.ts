/**
 * The RabbitMQ sink (AMQP 0-9-1; docs/interface.md §6.4): one connection with one confirm
 * channel. A write publishes the whole batch on that channel in order (so every queue sees a
 * key's messages in batch order), with at most `max_in_flight` unconfirmed publishes and the
 * socket's `drain` respected, and resolves once RabbitMQ has confirmed every message. Messages
 * are persistent, `message_id` = dedup key, `content_type` application/json, header
 * `pgt_dedup_key` = dedup key, and header `pgtrickle-full-refresh` = true on full-refresh
 * messages.
 *
 * Unroutable messages (mandatory publish, no binding matches): RabbitMQ returns them and then
 * confirms them, so a confirm alone does not mean a queue has them. A missing binding is
 * something an operator fixes, not a property of the message, so by default
 * (`unroutable: "retry"`) the batch fails with a transient error naming exchange and routing key
 * and is retried until a queue is bound; `unroutable: "dead_letter"` sends such messages to the
 * dead-letter table instead, and `mandatory: false` lets RabbitMQ drop them silently.
 */
import amqp, { type ChannelModel, type ConfirmChannel, type Options } from "amqplib";
import { configError, errorMessage, RelayError, transientError } from "../../errors.ts";
import { envelopeJson, renderTemplate, type Message } from "../../message.ts";
import { sinkSpec, type BackendContext, type Rejection, type Sink } from "../types.ts";
import { amqpConnectArgs, amqpFailure, amqpScrubber, describeAmqpUrl } from "./client.ts";
import { RabbitSinkConfig } from "./config.ts";
import { tlsWanted } from "../../tls.ts";

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
    this.where = describeAmqpUrl(cfg.url, tlsWanted(cfg));
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


export default sinkSpec({
  type: "rabbitmq",
  config: RabbitSinkConfig,
  create: (cfg, ctx) => new RabbitSink(cfg, ctx),
});
