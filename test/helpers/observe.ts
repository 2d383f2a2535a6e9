import { existsSync, readFileSync } from "node:fs";
import { hostname } from "node:os";
import type { Sql } from "../../src/db.ts";
import type { RunningRelay } from "./relay.ts";

/** Base URL of a relay's /metrics and /health (started with `--metrics-addr 127.0.0.1:0`). */
export async function httpBase(relay: RunningRelay): Promise<string> {
  await relay.waitForLog(/metrics and health on http:\/\/\S+/);
  return /metrics and health on (http:\/\/\S+)/.exec(relay.stderr)![1]!;
}

export async function getJson<T = any>(url: string): Promise<{ status: number; body: T }> {
  const res = await fetch(url);
  return { status: res.status, body: (await res.json()) as T };
}

export async function getText(url: string): Promise<{ status: number; body: string }> {
  const res = await fetch(url);
  return { status: res.status, body: await res.text() };
}

/** The value of one Prometheus sample, e.g. `metric(text, "pgtrickle_relay_pipelines_owned")`. */
export function metric(text: string, name: string, labels: Record<string, string> = {}): number | null {
  for (const line of text.split("\n")) {
    if (!line.startsWith(name)) continue;
    const m = /^([a-z_]+)(\{([^}]*)\})? (\S+)$/.exec(line);
    if (!m || m[1] !== name) continue;
    const got = Object.fromEntries([...(m[3] ?? "").matchAll(/(\w+)="([^"]*)"/g)].map((x) => [x[1], x[2]]));
    if (Object.entries(labels).every(([k, v]) => got[k] === v)) return Number(m[4]);
  }
  return null;
}

/** application_name of a relay's coordinator session (`pgtrickle-relay coordinator <host>:<pid>`). */
export const coordinatorAppOf = (relay: RunningRelay) => `pgtrickle-relay coordinator ${hostname()}:${relay.proc.pid}`.slice(0, 63);

/** Backend pid of a relay's coordinator session, or null before it connected. */
export async function coordinatorBackend(sql: Sql, relay: RunningRelay): Promise<number | null> {
  const rows = await sql<{ pid: number }[]>`
    SELECT pid FROM pg_stat_activity WHERE application_name = ${coordinatorAppOf(relay)} AND datname = current_database()`;
  return rows[0]?.pid ?? null;
}

/** For each pipeline name: the backend pids holding its advisory lock in this database. */
export async function lockHolders(sql: Sql, names: string[], group = "default"): Promise<Map<string, number[]>> {
  const rows = await sql<{ name: string; pid: number | null }[]>`
    SELECT n.name, l.pid FROM unnest(${names}::text[]) AS n(name)
    LEFT JOIN pg_locks l ON l.locktype = 'advisory' AND l.objsubid = 2 AND l.granted
     AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
     AND l.classid = hashtext(${group})::oid AND l.objid = hashtext(n.name)::oid`;
  const out = new Map<string, number[]>(names.map((n) => [n, []]));
  for (const r of rows) if (r.pid !== null) out.get(r.name)!.push(r.pid);
  return out;
}

export interface Line {
  dedup_key: string;
  subject: string;
  payload: any;
  op: string;
  outbox_id: number | null;
}

/** Complete lines only: the relay may be appending to the file while it is read. */
export function readLines(path: string): Line[] {
  if (!existsSync(path)) return [];
  const lines = readFileSync(path, "utf8").split("\n");
  lines.pop(); // "" after the last newline, or a line still being written
  return lines.filter((l) => l.trim() !== "").map((l) => JSON.parse(l));
}

/** The `id`s of the row payloads a file sink wrote, in order (duplicates kept). */
export const payloadIds = (path: string) => readLines(path).map((l) => l.payload?.id as number);

type HealthReport = { status: string; pipelines: { name: string; state: string; last_error: string | null }[] };

/** Waits until /health answers 503 with every one of `names` degraded; fails with the last report and the relay's log. */
export async function expectAllDegraded(base: string, names: readonly string[], relay: RunningRelay, timeoutMs = 60_000, failingSide?: "source" | "sink"): Promise<void> {
  let last: { status: number; body: HealthReport } | null = null;
  const until = Date.now() + timeoutMs;
  // With a side named, /health must also say which side is failing and that the other is not.
  const blamed = (p: Record<string, unknown>) =>
    !failingSide || (p[`${failingSide}_healthy`] === false && p[`${failingSide === "sink" ? "source" : "sink"}_healthy`] === true);
  for (;;) {
    last = await getJson<HealthReport>(`${base}/health`);
    const degraded = last.body.pipelines.filter((p) => p.state === "degraded" && blamed(p as unknown as Record<string, unknown>)).map((p) => p.name);
    if (last.status === 503 && names.every((n) => degraded.includes(n))) return;
    if (Date.now() > until) throw new Error(`timed out waiting for ${names.join(", ")} degraded, /health 503: ${JSON.stringify(last)}\n${relay.stderr.slice(-4000)}`);
    await Bun.sleep(500);
  }
}

/** Waits until /health answers 200 and each of `count` relay_pipeline_status rows is running with its last error cleared. */
export async function expectAllRecovered(sql: Sql, base: string, count: number, timeoutMs = 30_000): Promise<void> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const rows = await sql<{ pipeline: string; state: string; last_error: string | null }[]>`SELECT pipeline, state, last_error FROM pgtrickle.relay_pipeline_status`;
    const health = await getJson(`${base}/health`);
    if (health.status === 200 && rows.length === count && rows.every((r) => r.state === "running" && r.last_error === null)) return;
    if (Date.now() > until) throw new Error(`timed out waiting for every pipeline running with its last error cleared, /health 200: ${health.status} ${JSON.stringify(rows)}`);
    await Bun.sleep(500);
  }
}
