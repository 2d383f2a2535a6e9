/**
 * NATS JetStream (CONTRACT.md §5.3 nats, §6.4). The sink publishes each message with an acked
 * JetStream publish: header `Nats-Msg-Id` = dedup key, so a replayed batch is absorbed by the
 * stream's duplicate window; `Pgtrickle-Full-Refresh: true` marks full-refresh messages.
 */
import { readFileSync } from "node:fs";
import {
  connect,
  credsAuthenticator,
  headers as natsHeaders,
  type ConnectionOptions,
  type JetStreamClient,
  type JetStreamManager,
  type JetStreamPublishOptions,
  type NatsConnection,
  type StreamInfo,
} from "nats";
import * as v from "valibot";
import { configError, errorMessage, RelayError, transientError } from "../errors.ts";
import { DEFAULT_SUBJECT_TEMPLATE, envelopeJson, renderTemplate, type Message } from "../message.ts";
import { defineBackend, sinkSpec, type BackendContext, type Rejection, type Sink } from "./types.ts";

const positiveInt = (max = Number.MAX_SAFE_INTEGER) => v.pipe(v.number(), v.integer(), v.minValue(1), v.maxValue(max));
const nonEmpty = () => v.pipe(v.string(), v.nonEmpty());

const NatsSinkObject = v.looseObject({
  /** Ignored here: the loader has already chosen this backend by it. */
  type: v.optional(v.string()),
  /**
   * Server URL, e.g. `nats://127.0.0.1:4222`; several servers comma-separated. `tls://` turns TLS
   * on. `nats://user:pass@host:4222` or `nats://token@host:4222` carry credentials (prefer the
   * `user`/`pass`/`token` keys with `${env:…}` secrets).
   */
  url: nonEmpty(),
  /** User name for user/password authentication. */
  user: v.optional(v.string()),
  /** Password for user/password authentication. */
  pass: v.optional(v.string()),
  /** Token authentication. */
  token: v.optional(v.string()),
  /** Path of a `.creds` file (JWT + NKey seed) for decentralised authentication. */
  credentials_file: v.optional(nonEmpty()),
  /** CA certificate file (PEM) to verify the server; setting it turns TLS on. */
  tls_ca: v.optional(nonEmpty()),
  /** Client certificate file (PEM) for mutual TLS; needs `tls_key`. */
  tls_cert: v.optional(nonEmpty()),
  /** Client private key file (PEM) for mutual TLS. */
  tls_key: v.optional(nonEmpty()),
  /**
   * Subject per message, rendered with {stream_table} {schema} {outbox} {pipeline} {op}
   * {outbox_id} {refresh_id} and row fields. Absent: the subject the source rendered from the
   * pipeline's `subject_template` (default `pgtrickle.{stream_table}.{op}`). Alias `subject`.
   */
  subject_template: v.optional(nonEmpty()),
  /** Alias of `subject_template`. */
  subject: v.optional(nonEmpty()),
  /**
   * JetStream stream that must capture the subjects. Checked at start; every publish then
   * expects this stream (a subject captured by another stream is refused). Absent: any stream
   * whose subjects overlap the subject template is accepted.
   */
  stream: v.optional(nonEmpty()),
  /** Create `stream` when it does not exist (an existing stream is never modified). */
  create_stream: v.optional(v.boolean(), false),
  /**
   * Subjects of a stream created by `create_stream`. Default: the literal start of the subject
   * template followed by `>` (`pgtrickle.{stream_table}.{op}` → `pgtrickle.>`), or the template
   * itself when it has no placeholder.
   */
  stream_subjects: v.optional(v.pipe(v.array(nonEmpty()), v.minLength(1))),
  /**
   * Duplicate window of a stream created by `create_stream`, in seconds (server default 120).
   * Replays are deduplicated only within the window of the stream.
   */
  duplicate_window_seconds: v.optional(positiveInt()),
  /** Wait this long for each publish acknowledgement. */
  ack_timeout_ms: v.optional(positiveInt(600_000), 5000),
  /** Give up connecting after this long. */
  connect_timeout_ms: v.optional(positiveInt(600_000), 5000),
  /** Publishes awaiting their acknowledgement at any time. */
  max_in_flight: v.optional(positiveInt(65_536), 256),
});

/** `subject` is an alias of `subject_template` (SQL_REFERENCE example); the canonical key wins. */
export const NatsSinkConfig = v.pipe(
  NatsSinkObject,
  v.transform(({ subject, ...rest }) => ({ ...rest, subject_template: rest.subject_template ?? subject })),
  v.check((c) => !c.create_stream || c.stream !== undefined, "create_stream needs `stream` (the name of the stream to create)"),
  v.check((c) => (c.tls_cert === undefined) === (c.tls_key === undefined), "tls_cert and tls_key go together"),
);

