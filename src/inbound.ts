/**
 * The mapping every reverse source shares (docs/interface.md §6.5, §6.6): raw inbound data → a
 * Message whose dedup_key becomes the inbox `event_id`, subject the `event_type`, payload the
 * `payload`, and `inbound` the `source` / `aggregate_id` / `trace_id` columns.
 *
 * A source supplies what only it knows (its type, where it read from, its producer key, its
 * event-type candidate, its coordinates for a synthesized key); everything else is decided here,
 * so the rules are the same for NATS, Kafka, HTTP, Redis, SQS, RabbitMQ and stdin/file.
 */
import { createHash } from "node:crypto";
import * as v from "valibot";
import { isNonEmptyString, nonEmptyString, positiveIntOption } from "./backends/schema.ts";
import type { BackendContext } from "./backends/types.ts";
import type { Message } from "./message.ts";

/**
 * Keys shared by every reverse source (docs/interface.md §5.4). Spread into a source's schema:
 * `v.looseObject({ ...reverseSourceKeys, url: …, … })`.
 */
export const reverseSourceKeys = {
  event_type: v.pipe(
    v.optional(nonEmptyString()),
    v.description("Event type when neither the body nor the transport names one; default: the source type."),
  ),
  event_type_field: v.pipe(
    v.optional(nonEmptyString(), "event_type"),
    v.description("Body field holding the event type; a string there wins over everything else."),
  ),
  batch_size: positiveIntOption(100, "Most messages handed to the inbox in one transaction."),
  poll_interval_ms: positiveIntOption(1000, "Idle poll interval, for sources that poll."),
};

/**
 * Messages per batch of a reverse source that reads ahead (`Source.readAhead`): its `batch_size`,
 * but at most the pipeline's `ctx.batchLimit` (a third of `--sink-max-inflight`), so that the
 * batches in hand at once fit that window (docs/PIPELINE.md).
 */
export function readAheadBatchSize(batchSize: number, ctx: BackendContext): number {
  return Math.min(batchSize, ctx.batchLimit ?? batchSize);
}

type JsonObject = Record<string, unknown>;

export const isJsonObject = (x: unknown): x is JsonObject => typeof x === "object" && x !== null && !Array.isArray(x);

/** A decoded body: `json` tells a parsed JSON value from a fallback (string or base64 object). */
export interface DecodedBody {
  payload: unknown;
  json: boolean;
  /** JSON nested deeper than MAX_JSON_DEPTH: the payload is the text, and the message is refused. */
  tooDeep?: boolean;
}

/**
 * Deepest nesting of arrays and objects a reverse message's payload may have. PostgreSQL parses
 * jsonb recursively and refuses a value nested about 12,000 levels deep at the default
 * `max_stack_depth` with SQLSTATE 54001 (docs/LIMITS.md); 1,000 keeps well clear of that inside
 * the batch statement and of every consumer that walks the payload recursively, and is the
 * default of other JSON parsers (Jackson). Deeper bodies are refused at the door (parseJson):
 * dead-lettered by the inbox sink, answered 400 by the HTTP receiver.
 */
export const MAX_JSON_DEPTH = 1000;

/** True when `value` nests arrays/objects more than `limit` levels deep (iterative: a deep value cannot overflow the stack). */
export function exceedsJsonDepth(value: unknown, limit = MAX_JSON_DEPTH): boolean {
  const stack: { value: unknown; depth: number }[] = [{ value, depth: 0 }];
  while (stack.length > 0) {
    const { value: v, depth } = stack.pop()!;
    if (typeof v !== "object" || v === null) continue;
    if (depth + 1 > limit) return true;
    for (const child of Array.isArray(v) ? v : Object.values(v)) {
      if (typeof child === "object" && child !== null) stack.push({ value: child, depth: depth + 1 });
    }
  }
  return false;
}

const strictUtf8 = new TextDecoder("utf-8", { fatal: true });

/** Valid UTF-8 text, or null. A leading byte-order mark is dropped. */
export function utf8OrNull(bytes: Uint8Array): string | null {
  try {
    return strictUtf8.decode(bytes);
  } catch {
    return null;
  }
}

/**
 * Body → payload, never null for a non-JSON body (docs/interface.md §6.6): parsed JSON when it
 * parses; otherwise the text as a JSON string when it is valid UTF-8; otherwise `{"base64": "…"}`.
 */
export function decodeBody(body: Uint8Array | string): DecodedBody {
  const text = typeof body === "string" ? body : utf8OrNull(body);
  if (text === null) return { payload: { base64: Buffer.from(body as Uint8Array).toString("base64") }, json: false };
  const parsed = parseJson(text);
  if (parsed.ok) return { payload: parsed.value, json: true };
  return parsed.tooDeep ? { payload: text, json: false, tooDeep: true } : { payload: text, json: false };
}

