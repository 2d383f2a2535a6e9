/**
 * `pipeline list|show|set|enable|disable|delete`: the catalog's SQL functions from the command
 * line (set_relay_outbox, set_relay_inbox, enable_relay, disable_relay, delete_relay,
 * get_relay_config, list_relay_configs), so SQL stays the source of truth and anything done here
 * can be done, and is seen, in SQL too.
 */
import { readFileSync } from "node:fs";
import { defineCommand } from "citty";
import { requireCatalog } from "../catalog/status.ts";
import { connectionArgs, EXIT, fail, loadSettings, printOut, withDatabase } from "../cli-common.ts";
import type { Sql } from "../db.ts";
import { configError, errorMessage } from "../errors.ts";
import { log } from "../observe/log.ts";
import { normalizePipeline, pipelineNameProblem, type CatalogRow } from "../pipeline-config.ts";
import { registerConfigSecrets } from "../redact.ts";
import type { Settings } from "../settings.ts";
import { validatePipelineRow } from "./check.ts";
import { describeSide } from "./status.ts";

const nameArg = { name: { type: "positional" as const, description: "pipeline name", required: true } };
const directionArg = {
  direction: { type: "string" as const, description: "forward or reverse, when the name is used by both", valueHint: "forward|reverse" },
};

async function rowsNamed(sql: Sql, name: string, direction: unknown): Promise<CatalogRow[]> {
  await requireCatalog(sql);
  const rows = await sql<CatalogRow[]>`SELECT name, direction, enabled, config FROM pgtrickle.list_relay_configs() WHERE name = ${name}`;
  const chosen = direction ? rows.filter((r) => r.direction === direction) : rows;
  if (chosen.length === 0) fail(`no pipeline named '${name}'${direction ? ` (${direction})` : ""} (see pipeline list)`, EXIT.failed);
  return chosen;
}

const list = defineCommand({
  meta: { name: "list", description: "Every pipeline (pgtrickle.list_relay_configs()): name, direction, enabled, source → sink." },
  args: { ...connectionArgs, json: { type: "boolean", description: "print JSON instead of a table" } },
  async run({ args }) {
    const settings = loadSettings(args);
    await withDatabase(settings, async (sql) => {
      await requireCatalog(sql);
      const rows = await sql<CatalogRow[]>`SELECT name, direction, enabled, config FROM pgtrickle.list_relay_configs()`;
      for (const r of rows) registerConfigSecrets(r.config); // masked in what is printed
      if (args.json) return printOut(JSON.stringify(rows, null, 2));
      if (rows.length === 0) return printOut("no pipelines (add one with: pgtrickle-relay pipeline set)");
      const route = (r: CatalogRow) => {
        try {
          const spec = normalizePipeline(r);
          return `${describeSide(spec.sourceType, spec.source)} → ${describeSide(spec.sinkType, spec.sink)}`;
        } catch (err) {
          return `invalid: ${errorMessage(err)}`;
        }
      };
      const width = Math.max(8, ...rows.map((r) => r.name.length));
      printOut([`${"PIPELINE".padEnd(width)}  DIRECTION  ENABLED  SOURCE → SINK`, ...rows.map((r) => `${r.name.padEnd(width)}  ${r.direction.padEnd(9)}  ${(r.enabled ? "yes" : "no").padEnd(7)}  ${route(r)}`)].join("\n"));
    });
  },
});

const show = defineCommand({
  meta: { name: "show", description: "One pipeline's stored config (pgtrickle.get_relay_config), as JSON; secrets masked." },
  args: { ...nameArg, ...directionArg, ...connectionArgs },
  async run({ args }) {
    const settings = loadSettings(args);
    await withDatabase(settings, async (sql) => {
      const rows = await rowsNamed(sql, String(args.name), args.direction);
      for (const r of rows) registerConfigSecrets(r.config); // masked in what is printed
      printOut(JSON.stringify(rows.length === 1 ? rows[0] : rows, null, 2));
    });
  },
});

/** Parses the --config input: JSON, or YAML for .yaml/.yml files (Bun.YAML); `-` reads stdin. */
function readConfigInput(path: string): Record<string, unknown> {
  const text = path === "-" ? readFileSync(0, "utf8") : readFileSync(path, "utf8");
  let value: unknown;
  try {
    value = /\.ya?ml$/i.test(path) ? Bun.YAML.parse(text) : JSON.parse(text);
  } catch (err) {
    throw configError(`--config ${path === "-" ? "(stdin)" : path} cannot be parsed: ${errorMessage(err)}`);
  }
  if (!value || typeof value !== "object" || Array.isArray(value)) throw configError(`--config ${path}: expected an object`);
  return value as Record<string, unknown>;
}

/** `key=value` (value parsed as JSON when it is valid JSON, else kept as text) into `target`, dotted keys nested. */
function applySetting(target: Record<string, unknown>, assignment: string): void {
  const eq = assignment.indexOf("=");
  if (eq <= 0) throw configError(`--set expects key=value, got "${assignment}"`);
  const path = assignment.slice(0, eq).split(".");
  const raw = assignment.slice(eq + 1);
  let value: unknown = raw;
  try {
    value = JSON.parse(raw);
  } catch {
    /* plain text */
  }
  let node = target;
  for (const part of path.slice(0, -1)) node = (node[part] ??= {}) as Record<string, unknown>;
  node[path.at(-1)!] = value;
}

interface Definition {
  direction: "forward" | "reverse";
  /** forward: the stream table or outbox; reverse: the inbox. */
  table: string;
  group: string | null;
  /** The sink (forward) or source (reverse) options, with `type`. */
  options: Record<string, unknown>;
}

