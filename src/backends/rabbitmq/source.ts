/**
 * The RabbitMQ source (AMQP 0-9-1; docs/interface.md §5.3, §6.5): basic.consume with manual
 * acknowledgement on a channel of its own (session.ts); deliveries are gathered into batches,
 * mapped by delivery.ts, and acknowledged cumulatively (`multiple`) after the inbox commit. See
 * RabbitSource.
 */
import { readAheadBatchSize } from "../../inbound.ts";
import amqp, { type Channel, type ChannelModel } from "amqplib";
import { configError, RelayError } from "../../errors.ts";
import { withTimeout } from "../../sleep.ts";
import { LAG_TIMEOUT_MS, sourceSpec, type BackendContext, type Batch, type Lag, type Source } from "../types.ts";
import { amqpConnectArgs, amqpFailure, amqpScrubber, describeAmqpUrl } from "./client.ts";
import { RabbitSourceConfig } from "./config.ts";
import { sessionBatches } from "../session-batches.ts";
import { RabbitSession } from "./session.ts";
import { tlsWanted } from "../../tls.ts";

/**
 * Consumes a queue with manual acknowledgement (auto_ack is refused). Deliveries are collected
 * into batches of up to batch_size (or what arrived within batch_wait_ms), up to three of them
 * in hand at once (read-ahead); a batch is acknowledged with one `basic.ack multiple=true` up to
 * its last delivery tag, only after its inbox commit and every earlier batch's ack, and handed back with `basic.nack multiple requeue` when the write failed. A lost
 * channel or connection makes RabbitMQ requeue every unacknowledged delivery; the iteration
 * fails transient and the next one opens a new connection. Drain ends once every batch handed
 * out is acknowledged, the queue has no ready message and no delivery is on its way (session.ts).
 */
export class RabbitSource implements Source {
  readonly describe: string;
  readonly where: string;
  readonly scrub: (text: string) => string;
  readonly consumerTag: string;
  readonly prefetch: number;
  /**
   * Batches out unacknowledged at once (docs/PIPELINE.md). A delivery read ahead waits at most
   * two more inbox writes for its ack; RabbitMQ's only deadline on unacknowledged deliveries is
   * the channel's consumer_timeout (30 min by default), and a closed channel requeues them all.
   */
  readonly readAhead = 3;
  /** Most deliveries in one batch: batch_size, or less within the pipeline's window (ctx.batchLimit). */
  readonly batchLimit: number;
  private session: RabbitSession | null = null;
  /** A connection for lag() only, opened on first use; never consumes. */
  private lagConn: Promise<ChannelModel> | null = null;

  constructor(
    private readonly cfg: RabbitSourceConfig,
    private readonly ctx: BackendContext,
  ) {
    this.where = describeAmqpUrl(cfg.url, tlsWanted(cfg));
    this.scrub = amqpScrubber(cfg);
    this.consumerTag = cfg.consumer_tag ?? `pgtrickle-relay-${ctx.pipeline}`;
    this.batchLimit = readAheadBatchSize(cfg.batch_size, ctx);
    // Every batch in hand holds its deliveries unacknowledged until its inbox commit: a smaller
    // prefetch would stop deliveries while the batches read ahead are written.
    const inHand = this.readAhead * this.batchLimit;
    this.prefetch = Math.min(65535, Math.max(cfg.prefetch_count, inHand));
    if (this.prefetch > cfg.prefetch_count) {
      ctx.log.info(`rabbitmq source: prefetch_count ${cfg.prefetch_count} raised to ${this.prefetch} (${this.readAhead} batches of ${this.batchLimit} hold their deliveries unacknowledged until their inbox commit)`);
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

  async *batches(signal: AbortSignal): AsyncGenerator<Batch> {
    const session = new RabbitSession(this, this.cfg, this.ctx);
    this.session = session;
    yield* sessionBatches(session, signal, () => {
      if (this.session === session) this.session = null;
    });
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

export default sourceSpec({
  type: "rabbitmq",
  config: RabbitSourceConfig,
  create: (cfg, ctx) => new RabbitSource(cfg, ctx),
});
