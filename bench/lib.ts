/** What the bench scripts share: the backend context, the batches and the timed write loop. */
import { createConsola } from "consola";
import type { BackendContext, Sink } from "../src/backends/types.ts";
import type { Sql } from "../src/db.ts";
import type { Message } from "../src/message.ts";
import { ident } from "../test/fixtures/outbox.ts";
import { forwardMessages } from "../test/helpers/messages.ts";

/** The context a benched sink (or, with `overrides`, source) gets: no database, warnings only. */
export function benchContext(overrides: Partial<BackendContext> = {}): BackendContext {
  return {
    pipeline: "bench",
    direction: "forward",
    relayGroupId: "bench",
    log: createConsola({ level: 1 }),
    sql: undefined as never,
    postgresUrl: "",
    drain: false,
    ...overrides,
  };
}

/** `total` forward messages in batches of `batchSize`, batch b with outbox id `firstOutboxId + b`. */
export function benchBatches(total: number, batchSize: number, firstOutboxId = 1): Message[][] {
  return Array.from({ length: Math.ceil(total / batchSize) }, (_, b) =>
    forwardMessages(Math.min(batchSize, total - b * batchSize), { outboxId: firstOutboxId + b }),
  );
}

/** Seconds `sink.write` takes for every batch in turn; any rejection stops the bench. */
export async function timedWrites(sink: Sink, batches: Message[][]): Promise<number> {
  const t0 = performance.now();
  for (const batch of batches) {
    const rejected = await sink.write(batch);
    if (rejected.length) throw new Error(`${rejected.length} rejected: ${rejected[0]!.error}`);
  }
  return (performance.now() - t0) / 1000;
}

/** The middle value (the upper one of an even count). */
export const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

/**
 * Fills outbox `outboxTable` (schema pgtrickle) with `messages` messages in v1 inline change sets
 * of `rowsPerSet` inserted rows ({id, customer, amount}: ≈ 50 B of JSON each), in one statement.
 */
export async function fillOutbox(sql: Sql, outboxTable: string, rowsPerSet: number, messages: number): Promise<void> {
  await sql.unsafe(`INSERT INTO pgtrickle.${ident(outboxTable)} (inserted_count, payload)
    SELECT ${rowsPerSet}, jsonb_build_object('v', 1, 'deleted', '[]'::jsonb, 'inserted',
      (SELECT jsonb_agg(jsonb_build_object('id', g * ${rowsPerSet} + k, 'customer', 'c' || (g % 97), 'amount', (g * ${rowsPerSet} + k) * 1.5) ORDER BY k)
         FROM generate_series(0, ${rowsPerSet - 1}) k))
    FROM generate_series(0, ${Math.ceil(messages / rowsPerSet) - 1}) g`);
}
