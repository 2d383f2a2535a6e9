/**
 * NATS JetStream sink (docs/interface.md §5.3, §6.4): each message is an acked JetStream
 * publish with header `Nats-Msg-Id` = dedup key, so a replayed batch is absorbed by the stream's
 * duplicate window; `Pgtrickle-Full-Refresh: true` marks full-refresh messages.
 */
import {
  headers as natsHeaders,
  type JetStreamClient,
  type JetStreamManager,
  type JetStreamPublishOptions,
  type NatsConnection,
  type StreamInfo,
} from "nats";
import { configError, errorMessage, RelayError, transientError, worseError } from "../../errors.ts";
import { DEFAULT_SUBJECT_TEMPLATE, envelopeJson, renderTemplate, type Message } from "../../message.ts";
import { apiError, natsCode, NatsLink } from "./client.ts";
import { defaultStreamSubjects, filterCovers, invalidSubject, NatsSinkConfig, subjectsOverlap, templatePattern, type NatsSinkOptions } from "./config.ts";
import { inOrderLanes } from "../concurrency.ts";
import { sinkSpec, type BackendContext, type Rejection, type Sink } from "../types.ts";


type Outcome = { ok: true } | { ok: false; reject: string } | { ok: false; error: RelayError };

/** Subjects whose check is remembered; a template with row fields makes them unbounded, so past this the memory starts over. */
const SUBJECT_MEMORY = 1000;

class NatsSink implements Sink {
  readonly describe: string;
  private readonly link: NatsLink;
  private readonly where: string;
  private js: JetStreamClient | null = null;
  /** The connection `js` belongs to. */
  private jsOf: NatsConnection | null = null;
  private readonly encoder = new TextEncoder();
  /** invalidSubject() of each subject seen: subjects repeat (one per stream table and op), and the check showed in the profile. */
  private readonly subjectProblems = new Map<string, string | null>();

  constructor(
    private readonly cfg: NatsSinkOptions,
    private readonly ctx: BackendContext,
  ) {
    this.link = new NatsLink(cfg, ctx, "sink");
    this.where = this.link.where;
    const subject = cfg.subject_template ?? "(subject from the source)";
    this.describe = `nats ${this.link.scheme}${this.where} → ${subject}${cfg.stream ? ` (stream ${cfg.stream})` : ""}`;
  }

  async start(): Promise<void> {
    const nc = await this.connect();
    let jsm: JetStreamManager;
    try {
      jsm = await nc.jetstreamManager();
    } catch (err) {
      throw this.link.fail(err, "JetStream is not available");
    }
    await this.checkStream(jsm);
  }

  private async connect(): Promise<NatsConnection> {
    const nc = await this.link.connect();
    if (this.jsOf !== nc) {
      this.js = nc.jetstream({ timeout: this.cfg.ack_timeout_ms });
      this.jsOf = nc;
    }
    return nc;
  }

  private fail(err: unknown, what: string): RelayError {
    return this.link.fail(err, what);
  }

  /** docs/interface.md §5.3: a stream must capture the subjects, or every publish fails with "no responders". */
  private async checkStream(jsm: JetStreamManager): Promise<void> {
    const template = this.cfg.subject_template;
    const pattern = template ? templatePattern(template) : undefined;
    if (template && invalidSubject(pattern!.replace(/\*/g, "x")) !== null) {
      throw configError(`sink.subject_template "${template}" cannot form a NATS subject: ${invalidSubject(pattern!.replace(/\*/g, "x"))}`);
    }
    const name = this.cfg.stream;
    if (name === undefined) {
      if (pattern === undefined) return; // subjects come from the source: checked at publish time
      const streams: StreamInfo[] = [];
      try {
        for await (const s of jsm.streams.list()) streams.push(s);
      } catch (err) {
        throw this.fail(err, "listing JetStream streams failed");
      }
      if (!streams.some((s) => (s.config.subjects ?? []).some((f) => subjectsOverlap(f, pattern)))) {
        throw configError(
          `no JetStream stream at NATS ${this.where} captures subject_template "${template}" (pattern ${pattern}); ` +
            `create one, or set sink.stream and sink.create_stream: true`,
        );
      }
      return;
    }

    let info: StreamInfo | null = null;
    try {
      info = await jsm.streams.info(name);
    } catch (err) {
      if (apiError(err)?.err_code !== 10059) throw this.fail(err, `reading JetStream stream "${name}" failed`);
    }
    if (info === null) {
      if (!this.cfg.create_stream) {
        throw configError(`JetStream stream "${name}" (sink.stream) does not exist at NATS ${this.where}; create it or set sink.create_stream: true`);
      }
      const subjects = this.cfg.stream_subjects ?? defaultStreamSubjects(template ?? DEFAULT_SUBJECT_TEMPLATE);
      if (this.ctx.check) {
        this.ctx.check.wouldCreate(`JetStream stream "${name}" capturing ${subjects.join(", ")}`);
        return;
      }
      try {
        info = await jsm.streams.add({
          name,
          subjects,
          ...(this.cfg.duplicate_window_seconds !== undefined ? { duplicate_window: this.cfg.duplicate_window_seconds * 1e9 } : {}),
        });
      } catch (err) {
        throw this.fail(err, `creating JetStream stream "${name}" with subjects ${JSON.stringify(subjects)} failed`);
      }
      this.ctx.log.info(`nats: created JetStream stream "${name}" capturing ${subjects.join(", ")}`);
    }
    const filters = info.config.subjects ?? [];
    if (pattern !== undefined) {
      // A pipeline serves one stream table, so a stream capturing only part of the pattern
      // (e.g. pgtrickle.orders.* for pgtrickle.*.*) is normal; only a disjoint one is wrong.
      if (!filters.some((f) => subjectsOverlap(f, pattern))) {
        throw configError(
          `JetStream stream "${name}" (sink.stream) captures ${JSON.stringify(filters)}, none of the subjects of ` +
            `subject_template "${template}" (pattern ${pattern})`,
        );
      }
      if (!filters.some((f) => filterCovers(f, pattern))) {
        this.ctx.log.debug(`nats: stream "${name}" captures only part of ${pattern}; other subjects will fail`);
      }
    }
  }

