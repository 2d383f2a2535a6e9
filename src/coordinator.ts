import { connect, explainConnectError, type Sql } from "./db.ts";
import { errorKind, errorMessage } from "./errors.ts";
import { log, pipelineLog } from "./observe/log.ts";
import type { Metrics } from "./observe/metrics.ts";
import { OutboxSource } from "./outbox/source.ts";
import { Pipeline, type PipelineState } from "./pipeline.ts";
import { normalizePipeline, type CatalogRow } from "./pipeline-config.ts";
import type { Settings } from "./settings.ts";
import { abortableDelay, backoffMs } from "./sleep.ts";

interface Worker {
  key: string;
  row: CatalogRow;
  configText: string;
  pipeline: Pipeline | null;
  stop: AbortController;
  done: Promise<PipelineState>;
}

export interface CoordinatorOptions {
  drain: boolean;
  /** Only these pipeline names (drain --pipeline); all enabled ones otherwise. */
  only?: string[];
}

/** A pipeline that could not run, with why (config error, owned elsewhere…). */
export interface Outcome {
  name: string;
  direction: string;
  state: PipelineState | "locked_elsewhere";
  error: string | null;
  delivered: number;
  deadLettered: number;
}

const keyOf = (r: { name: string; direction: string }) => `${r.direction}:${r.name}`;

/**
 * Owns pipelines for this process: reads the catalog, wins each pipeline's advisory lock on one
 * pinned connection, runs a Pipeline per lock, and reacts to NOTIFYs (config changes, new outbox
 * rows). Losing the lock connection stops every worker at once: no publish without the lock.
 */
export class Coordinator {
  readonly workers = new Map<string, Worker>();
  readonly outcomes: Outcome[] = [];
  private lockSql!: Sql;
  private lockPid: number | null = null;
  private reloadTimer: ReturnType<typeof setTimeout> | undefined;
  private readonly stopAll = new AbortController();
  postgresConnected = false;

  constructor(
    private readonly settings: Settings,
    readonly sql: Sql,
    private readonly metrics: Metrics,
    private readonly options: CoordinatorOptions,
  ) {}

  /** Starts listening, loads the catalog and runs until stop() (or, when draining, until done). */
  async run(): Promise<void> {
    this.lockSql = connect(this.settings.postgresUrl, { max: 1, applicationName: "pgtrickle-relay coordinator" });
    await this.listen();
    const tick = Math.max(this.settings.coordinatorTickMs, 10);
    let lastDiscovery = 0;
    let attempt = 0;
    while (!this.stopAll.signal.aborted) {
      try {
        await this.checkLockConnection();
        if (Date.now() - lastDiscovery >= this.settings.discoveryIntervalSecs * 1000 || this.reloadRequested) {
          this.reloadRequested = false;
          lastDiscovery = Date.now();
          await this.reconcile();
        } else {
          await this.tryUnowned();
        }
        this.postgresConnected = true;
        attempt = 0;
      } catch (err) {
        this.postgresConnected = false;
        if (errorKind(err) === "config") throw err;
        log.warn(`coordinator: ${explainConnectError(err, this.settings.postgresUrl)}`);
        await abortableDelay(backoffMs(attempt++, 1000, 60_000), this.stopAll.signal);
        continue;
      }
      if (this.options.drain && this.drainFinished()) break;
      await abortableDelay(tick, this.stopAll.signal);
    }
  }

  private reloadRequested = true;
  private pendingRows: CatalogRow[] = [];
  /** Pipelines that failed, with the config they failed with: retried once the config changes. */
  private readonly failed = new Map<string, string>();

  /** Debounced full re-read (~100 ms) after a burst of config notifications. */
  requestReload(): void {
    clearTimeout(this.reloadTimer);
    this.reloadTimer = setTimeout(() => {
      this.reloadRequested = true;
    }, 100);
  }

  private async listen(): Promise<void> {
    await this.sql.listen("pgtrickle_relay_config", () => this.requestReload(), () => this.requestReload());
    await this.sql.listen(
      "pgtrickle_outbox_new",
      (outboxTable) => {
        for (const w of this.workers.values()) {
          const src = w.pipeline?.source;
          if (src instanceof OutboxSource && src.ready && src.outboxTable === outboxTable) src.wake();
        }
      },
      // After a reconnect, notifications sent meanwhile are lost: wake everyone once.
      () => this.workers.forEach((w) => w.pipeline?.source.wake?.()),
    );
  }

  private async loadCatalog(): Promise<CatalogRow[]> {
    const rows = await this.sql<CatalogRow[]>`SELECT name, direction, enabled, config FROM pgtrickle.list_relay_configs()`;
    return rows.filter((r) => r.enabled && (!this.options.only || this.options.only.includes(r.name)));
  }

