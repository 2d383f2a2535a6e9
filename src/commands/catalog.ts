import { defineCommand } from "citty";
import { installCatalog } from "../catalog/install.ts";
import { catalogStatus, formatCatalogStatus } from "../catalog/status.ts";
import { connectionArgs, loadSettings, printOut, withDatabase } from "../cli-common.ts";
import { describeUrl } from "../db.ts";
import { log } from "../observe/log.ts";

const install = defineCommand({
  meta: {
    name: "install",
    description:
      "Create the relay catalog (pipeline tables, SQL functions, NOTIFY trigger, pgtrickle_relay role, dead-letter table) if missing. Idempotent; leaves a catalog owned by the pg_trickle extension untouched.",
  },
  args: connectionArgs,
  async run({ args }) {
    const settings = loadSettings(args);
    await withDatabase(settings, async (sql) => {
      const result = await installCatalog(sql);
      log.info(`catalog install on ${describeUrl(settings.postgresUrl)}: ${result.summary}`);
      // One statement per line on stdout, so an owner can pipe or paste them into psql as they are.
      if (result.ownerStatements.length > 0) process.stdout.write(result.ownerStatements.join("\n") + "\n");
    });
  },
});

const status = defineCommand({
  meta: { name: "status", description: "Show which relay catalog, outbox API and inbox API objects exist, and the pg_trickle version." },
  args: { ...connectionArgs, json: { type: "boolean", description: "print JSON instead of text" } },
  async run({ args }) {
    const settings = loadSettings(args);
    await withDatabase(settings, async (sql) => {
      const st = await catalogStatus(sql);
      printOut(args.json ? JSON.stringify(st, null, 2) + "\n" : formatCatalogStatus(st));
    });
  },
});

export const catalogCommand = defineCommand({
  meta: { name: "catalog", description: "Install or inspect the relay catalog in the database" },
  subCommands: { install, status },
});
