import type { Coordinator } from "../coordinator.ts";
import { log } from "./log.ts";
import type { Metrics } from "./metrics.ts";

const started = Date.now();

function parseAddr(addr: string): { hostname: string; port: number } {
  const i = addr.lastIndexOf(":");
  const hostname = (i > 0 ? addr.slice(0, i) : "0.0.0.0").replace(/^\[(.*)\]$/, "$1");
  const port = Number(i >= 0 ? addr.slice(i + 1) : addr);
  return { hostname, port };
}

/** JSON of /health (CONTRACT.md §7.12); never holds a secret (sources/sinks describe themselves safely). */
export async function healthReport(coordinator: Coordinator) {
  const pipelines = await Promise.all(
    coordinator.pipelines.map(async (p) => {
      const lag = await p.source.lag?.().catch(() => null);
      return {
        name: p.name,
        direction: p.direction,
        state: p.state,
        source: p.source.describe,
        sink: p.sink.describe,
        source_healthy: p.state !== "degraded" || !p.lastError?.startsWith("source"),
        sink_healthy: p.state !== "degraded" || !p.lastError?.startsWith("sink"),
        last_poll_at: p.lastPollAt?.toISOString() ?? null,
        last_commit_at: p.lastCommitAt?.toISOString() ?? null,
        lag_rows: lag?.rows ?? null,
        last_error: p.lastError,
      };
    }),
  );
  const healthy = coordinator.postgresConnected && pipelines.every((p) => p.state === "running" || p.state === "starting");
  return {
    status: healthy ? "healthy" : "degraded",
    pipelines_owned: pipelines.length,
    uptime_seconds: Math.round((Date.now() - started) / 1000),
    postgres: coordinator.postgresConnected ? "connected" : "disconnected",
    pipelines,
  };
}

/** /metrics, /health and /health/drained on one listener. */
export function startHttp(addr: string, coordinator: Coordinator, metrics: Metrics) {
  const { hostname, port } = parseAddr(addr);
  const server = Bun.serve({
    hostname,
    port,
    async fetch(req) {
      const path = new URL(req.url).pathname;
      if (path === "/metrics") {
        for (const p of coordinator.pipelines) {
          const lag = await p.source.lag?.().catch(() => null);
          if (lag) {
            metrics.lagRows.set({ pipeline: p.name }, lag.rows);
            metrics.lagSeconds.set({ pipeline: p.name }, lag.seconds);
          }
        }
        return new Response(await metrics.registry.metrics(), { headers: { "content-type": metrics.registry.contentType } });
      }
      if (path === "/health") {
        const report = await healthReport(coordinator);
        return Response.json(report, { status: report.status === "healthy" ? 200 : 503 });
      }
      if (path === "/health/drained") {
        const report = await healthReport(coordinator);
        const lagging = report.pipelines.filter((p) => (p.lag_rows ?? 0) > 0);
        const max = Math.max(0, ...report.pipelines.map((p) => p.lag_rows ?? 0));
        return Response.json(
          lagging.length === 0 ? { drained: true, max_lag_rows: 0 } : { drained: false, max_lag_rows: max, lagging_pipelines: lagging.map((p) => p.name) },
          { status: lagging.length === 0 ? 200 : 202 },
        );
      }
      return new Response("not found\n", { status: 404 });
    },
  });
  log.info(`metrics and health on http://${hostname}:${server.port}`);
  return server;
}