  /** Brings the running set in line with the catalog: start new, stop removed, restart changed. */
  private async reconcile(): Promise<void> {
    const rows = await this.loadCatalog();
    const wanted = new Map(rows.map((r) => [keyOf(r), r]));
    for (const [key, w] of this.workers) {
      const row = wanted.get(key);
      if (!row) {
        log.info(`pipeline ${w.row.name} disabled or deleted: stopping`);
        await this.stopWorker(w);
      } else if (JSON.stringify(row.config) !== w.configText) {
        log.info(`pipeline ${w.row.name} changed: restarting with the new config`);
        await this.stopWorker(w);
      }
    }
    this.pendingRows = rows;
    await this.tryUnowned();
  }

  private async tryUnowned(): Promise<void> {
    for (const row of this.pendingRows) {
      const key = keyOf(row);
      if (this.workers.has(key)) continue;
      if (this.options.drain ? this.outcomes.some((o) => keyOf(o) === key) : this.failed.get(key) === JSON.stringify(row.config)) continue;
      if (this.workers.size >= this.settings.maxWorkers) return;
      const [got] = await this.lockSql<{ ok: boolean }[]>`
        SELECT pg_try_advisory_lock(hashtext(${this.settings.relayGroupId}), hashtext(${row.name})) AS ok`;
      if (!got?.ok) {
        if (this.options.drain) this.outcomes.push(outcome(row, "locked_elsewhere", "owned by another relay process of this relay group"));
        continue;
      }
      this.startWorker(row);
    }
    this.metrics.owned.set(this.workers.size);
  }

  private startWorker(row: CatalogRow): void {
    const stop = new AbortController();
    const plog = pipelineLog(row.name);
    let pipeline: Pipeline | null = null;
    let done: Promise<PipelineState>;
    try {
      const spec = normalizePipeline(row);
      pipeline = new Pipeline(spec, {
        sql: this.sql,
        postgresUrl: this.settings.postgresUrl,
        relayGroupId: this.settings.relayGroupId,
        metrics: this.metrics,
        log: plog,
        drain: this.options.drain,
      });
      done = pipeline.run(stop.signal);
    } catch (err) {
      plog.error(`failed: ${errorMessage(err)}`);
      this.metrics.errors.inc({ pipeline: row.name, direction: row.direction, kind: "config" });
      done = Promise.resolve("failed");
      this.outcomes.push(outcome(row, "failed", errorMessage(err)));
      this.failed.set(keyOf(row), JSON.stringify(row.config));
    }
    const worker: Worker = { key: keyOf(row), row, configText: JSON.stringify(row.config), pipeline, stop, done };
    this.workers.set(worker.key, worker);
    done.then((state) => {
      // A pipeline that ended by itself (drained, failed) keeps no lock; a config fix re-triggers it.
      if (this.workers.get(worker.key) !== worker) return;
      if (pipeline) this.outcomes.push({ ...outcome(row, state, pipeline.lastError), delivered: pipeline.delivered, deadLettered: pipeline.deadLettered });
      if (state === "failed") this.failed.set(worker.key, worker.configText);
      this.workers.delete(worker.key);
      void this.unlock(row.name);
      this.metrics.owned.set(this.workers.size);
    });
  }

  private async stopWorker(w: Worker): Promise<void> {
    this.workers.delete(w.key);
    w.stop.abort();
    await w.done;
    await this.unlock(w.row.name);
    this.outcomes.splice(0, this.outcomes.length, ...this.outcomes.filter((o) => keyOf(o) !== w.key));
    this.metrics.owned.set(this.workers.size);
  }

  private async unlock(name: string): Promise<void> {
    await this.lockSql`SELECT pg_advisory_unlock(hashtext(${this.settings.relayGroupId}), hashtext(${name}))`.catch(() => {});
  }

  /** Session locks die with their connection: if it was replaced, every worker must stop now. */
  private async checkLockConnection(): Promise<void> {
    const [row] = await this.lockSql<{ pid: number }[]>`SELECT pg_backend_pid() AS pid`;
    const pid = row!.pid;
    if (this.lockPid !== null && pid !== this.lockPid && this.workers.size > 0) {
      log.error("coordinator connection was lost: every advisory lock is gone; stopping all pipelines and racing again");
      await Promise.all([...this.workers.values()].map((w) => this.stopWorker(w)));
      this.reloadRequested = true;
    }
    this.lockPid = pid;
  }

  private drainFinished(): boolean {
    return this.workers.size === 0 && this.pendingRows.every((r) => this.outcomes.some((o) => keyOf(o) === keyOf(r)));
  }

  /** Graceful stop: every worker finishes its batch, then locks are released. */
  async stop(): Promise<void> {
    this.stopAll.abort();
    clearTimeout(this.reloadTimer);
    await Promise.all([...this.workers.values()].map((w) => this.stopWorker(w)));
    await this.lockSql?.end({ timeout: 2 });
  }

  get pipelines(): Pipeline[] {
    return [...this.workers.values()].flatMap((w) => (w.pipeline ? [w.pipeline] : []));
  }
}

function outcome(row: CatalogRow, state: Outcome["state"], error: string | null): Outcome {
  return { name: row.name, direction: row.direction, state, error, delivered: 0, deadLettered: 0 };
}