export type NatsSinkOptions = v.InferOutput<typeof NatsSinkConfig>;

// ---------------------------------------------------------------------------------------------
// Connection

interface Target {
  /** host:port of each server, the only form that reaches a log line or an error. */
  hostports: string[];
  tls: boolean;
  user?: string;
  pass?: string;
  token?: string;
}

/** Splits the URL list into host:port entries and credentials, so no secret rides in `servers`. */
export function parseNatsUrl(url: string): Target {
  const target: Target = { hostports: [], tls: false };
  for (const raw of url.split(",").map((s) => s.trim()).filter(Boolean)) {
    const withScheme = /^[a-z][a-z0-9+.-]*:\/\//i.test(raw) ? raw : `nats://${raw}`;
    let u: URL;
    try {
      u = new URL(withScheme);
    } catch {
      throw configError(`sink.url: "${describeRawServer(raw)}" is not a NATS URL (expected nats://host:4222)`);
    }
    const scheme = u.protocol.replace(/:$/, "").toLowerCase();
    if (scheme !== "nats" && scheme !== "tls") throw configError(`sink.url: scheme ${scheme}:// is not supported (use nats:// or tls://)`);
    if (scheme === "tls") target.tls = true;
    if (!u.hostname) throw configError(`sink.url: "${describeRawServer(raw)}" has no host`);
    const host = u.hostname.includes(":") && !u.hostname.startsWith("[") ? `[${u.hostname}]` : u.hostname;
    target.hostports.push(`${host}:${u.port || "4222"}`);
    if (u.username && u.password) {
      target.user = decodeURIComponent(u.username);
      target.pass = decodeURIComponent(u.password);
    } else if (u.username) {
      target.token = decodeURIComponent(u.username);
    }
  }
  if (target.hostports.length === 0) throw configError("sink.url: no server given");
  return target;
}

/** A server entry without anything before `@`, for error messages about unparseable URLs. */
const describeRawServer = (raw: string) => raw.replace(/^([^/]*\/\/)?[^@/]*@/, "$1***@");

/** Every secret the options hold, so driver messages can be scrubbed before they are shown. */
function secretsOf(cfg: NatsSinkOptions, target: Target): string[] {
  return [cfg.pass, cfg.token, target.pass, target.token].filter((s): s is string => !!s && s.length >= 3);
}

function scrub(text: string, secrets: string[]): string {
  let out = text.replace(/(\w+:\/\/)[^@\s/]+@/g, "$1***@");
  for (const s of secrets) out = out.split(s).join("***");
  return out;
}

function connectionOptions(cfg: NatsSinkOptions, target: Target, ctx: BackendContext): ConnectionOptions {
  const opts: ConnectionOptions = {
    servers: target.hostports,
    name: `pgtrickle-relay:${ctx.pipeline}`,
    timeout: cfg.connect_timeout_ms,
    // The client keeps reconnecting by itself; publishes meanwhile time out as transient errors.
    maxReconnectAttempts: -1,
    reconnectTimeWait: 1000,
  };
  const user = cfg.user ?? target.user;
  const pass = cfg.pass ?? target.pass;
  const token = cfg.token ?? target.token;
  if (user !== undefined) {
    opts.user = user;
    opts.pass = pass ?? "";
  } else if (token !== undefined) {
    opts.token = token;
  }
  if (cfg.credentials_file) {
    let creds: Uint8Array;
    try {
      creds = readFileSync(cfg.credentials_file);
    } catch (err) {
      throw configError(`sink.credentials_file: ${cfg.credentials_file} cannot be read (${(err as { code?: string }).code ?? "error"})`);
    }
    opts.authenticator = credsAuthenticator(creds);
  }
  if (target.tls || cfg.tls_ca || cfg.tls_cert) {
    const tls: NonNullable<ConnectionOptions["tls"]> = {};
    for (const [key, file] of [["tls_ca", cfg.tls_ca], ["tls_cert", cfg.tls_cert], ["tls_key", cfg.tls_key]] as const) {
      if (file === undefined) continue;
      let pem: string;
      try {
        pem = readFileSync(file, "utf8");
      } catch (err) {
        throw configError(`sink.${key}: ${file} cannot be read (${(err as { code?: string }).code ?? "error"})`);
      }
      if (key === "tls_ca") tls.ca = pem;
      else if (key === "tls_cert") tls.cert = pem;
      else tls.key = pem;
    }
    opts.tls = tls;
  }
  return opts;
}

function natsCode(err: unknown): string | undefined {
  const code = (err as { code?: unknown })?.code;
  return typeof code === "string" ? code : undefined;
}