  async write(messages: Message[]): Promise<Rejection[]> {
    if (messages.length === 0) return [];
    await this.connect();
    const js = this.js!;
    const rejections: Rejection[] = [];
    // Held in an object: the lanes below set it, which flow analysis of a plain `let` cannot see.
    const failure: { error: RelayError | null } = { error: null };

    const publishOne = async (m: Message): Promise<Outcome> => {
      const subject = this.cfg.subject_template ? renderTemplate(this.cfg.subject_template, m) : m.subject;
      const bad = this.subjectProblem(subject);
      if (bad) return { ok: false, reject: `NATS: ${bad}` };
      if (/[\r\n]/.test(m.dedup_key)) return { ok: false, reject: "NATS: the dedup key contains a line break, illegal in a header" };
      const body = this.encoder.encode(envelopeJson(m));
      try {
        const h = natsHeaders();
        if (m.is_full_refresh) h.set("Pgtrickle-Full-Refresh", "true");
        const opts: Partial<JetStreamPublishOptions> = { msgID: m.dedup_key, headers: h, timeout: this.cfg.ack_timeout_ms };
        if (this.cfg.stream) opts.expect = { streamName: this.cfg.stream };
        // A duplicate PubAck means the stream already holds this dedup key: delivered.
        await js.publish(subject, body, opts);
        return { ok: true };
      } catch (err) {
        return this.classifyPublish(err, subject, body.length);
      }
    };

    // Each lane takes the next message in order, so publishes leave in batch order over the one
    // connection and the stream stores each subject's messages in that order.
    const publishInOrder = async (m: Message) => {
      const outcome = await publishOne(m);
      if (outcome.ok) return;
      if ("reject" in outcome) rejections.push({ message: m, error: outcome.reject });
      else failure.error = worseError(failure.error, outcome.error);
    };
    await inOrderLanes(messages, this.cfg.max_in_flight, publishInOrder, () => failure.error !== null);
    if (failure.error !== null) throw failure.error;
    return rejections;
  }

  private subjectProblem(subject: string): string | null {
    let problem = this.subjectProblems.get(subject);
    if (problem === undefined) {
      if (this.subjectProblems.size >= SUBJECT_MEMORY) this.subjectProblems.clear();
      problem = invalidSubject(subject);
      this.subjectProblems.set(subject, problem);
    }
    return problem;
  }

  private classifyPublish(err: unknown, subject: string, size: number): Outcome {
    const code = natsCode(err);
    const api = apiError(err);
    const detail = this.link.scrub(errorMessage(err));
    if (code === "MAX_PAYLOAD_EXCEEDED") {
      return { ok: false, reject: `NATS: message of ${size} bytes exceeds the server's max_payload (${this.link.nc?.info?.max_payload ?? "?"} bytes)` };
    }
    if (code === "BAD_SUBJECT") return { ok: false, reject: `NATS: invalid subject "${subject}"` };
    if (api?.err_code === 10054) return { ok: false, reject: `NATS: message of ${size} bytes exceeds the stream's max_msg_size` };
    if (code === "503") {
      return {
        ok: false,
        error: configError(
          `no JetStream stream at NATS ${this.where} captures subject "${subject}" (no responders)` +
            (this.cfg.stream ? `; stream "${this.cfg.stream}" (sink.stream) does not capture it` : "; set sink.stream / create_stream"),
          err,
        ),
      };
    }
    if (api?.err_code === 10060) {
      return { ok: false, error: configError(`subject "${subject}" is captured by another stream than "${this.cfg.stream}" (sink.stream)`, err) };
    }
    if (api?.err_code === 10059) return { ok: false, error: configError(`JetStream stream for subject "${subject}" not found: ${detail}`, err) };
    if (code === "PERMISSIONS_VIOLATION" || code === "AUTHORIZATION_VIOLATION") {
      return { ok: false, error: configError(`NATS at ${this.where} does not permit publishing to "${subject}": ${detail}`, err) };
    }
    if (code === "TIMEOUT") {
      return { ok: false, error: transientError(`NATS at ${this.where}: no publish acknowledgement for "${subject}" within ${this.cfg.ack_timeout_ms} ms`, err) };
    }
    // Disconnects, a closed connection, stream limits (maximum messages/bytes with discard new),
    // JetStream temporarily unavailable: the batch is retried and the dedup window absorbs repeats.
    return { ok: false, error: transientError(`NATS at ${this.where}: publish to "${subject}" failed: ${detail}`, err) };
  }

  async close(): Promise<void> {
    this.js = null;
    this.jsOf = null;
    await this.link.close();
  }
}

export default sinkSpec({
  type: "nats",
  config: NatsSinkConfig,
  create: (cfg, ctx) => new NatsSink(cfg, ctx),
});
