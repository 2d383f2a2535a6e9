import type { Outcome } from "./coordinator.ts";
import { processIdentity } from "./coordinator/lock-session.ts";
import { connect, describeUrl, explainConnectError, type ConnectOptions, type Sql } from "./db.ts";
import { requireCatalog } from "./catalog/status.ts";
import { errorKind, errorMessage } from "./errors.ts";
import { log } from "./observe/log.ts";
import { startHttp } from "./observe/http.ts";
import { showDrainProgress } from "./observe/progress.ts";
import type { Settings } from "./settings.ts";
import { abortableDelay, backoffMs } from "./sleep.ts";

export interface RelayOptions {
  drain: boolean;
  only?: string[];
  /** drain: give up after this many seconds (0 = no limit). */
  timeoutSecs?: number;
  /** Serve /metrics and /health (run: yes; drain: only when asked). */
  http: boolean;
  /** Connect attempts before giving up; run retries forever, one-shot commands do not. */
  retryConnect: boolean;
  /** Stop gracefully once this resolves (the demo's --count). */
  stopWhen?: Promise<void>;
  /**
   * A client the command already opened with relayConnectOptions and checked the catalog through
   * (drain, deciding whether to start): used instead of a new connection, and left to the
   * command to close.
   */
  database?: Sql;
}

/**
 * The relay's pool: a connection per worker and a few more, named after this process (like the
 * coordinator session), so an operator can tell whose it is.
 */
export function relayConnectOptions(settings: Settings): ConnectOptions {
  return { max: settings.maxWorkers + 4, connectTimeout: 10, applicationName: `pgtrickle-relay ${processIdentity()}`.slice(0, 63) };
}

/** Connects, retrying with jittered backoff for a service, once for a one-shot command. */
async function connectDatabase(settings: Settings, retry: boolean, stop: AbortSignal): Promise<Sql> {
  for (let attempt = 0; ; attempt++) {
    const sql = connect(settings.postgresUrl, relayConnectOptions(settings));
    try {
      await sql`select 1`;
      return sql;
    } catch (err) {
      await sql.end({ timeout: 1 });
      const line = explainConnectError(err, settings.postgresUrl);
      if (!retry || stop.aborted) throw Object.assign(new Error(line), { unreachable: true });
      const wait = backoffMs(attempt, 100, 30_000);
      log.warn(`${line}; retrying in ${(wait / 1000).toFixed(1)} s`);
      await abortableDelay(wait, stop);
    }
  }
}

/**
 * The process: database, catalog check, HTTP endpoints, coordinator; SIGINT/SIGTERM finish the
 * in-flight batches and release the locks within the shutdown timeout; a second signal exits 130.
 */
export async function runRelay(settings: Settings, options: RelayOptions): Promise<{ exitCode: number; outcomes: Outcome[] }> {
  const shutdown = new AbortController();
  let signals = 0;
  const onSignal = (name: string) => {
    signals++;
    if (signals > 1) {
      log.warn(`second ${name}: exiting now; unacknowledged batches will be replayed`);
      process.exit(130);
    }
    log.info(`received ${name}: finishing in-flight batches (up to ${settings.shutdownTimeoutSecs} s)`);
    shutdown.abort();
  };
  const sigint = () => onSignal("SIGINT");
  const sigterm = () => onSignal("SIGTERM");
  process.on("SIGINT", sigint);
  process.on("SIGTERM", sigterm);
  options.stopWhen?.then(() => shutdown.abort());

  // drain --timeout bounds the whole run, connecting and the graceful stop included.
  const deadline = options.timeoutSecs ? Date.now() + options.timeoutSecs * 1000 : Infinity;
  const sql = options.database ?? (await connectDatabase(settings, options.retryConnect, shutdown.signal));
  let timedOut = false;
  let sighup: (() => void) | undefined;
  try {
    if (!options.database) await requireCatalog(sql);
    log.info(`relay ${processIdentity()} (group '${settings.relayGroupId}', ${options.drain ? "drain" : "run"}) on ${describeUrl(settings.postgresUrl)}`);
    // Imported only here, the coordinator with its pipelines and valibot (some 15 ms to load,
    // bench/RESULTS.md "Startup"): a drain that finds nothing to do never gets this far.
    const [{ Coordinator }, { Metrics }] = await Promise.all([import("./coordinator.ts"), import("./observe/metrics.ts")]);
    const metrics = new Metrics();
    const coordinator = new Coordinator(settings, sql, metrics, { drain: options.drain, only: options.only });
    sighup = () => {
      log.info("received SIGHUP: re-reading every pipeline config and re-resolving secrets");
      coordinator.requestReload(true);
    };
    process.on("SIGHUP", sighup);
    const http = options.http ? startHttp(settings.metricsAddr, coordinator, metrics) : null;
    const running = coordinator.run();
    const stopProgress = options.drain ? showDrainProgress(coordinator) : () => {};
    const timeout = deadline < Infinity ? setTimeout(() => ((timedOut = true), shutdown.abort()), Math.max(0, deadline - Date.now())) : undefined;
    await Promise.race([running, new Promise((r) => shutdown.signal.addEventListener("abort", r, { once: true }))]);
    clearTimeout(timeout);
    stopProgress();
    const graceful = coordinator.stop();
    const stopWithin = Math.min(settings.shutdownTimeoutSecs * 1000, Math.max(0, deadline - Date.now()));
    const late = new Promise<"late">((r) => setTimeout(() => r("late"), stopWithin).unref());
    const finished = await Promise.race([graceful.then(() => "ok" as const), late]);
    http?.stop(true);
    if (finished === "late") {
      const which = timedOut ? `drain --timeout (${options.timeoutSecs} s)` : `shutdown timeout (${settings.shutdownTimeoutSecs} s)`;
      log.error(`${which} passed with batches in flight; they will be replayed`);
      running.catch(() => {}); // the process exits now; a late failure of the abandoned work changes nothing
      return { exitCode: 1, outcomes: coordinator.outcomes };
    }
    await running.catch((err) => {
      if (errorKind(err) !== "config") throw err;
      log.error(errorMessage(err));
    });
    if (options.drain) {
      const failed = coordinator.outcomes.filter((o) => o.state !== "drained");
      if (timedOut) log.error(`drain: --timeout of ${options.timeoutSecs} s passed before every pipeline caught up`);
      return { exitCode: failed.length > 0 || timedOut ? 1 : 0, outcomes: coordinator.outcomes };
    }
    return { exitCode: 0, outcomes: coordinator.outcomes };
  } finally {
    process.off("SIGINT", sigint);
    process.off("SIGTERM", sigterm);
    if (sighup) process.off("SIGHUP", sighup);
    if (!options.database) await sql.end({ timeout: 2 });
  }
}
