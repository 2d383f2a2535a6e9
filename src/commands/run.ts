import { defineCommand } from "citty";
import { requireCatalog } from "../catalog/status.ts";
import { listFlag, nearest } from "../cli.ts";
import { EXIT, fail, loadSettings, withDatabase } from "../cli-common.ts";
import type { Sql } from "../db.ts";
import { log } from "../observe/log.ts";
import type { Outcome } from "../coordinator.ts";
import { relayConnectOptions, runRelay } from "../relay.ts";
import { settingArgs } from "../settings.ts";

const processArgs = settingArgs({
  postgresUrl: "PostgreSQL URL of the database with the outbox/inbox tables and the relay catalog; may use ${env:NAME} / ${file:/path}",
  relayGroupId: "relay group: replicas sharing it split the pipelines between them through advisory locks",
  metricsAddr: "address of /metrics, /health and /health/drained",
  logFormat: "log format: text or json",
  logLevel: "log level: error, warn, info, debug, trace",
  discoveryIntervalSecs: "seconds between full re-reads of the pipeline catalog",
  coordinatorTickMs: "milliseconds between attempts to take unowned pipelines",
  maxWorkers: "most pipelines this process runs at once",
  shutdownTimeoutSecs: "seconds to finish in-flight batches on SIGINT/SIGTERM",
  sinkMaxInflight: "most messages polled but not yet acknowledged per pipeline (0 = unlimited)",
  ioTimeoutSecs: "seconds a sink write, a source poll or an acknowledgement may take before its client is torn down and rebuilt",
  stallTimeoutSecs: "seconds a pipeline with pending work may go without a commit before /health reports it stalled",
});

export const runCommand = defineCommand({
  meta: {
    name: "run",
    description:
      "Run every enabled pipeline of the relay group until SIGINT/SIGTERM. Pipelines are rows in pgtrickle.relay_outbox_config / relay_inbox_config; changes are picked up live.",
  },
  args: processArgs,
  async run({ args }) {
    const settings = loadSettings(args);
    const result = await runRelay(settings, { drain: false, http: true, retryConnect: true }).catch(unreachable);
    process.exit(result.exitCode);
  },
});

/** drain's bound on the whole run when --timeout is not given: a CI job must end. */
export const DRAIN_DEFAULT_TIMEOUT_SECS = 300;

export const drainCommand = defineCommand({
  meta: {
    name: "drain",
    description: `Relay everything pending, then exit (for CI jobs and one-shot runs). The exit code says how it went (table below); a summary per pipeline goes to stderr. --timeout bounds the whole run, the graceful stop included.`,
  },
  args: {
    ...processArgs,
    pipeline: { type: "string", description: "drain only these pipelines (comma-separated names)", valueHint: "names" },
    timeout: { type: "string", description: `give up after this many seconds, everything included (default ${DRAIN_DEFAULT_TIMEOUT_SECS}; 0 = no limit)`, valueHint: "seconds" },
    "allow-dead-letters": { type: "boolean", description: "exit 0 even when messages were dead-lettered during the run (default: exit 4)" },
    "allow-empty": { type: "boolean", description: "exit 0 when the relay group has no enabled pipeline (default: exit 5)" },
    "new-group": {
      type: "boolean",
      description: "accept a relay group that has no stored offsets while other groups have some (default: refused, exit 5 — a mistyped group would replay every outbox from the start)",
    },
    metrics: { type: "boolean", description: "also serve /metrics and /health while draining" },
  },
  async run({ args }) {
    const settings = loadSettings(args);
    const timeoutSecs = args.timeout === undefined ? DRAIN_DEFAULT_TIMEOUT_SECS : Number(args.timeout);
    if (!Number.isFinite(timeoutSecs) || timeoutSecs < 0) fail(`--timeout must be a number of seconds ≥ 0, got "${args.timeout}"`, EXIT.config);
    const only = listFlag(args.pipeline);
    // One connection decides whether to start and then serves the run.
    const result = await withDatabase(
      settings,
      async (sql) => {
        await requireCatalog(sql);
        const enabled = (await sql<{ name: string }[]>`SELECT name FROM pgtrickle.list_relay_configs() WHERE enabled`).map((r) => r.name);
        const refusal = await drainRefusal(sql, enabled, settings.relayGroupId, only, { allowEmpty: !!args["allow-empty"], newGroup: !!args["new-group"] });
        if (refusal) fail(refusal, EXIT.nothingToDrain);
        // Nothing to drain (--allow-empty): no lock session, LISTEN connection or coordinator to start.
        if (enabled.length === 0) return { exitCode: 0, outcomes: [] };
        return runRelay(settings, { drain: true, only, timeoutSecs, http: !!args.metrics, retryConnect: false, database: sql }).catch(unreachable);
      },
      relayConnectOptions(settings),
    );
    printSummary(result.outcomes);
    const deadLettered = result.outcomes.reduce((n, o) => n + o.deadLettered, 0);
    if (result.exitCode === 0 && deadLettered > 0 && !args["allow-dead-letters"]) {
      log.error(`drain: ${deadLettered} message(s) were dead-lettered during the run (see pgtrickle.relay_dead_letters; --allow-dead-letters accepts this)`);
      process.exit(EXIT.deadLettered);
    }
    process.exit(result.exitCode);
  },
});

/**
 * Why drain should not start, or null: no `enabled` pipeline (unless allowed), --pipeline names
 * that are not enabled pipelines, or a relay group without any stored offset while others have
 * some — simple-mode offsets are kept per group, so a mistyped group would relay every outbox
 * again from its first row.
 */
async function drainRefusal(sql: Sql, enabled: string[], groupId: string, only: string[] | undefined, allow: { allowEmpty: boolean; newGroup: boolean }): Promise<string | null> {
  const missing = only?.filter((n) => !enabled.includes(n)) ?? [];
  if (missing.length > 0) return `drain: no enabled pipeline named ${missing.join(", ")}${nearest(missing[0]!, enabled)}`;
  if (enabled.length === 0) return allow.allowEmpty ? null : "drain: no enabled pipeline in the catalog (--allow-empty accepts this)";
  const groups = (await sql<{ g: string }[]>`SELECT DISTINCT relay_group_id AS g FROM pgtrickle.relay_consumer_offsets ORDER BY 1`).map((r) => r.g);
  if (groups.length > 0 && !groups.includes(groupId) && !allow.newGroup) {
    return `drain: relay group '${groupId}' has no stored offsets, but ${groups.map((g) => `'${g}'`).join(", ")} do${nearest(groupId, groups)}; a new group relays every outbox from its first row (--new-group to do that)`;
  }
  return null;
}

function printSummary(outcomes: Outcome[]): void {
  if (outcomes.length === 0) log.info("drain: no enabled pipeline in this relay group");
  for (const o of outcomes) {
    const line = `${o.name} (${o.direction}): ${o.state}, ${o.delivered} delivered, ${o.deadLettered} dead-lettered${o.error ? ` — ${o.error}` : ""}`;
    if (o.state === "drained") log.info(line);
    else log.error(line);
  }
}

function unreachable(err: unknown): never {
  log.error((err as Error).message);
  process.exit((err as { unreachable?: boolean }).unreachable ? EXIT.unreachable : EXIT.failed);
}
