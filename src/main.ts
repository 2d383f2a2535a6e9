#!/usr/bin/env bun
import { defineCommand } from "citty";
import { EXIT_USAGE, parseCommandLine, PROGRAM, renderHelp, UsageError, type AnyCommand } from "./cli.ts";
import { EXIT, EXIT_CODES } from "./cli-common.ts";
import { errorMessage } from "./errors.ts";
import { log } from "./observe/log.ts";
import { redact } from "./redact.ts";
import { catalogCommand } from "./commands/catalog.ts";
import { checkCommand } from "./commands/check.ts";
import { demoCommand } from "./commands/demo.ts";
import { drainCommand, runCommand } from "./commands/run.ts";
import { statusCommand } from "./commands/status.ts";
import { COMMIT, VERSION } from "./version.ts";

/**
 * kafkajs 2.2.4 arms `setTimeout(check, throttledUntil - Date.now())` with no throttle in force
 * (RequestQueue.scheduleCheckPendingRequests), a negative delay that the runtime turns into 1 ms
 * with a `TimeoutNegativeWarning` on stderr for every Kafka pipeline — noise that also breaks
 * `--log-format json`. A negative delay means "now" anyway, so it is passed on as 0.
 */
const runtimeSetTimeout = globalThis.setTimeout;
globalThis.setTimeout = Object.assign(
  (handler: (...args: unknown[]) => void, delay?: number, ...rest: unknown[]) => runtimeSetTimeout(handler, typeof delay === "number" && delay < 0 ? 0 : delay, ...rest),
  runtimeSetTimeout,
) as typeof setTimeout;

const PG = "--postgres-url postgres://relay@db/app";

/** Examples shown by `--help`, per command path. */
const EXAMPLES: Record<string, string[]> = {
  "": [
    `${PROGRAM} catalog install ${PG}`,
    `${PROGRAM} run ${PG} --metrics-addr 127.0.0.1:9090`,
    `${PROGRAM} status ${PG}`,
    `${PROGRAM} help drain`,
  ],
  run: [`${PROGRAM} run ${PG}`, `PGTRICKLE_RELAY_POSTGRES_URL='postgres://relay:\${env:PGPASSWORD}@db/app' ${PROGRAM} run --relay-group-id eu --log-format json`],
  drain: [`${PROGRAM} drain ${PG} --timeout 120`, `${PROGRAM} drain ${PG} --pipeline orders,payments --allow-dead-letters`],
  status: [`${PROGRAM} status ${PG}`, `${PROGRAM} status ${PG} --json`],
  check: [`${PROGRAM} check ${PG}`, `${PROGRAM} check ${PG} --pipeline orders --json`, `${PROGRAM} check ${PG} --offline`],
  catalog: [`${PROGRAM} catalog install ${PG}`, `${PROGRAM} catalog status ${PG} --json`],
  "catalog install": [`${PROGRAM} catalog install ${PG}`],
  "catalog status": [`${PROGRAM} catalog status ${PG}`, `${PROGRAM} catalog status ${PG} --json`],
  demo: [`${PROGRAM} demo`, `${PROGRAM} demo --count 5 --interval 200`, `${PROGRAM} demo --cleanup`],
};

const exitCodeNotes = ["Exit codes:", ...EXIT_CODES.map(([code, text]) => `  ${String(code).padEnd(4)}${text}`)];

const main = defineCommand({
  meta: {
    name: PROGRAM,
    description:
      "Relays pg_trickle outbox rows to NATS, Kafka, HTTP, Redis, SQS, RabbitMQ, PostgreSQL or files, and external events into pg_trickle inboxes. Pipelines are configured in SQL (pgtrickle.set_relay_outbox / set_relay_inbox). Run `pgtrickle-relay <command> --help` for a command's flags.",
  },
  subCommands: {
    run: runCommand,
    drain: drainCommand,
    status: statusCommand,
    check: checkCommand,
    catalog: catalogCommand,
    demo: demoCommand,
    help: defineCommand({ meta: { name: "help", description: "Show the help of a command: help [command]" } }),
    version: defineCommand({ meta: { name: "version", description: "Print the version" } }),
  },
});

function printHelp(path: string[]): void {
  const parsed = parseCommandLine(main, [...path, "--help"]);
  const key = parsed.path.join(" ");
  const notes = key === "" || key === "drain" ? exitCodeNotes : [];
  process.stdout.write(renderHelp(parsed.cmd, parsed.path, { examples: EXAMPLES[key], notes }));
}

async function dispatch(argv: string[]): Promise<void> {
  if (argv[0] === "-V" || argv[0] === "--version" || (argv[0] === "version" && argv.length === 1)) {
    process.stdout.write(`${PROGRAM} ${VERSION} (${COMMIT})\n`);
    return;
  }
  if (argv[0] === "help") return printHelp(argv.slice(1));
  const parsed = parseCommandLine(main, argv);
  if (parsed.help || parsed.path[0] === "version") return printHelp(parsed.path);
  const cmd = parsed.cmd as AnyCommand;
  await cmd.run!({ args: parsed.args as never, rawArgs: argv, cmd, data: undefined });
}

try {
  await dispatch(process.argv.slice(2));
} catch (err) {
  if (err instanceof UsageError) {
    process.stderr.write(`${PROGRAM}: ${err.message}\n`);
    process.exit(EXIT_USAGE);
  }
  // One line, secrets masked: a stack trace helps nobody who runs the binary.
  log.error(redact(errorMessage(err)));
  process.exit(EXIT.failed);
}
