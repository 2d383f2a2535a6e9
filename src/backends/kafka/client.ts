/**
 * Kafka connections through kafkajs: the client's options (brokers, SASL, TLS, timeouts, its
 * logging routed into the relay's), and what a kafkajs failure means for the relay (the kind of
 * RelayError, secrets scrubbed). Shared by the sink and the source.
 */
import { logLevel, type KafkaConfig, type LogEntry, type SASLOptions } from "kafkajs";
import type { ConsolaInstance } from "consola";
import { configError, errorMessage, permanentError, transientError, type RelayError } from "../../errors.ts";
import { scrubberFor, type Scrub } from "../../redact.ts";
import { describeTlsError, loadTls } from "../../tls.ts";
import { registerKafkaCodecs } from "./codecs.ts";
import type { KafkaConnectionOptions } from "./config.ts";

/**
 * kafkajs 2.2.4 arms `setTimeout(check, throttledUntil - Date.now())` with no throttle in force
 * (RequestQueue.scheduleCheckPendingRequests), a negative delay that the runtime turns into 1 ms
 * with a `TimeoutNegativeWarning` on stderr for every Kafka pipeline — noise that also breaks
 * `--log-format json`. A negative delay means "now" anyway, so it is passed on as 0. Installed
 * when this module loads, i.e. only in a process that runs a Kafka pipeline.
 */
const runtimeSetTimeout = globalThis.setTimeout;
globalThis.setTimeout = Object.assign(
  (handler: (...args: unknown[]) => void, delay?: number, ...rest: unknown[]) => runtimeSetTimeout(handler, typeof delay === "number" && delay < 0 ? 0 : delay, ...rest),
  runtimeSetTimeout,
) as typeof setTimeout;

// kafkajs ships only gzip; snappy, lz4 and zstd are registered once, for sinks and sources.
registerKafkaCodecs();

/** A few quick retries inside kafkajs; longer outages go back to the pipeline's backoff. */
export const KAFKAJS_RETRY = { initialRetryTime: 250, retries: 3, maxRetryTime: 5000 };

/** Removes the SASL password (and TLS key passphrase) from any text kafkajs hands us. */
export const scrubber = (cfg: KafkaConnectionOptions): Scrub => scrubberFor([cfg.sasl_password, cfg.tls_key_password, cfg.ssl_key_password]);

/**
 * kafkajs logs every retry at ERROR; each failure it finally gives up on reaches the pipeline as
 * a classified RelayError anyway, so its ERROR/INFO go to debug, its WARN stays a warning, and
 * only trace-level relay logging turns on kafkajs's per-request DEBUG lines.
 */
export function kafkaLogCreator(log: ConsolaInstance, scrub: (t: string) => string) {
  return () =>
    ({ namespace, level, log: entry }: LogEntry) => {
      const { message, timestamp: _t, logger: _l, stack: _s, ...extra } = entry as LogEntry["log"] & { stack?: string };
      const details = Object.entries(extra)
        .filter(([, value]) => value !== undefined && typeof value !== "object")
        .map(([k, value]) => `${k}=${String(value)}`)
        .join(" ");
      const line = scrub(`kafkajs ${namespace}: ${message}${details ? ` (${details})` : ""}`);
      // A bounded retry count is deliberate (see the producer in sink.ts), so this warning is noise.
      if (level === logLevel.WARN && message.startsWith("Limiting retries for the idempotent producer")) return log.debug(line);
      // A rebalance is routine; the source logs it (and what happens to the batch in hand) itself.
      if (level === logLevel.WARN && message.startsWith("The group is rebalancing")) return log.debug(line);
      if (level === logLevel.WARN) return log.warn(line);
      if (level === logLevel.DEBUG) return log.trace(line);
      return log.debug(line);
    };
}

/** kafkajs's `ssl` option: TLS when security_protocol says so or a `tls*` key asks for it (docs/TLS.md). */
function kafkaTls(cfg: KafkaConnectionOptions): KafkaConfig["ssl"] {
  return loadTls(cfg, "kafka", { implied: cfg.security_protocol === "SSL" || cfg.security_protocol === "SASL_SSL" }) ?? false;
}

export function kafkaClientConfig(cfg: KafkaConnectionOptions, log: ConsolaInstance): KafkaConfig {
  const ssl = kafkaTls(cfg);
  let sasl: SASLOptions | undefined;
  if (cfg.sasl_mechanism && cfg.sasl_username !== undefined && cfg.sasl_password !== undefined) {
    sasl = { mechanism: cfg.sasl_mechanism, username: cfg.sasl_username, password: cfg.sasl_password } as SASLOptions;
  }
  const level = log.level >= 5 ? logLevel.DEBUG : log.level >= 4 ? logLevel.INFO : logLevel.WARN;
  return {
    clientId: cfg.client_id,
    brokers: cfg.brokers,
    ssl,
    sasl,
    connectionTimeout: cfg.connection_timeout_ms,
    authenticationTimeout: cfg.connection_timeout_ms,
    requestTimeout: cfg.request_timeout_ms,
    retry: KAFKAJS_RETRY,
    logLevel: level,
    logCreator: kafkaLogCreator(log, scrubber(cfg)),
  };
}

