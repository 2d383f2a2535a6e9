/**
 * The Kafka sink's and source's options (valibot schemas, documented with v.description() for
 * docs/OPTIONS.md) and the rules about them: legal topic names, security settings that fit
 * together.
 */
import * as v from "valibot";
import { TLS_ALIAS_ENTRIES, TLS_ENTRIES, type TlsConfig } from "../../tls.ts";
import { hasPlaceholder } from "../../message.ts";
import { reverseSourceKeys } from "../../inbound.ts";
import { intInRange, positiveInt } from "../schema.ts";
import { COMPRESSION_TYPES, type KafkaCompression } from "./codecs.ts";

/** Kafka's own rule for topic names (plus: not `.` or `..`). */
const TOPIC_NAME = /^[A-Za-z0-9._-]{1,249}$/;
export const isLegalTopic = (t: string) => TOPIC_NAME.test(t) && t !== "." && t !== "..";

const lower = (x: string) => x.toLowerCase();

/** `topic` means something else on each side; one text documents both. */
const TOPIC_DESCRIPTION =
  "Sink: the destination topic; a value with `{…}` placeholders is treated as `topic_template`, and a static topic must be a legal Kafka name (`[A-Za-z0-9._-]`, 1–249 characters). Source (required): the topic to consume, or an array of topics.";

const KafkaSinkOptions = v.looseObject({
  type: v.optional(v.pipe(v.string(), v.description("The sink type; ignored here (the loader picks the backend by it)."))),
  brokers: v.pipe(
    v.union([v.string(), v.array(v.string())], "brokers must be a string or an array of strings"),
    v.transform((b) => (Array.isArray(b) ? b : b.split(",")).map((s) => s.trim()).filter((s) => s !== "")),
    v.minLength(1, "brokers must name at least one host:port"),
    v.description("Bootstrap brokers, `host:port`: a comma-separated string or an array."),
  ),
  topic: v.optional(v.pipe(v.string(), v.description(TOPIC_DESCRIPTION))),
  topic_template: v.optional(
    v.pipe(
      v.string(),
      v.description(
        "Topic rendered per message, e.g. `pgtrickle.{stream_table}` (the template variables of the README's \"Messages\" and top-level row fields). A message whose rendered topic is not a legal name is dead-lettered.",
      ),
    ),
  ),
  key_template: v.optional(v.pipe(v.string(), v.description("Record key rendered per message, e.g. `{op}:{outbox_id}`. Default: the dedup key."))),
  key_field: v.optional(
    v.pipe(
      v.string(),
      v.description(
        "Record key = this top-level field of the row (objects as JSON). Messages whose row lacks the field (or holds null) fall back to the dedup key. Exclusive with `key_template`.",
      ),
    ),
  ),
  acks: v.optional(
    v.pipe(
      v.union([v.string(), v.number()], "acks must be all, 1 or 0"),
      v.transform((a) => String(a).toLowerCase()),
      v.picklist(["all", "-1", "1", "0"], "acks must be all, 1 or 0"),
      v.transform((a): -1 | 0 | 1 => (a === "all" || a === "-1" ? -1 : a === "1" ? 1 : 0)),
      v.description(
        "Acknowledgements required per produce request: `all` (-1), `1` or `0`. Only `all` allows the idempotent producer; with `1` or `0` it is switched off (and with `0` the relay cannot know whether Kafka stored anything).",
      ),
    ),
    "all",
  ),
  compression: v.optional(
    v.pipe(
      v.string(),
      v.transform(lower),
      v.picklist(Object.keys(COMPRESSION_TYPES) as KafkaCompression[], "compression must be none, gzip, snappy, lz4 or zstd"),
      v.description(
        "Record batch compression: `none`, `gzip`, `snappy` (xerial framing, as Kafka's Java client writes it), `lz4` (LZ4 frames, independent blocks) or `zstd`. The Kafka source reads all of them, whatever codec a producer used.",
      ),
    ),
    "none",
  ),
  linger_ms: v.optional(
    v.pipe(
      intInRange(0),
      v.description(
        "Accepted for compatibility with librdkafka settings; it has no effect: kafkajs has no client-side linger, and the relay sends each pipeline batch as soon as it has it.",
      ),
    ),
  ),
  batch_num_messages: v.optional(
    v.pipe(positiveInt(), v.description("Most records in one produce request; larger batches are sent as consecutive requests.")),
    1000,
  ),
  max_message_bytes: v.optional(
    v.pipe(
      positiveInt(),
      v.description(
        "Upper bound for one record batch, in bytes. Default: the topic's `max.message.bytes` as the broker reports it (1048588 when it cannot be read). Larger single messages are dead-lettered.",
      ),
    ),
  ),
  client_id: v.optional(v.pipe(v.string(), v.description("Kafka client id (shows up in broker logs and quotas).")), "pgtrickle-relay"),
  security_protocol: v.optional(
    v.pipe(
      v.string(),
      v.transform((s) => s.toUpperCase()),
      v.picklist(["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"], "security_protocol must be PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"),
      v.description("`PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL`. A `tls*` key (docs/TLS.md) turns TLS on as well: `PLAINTEXT` then means `SSL`, `SASL_PLAINTEXT` means `SASL_SSL`."),
    ),
    "PLAINTEXT",
  ),
  sasl_mechanism: v.optional(
    v.pipe(
      v.string(),
      v.transform(lower),
      v.picklist(["plain", "scram-sha-256", "scram-sha-512"], "sasl_mechanism must be plain, scram-sha-256 or scram-sha-512"),
      v.description("`plain`, `scram-sha-256` or `scram-sha-512` (with a SASL_* security_protocol)."),
    ),
  ),
  sasl_username: v.optional(v.pipe(v.string(), v.description("SASL user name."))),
  sasl_password: v.optional(v.pipe(v.string(), v.description("SASL password; use `${env:NAME}` or `${file:/path}` rather than the literal value."))),
  ...TLS_ENTRIES,
  ...TLS_ALIAS_ENTRIES.kafka,
  create_topic: v.optional(v.pipe(v.boolean(), v.description("Create a missing topic (at start, and for new rendered topics) instead of failing.")), false),
  num_partitions: v.optional(v.pipe(positiveInt(), v.description("Partitions of a topic created by `create_topic`; default: the broker's `num.partitions`."))),
  replication_factor: v.optional(v.pipe(positiveInt(), v.description("Replication factor of a topic created by `create_topic`; default: the broker's."))),
  connection_timeout_ms: v.optional(v.pipe(positiveInt(), v.description("Milliseconds to establish a broker connection.")), 5000),
  request_timeout_ms: v.optional(v.pipe(positiveInt(), v.description("Milliseconds a request (and the broker's wait for acks) may take.")), 30000),
});

