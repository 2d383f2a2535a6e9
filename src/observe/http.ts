import type { Lag } from "../backends/types.ts";
import type { Coordinator } from "../coordinator.ts";
import type { Pipeline } from "../pipeline.ts";
import { redact } from "../redact.ts";
import { log } from "./log.ts";
import type { Metrics } from "./metrics.ts";

const started = Date.now();

export function parseAddr(addr: string): { hostname: string; port: number } {
  const i = addr.lastIndexOf(":");
  const hostname = (i > 0 ? addr.slice(0, i) : "0.0.0.0").replace(/^\[(.*)\]$/, "$1");
  const port = Number(i >= 0 ? addr.slice(i + 1) : addr);
  return { hostname, port };
}

/** Refreshes the lag gauges of every owned pipeline (on each scrape: Prometheus pulls). */
export async function refreshLag(coordinator: Coordinator, metrics: Metrics): Promise<Map<string, Lag | null>> {
  const out = new Map<string, Lag | null>();
  await Promise.all(
    coordinator.pipelines.map(async (p) => {
      const lag = await p.lag();
      out.set(`${p.direction}:${p.name}`, lag);
      if (lag) {
        metrics.lagRows.set({ pipeline: p.name }, lag.rows);
        metrics.lagSeconds.set({ pipeline: p.name }, lag.seconds);
      }
    }),
  );
  return out;
}

const failing = (p: Pipeline, side: "source" | "sink") => p.state === "degraded" && (p.failingSide === side || p.failingSide === "both");

/**
 * JSON of /health (docs/interface.md §7.12). `degraded` (503) when the database is unreachable, or a
 * pipeline of this process is degraded (its system is down), failed (bad config, unresolved
 * secret) or stalled (pending work, no commit for --stall-timeout, docs/WATCHDOG.md) — those are
 * listed with their state and last error, secrets redacted.
 */
export async function healthReport(coordinator: Coordinator, metrics: Metrics) {
  const lags = await refreshLag(coordinator, metrics);
  const running = coordinator.pipelines.map((p) => {
    const lag = lags.get(`${p.direction}:${p.name}`);
    return {
      name: p.name,
      direction: p.direction,
      state: p.reportedState,
      source: p.source.describe,
      sink: p.sink.describe,
      source_healthy: !failing(p, "source"),
      sink_healthy: !failing(p, "sink"),
      last_poll_at: p.lastPollAt?.toISOString() ?? null,
      last_commit_at: p.lastCommitAt?.toISOString() ?? null,
      lag_rows: lag?.rows ?? null,
      stalled_since: p.stalledSince?.toISOString() ?? null,
      last_error: p.lastError,
    };
  });
  const runningKeys = new Set(running.map((p) => `${p.direction}:${p.name}`));
  const failed = [...coordinator.failedPipelines.values()]
    .filter((f) => !runningKeys.has(`${f.direction}:${f.name}`))
    .map((f) => ({
      name: f.name,
      direction: f.direction,
      state: "failed",
      source: null,
      sink: null,
      source_healthy: false,
      sink_healthy: false,
      last_poll_at: null,
      last_commit_at: null,
      lag_rows: null,
      stalled_since: null,
      last_error: f.error,
    }));
  const pipelines = [...running, ...failed];
  const healthy = coordinator.postgresConnected && pipelines.every((p) => p.state === "running" || p.state === "starting" || p.state === "drained");
  return {
    status: healthy ? "healthy" : "degraded",
    pipelines_owned: running.length,
    uptime_seconds: Math.round((Date.now() - started) / 1000),
    postgres: coordinator.postgresConnected ? "connected" : "disconnected",
    pipelines,
  };
}

/**
 * 200 `{"drained":true,…}` once every running pipeline has nothing left; 202 with the laggards
 * otherwise. Pipelines that failed here are listed with their lag (`failed_pipelines`) but do not
 * hold the answer at 202: they cannot make progress, so a preStop hook waiting on them would
 * only wait out the grace period.
 */
export async function drainedReport(coordinator: Coordinator, metrics: Metrics) {
  const lags = await refreshLag(coordinator, metrics);
  const rows = coordinator.pipelines.map((p) => ({ name: p.name, rows: lags.get(`${p.direction}:${p.name}`)?.rows ?? 0 }));
  const lagging = rows.filter((r) => r.rows > 0);
  const max = Math.max(0, ...rows.map((r) => r.rows));
  const failed = (await coordinator.failedLag()).map((f) => ({ name: f.name, direction: f.direction, lag_rows: f.rows, last_error: f.error }));
  const failedPart = failed.length > 0 ? { failed_pipelines: failed } : {};
  return lagging.length === 0
    ? { drained: true as const, max_lag_rows: 0, ...failedPart }
    : { drained: false as const, max_lag_rows: max, lagging_pipelines: lagging.map((r) => r.name), ...failedPart };
}

function json(body: unknown, status: number): Response {
  return new Response(redact(JSON.stringify(body)), { status, headers: { "content-type": "application/json" } });
}

/** /metrics, /health and /health/drained on one listener. */
export function startHttp(addr: string, coordinator: Coordinator, metrics: Metrics) {
  const { hostname, port } = parseAddr(addr);
  const server = Bun.serve({
    hostname,
    port,
    async fetch(req) {
      const path = new URL(req.url).pathname;
      if (req.method !== "GET" && req.method !== "HEAD") return new Response("method not allowed\n", { status: 405 });
      try {
        if (path === "/metrics") {
          await refreshLag(coordinator, metrics);
          return new Response(redact(await metrics.registry.metrics()), { headers: { "content-type": metrics.registry.contentType } });
        }
        if (path === "/health") {
          const report = await healthReport(coordinator, metrics);
          return json(report, report.status === "healthy" ? 200 : 503);
        }
        if (path === "/health/drained") {
          const report = await drainedReport(coordinator, metrics);
          return json(report, report.drained ? 200 : 202);
        }
      } catch (err) {
        return new Response(redact(`error: ${(err as Error).message}\n`), { status: 500 });
      }
      return new Response("not found\n", { status: 404 });
    },
  });
  log.info(`metrics and health on http://${hostname}:${server.port}`);
  return server;
}
