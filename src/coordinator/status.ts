/**
 * The owner's record of each pipeline's state and last error in pgtrickle.relay_pipeline_status
 * (README "Observability"), which `status` reads: best effort, and in order per pipeline.
 */
import type { Sql } from "../db.ts";
import { errorMessage } from "../errors.ts";
import { log } from "../observe/log.ts";
import type { CatalogRow } from "../pipeline-config.ts";
import { redact } from "../redact.ts";
import { keyOf } from "./catalog.ts";
import { processIdentity } from "./lock-session.ts";

export class StatusTable {
  private readonly identity = processIdentity();
  /** Serialises status-table writes per pipeline so they land in order. */
  private readonly writes = new Map<string, Promise<void>>();
  private readonly written = new Map<string, string>();

  constructor(
    private readonly sql: Sql,
    private readonly relayGroupId: string,
  ) {}

  /** Persists state and last error for `status` (relay_pipeline_status); best effort, in order. */
  record(row: CatalogRow, state: string, error: string | null): void {
    const key = keyOf(row);
    const lastError = error === null ? null : redact(error).slice(0, 2000);
    const text = JSON.stringify({ state, error: lastError });
    if (this.written.get(key) === text) return;
    this.written.set(key, text);
    const prev = this.writes.get(key) ?? Promise.resolve();
    const write = prev.then(() =>
      this.sql`
        INSERT INTO pgtrickle.relay_pipeline_status (relay_group_id, pipeline, direction, owner, state, last_error, updated_at)
        VALUES (${this.relayGroupId}, ${row.name}, ${row.direction}, ${this.identity}, ${state}, ${lastError}, now())
        ON CONFLICT (relay_group_id, pipeline, direction) DO UPDATE
          SET owner = EXCLUDED.owner, state = EXCLUDED.state, last_error = EXCLUDED.last_error, updated_at = now()`
        .then(() => {})
        .catch((err) => {
          this.written.delete(key); // retried at the next change
          log.debug(`relay_pipeline_status not written for ${row.name}: ${errorMessage(err)}`);
        }),
    );
    this.writes.set(key, write);
  }

  /** The last error recorded for the pipeline of `key`, if any. */
  lastError(key: string): string | null {
    const written = this.written.get(key);
    return written ? (JSON.parse(written) as { error: string | null }).error : null;
  }

  /** Resolves once every write recorded so far for the pipeline of `key` has landed (or failed). */
  async settled(key: string): Promise<void> {
    await this.writes.get(key)?.catch(() => {});
  }
}