const TLS_TURNED_OFF = "security_protocol SSL or SASL_SSL is TLS, but tls is false";
/** `tls: false` (or the old `ssl: false`) beside a security_protocol with TLS. */
const tlsTurnedOff = (c: KafkaConnectionOptions) => (c.tls === false || c.ssl === false) && (c.security_protocol === "SSL" || c.security_protocol === "SASL_SSL");

export const KafkaSinkConfig = v.pipe(
  KafkaSinkOptions,
  v.transform((c) => {
    // A `topic` that holds placeholders is a template (users write it that way).
    const topicTemplate = c.topic_template ?? (c.topic !== undefined && hasPlaceholder(c.topic) ? c.topic : undefined);
    const topic = topicTemplate === undefined ? c.topic : undefined;
    return { ...c, topic, topic_template: topicTemplate, topicBoth: c.topic !== undefined && c.topic_template !== undefined };
  }),
  v.check((c) => !c.topicBoth, "set either topic or topic_template, not both"),
  v.check((c) => c.topic !== undefined || c.topic_template !== undefined, "topic (or topic_template) is required"),
  v.check(
    (c) => c.topic === undefined || isLegalTopic(c.topic),
    "topic is not a legal Kafka topic name (letters, digits, '.', '_', '-'; 1–249 characters)",
  ),
  v.check(
    (c) => c.topic_template === undefined || hasPlaceholder(c.topic_template) || isLegalTopic(c.topic_template),
    "topic_template has no placeholder and is not a legal Kafka topic name",
  ),
  v.check((c) => !(c.key_template !== undefined && c.key_field !== undefined), "set either key_template or key_field, not both"),
  v.rawCheck(({ dataset, addIssue }) => {
    const problem = dataset.typed ? kafkaSecurityProblem(dataset.value) : null;
    if (problem) addIssue({ message: problem });
  }),
  v.check((c) => !tlsTurnedOff(c), TLS_TURNED_OFF),
);

export type KafkaSinkConfig = v.InferOutput<typeof KafkaSinkConfig>;

/** Connection settings shared by the sink and the source; TLS in the vocabulary of docs/TLS.md. */
export interface KafkaConnectionOptions extends TlsConfig {
  brokers: string[];
  client_id: string;
  security_protocol: "PLAINTEXT" | "SSL" | "SASL_PLAINTEXT" | "SASL_SSL";
  sasl_mechanism?: "plain" | "scram-sha-256" | "scram-sha-512";
  sasl_username?: string;
  sasl_password?: string;
  connection_timeout_ms: number;
  request_timeout_ms: number;
}

const sinkKeys = KafkaSinkOptions.entries;

