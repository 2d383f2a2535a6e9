import type { Sql } from "../../db.ts";
import type { PipelineSpec } from "../../pipeline-config.ts";
import { findOutbox } from "./resolve.ts";

/** Where a forward pipeline stands, read from the catalog alone (no running pipeline needed). */
export interface ForwardProgress {
  offset: string | null;
  rows: number | null;
  seconds: number | null;
}

/** Offset and lag of a forward pipeline, read the way the relay reads them; null where unknown. */
export async function forwardProgress(sql: Sql, groupId: string, spec: PipelineSpec): Promise<ForwardProgress> {
  const none = { offset: null, rows: null, seconds: null };
  if (spec.sourceType !== "outbox" || typeof spec.source.outbox !== "string") return none;
  let offset: string | null;
  const group = typeof spec.source.group === "string" && spec.source.group !== "" ? spec.source.group : null;
  if (group) {
    const consumer = typeof spec.source.consumer_id === "string" ? spec.source.consumer_id : `${groupId}:${spec.name}`;
    const rows = await sql<{ off: string | null }[]>`
      SELECT committed_offset::text AS off FROM pgtrickle.pgt_consumer_offsets WHERE group_name = ${group} AND consumer_id = ${consumer}`.catch(() => []);
    offset = rows[0]?.off ?? null;
  } else {
    const rows = await sql<{ off: string }[]>`
      SELECT last_change_id::text AS off FROM pgtrickle.relay_consumer_offsets WHERE relay_group_id = ${groupId} AND pipeline_id = ${spec.name}`;
    offset = rows[0]?.off ?? null;
  }
  const target = await findOutbox(sql, spec.name, spec.source.outbox).catch(() => null);
  if (!target) return { offset, rows: null, seconds: null };
  const table = sql.unsafe(`"pgtrickle"."${target.outboxTable.replace(/"/g, '""')}"`);
  const after = offset ?? "0";
  const [lag] = await sql<{ max: string | null; oldest: number | null }[]>`
    SELECT (SELECT max(id) FROM ${table})::text AS max,
           (SELECT extract(epoch FROM now() - created_at)::float8 FROM ${table} WHERE id > ${after}::bigint ORDER BY id LIMIT 1) AS oldest`;
  const max = BigInt(lag?.max ?? "0");
  const rows = max > BigInt(after) ? Number(max - BigInt(after)) : 0;
  return { offset, rows, seconds: rows === 0 ? 0 : Math.max(0, Math.round((lag?.oldest ?? 0) * 10) / 10) };
}
