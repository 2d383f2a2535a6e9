/**
 * A Kafka record as an inbox message (docs/interface.md §6.5, §6.6): the mapping the source
 * applies to each fetched record and to a fixed `decode` dead letter it replays.
 */
import type { IHeaders } from "kafkajs";
import { headerValue, inboundMessage, utf8OrNull } from "../../inbound.ts";
import type { Message } from "../../message.ts";
import type { KafkaSourceConfig } from "./config.ts";
import type { DeadLetter } from "../types.ts";

/** Headers that carry a producer's dedup key, in order of preference (docs/interface.md §6.5). */
export const KAFKA_DEDUP_HEADERS = ["pgt_dedup_key", "dedup_key", "Idempotency-Key"] as const;

/** kafkajs headers as text: a repeated header keeps its first value; a value that is not UTF-8 is left out. */
export function kafkaHeaders(headers: IHeaders | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [name, raw] of Object.entries(headers ?? {})) {
    const first = Array.isArray(raw) ? raw[0] : raw;
    if (first === undefined || first === null) continue;
    const text = typeof first === "string" ? first : utf8OrNull(first);
    if (text !== null) out[name] = text;
  }
  return out;
}

/** The parts of a record the mapping reads (a KafkaMessage, or one rebuilt from a dead letter). */
export interface KafkaRecord {
  topic: string;
  partition: number;
  offset: string;
  key: Buffer | null;
  value: Buffer | null;
  headers?: IHeaders;
  timestamp?: string;
}

export type Converted = { ok: true; message: Message } | { ok: false; deadLetter: DeadLetter };

/**
 * One record → its inbox message (docs/interface.md §6.5, §6.6): event_id = header `pgt_dedup_key` /
 * `dedup_key` / `Idempotency-Key` verbatim, else the record key with `dedup_from_key`, else
 * `kafka:<topic>:<partition>:<offset>`; event_type candidate = header `event-type`, else the
 * topic; aggregate_id fallback = the record key; trace_id from a `traceparent` header. A record
 * without a value (a tombstone) has nothing to put in the inbox: it becomes a `decode` dead letter.
 */
export function convertKafkaRecord(r: KafkaRecord, cfg: Pick<KafkaSourceConfig, "dedup_from_key" | "event_type" | "event_type_field">, pipeline: string): Converted {
  const headers = kafkaHeaders(r.headers);
  const key = r.key ? utf8OrNull(r.key) : null;
  let producerKey: string | null = null;
  for (const name of KAFKA_DEDUP_HEADERS) {
    const value = headerValue(headers, name);
    if (value) {
      producerKey = value;
      break;
    }
  }
  if (!producerKey && cfg.dedup_from_key && key) producerKey = key;
  const synthesized = `kafka:${r.topic}:${r.partition}:${r.offset}`;
  if (r.value === null) {
    return {
      ok: false,
      deadLetter: {
        dedup_key: producerKey ?? synthesized,
        outbox_id: null,
        message: { topic: r.topic, partition: r.partition, offset: r.offset, key, headers, timestamp: r.timestamp ?? null, value: null },
        error: `kafka record ${r.topic}/${r.partition}@${r.offset} has no value (a tombstone): there is no event to put in the inbox`,
        kind: "decode",
      },
    };
  }
  const message = inboundMessage({
    pipeline,
    sourceType: "kafka",
    where: r.topic,
    body: r.value,
    headers,
    producerKey,
    synthesizedKey: synthesized,
    eventTypeCandidate: headerValue(headers, "event-type") ?? r.topic,
    aggregateIdFallback: key,
    config: cfg,
  });
  return { ok: true, message };
}