/** Connects kafkajs clients (producer, admin) one after the other; on a failure disconnects them all, so no half-open one keeps retrying. */
export async function connectAll(clients: { connect(): Promise<void>; disconnect(): Promise<void> }[]): Promise<void> {
  try {
    for (const c of clients) await c.connect();
  } catch (err) {
    await Promise.allSettled(clients.map((c) => c.disconnect()));
    throw err;
  }
}

/**
 * Where a group stands in a partition: its committed offset, or where auto_offset_reset starts a
 * partition without one; never below the low watermark (what retention deleted can never be
 * delivered). `committed` is kafkajs's text, "-1" for none.
 */
export function groupPosition(committed: string, low: string, high: string, reset: "earliest" | "latest"): bigint {
  const c = BigInt(committed);
  const position = c >= 0n ? c : reset === "earliest" ? BigInt(low) : BigInt(high);
  return position < BigInt(low) ? BigInt(low) : position;
}

/** Protocol error types found anywhere in a kafkajs error's cause chain. */
export function kafkaErrorTypes(err: unknown): { types: Set<string>; names: Set<string>; messages: string[] } {
  const types = new Set<string>();
  const names = new Set<string>();
  const messages: string[] = [];
  let e: unknown = err;
  for (let depth = 0; e && depth < 8; depth++) {
    const x = e as { type?: unknown; name?: unknown; message?: unknown; cause?: unknown; errors?: unknown };
    if (typeof x.type === "string") types.add(x.type);
    if (typeof x.name === "string") names.add(x.name);
    if (typeof x.message === "string" && !messages.includes(x.message)) messages.push(x.message);
    if (Array.isArray(x.errors)) for (const inner of x.errors) if (typeof inner?.type === "string") types.add(inner.type);
    e = x.cause === e ? undefined : x.cause;
  }
  return { types, names, messages };
}

const TOO_LARGE = ["MESSAGE_TOO_LARGE", "RECORD_LIST_TOO_LARGE", "INVALID_RECORD"];
const AUTH = ["SASL_AUTHENTICATION_FAILED", "UNSUPPORTED_SASL_MECHANISM", "ILLEGAL_SASL_STATE"];

export type KafkaFailureKind = "too_large" | "invalid_topic" | "auth" | "denied" | "config" | "transient";

/** What a kafkajs failure means for the relay. */
export function classifyKafkaError(err: unknown): { kind: KafkaFailureKind; types: Set<string>; detail: string } {
  const { types, names, messages } = kafkaErrorTypes(err);
  const detail = messages.join(": caused by ") || errorMessage(err);
  const has = (list: string[]) => list.some((t) => types.has(t));
  let kind: KafkaFailureKind = "transient";
  if (has(TOO_LARGE)) kind = "too_large";
  else if (types.has("INVALID_TOPIC_EXCEPTION")) kind = "invalid_topic";
  else if (has(AUTH) || names.has("KafkaJSSASLAuthenticationError")) kind = "auth";
  else if (has(["TOPIC_AUTHORIZATION_FAILED", "CLUSTER_AUTHORIZATION_FAILED", "TRANSACTIONAL_ID_AUTHORIZATION_FAILED", "GROUP_AUTHORIZATION_FAILED"])) kind = "denied";
  else if (has(["INVALID_REQUIRED_ACKS", "UNSUPPORTED_COMPRESSION_TYPE", "UNSUPPORTED_VERSION", "INVALID_SESSION_TIMEOUT", "INVALID_GROUP_ID"])) kind = "config";
  return { kind, types, detail };
}

/** A kafkajs failure as a RelayError: `where` names the operation and the brokers; secrets scrubbed. */
export function kafkaFailure(
  err: unknown,
  where: string,
  cfg: Pick<KafkaConnectionOptions, "security_protocol">,
  scrub: (t: string) => string,
  deniedHint: (types: Set<string>) => string,
): RelayError {
  const tls = describeTlsError(err, where);
  if (tls) return tls;
  const c = classifyKafkaError(err);
  const detail = scrub(c.detail);
  switch (c.kind) {
    case "auth":
      return configError(
        `${where}: authentication failed (${detail}); check security_protocol (${cfg.security_protocol}), sasl_mechanism, sasl_username and sasl_password`,
        undefined,
      );
    case "denied":
      return configError(`${where}: not authorised (${detail})${deniedHint(c.types)}`);
    case "config":
      return configError(`${where}: ${detail}`);
    case "too_large":
    case "invalid_topic":
      return permanentError(`${where}: ${detail}`);
    default:
      return transientError(`${where}: ${detail}`);
  }
}
