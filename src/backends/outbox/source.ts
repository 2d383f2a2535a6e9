/**
 * The outbox source's batches and their acknowledgement (docs/interface.md §7.5): offsets, the
 * position within a change set that spans batches, dead letters for rows that cannot be decoded.
 * Rows are read by simple.ts or group.ts; their messages are made by messages.ts.
 */
import { sourceSpec, type BackendContext, type Batch, type DeadLetter, type Lag, type LockHolder, type Source } from "../types.ts";
import { qualifiedIdent, type Sql } from "../../db.ts";
import { configError, decodeError, errorKind, errorMessage } from "../../errors.ts";
import type { Message } from "../../message.ts";
import { planFor, safeOutboxId, type HeaderRow, type Plan } from "./decode.ts";
import { enableOutbox, findOutbox, type OutboxTarget } from "./resolve.ts";
import { Sleeper } from "../../sleep.ts";
import { loadSourcePosition, saveSourcePosition } from "../../source-positions.ts";
import { OutboxSourceConfig } from "./config.ts";
import { ConsumerGroup } from "./group.ts";
import { RowMessages } from "./messages.ts";
import { SimpleReader } from "./simple.ts";

/**
 * How far into one outbox row's messages the acknowledged batches went, when a batch ended in
 * the middle of it (a claim-check change set of thousands of rows spans many batches). Stored in
 * pgtrickle.relay_source_positions with the batch's acknowledgement, so that a restart resumes
 * after the `delivered` first messages instead of re-sending the whole set; the messages keep
 * their dedup keys, which depend only on the row's position in the set.
 */
interface WithinRow {
  /** The outbox table too: a pipeline re-pointed at another outbox must not skip rows of its id. */
  outbox: string;
  outbox_id: string;
  delivered: number;
}

/** The batch being filled: its messages, dead letters, the last header row it completes. */
class BatchFill {
  messages: Message[] = [];
  deadLetters: DeadLetter[] = [];
  completed: string | null = null;
  claimChecks: string[] = [];
  /** `completed` when the last batch was taken. */
  private taken: string | null = null;

  constructor(private readonly make: (fill: BatchFill, within: WithinRow | null) => Batch) {}

  /** Nothing to send or to commit (`completed` stays: it is where the next batch's offset goes). */
  get empty(): boolean {
    return this.messages.length === 0 && this.deadLetters.length === 0 && this.claimChecks.length === 0 && this.completed === this.taken;
  }

  /** The batch so far; the fill starts over (the offset it completes carries on). */
  take(within: WithinRow | null = null): Batch {
    const batch = this.make(this, within);
    this.messages = [];
    this.deadLetters = [];
    this.claimChecks = [];
    this.taken = this.completed;
    return batch;
  }
}

/**
 * The forward source: reads an outbox, decodes every payload shape, and hands out batches whose
 * ack() commits the offset (and then, if configured, releases claim-check rows).
 */
export class OutboxSource implements Source {
  readonly describe: string;
  readonly reportsPolls = true;
  private target!: OutboxTarget;
  private committed = 0n;
  private consumerId: string;
  private readonly sleeper = new Sleeper();
  private readonly simple: SimpleReader;
  private readonly group: ConsumerGroup | null;
  private messages!: RowMessages;
  /** The stored position within an outbox row, if the last acknowledged batch ended inside one. */
  private withinRow: WithinRow | null = null;

  constructor(
    private readonly cfg: OutboxSourceConfig,
    private readonly ctx: BackendContext,
  ) {
    this.consumerId = cfg.consumer_id ?? `${ctx.relayGroupId}:${ctx.pipeline}`;
    this.simple = new SimpleReader(ctx.sql, cfg.batch_size);
    this.group = cfg.group ? new ConsumerGroup(ctx.sql, cfg, ctx, cfg.group, this.consumerId) : null;
    this.describe = `outbox ${cfg.outbox}${cfg.group ? ` (group ${cfg.group}, consumer ${this.consumerId})` : ""}`;
  }

  private headerTable() {
    return qualifiedIdent(this.sql, "pgtrickle", this.target.outboxTable);
  }

