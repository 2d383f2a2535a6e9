#!/usr/bin/env bun
/**
 * The entry point. It imports only the command-line parser: each command's module (and what it
 * needs: postgres, consola…) is imported when that command runs, so `--version`
 * and `help <command>` load almost nothing (bench/startup.ts measures it).
 */
import { defineCommand } from "citty";
import { EXIT_USAGE, loadAllCommands, loadCommandPath, parseCommandLine, PROGRAM, renderHelp, UsageError, wrapLines, type AnyCommand } from "./cli.ts";
import { completionScript, SHELLS } from "./completion.ts";
import { COMMIT, VERSION } from "./version.ts";

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
async function settingNotes(): Promise<string[]> {
  const { SETTINGS } = await import("./settings.ts");
  return [
    "Settings (flag > environment variable > --config TOML key > default):",
    ...Object.values(SETTINGS).map((k) => `  --${k.flag} <${k.hint}>${k.fallback ? ` (default ${k.fallback})` : ""}\n      ${k.env}, ${k.file}`),
    "  --config <path>\n      PGTRICKLE_RELAY_CONFIG",
  ];
}

async function exitCodeNotes(): Promise<string[]> {
  const { EXIT_CODES } = await import("./cli-common.ts");
  return ["Exit codes:", ...EXIT_CODES.map(([code, text]) => `  ${String(code).padEnd(4)}${wrapLines(text, 72).join(`\n${" ".repeat(6)}`)}`)];
}

const main = defineCommand({
  meta: {
    name: PROGRAM,
    description:
      "Relays pg_trickle outbox rows to NATS, Kafka, HTTP, Redis, SQS, RabbitMQ, PostgreSQL or files, and external events into pg_trickle inboxes. Pipelines are configured in SQL (pgtrickle.set_relay_outbox / set_relay_inbox). Run `pgtrickle-relay <command> --help` for a command's flags.",
  },
  // Imported on first use (loadCommandPath); string literals, so `bun build --compile` bundles them.
  subCommands: {
    run: () => import("./commands/run.ts").then((m) => m.runCommand),
    drain: () => import("./commands/run.ts").then((m) => m.drainCommand),
    status: () => import("./commands/status.ts").then((m) => m.statusCommand),
    check: () => import("./commands/check.ts").then((m) => m.checkCommand),
    catalog: () => import("./commands/catalog.ts").then((m) => m.catalogCommand),
    pipeline: () => import("./commands/pipeline.ts").then((m) => m.pipelineCommand),
    "dead-letters": () => import("./commands/dead-letters.ts").then((m) => m.deadLettersCommand),
    tail: () => import("./commands/tail.ts").then((m) => m.tailCommand),
    demo: () => import("./commands/demo.ts").then((m) => m.demoCommand),
    completion: defineCommand({
      meta: { name: "completion", description: "Print the shell completion script for bash, zsh or fish" },
      args: { shell: { type: "positional", description: "bash, zsh or fish", required: true } },
      async run({ args }) {
        const shell = String(args.shell);
        if (!(SHELLS as readonly string[]).includes(shell)) throw new UsageError(`completion: unknown shell '${shell}'; one of ${SHELLS.join(", ")}`);
        await loadAllCommands(main);
        process.stdout.write(completionScript(shell as (typeof SHELLS)[number], main));
      },
    }),
    help: defineCommand({ meta: { name: "help", description: "Show the help of a command: help [command]" } }),
    version: defineCommand({ meta: { name: "version", description: "Print the version" } }),
  },
});

async function printHelp(path: string[]): Promise<void> {
  await loadCommandPath(main, path);
  const parsed = parseCommandLine(main, [...path, "--help"]);
  const key = parsed.path.join(" ");
  // The top-level help lists every command with its description.
  if (key === "") await loadAllCommands(main);
  const notes = key === "" ? [...(await settingNotes()), "", ...(await exitCodeNotes())] : key === "drain" ? await exitCodeNotes() : [];
  process.stdout.write(renderHelp(parsed.cmd, parsed.path, { examples: EXAMPLES[key], notes }));
}

async function dispatch(argv: string[]): Promise<void> {
  if (argv[0] === "-V" || argv[0] === "--version" || (argv[0] === "version" && argv.length === 1)) {
    process.stdout.write(`${PROGRAM} ${VERSION} (${COMMIT})\n`);
    return;
  }
  if (argv[0] === "help") return printHelp(argv.slice(1));
  await loadCommandPath(main, argv);
  const parsed = parseCommandLine(main, argv);
  if (parsed.help) return printHelp(parsed.path);
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
  const [{ log }, { redact }, { errorMessage }, { EXIT }] = await Promise.all([import("./observe/log.ts"), import("./redact.ts"), import("./errors.ts"), import("./cli-common.ts")]);
  log.error(redact(errorMessage(err)));
  process.exit(EXIT.failed);
}