function definitionFrom(args: Record<string, unknown>): Definition {
  const file = args.config ? readConfigInput(String(args.config)) : {};
  const options = { ...((file.sink ?? file.source ?? {}) as Record<string, unknown>) };
  if (args.type) options.type = args.type;
  for (const s of (args.set as string[] | undefined) ?? []) applySetting(options, s);
  const outbox = (args.outbox ?? file.outbox) as string | undefined;
  const inbox = (args.inbox ?? file.inbox) as string | undefined;
  if (!!outbox === !!inbox) throw configError("give exactly one of --outbox (a forward pipeline) or --inbox (a reverse pipeline)");
  return { direction: outbox ? "forward" : "reverse", table: (outbox ?? inbox)!, group: ((args.group ?? file.group) as string | undefined) ?? null, options };
}

/** The row set_relay_outbox / set_relay_inbox would store (catalog.sql), to validate it first. */
function storedRow(name: string, d: Definition): CatalogRow {
  const type = d.options.type;
  const config =
    d.direction === "forward"
      ? { source_type: "outbox", source: { outbox: d.table, group: d.group, retention_hours: 24 }, sink_type: type, sink: d.options }
      : { source_type: type, source: d.options, sink_type: "pg-inbox", sink: { inbox: d.table } };
  return { name, direction: d.direction, enabled: true, config };
}

/** Validates like `check --offline` (schemas, unknown keys); throws a config error listing what is wrong. */
async function validate(settings: Settings, sql: Sql, row: CatalogRow): Promise<void> {
  if (typeof (row.direction === "forward" ? (row.config as { sink_type?: unknown }).sink_type : (row.config as { source_type?: unknown }).source_type) !== "string") {
    throw configError(`pipeline '${row.name}': the ${row.direction === "forward" ? "sink" : "source"} needs a type (--type, or "type" in --config)`);
  }
  await validatePipelineRow(settings, sql, row);
}

const set = defineCommand({
  meta: {
    name: "set",
    description:
      "Create or replace a pipeline through pgtrickle.set_relay_outbox (--outbox: forward) or set_relay_inbox (--inbox: reverse). The sink/source options come from --config (a JSON or YAML file, `-` for stdin: {\"outbox\"|\"inbox\", \"group\", \"sink\"|\"source\": {…}}), then --type and --set key=value on top. Validated before anything is written; the running relays pick it up at once.",
  },
  args: {
    ...nameArg,
    outbox: { type: "string", description: "forward: the stream table (or outbox) to relay", valueHint: "table" },
    inbox: { type: "string", description: "reverse: the inbox table to write", valueHint: "table" },
    group: { type: "string", description: "forward: consumer group (consumer-group mode); absent = simple mode", valueHint: "name" },
    type: { type: "string", description: "sink (forward) or source (reverse) type: nats, kafka, http, redis, sqs, rabbitmq, stdout, pg-inbox, stdin", valueHint: "type" },
    set: { type: "string", description: "one option, key=value (value as JSON when it parses, e.g. batch_size=100); repeatable", valueHint: "key=value", multiple: true },
    config: { type: "string", description: "JSON or YAML file with the pipeline (- reads stdin)", valueHint: "file" },
    disabled: { type: "boolean", description: "store it disabled" },
    ...connectionArgs,
  },
  async run({ args }) {
    const name = String(args.name);
    const bad = pipelineNameProblem(name);
    if (bad) fail(bad, EXIT.config);
    // --config is this command's pipeline file, not the process settings file.
    const settings = loadSettings({ ...args, config: undefined });
    let definition: Definition;
    try {
      definition = definitionFrom(args);
    } catch (err) {
      return fail(errorMessage(err), EXIT.config);
    }
    await withDatabase(settings, async (sql) => {
      await requireCatalog(sql);
      await validate(settings, sql, storedRow(name, definition));
      const d = definition;
      const enabled = !args.disabled;
      if (d.direction === "forward") {
        await sql`SELECT pgtrickle.set_relay_outbox(${name}, ${d.table}, ${d.group}, ${sql.json(d.options as never)}, 24, ${enabled})`;
      } else {
        await sql`SELECT pgtrickle.set_relay_inbox(${name}, ${d.table}, ${sql.json(d.options as never)}, p_enabled => ${enabled})`;
      }
      log.info(`pipeline '${name}' (${d.direction}) stored${enabled ? "" : ", disabled"}`);
    });
  },
});

/** enable / disable / delete: one SQL function each, acting on every direction of the name. */
function byName(fn: "enable_relay" | "disable_relay" | "delete_relay", verb: string, description: string) {
  return defineCommand({
    meta: { name: verb, description },
    args: { ...nameArg, ...connectionArgs },
    async run({ args }) {
      const settings = loadSettings(args);
      await withDatabase(settings, async (sql) => {
        await rowsNamed(sql, String(args.name), undefined);
        await sql`SELECT ${sql("pgtrickle")}.${sql(fn)}(${String(args.name)})`;
        log.info(`pipeline '${args.name}' ${verb}d`);
      });
    },
  });
}

export const pipelineCommand = defineCommand({
  meta: { name: "pipeline", description: "List, show, create, change, enable, disable and delete pipelines (through the catalog's SQL functions)" },
  subCommands: {
    list,
    show,
    set,
    enable: byName("enable_relay", "enable", "Enable a pipeline (pgtrickle.enable_relay); running relays start it at once."),
    disable: byName("disable_relay", "disable", "Disable a pipeline (pgtrickle.disable_relay); running relays stop it after the batch in hand."),
    delete: byName("delete_relay", "delete", "Delete a pipeline (pgtrickle.delete_relay), both directions of the name; its offsets are kept."),
  },
});
