/**
 * Options of the Amazon SQS sink and source (docs/interface.md §5.3, §5.4): the valibot schemas,
 * with each key's documentation in its v.description(). The connection keys are shared.
 */
import * as v from "valibot";
import { intInRange, positiveInt } from "../schema.ts";
import { reverseSourceKeys } from "../../inbound.ts";

/** Where the queue is and how to reach it: shared by the sink and the source. */
const sqsConnectionKeys = {
  queue_url: v.pipe(
    v.string("queue_url is required"),
    v.check((u) => /^https?:\/\/[^/]+\/.+/i.test(u) && URL.canParse(u), "queue_url must be an http(s) queue URL"),
    v.description("Queue URL, e.g. `https://sqs.eu-west-1.amazonaws.com/123456789012/orders.fifo`."),
  ),
  region: v.pipe(
    v.optional(v.string()),
    v.description("AWS region. Default: AWS_REGION / AWS_DEFAULT_REGION, else the region in an AWS queue URL, else the profile's region, else `us-east-1` when `endpoint` is set."),
  ),
  endpoint: v.pipe(
    v.optional(v.pipe(v.string(), v.check((u) => /^https?:\/\/[^/]/i.test(u) && URL.canParse(u), "endpoint must be an http(s) URL"))),
    v.description("Endpoint of an SQS-compatible server (or a VPC endpoint), e.g. `http://127.0.0.1:4566`."),
  ),
  timeout_ms: v.pipe(
    v.optional(positiveInt(), 10000),
    v.description("Timeout of one SQS request in milliseconds (a source's long poll gets `wait_time_seconds` on top)."),
  ),
  access_key_id: v.pipe(
    v.optional(v.string("access_key_id must be a string")),
    v.description("Static credentials (e.g. `${env:SQS_KEY_ID}`); default: the AWS credential provider chain."),
  ),
  secret_access_key: v.pipe(v.optional(v.string("secret_access_key must be a string")), v.description("Secret for `access_key_id`; never logged.")),
  session_token: v.pipe(
    v.optional(v.string("session_token must be a string")),
    v.description("Session token for temporary static credentials; never logged."),
  ),
  profile: v.pipe(v.optional(v.string()), v.description("Named profile from ~/.aws/config and ~/.aws/credentials (like AWS_PROFILE).")),
};

export type SqsConnectionOptions = v.InferOutput<v.ObjectSchema<typeof sqsConnectionKeys, undefined>>;

export const SqsSinkConfig = v.pipe(
  v.looseObject({
    /** Sink type (`sqs`); ignored here. */
    type: v.optional(v.string()),
    ...sqsConnectionKeys,
    fifo: v.pipe(v.optional(v.boolean()), v.description("FIFO queue; default: the queue URL ends in `.fifo`. Checked against the queue at start.")),
    message_group_id: v.pipe(
      v.optional(v.string(), "{stream_table}"),
      v.description("FIFO MessageGroupId template (variables as in subject templates, plus row fields)."),
    ),
    batch_send: v.pipe(v.optional(v.boolean(), true), v.description("false: one SendMessage call per message instead of SendMessageBatch.")),
    max_in_flight: v.pipe(
      v.optional(positiveInt(), 16),
      v.description("SQS calls in flight at once (across message groups)."),
    ),
    max_batch_bytes: v.pipe(
      v.optional(intInRange(1024, 1048576), 262144),
      v.description("Bytes per SendMessageBatch call (bodies plus attributes). 256 KiB suits every SQS-compatible server; a larger message still goes alone in its own call."),
    ),
    max_message_bytes: v.pipe(
      v.optional(intInRange(1024, 1048576)),
      v.description("Per-message size limit; default: the queue's MaximumMessageSize."),
    ),
  }),
  v.transform((cfg) => ({ ...cfg, fifo: cfg.fifo ?? cfg.queue_url.endsWith(".fifo") })),
);

export type SqsSinkOptions = v.InferOutput<typeof SqsSinkConfig>;

/** Options of the SQS source (docs/interface.md §5.4). */
export const SqsSourceConfig = v.looseObject({
  /** Source type (`sqs`); ignored here. */
  type: v.optional(v.string()),
  ...reverseSourceKeys,
  ...sqsConnectionKeys,
  max_messages: v.pipe(
    v.optional(positiveInt(10), 10),
    v.description("Messages per ReceiveMessage call (SQS allows at most 10); a larger `batch_size` takes several calls per batch."),
  ),
  wait_time_seconds: v.pipe(
    v.optional(intInRange(0, 20), 20),
    v.description("Long-poll wait of a receive in seconds (0–20); an empty receive is followed by the next one at once. 0 = short polls, `poll_interval_ms` apart when empty. Drain mode always waits 1 s."),
  ),
  visibility_timeout: v.pipe(
    v.optional(positiveInt(43200), 30),
    v.description("Seconds received messages stay invisible to other consumers. While their batch is being written it is extended every `visibility_timeout`/2, so a slow inbox causes no redelivery; a crashed relay's messages come back after it."),
  ),
});
export type SqsSourceOptions = v.InferOutput<typeof SqsSourceConfig>;
