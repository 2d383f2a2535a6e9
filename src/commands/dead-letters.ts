/**
 * `dead-letters list|show|replay|purge`: pgtrickle.relay_dead_letters from the command line.
 * Replay goes through pgtrickle.replay_relay_dead_letters (the owning relay re-sends and resolves
 * them); list, show and purge read and delete rows of that catalog table, as one would in SQL.
 */
import { defineCommand } from "citty";
import { requireCatalog } from "../catalog/status.ts";
import { connectionArgs, EXIT, fail, loadSettings, printOut, withDatabase } from "../cli-common.ts";
import { log } from "../observe/log.ts";

interface DeadLetterRow {
  id: string;
  pipeline: string;
  direction: string;
  dedup_key: string;
  error_kind: string;
  attempts: number;
  error: string;
  last_seen_at: Date;
  replay_requested_at: Date | null;
  resolved_at: Date | null;
}

const pipelineFlag = { pipeline: { type: "string" as const, description: "only this pipeline", valueHint: "name" } };

function positiveId(raw: unknown): string {
  if (!/^[1-9][0-9]{0,18}$/.test(String(raw))) fail(`a dead letter id is a positive integer, got "${raw}"`, EXIT.config);
  return String(raw);
}

const list = defineCommand({
  meta: { name: "list", description: "Unresolved dead letters (--all: resolved ones too), newest first: id, pipeline, kind, attempts, error." },
  args: {
    ...pipelineFlag,
    all: { type: "boolean", description: "include resolved (replayed) dead letters" },
    limit: { type: "string", description: "at most this many (default 100)", valueHint: "n" },
    json: { type: "boolean", description: "print JSON instead of a table" },
    ...connectionArgs,
  },
  async run({ args }) {
    const settings = loadSettings(args);
    const limit = args.limit === undefined ? 100 : Number(args.limit);
    if (!Number.isInteger(limit) || limit < 1) fail(`--limit must be a positive integer, got "${args.limit}"`, EXIT.config);
    await withDatabase(settings, async (sql) => {
      await requireCatalog(sql);
      const rows = await sql<DeadLetterRow[]>`
        SELECT id::text AS id, pipeline, direction, dedup_key, error_kind, attempts, error, last_seen_at, replay_requested_at, resolved_at
        FROM pgtrickle.relay_dead_letters
        WHERE (${args.pipeline ?? null}::text IS NULL OR pipeline = ${args.pipeline ?? null}) AND (${!!args.all} OR resolved_at IS NULL)
        ORDER BY id DESC LIMIT ${limit}`;
      if (args.json) return printOut(JSON.stringify(rows, null, 2));
      if (rows.length === 0) return printOut(args.all ? "no dead letters" : "no unresolved dead letters");
      const state = (r: DeadLetterRow) => (r.resolved_at ? "resolved" : r.replay_requested_at ? "replaying" : "open");
      printOut(
        rows
          .map((r) => `${r.id}  ${r.pipeline} (${r.direction})  ${state(r)}  ${r.error_kind} ×${r.attempts}  ${r.dedup_key}\n    ${r.error.replace(/\s+/g, " ").slice(0, 200)}`)
          .join("\n"),
      );
    });
  },
});

const show = defineCommand({
  meta: { name: "show", description: "One dead letter whole, as JSON: the message as stored, the error, the attempts." },
  args: { id: { type: "positional", description: "dead letter id (from list)", required: true }, ...connectionArgs },
  async run({ args }) {
    const settings = loadSettings(args);
    const id = positiveId(args.id);
    await withDatabase(settings, async (sql) => {
      await requireCatalog(sql);
      const [row] = await sql`SELECT *, id::text AS id, outbox_id::text AS outbox_id FROM pgtrickle.relay_dead_letters WHERE id = ${id}::bigint`;
      if (!row) fail(`no dead letter with id ${id}`, EXIT.failed);
      printOut(JSON.stringify(row, null, 2));
    });
  },
});

const replay = defineCommand({
  meta: {
    name: "replay",
    description: "Ask the owning relay to send a pipeline's unresolved dead letters again (pgtrickle.replay_relay_dead_letters); --id for one. Fix the message first (UPDATE … SET message) if it needs it.",
  },
  args: {
    pipeline: { type: "string", description: "the pipeline whose dead letters to replay", valueHint: "name", required: true },
    id: { type: "string", description: "only this dead letter", valueHint: "id" },
    ...connectionArgs,
  },
  async run({ args }) {
    const settings = loadSettings(args);
    if (!args.pipeline) fail("replay needs --pipeline", EXIT.config);
    const id = args.id === undefined ? null : positiveId(args.id);
    await withDatabase(settings, async (sql) => {
      await requireCatalog(sql);
      const [row] = await sql<{ n: number }[]>`SELECT pgtrickle.replay_relay_dead_letters(${String(args.pipeline)}, ${id}::bigint) AS n`;
      log.info(`${row!.n} dead letter(s) of '${args.pipeline}' marked for replay; the relay owning the pipeline re-sends them`);
      if (row!.n === 0) process.exit(EXIT.failed);
    });
  },
});

const purge = defineCommand({
  meta: { name: "purge", description: "Delete dead letters for good: those of --pipeline, one --id, or --resolved ones only. Needs --yes." },
  args: {
    ...pipelineFlag,
    id: { type: "string", description: "only this dead letter", valueHint: "id" },
    resolved: { type: "boolean", description: "only resolved (replayed) ones" },
    yes: { type: "boolean", description: "really delete (without it, only says how many would go)" },
    ...connectionArgs,
  },
  async run({ args }) {
    const settings = loadSettings(args);
    if (!args.pipeline && args.id === undefined && !args.resolved) fail("purge needs --pipeline, --id or --resolved (it never deletes everything at once)", EXIT.config);
    const id = args.id === undefined ? null : positiveId(args.id);
    await withDatabase(settings, async (sql) => {
      await requireCatalog(sql);
      const where = sql`(${args.pipeline ?? null}::text IS NULL OR pipeline = ${args.pipeline ?? null})
        AND (${id}::bigint IS NULL OR id = ${id}::bigint) AND (${!args.resolved} OR resolved_at IS NOT NULL)`;
      if (!args.yes) {
        const [row] = await sql<{ n: number }[]>`SELECT count(*)::int AS n FROM pgtrickle.relay_dead_letters WHERE ${where}`;
        return log.info(`${row!.n} dead letter(s) would be deleted; add --yes to delete them`);
      }
      const deleted = await sql`DELETE FROM pgtrickle.relay_dead_letters WHERE ${where}`;
      log.info(`${deleted.count} dead letter(s) deleted`);
    });
  },
});

export const deadLettersCommand = defineCommand({
  meta: { name: "dead-letters", description: "List, show, replay and purge dead letters (pgtrickle.relay_dead_letters)" },
  subCommands: { list, show, replay, purge },
});