/** The JetStream API error (`{code, err_code, description}`) a publish or manager call got back. */
function apiError(err: unknown): { code?: number; err_code?: number; description?: string } | undefined {
  return (err as { api_error?: { code?: number; err_code?: number; description?: string } })?.api_error;
}

// ---------------------------------------------------------------------------------------------
// Subjects

const PLACEHOLDER = /\{[A-Za-z0-9_]+\}/;

/** The template as a subject pattern: every token holding a placeholder becomes `*`. */
export function templatePattern(template: string): string {
  return template
    .split(".")
    .map((t) => (PLACEHOLDER.test(t) ? "*" : t))
    .join(".");
}

/** Subjects for a created stream: the literal leading tokens plus `>` (placeholder values may hold dots). */
export function defaultStreamSubjects(template: string): string[] {
  const tokens = template.split(".");
  const firstVariable = tokens.findIndex((t) => PLACEHOLDER.test(t));
  if (firstVariable === -1) return [template];
  if (firstVariable === 0) {
    throw configError(`sink.create_stream: subject template "${template}" starts with a placeholder; set sink.stream_subjects`);
  }
  return [[...tokens.slice(0, firstVariable), ">"].join(".")];
}

/** True when every subject that `pattern` matches is also matched by `filter`. */
export function filterCovers(filter: string, pattern: string): boolean {
  const f = filter.split(".");
  const p = pattern.split(".");
  for (let i = 0; i < f.length; i++) {
    if (f[i] === ">") return i < p.length;
    if (i >= p.length || p[i] === ">") return false;
    if (f[i] !== "*" && f[i] !== p[i]) return false;
  }
  return f.length === p.length;
}

/** True when some subject is matched by both patterns. */
export function subjectsOverlap(a: string, b: string): boolean {
  const x = a.split(".");
  const y = b.split(".");
  for (let i = 0; ; i++) {
    const s = x[i];
    const t = y[i];
    if (s === undefined || t === undefined) return s === t;
    if (s === ">" || t === ">") return true;
    if (s !== "*" && t !== "*" && s !== t) return false;
  }
}

/** Why a rendered subject cannot be published to, or null when it can (CONTRACT §6.3). */
export function invalidSubject(subject: string): string | null {
  if (subject.length === 0) return "the subject is empty";
  if (/[\s\u0000]/.test(subject)) return `subject "${subject}" contains whitespace`;
  const tokens = subject.split(".");
  if (tokens.some((t) => t.length === 0)) return `subject "${subject}" has an empty token`;
  if (tokens.some((t) => t === "*" || t === ">")) return `subject "${subject}" contains a wildcard token`;
  return null;
}

// ---------------------------------------------------------------------------------------------
// Sink

/** The error a failed batch reports: a config error wins, since retrying cannot cure it. */
const worse = (a: RelayError | null, b: RelayError): RelayError => (a === null || (b.kind === "config" && a.kind !== "config") ? b : a);

type Outcome = { ok: true } | { ok: false; reject: string } | { ok: false; error: RelayError };

class NatsSink implements Sink {
  readonly describe: string;
  private readonly target: Target;
  private readonly secrets: string[];
  private readonly where: string;
  private nc: NatsConnection | null = null;
  private js: JetStreamClient | null = null;
  private connecting: Promise<void> | null = null;
  private readonly encoder = new TextEncoder();

  constructor(
    private readonly cfg: NatsSinkOptions,
    private readonly ctx: BackendContext,
  ) {
    this.target = parseNatsUrl(cfg.url);
    this.secrets = secretsOf(cfg, this.target);
    this.where = this.target.hostports.join(",");
    const subject = cfg.subject_template ?? "(subject from the source)";
    this.describe = `nats ${this.target.tls ? "tls://" : "nats://"}${this.where} → ${subject}${cfg.stream ? ` (stream ${cfg.stream})` : ""}`;
  }

  async start(): Promise<void> {
    await this.connect();
    let jsm: JetStreamManager;
    try {
      jsm = await this.nc!.jetstreamManager();
    } catch (err) {
      throw this.fail(err, "JetStream is not available");
    }
    await this.checkStream(jsm);
  }

  private async connect(): Promise<void> {
    if (this.nc && !this.nc.isClosed()) return;
    // Concurrent callers share one attempt instead of opening several connections.
    this.connecting ??= this.open().finally(() => {
      this.connecting = null;
    });
    return this.connecting;
  }

  private async open(): Promise<void> {
    let nc: NatsConnection;
    try {
      nc = await connect(connectionOptions(this.cfg, this.target, this.ctx));
    } catch (err) {
      throw this.connectFailure(err);
    }
    this.nc = nc;
    this.js = nc.jetstream({ timeout: this.cfg.ack_timeout_ms });
    void this.watch(nc);
  }

