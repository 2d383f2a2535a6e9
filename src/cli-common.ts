import { connect, explainConnectError, type Sql } from "./db.ts";
import { errorKind, errorMessage, RelayError } from "./errors.ts";
import { configureLogging, log } from "./observe/log.ts";
import { resolveSettings, settingArgs, type Settings } from "./settings.ts";

/** Flags every command that talks to the database accepts. */
export const connectionArgs = settingArgs({
  postgresUrl: "PostgreSQL URL of the database with the pg_trickle outbox/inbox and relay catalog",
  logFormat: "log format: text or json",
  logLevel: "log level: error, warn, info, debug, trace",
});

/** Exit codes: 1 = a failure of the work itself, 2 = bad input or configuration, 3 = database unreachable. */
export const EXIT = { failed: 1, config: 2, unreachable: 3 } as const;

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
export async function withDatabase<T>(settings: Settings, work: (sql: Sql) => Promise<T>): Promise<T> {
  const sql = connect(settings.postgresUrl, { max: 2, connectTimeout: 5 });
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
