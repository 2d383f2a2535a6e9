import { defineCommand } from "citty";
import { requireCatalog } from "../catalog/status.ts";
import { listFlag } from "../cli.ts";
import { connectionArgs, EXIT, fail, loadSettings, printOut, withDatabase } from "../cli-common.ts";
import { COORDINATOR_APP, MEMBER_KEY_SQL, PIPELINE_LOCK_SQL } from "../coordinator/lock-session.ts";
import type { Sql } from "../db.ts";
import { redact } from "../redact.ts";
import { errorMessage } from "../errors.ts";
import { forwardProgress } from "../backends/outbox/progress.ts";
import { normalizePipeline, type CatalogRow, type PipelineSpec } from "../pipeline-config.ts";
import { settingArgs } from "../settings.ts";

/** The relay process holding a pipeline's lock, as PostgreSQL sees its coordinator session. */
export interface Owner {
  /** `<host>:<pid>` from the coordinator's application_name; null when the holder is not a relay. */
  process: string | null;
  backend_pid: number;
  application_name: string;
  client_addr: string | null;
}

export interface PipelineStatus {
  name: string;
  direction: string;
  enabled: boolean;
  /** The owner's last report (running, degraded, failed…), `unowned` or `disabled`. */
  state: string;
  owner: Owner | null;
  source: string;
  sink: string;
  /** Forward: last committed outbox id (relay offset or consumer-group offset). */
  committed_offset: string | null;
  lag_rows: number | null;
  lag_seconds: number | null;
  /** Unresolved rows in pgtrickle.relay_dead_letters. */
  dead_letters: number;
  last_error: string | null;
  status_updated_at: string | null;
}

export interface RelayStatus {
  relay_group_id: string;
  processes: Owner[];
  pipelines: PipelineStatus[];
}

const ownerOf = (pid: number, app: string, addr: string | null): Owner => ({
  process: app.startsWith(`${COORDINATOR_APP} `) ? app.slice(COORDINATOR_APP.length + 1) : null,
  backend_pid: pid,
  application_name: app,
  client_addr: addr,
});

/** `outbox public.orders` / `nats nats://host:4222` — from the stored config: tokens stay tokens, URL passwords are masked. */
export function describeSide(type: string, options: Record<string, unknown>): string {
  const text = (v: unknown) => (Array.isArray(v) ? v.join(",") : typeof v === "string" ? v : undefined);
  if (type === "outbox") {
    const group = typeof options.group === "string" ? ` (group ${options.group})` : "";
    return `outbox ${String(options.outbox ?? "?")}${group}`;
  }
  if (type === "stdout" || type === "file") {
    const path = text(options.output) ?? text(options.path);
    return path && path !== "-" ? `file ${path}` : "stdout";
  }
  for (const key of ["url", "brokers", "queue_url", "inbox", "listen_addr", "stream_key", "topic", "subject", "stream", "exchange", "queue"]) {
    const v = text(options[key]);
    if (v) return redact(`${type} ${v}`);
  }
  return type;
}

async function tableExists(sql: Sql, name: string): Promise<boolean> {
  const [row] = await sql<{ ok: boolean }[]>`SELECT to_regclass(${`pgtrickle.${name}`}) IS NOT NULL AS ok`;
  return row?.ok === true;
}

