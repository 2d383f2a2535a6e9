/**
 * The relay message and its wire envelope (docs/interface.md §6). One Message flows from a source
 * through the pipeline to a sink; `context` carries what templates need and is never sent.
 */
export type Op = "insert" | "delete" | "summary" | "event";

export interface MessageContext {
  pipeline: string;
  /** Forward: the stream table's bare name, its schema and the outbox table name. */
  stream_table?: string;
  schema?: string;
  outbox?: string;
}

/** The JSON body every broker sink sends: exactly these keys, in this order (§6.1). */
export interface Envelope {
  dedup_key: string;
  subject: string;
  payload: unknown;
  op: Op;
  is_full_refresh: boolean;
  /** A PostgreSQL bigint, checked to be ≤ 2^53−1 when decoded. */
  outbox_id: number | null;
  refresh_id: string | null;
}

/** The envelope plus what travels with it inside the relay and is never sent as such. */
export interface Message extends Envelope {
  context: MessageContext;
  /** Reverse: transport headers/attributes of the inbound message (trace context, event type…). */
  headers?: Record<string, string>;
  /** Reverse: the inbox columns besides event_id (= dedup_key), event_type (= subject), payload. */
  inbound?: InboundColumns;
  /** Reverse: why the message can never be written, found at the door (inbound.ts); the inbox sink dead-letters it. */
  refused?: string;
}

/** Inbox columns a reverse source derives per docs/interface.md §6.6. */
export interface InboundColumns {
  source: string | null;
  aggregate_id: string | null;
  trace_id: string | null;
}

export function toEnvelope(m: Message): Envelope {
  return {
    dedup_key: m.dedup_key,
    subject: m.subject,
    payload: m.payload,
    op: m.op,
    is_full_refresh: m.is_full_refresh,
    outbox_id: m.outbox_id,
    refresh_id: m.refresh_id,
  };
}

export const envelopeJson = (m: Message): string => JSON.stringify(toEnvelope(m));

/** `<outbox_table>:<outbox_id>:<row_index>` — depends only on the immutable header row (§6.2). */
export const forwardDedupKey = (outbox: string, outboxId: string, rowIndex: number) => `${outbox}:${outboxId}:${rowIndex}`;

export const DEFAULT_SUBJECT_TEMPLATE = "pgtrickle.{stream_table}.{op}";

/** A `{name}` placeholder of a subject, topic, key or stream-key template. */
const PLACEHOLDER = /\{([A-Za-z0-9_]+)\}/;
const EVERY_PLACEHOLDER = new RegExp(PLACEHOLDER, "g");

/** Whether a template has a placeholder; without one it renders the same for every message. */
export const hasPlaceholder = (template: string) => PLACEHOLDER.test(template);

/** A template cut at its placeholders: literal text, then `{name}` placeholders by name. */
type TemplatePart = string | { name: string };

/**
 * Templates come from pipeline configs, so there are few of them; each is cut once and the
 * parts kept. renderTemplate runs once per message and template, and a regular-expression
 * replace with a callback there cost 2–3 times the CPU of joining the kept parts
 * (bench/per-message.ts). The bound only guards against a caller rendering ever-new templates.
 */
const compiledTemplates = new Map<string, TemplatePart[]>();
const MAX_COMPILED_TEMPLATES = 1000;

function compileTemplate(template: string): TemplatePart[] {
  const parts: TemplatePart[] = [];
  let at = 0;
  for (const match of template.matchAll(EVERY_PLACEHOLDER)) {
    if (match.index > at) parts.push(template.slice(at, match.index));
    parts.push({ name: match[1]! });
    at = match.index + match[0].length;
  }
  if (at < template.length) parts.push(template.slice(at));
  return parts;
}

function templateParts(template: string): TemplatePart[] {
  let parts = compiledTemplates.get(template);
  if (parts === undefined) {
    if (compiledTemplates.size >= MAX_COMPILED_TEMPLATES) compiledTemplates.clear();
    compiledTemplates.set(template, (parts = compileTemplate(template)));
  }
  return parts;
}

/** One placeholder's value for `m`, or `{name}` as written when the name is unknown. */
function templateValue(name: string, m: Message): string {
  switch (name) {
    case "stream_table":
    case "schema":
    case "outbox":
    case "pipeline":
      return m.context[name] ?? "";
    case "op":
      return m.op;
    case "outbox_id":
      return m.outbox_id === null ? "" : String(m.outbox_id);
    case "refresh_id":
      return m.refresh_id ?? "";
  }
  const payload = m.payload;
  // Own fields only: `in` would also find what every object inherits (`{constructor}`,
  // `{toString}`, `{__proto__}`) and render JavaScript built-ins into subjects and keys.
  if (payload && typeof payload === "object" && !Array.isArray(payload) && Object.hasOwn(payload, name)) {
    const value = (payload as Record<string, unknown>)[name];
    if (value === null || value === undefined) return "";
    return typeof value === "object" ? JSON.stringify(value) : String(value);
  }
  return `{${name}}`;
}

/**
 * Renders `{name}` placeholders once per message: {stream_table} {schema} {outbox} {pipeline}
 * {op} {outbox_id} {refresh_id} (empty when null), and any top-level field of the row payload.
 * Unknown placeholders stay as written, so a typo is visible downstream rather than silently empty.
 */
export function renderTemplate(template: string, m: Message): string {
  const parts = templateParts(template);
  if (parts.length === 1 && typeof parts[0] === "string") return template;
  let out = "";
  for (const part of parts) out += typeof part === "string" ? part : templateValue(part.name, m);
  return out;
}

/** True when the template uses row fields (anything but the fixed variables). */
export function templateUsesRowFields(template: string): boolean {
  const fixed = new Set(["stream_table", "schema", "outbox", "pipeline", "op", "outbox_id", "refresh_id"]);
  return [...template.matchAll(EVERY_PLACEHOLDER)].some((m) => !fixed.has(m[1]!));
}
