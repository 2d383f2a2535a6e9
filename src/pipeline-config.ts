import * as v from "valibot";
import type { Direction } from "./backends/types.ts";
import { configError } from "./errors.ts";
import { nearest } from "./cli.ts";
import { isSecretKey, redact, registerConfigSecrets } from "./redact.ts";
import { resolveSecrets } from "./secrets.ts";

/** A catalog row as `list_relay_configs()` returns it. */
export interface CatalogRow {
  name: string;
  direction: Direction;
  enabled: boolean;
  config: unknown;
}

/** A pipeline config normalised to the nested shape of docs/interface.md §5.1. */
export interface PipelineSpec {
  name: string;
  direction: Direction;
  enabled: boolean;
  sourceType: string;
  source: Record<string, unknown>;
  sinkType: string;
  sink: Record<string, unknown>;
  /** Non-fatal remarks for the log: deprecated flat keys, unknown keys. */
  warnings: string[];
  /** Unknown keys of either side, with a suggestion when one is near (`check` fails on them). */
  unknownKeys: string[];
  /** What a message the sink will never accept does to the pipeline (PIPELINE_KEYS). */
  onPermanentError: "dead_letter" | "halt";
}

/**
 * Keys about the pipeline as a whole rather than one system: accepted at top level, in `source`
 * or in `sink` (`source` winning), validated here once for every backend.
 */
export const PipelineKeys = v.object({
  on_permanent_error: v.optional(
    v.pipe(
      v.picklist(["dead_letter", "halt"]),
      v.description(
        "A message the destination will never accept (too large, invalid name, HTTP 4xx…): `dead_letter` writes it to pgtrickle.relay_dead_letters and moves on; `halt` fails the pipeline instead.",
      ),
    ),
    "dead_letter",
  ),
});

/** Pipeline tuning keys: allowed at top level or inside `source`, `source` winning (§5.1). */
const TUNING_KEYS = [
  "batch_size",
  "poll_interval_ms",
  "subject_template",
  "claim_check_fetch_size",
  "release_claim_check",
  "on_decode_error",
  "on_permanent_error",
  "summary_messages",
  "keep_internal_columns",
  "auto_enable_outbox",
  "max_batch_messages",
];

/** Flat README-style keys → their nested home (§5.1). `*` = the broker side of the pipeline. */
const FLAT_ALIASES: Record<string, [side: "source" | "sink" | "*", key: string]> = {
  stream_table: ["source", "outbox"],
  inbox_table: ["sink", "inbox"],
  nats_url: ["*", "url"],
  nats_stream: ["*", "stream"],
  nats_consumer: ["*", "durable_name"],
  kafka_brokers: ["*", "brokers"],
  kafka_topic: ["*", "topic"],
  kafka_key_field: ["*", "key_field"],
  kafka_group_id: ["*", "group_id"],
  webhook_url: ["*", "url"],
  webhook_headers: ["*", "headers"],
  webhook_bind: ["*", "listen_addr"],
  webhook_path: ["*", "path"],
  redis_url: ["*", "url"],
  redis_stream: ["*", "stream_key"],
  sqs_queue_url: ["*", "queue_url"],
  sqs_region: ["*", "region"],
};

const isObject = (x: unknown): x is Record<string, unknown> => typeof x === "object" && x !== null && !Array.isArray(x);

/** Pipeline names (README "Pipeline names"); catalog.sql's set_relay_outbox/inbox check the same. */
export const PIPELINE_NAME = /^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$/;

export function pipelineNameProblem(name: string): string | null {
  return PIPELINE_NAME.test(name)
    ? null
    : `pipeline name ${JSON.stringify(name)} is not valid: 1-128 characters, letters, digits, "_", "-", ".", ":", starting with a letter or digit`;
}

/** Turns a catalog row into a PipelineSpec, or throws a config error naming the pipeline and key. */
export function normalizePipeline(row: CatalogRow): PipelineSpec {
  const where = `pipeline '${row.name}'`;
  const badName = pipelineNameProblem(row.name);
  if (badName) throw configError(badName);
  if (!isObject(row.config)) throw configError(`${where}: config must be a JSON object`);
  registerConfigSecrets(row.config);
  const config = row.config;
  const warnings: string[] = [];
  const source: Record<string, unknown> = isObject(config.source) ? { ...config.source } : {};
  const sink: Record<string, unknown> = isObject(config.sink) ? { ...config.sink } : {};
  const brokerSide = row.direction === "forward" ? sink : source;

  for (const [flat, [side, key]] of Object.entries(FLAT_ALIASES)) {
    if (!(flat in config)) continue;
    const target = side === "source" ? source : side === "sink" ? sink : brokerSide;
    const targetName = target === source ? "source" : "sink";
    if (!(key in target)) target[key] = config[flat];
    warnings.push(`flat key '${flat}' is deprecated; use '${targetName}.${key}'`);
  }
  for (const key of TUNING_KEYS) {
    if (key in config && !(key in source)) source[key] = config[key];
  }

  const sourceType = pickType(where, "source", config.source_type, source.type, row.direction === "forward" ? "outbox" : undefined);
  const sinkType = pickType(where, "sink", config.sink_type, sink.type, row.direction === "reverse" ? "pg-inbox" : undefined);
  delete source.type;
  delete sink.type;
  const onPermanentError = pipelineKeys(where, { on_permanent_error: source.on_permanent_error ?? sink.on_permanent_error }).on_permanent_error;
  return { name: row.name, direction: row.direction, enabled: row.enabled, sourceType, source, sinkType, sink, warnings, unknownKeys: [], onPermanentError };
}

