/**
 * Options of the RabbitMQ sink and source (docs/interface.md §5.3, §6.4): the valibot schemas,
 * with each key's documentation in its v.description().
 */
import * as v from "valibot";
import { TLS_ENTRIES } from "../../tls.ts";
import { reverseSourceKeys } from "../../inbound.ts";
import { intInRange, positiveInt } from "../schema.ts";

export const DEFAULT_ROUTING_KEY_TEMPLATE = "{stream_table}.{op}";
/** RabbitMQ 4's default `max_message_size` (3.x allowed 128 MiB). */
const DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024;

const RabbitSinkOptions = v.looseObject({
  /** The sink type; ignored here (the loader picks the backend by it). */
  type: v.optional(v.string()),
  url: v.pipe(
    v.string("url is required"),
    v.check((u) => /^amqps?:\/\//i.test(u), "url must start with amqp:// or amqps://"),
    v.check((u) => URL.canParse(u), "url is not a valid URL"),
    v.description("`amqp://user:password@host:5672/vhost` or `amqps://…` (TLS). Query parameters amqplib knows (`frameMax`, `channelMax`, `locale`) pass through. Use `${env:…}` for the password."),
  ),
  exchange: v.pipe(
    v.string("exchange is required (\"\" for the default exchange)"),
    v.description("Exchange to publish to. Required; `\"\"` (given explicitly) means the default exchange, which routes by queue name (routing key = queue) and is never declared."),
  ),
  exchange_type: v.pipe(
    v.optional(v.picklist(["topic", "direct", "fanout", "headers"], "exchange_type must be topic, direct, fanout or headers"), "topic"),
    v.description("Type used when declaring the exchange."),
  ),
  declare_exchange: v.pipe(
    v.optional(v.boolean(), true),
    v.description("Declare the exchange (durable) at start when missing. false: only check that it exists (a missing exchange is then a configuration error)."),
  ),
  routing_key_template: v.pipe(
    v.optional(v.string()),
    v.description("Routing key rendered per message (the README's template variables, top-level row fields). A key longer than 255 bytes sends that message to the dead-letter table. Alias: `routing_key`."),
  ),
  routing_key: v.pipe(v.optional(v.string()), v.description("Alias of `routing_key_template`.")),
  mandatory: v.pipe(
    v.optional(v.boolean(), true),
    v.description("Publish mandatory: RabbitMQ hands back messages that no queue receives (see `unroutable`)."),
  ),
  unroutable: v.pipe(
    v.optional(v.picklist(["retry", "dead_letter"], "unroutable must be retry or dead_letter"), "retry"),
    v.description("What a returned (unroutable) message means: `retry` — transient failure of the batch, retried until a queue is bound; `dead_letter` — that message goes to the dead-letter table."),
  ),
  ...TLS_ENTRIES,
  heartbeat_seconds: v.pipe(
    v.optional(intInRange(0), 30),
    v.description("AMQP heartbeat interval in seconds (0 disables heartbeats)."),
  ),
  max_in_flight: v.pipe(
    v.optional(positiveInt(), 1000),
    v.description("Most published messages awaiting a broker confirm at any time."),
  ),
  max_message_bytes: v.pipe(
    v.optional(positiveInt(), DEFAULT_MAX_MESSAGE_BYTES),
    v.description("Largest message body sent, in bytes; larger messages go to the dead-letter table (RabbitMQ would close the channel on them). Keep it ≤ the broker's `max_message_size`."),
  ),
  connection_timeout_ms: v.pipe(v.optional(positiveInt(), 10000), v.description("Milliseconds to open the connection.")),
  confirm_timeout_ms: v.pipe(
    v.optional(positiveInt(), 30000),
    v.description("Milliseconds a write waits for the broker's confirms before failing (transient)."),
  ),
});

export const RabbitSinkConfig = v.pipe(
  RabbitSinkOptions,
  v.check(
    (c) => !(c.routing_key !== undefined && c.routing_key_template !== undefined && c.routing_key !== c.routing_key_template),
    "set either routing_key_template or its alias routing_key, not both",
  ),
  v.check((c) => (c.tls_cert === undefined) === (c.tls_key === undefined), "tls_cert and tls_key go together"),
  v.transform((c) => ({ ...c, routing_key_template: c.routing_key_template ?? c.routing_key ?? DEFAULT_ROUTING_KEY_TEMPLATE })),
);

export type RabbitSinkConfig = v.InferOutput<typeof RabbitSinkConfig>;

const sinkKeys = RabbitSinkOptions.entries;

const RabbitSourceOptions = v.looseObject({
  ...reverseSourceKeys,
  type: v.optional(v.string()),
  url: sinkKeys.url,
  queue: v.pipe(
    v.string("queue is required"),
    v.minLength(1, "queue must not be empty"),
    v.check((q) => Buffer.byteLength(q) <= 255, "queue names are at most 255 bytes"),
    v.description("Queue to consume (required)."),
  ),
  consumer_tag: v.pipe(
    v.optional(v.pipe(v.string(), v.minLength(1, "consumer_tag must not be empty"))),
    v.description("Consumer tag (as the management UI shows it). Default `pgtrickle-relay-<pipeline>`."),
  ),
  prefetch_count: v.pipe(
    v.optional(positiveInt(65535), 100),
    v.description("Most unacknowledged deliveries RabbitMQ sends ahead to this consumer (basic.qos). Raised to three batches when lower, since up to three batches (read ahead) hold their deliveries unacknowledged until their inbox commit."),
  ),
  declare_queue: v.pipe(
    v.optional(v.boolean(), true),
    v.description("Declare the queue (durable) at start when it is missing. A queue that already exists with other properties (quorum type, TTL, dead-lettering, non-durable…) is used as it is. false: only check that it exists (a missing queue is then a configuration error)."),
  ),
  bind_exchange: v.pipe(
    v.optional(v.pipe(v.string(), v.minLength(1, "bind_exchange must not be empty (the default exchange cannot be bound)"))),
    v.description("Exchange to bind the queue to at start (it must exist). Absent: no binding is declared."),
  ),
  bind_routing_key: v.pipe(
    v.optional(v.string(), "#"),
    v.description("Routing key (pattern) of that binding. Default `#`: everything on a topic exchange; a fanout exchange ignores it; a direct exchange needs the exact key."),
  ),
  auto_ack: v.pipe(
    v.optional(v.boolean(), false),
    v.description("Must stay false. With automatic acknowledgement RabbitMQ forgets a message the moment it is delivered, before it reaches the inbox, so a crash or a failed insert would lose it."),
  ),
  batch_wait_ms: v.pipe(
    v.optional(intInRange(0), 20),
    v.description("After a batch's first delivery, how long (ms) to wait for more before handing out a batch smaller than batch_size."),
  ),
  ...TLS_ENTRIES,
  heartbeat_seconds: sinkKeys.heartbeat_seconds,
  connection_timeout_ms: sinkKeys.connection_timeout_ms,
});

export const RabbitSourceConfig = v.pipe(
  RabbitSourceOptions,
  v.check(
    (c) => c.auto_ack === false,
    "auto_ack must stay false: with automatic acknowledgement RabbitMQ drops each message as soon as it is delivered, before the inbox commit, so a crash or a failed insert would lose it; the relay acknowledges every batch after the inbox commit",
  ),
  v.check((c) => (c.tls_cert === undefined) === (c.tls_key === undefined), "tls_cert and tls_key go together"),
);

export type RabbitSourceConfig = v.InferOutput<typeof RabbitSourceConfig>;