  get sql(): Sql {
    return this.ctx.sql;
  }

  /** True once start() resolved the outbox. */
  get ready(): boolean {
    return this.target !== undefined;
  }

  get outboxTable(): string {
    return this.target.outboxTable;
  }

  get groupMode(): boolean {
    return !!this.cfg.group;
  }

  async start(): Promise<void> {
    let target = await findOutbox(this.sql, this.ctx.pipeline, this.cfg.outbox);
    if (!target && this.cfg.auto_enable_outbox) {
      this.ctx.log.info(`enabling the outbox of ${this.cfg.outbox} (auto_enable_outbox)`);
      await enableOutbox(this.sql, this.cfg.outbox, this.cfg.retention_hours);
      target = await findOutbox(this.sql, this.ctx.pipeline, this.cfg.outbox);
    }
    if (!target) {
      throw configError(
        `pipeline '${this.ctx.pipeline}': source.outbox '${this.cfg.outbox}' has no outbox (no pgtrickle.pgt_outbox_config row); run pgtrickle.enable_outbox('${this.cfg.outbox}') or set "auto_enable_outbox": true`,
      );
    }
    this.target = target;
    this.messages = new RowMessages(this.sql, this.cfg, this.ctx, target);
    if (this.group) this.committed = await this.group.ensure(target.outboxTable);
    else this.committed = await this.readSimpleOffset();
    this.withinRow = await this.readWithinRow();
    this.group?.startHeartbeat();
  }

  wake(): void {
    this.sleeper.wake();
  }

  async close(): Promise<void> {
    this.group?.close();
    this.sleeper.wake();
  }

  /** ack(owner) proves ownership in its commit statement (see commit). */
  readonly foldsOwnership = true;

  /**
   * Simple mode reads ahead any number of batches: polls continue from `readPos`, and acks commit
   * each batch's own position, in order. Group mode does not: poll_outbox returns the rows after
   * the COMMITTED offset, so a poll before the previous batch's commit would return it again
   * (docs/interface.md §2.7).
   */
  get readAhead(): number {
    return this.groupMode ? 1 : Number.POSITIVE_INFINITY;
  }

  async *batches(signal: AbortSignal): AsyncIterable<Batch> {
    signal.addEventListener("abort", () => this.sleeper.wake(), { once: true });
    // A new pass (after a failure) starts again after the last commit; nothing else is in flight.
    this.simple.readPos = this.committed;
    let idlePolls = 0;
    const fill = new BatchFill((f, within) => this.makeBatch(f.messages, f.deadLetters, f.completed, f.claimChecks, within));
    while (!signal.aborted) {
      const started = performance.now();
      const headers = this.group ? await this.group.poll() : await this.simple.poll(this.target);
      this.ctx.onPoll?.((performance.now() - started) / 1000);
      let spilled = false; // this poll filled at least one whole batch
      for await (const batch of this.expandHeaders(headers, fill)) {
        spilled = true;
        yield batch;
      }
      // The remainder of a poll that spilled over max_batch_messages exists only because a poll is
      // not a whole number of batches: when more rows are waiting (the poll was full) the next poll
      // tops it up instead of it going out small — fewer batches, one commit and one sink round
      // trip each. A poll smaller than a batch still goes out as it is (batch_size is the knob).
      // Group mode never carries one over: its next poll starts after the committed offset.
      const carry = spilled && !this.group && headers.length === this.cfg.batch_size && !this.simple.blockedOnGap;
      if (!carry && !fill.empty) yield fill.take();
      if (headers.length === 0) {
        if (this.ctx.drain && !this.simple.blockedOnGap) return;
        const base = this.cfg.poll_interval_ms;
        const delay = this.simple.blockedOnGap ? Math.min(base, 200) : Math.min(base * 2 ** idlePolls, Math.max(base, 5000));
        idlePolls++;
        await this.sleeper.sleep(delay);
        continue;
      }
      idlePolls = 0;
    }
  }

