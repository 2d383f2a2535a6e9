import { configError } from "../errors.ts";
import type { SinkSpec, SourceSpec } from "./types.ts";

/**
 * What the registries know of a sink or source without loading it: its type names and how to
 * load it. A backend's sink.ts / source.ts imports its client library (kafkajs, the AWS SDK,
 * amqplib…), so it is loaded only once a pipeline, `check` or the docs need it: `--version` or
 * a drain of stdout pipelines never pays for Kafka. The loaders are `import()` of a string
 * literal, which `bun build --compile` bundles (test/integration/binary.test.ts drives every
 * sink and source from the binary); test/unit/backends.test.ts checks these entries against the
 * modules' own `type` and `aliases`.
 */
interface Entry<Spec> {
  type: string;
  aliases: string[];
  load(): Promise<{ default: Spec }>;
}

export const SINKS: Entry<SinkSpec>[] = [
  { type: "stdout", aliases: ["file", "stdin"], load: () => import("./file/sink.ts") },
  { type: "nats", aliases: [], load: () => import("./nats/sink.ts") },
  { type: "kafka", aliases: [], load: () => import("./kafka/sink.ts") },
  { type: "http", aliases: ["webhook"], load: () => import("./http/sink.ts") },
  { type: "redis", aliases: [], load: () => import("./redis/sink.ts") },
  { type: "sqs", aliases: [], load: () => import("./sqs/sink.ts") },
  { type: "rabbitmq", aliases: [], load: () => import("./rabbitmq/sink.ts") },
  { type: "pg-inbox", aliases: ["inbox"], load: () => import("./pg-inbox/sink.ts") },
];

export const SOURCES: Entry<SourceSpec>[] = [
  { type: "outbox", aliases: [], load: () => import("./outbox/source.ts") },
  { type: "file", aliases: ["stdin", "stdout"], load: () => import("./file/source.ts") },
  { type: "nats", aliases: [], load: () => import("./nats/source.ts") },
  { type: "kafka", aliases: [], load: () => import("./kafka/source.ts") },
  { type: "http", aliases: ["webhook"], load: () => import("./http/source.ts") },
  { type: "redis", aliases: [], load: () => import("./redis/source.ts") },
  { type: "sqs", aliases: [], load: () => import("./sqs/source.ts") },
  { type: "rabbitmq", aliases: [], load: () => import("./rabbitmq/source.ts") },
];

type Side = "sink" | "source";
const REGISTRIES = { sink: SINKS, source: SOURCES } as const;

/** Sinks and sources loaded so far, by side and their entry's type. */
const loaded = { sink: new Map<string, SinkSpec>(), source: new Map<string, SourceSpec>() };

const entryOf = (side: Side, type: string) => REGISTRIES[side].find((e) => e.type === type || e.aliases.includes(type));

async function load(side: Side, type: string): Promise<void> {
  const entry = entryOf(side, type);
  if (entry && !loaded[side].has(entry.type)) loaded[side].set(entry.type, (await entry.load()).default as any);
}

/**
 * Loads the source and sink these pipelines name (unknown names are left to sinkOf/sourceOf to
 * report). Must be awaited before a pipeline of those types is built.
 */
export async function loadBackends(pipelines: Iterable<{ sourceType: string; sinkType: string }>): Promise<void> {
  for (const p of pipelines) {
    await load("source", p.sourceType);
    await load("sink", p.sinkType);
  }
}

/** Every sink, loaded (docs generation, tests). */
export async function allSinks(): Promise<SinkSpec[]> {
  for (const e of SINKS) await load("sink", e.type);
  return SINKS.map((e) => loaded.sink.get(e.type)!);
}

/** Every source, loaded (docs generation, tests). */
export async function allSources(): Promise<SourceSpec[]> {
  for (const e of SOURCES) await load("source", e.type);
  return SOURCES.map((e) => loaded.source.get(e.type)!);
}

function findLoaded<S extends Side>(side: S, type: string, pipeline: string): S extends "sink" ? SinkSpec : SourceSpec {
  const entry = entryOf(side, type);
  if (!entry) {
    const known = REGISTRIES[side].flatMap((e) => [e.type, ...e.aliases]);
    throw configError(`pipeline '${pipeline}': unknown ${side} type '${type}' (known: ${known.join(", ")})`);
  }
  const spec = loaded[side].get(entry.type);
  if (!spec) throw new Error(`${side} '${entry.type}' used before loadBackends loaded it`);
  return spec as any;
}

export const sinkOf = (type: string, pipeline: string): SinkSpec => findLoaded("sink", type, pipeline);
export const sourceOf = (type: string, pipeline: string): SourceSpec => findLoaded("source", type, pipeline);
