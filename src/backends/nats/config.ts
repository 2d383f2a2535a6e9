/**
 * The NATS JetStream sink's and source's options (valibot schemas, documented with
 * v.description() for docs/OPTIONS.md) and the pure rules about names: subject patterns of a
 * template, subjects a created stream captures, legal subjects (docs/interface.md §6.3) and
 * durable consumer names.
 */
import * as v from "valibot";
import { hasPlaceholder } from "../../message.ts";
import { configError } from "../../errors.ts";
import { reverseSourceKeys } from "../../inbound.ts";
import { TLS_ENTRIES } from "../../tls.ts";
import { intInRange, nonEmptyString, positiveInt } from "../schema.ts";


/** Connection and authentication keys, the same for the sink and the source. */
const connectionKeys = {
  url: v.pipe(
    nonEmptyString(),
    v.description(
      "Server URL, e.g. `nats://127.0.0.1:4222`; several servers comma-separated. `tls://` turns TLS on. `nats://user:pass@host:4222` or `nats://token@host:4222` carry credentials (prefer the `user`/`pass`/`token` keys with `${env:…}` secrets).",
    ),
  ),
  user: v.optional(v.pipe(v.string(), v.description("User name for user/password authentication."))),
  pass: v.optional(v.pipe(v.string(), v.description("Password for user/password authentication."))),
  token: v.optional(v.pipe(v.string(), v.description("Token authentication."))),
  credentials_file: v.optional(v.pipe(nonEmptyString(), v.description("Path of a `.creds` file (JWT + NKey seed) for decentralised authentication."))),
  ...TLS_ENTRIES,
  connect_timeout_ms: v.optional(v.pipe(positiveInt(600_000), v.description("Give up connecting after this long.")), 5000),
};

/** `subject` means something else on each side; one text documents both. */
const SUBJECT_DESCRIPTION =
  "Sink: alias of `subject_template`. Source (required): the subjects to consume, wildcards allowed (`external.events.>`); the consumer's filter subject.";

const NatsSinkObject = v.looseObject({
  type: v.optional(v.pipe(v.string(), v.description("Ignored here: the loader has already chosen this backend by it."))),
  ...connectionKeys,
  subject_template: v.optional(
    v.pipe(
      nonEmptyString(),
      v.description(
        "Subject per message, rendered with {stream_table} {schema} {outbox} {pipeline} {op} {outbox_id} {refresh_id} and row fields. Absent: the subject the source rendered from the pipeline's `subject_template` (default `pgtrickle.{stream_table}.{op}`). Alias `subject`.",
      ),
    ),
  ),
  subject: v.optional(v.pipe(nonEmptyString(), v.description(SUBJECT_DESCRIPTION))),
  stream: v.optional(
    v.pipe(
      nonEmptyString(),
      v.description(
        "JetStream stream. Sink: it must capture the subjects (checked at start) and every publish expects it (a subject captured by another stream is refused); absent, any stream whose subjects overlap the subject template is accepted. Source: the stream the consumer reads; absent, the one stream whose subjects overlap `subject`.",
      ),
    ),
  ),
  create_stream: v.optional(
    v.pipe(
      v.boolean(),
      v.description(
        "Create `stream` when it does not exist (sink: with `stream_subjects`; source: capturing `subject`). An existing stream is never modified, and without this key nothing is created.",
      ),
    ),
    false,
  ),
  stream_subjects: v.optional(
    v.pipe(
      v.array(nonEmptyString()),
      v.minLength(1),
      v.description(
        "Subjects of a stream created by `create_stream`. Default: the literal start of the subject template followed by `>` (`pgtrickle.{stream_table}.{op}` → `pgtrickle.>`), or the template itself when it has no placeholder.",
      ),
    ),
  ),
  duplicate_window_seconds: v.optional(
    v.pipe(
      positiveInt(),
      v.description(
        "Duplicate window of a stream created by `create_stream`, in seconds (server default 120). Replays are deduplicated only within the window of the stream.",
      ),
    ),
  ),
  ack_timeout_ms: v.optional(v.pipe(positiveInt(600_000), v.description("Wait this long for each publish acknowledgement.")), 5000),
  max_in_flight: v.optional(v.pipe(positiveInt(65_536), v.description("Publishes awaiting their acknowledgement at any time.")), 256),
});

/** The rules both sides' options follow, for v.pipe after the side's own transform. */
type SharedRules = { create_stream: boolean; stream?: string; tls_cert?: string; tls_key?: string };
const streamToCreateNamed = <T extends SharedRules>() =>
  v.check<T, string>((c) => !c.create_stream || c.stream !== undefined, "create_stream needs `stream` (the name of the stream to create)");
const clientCertWithKey = <T extends SharedRules>() =>
  v.check<T, string>((c) => (c.tls_cert === undefined) === (c.tls_key === undefined), "tls_cert and tls_key go together");

/** `subject` is an alias of `subject_template` (SQL_REFERENCE example); the canonical key wins. */
export const NatsSinkConfig = v.pipe(
  NatsSinkObject,
  v.transform(({ subject, ...rest }) => ({ ...rest, subject_template: rest.subject_template ?? subject })),
  streamToCreateNamed(),
  clientCertWithKey(),
);

export type NatsSinkOptions = v.InferOutput<typeof NatsSinkConfig>;

const DELIVER_POLICIES = ["all", "last", "new", "by_start_time"] as const;

const sinkKeys = NatsSinkObject.entries;

