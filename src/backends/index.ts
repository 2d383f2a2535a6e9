import { configError } from "../errors.ts";
import type { Backend } from "./types.ts";

/**
 * What the registry knows of a backend without loading it: its type names, which sides it has,
 * and how to load it. A backend module imports its client library (kafkajs, the AWS SDK,
 * amqplib…), so it is loaded only once a pipeline, `check` or the docs need it: `--version` or
 * a drain of stdout pipelines never pays for Kafka. The loaders are `import()` of a string
 * literal, which `bun build --compile` bundles (test/integration/binary.test.ts drives every
 * sink and source from the binary); test/unit/backends.test.ts checks these entries against the
 * modules' own `type`, `aliases`, `sink` and `source`.
 */
interface Entry {
  type: string;
  aliases: string[];
  sink: boolean;
  source: boolean;
  load(): Promise<{ default: Backend }>;
}

export const REGISTRY: Entry[] = [
  { type: "outbox", aliases: [], sink: false, source: true, load: () => import("./outbox.ts") },
  { type: "stdout", aliases: ["file", "stdin"], sink: true, source: true, load: () => import("./stdout.ts") },
  { type: "nats", aliases: [], sink: true, source: true, load: () => import("./nats.ts") },
  { type: "kafka", aliases: [], sink: true, source: true, load: () => import("./kafka.ts") },
  { type: "http", aliases: ["webhook"], sink: true, source: true, load: () => import("./http.ts") },
  { type: "redis", aliases: [], sink: true, source: true, load: () => import("./redis.ts") },
  { type: "sqs", aliases: [], sink: true, source: true, load: () => import("./sqs.ts") },
  { type: "rabbitmq", aliases: [], sink: true, source: true, load: () => import("./rabbitmq.ts") },
  { type: "pg-inbox", aliases: ["inbox"], sink: true, source: false, load: () => import("./pg-inbox.ts") },
];

/** Backends loaded so far, by their entry's type. */
const loaded = new Map<string, Backend>();

const entryOf = (type: string) => REGISTRY.find((e) => e.type === type || e.aliases.includes(type));

/**
 * Loads the backends of these type names (unknown names are left to sinkBackend/sourceBackend to
 * report). Must be awaited before a pipeline of those types is built.
 */
export async function loadBackends(types: Iterable<string>): Promise<void> {
  for (const type of new Set(types)) {
    const entry = entryOf(type);
    if (entry && !loaded.has(entry.type)) loaded.set(entry.type, (await entry.load()).default);
  }
}

/** Every backend, loaded (docs generation, tests). */
export async function allBackends(): Promise<Backend[]> {
  await loadBackends(REGISTRY.map((e) => e.type));
  return REGISTRY.map((e) => loaded.get(e.type)!);
}

function findLoaded(type: string, side: "sink" | "source", pipeline: string): Backend {
  const entry = entryOf(type);
  if (!entry?.[side]) {
    const known = REGISTRY.filter((e) => e[side]).flatMap((e) => [e.type, ...e.aliases]);
    throw configError(`pipeline '${pipeline}': unknown ${side} type '${type}' (known: ${known.join(", ")})`);
  }
  const backend = loaded.get(entry.type);
  if (!backend) throw new Error(`backend '${entry.type}' used before loadBackends loaded it`);
  return backend;
}

export const sinkBackend = (type: string, pipeline: string): Backend => findLoaded(type, "sink", pipeline);
export const sourceBackend = (type: string, pipeline: string): Backend => findLoaded(type, "source", pipeline);
