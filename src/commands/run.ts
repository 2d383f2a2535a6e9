import { defineCommand } from "citty";
import { EXIT, loadSettings } from "../cli-common.ts";
import { log } from "../observe/log.ts";
import type { Outcome } from "../coordinator.ts";
import { runRelay } from "../relay.ts";
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

export const drainCommand = defineCommand({
  meta: {
    name: "drain",
    description:
      "Relay everything pending, then exit: 0 when every pipeline caught up, 1 if any failed or --timeout passed (summary on stderr), 3 if the database is unreachable. For CI jobs and one-shot runs.",
  },
  args: {
    ...processArgs,
    pipeline: { type: "string", description: "drain only these pipelines (comma-separated names)" },
    timeout: { type: "string", description: "give up after this many seconds (default: no limit)" },
    metrics: { type: "boolean", description: "also serve /metrics and /health while draining" },
  },
  async run({ args }) {
    const settings = loadSettings(args);
    const timeoutSecs = args.timeout ? Number(args.timeout) : 0;
    if (!Number.isFinite(timeoutSecs) || timeoutSecs < 0) {
      log.error(`--timeout must be a number of seconds, got "${args.timeout}"`);
      process.exit(EXIT.config);
    }
    const only = args.pipeline ? String(args.pipeline).split(",").map((s) => s.trim()).filter(Boolean) : undefined;
    const result = await runRelay(settings, { drain: true, only, timeoutSecs, http: !!args.metrics, retryConnect: false }).catch(unreachable);
    printSummary(result.outcomes);
    if (only) {
      const missing = only.filter((n) => !result.outcomes.some((o) => o.name === n));
      if (missing.length > 0) {
        log.error(`no enabled pipeline named ${missing.join(", ")}`);
        process.exit(EXIT.failed);
      }
    }
    process.exit(result.exitCode);
  },
});

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
