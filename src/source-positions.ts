import type { Sql } from "./db.ts";
import type { BackendContext } from "./backends/types.ts";
import { configError } from "./errors.ts";

/**
 * Positions sources keep in the relay's own table pgtrickle.relay_source_positions: the file
 * source's offset, the outbox source's place inside a claim-check change set. One row per relay
 * group, pipeline and direction; the text is the source's own.
 */

/** The stored position of a source (text the source defines), or null. */
export async function loadSourcePosition(sql: Sql, ctx: BackendContext): Promise<string | null> {
  try {
    const [row] = await sql<{ position: string }[]>`
      SELECT position FROM pgtrickle.relay_source_positions
       WHERE relay_group_id = ${ctx.relayGroupId} AND pipeline = ${ctx.pipeline} AND direction = ${ctx.direction}`;
    return row?.position ?? null;
  } catch (err) {
    throw positionError(err);
  }
}

/**
 * Upserts the position; called from a batch's ack(), after the sink committed. With `onlyIf` (an
 * SQL condition, e.g. the proof of ownership) the statement writes nothing when it is false, and
 * the result says whether it wrote: one statement, so condition and write are one round trip.
 */
export async function saveSourcePosition(sql: Sql, ctx: BackendContext, position: string, onlyIf = sql`true`): Promise<boolean> {
  try {
    const result = await sql`
      INSERT INTO pgtrickle.relay_source_positions (relay_group_id, pipeline, direction, position, updated_at)
      SELECT ${ctx.relayGroupId}, ${ctx.pipeline}, ${ctx.direction}, ${position}, now() WHERE ${onlyIf}
      ON CONFLICT (relay_group_id, pipeline, direction) DO UPDATE SET position = EXCLUDED.position, updated_at = now()`;
    return result.count > 0;
  } catch (err) {
    throw positionError(err);
  }
}

function positionError(err: unknown) {
  if ((err as { code?: string })?.code === "42P01") {
    return configError("pgtrickle.relay_source_positions is missing: run `pgtrickle-relay catalog install`", err);
  }
  return err;
}