  /**
   * Adds polled header rows to `fill`, yielding every batch that reaches max_batch_messages; the
   * last, partial one stays in `fill` for the caller to send or top up.
   */
  private async *expandHeaders(headers: HeaderRow[], fill: BatchFill): AsyncIterable<Batch> {
    for (const header of headers) {
      let plan: Plan;
      try {
        plan = planFor(header, this.target.streamTable, { summaryMessages: this.cfg.summary_messages, keepInternalColumns: this.cfg.keep_internal_columns });
        safeOutboxId(header.id);
      } catch (err) {
        fill.deadLetters.push(this.decodeDeadLetter(header, err));
        fill.completed = header.id;
        continue;
      }
      if (fill.messages.length > 0 && !this.fitsBatch(plan, fill.messages.length)) yield fill.take();
      // Messages of this row that acknowledged batches already carried (a restart mid-row).
      const resumes = this.withinRow?.outbox === this.target.outboxTable && this.withinRow.outbox_id === header.id;
      let delivered = resumes ? this.withinRow!.delivered : 0;
      try {
        if (plan.kind === "claim_check") {
          for await (const chunk of this.messages.messagesOf(header, plan, delivered)) {
            for (const batch of this.addMessages(fill, chunk, header.id, delivered)) yield batch;
            delivered += chunk.length;
          }
        } else {
          // Inline rows need no await: most header rows are these (see RowMessages.inlineMessages).
          for (const batch of this.addMessages(fill, this.messages.inlineMessages(header, plan, delivered), header.id, delivered)) yield batch;
        }
      } catch (err) {
        if (errorKind(err) !== "decode") throw err;
        fill.deadLetters.push(this.decodeDeadLetter(header, err));
      }
      fill.completed = header.id;
      if (plan.kind === "claim_check") fill.claimChecks.push(header.id);
    }
  }

  /**
   * Adds `messages` of header row `id` to `fill`, after the `delivered` first ones of that row;
   * returns the batches this filled to max_batch_messages (each ending inside the row, so each
   * saves its position in it).
   */
  private addMessages(fill: BatchFill, messages: Message[], id: string, delivered: number): Batch[] {
    const full: Batch[] = [];
    for (const m of messages) {
      fill.messages.push(m);
      delivered++;
      if (fill.messages.length >= this.cfg.max_batch_messages) full.push(fill.take({ outbox: this.target.outboxTable, outbox_id: id, delivered }));
    }
    return full;
  }

  /**
   * Whether a change set can join a batch already holding `held` messages. One that cannot
   * starts a batch of its own, so it is always cut into batches at the same places (every
   * max_batch_messages from its first message), whatever came before it in the poll: a replay
   * then hands the sink the same slices, and sinks that group a batch into requests (the HTTP
   * sink's Idempotency-Key, docs in src/backends/http/) send the same requests again. A
   * claim-check change set, whose size is only announced, always starts its own batch.
   */
  private fitsBatch(plan: Plan, held: number): boolean {
    if (plan.kind === "claim_check") return false;
    const count = plan.kind === "rows" ? plan.inserted.length + plan.deleted.length : plan.kind === "summary" ? 1 : 0;
    return held + count <= this.cfg.max_batch_messages;
  }

  private decodeDeadLetter(header: HeaderRow, err: unknown): DeadLetter {
    if (this.cfg.on_decode_error === "halt") {
      throw configError(`pipeline '${this.ctx.pipeline}': outbox ${this.target.outboxTable} id=${header.id} cannot be decoded and on_decode_error is "halt": ${errorMessage(err)}`);
    }
    this.ctx.log.warn(`outbox ${this.target.outboxTable} id=${header.id} cannot be decoded; dead-lettered: ${errorMessage(err)}`);
    return {
      dedup_key: `${this.target.outboxTable}:${header.id}:decode`,
      outbox_id: header.id,
      message: { header: { ...header, created_at: String(header.created_at) }, stream_table: this.target.streamTable },
      error: errorMessage(err),
      kind: "decode",
    };
  }