const KafkaSourceOptions = v.looseObject({
  ...reverseSourceKeys,
  type: v.optional(v.string()),
  brokers: sinkKeys.brokers,
  topic: v.pipe(
    v.union([v.string(), v.array(v.string())], "topic (a topic name, or an array of them) is required"),
    v.transform((t) => [...new Set((Array.isArray(t) ? t : [t]).map((x) => x.trim()))]),
    v.minLength(1, "topic must name at least one topic"),
    v.check((ts) => ts.every(isLegalTopic), "topic is not a legal Kafka topic name (letters, digits, '.', '_', '-'; 1–249 characters)"),
    v.description(TOPIC_DESCRIPTION),
  ),
  group_id: v.optional(
    v.pipe(
      v.string(),
      v.minLength(1, "group_id must not be empty"),
      v.description(
        "Consumer group. Default `pgtrickle-relay-<pipeline>`: one group per pipeline, so two pipelines never split a topic between them (or starve each other's partitions). To take over the offsets of the old relay, set `pgtrickle-inbox-writer`, its fixed group.",
      ),
    ),
  ),
  auto_offset_reset: v.optional(
    v.pipe(
      v.string(),
      v.transform(lower),
      v.picklist(["earliest", "latest"], "auto_offset_reset must be earliest or latest"),
      v.description(
        "Where a group without a committed offset starts: `earliest` (the oldest record Kafka still holds) or `latest` (records produced from the pipeline's first start on; that position is committed right away, so a restart does not skip what arrived in between).",
      ),
    ),
    "earliest",
  ),
  dedup_from_key: v.optional(
    v.pipe(
      v.boolean(),
      v.description(
        "Use the record key as the dedup key (event_id) when the record has no `pgt_dedup_key`, `dedup_key` or `Idempotency-Key` header. Only for topics whose keys are unique per event: Kafka keys are partitioning keys, and distinct events sharing one would collapse into one row.",
      ),
    ),
    false,
  ),
  session_timeout_ms: v.optional(
    v.pipe(
      positiveInt(),
      v.description(
        "Milliseconds without a heartbeat after which the broker drops this member and hands its partitions to others. Heartbeats go on while a batch is being written to the inbox.",
      ),
    ),
    30000,
  ),
  heartbeat_interval_ms: v.optional(
    v.pipe(positiveInt(), v.description("Milliseconds between heartbeats; must be below session_timeout_ms (a third of it or less is usual).")),
    3000,
  ),
  rebalance_timeout_ms: v.optional(
    v.pipe(
      positiveInt(),
      v.description(
        "Milliseconds the group waits for its members to rejoin during a rebalance. A batch being written when a rebalance starts is finished and committed within this time.",
      ),
    ),
    60000,
  ),
  max_wait_ms: v.optional(
    v.pipe(
      positiveInt(),
      v.description("Longest time the broker holds a fetch open while the partitions have nothing new (new records end it at once). `drain` uses at most 100, so that it does not wait on an empty fetch at its end."),
    ),
    1000,
  ),
  client_id: sinkKeys.client_id,
  security_protocol: sinkKeys.security_protocol,
  sasl_mechanism: sinkKeys.sasl_mechanism,
  sasl_username: sinkKeys.sasl_username,
  sasl_password: sinkKeys.sasl_password,
  ...TLS_ENTRIES,
  ...TLS_ALIAS_ENTRIES.kafka,
  connection_timeout_ms: sinkKeys.connection_timeout_ms,
  request_timeout_ms: sinkKeys.request_timeout_ms,
});

/** Security settings that do not fit together (the sink's and the source's rule), or null. */
export function kafkaSecurityProblem(c: KafkaConnectionOptions): string | null {
  if (c.sasl_mechanism !== undefined && !c.security_protocol.startsWith("SASL_")) return "sasl_mechanism needs security_protocol SASL_PLAINTEXT or SASL_SSL";
  if (c.security_protocol.startsWith("SASL_") && (c.sasl_mechanism === undefined || c.sasl_username === undefined || c.sasl_password === undefined)) {
    return "security_protocol SASL_* needs sasl_mechanism, sasl_username and sasl_password";
  }
  return tlsTurnedOff(c) ? TLS_TURNED_OFF : null;
}

export const KafkaSourceConfig = v.pipe(
  KafkaSourceOptions,
  v.rawCheck(({ dataset, addIssue }) => {
    if (!dataset.typed) return;
    const problem = kafkaSecurityProblem(dataset.value);
    if (problem) addIssue({ message: problem });
    if (dataset.value.heartbeat_interval_ms >= dataset.value.session_timeout_ms) addIssue({ message: "heartbeat_interval_ms must be below session_timeout_ms" });
  }),
);

export type KafkaSourceConfig = v.InferOutput<typeof KafkaSourceConfig>;
