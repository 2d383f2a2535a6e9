import { configError } from "../errors.ts";
import http from "./http.ts";
import kafka from "./kafka.ts";
import nats from "./nats.ts";
import outbox from "./outbox.ts";
import pgInbox from "./pg-inbox.ts";
import rabbitmq from "./rabbitmq.ts";
import redis from "./redis.ts";
import sqs from "./sqs.ts";
import stdout from "./stdout.ts";
import type { Backend } from "./types.ts";

/**
 * Every backend, by type name. Imports are static on purpose: `bun build --compile` bundles only
 * static imports, so a backend loaded dynamically would silently be missing from the binary.
 */
export const BACKENDS: Backend[] = [outbox, stdout, nats, kafka, http, redis, sqs, rabbitmq, pgInbox];

export function findBackend(type: string): Backend | undefined {
  return BACKENDS.find((b) => b.type === type || b.aliases?.includes(type));
}

export function sinkBackend(type: string, pipeline: string): Backend {
  const backend = findBackend(type);
  if (!backend?.sink) {
    const known = BACKENDS.filter((b) => b.sink).flatMap((b) => [b.type, ...(b.aliases ?? [])]);
    throw configError(`pipeline '${pipeline}': unknown sink type '${type}' (known: ${known.join(", ")})`);
  }
  return backend;
}

export function sourceBackend(type: string, pipeline: string): Backend {
  const backend = findBackend(type);
  if (!backend?.source) {
    const known = BACKENDS.filter((b) => b.source).flatMap((b) => [b.type, ...(b.aliases ?? [])]);
    throw configError(`pipeline '${pipeline}': unknown source type '${type}' (known: ${known.join(", ")})`);
  }
  return backend;
}