function pipelineKeys(where: string, raw: Record<string, unknown>): v.InferOutput<typeof PipelineKeys> {
  const result = v.safeParse(PipelineKeys, raw);
  if (result.success) return result.output;
  throw configError(`${where}: ${result.issues.map((i) => describeIssue(i, "pipeline")).join("; ")}`);
}

function pickType(where: string, side: string, outer: unknown, inner: unknown, fallback: string | undefined): string {
  const a = typeof outer === "string" && outer !== "" ? outer : undefined;
  const b = typeof inner === "string" && inner !== "" ? inner : undefined;
  if (a && b && a !== b) throw configError(`${where}: ${side}_type '${a}' and ${side}.type '${b}' disagree`);
  const type = b ?? a ?? fallback;
  if (!type) throw configError(`${where}: ${side}.type is missing`);
  return type;
}

/** The entries an object schema declares, looking through pipes and optional wrappers. */
export function schemaEntries(schema: v.GenericSchema): Record<string, v.GenericSchema> | undefined {
  const s = schema as unknown as { entries?: Record<string, v.GenericSchema>; pipe?: v.GenericSchema[]; wrapped?: v.GenericSchema };
  if (s.entries) return s.entries;
  if (s.pipe?.[0] && s.pipe[0] !== schema) return schemaEntries(s.pipe[0]);
  if (s.wrapped) return schemaEntries(s.wrapped);
  return undefined;
}

/** What a schema expected, in words: `a string`, `one of "a", "b"`, `true or false` … */
function expectedWords(expected: string | null): string {
  if (!expected) return "something else";
  const words: Record<string, string> = { string: "a string", number: "a number", boolean: "true or false", Array: "a list", Object: "an object", undefined: "absent" };
  const parts = expected.replace(/^\((.*)\)$/, "$1").split(" | ");
  if (parts.every((p) => p.startsWith('"'))) return `one of ${parts.join(", ")}`;
  return parts.map((p) => words[p] ?? p).join(" or ");
}

/** A value for an error message: short, never one of a secret-named key, redacted anyway. */
function shownValue(key: string, value: unknown): string {
  if (isSecretKey(key)) return "(hidden)";
  const text = JSON.stringify(value) ?? String(value);
  return redact(text.length > 60 ? `${text.slice(0, 59)}…` : text);
}

/** One valibot issue in plain words: the key, what it must be, and the value received. */
export function describeIssue(issue: v.BaseIssue<unknown>, side: string): string {
  const path = issue.path?.map((p) => String(p.key)).join(".") ?? "";
  const key = path ? `${side}.${path}` : side;
  if (issue.kind === "schema" && issue.message.startsWith("Invalid key")) return `'${key}' is required`;
  if (issue.kind === "schema") return `'${key}' must be ${expectedWords(issue.expected)}, got ${shownValue(key, issue.input)}`;
  // Validations carry the schema's own sentence (`must be ≥ 1`, a custom check's message).
  const reason = issue.message.replace(/ but received .*$/, "").replace(/^Invalid (\w+): Received .*$/, "must be a valid $1");
  return `'${key}': ${reason}, got ${shownValue(key, issue.input)}`;
}

/** Every unknown key of `raw` with a suggestion from `allowed`. */
function unknownKeys(raw: Record<string, unknown>, allowed: Set<string>, side: string, type: string): string[] {
  return Object.keys(raw)
    .filter((key) => !allowed.has(key))
    .map((key) => {
      const near = nearest(key, allowed).replace("'", `'${side}.`);
      return `unknown ${type} ${side} key '${side}.${key}'${near}`;
    });
}

/**
 * Resolves secrets, then validates one side's options with the backend's schema. The error names
 * the pipeline and lists every problem of that side, each with the key and the value received
 * (values of secret-named keys are never shown). Unknown keys become `spec.unknownKeys`: a
 * warning in `run`, an error in `check`.
 */
export function parseBackendConfig<S extends v.GenericSchema>(
  spec: PipelineSpec,
  side: "source" | "sink",
  backend: { type: string; config: S },
  extraKnownKeys: string[] = [],
): v.InferOutput<S> {
  const schema = backend.config;
  const where = `pipeline '${spec.name}'`;
  const raw = resolveSecrets(spec[side], `${where}: ${side}`);
  const result = v.safeParse(schema, raw);
  const entries = schemaEntries(schema);
  const unknown = entries ? unknownKeys(raw, new Set([...Object.keys(entries), ...extraKnownKeys, ...(side === "source" ? TUNING_KEYS : [])]), side, backend.type) : [];
  if (!result.success) {
    const problems = [...new Set(result.issues.map((i) => describeIssue(i, side)))];
    throw configError(`${where}: invalid ${backend.type} ${side}: ${[...problems, ...unknown].join("; ")}`);
  }
  spec.unknownKeys.push(...unknown);
  for (const u of unknown) spec.warnings.push(`${u} is ignored`);
  return result.output;
}