/** Everything `status` shows, read-only, from the catalog, pg_locks/pg_stat_activity and the relay tables. */
export async function relayStatus(sql: Sql, groupId: string): Promise<RelayStatus> {
  await requireCatalog(sql);
  const rows = await sql<CatalogRow[]>`SELECT name, direction, enabled, config FROM pgtrickle.list_relay_configs()`;
  const names = [...new Set(rows.map((r) => r.name))];
  const holders = await sql.unsafe<{ name: string; pid: number; app: string | null; addr: string | null }[]>(
    `SELECT n.name, l.pid, a.application_name AS app, host(a.client_addr) AS addr
       FROM unnest($2::text[]) AS n(name)
       JOIN pg_catalog.pg_locks l ON ${PIPELINE_LOCK_SQL} AND l.classid = hashtext($1)::oid AND l.objid = hashtext(n.name)::oid
       LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid`,
    [groupId, names],
  );
  const members = await sql.unsafe<{ pid: number; app: string | null; addr: string | null }[]>(
    `SELECT l.pid, a.application_name AS app, host(a.client_addr) AS addr
       FROM pg_catalog.pg_locks l LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
      WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted AND l.mode = 'ShareLock'
        AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
        AND l.classid = ((${MEMBER_KEY_SQL} >> 32) & 4294967295)::oid AND l.objid = (${MEMBER_KEY_SQL} & 4294967295)::oid
      ORDER BY a.backend_start`,
    [groupId],
  );
  const reports = (await tableExists(sql, "relay_pipeline_status"))
    ? await sql<{ pipeline: string; direction: string; owner: string | null; state: string; last_error: string | null; updated_at: Date }[]>`
        SELECT pipeline, direction, owner, state, last_error, updated_at FROM pgtrickle.relay_pipeline_status WHERE relay_group_id = ${groupId}`
    : [];
  const dead = await sql<{ pipeline: string; direction: string; n: number }[]>`
    SELECT pipeline, direction, count(*)::int AS n FROM pgtrickle.relay_dead_letters WHERE resolved_at IS NULL GROUP BY 1, 2`;

  const pipelines: PipelineStatus[] = [];
  for (const row of rows) {
    const h = holders.find((x) => x.name === row.name);
    const owner = h ? ownerOf(h.pid, h.app ?? "", h.addr) : null;
    const report = reports.find((r) => r.pipeline === row.name && r.direction === row.direction);
    let spec: PipelineSpec | null = null;
    let configError: string | null = null;
    try {
      spec = normalizePipeline(row);
    } catch (err) {
      configError = errorMessage(err);
    }
    const progress =
      spec && row.direction === "forward" ? await forwardProgress(sql, groupId, spec).catch(() => ({ offset: null, rows: null, seconds: null })) : { offset: null, rows: null, seconds: null };
    // A report is current only while its writer still owns the pipeline; "failed" outlives
    // ownership on purpose (a failed pipeline releases its lock).
    let state: string;
    if (!row.enabled) state = "disabled";
    else if (owner) state = report && report.owner === owner.process ? report.state : "starting";
    else state = report?.state === "failed" ? "failed" : "unowned";
    const showReport = report && (owner ? report.owner === owner.process : report.state === "failed");
    pipelines.push({
      name: row.name,
      direction: row.direction,
      enabled: row.enabled,
      state,
      owner,
      source: spec ? describeSide(spec.sourceType, spec.source) : "?",
      sink: spec ? describeSide(spec.sinkType, spec.sink) : "?",
      committed_offset: progress.offset,
      lag_rows: progress.rows,
      lag_seconds: progress.seconds,
      dead_letters: dead.find((d) => d.pipeline === row.name && d.direction === row.direction)?.n ?? 0,
      last_error: configError ?? (showReport ? report!.last_error : null),
      status_updated_at: showReport ? report!.updated_at.toISOString() : null,
    });
  }
  return { relay_group_id: groupId, processes: members.map((m) => ownerOf(m.pid, m.app ?? "", m.addr)), pipelines };
}

const ownerText = (o: Owner | null) => (o ? `${o.process ?? o.application_name ?? "?"} (backend ${o.backend_pid}${o.client_addr ? `, ${o.client_addr}` : ""})` : "-");

export interface FormatOptions {
  /** Characters per line; Infinity = no limit (--wide). */
  width: number;
  /** Every column, nothing cut (--wide). */
  wide: boolean;
  /** ANSI colour for the state (a terminal without NO_COLOR only). */
  color: boolean;
}

const STATE_COLOR: Record<string, number> = { failed: 31, degraded: 33, running: 32, drained: 32, unowned: 33 };
const paint = (text: string, state: string, on: boolean) => (on && STATE_COLOR[state] ? `\u001b[${STATE_COLOR[state]}m${text}\u001b[0m` : text);
const cut = (t: string, n: number) => (t.length > n ? `${t.slice(0, Math.max(0, n - 1))}…` : t);

/** Columns aligned; the last one takes what is left of `width` and is cut with `…`. Colour is applied after padding. */
function table(header: string[], body: string[][], states: string[], o: FormatOptions): string {
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((r) => r[i]!.length)));
  const last = header.length - 1;
  const used = widths.slice(0, last).reduce((a, b) => a + b + 2, 0);
  const room = o.width === Infinity ? Infinity : Math.max(header[last]!.length, o.width - used);
  const line = (cells: string[], state?: string) =>
    cells
      .map((c, i) => {
        if (i === last) return cut(c, room);
        const padded = c.padEnd(widths[i]!);
        return header[i] === "STATE" && state ? paint(padded, state, o.color) : padded;
      })
      .join("  ")
      .trimEnd();
  return [line(header), ...body.map((r, n) => line(r, states[n]))].join("\n");
}

