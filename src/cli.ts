/**
 * The command line: a strict parser, plain help and the dispatcher. Commands are citty
 * `defineCommand` objects (meta, args, subCommands, run); parsing is done here because an
 * unknown flag must stop the command before it runs (`drain --dry-run` would otherwise relay and
 * commit), which citty's lenient parser does not do.
 */
import type { ArgsDef, CommandDef } from "citty";

export const PROGRAM = "pgtrickle-relay";

/** Exit code of a command line that cannot be understood (same as a configuration error). */
export const EXIT_USAGE = 2;

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type AnyCommand = CommandDef<any>;

interface FlagDef {
  type?: string;
  description?: string;
  valueHint?: string;
  alias?: string | string[];
  required?: boolean;
  /** May be given several times; the command gets a string[] (an extension of citty's ArgDef). */
  multiple?: boolean;
}

export class UsageError extends Error {}

/** Edit distance, to suggest the flag or command a typo meant. */
function distance(a: string, b: string): number {
  const row = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    let prev = row[0]!;
    row[0] = i;
    for (let j = 1; j <= b.length; j++) {
      const here = row[j]!;
      row[j] = Math.min(row[j]! + 1, row[j - 1]! + 1, prev + (a[i - 1] === b[j - 1] ? 0 : 1));
      prev = here;
    }
  }
  return row[b.length]!;
}

/** The closest candidate within a third of the word's length (at least 2 edits), if any. */
export function suggest(word: string, candidates: Iterable<string>): string | undefined {
  let best: string | undefined;
  let bestDistance = Math.max(2, Math.floor(word.length / 3)) + 1;
  for (const c of candidates) {
    const d = distance(word.toLowerCase(), c.toLowerCase());
    if (d < bestDistance) [best, bestDistance] = [c, d];
  }
  return best;
}

const didYouMean = (s: string | undefined, prefix = "") => (s ? `; did you mean ${prefix}${s}?` : "");

/** ` (did you mean 'x'?)` for the nearest of `candidates`, or "" when none is near. */
export function nearest(word: string, candidates: Iterable<string>): string {
  const s = suggest(word, candidates);
  return s ? ` (did you mean '${s}'?)` : "";
}

/** A comma-separated flag value (`--pipeline a,b`) as its non-empty items; undefined when not given. */
export const listFlag = (value: unknown): string[] | undefined =>
  value ? String(value).split(",").map((s) => s.trim()).filter(Boolean) : undefined;

function flagsOf(cmd: AnyCommand): Record<string, FlagDef> {
  const out: Record<string, FlagDef> = {};
  for (const [name, def] of Object.entries((cmd.args ?? {}) as Record<string, FlagDef>)) {
    if (def.type !== "positional") out[name] = def;
  }
  return out;
}

function positionalsOf(cmd: AnyCommand): [string, FlagDef][] {
  return Object.entries((cmd.args ?? {}) as Record<string, FlagDef>).filter(([, d]) => d.type === "positional");
}

export interface Parsed {
  /** The command path after the program name, e.g. ["catalog", "install"]. */
  path: string[];
  cmd: AnyCommand;
  args: Record<string, unknown> & { _: string[] };
  help: boolean;
}

