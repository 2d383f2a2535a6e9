// consola/core: the logger alone. The package root also loads its fancy reporters and prompts,
// some 14 ms of every start (bench/RESULTS.md, "Startup"); the relay has reporters of its own.
import { createConsola, type ConsolaInstance, type LogObject } from "consola/core";
import { redact } from "../redact.ts";

export type LogFormat = "text" | "json";
export const LOG_LEVELS = ["error", "warn", "info", "debug", "trace"] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

const consolaLevel: Record<LogLevel, number> = { error: 0, warn: 1, info: 3, debug: 4, trace: 5 };

// ── formatting ────────────────────────────────────────────────────────────────────────────────

function messageOf(entry: LogObject): string {
  const text = entry.args
    .map((a) => (a instanceof Error ? a.message : typeof a === "string" ? a : JSON.stringify(a)))
    .join(" ");
  return redact(text);
}

const LEVEL_NAME: Record<string, string> = { fatal: "error", error: "error", warn: "warn", log: "info", info: "info", success: "info", ready: "info", start: "info", box: "info", debug: "debug", trace: "trace", verbose: "trace" };

/** One JSON object per line, so log shippers need no parser of their own. */
const jsonReporter = {
  log(entry: LogObject) {
    const line: Record<string, unknown> = { time: entry.date.toISOString(), level: LEVEL_NAME[entry.type] ?? entry.type };
    if (entry.tag) line.pipeline = entry.tag;
    line.msg = messageOf(entry);
    process.stderr.write(JSON.stringify(line) + "\n");
  },
};

/** `<time> <LEVEL> [pipeline] message`: greppable, one line per event, no colours. */
const textReporter = {
  log(entry: LogObject) {
    const level = (LEVEL_NAME[entry.type] ?? entry.type).toUpperCase().padEnd(5);
    const tag = entry.tag ? `[${entry.tag}] ` : "";
    process.stderr.write(`${entry.date.toISOString()} ${level} ${tag}${messageOf(entry)}\n`);
  },
};

function build(level: LogLevel, format: LogFormat): ConsolaInstance {
  // Logs go to stderr: stdout belongs to the stdout sink's data and to command output.
  return createConsola({ level: consolaLevel[level], reporters: [format === "json" ? jsonReporter : textReporter] });
}

/** The process logger. `configureLogging` replaces it once the flags are known. */
export let log: ConsolaInstance = build("info", "text");

export function configureLogging(level: LogLevel, format: LogFormat): void {
  log = build(level, format);
}

/** A logger whose every line names the pipeline (text: `[name]`, JSON: `"pipeline"`). */
export function pipelineLog(name: string): ConsolaInstance {
  return log.withTag(name);
}
