/**
 * The messages of one outbox header row (docs/interface.md §4, §6): inline rows and summaries from
 * its decoded plan, claim-check rows paged from the delta table, each message with its dedup key
 * and rendered subject.
 */
import type { BackendContext } from "../types.ts";
import { ident, qualifiedIdent, type Sql } from "../../db.ts";
import { decodeError, RelayError } from "../../errors.ts";
import { forwardDedupKey, renderTemplate, templateUsesRowFields, type Message, type MessageContext, type Op } from "../../message.ts";
import { cleanRow, safeOutboxId, summaryPayload, type HeaderRow, type Plan } from "./decode.ts";
import type { OutboxTarget } from "./resolve.ts";
import type { OutboxSourceConfig } from "./config.ts";

interface RowFacts {
  header: HeaderRow;
  outboxId: number;
  /** The subject of each op, when the template does not depend on the row; null when it does. */
  subjects: Map<Op, string> | null;
}

/** Makes the messages of the header rows of one outbox, as the source hands them out. */
export class RowMessages {
  /** The shared facts of the header row whose messages are being made (see factsOf). */
  private facts: RowFacts | null = null;
  /** How widely one rendered subject can be shared (see factsOf). */
  private readonly subjectScope: "source" | "row" | "message";
  private readonly sourceSubjects = new Map<Op, string>();
  /** Every message's context: the same for all of them, so one object (messages never change it). */
  private readonly messageContext: MessageContext;

  constructor(
    private readonly sql: Sql,
    private readonly cfg: OutboxSourceConfig,
    private readonly ctx: BackendContext,
    private readonly target: OutboxTarget,
  ) {
    this.subjectScope = templateUsesRowFields(cfg.subject_template) ? "message" : /\{(outbox_id|refresh_id)\}/.test(cfg.subject_template) ? "row" : "source";
    this.messageContext = { pipeline: ctx.pipeline, stream_table: target.streamTable, schema: target.schema, outbox: target.outboxTable };
  }

  /**
   * The messages of one header row, in chunks, in delivery order: deletes, then inserts; the
   * first `skip` of them (already delivered) left out.
   */
  async *messagesOf(header: HeaderRow, plan: Plan, skip = 0): AsyncIterable<Message[]> {
    if (plan.kind === "claim_check") yield* this.claimCheckMessages(header, plan.fullRefresh, plan.refreshId, skip);
    else {
      const messages = this.inlineMessages(header, plan, skip);
      for (let i = 0; i < messages.length; i += this.cfg.max_batch_messages) yield messages.slice(i, i + this.cfg.max_batch_messages);
    }
  }

  /**
   * The messages of a header row that carries them itself (rows, a summary, or nothing), at once
   * and without an await: the source reads most rows this way, and an async generator per header
   * row cost more than the row's messages when change sets are small (bench/RESULTS.md,
   * "Forward file and Redis: per-message path").
   */
  inlineMessages(header: HeaderRow, plan: Exclude<Plan, { kind: "claim_check" }>, skip = 0): Message[] {
    if (plan.kind === "none") return [];
    if (plan.kind === "summary") return skip === 0 ? [this.message(header, "summary", 0, plan.payload, plan.fullRefresh, plan.refreshId)] : [];
    // An UPDATE is a delete plus an insert: deletes go first so that a consumer applying
    // messages in order ends with the new row. Indexes follow docs/interface.md §6.2 (inserts first).
    const { inserted, deleted, fullRefresh, refreshId } = plan;
    const out: Message[] = [];
    for (let i = skip; i < deleted.length; i++) out.push(this.message(header, "delete", inserted.length + i, deleted[i], fullRefresh, refreshId));
    for (let i = Math.max(0, skip - deleted.length); i < inserted.length; i++) out.push(this.message(header, "insert", i, inserted[i], fullRefresh, refreshId));
    return out;
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
    const facts = this.factsOf(header);
    const m: Message = {
      dedup_key: forwardDedupKey(this.target.outboxTable, header.id, index),
      subject: "",
      payload: op === "summary" ? row : cleanRow(row, this.cfg.keep_internal_columns),
      op,
      is_full_refresh: fullRefresh,
      outbox_id: facts.outboxId,
      refresh_id: refreshId,
      context: this.messageContext,
    };
    if (facts.subjects) {
      let subject = facts.subjects.get(op);
      if (subject === undefined) facts.subjects.set(op, (subject = renderTemplate(this.cfg.subject_template, m)));
      m.subject = subject;
    } else m.subject = renderTemplate(this.cfg.subject_template, m);
    return m;
  }

  /**
   * What every message of one header row shares, worked out once per row rather than per message
   * (the profile of a drain showed the per-message template rendering): its outbox id, and the
   * subject of each op — shared by every row when the template names neither row fields nor
   * `{outbox_id}`/`{refresh_id}`, by the row's messages when it names only those two, and
   * rendered per message (subjects null) when it names row fields.
   */
  private factsOf(header: HeaderRow): RowFacts {
    if (this.facts?.header !== header) {
      const subjects = this.subjectScope === "message" ? null : this.subjectScope === "source" ? this.sourceSubjects : new Map<Op, string>();
      this.facts = { header, outboxId: safeOutboxId(header.id), subjects };
    }
    return this.facts;
  }
}