/** Resolves the command path and parses its flags; a UsageError for anything not understood. */
export function parseCommandLine(root: AnyCommand, argv: string[]): Parsed {
  const path: string[] = [];
  let cmd = root;
  let i = 0;
  let help = false;
  // Command names come first; `-h`/`--help` may appear anywhere.
  while (i < argv.length) {
    const word = argv[i]!;
    if (word === "-h" || word === "--help") {
      help = true;
      i++;
      continue;
    }
    const subs = cmd.subCommands as Record<string, AnyCommand> | undefined;
    if (!subs || word.startsWith("-")) break;
    // Own keys only: `toString` or `constructor` are no commands.
    const sub = Object.hasOwn(subs, word) ? subs[word] : undefined;
    if (!sub) {
      const where = path.length ? `'${path.join(" ")}' has no subcommand` : "unknown command";
      throw new UsageError(`${where} '${word}'${didYouMean(suggest(word, Object.keys(subs)))} (see ${PROGRAM} ${[...path, "--help"].join(" ")})`);
    }
    path.push(word);
    cmd = sub;
    i++;
  }
  const flags = flagsOf(cmd);
  const aliases = new Map<string, string>();
  for (const [name, def] of Object.entries(flags)) for (const a of [def.alias ?? []].flat()) aliases.set(a, name);
  const positionals = positionalsOf(cmd);
  const args: Record<string, unknown> & { _: string[] } = { _: [] };
  const where = path.length ? `'${path.join(" ")}'` : PROGRAM;
  for (; i < argv.length; i++) {
    const word = argv[i]!;
    if (word === "-h" || word === "--help") {
      help = true;
      continue;
    }
    if (word === "--") {
      args._.push(...argv.slice(i + 1));
      break;
    }
    if (!word.startsWith("-") || word === "-") {
      args._.push(word);
      continue;
    }
    const eq = word.indexOf("=");
    const given = word.replace(/^--?/, "").slice(0, eq < 0 ? undefined : eq - (word.startsWith("--") ? 2 : 1));
    const name = Object.hasOwn(flags, given) ? given : aliases.get(given);
    if (!name) {
      if (path.length === 0 && word.startsWith("-") && !help) {
        throw new UsageError(`unknown flag '${word}'; flags go after the command (see ${PROGRAM} --help)`);
      }
      throw new UsageError(`unknown flag '${eq < 0 ? word : word.slice(0, eq)}' for ${where}${didYouMean(suggest(given, Object.keys(flags)), "--")} (see ${[PROGRAM, ...path, "--help"].join(" ")})`);
    }
    const def = flags[name]!;
    if (def.type === "boolean") {
      if (eq >= 0) throw new UsageError(`--${name} takes no value`);
      args[name] = true;
      continue;
    }
    let value: string | undefined;
    if (eq >= 0) value = word.slice(eq + 1);
    else if (i + 1 < argv.length && !(argv[i + 1]!.startsWith("--") && argv[i + 1]!.length > 2)) value = argv[++i];
    if (value === undefined) throw new UsageError(`--${name} needs a value${def.valueHint ? ` (${def.valueHint})` : ""}`);
    if (def.multiple) args[name] = [...((args[name] as string[] | undefined) ?? []), value];
    else if (name in args) throw new UsageError(`--${name} given twice`);
    else args[name] = value;
  }
  if (help) return { path, cmd, args, help };
  if (cmd.subCommands && !cmd.run) {
    if (path.length === 0 && args._.length === 0) return { path, cmd, args, help: true };
    throw new UsageError(`${where} needs a subcommand: ${Object.keys(cmd.subCommands).join(", ")} (see ${[PROGRAM, ...path, "--help"].join(" ")})`);
  }
  for (const [name, def] of positionals) {
    const value = args._.shift();
    if (value !== undefined) args[name] = value;
    else if (def.required !== false) throw new UsageError(`${where} needs <${name}> (see ${[PROGRAM, ...path, "--help"].join(" ")})`);
  }
  if (args._.length > 0) throw new UsageError(`unexpected argument '${args._[0]}' for ${where} (see ${[PROGRAM, ...path, "--help"].join(" ")})`);
  return { path, cmd, args, help };
}

/** A subcommand given as its definition or as a function importing it (citty's Resolvable). */
type LazyCommand = AnyCommand | (() => Promise<AnyCommand>);

/** Replaces a lazily imported subcommand by its definition, in place; returns the definition. */
async function loadSubcommand(cmd: AnyCommand, name: string): Promise<AnyCommand> {
  const subs = cmd.subCommands as Record<string, LazyCommand>;
  const sub = subs[name]!;
  if (typeof sub === "function") subs[name] = await sub();
  return subs[name] as AnyCommand;
}

/**
 * Imports the subcommands named by the command words of `argv` (as parseCommandLine walks them),
 * so that parsing finds plain definitions there; the other commands stay unloaded.
 */
