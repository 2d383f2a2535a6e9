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
