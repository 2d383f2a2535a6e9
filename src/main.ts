#!/usr/bin/env bun
import { defineCommand } from "citty";
import { EXIT_USAGE, parseCommandLine, PROGRAM, renderHelp, UsageError, wrapLines, type AnyCommand } from "./cli.ts";
import { EXIT, EXIT_CODES } from "./cli-common.ts";
import { errorMessage } from "./errors.ts";
import { log } from "./observe/log.ts";
import { redact } from "./redact.ts";
import { catalogCommand } from "./commands/catalog.ts";
import { deadLettersCommand } from "./commands/dead-letters.ts";
import { pipelineCommand } from "./commands/pipeline.ts";
import { tailCommand } from "./commands/tail.ts";
import { checkCommand } from "./commands/check.ts";
import { demoCommand } from "./commands/demo.ts";
import { drainCommand, runCommand } from "./commands/run.ts";
import { statusCommand } from "./commands/status.ts";
import { completionScript, SHELLS } from "./completion.ts";
import { SETTINGS } from "./settings.ts";
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
  pipeline: [`${PROGRAM} pipeline list ${PG}`, `${PROGRAM} pipeline set orders-to-nats --outbox public.orders --type nats --set url=nats://nats:4222 --set stream=ORDERS ${PG}`],
  "pipeline list": [`${PROGRAM} pipeline list ${PG}`, `${PROGRAM} pipeline list ${PG} --json`],
  "pipeline show": [`${PROGRAM} pipeline show orders-to-nats ${PG}`],
  "pipeline set": [
    `${PROGRAM} pipeline set orders-to-nats --outbox public.orders --type nats --set url=nats://nats:4222 --set stream=ORDERS ${PG}`,
    `${PROGRAM} pipeline set payments-in --inbox payments_inbox --config payments.yaml ${PG}`,
    `echo '{"outbox":"public.orders","sink":{"type":"stdout"}}' | ${PROGRAM} pipeline set orders-out --config - ${PG}`,
  ],
  "pipeline enable": [`${PROGRAM} pipeline enable orders-to-nats ${PG}`],
  "pipeline disable": [`${PROGRAM} pipeline disable orders-to-nats ${PG}`],
  "pipeline delete": [`${PROGRAM} pipeline delete orders-to-nats ${PG}`],
  "dead-letters": [`${PROGRAM} dead-letters list ${PG}`, `${PROGRAM} dead-letters replay --pipeline orders-to-nats ${PG}`],
  "dead-letters list": [`${PROGRAM} dead-letters list ${PG} --pipeline orders-to-nats`, `${PROGRAM} dead-letters list ${PG} --all --json`],
  "dead-letters show": [`${PROGRAM} dead-letters show 42 ${PG}`],
  "dead-letters replay": [`${PROGRAM} dead-letters replay --pipeline orders-to-nats ${PG}`, `${PROGRAM} dead-letters replay --pipeline orders-to-nats --id 42 ${PG}`],
  "dead-letters purge": [`${PROGRAM} dead-letters purge --resolved --yes ${PG}`, `${PROGRAM} dead-letters purge --pipeline orders-to-nats ${PG}   # says how many, deletes nothing`],
  tail: [`${PROGRAM} tail public.orders ${PG}`, `${PROGRAM} tail public.orders --from-start --count 10 ${PG}`],
  completion: [`${PROGRAM} completion bash > /etc/bash_completion.d/${PROGRAM}`, `${PROGRAM} completion zsh > "\${fpath[1]}/_${PROGRAM}"`, `${PROGRAM} completion fish > ~/.config/fish/completions/${PROGRAM}.fish`],
  help: [`${PROGRAM} help drain`],
  version: [`${PROGRAM} version`],
  demo: [`${PROGRAM} demo`, `${PROGRAM} demo --count 5 --interval 200`, `${PROGRAM} demo --cleanup`],
};

/** The process settings, for the top-level help: each command's help lists those it takes. */
const settingNotes = [
  "Settings (flag > environment variable > --config TOML key > default):",
  ...Object.values(SETTINGS).map((k) => `  --${k.flag} <${k.hint}>${k.fallback ? ` (default ${k.fallback})` : ""}\n      ${k.env}, ${k.file}`),
  "  --config <path>\n      PGTRICKLE_RELAY_CONFIG",
];

const exitCodeNotes = ["Exit codes:", ...EXIT_CODES.map(([code, text]) => `  ${String(code).padEnd(4)}${wrapLines(text, 72).join(`\n${" ".repeat(6)}`)}`)];

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
    pipeline: pipelineCommand,
    "dead-letters": deadLettersCommand,
    tail: tailCommand,
    demo: demoCommand,
    completion: defineCommand({
      meta: { name: "completion", description: "Print the shell completion script for bash, zsh or fish" },
      args: { shell: { type: "positional", description: "bash, zsh or fish", required: true } },
      run({ args }) {
        const shell = String(args.shell);
        if (!(SHELLS as readonly string[]).includes(shell)) throw new UsageError(`completion: unknown shell '${shell}'; one of ${SHELLS.join(", ")}`);
        process.stdout.write(completionScript(shell as (typeof SHELLS)[number], main));
      },
    }),
    help: defineCommand({ meta: { name: "help", description: "Show the help of a command: help [command]" } }),
    version: defineCommand({ meta: { name: "version", description: "Print the version" } }),
  },
});

function printHelp(path: string[]): void {
  const parsed = parseCommandLine(main, [...path, "--help"]);
  const key = parsed.path.join(" ");
  const notes = key === "" ? [...settingNotes, "", ...exitCodeNotes] : key === "drain" ? exitCodeNotes : [];
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