const NatsSourceObject = v.looseObject({
  type: v.optional(v.string()),
  ...connectionKeys,
  ...reverseSourceKeys,
  subject: v.pipe(nonEmptyString(), v.description(SUBJECT_DESCRIPTION)),
  stream: sinkKeys.stream,
  create_stream: sinkKeys.create_stream,
  durable_name: v.optional(
    v.pipe(
      nonEmptyString(),
      v.description(
        "Durable pull consumer; created when missing, its ack wait, max deliveries and filter updated when they differ. Default `pgtrickle-relay-<pipeline>`: stable across restarts, so a restart resumes where the last acknowledgement left off. Alias `consumer`.",
      ),
    ),
  ),
  consumer: v.optional(v.pipe(nonEmptyString(), v.description("Alias of `durable_name`."))),
  deliver_policy: v.optional(
    v.pipe(
      v.picklist(DELIVER_POLICIES),
      v.description(
        "Where a newly created consumer starts: every message in the stream, the last one, only new ones, or from `opt_start_time`. An existing consumer keeps its position.",
      ),
    ),
    "all",
  ),
  opt_start_time: v.optional(
    v.pipe(
      v.string(),
      v.check((t) => !Number.isNaN(Date.parse(t)), "must be an ISO 8601 timestamp"),
      v.description("Start time (ISO 8601) for `deliver_policy: by_start_time`."),
    ),
  ),
  ack_wait_seconds: v.optional(
    v.pipe(
      positiveInt(86_400),
      v.description(
        'Seconds the server waits for an acknowledgement before it redelivers. While a batch is in the relay\'s hands (the inbox write may take longer) it is extended with "working" signals.',
      ),
    ),
    30,
  ),
  max_deliver: v.optional(
    v.pipe(
      intInRange(-1),
      v.check((n) => n !== 0, "must be -1 or at least 1"),
      v.description(
        "Deliveries of a message after which JetStream stops redelivering it (-1: no limit). The relay acknowledges every message it takes, dead-lettering what cannot be written, so only repeated crashes with the same batch in flight can use them up; a message whose last delivery is handed back unwritten is dead-lettered instead.",
      ),
    ),
    5,
  ),
  request_timeout_ms: v.optional(
    v.pipe(positiveInt(600_000), v.description("Wait this long for the server to answer a JetStream API call or confirm an acknowledgement.")),
    5000,
  ),
});

/** `consumer` is an alias of `durable_name`; the canonical key wins. */
export const NatsSourceConfig = v.pipe(
  NatsSourceObject,
  v.transform(({ consumer, ...rest }) => ({ ...rest, durable_name: rest.durable_name ?? consumer })),
  streamToCreateNamed(),
  v.check((c) => c.deliver_policy !== "by_start_time" || c.opt_start_time !== undefined, "deliver_policy by_start_time needs opt_start_time"),
  clientCertWithKey(),
);

export type NatsSourceOptions = v.InferOutput<typeof NatsSourceConfig>;

/** What connecting needs; both sides' options have it. */
export type ConnectionOptionsOf = v.InferOutput<v.ObjectSchema<typeof connectionKeys, undefined>>;


/** The template as a subject pattern: every token holding a placeholder becomes `*`. */
export function templatePattern(template: string): string {
  return template
    .split(".")
    .map((t) => (hasPlaceholder(t) ? "*" : t))
    .join(".");
}

/** Subjects for a created stream: the literal leading tokens plus `>` (placeholder values may hold dots). */
export function defaultStreamSubjects(template: string): string[] {
  const tokens = template.split(".");
  const firstVariable = tokens.findIndex((t) => hasPlaceholder(t));
  if (firstVariable === -1) return [template];
  if (firstVariable === 0) {
    throw configError(`sink.create_stream: subject template "${template}" starts with a placeholder; set sink.stream_subjects`);
  }
  return [[...tokens.slice(0, firstVariable), ">"].join(".")];
}

/** True when every subject that `pattern` matches is also matched by `filter`. */
export function filterCovers(filter: string, pattern: string): boolean {
  const f = filter.split(".");
  const p = pattern.split(".");
  for (let i = 0; i < f.length; i++) {
    if (f[i] === ">") return i < p.length;
    if (i >= p.length || p[i] === ">") return false;
    if (f[i] !== "*" && f[i] !== p[i]) return false;
  }
  return f.length === p.length;
}

/** True when some subject is matched by both patterns. */
export function subjectsOverlap(a: string, b: string): boolean {
  const x = a.split(".");
  const y = b.split(".");
  for (let i = 0; ; i++) {
    const s = x[i];
    const t = y[i];
    if (s === undefined || t === undefined) return s === t;
    if (s === ">" || t === ">") return true;
    if (s !== "*" && t !== "*" && s !== t) return false;
  }
}

/** Why a rendered subject cannot be published to, or null when it can (docs/interface.md §6.3). */
export function invalidSubject(subject: string): string | null {
  if (subject.length === 0) return "the subject is empty";
  if (/[\s\u0000]/.test(subject)) return `subject "${subject}" contains whitespace`;
  const tokens = subject.split(".");
  if (tokens.some((t) => t.length === 0)) return `subject "${subject}" has an empty token`;
  if (tokens.some((t) => t === "*" || t === ">")) return `subject "${subject}" contains a wildcard token`;
  return null;
}

/** A durable name must not hold `.`, `*`, `>`, slashes or whitespace. */
export const BAD_DURABLE = /[.*>/\\\s]/;

export const defaultDurableName = (pipeline: string) => `pgtrickle-relay-${pipeline}`.replace(/[^A-Za-z0-9_-]/g, "_");