export async function loadCommandPath(root: AnyCommand, argv: string[]): Promise<void> {
  let cmd = root;
  for (const word of argv) {
    if (word === "-h" || word === "--help") continue;
    if (!cmd.subCommands || word.startsWith("-") || !Object.hasOwn(cmd.subCommands, word)) return;
    cmd = await loadSubcommand(cmd, word);
  }
}

/** Imports every subcommand, recursively (top-level help, completion scripts). */
export async function loadAllCommands(cmd: AnyCommand): Promise<void> {
  for (const name of Object.keys(cmd.subCommands ?? {})) await loadAllCommands(await loadSubcommand(cmd, name));
}

// ── help ──────────────────────────────────────────────────────────────────────────────────────

/** Terminal width for help text; 80 when stdout is not a terminal. */
function width(): number {
  return Math.max(60, Math.min(process.stdout.isTTY ? (process.stdout.columns ?? 80) : 80, 120));
}

/** The words of `text` in lines of at most `cols` characters (a longer word stays whole). */
export function wrapLines(text: string, cols: number): string[] {
  const lines: string[] = [];
  let line = "";
  for (const word of text.split(/\s+/).filter(Boolean)) {
    if (line && line.length + 1 + word.length > cols) {
      lines.push(line);
      line = word;
    } else line = line ? `${line} ${word}` : word;
  }
  lines.push(line);
  return lines;
}

const wrap = (text: string, cols: number, indent: number) => wrapLines(text, cols).join(`\n${" ".repeat(indent)}`);

/** `name  description`, the descriptions aligned and wrapped. */
function definitionList(items: [string, string][], cols: number): string {
  const left = Math.min(30, Math.max(...items.map(([n]) => n.length)) + 2);
  return items
    .map(([name, text]) => {
      const head = `  ${name}`;
      const pad = head.length + 2 > left + 2 ? `\n${" ".repeat(left + 2)}` : " ".repeat(left + 2 - head.length);
      return `${head}${pad}${wrap(text, cols - left - 2, left + 2)}`;
    })
    .join("\n");
}

export interface HelpExtras {
  /** Example command lines (with a `# comment` after them if useful). */
  examples?: string[];
  /** Extra paragraphs, e.g. an exit-code table. */
  notes?: string[];
}

/** Plain help for one command: no colours, wrapped to the terminal (80 columns when piped). */
export function renderHelp(cmd: AnyCommand, path: string[], extras: HelpExtras = {}): string {
  const cols = width();
  const meta = (cmd.meta ?? {}) as { description?: string };
  const flags = flagsOf(cmd);
  const positionals = positionalsOf(cmd);
  const subs = cmd.subCommands as Record<string, AnyCommand> | undefined;
  const usage = [PROGRAM, ...path];
  if (subs) usage.push("<command>");
  for (const [name, def] of positionals) usage.push(def.required === false ? `[${name}]` : `<${name}>`);
  usage.push("[flags]");
  const out: string[] = [wrapLines(meta.description ?? "", cols).join("\n"), "", `Usage: ${usage.join(" ")}`];
  if (subs) {
    out.push("", "Commands:");
    out.push(definitionList(Object.entries(subs).map(([n, c]) => [n, ((c.meta ?? {}) as { description?: string }).description?.split(/(?<=\.) /)[0] ?? ""]), cols));
  }
  if (positionals.length) out.push("", "Arguments:", definitionList(positionals.map(([n, d]) => [n, d.description ?? ""]), cols));
  const flagItems: [string, string][] = Object.entries(flags).map(([name, def]) => {
    const alias = [def.alias ?? []].flat().filter((a) => a.length === 1).map((a) => `-${a}, `).join("");
    const value = def.type === "boolean" ? "" : ` <${def.valueHint ?? "value"}>`;
    return [`${alias}--${name}${value}`, def.description ?? ""];
  });
  flagItems.push(["-h, --help", "show this help"]);
  if (path.length === 0) flagItems.push(["-V, --version", "print the version"]);
  out.push("", "Flags:", definitionList(flagItems, cols));
  if (extras.notes?.length) out.push("", ...extras.notes.map((n) => n));
  if (extras.examples?.length) out.push("", "Examples:", ...extras.examples.map((e) => `  ${e}`));
  return out.join("\n") + "\n";
}
