/**
 * The consuming side of the RabbitMQ source (see RabbitSource in source.ts): one connection and
 * channel per batches() call, deliveries buffered and handed out in batches.
 */
import type { Channel, ChannelModel, ConsumeMessage } from "amqplib";
import { errorMessage, RelayError, transientError } from "../../errors.ts";
import { Sleeper } from "../../sleep.ts";
import type { BackendContext, Batch } from "../types.ts";
import type { RabbitSourceConfig } from "./config.ts";
import { convertAmqpDelivery } from "./delivery.ts";
import type { RabbitSource } from "./source.ts";

/**
 * One connection and channel, opened by each batches() call and closed when the iteration ends
 * (a lost connection makes the next call start afresh). Deliveries are buffered as they arrive
 * (at most the prefetch window) and handed out in batches, oldest first.
 */
export class RabbitSession {
  private conn?: ChannelModel;
  private channel?: Channel;
  private buffer: ConsumeMessage[] = [];
  private readonly sleeper = new Sleeper();
  private failed: RelayError | null = null;
  private lastClose?: Error;
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
    if (this.buffer.length >= this.src.batchLimit || this.buffer.length === 1) this.sleeper.wake();
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
    return this.sleeper.wakingOn(signal, () => this.waitForBatch(signal));
  }

  private async waitForBatch(signal: AbortSignal): Promise<Batch | null> {
    for (;;) {
      if (this.failed) throw this.failed;
      if (signal.aborted) return null;
      if (this.buffer.length >= this.src.batchLimit) return this.take();
      if (this.buffer.length > 0) {
        const waited = Date.now() - this.firstBufferedAt;
        if (waited >= this.cfg.batch_wait_ms) return this.take();
        await this.sleeper.sleep(this.cfg.batch_wait_ms - waited);
        continue;
      }
      // A drain ends only with every batch handed out acknowledged: closing the channel earlier
      // would requeue them. Each ack or release wakes this loop (take()).
      if (this.ctx.drain && this.outstanding === 0 && (await this.drained())) return null;
      await this.sleeper.sleep(this.cfg.poll_interval_ms);
    }
  }

  /**
   * Drain: nothing in hand, the queue has no ready message, and no delivery is on its way to this
   * channel. checkQueue's count leaves out the deliveries already made, including one the broker
   * sent just before it counted; the channel's next method is answered only after such a
   * delivery (docs/PIPELINE.md, "How a drain ends"), so a basic.qos that changes nothing is the
   * barrier behind which the buffer is looked at again.
   */
  private async drained(): Promise<boolean> {
    const channel = this.channel;
    if (!channel) return false;
    try {
      const { messageCount } = await channel.checkQueue(this.cfg.queue);
      if (messageCount > 0) return false;
      await channel.prefetch(this.src.prefetch);
    } catch (err) {
      throw this.failed ?? this.src.failure(this.lastClose ?? err, `checking queue '${this.cfg.queue}'`);
    }
    return this.buffer.length === 0 && this.outstanding === 0 && !this.failed;
  }

  private take(): Batch {
    const deliveries = this.buffer.splice(0, this.src.batchLimit);
    this.firstBufferedAt = Date.now();
    const channel = this.channel!;
    const last = deliveries[deliveries.length - 1]!;
    const messages = deliveries.map((d) => convertAmqpDelivery(d, this.cfg.queue, this.cfg, this.ctx.pipeline));
    let state: "open" | "acked" | "released" = "open";
    this.outstanding += deliveries.length;
    // Delivery tags grow with delivery order on a channel, batches are handed out oldest first,
    // and the pipeline settles the batches it read ahead in that same order — acks each after its
    // inbox commit, releases (after a failure) only once every earlier batch was acked or
    // released — so `multiple` up to the batch's last tag covers exactly this batch's deliveries.
    const settle = (what: "ack" | "release") => {
      this.outstanding = Math.max(0, this.outstanding - deliveries.length);
      this.sleeper.wake(); // a drain waits for every batch to be settled
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
