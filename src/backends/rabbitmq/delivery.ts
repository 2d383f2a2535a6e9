/**
 * One RabbitMQ delivery → its inbox message (docs/interface.md §6.5, §6.6): the mapping of the
 * RabbitMQ source, AMQP headers as text.
 */
import { headerValue, inboundMessage, sha256Hex, utf8OrNull } from "../../inbound.ts";
import type { Message } from "../../message.ts";
import { isNonEmptyString } from "../schema.ts";
import type { RabbitSourceConfig } from "./config.ts";

/** AMQP header values as text: strings as they are, byte arrays as UTF-8, numbers and booleans printed, tables as JSON. */
export function amqpHeaders(headers: Record<string, unknown> | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [name, value] of Object.entries(headers ?? {})) {
    if (value === null || value === undefined) continue;
    let text: string | null;
    if (typeof value === "string") text = value;
    else if (Buffer.isBuffer(value)) text = utf8OrNull(value);
    else if (typeof value === "number" || typeof value === "boolean" || typeof value === "bigint") text = String(value);
    else if (value instanceof Date) text = value.toISOString();
    else text = JSON.stringify(value, (_k, x: unknown) => (typeof x === "bigint" ? x.toString() : x));
    if (text !== null) out[name] = text;
  }
  return out;
}

/** What the mapping reads of a delivery (a ConsumeMessage fits). */
export interface AmqpDelivery {
  fields: { exchange: string; routingKey: string };
  properties: { messageId?: unknown; type?: unknown; headers?: Record<string, unknown> };
  content: Buffer;
}


/**
 * One delivery → its inbox message (docs/interface.md §6.5, §6.6): event_id = property `message_id`,
 * else header `pgt_dedup_key`, else `amqp:` + hex SHA-256 of exchange, routing key and body
 * (NUL-separated); event_type candidate = property `type`, else the routing key; source =
 * `rabbitmq:<queue>`; trace_id from a `traceparent` header.
 */
export function convertAmqpDelivery(d: AmqpDelivery, queue: string, cfg: Pick<RabbitSourceConfig, "event_type" | "event_type_field">, pipeline: string): Message {
  const headers = amqpHeaders(d.properties.headers);
  const producerKey = isNonEmptyString(d.properties.messageId) ? d.properties.messageId : headerValue(headers, "pgt_dedup_key");
  const nul = Buffer.from([0]);
  return inboundMessage({
    pipeline,
    sourceType: "rabbitmq",
    where: queue,
    body: d.content,
    headers,
    producerKey,
    synthesizedKey: () => `amqp:${sha256Hex(Buffer.concat([Buffer.from(d.fields.exchange), nul, Buffer.from(d.fields.routingKey), nul, d.content]))}`,
    eventTypeCandidate: isNonEmptyString(d.properties.type) ? d.properties.type : d.fields.routingKey,
    config: cfg,
  });
}