export const TOO_DEEP = `JSON nested deeper than ${MAX_JSON_DEPTH} levels`;

/**
 * JSON.parse without throwing; a leading BOM is ignored. A value nested deeper than
 * MAX_JSON_DEPTH is refused (`tooDeep`) rather than returned: past some 35,000 levels even
 * JSON.stringify overflows the stack, so such a value could not be written anywhere, not even
 * to the dead-letter table (docs/LIMITS.md).
 */
export function parseJson(text: string): { ok: true; value: unknown } | { ok: false; error: string; tooDeep?: true } {
  let value: unknown;
  try {
    value = JSON.parse(text.charCodeAt(0) === 0xfeff ? text.slice(1) : text);
  } catch (err) {
    // The parser's own stack gave out: nested far deeper still.
    if (err instanceof RangeError) return { ok: false, error: TOO_DEEP, tooDeep: true };
    return { ok: false, error: err instanceof Error ? err.message : String(err) };
  }
  return nestedTooDeep(text, value) ? { ok: false, error: TOO_DEEP, tooDeep: true } : { ok: true, value };
}

/**
 * Whether `value`, parsed from (or serialized as) `text`, nests deeper than MAX_JSON_DEPTH.
 * That takes more than MAX_JSON_DEPTH opening brackets, and so more than twice as many
 * characters: the walk is left to texts that have them (a batch of a hundred flat events has a
 * hundred or so, and skips it).
 */
export function nestedTooDeep(text: string, value: unknown): boolean {
  return text.length > 2 * MAX_JSON_DEPTH && openingBrackets(text, MAX_JSON_DEPTH) > MAX_JSON_DEPTH && exceedsJsonDepth(value);
}

/**
 * The `{` and `[` in `text`, counted up to `limit` + 1; those inside strings count too, which
 * only makes it a looser upper bound of the nesting depth.
 */
function openingBrackets(text: string, limit: number): number {
  let count = 0;
  for (const bracket of ["{", "["]) {
    for (let at = text.indexOf(bracket); at >= 0 && count <= limit; at = text.indexOf(bracket, at + 1)) count++;
  }
  return count;
}

/** A top-level field of an object body, when it is a non-empty string. */
export function bodyString(payload: unknown, field: string): string | null {
  if (!isJsonObject(payload)) return null;
  const value = payload[field];
  return isNonEmptyString(value) ? value : null;
}

export interface EventTypeRule {
  /** `event_type_field` (default `event_type`). */
  field: string;
  /** The source's own candidate: NATS subject, Kafka `event-type` header or topic, … */
  candidate?: string | null;
  /** The configured `event_type`. */
  configured?: string | null;
  /** Final fallback: the source type (`nats`, `kafka`, `file`, …). */
  sourceType: string;
}

/** body[event_type_field] if a string, else the source's candidate, else `event_type`, else the source type. */
export function eventTypeOf(payload: unknown, rule: EventTypeRule): string {
  return bodyString(payload, rule.field) ?? (isNonEmptyString(rule.candidate) ? rule.candidate : null) ?? (isNonEmptyString(rule.configured) ? rule.configured : null) ?? rule.sourceType;
}

/** body `source` if a string, else `<source_type>:<topic/subject/stream/queue/path>` (just the type when there is no place). */
export function inboundSourceOf(payload: unknown, sourceType: string, where?: string | null): string {
  return bodyString(payload, "source") ?? (isNonEmptyString(where) ? `${sourceType}:${where}` : sourceType);
}

/** body `aggregate_id` (string, or number as text), else the source's fallback (e.g. the Kafka record key), else null. */
export function aggregateIdOf(payload: unknown, fallback?: string | null): string | null {
  if (isJsonObject(payload)) {
    const value = payload.aggregate_id;
    if (isNonEmptyString(value)) return value;
    if (typeof value === "number" && Number.isFinite(value)) return String(value);
  }
  return isNonEmptyString(fallback) ? fallback : null;
}

// version "-" trace-id "-" parent-id "-" flags, lower-case hex; later versions may append fields.
const TRACEPARENT = /^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$/;

/**
 * The trace-id of a W3C `traceparent` value, or null when the value is not a valid one: version
 * `ff` is forbidden, version `00` has exactly four fields, all-zero trace or parent ids are invalid.
 */
export function traceIdFromTraceparent(value: string | null | undefined): string | null {
  if (typeof value !== "string") return null;
  const m = TRACEPARENT.exec(value.trim());
  if (!m) return null;
  const [, version, traceId, parentId, , rest] = m;
  if (version === "ff") return null;
  if (version === "00" && rest !== undefined) return null;
  if (/^0+$/.test(traceId!) || /^0+$/.test(parentId!)) return null;
  return traceId!;
}