  /** Logs what the client does by itself (reconnects, async errors); never holds a secret. */
  private async watch(nc: NatsConnection): Promise<void> {
    try {
      for await (const s of nc.status()) {
        if (s.type === "disconnect") this.ctx.log.warn(`nats: disconnected from ${s.data}; reconnecting`);
        else if (s.type === "reconnect") this.ctx.log.info(`nats: reconnected to ${s.data}`);
        else if (s.type === "error") this.ctx.log.warn(`nats: ${scrub(errorMessage(s.data), this.secrets)}`);
      }
    } catch {
      /* the status iterator ends with the connection */
    }
  }

  private connectFailure(err: unknown): RelayError {
    if (err instanceof RelayError) return err;
    const code = natsCode(err);
    const detail = scrub(errorMessage(err), this.secrets);
    switch (code) {
      case "CONNECTION_REFUSED":
        return transientError(`cannot connect to NATS at ${this.where}: connection refused — is the server running there?`, err);
      case "TIMEOUT":
      case "CONNECTION_TIMEOUT":
        return transientError(`cannot connect to NATS at ${this.where}: no answer within ${this.cfg.connect_timeout_ms} ms`, err);
      case "AUTHORIZATION_VIOLATION":
      case "AUTHENTICATION_EXPIRED":
      case "BAD_AUTHENTICATION":
      case "BAD_CREDS":
      case "ACCOUNT_EXPIRED":
        return configError(`NATS at ${this.where} refused the credentials (${code}): check sink.user/pass/token/credentials_file`, err);
      case "TLS":
        return configError(`TLS with NATS at ${this.where} failed: ${detail} (check sink.url and sink.tls_*)`, err);
    }
    // Node socket errors (ENOTFOUND, EHOSTUNREACH, TLS handshake…) arrive with their own codes.
    const sys = (err as { code?: string })?.code;
    if (sys === "ENOTFOUND" || sys === "EAI_AGAIN") return transientError(`cannot connect to NATS at ${this.where}: host not found (${sys})`, err);
    if (/certificate|self[- ]signed|SSL|TLS/i.test(detail)) {
      return configError(`TLS with NATS at ${this.where} failed: ${detail} (check sink.url and sink.tls_*)`, err);
    }
    return transientError(`cannot connect to NATS at ${this.where}: ${detail}`, err);
  }

  /** A failure of a manager call, classified like a publish failure but never a rejection. */
  private fail(err: unknown, what: string): RelayError {
    if (err instanceof RelayError) return err;
    const code = natsCode(err);
    const detail = scrub(errorMessage(err), this.secrets);
    if (code === "503") return configError(`${what} at NATS ${this.where}: is the server started with JetStream (-js)?`, err);
    if (code === "PERMISSIONS_VIOLATION") return configError(`${what} at NATS ${this.where}: ${detail}`, err);
    if (apiError(err)) return configError(`${what} at NATS ${this.where}: ${detail}`, err);
    return transientError(`${what} at NATS ${this.where}: ${detail}`, err);
  }

  /** CONTRACT §5.3: a stream must capture the subjects, or every publish fails with "no responders". */
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
    let next = 0;

    const publishOne = async (m: Message): Promise<Outcome> => {
      const subject = this.cfg.subject_template ? renderTemplate(this.cfg.subject_template, m) : m.subject;
      const bad = invalidSubject(subject);
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
    const lane = async () => {
      while (failure.error === null && next < messages.length) {
        const m = messages[next++]!;
        const outcome = await publishOne(m);
        if (outcome.ok) continue;
        if ("reject" in outcome) rejections.push({ message: m, error: outcome.reject });
        else failure.error = worse(failure.error, outcome.error);
      }
    };
    await Promise.all(Array.from({ length: Math.min(this.cfg.max_in_flight, messages.length) }, lane));
    if (failure.error !== null) throw failure.error;
    return rejections;
  }

  private classifyPublish(err: unknown, subject: string, size: number): Outcome {
    const code = natsCode(err);
    const api = apiError(err);
    const detail = scrub(errorMessage(err), this.secrets);
    if (code === "MAX_PAYLOAD_EXCEEDED") {
      return { ok: false, reject: `NATS: message of ${size} bytes exceeds the server's max_payload (${this.nc?.info?.max_payload ?? "?"} bytes)` };
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
    const nc = this.nc;
    this.nc = null;
    this.js = null;
    if (nc && !nc.isClosed()) await nc.close().catch(() => {});
  }
}

export default defineBackend({
  type: "nats",
  sink: sinkSpec({
    config: NatsSinkConfig,
    create: (cfg, ctx) => new NatsSink(cfg, ctx),
  }),
});
