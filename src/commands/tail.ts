/**
 * `tail <outbox>`: the outbox's header rows, live, as JSON Lines on stdout — read-only: no offset
 * is stored or committed anywhere (neither relay_consumer_offsets nor a consumer group), so a
 * look at an outbox never changes what any pipeline will relay.
 */
import { defineCommand } from "citty";
import { connectionArgs, EXIT, fail, loadSettings, withDatabase } from "../cli-common.ts";
import { qualifiedIdent } from "../db.ts";
import { findOutbox } from "../backends/outbox/resolve.ts";
import { redact } from "../redact.ts";

interface HeaderRow {
  id: string;
  created_at: Date;
  refresh_id: string | null;
  inserted_count: string;
  deleted_count: string;
  is_claim_check: boolean;
  payload: unknown;
}

export const tailCommand = defineCommand({
  meta: {
    name: "tail",
    description:
      "Print an outbox live to stdout, one JSON line per outbox row (id, created_at, counts, payload), from its current end (--from-start: from its first row). Moves no offset. Ctrl-C stops.",
  },
  args: {
    outbox: { type: "positional", description: "stream table (schema.table) or outbox table name", required: true },
    "from-start": { type: "boolean", description: "print the rows already in the outbox first" },
    count: { type: "string", description: "exit after this many rows", valueHint: "n" },
    ...connectionArgs,
  },
  async run({ args }) {
    const settings = loadSettings(args);
    const count = args.count === undefined ? Infinity : Number(args.count);
    if (!(count > 0)) fail(`--count must be a positive number, got "${args.count}"`, EXIT.config);
    await withDatabase(settings, async (sql) => {
      const target = await findOutbox(sql, "tail", String(args.outbox));
      if (!target) fail(`no outbox for '${args.outbox}' (pgtrickle.pgt_outbox_config has no row for it)`, EXIT.failed);
      const table = qualifiedIdent(sql, "pgtrickle", target.outboxTable);
      let last = "0";
      if (!args["from-start"]) last = (await sql<{ last: string }[]>`SELECT coalesce(max(id), 0)::text AS last FROM ${table}`)[0]!.last;
      let wake: () => void = () => {};
      // The extension notifies on every new outbox row; polling every second covers a lost notification.
      await sql.listen("pgtrickle_outbox_new", () => wake());
      let printed = 0;
      const stop = new AbortController();
      process.once("SIGINT", () => (stop.abort(), wake()));
      process.once("SIGTERM", () => (stop.abort(), wake()));
      while (!stop.signal.aborted && printed < count) {
        const rows = await sql<HeaderRow[]>`
          SELECT id::text AS id, created_at, refresh_id::text AS refresh_id, inserted_count::text AS inserted_count,
                 deleted_count::text AS deleted_count, is_claim_check, payload
          FROM ${table} WHERE id > ${last}::bigint ORDER BY id LIMIT 1000`;
        for (const row of rows.slice(0, count - printed)) {
          process.stdout.write(redact(JSON.stringify({ outbox: target.outboxTable, ...row })) + "\n");
          printed++;
          last = row.id;
        }
        if (rows.length === 0) await new Promise<void>((r) => ((wake = r), setTimeout(r, 1000)));
      }
    });
    process.exit(0);
  },
});
