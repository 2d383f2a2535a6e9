/** The outbox source's options; docs/OPTIONS.md is generated from their descriptions. */
import * as v from "valibot";
import { positiveIntOption } from "../schema.ts";
import { DEFAULT_SUBJECT_TEMPLATE } from "../../message.ts";

/** Options of the outbox source (docs/interface.md §5.2). Pipeline tuning keys live here too. */
export const OutboxSourceConfig = v.looseObject({
  outbox: v.pipe(
    v.string(),
    v.minLength(1),
    v.description("Stream table (`schema.table` or `table`) or outbox table name; resolved via pgt_outbox_config."),
  ),
  group: v.pipe(
    v.optional(v.nullable(v.string()), null),
    v.description("Consumer group: set ⇒ consumer-group mode (poll_outbox/commit_offset); null ⇒ simple mode."),
  ),
  retention_hours: positiveIntOption(24, "Only used to enable the outbox when `auto_enable_outbox` is true."),
  consumer_id: v.pipe(
    v.optional(v.string()),
    v.description("Group mode: the consumer id; must stay the same across restarts. Default `<relay group>:<pipeline>`."),
  ),
  visibility_seconds: positiveIntOption(30, "Group mode: lease length passed to poll_outbox, extended while a batch is slow."),
  create_group: v.pipe(
    v.optional(v.boolean(), true),
    v.description("Group mode: create the group when missing (checked first: create_consumer_group is not idempotent)."),
  ),
  auto_offset_reset: v.pipe(
    v.optional(v.picklist(["earliest", "latest"]), "earliest"),
    v.description("Group mode: start position of a group this pipeline creates."),
  ),
  batch_size: positiveIntOption(100, "Outbox header rows per poll. One header row may expand to many messages."),
  max_batch_messages: positiveIntOption(
    1000,
    "Most messages handed to the sink at once. A header row that does not fit in the batch being filled starts the next one, and a larger one is split every this many messages, so a change set is cut at the same places on every replay. Clipped to a third of `--sink-max-inflight`; a batch may hold the rows of two polls (docs/PIPELINE.md).",
  ),
  poll_interval_ms: positiveIntOption(1000, "Idle poll interval; doubles while idle up to max(this, 5 s). A NOTIFY cuts the sleep short."),
  subject_template: v.pipe(
    v.optional(v.string(), DEFAULT_SUBJECT_TEMPLATE),
    v.description("Subject of each message, e.g. `pgtrickle.{stream_table}.{op}`; sinks may have their own template."),
  ),
  claim_check_fetch_size: positiveIntOption(1000, "Delta-table rows read per query for claim-check rows."),
  release_claim_check: v.pipe(
    v.optional(v.boolean(), false),
    v.description("Call outbox_rows_consumed after committing claim-check rows. It frees them for EVERY reader."),
  ),
  on_decode_error: v.pipe(
    v.optional(v.picklist(["dead_letter", "halt"]), "dead_letter"),
    v.description("An undecodable row: `dead_letter` (row to relay_dead_letters, offset advances) or `halt`."),
  ),
  summary_messages: v.pipe(
    v.optional(v.boolean(), true),
    v.description("Emit one `summary` message for rows without data (NULL payload, pg_tide counts)."),
  ),
  keep_internal_columns: v.pipe(v.optional(v.boolean(), false), v.description("Keep the extension's internal `__pgt_*` columns in row payloads.")),
  auto_enable_outbox: v.pipe(
    v.optional(v.boolean(), false),
    v.description("Call enable_outbox(stream_table, retention_hours) when the stream table has no outbox."),
  ),
  start_position: v.pipe(
    v.optional(v.picklist(["earliest", "latest"]), "earliest"),
    v.description("Simple mode, a pipeline without a stored offset (new, or new to this relay group): `earliest` relays every row still in the outbox, `latest` only rows written after its first start."),
  ),
});
export type OutboxSourceConfig = v.InferOutput<typeof OutboxSourceConfig>;