  private makeBatch(messages: Message[], deadLetters: DeadLetter[], completed: string | null, claimChecks: string[], within: WithinRow | null): Batch {
    return {
      messages,
      deadLetters,
      // Its ack moves the offset (and the position within a row) past every earlier batch's;
      // releasing claim-check rows is the one thing a later ack would not do for it.
      cumulativeAck: completed !== null && claimChecks.length === 0,
      ack: async (owner) => {
        const advance = completed !== null && BigInt(completed) > this.committed ? completed : null;
        let owned = true;
        if (within || this.withinRow) owned = await this.commitWithin(advance, within, owner);
        else if (advance) owned = await this.commit(this.sql, advance, owner);
        if (!owned) return false;
        if (advance) this.committedTo(advance);
        if (claimChecks.length > 0 && this.cfg.release_claim_check) await this.releaseClaimChecks(claimChecks);
        return true;
      },
    };
  }

  /**
   * The offset and the position within a row in one transaction (a crash leaves both or neither),
   * or the position alone when the offset does not move.
   * Once batches no longer end inside a row the position becomes `null` (an UPDATE: the relay's
   * role may insert and update relay_source_positions, not delete).
   */
  private async commitWithin(advance: string | null, within: WithinRow | null, owner?: LockHolder): Promise<boolean> {
    if (advance === null) {
      // No offset to move (a batch inside a change set): the position alone, in one statement that
      // proves ownership too — one round trip where a transaction took four, once per batch of a
      // claim-check change set (bench/RESULTS.md, "Claim-check").
      if (!(await saveSourcePosition(this.sql, this.ctx, JSON.stringify(within), owner ? ownedBy(this.sql, owner) : undefined))) return false;
      this.withinRow = within;
      return true;
    }
    const notOwned = new Error("not owned");
    try {
      await this.sql.begin(async (transaction) => {
        const tx = transaction as unknown as Sql; // the same tagged queries, on the transaction's connection
        if (!(await this.commit(tx, advance, owner))) throw notOwned; // rolls the transaction back
        await saveSourcePosition(tx, this.ctx, JSON.stringify(within));
      });
    } catch (err) {
      if (err === notOwned) return false;
      throw err;
    }
    this.withinRow = within;
    return true;
  }

  /** The stored position within a row; one that cannot be read only costs a replay of that row. */
  private async readWithinRow(): Promise<WithinRow | null> {
    const text = await loadSourcePosition(this.sql, this.ctx);
    if (text === null) return null;
    try {
      const parsed = JSON.parse(text) as Partial<WithinRow> | null;
      if (parsed === null) return null;
      const { outbox, outbox_id, delivered } = parsed;
      if (typeof outbox === "string" && typeof outbox_id === "string" && Number.isSafeInteger(delivered) && delivered! > 0) {
        return { outbox, outbox_id, delivered: delivered! };
      }
    } catch {
      // falls through to the warning
    }
    this.ctx.log.warn(`ignoring an unreadable position in pgtrickle.relay_source_positions (${text.slice(0, 100)}): that outbox row is sent again from its start`);
    return null;
  }

  async decodeStored(stored: unknown): Promise<Message[]> {
    const header = (stored as { header?: HeaderRow } | null)?.header;
    if (!header || typeof header.id !== "string") throw decodeError("dead letter holds no outbox header row");
    const plan = planFor(header, this.target.streamTable, { summaryMessages: this.cfg.summary_messages, keepInternalColumns: this.cfg.keep_internal_columns });
    const out: Message[] = [];
    for await (const chunk of this.messages.messagesOf(header, plan)) out.push(...chunk);
    return out;
  }

  // ---- simple mode: offsets in relay_consumer_offsets -------------------------------------

  private async readSimpleOffset(): Promise<bigint> {
    const [row] = await this.sql<{ last: string }[]>`
      SELECT last_change_id::text AS last FROM pgtrickle.relay_consumer_offsets
      WHERE relay_group_id = ${this.ctx.relayGroupId} AND pipeline_id = ${this.ctx.pipeline}`;
    if (row) return BigInt(row.last);
    if (this.cfg.start_position === "earliest") return 0n;
    // `latest`: the current end of the outbox becomes the stored offset, so a restart before the
    // first commit does not fall back to the beginning.
    const [end] = await this.sql<{ max: string }[]>`SELECT coalesce(max(h.id), 0)::text AS max FROM ${this.headerTable()} AS h`;
    await this.commit(this.sql, end!.max);
    return BigInt(end!.max);
  }

