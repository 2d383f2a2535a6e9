/**
 * Options of the Redis Streams sink and source (docs/interface.md §5.3, §5.4, §6.4, §6.5): the
 * valibot schemas, with each key's documentation in its v.description().
 */
import * as v from "valibot";
import { TLS_ALIAS_ENTRIES, TLS_ENTRIES } from "../../tls.ts";
import { reverseSourceKeys } from "../../inbound.ts";
import { intInRange, nonEmptyString, positiveInt } from "../schema.ts";


export const DEFAULT_STREAM_KEY = "pgtrickle:{stream_table}";
export const DEFAULT_GROUP = "pgtrickle-relay";

/** `stream_key` means the same on both sides and is documented once for both. */
const STREAM_KEY_DOC =
  "Sink: the stream key per message, rendered with {stream_table} {schema} {outbox} {pipeline} {op} {outbox_id} {refresh_id} and row fields. Source (required): the stream to consume.";

/** Connection and authentication keys, the same for the sink and the source. */
const connectionKeys = {
  url: v.pipe(
    nonEmptyString(),
    v.description("`redis://[user:password@]host:6379[/db]`; `rediss://` turns TLS on. Prefer the `password` key with a `${env:…}` secret over a password in the URL."),
  ),
  username: v.pipe(v.optional(nonEmptyString()), v.description("ACL user name (Redis 6+); overrides the URL's.")),
  password: v.pipe(v.optional(v.string()), v.description("Password (`AUTH`); overrides the URL's.")),
  ...TLS_ENTRIES,
  ...TLS_ALIAS_ENTRIES.redis,
  connect_timeout_ms: v.pipe(v.optional(positiveInt(600_000), 5000), v.description("Give up connecting after this long.")),
  command_timeout_ms: v.pipe(
    v.optional(positiveInt(600_000), 5000),
    v.description("A command without a reply after this long fails as transient (a blocking read gets `block_ms` more)."),
  ),
};

export const RedisSinkConfig = v.looseObject({
  /** Ignored here: the loader has already chosen this backend by it. */
  type: v.optional(v.string()),
  ...connectionKeys,
  stream_key: v.pipe(v.optional(nonEmptyString(), DEFAULT_STREAM_KEY), v.description(STREAM_KEY_DOC)),
  maxlen: v.pipe(v.optional(positiveInt()), v.description("Cap each stream near this many entries (`XADD … MAXLEN ~ n`). Absent: no trimming.")),
  dedup_window_seconds: v.pipe(
    v.optional(intInRange(0, 7 * 86400), 0),
    v.description("Seconds within which a dedup key already added to a stream is not added again (a Lua script keeps recent keys in a sorted set `<stream key>:pgt_dedup`). 0: plain XADD, and a replayed batch appends duplicates that consumers drop by `pgt_dedup_key`."),
  ),
  max_in_flight: v.pipe(v.optional(positiveInt(100_000), 1000), v.description("XADD commands sent before their replies are awaited (one pipeline).")),
});

export type RedisSinkOptions = v.InferOutput<typeof RedisSinkConfig>;

const RedisSourceObject = v.looseObject({
  type: v.optional(v.string()),
  ...connectionKeys,
  ...reverseSourceKeys,
  stream_key: v.pipe(nonEmptyString(), v.description(STREAM_KEY_DOC)),
  group_name: v.pipe(
    v.optional(nonEmptyString()),
    v.description("Consumer group (default `pgtrickle-relay`); created at start when missing. Alias `group`."),
  ),
  group: v.pipe(v.optional(nonEmptyString()), v.description("Alias of `group_name`.")),
  consumer_name: v.pipe(
    v.optional(nonEmptyString()),
    v.description("This relay's name in the group. Default `<relay group id>:<pipeline>`: stable, so after a restart the entries it had read but not acknowledged are its own again and read first."),
  ),
  start_id: v.pipe(
    v.optional(nonEmptyString(), "0"),
    v.description("Where a newly created group starts: `0` = the whole stream, `$` = only entries added later, or an entry id."),
  ),
  block_ms: v.pipe(
    v.optional(positiveInt(600_000), 5000),
    v.description("How long a read waits for new entries (`XREADGROUP … BLOCK`); drain mode does not wait."),
  ),
  count: v.pipe(v.optional(positiveInt()), v.description("Entries per read (`COUNT`); default and upper bound `batch_size`.")),
  claim_idle_ms: v.pipe(
    v.optional(intInRange(0), 60_000),
    v.description("Entries another consumer of the group has left unacknowledged this long (it crashed, or was renamed) are claimed with XAUTOCLAIM and relayed. 0: never claim."),
  ),
  mkstream: v.pipe(v.optional(v.boolean(), true), v.description("Create the stream along with the group when the key does not exist yet.")),
});

/** `group` is an alias of `group_name`; the canonical key wins. */
export const RedisSourceConfig = v.pipe(
  RedisSourceObject,
  v.transform(({ group, ...rest }) => ({ ...rest, group_name: rest.group_name ?? group ?? DEFAULT_GROUP })),
  v.check((c) => c.start_id === "$" || /^\d+(-\d+)?$/.test(c.start_id), "start_id must be 0, $ or an entry id like 1700000000000-0"),
);

export type RedisSourceOptions = v.InferOutput<typeof RedisSourceConfig>;

/** What connecting needs; both sides' options have it. */
export type ConnectionOptionsOf = v.InferOutput<v.ObjectSchema<typeof connectionKeys, undefined>>;
export type Side = "sink" | "source";
