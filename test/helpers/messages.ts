import { existsSync, readFileSync } from "node:fs";
import type { Message } from "../../src/message.ts";
import { forwardDedupKey } from "../../src/message.ts";

/** Forward messages as the outbox source produces them, for sink tests. */
export function forwardMessages(
  count: number,
  options: { pipeline?: string; stream_table?: string; outboxId?: number; full_refresh?: boolean; payload?: (i: number) => unknown } = {},
): Message[] {
  const stream_table = options.stream_table ?? "orders";
  const outbox = `outbox_${stream_table}`;
  const outboxId = options.outboxId ?? 1;
  return Array.from({ length: count }, (_, i) => ({
    dedup_key: forwardDedupKey(outbox, String(outboxId), i),
    subject: `pgtrickle.${stream_table}.insert`,
    payload: options.payload ? options.payload(i) : { id: i, customer: `c${i % 7}`, amount: i * 1.5 },
    op: "insert" as const,
    is_full_refresh: options.full_refresh ?? false,
    outbox_id: outboxId,
    refresh_id: null,
    context: { pipeline: options.pipeline ?? "test_pipeline", stream_table, schema: "public", outbox },
  }));
}

/** The JSON lines a file sink wrote so far (none while the file does not exist yet). */
export function readJsonLines<T>(path: string): T[] {
  if (!existsSync(path)) return [];
  return readFileSync(path, "utf8")
    .split("\n")
    .filter((l) => l.trim() !== "")
    .map((l) => JSON.parse(l) as T);
}