  /**
   * Writes the offset (on `sql`, which may be a transaction); committedTo() follows once it
   * landed. With `owner`, the statement writes only while that backend holds the pipeline's lock
   * (the proof of ownership and the commit in one round trip, docs/PIPELINE.md): false when it
   * wrote nothing — the lock is gone, or another owner already moved the offset further.
   */
  private async commit(sql: Sql, id: string, owner?: LockHolder): Promise<boolean> {
    const owned = owner ? ownedBy(sql, owner) : sql`true`;
    if (this.groupMode) {
      const rows = await sql`SELECT pgtrickle.commit_offset(${this.cfg.group!}, ${this.consumerId}, ${id}::bigint) WHERE ${owned}`;
      return rows.length > 0;
    }
    // Never moves the offset backwards: a stale process cannot rewind a newer owner
    // (docs/interface.md §3.1).
    const result = await sql`
      INSERT INTO pgtrickle.relay_consumer_offsets (relay_group_id, pipeline_id, last_change_id, worker_id, updated_at)
      SELECT ${this.ctx.relayGroupId}, ${this.ctx.pipeline}, ${id}::bigint, ${workerId()}, now() WHERE ${owned}
      ON CONFLICT (relay_group_id, pipeline_id) DO UPDATE
        SET last_change_id = EXCLUDED.last_change_id, worker_id = EXCLUDED.worker_id, updated_at = now()
        WHERE relay_consumer_offsets.last_change_id <= EXCLUDED.last_change_id`;
    return !owner || result.count > 0;
  }

  /** After the commit landed (not before: a failed transaction must leave the offset to retry). */
  private committedTo(id: string): void {
    this.committed = BigInt(id);
    this.simple.forgetGapsUpTo(this.committed);
  }

  private async releaseClaimChecks(ids: string[]): Promise<void> {
    const last = ids[ids.length - 1]!;
    await this.sql`SELECT pgtrickle.outbox_rows_consumed(${`${this.target.schema}.${this.target.streamTable}`}, ${last}::bigint)`;
  }

  // ---- lag ---------------------------------------------------------------------------------

  async lag(): Promise<Lag | null> {
    if (!this.target) return null;
    const [row] = await this.sql<{ max: string | null; oldest: number | null }[]>`
      SELECT (SELECT max(id) FROM ${this.headerTable()})::text AS max,
             (SELECT extract(epoch FROM now() - created_at)::float8 FROM ${this.headerTable()}
              WHERE id > ${this.committed.toString()}::bigint ORDER BY id LIMIT 1) AS oldest`;
    const max = BigInt(row?.max ?? "0");
    const rows = max > this.committed ? Number(max - this.committed) : 0;
    return { rows, seconds: rows === 0 ? 0 : Math.max(0, row?.oldest ?? 0) };
  }

  get committedOffset(): string {
    return this.committed.toString();
  }
}

/**
 * True while backend `owner.pid` holds the pipeline's advisory lock (docs/interface.md §7.3): the
 * same pg_locks test the lock's own session makes in Coordinator's LockSession.holds, asked from
 * the commit's connection.
 */
function ownedBy(sql: Sql, owner: LockHolder) {
  return sql`EXISTS (SELECT 1 FROM pg_catalog.pg_locks l
    WHERE l.pid = ${owner.pid}::int AND l.locktype = 'advisory' AND l.objsubid = 2 AND l.granted
      AND l.classid = hashtext(${owner.groupId})::oid AND l.objid = hashtext(${owner.pipeline})::oid)`;
}

function workerId(): string {
  return `${process.env.HOSTNAME ?? "relay"}:${process.pid}`;
}

export default sourceSpec({ type: "outbox", config: OutboxSourceConfig, create: (cfg, ctx) => new OutboxSource(cfg, ctx) });
