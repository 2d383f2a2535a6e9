import { Counter, Gauge, Histogram, Registry } from "prom-client";

/** The metric set of docs/interface.md §7.11. Labels never carry secrets or payload text. */
export class Metrics {
  readonly registry = new Registry();
  private readonly p = "pgtrickle_relay_";
  readonly published = this.counter("messages_published_total", "Messages accepted by the sink", ["pipeline", "direction"]);
  readonly consumed = this.counter("messages_consumed_total", "Messages read from the source", ["pipeline", "direction"]);
  readonly publishErrors = this.counter("publish_errors_total", "Failed sink writes", ["pipeline", "direction"]);
  readonly sourceErrors = this.counter("source_errors_total", "Failed polls", ["pipeline", "direction"]);
  readonly errors = this.counter("errors_total", "Errors by kind", ["pipeline", "direction", "kind"]);
  readonly dedupSkipped = this.counter("dedup_skipped_total", "Inbox rows skipped by ON CONFLICT", ["pipeline"]);
  readonly inboxWrites = this.counter("inbox_writes_total", "Inbox rows inserted", ["pipeline"]);
  readonly polls = this.counter("polls_total", "Source polls", ["pipeline", "direction"]);
  readonly batchesCommitted = this.counter("batches_committed_total", "Batches acknowledged at the source", ["pipeline", "direction"]);
  readonly claimCheckFetches = this.counter("claim_check_fetches_total", "Claim-check pages read", ["pipeline"]);
  readonly fullRefreshBatches = this.counter("full_refresh_batches_total", "Batches carrying full-refresh messages", ["pipeline"]);
  readonly deadLetters = this.counter("dead_letters_total", "Messages written to the dead-letter table", ["pipeline", "direction", "kind"]);
  readonly pollDuration = this.histogram("poll_duration_seconds", "Time to obtain one batch from the source", ["pipeline", "direction"]);
  readonly publishDuration = this.histogram("batch_publish_duration_seconds", "Time to write one batch to the sink", ["pipeline", "direction"]);
  readonly healthy = this.gauge("pipeline_healthy", "1 when the pipeline is running without errors and not stalled", ["pipeline"]);
  readonly stalled = this.gauge("pipeline_stalled", "1 when the pipeline has pending work and no commit for longer than --stall-timeout", ["pipeline"]);
  readonly owned = this.gauge("pipelines_owned", "Pipelines whose lock this process holds", []);
  readonly lastOffset = this.gauge("last_committed_offset", "Last committed outbox id", ["pipeline"]);
  readonly lagRows = this.gauge("consumer_lag_rows", "max(id) minus the committed offset", ["pipeline"]);
  readonly lagSeconds = this.gauge("lag_seconds", "Age of the oldest unpublished outbox row", ["pipeline"]);
  readonly sourceConnected = this.gauge("source_connected", "1 when the source is connected", ["pipeline"]);
  readonly sinkConnected = this.gauge("sink_connected", "1 when the sink is connected", ["pipeline"]);

  private counter(name: string, help: string, labelNames: string[]) {
    return new Counter({ name: this.p + name, help, labelNames, registers: [this.registry] });
  }
  private gauge(name: string, help: string, labelNames: string[]) {
    return new Gauge({ name: this.p + name, help, labelNames, registers: [this.registry] });
  }
  private histogram(name: string, help: string, labelNames: string[]) {
    return new Histogram({ name: this.p + name, help, labelNames, registers: [this.registry], buckets: [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30] });
  }
}
