import { sourceSpec, type BackendContext, type Batch, type DeadLetter, type Lag, type Source } from "../types.ts";
import { ident, qualifiedIdent, type Sql } from "../../db.ts";
import { configError, decodeError, errorKind, errorMessage, RelayError } from "../../errors.ts";
import { forwardDedupKey, renderTemplate, type Message, type Op } from "../../message.ts";
import { cleanRow, planFor, safeOutboxId, summaryPayload, type HeaderRow, type Plan } from "./decode.ts";
import { enableOutbox, findOutbox, type OutboxTarget } from "./resolve.ts";
import { Sleeper } from "../../sleep.ts";
import { loadSourcePosition, saveSourcePosition } from "../../source-positions.ts";
import { OutboxSourceConfig } from "./config.ts";

/** How far the simple-mode reader may go: see `deliverablePrefix`. */
interface WriterCheck {
  writers: Set<string>;
  /** Highest id the sequence has handed out at check time. */
  hwm: bigint;
}

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

/** Bigints as text (exact); ORDER BY must then name `h.id`, or it would sort the text alias. */
const HEADER_COLUMNS =
  "h.id::text AS id, h.refresh_id::text AS refresh_id, h.created_at, h.inserted_count::text AS inserted_count, h.deleted_count::text AS deleted_count, h.is_claim_check, h.payload";

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
  /** Gaps in the id sequence seen earlier, with the writers that could still fill them. */
  private readonly openGaps = new Map<string, Set<string>>();
  /** True when the last poll stopped at a gap that may still be filled. */
  private blockedOnGap = false;
  private heartbeat: ReturnType<typeof setInterval> | undefined;
  /** The stored position within an outbox row, if the last acknowledged batch ended inside one. */
  private withinRow: WithinRow | null = null;

  constructor(
    private readonly cfg: OutboxSourceConfig,
    private readonly ctx: BackendContext,
  ) {
    this.consumerId = cfg.consumer_id ?? `${ctx.relayGroupId}:${ctx.pipeline}`;
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
    if (this.groupMode) await this.ensureGroup();
    else this.committed = await this.readSimpleOffset();
    this.withinRow = await this.readWithinRow();
    if (this.groupMode) {
      clearInterval(this.heartbeat); // start() runs again after a transient failure
      this.heartbeat = setInterval(() => {
        this.sql`SELECT pgtrickle.consumer_heartbeat(${this.cfg.group!}, ${this.consumerId})`.catch((err) =>
          this.ctx.log.warn(`consumer heartbeat failed: ${errorMessage(err)}`),
        );
      }, 10_000);
    }
  }

  wake(): void {
    this.sleeper.wake();
  }

  async close(): Promise<void> {
    clearInterval(this.heartbeat);
    clearInterval(this.leaseTimer);
    this.sleeper.wake();
  }

  async *batches(signal: AbortSignal): AsyncIterable<Batch> {
    signal.addEventListener("abort", () => this.sleeper.wake(), { once: true });
    let idlePolls = 0;
    while (!signal.aborted) {
      const started = performance.now();
      const headers = this.groupMode ? await this.pollGroup() : await this.pollSimple();
      this.ctx.onPoll?.((performance.now() - started) / 1000);
      if (headers.length === 0) {
        if (this.ctx.drain && !this.blockedOnGap) return;
        const base = this.cfg.poll_interval_ms;
        const delay = this.blockedOnGap ? Math.min(base, 200) : Math.min(base * 2 ** idlePolls, Math.max(base, 5000));
        idlePolls++;
        await this.sleeper.sleep(delay);
        continue;
      }
      idlePolls = 0;
      yield* this.expandHeaders(headers);
    }
  }

  /** Turns polled header rows into batches of at most max_batch_messages messages. */
  private async *expandHeaders(headers: HeaderRow[]): AsyncIterable<Batch> {
    let messages: Message[] = [];
    let deadLetters: DeadLetter[] = [];
    let completed: string | null = null;
    let claimChecks: string[] = [];
    const take = (within: WithinRow | null = null) => {
      const batch = this.makeBatch(messages, deadLetters, completed, claimChecks, within);
      messages = [];
      deadLetters = [];
      claimChecks = [];
      return batch;
    };
    for (const header of headers) {
      let plan: Plan;
      try {
        plan = planFor(header, this.target.streamTable, { summaryMessages: this.cfg.summary_messages, keepInternalColumns: this.cfg.keep_internal_columns });
        safeOutboxId(header.id);
      } catch (err) {
        deadLetters.push(this.decodeDeadLetter(header, err));
        completed = header.id;
        continue;
      }
      if (messages.length > 0 && !this.fitsBatch(plan, messages.length)) yield take();
      // Messages of this row that acknowledged batches already carried (a restart mid-row).
      const resumes = this.withinRow?.outbox === this.target.outboxTable && this.withinRow.outbox_id === header.id;
      let delivered = resumes ? this.withinRow!.delivered : 0;
      try {
        for await (const chunk of this.messagesOf(header, plan, delivered)) {
          for (const m of chunk) {
            messages.push(m);
            delivered++;
            if (messages.length >= this.cfg.max_batch_messages) yield take({ outbox: this.target.outboxTable, outbox_id: header.id, delivered });
          }
        }
      } catch (err) {
        if (errorKind(err) !== "decode") throw err;
        deadLetters.push(this.decodeDeadLetter(header, err));
      }
      completed = header.id;
      if (plan.kind === "claim_check") claimChecks.push(header.id);
    }
    yield take();
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
      ack: async () => {
        const advance = completed !== null && BigInt(completed) > this.committed ? completed : null;
        if (within || this.withinRow) await this.commitWithin(advance, within);
        else if (advance) await this.commit(this.sql, advance);
        if (advance) this.committedTo(advance);
        if (claimChecks.length > 0 && this.cfg.release_claim_check) await this.releaseClaimChecks(claimChecks);
      },
    };
  }

  /**
   * The offset and the position within a row in one transaction: a crash leaves both or neither.
   * Once batches no longer end inside a row the position becomes `null` (an UPDATE: the relay's
   * role may insert and update relay_source_positions, not delete).
   */
  private async commitWithin(advance: string | null, within: WithinRow | null): Promise<void> {
    await this.sql.begin(async (transaction) => {
      const tx = transaction as unknown as Sql; // the same tagged queries, on the transaction's connection
      if (advance) await this.commit(tx, advance);
      await saveSourcePosition(tx, this.ctx, JSON.stringify(within));
    });
    this.withinRow = within;
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

  /**
   * The messages of one header row, in chunks, in delivery order: deletes, then inserts; the
   * first `skip` of them (already delivered) left out.
   */
  async *messagesOf(header: HeaderRow, plan: Plan, skip = 0): AsyncIterable<Message[]> {
    if (plan.kind === "none") return;
    if (plan.kind === "summary") {
      if (skip === 0) yield [this.message(header, "summary", 0, plan.payload, plan.fullRefresh, plan.refreshId)];
      return;
    }
    if (plan.kind === "rows") {
      // An UPDATE is a delete plus an insert: deletes go first so that a consumer applying
      // messages in order ends with the new row. Indexes follow docs/interface.md §6.2 (inserts first).
      const inserted = plan.inserted.length;
      const out: Message[] = [];
      plan.deleted.forEach((row, i) => out.push(this.message(header, "delete", inserted + i, row, plan.fullRefresh, plan.refreshId)));
      plan.inserted.forEach((row, i) => out.push(this.message(header, "insert", i, row, plan.fullRefresh, plan.refreshId)));
      for (let i = skip; i < out.length; i += this.cfg.max_batch_messages) yield out.slice(i, i + this.cfg.max_batch_messages);
      return;
    }
    yield* this.claimCheckMessages(header, plan.fullRefresh, plan.refreshId, skip);
  }

  /**
   * Claim-check rows are paged from the delta table by keyset (row_num > last) in pages of
   * claim_check_fetch_size, so memory stays flat however large the delta. The delta rows of a
   * committed header never change, so pages need no long-lived transaction or cursor, and the
   * first page after `skip` delivered messages is found with OFFSET (once, at a resume).
   */
  private async *claimCheckMessages(header: HeaderRow, fullRefresh: boolean, refreshId: string | null, skip: number): AsyncIterable<Message[]> {
    const cols = this.target.deltaColumns;
    if (!cols) {
      throw new RelayError(
        "transient",
        `claim-check row id=${header.id}: delta table pgtrickle."${this.target.deltaTable}" is missing or has unknown columns`,
      );
    }
    const table = qualifiedIdent(this.sql, "pgtrickle", this.target.deltaTable);
    const opCol = ident(this.sql, cols.op);
    const dataCol = ident(this.sql, cols.data);
    const opValues = (op: Op) => (op === "insert" ? ["INSERT", "I"] : ["DELETE", "D"]);
    const [counts] = await this.sql<{ inserted: string; deleted: string }[]>`
      SELECT count(*) FILTER (WHERE ${opCol} = ANY(${opValues("insert")}))::text AS inserted,
             count(*) FILTER (WHERE ${opCol} = ANY(${opValues("delete")}))::text AS deleted
        FROM ${table} WHERE outbox_id = ${header.id}::bigint`;
    const insertedCount = Number(counts?.inserted ?? 0);
    const deletedCount = Number(counts?.deleted ?? 0);
    for (const op of ["delete", "insert"] as const) {
      const skipHere = Math.min(skip, op === "delete" ? deletedCount : insertedCount);
      skip -= skipHere;
      let offset = skipHere;
      let after = "0";
      let index = (op === "insert" ? 0 : insertedCount) + skipHere;
      for (;;) {
        const page = await this.sql<{ row_num: string; data: unknown }[]>`
          SELECT d.row_num::text AS row_num, d.${dataCol} AS data FROM ${table} AS d
          WHERE d.outbox_id = ${header.id}::bigint AND d.${opCol} = ANY(${opValues(op)}) AND d.row_num > ${after}::bigint
          ORDER BY d.row_num OFFSET ${offset} LIMIT ${this.cfg.claim_check_fetch_size}`;
        if (page.length === 0) break;
        this.ctx.onClaimCheckFetch?.();
        yield page.map((r) => this.message(header, op, index++, r.data, fullRefresh, refreshId));
        after = page[page.length - 1]!.row_num;
        offset = 0;
        if (page.length < this.cfg.claim_check_fetch_size) break;
      }
    }
    if (insertedCount + deletedCount === 0 && Number(header.inserted_count) + Number(header.deleted_count) > 0) {
      if (header.payload === null || header.payload === undefined) {
        // 0.37–0.45: the delta table holds a snapshot, and an emptied stream table has none; a
        // summary tells downstream that this full refresh happened (its rows are all gone).
        if (this.cfg.summary_messages) yield [this.message(header, "summary", 0, summaryPayload(header, this.target.streamTable, refreshId), true, refreshId)];
        return;
      }
      // A designed v1 header announces its delta rows. The extension only warns when its insert
      // fails, and outbox_rows_consumed run by another pipeline deletes them for every reader:
      // either way the change set is gone, which must be visible rather than silent.
      throw decodeError(
        `claim-check row id=${header.id} announces ${Number(header.inserted_count) + Number(header.deleted_count)} rows but pgtrickle."${this.target.deltaTable}" holds none (failed extension insert, or released by another pipeline's release_claim_check)`,
      );
    }
  }

  private message(header: HeaderRow, op: Op, index: number, row: unknown, fullRefresh: boolean, refreshId: string | null): Message {
    const m: Message = {
      dedup_key: forwardDedupKey(this.target.outboxTable, header.id, index),
      subject: "",
      payload: op === "summary" ? row : cleanRow(row, this.cfg.keep_internal_columns),
      op,
      is_full_refresh: fullRefresh,
      outbox_id: safeOutboxId(header.id),
      refresh_id: refreshId,
      context: { pipeline: this.ctx.pipeline, stream_table: this.target.streamTable, schema: this.target.schema, outbox: this.target.outboxTable },
    };
    m.subject = renderTemplate(this.cfg.subject_template, m);
    return m;
  }

  async decodeStored(stored: unknown): Promise<Message[]> {
    const header = (stored as { header?: HeaderRow } | null)?.header;
    if (!header || typeof header.id !== "string") throw decodeError("dead letter holds no outbox header row");
    const plan = planFor(header, this.target.streamTable, { summaryMessages: this.cfg.summary_messages, keepInternalColumns: this.cfg.keep_internal_columns });
    const out: Message[] = [];
    for await (const chunk of this.messagesOf(header, plan)) out.push(...chunk);
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

  private async pollSimple(): Promise<HeaderRow[]> {
    const check = await this.checkWriters();
    const rows = await this.sql<HeaderRow[]>`
      SELECT ${this.sql.unsafe(HEADER_COLUMNS)} FROM ${this.headerTable()} AS h
      WHERE h.id > ${this.committed.toString()}::bigint ORDER BY h.id LIMIT ${this.cfg.batch_size}`;
    return this.deliverablePrefix(rows, check);
  }

  /**
   * Who is writing to the outbox right now, and how far its id sequence has gone. Taken BEFORE
   * the rows are read: any id up to `hwm` that the read does not see belongs to a transaction
   * that held RowExclusiveLock at check time (the lock is taken before the id is drawn) or
   * rolled back.
   */
  private async checkWriters(): Promise<WriterCheck> {
    const [row] = await this.sql<{ writers: string[]; hwm: string | null }[]>`
      SELECT coalesce(array_agg(DISTINCT l.virtualtransaction), '{}') AS writers,
             (SELECT pg_sequence_last_value(${this.target.idSequence ?? ""}::regclass)::text
              WHERE ${this.target.idSequence !== null}) AS hwm
      FROM pg_locks l
      WHERE l.locktype = 'relation' AND l.relation = ${this.target.headerOid}::oid
        AND l.mode = 'RowExclusiveLock' AND l.pid IS DISTINCT FROM pg_backend_pid()`;
    return { writers: new Set(row?.writers ?? []), hwm: BigInt(row?.hwm ?? "0") };
  }

  /**
   * Rows are handed out in id order, but ids are drawn at insert and become visible at commit,
   * so `id > last` alone would skip a lower id committed after a higher one. A gap in the ids
   * is crossed only once it is known to be permanent (rolled back): every transaction that could
   * fill it has ended and it is still empty. Until then the poll stops at the gap.
   */
  deliverablePrefix(rows: HeaderRow[], check: WriterCheck): HeaderRow[] {
    this.blockedOnGap = false;
    let expected = this.committed + 1n;
    const out: HeaderRow[] = [];
    for (const row of rows) {
      const id = BigInt(row.id);
      if (id > expected && !this.gapClosed(expected, id - 1n, check)) {
        this.blockedOnGap = true;
        break;
      }
      out.push(row);
      expected = id + 1n;
    }
    return out;
  }

  private gapClosed(first: bigint, last: bigint, check: WriterCheck): boolean {
    const key = first.toString();
    if (last > check.hwm) return false; // drawn after the check: judge it at the next poll
    if (check.writers.size === 0) {
      this.openGaps.delete(key);
      return true;
    }
    const earlier = this.openGaps.get(key);
    if (earlier && ![...earlier].some((w) => check.writers.has(w))) {
      this.openGaps.delete(key);
      return true;
    }
    if (!earlier) this.openGaps.set(key, check.writers);
    return false;
  }

  /** Writes the offset (on `sql`, which may be a transaction); committedTo() follows once it landed. */
  private async commit(sql: Sql, id: string): Promise<void> {
    if (this.groupMode) {
      await sql`SELECT pgtrickle.commit_offset(${this.cfg.group!}, ${this.consumerId}, ${id}::bigint)`;
    } else {
      // Never moves the offset backwards: a stale process cannot rewind a newer owner
      // (docs/interface.md §3.1).
      await sql`
        INSERT INTO pgtrickle.relay_consumer_offsets (relay_group_id, pipeline_id, last_change_id, worker_id, updated_at)
        VALUES (${this.ctx.relayGroupId}, ${this.ctx.pipeline}, ${id}::bigint, ${workerId()}, now())
        ON CONFLICT (relay_group_id, pipeline_id) DO UPDATE
          SET last_change_id = EXCLUDED.last_change_id, worker_id = EXCLUDED.worker_id, updated_at = now()
          WHERE relay_consumer_offsets.last_change_id <= EXCLUDED.last_change_id`;
    }
  }

  /** After the commit landed (not before: a failed transaction must leave the offset to retry). */
  private committedTo(id: string): void {
    this.committed = BigInt(id);
    for (const key of this.openGaps.keys()) if (BigInt(key) <= this.committed) this.openGaps.delete(key);
  }

  private async releaseClaimChecks(ids: string[]): Promise<void> {
    const last = ids[ids.length - 1]!;
    await this.sql`SELECT pgtrickle.outbox_rows_consumed(${`${this.target.schema}.${this.target.streamTable}`}, ${last}::bigint)`;
  }

  // ---- consumer-group mode: poll_outbox / commit_offset ------------------------------------

  private async ensureGroup(): Promise<void> {
    const group = this.cfg.group!;
    const [existing] = await this.sql<{ outbox_name: string }[]>`
      SELECT outbox_name FROM pgtrickle.pgt_consumer_groups WHERE group_name = ${group}`;
    if (existing && existing.outbox_name !== this.target.outboxTable) {
      throw configError(
        `pipeline '${this.ctx.pipeline}': consumer group '${group}' belongs to outbox '${existing.outbox_name}', not '${this.target.outboxTable}'`,
      );
    }
    if (!existing) {
      if (!this.cfg.create_group) throw configError(`pipeline '${this.ctx.pipeline}': consumer group '${group}' does not exist (source.create_group is false)`);
      try {
        await this.sql`SELECT pgtrickle.create_consumer_group(${group}, ${this.target.outboxTable}, ${this.cfg.auto_offset_reset})`;
        this.ctx.log.info(`created consumer group '${group}' on ${this.target.outboxTable} (${this.cfg.auto_offset_reset})`);
      } catch (err) {
        if (!/already exists/.test(errorMessage(err))) throw err; // another replica won the race
      }
    }
    const [row] = await this.sql<{ off: string | null }[]>`
      SELECT committed_offset::text AS off FROM pgtrickle.pgt_consumer_offsets WHERE group_name = ${group} AND consumer_id = ${this.consumerId}`;
    this.committed = BigInt(row?.off ?? "0");
  }

  private async pollGroup(): Promise<HeaderRow[]> {
    const rows = await this.sql<HeaderRow[]>`
      SELECT outbox_id::text AS id, NULL::text AS refresh_id, created_at, inserted_count::text AS inserted_count,
             deleted_count::text AS deleted_count, is_claim_check, payload
      FROM pgtrickle.poll_outbox(${this.cfg.group!}, ${this.consumerId}, ${this.cfg.batch_size}::int, ${this.cfg.visibility_seconds}::int)`;
    if (rows.length > 0) this.keepLeaseWhileBusy();
    return rows;
  }

  private leaseTimer: ReturnType<typeof setInterval> | undefined;

  /** A slow batch keeps its lease: extend_lease every visibility/2 until the next poll. */
  private keepLeaseWhileBusy(): void {
    clearInterval(this.leaseTimer);
    const every = (this.cfg.visibility_seconds * 1000) / 2;
    this.leaseTimer = setInterval(() => {
      this.sql`SELECT pgtrickle.extend_lease(${this.cfg.group!}, ${this.consumerId}, ${this.cfg.visibility_seconds}::int)`
        .then(([r]) => {
          if (!r || Object.values(r)[0] === null) clearInterval(this.leaseTimer); // committed: no lease left
        })
        .catch((err) => this.ctx.log.warn(`extend_lease failed: ${errorMessage(err)}`));
    }, every);
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

function workerId(): string {
  return `${process.env.HOSTNAME ?? "relay"}:${process.pid}`;
}

export default sourceSpec({ type: "outbox", config: OutboxSourceConfig, create: (cfg, ctx) => new OutboxSource(cfg, ctx) });
