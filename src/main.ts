#!/usr/bin/env bun
import { defineCommand, runMain } from "citty";
import { catalogCommand } from "./commands/catalog.ts";
import { checkCommand } from "./commands/check.ts";
import { demoCommand } from "./commands/demo.ts";
import { drainCommand, runCommand } from "./commands/run.ts";
import { statusCommand } from "./commands/status.ts";
import { COMMIT, VERSION } from "./version.ts";

const main = defineCommand({
  meta: {
    name: "pgtrickle-relay",
    version: `${VERSION} (${COMMIT})`,
    description:
      "Relays pg_trickle outbox rows to NATS, Kafka, HTTP, Redis, SQS, RabbitMQ, PostgreSQL or files, and external events into pg_trickle inboxes. Pipelines are configured in SQL (pgtrickle.set_relay_outbox / set_relay_inbox).",
  },
  subCommands: {
    run: runCommand,
    drain: drainCommand,
    status: statusCommand,
    check: checkCommand,
    catalog: catalogCommand,
    demo: demoCommand,
  },
});

runMain(main);
