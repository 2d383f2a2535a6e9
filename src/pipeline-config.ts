import * as v from "valibot";
import type { Backend, Direction } from "./backends/types.ts";
import { configError } from "./errors.ts";
import { registerConfigSecrets } from "./redact.ts";
import { resolveSecrets } from "./secrets.ts";

/** A catalog row as `list_relay_configs()` returns it. */
export interface CatalogRow {
  name: string;
  direction: Direction;
  enabled: boolean;
  config: unknown;
}

/** A pipeline config normalised to the nested shape of CONTRACT.md §5.1. */
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
}

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

/** Turns a catalog row into a PipelineSpec, or throws a config error naming the pipeline and key. */
export function normalizePipeline(row: CatalogRow): PipelineSpec {
  const where = `pipeline '${row.name}'`;
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
  return { name: row.name, direction: row.direction, enabled: row.enabled, sourceType, source, sinkType, sink, warnings };
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

/**
 * Resolves secrets, then validates one side's options with the backend's schema. The error names
 * the pipeline and the offending key; it never echoes a value (values may be secrets).
 */
export function parseBackendConfig<S extends v.GenericSchema>(
  spec: PipelineSpec,
  side: "source" | "sink",
  backend: Backend,
  schema: S,
  extraKnownKeys: string[] = [],
): v.InferOutput<S> {
  const where = `pipeline '${spec.name}'`;
  const raw = resolveSecrets(spec[side], `${where}: ${side}`);
  const result = v.safeParse(schema, raw);
  if (!result.success) {
    const issue = result.issues[0];
    const path = issue.path?.map((p) => String(p.key)).join(".") ?? "";
    const key = path ? `${side}.${path}` : side;
    throw configError(`${where}: invalid ${backend.type} ${side} option '${key}': ${issue.message.replace(/ but received .*$/, "")}`);
  }
  const entries = schemaEntries(schema);
  if (entries) {
    const allowed = new Set([...Object.keys(entries), ...extraKnownKeys, ...(side === "source" ? TUNING_KEYS : [])]);
    for (const key of Object.keys(raw)) {
      if (!allowed.has(key)) spec.warnings.push(`unknown ${side} key '${key}' for ${backend.type} is ignored`);
    }
  }
  return result.output;
}
