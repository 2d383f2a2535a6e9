import { defineCommand } from "citty";
import { catalogStatus, requireCatalog } from "../catalog/index.ts";
import { listFlag } from "../cli.ts";
import { connectionArgs, EXIT, fail, loadSettings, printOut, withDatabase } from "../cli-common.ts";
import type { Sql } from "../db.ts";
import { configError, errorMessage } from "../errors.ts";
import { log } from "../observe/log.ts";
import { Metrics } from "../observe/metrics.ts";
import { loadBackends } from "../backends/index.ts";
import { Pipeline } from "../pipeline.ts";
import { normalizePipeline, type CatalogRow } from "../pipeline-config.ts";
import { redact } from "../redact.ts";
import { resolveSecrets } from "../secrets.ts";
import { settingArgs, type Settings } from "../settings.ts";
import { withTimeout as withDeadline } from "../sleep.ts";
import { describeSide } from "./status.ts";

export interface CheckResult {
  name: string;
  direction: string;
  enabled: boolean;
  ok: boolean;
  source: string | null;
  sink: string | null;
  /** Which step failed: config, secret, source, sink. */
  failed_at: string | null;
  error: string | null;
  /** What `run` would create on the systems (topics, streams, groups, queues…); check creates none of it. */
  would_create: string[];
}

/** Thrown to roll back the probe transaction: a check leaves nothing behind in the database. */
const ROLLBACK = Symbol("rollback");

const withTimeout = <T>(work: Promise<T>, ms: number, what: string): Promise<T> =>
  withDeadline(work, ms, what, () => new Error(`${what}: no answer within ${ms / 1000} s`));

/**
 * Starts one side of a pipeline (connect + destination checks) and closes it again. Backends in
 * check mode create nothing on their systems and report what they would create; database work
 * runs inside a transaction that is always rolled back, so an inbox the start would create, or an
 * outbox `auto_enable_outbox` would enable, is not left behind either.
 */
async function probe(sql: Sql, settings: Settings, row: CatalogRow, side: "source" | "sink", timeoutMs: number, wouldCreate: string[]): Promise<string> {
  let described = "";
  await sql
    .begin(async (tx) => {
      // checkPipeline validated the row first, which loaded its backends.
      const pipeline = new Pipeline(normalizePipeline(row), {
        sql: tx as unknown as Sql,
        postgresUrl: settings.postgresUrl,
        relayGroupId: settings.relayGroupId,
        metrics: new Metrics(),
        log: quietLog(row.name),
        drain: true,
        check: { wouldCreate: (what) => wouldCreate.push(what) },
      });
      const part = side === "source" ? pipeline.source : pipeline.sink;
      described = part.describe;
      try {
        await withTimeout(part.start(), timeoutMs, `${side} start`);
        // An HTTP sink connects only when it sends; a request could have effects on the
        // receiver, so reachability is proven by opening a connection to its host and port.
        if (side === "sink" && HTTP_TYPES.has(pipeline.spec.sinkType)) await withTimeout(reachable(pipeline.spec.sink.url), timeoutMs, "sink connect");
      } finally {
        await withTimeout(part.close(), 5000, `${side} close`).catch(() => {});
      }
      throw ROLLBACK;
    })
    .catch((err) => {
      if (err !== ROLLBACK) throw err;
    });
  return described;
}

const HTTP_TYPES = new Set(["http", "webhook"]);

/** The pipeline's logger without warnings: check reports a config's problems once, in its verdict. */
const quietLog = (name: string) => log.create({ level: 0 }).withTag(name);

/**
 * Validates both sides of a pipeline against the backend schemas without connecting anything;
 * throws a config error listing what is wrong. `run` only warns about an unknown key (it may be
 * newer than this binary); this refuses it. Used by `check` and before `pipeline set` writes.
 */
export async function validatePipelineRow(settings: Settings, sql: Sql, row: CatalogRow): Promise<void> {
  const spec = normalizePipeline(row);
  await loadBackends([spec]);
  new Pipeline(spec, { sql, postgresUrl: settings.postgresUrl, relayGroupId: settings.relayGroupId, metrics: new Metrics(), log: quietLog(row.name), drain: true });
  if (spec.unknownKeys.length > 0) throw configError(`pipeline '${row.name}': ${spec.unknownKeys.join("; ")}`);
}

/** Opens (and closes) a TCP connection to the host and port of an http(s) URL. */
async function reachable(url: unknown): Promise<void> {
  const u = new URL(resolveSecrets(String(url), "sink.url"));
  const port = Number(u.port || (u.protocol === "https:" ? 443 : 80));
  const hostname = u.hostname.replace(/^\[(.*)\]$/, "$1");
  const socket = await Bun.connect({ hostname, port, socket: { data() {}, error() {} } }).catch((err: unknown) => {
    throw new Error(`cannot connect to ${u.protocol}//${u.host}: ${errorMessage(err)}`);
  });
  socket.end();
}

