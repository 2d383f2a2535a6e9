/**
 * The JetStream stream and durable pull consumer the NATS source reads (docs/interface.md §5.4):
 * the stream found by name or by the subjects it captures (created only with `create_stream`),
 * the consumer created when missing and its ack wait, max deliveries and filter updated when
 * they differ. Under `check` nothing is created or updated, only reported.
 */
import { AckPolicy, nanos, type ConsumerConfig, type ConsumerInfo, type DeliverPolicy, type JetStreamManager, type StreamInfo } from "nats";
import { configError } from "../../errors.ts";
import { apiError, type NatsLink } from "./client.ts";
import { subjectsOverlap, type NatsSourceOptions } from "./config.ts";
import type { BackendContext } from "../types.ts";

/** What finding the stream and setting up the consumer needs from the source. */
export interface ConsumerSetup {
  cfg: NatsSourceOptions;
  ctx: BackendContext;
  link: NatsLink;
  durable: string;
  ackWaitMs: number;
}

export async function resolveStream(jsm: JetStreamManager, s: ConsumerSetup): Promise<string> {
  const subject = s.cfg.subject;
  const name = s.cfg.stream;
  if (name === undefined) {
    const names: string[] = [];
    try {
      for await (const n of jsm.streams.names(subject)) names.push(n);
    } catch (err) {
      throw s.link.fail(err, "listing JetStream streams failed");
    }
    if (names.length === 1) return names[0]!;
    if (names.length === 0) {
      throw configError(
        `no JetStream stream at NATS ${s.link.where} captures source.subject "${subject}"; create one, or set source.stream and source.create_stream: true`,
      );
    }
    throw configError(`several JetStream streams capture parts of source.subject "${subject}" (${names.join(", ")}); set source.stream`);
  }
  let info: StreamInfo | null = null;
  try {
    info = await jsm.streams.info(name);
  } catch (err) {
    if (apiError(err)?.err_code !== 10059) throw s.link.fail(err, `reading JetStream stream "${name}" failed`);
  }
  if (info === null) {
    if (!s.cfg.create_stream) {
      throw configError(`JetStream stream "${name}" (source.stream) does not exist at NATS ${s.link.where}; create it or set source.create_stream: true`);
    }
    if (s.ctx.check) {
      s.ctx.check.wouldCreate(`JetStream stream "${name}" capturing ${subject}`);
      return name;
    }
    try {
      await jsm.streams.add({ name, subjects: [subject] });
    } catch (err) {
      throw s.link.fail(err, `creating JetStream stream "${name}" capturing "${subject}" failed`);
    }
    s.ctx.log.info(`nats: created JetStream stream "${name}" capturing ${subject}`);
    return name;
  }
  const filters = info.config.subjects ?? [];
  if (!filters.some((f) => subjectsOverlap(f, subject))) {
    throw configError(`JetStream stream "${name}" (source.stream) captures ${JSON.stringify(filters)}, none of source.subject "${subject}"`);
  }
  return name;
}

function wantedConsumer(s: ConsumerSetup): Partial<ConsumerConfig> {
  const c: Partial<ConsumerConfig> = {
    durable_name: s.durable,
    ack_policy: AckPolicy.Explicit,
    deliver_policy: s.cfg.deliver_policy as DeliverPolicy,
    ack_wait: nanos(s.ackWaitMs),
    max_deliver: s.cfg.max_deliver,
    filter_subject: s.cfg.subject,
    // The batches in hand (up to three: the pipeline's read-ahead, docs/PIPELINE.md) can never
    // hold more than the consumer's unacknowledged limit.
    max_ack_pending: Math.max(1000, 3 * s.cfg.batch_size),
  };
  if (s.cfg.deliver_policy === "by_start_time") c.opt_start_time = new Date(s.cfg.opt_start_time!).toISOString();
  return c;
}

export async function ensureConsumer(jsm: JetStreamManager, stream: string, s: ConsumerSetup): Promise<void> {
  const where = `consumer "${s.durable}" on JetStream stream "${stream}"`;
  let info: ConsumerInfo | null = null;
  try {
    info = await jsm.consumers.info(stream, s.durable);
  } catch (err) {
    if (apiError(err)?.err_code !== 10014) throw s.link.fail(err, `reading ${where} failed`);
  }
  const want = wantedConsumer(s);
  if (info === null && s.ctx.check) return s.ctx.check.wouldCreate(`durable pull ${where}`);
  if (info === null) {
    try {
      await jsm.consumers.add(stream, want);
    } catch (err) {
      throw s.link.fail(err, `creating ${where} failed`);
    }
    s.ctx.log.info(`nats: created durable pull ${where} (filter ${s.cfg.subject}, deliver ${s.cfg.deliver_policy})`);
    return;
  }
  const have = info.config;
  if (have.deliver_subject) {
    throw configError(`${where} is a push consumer; source.durable_name must name a pull consumer (or a new one the relay creates)`);
  }
  if (have.ack_policy !== AckPolicy.Explicit) {
    throw configError(`${where} acknowledges with policy "${have.ack_policy}"; the relay needs "explicit" (use another source.durable_name)`);
  }
  const update: Partial<ConsumerConfig> = {};
  if (have.ack_wait !== want.ack_wait) update.ack_wait = want.ack_wait!;
  if ((have.max_deliver ?? -1) !== want.max_deliver) update.max_deliver = want.max_deliver!;
  if ((have.filter_subject ?? "") !== want.filter_subject) update.filter_subject = want.filter_subject!;
  if (Object.keys(update).length > 0 && s.ctx.check) {
    s.ctx.check.wouldCreate(`an update of ${where}: ${Object.keys(update).join(", ")}`);
  } else if (Object.keys(update).length > 0) {
    try {
      await jsm.consumers.update(stream, s.durable, update);
    } catch (err) {
      throw s.link.fail(err, `updating ${where} (${Object.keys(update).join(", ")}) failed`);
    }
    s.ctx.log.info(`nats: updated ${where}: ${Object.keys(update).join(", ")}`);
  }
  if (have.deliver_policy !== want.deliver_policy) {
    s.ctx.log.debug(`nats: ${where} exists with deliver_policy ${have.deliver_policy}; source.deliver_policy applies only when it is created`);
  }
}