/** A header by name, case-insensitively (HTTP, Kafka and AMQP headers differ in case conventions). */
export function headerValue(headers: Record<string, string> | undefined, name: string): string | null {
  if (!headers) return null;
  if (name in headers) return headers[name] ?? null;
  const lower = name.toLowerCase();
  for (const k in headers) if (k.toLowerCase() === lower) return headers[k] ?? null;
  return null;
}

/**
 * trace-id of a valid W3C `traceparent` header/attribute, else body `trace_id`, else the trace-id
 * of a body `traceparent` field (a file line or a broker body can carry the context itself).
 */
export function traceIdOf(headers: Record<string, string> | undefined, payload: unknown): string | null {
  return traceIdFromTraceparent(headerValue(headers, "traceparent")) ?? bodyString(payload, "trace_id") ?? traceIdFromTraceparent(bodyString(payload, "traceparent"));
}

/** Body fields that carry a producer's dedup key, in order of preference. */
export const BODY_DEDUP_FIELDS = ["dedup_key", "pgt_dedup_key"] as const;

/** The first non-empty string among a body's dedup fields (used verbatim), or null. */
export function bodyDedupKey(payload: unknown, fields: readonly string[] = BODY_DEDUP_FIELDS): string | null {
  for (const f of fields) {
    const key = bodyString(payload, f);
    if (key !== null) return key;
  }
  return null;
}

export function sha256Hex(data: Uint8Array | string): string {
  return createHash("sha256").update(data).digest("hex");
}

/**
 * A producer-supplied key verbatim (so forward relay → broker → reverse relay keeps the original
 * key), else the synthesized one. Synthesized keys are built from broker coordinates or content
 * and carry a source prefix (`kafka:…`, `file:…`, `http:<sha256>`); never random (§6.5).
 */
export function reverseDedupKey(producerKey: string | null | undefined, synthesized: string | (() => string)): string {
  if (isNonEmptyString(producerKey)) return producerKey;
  const key = typeof synthesized === "function" ? synthesized() : synthesized;
  if (!isNonEmptyString(key)) throw new Error("a synthesized dedup key must not be empty");
  return key;
}

export interface InboundInput {
  pipeline: string;
  /** The source type, as a name: `nats`, `kafka`, `http`, `redis`, `sqs`, `rabbitmq`, `stdin`, `file`. */
  sourceType: string;
  /** Topic / subject / stream / queue / path the message came from (for `inbound.source`). */
  where?: string | null;
  /** The raw body, or a body the source already decoded with decodeBody(). */
  body: Uint8Array | string | DecodedBody;
  /** Transport headers/attributes (trace context, event type…); kept on the message. */
  headers?: Record<string, string>;
  /** The producer's key (header, property, body field…), used verbatim when present. */
  producerKey?: string | null;
  /** Prefixed key from coordinates/content, used when there is no producer key. */
  synthesizedKey: string | (() => string);
  /** The source-specific event type (§6.6), tried after the body field. */
  eventTypeCandidate?: string | null;
  /** aggregate_id when the body has none (e.g. the Kafka record key). */
  aggregateIdFallback?: string | null;
  config: { event_type?: string | undefined; event_type_field: string };
}

const isDecoded = (b: InboundInput["body"]): b is DecodedBody => typeof b === "object" && b !== null && !(b instanceof Uint8Array) && "json" in b;

/** Builds the reverse Message: op `event`, never full refresh, no outbox id, no refresh id. */
export function inboundMessage(input: InboundInput): Message {
  const decoded = isDecoded(input.body) ? input.body : decodeBody(input.body);
  const { payload } = decoded;
  const message: Message = {
    dedup_key: reverseDedupKey(input.producerKey, input.synthesizedKey),
    subject: eventTypeOf(payload, {
      field: input.config.event_type_field,
      candidate: input.eventTypeCandidate,
      configured: input.config.event_type,
      sourceType: input.sourceType,
    }),
    payload,
    op: "event",
    is_full_refresh: false,
    outbox_id: null,
    refresh_id: null,
    context: { pipeline: input.pipeline },
    inbound: {
      source: inboundSourceOf(payload, input.sourceType, input.where),
      aggregate_id: aggregateIdOf(payload, input.aggregateIdFallback),
      trace_id: traceIdOf(input.headers, payload),
    },
  };
  if (input.headers && Object.keys(input.headers).length > 0) message.headers = input.headers;
  if (decoded.tooDeep) message.refused = TOO_DEEP;
  return message;
}
