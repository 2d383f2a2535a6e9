/**
 * Consumer-group mode of the outbox source (docs/interface.md §2.7): the group is found or
 * created, rows come from `poll_outbox` after the group's committed offset, a slow batch keeps
 * its lease, and a heartbeat keeps the consumer alive. The offset itself is written by the
 * source's commit (`commit_offset`), with the proof of ownership.
 */
import type { BackendContext } from "../types.ts";
import type { Sql } from "../../db.ts";
import { configError, errorMessage } from "../../errors.ts";
import type { HeaderRow } from "./decode.ts";
import type { OutboxSourceConfig } from "./config.ts";

export class ConsumerGroup {
  private heartbeat: ReturnType<typeof setInterval> | undefined;
  private leaseTimer: ReturnType<typeof setInterval> | undefined;

  constructor(
    private readonly sql: Sql,
    private readonly cfg: OutboxSourceConfig,
    private readonly ctx: BackendContext,
    readonly group: string,
    readonly consumerId: string,
  ) {}

  /** Checks (or creates) the group on `outboxTable`; returns this consumer's committed offset. */
  async ensure(outboxTable: string): Promise<bigint> {
    const group = this.group;
    const [existing] = await this.sql<{ outbox_name: string }[]>`
      SELECT outbox_name FROM pgtrickle.pgt_consumer_groups WHERE group_name = ${group}`;
    if (existing && existing.outbox_name !== outboxTable) {
      throw configError(
        `pipeline '${this.ctx.pipeline}': consumer group '${group}' belongs to outbox '${existing.outbox_name}', not '${outboxTable}'`,
      );
    }
    if (!existing) {
      if (!this.cfg.create_group) throw configError(`pipeline '${this.ctx.pipeline}': consumer group '${group}' does not exist (source.create_group is false)`);
      try {
        await this.sql`SELECT pgtrickle.create_consumer_group(${group}, ${outboxTable}, ${this.cfg.auto_offset_reset})`;
        this.ctx.log.info(`created consumer group '${group}' on ${outboxTable} (${this.cfg.auto_offset_reset})`);
      } catch (err) {
        if (!/already exists/.test(errorMessage(err))) throw err; // another replica won the race
      }
    }
    const [row] = await this.sql<{ off: string | null }[]>`
      SELECT committed_offset::text AS off FROM pgtrickle.pgt_consumer_offsets WHERE group_name = ${group} AND consumer_id = ${this.consumerId}`;
    return BigInt(row?.off ?? "0");
  }

  /** consumer_heartbeat every 10 s until close(); start() runs again after a transient failure. */
  startHeartbeat(): void {
    clearInterval(this.heartbeat);
    this.heartbeat = setInterval(() => {
      this.sql`SELECT pgtrickle.consumer_heartbeat(${this.group}, ${this.consumerId})`.catch((err) =>
        this.ctx.log.warn(`consumer heartbeat failed: ${errorMessage(err)}`),
      );
    }, 10_000);
  }

  async poll(): Promise<HeaderRow[]> {
    const rows = await this.sql<HeaderRow[]>`
      SELECT outbox_id::text AS id, NULL::text AS refresh_id, created_at, inserted_count::text AS inserted_count,
             deleted_count::text AS deleted_count, is_claim_check, payload
      FROM pgtrickle.poll_outbox(${this.group}, ${this.consumerId}, ${this.cfg.batch_size}::int, ${this.cfg.visibility_seconds}::int)`;
    if (rows.length > 0) this.keepLeaseWhileBusy();
    return rows;
  }

  /** A slow batch keeps its lease: extend_lease every visibility/2 until the next poll. */
  private keepLeaseWhileBusy(): void {
    clearInterval(this.leaseTimer);
    const every = (this.cfg.visibility_seconds * 1000) / 2;
    this.leaseTimer = setInterval(() => {
      this.sql`SELECT pgtrickle.extend_lease(${this.group}, ${this.consumerId}, ${this.cfg.visibility_seconds}::int)`
        .then(([r]) => {
          if (!r || Object.values(r)[0] === null) clearInterval(this.leaseTimer); // committed: no lease left
        })
        .catch((err) => this.ctx.log.warn(`extend_lease failed: ${errorMessage(err)}`));
    }, every);
  }

  close(): void {
    clearInterval(this.heartbeat);
    clearInterval(this.leaseTimer);
  }
}
