/**
 * One owned pipeline, as the coordinator keeps it (docs/interface.md §7.3–7.4): its lock's
 * session, the two ways of stopping it, what happens to its lock once it ended; how its Pipeline
 * is built and run, with the LockGuard through which it asks whether it still owns what it commits.
 */
import type { ConsolaInstance } from "consola";
import type { Sql } from "../db.ts";
import { errorMessage } from "../errors.ts";
import { pipelineLog } from "../observe/log.ts";
import type { Metrics } from "../observe/metrics.ts";
import { Pipeline, type LockGuard, type PipelineState } from "../pipeline.ts";
import { normalizePipeline, type CatalogRow } from "../pipeline-config.ts";
import { redact } from "../redact.ts";
import type { Settings } from "../settings.ts";
import type { Desired } from "./catalog.ts";
import type { LockSession } from "./lock-session.ts";
import type { StatusTable } from "./status.ts";

/** Why a worker is being stopped, which decides what happens to its lock afterwards. */
export type EndAction = "unlock" | "restart" | "lost";

export interface Worker {
  key: string;
  row: CatalogRow;
  fingerprint: string;
  pipeline: Pipeline | null;
  /** Graceful: finish the batch in hand, commit, stop. */
  stop: AbortController;
  /** Hard: the lock is gone; publish and commit nothing more. */
  lost: AbortController;
  session: LockSession;
  startedAt: number;
  endAction: EndAction;
  /** A newer catalog row to start with once this one has stopped (endAction "restart"). */
  next?: Desired;
  /** Resolves when the pipeline ended and the lock was released (or handed to the restart). */
  ended: Promise<void>;
}

/** What a worker's pipeline is built with. */
export interface WorkerDeps {
  settings: Settings;
  sql: Sql;
  metrics: Metrics;
  drain: boolean;
  status: StatusTable;
}

/**
 * Builds the worker's pipeline and runs it until it ends. One that cannot be built (an invalid
 * config, an unresolved secret) ends "failed" at once: logged, counted and recorded.
 */
export function runWorker(worker: Worker, d: Desired, deps: WorkerDeps): Promise<PipelineState> {
  const { row } = worker;
  const { settings, metrics, status } = deps;
  const plog = pipelineLog(row.name);
  const guard = lockGuard(worker, settings.relayGroupId, plog);
  try {
    if (d.secretError) throw Object.assign(new Error(d.secretError), { secret: true });
    const spec = normalizePipeline(row);
    const pipeline = new Pipeline(spec, {
      sql: deps.sql,
      postgresUrl: settings.postgresUrl,
      relayGroupId: settings.relayGroupId,
      metrics,
      log: plog,
      drain: deps.drain,
      sinkMaxInflight: settings.sinkMaxInflight,
      ioTimeoutMs: settings.ioTimeoutSecs * 1000,
      stallTimeoutMs: settings.stallTimeoutSecs * 1000,
      guard,
      onStatus: (p) => status.record(row, p.reportedState, p.lastError),
    });
    worker.pipeline = pipeline;
    status.record(row, "starting", null);
    return pipeline.run(worker.stop.signal);
  } catch (err) {
    const message = redact(errorMessage(err));
    const kind = (err as { secret?: boolean }).secret ? "secret" : "config";
    plog.error(`failed: ${message}`);
    metrics.errors.inc({ pipeline: row.name, direction: row.direction, kind });
    metrics.healthy.set({ pipeline: row.name }, 0);
    status.record(row, "failed", message);
    return Promise.resolve("failed");
  }
}

/** The lock is gone: stop at once, commit nothing more, and do not unlock or restart after. */
export function hardStop(w: Worker): void {
  w.endAction = "lost";
  w.next = undefined;
  w.lost.abort();
  w.stop.abort();
}

/** The worker's view of its lock: held by `groupId`'s lock on the worker's pipeline name. */
function lockGuard(worker: Worker, groupId: string, plog: ConsolaInstance): LockGuard {
  const { session, lost, row } = worker;
  return {
    lost: lost.signal,
    holder: () => (session.lost || lost.signal.aborted ? null : { pid: session.pid, groupId, pipeline: row.name }),
    confirm: async () => {
      if (session.lost) return false;
      const held = await session.holds(groupId, row.name).catch(() => false);
      if (!held && !lost.signal.aborted) {
        plog.error("the advisory lock is no longer held by this process: stopping without committing");
        hardStop(worker);
      }
      return held;
    },
  };
}

/** Per-pipeline gauges must not outlive ownership: another replica reports them now. */
export function clearPipelineGauges(m: Metrics, name: string, state: PipelineState): void {
  for (const g of [m.lagRows, m.lagSeconds, m.lastOffset, m.sourceConnected, m.sinkConnected, m.stalled]) g.remove({ pipeline: name });
  if (state === "failed") m.healthy.set({ pipeline: name }, 0);
  else m.healthy.remove({ pipeline: name });
}
