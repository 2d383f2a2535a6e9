import { createConsola, type ConsolaInstance, type LogObject } from "consola";

export type LogFormat = "text" | "json";
export const LOG_LEVELS = ["error", "warn", "info", "debug", "trace"] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

const consolaLevel: Record<LogLevel, number> = { error: 0, warn: 1, info: 3, debug: 4, trace: 5 };

/** One JSON object per line, so log shippers need no parser of their own. */
const jsonReporter = {
  log(entry: LogObject) {
    const line: Record<string, unknown> = { time: entry.date.toISOString(), level: entry.type };
    if (entry.tag) line.pipeline = entry.tag;
    line.msg = entry.args.map((a) => (a instanceof Error ? a.message : typeof a === "string" ? a : JSON.stringify(a))).join(" ");
    process.stderr.write(JSON.stringify(line) + "\n");
  },
};

function build(level: LogLevel, format: LogFormat): ConsolaInstance {
  // Logs go to stderr: stdout belongs to the stdout sink's data.
  return createConsola({
    level: consolaLevel[level],
    stdout: process.stderr,
    stderr: process.stderr,
    ...(format === "json" ? { reporters: [jsonReporter] } : { fancy: false, formatOptions: { date: true, colors: false } }),
  });
}

/** The process logger. `configureLogging` replaces it once the flags are known. */
export let log: ConsolaInstance = build("info", "text");

export function configureLogging(level: LogLevel, format: LogFormat): void {
  log = build(level, format);
}

/** A logger whose every line names the pipeline. */
export function pipelineLog(name: string): ConsolaInstance {
  return log.withTag(name);
}