export async function checkPipeline(sql: Sql, settings: Settings, row: CatalogRow, timeoutMs: number, offline = false): Promise<CheckResult> {
  const result: CheckResult = {
    name: row.name,
    direction: row.direction,
    enabled: row.enabled,
    ok: false,
    source: null,
    sink: null,
    failed_at: null,
    error: null,
    would_create: [],
  };
  const failWith = (step: string, err: unknown) => {
    result.failed_at = step;
    result.error = redact(errorMessage(err));
    return result;
  };
  try {
    const spec = normalizePipeline(row);
    result.source = describeSide(spec.sourceType, spec.source);
    result.sink = describeSide(spec.sinkType, spec.sink);
  } catch (err) {
    return failWith("config", err);
  }
  try {
    resolveSecrets(row.config, `pipeline '${row.name}'`);
  } catch (err) {
    return failWith("secret", err);
  }
  try {
    await validatePipelineRow(settings, sql, row);
  } catch (err) {
    return failWith("config", err);
  }
  for (const side of offline ? [] : (["source", "sink"] as const)) {
    try {
      result[side] = redact(await probe(sql, settings, row, side, timeoutMs, result.would_create));
    } catch (err) {
      return failWith(side, err);
    }
  }
  result.ok = true;
  return result;
}

export function formatCheck(r: CheckResult): string {
  const head = `${r.ok ? "ok  " : "FAIL"}  ${r.name} (${r.direction}${r.enabled ? "" : ", disabled"})`;
  const route = r.source || r.sink ? `: ${r.source ?? "?"} → ${r.sink ?? "?"}` : "";
  const creates = r.would_create.map((w) => `\n      run would create ${w}`).join("");
  return r.ok ? `${head}${route}${creates}` : `${head}${route}\n      ${r.failed_at}: ${r.error}`;
}

export const checkCommand = defineCommand({
  meta: {
    name: "check",
    description:
      "Validate every pipeline's config against the backend schemas, resolve its secrets, and connect to its source and sink (HTTP sinks: a TCP connection to the receiver). Changes nothing: no topic, stream, consumer group, queue or exchange is created on any system (what run would create is listed), database changes are rolled back. One verdict per pipeline; exit 1 if any fails. Secrets are never printed."
  },
  args: {
    ...connectionArgs,
    ...settingArgs({ relayGroupId: "relay group (offsets and consumer ids are looked up for it)" }),
    pipeline: { type: "string", description: "check only these pipelines (comma-separated names)" },
    timeout: { type: "string", description: "seconds to wait for each source/sink to connect (default 15)" },
    json: { type: "boolean", description: "print JSON instead of text" },
    offline: { type: "boolean", description: "validate configs and resolve secrets without connecting to any source or sink" },
  },
  async run({ args }) {
    const settings = loadSettings(args);
    const timeoutSecs = args.timeout === undefined ? 15 : Number(args.timeout);
    if (!(timeoutSecs > 0)) fail(`--timeout must be a positive number of seconds, got "${args.timeout}"`, EXIT.config);
    const only = listFlag(args.pipeline);
    const exitCode = await withDatabase(settings, async (sql) => {
      await requireCatalog(sql);
      const rows = (await sql<CatalogRow[]>`SELECT name, direction, enabled, config FROM pgtrickle.list_relay_configs()`).filter(
        (r) => !only || only.includes(r.name),
      );
      const missing = only?.filter((n) => !rows.some((r) => r.name === n)) ?? [];
      const access = (await catalogStatus(sql)).access;
      const results: CheckResult[] = [];
      for (const row of rows) {
        const r = await checkPipeline(sql, settings, row, timeoutSecs * 1000, !!args.offline);
        if (r.ok && rows.some((o) => o.name === row.name && o.direction !== row.direction)) {
          // The catalog allows it, but enable_relay, disable_relay and delete_relay act on both.
          Object.assign(r, { ok: false, failed_at: "config", error: "name shared by a forward and a reverse pipeline: enable_relay, disable_relay and delete_relay act on both; rename one" });
        }
        results.push(r);
        if (!args.json) printOut(formatCheck(r));
      }
      if (args.json) {
        printOut(JSON.stringify({ pipelines: results, missing, access_missing: access.missing }, null, 2));
      } else {
        if (rows.length === 0 && !only) printOut("no pipelines (add one with pgtrickle.set_relay_outbox / set_relay_inbox)");
        for (const name of missing) printOut(`FAIL  ${name}: no such pipeline`);
        if (access.missing.length > 0) printOut(`FAIL  database access: ${access.user} lacks ${access.missing.join("; ")}`);
      }
      const failed = results.filter((r) => !r.ok).length + missing.length + (access.missing.length > 0 ? 1 : 0);
      if (failed > 0) log.error(`check: ${failed} problem(s) found`);
      return failed > 0 ? EXIT.failed : 0;
    });
    process.exit(exitCode);
  },
});
