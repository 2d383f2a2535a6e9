import { connect, explainConnectError, type ConnectOptions, type Sql } from "./db.ts";
import { errorKind, errorMessage, RelayError } from "./errors.ts";
import { configureLogging, log } from "./observe/log.ts";
import { EXIT_USAGE } from "./cli.ts";
import { redact } from "./redact.ts";
import { resolveSettings, settingArgs, type Settings } from "./settings.ts";

/** Flags every command that talks to the database accepts. */
export const connectionArgs = settingArgs({
  postgresUrl: "PostgreSQL URL of the database with the pg_trickle outbox/inbox and relay catalog",
  logFormat: "log format: text or json",
  logLevel: "log level: error, warn, info, debug, trace",
});

/** Exit codes of every command; `--help` and README print EXIT_CODES. */
export const EXIT = { failed: 1, config: EXIT_USAGE, unreachable: 3, deadLettered: 4, nothingToDrain: 5 } as const;

export const EXIT_CODES: [number, string][] = [
  [0, "success"],
  [EXIT.failed, "the work failed: a pipeline failed, drain's --timeout passed, check found a problem, status shows a failed pipeline"],
  [EXIT.config, "bad command line or configuration (unknown command or flag, invalid value); nothing was run"],
  [EXIT.unreachable, "the database cannot be reached"],
  [EXIT.deadLettered, "drain: every pipeline caught up, but messages were dead-lettered during the run (--allow-dead-letters: 0)"],
  [EXIT.nothingToDrain, "drain: nothing to drain: no enabled pipeline (--allow-empty), --pipeline names one that is not enabled, or the relay group has no stored offsets while others do (--new-group)"],
  [130, "run/drain: a second SIGINT/SIGTERM stopped the process without waiting for in-flight batches"],
];

/** Command output on stdout, through the one redaction (src/redact.ts) like every other output. */
export function printOut(text: string): void {
  process.stdout.write(redact(text.endsWith("\n") ? text : `${text}\n`));
}

export function fail(message: string, code: number): never {
  log.error(message);
  process.exit(code);
}

export function loadSettings(args: Record<string, unknown>): Settings {
  try {
    const settings = resolveSettings(args);
    configureLogging(settings.logLevel, settings.logFormat);
    return settings;
  } catch (err) {
    return fail(errorMessage(err), EXIT.config);
  }
}

/**
 * For one-shot commands: connect once, briefly, and fail with one clear line (no stack trace)
 * when the database cannot be reached. `run` retries instead (see relay.ts).
 */
export async function withDatabase<T>(settings: Settings, work: (sql: Sql) => Promise<T>, options: ConnectOptions = { max: 2, connectTimeout: 5 }): Promise<T> {
  const sql = connect(settings.postgresUrl, options);
  try {
    try {
      await sql`select 1`;
    } catch (err) {
      return fail(explainConnectError(err, settings.postgresUrl), EXIT.unreachable);
    }
    return await work(sql);
  } catch (err) {
    if (err instanceof RelayError || errorKind(err) === "config") return fail(errorMessage(err), EXIT.config);
    throw err;
  } finally {
    await sql.end({ timeout: 2 });
  }
}