export function formatStatus(s: RelayStatus, o: FormatOptions = { width: Infinity, wide: true, color: false }): string {
  const procs = s.processes.length === 0 ? "no relay process running" : `${s.processes.length} relay process(es): ${s.processes.map(ownerText).join("; ")}`;
  const head = `relay group '${s.relay_group_id}': ${procs}`;
  if (s.pipelines.length === 0) return `${head}\nno pipelines (add one with pgtrickle.set_relay_outbox / set_relay_inbox)`;
  const lag = (p: PipelineStatus) => (p.lag_rows === null ? "-" : `${p.lag_rows} rows / ${p.lag_seconds ?? 0} s`);
  const error = (p: PipelineStatus) => p.last_error?.replace(/\s+/g, " ") ?? "-";
  const states = s.pipelines.map((p) => p.state);
  if (o.wide) {
    const body = s.pipelines.map((p) => [
      p.name,
      p.direction,
      p.enabled ? "yes" : "no",
      p.state,
      ownerText(p.owner),
      `${p.source} → ${p.sink}`,
      p.committed_offset ?? "-",
      lag(p),
      String(p.dead_letters),
      error(p),
    ]);
    return `${head}\n${table(["PIPELINE", "DIRECTION", "ENABLED", "STATE", "OWNER", "SOURCE → SINK", "OFFSET", "LAG", "DEAD", "LAST ERROR"], body, states, o)}`;
  }
  const body = s.pipelines.map((p) => [
    cut(p.name, 30),
    p.direction === "forward" ? "fwd" : "rev",
    p.state,
    cut(`${p.source} → ${p.sink}`, 40),
    p.lag_rows === null ? "-" : String(p.lag_rows),
    String(p.dead_letters),
    error(p),
  ]);
  return `${head}\n${table(["PIPELINE", "DIR", "STATE", "SOURCE → SINK", "LAG", "DEAD", "LAST ERROR"], body, states, o)}`;
}

/** How `status` prints here: the terminal's width and colour, or 100 columns and none when piped. */
function formatOptions(wide: boolean): FormatOptions {
  const tty = process.stdout.isTTY === true;
  const columns = tty ? process.stdout.columns : Number(process.env.COLUMNS) || 100;
  return { width: wide ? Infinity : columns, wide, color: tty && !process.env.NO_COLOR };
}

export const statusCommand = defineCommand({
  meta: {
    name: "status",
    description:
      "One line per pipeline: state, source → sink, lag, unresolved dead letters, last error (--wide adds enabled, the relay process holding its lock from pg_locks + pg_stat_activity, and the committed offset). Read-only. Exit 1 when a pipeline is failed.",
  },
  args: {
    ...connectionArgs,
    ...settingArgs({ relayGroupId: "relay group whose locks and offsets to show" }),
    pipeline: { type: "string", description: "only these pipelines (comma-separated names)", valueHint: "names" },
    wide: { type: "boolean", description: "every column, nothing cut to the terminal's width" },
    watch: { type: "boolean", description: "redraw every --interval seconds until Ctrl-C" },
    interval: { type: "string", description: "seconds between redraws with --watch (default 2)", valueHint: "seconds" },
    json: { type: "boolean", description: "print JSON instead of a table" },
  },
  async run({ args }) {
    const settings = loadSettings(args);
    const only = listFlag(args.pipeline);
    const interval = args.interval === undefined ? 2 : Number(args.interval);
    if (!(interval > 0)) fail(`--interval must be a positive number of seconds, got "${args.interval}"`, EXIT.config);
    const exitCode = await withDatabase(settings, async (sql) => {
      for (;;) {
        const status = await relayStatus(sql, settings.relayGroupId);
        if (only) status.pipelines = status.pipelines.filter((p) => only.includes(p.name));
        const text = args.json ? JSON.stringify(status, null, 2) : formatStatus(status, formatOptions(!!args.wide));
        // On a terminal, --watch redraws in place (clear screen, cursor home).
        printOut(args.watch && process.stdout.isTTY ? `\u001b[2J\u001b[H${text}` : text);
        const failed = status.pipelines.some((p) => p.state === "failed");
        if (!args.watch) return failed ? EXIT.failed : 0;
        await Bun.sleep(interval * 1000);
      }
    });
    process.exit(exitCode);
  },
});
