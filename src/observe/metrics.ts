/**
 * The metric set of docs/interface.md §7.11, kept in plain maps and written in Prometheus's text
 * exposition format (version 0.0.4) when scraped. Labels never carry secrets or payload text.
 *
 * Why not prom-client: loading it alone cost ≈ 18 MB of resident memory and part of a cold
 * start, and its per-call label handling showed in drain profiles (bench/RESULTS.md,
 * "Metrics without prom-client"); the relay needs only counters, gauges and one bucket layout.
 */

type Labels = Record<string, string>;

/** One labelled series per distinct label set, in first-use order (stable output). */
abstract class Family<V> {
  protected readonly series = new Map<string, { labels: Labels; value: V }>();

  constructor(
    readonly name: string,
    readonly help: string,
    readonly type: "counter" | "gauge" | "histogram",
  ) {}

  protected entry(labels: Labels, initial: () => V): { labels: Labels; value: V } {
    const key = labelText(labels);
    let e = this.series.get(key);
    if (!e) this.series.set(key, (e = { labels: { ...labels }, value: initial() }));
    return e;
  }

  remove(labels: Labels): void {
    this.series.delete(labelText(labels));
  }

  render(): string {
    let out = `# HELP ${this.name} ${escapeHelp(this.help)}\n# TYPE ${this.name} ${this.type}\n`;
    for (const [key, e] of this.series) out += this.lines(key, e.labels, e.value);
    return out;
  }

  protected abstract lines(key: string, labels: Labels, value: V): string;
}

/** A family of one number per series: a line `name{labels} value` each. */
abstract class NumberFamily extends Family<number> {
  protected lines(key: string, _labels: Labels, value: number): string {
    return `${this.name}${key} ${formatNumber(value)}\n`;
  }
}

class Counter extends NumberFamily {
  constructor(name: string, help: string) {
    super(name, help, "counter");
  }
  inc(labels: Labels, by = 1): void {
    this.entry(labels, () => 0).value += by;
  }
}

class Gauge extends NumberFamily {
  constructor(name: string, help: string, unlabelled: boolean) {
    super(name, help, "gauge");
    if (unlabelled) this.set(0); // a gauge without labels has a value from the start
  }
  set(labelsOrValue: Labels | number, value?: number): void {
    if (typeof labelsOrValue === "number") this.entry({}, () => 0).value = labelsOrValue;
    else this.entry(labelsOrValue, () => 0).value = value!;
  }
}

const BUCKETS = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30];

interface HistogramValue {
  /** Observations per bucket (not cumulative; the +Inf bucket is `count`). */
  buckets: number[];
  sum: number;
  count: number;
}

class Histogram extends Family<HistogramValue> {
  constructor(name: string, help: string) {
    super(name, help, "histogram");
  }
  observe(labels: Labels, seconds: number): void {
    const v = this.entry(labels, () => ({ buckets: BUCKETS.map(() => 0), sum: 0, count: 0 })).value;
    const i = BUCKETS.findIndex((le) => seconds <= le);
    if (i >= 0) v.buckets[i]!++;
    v.sum += seconds;
    v.count++;
  }
  /** Observes the seconds from now to the call of the returned function. */
  startTimer(labels: Labels): () => void {
    const started = performance.now();
    return () => this.observe(labels, (performance.now() - started) / 1000);
  }
  protected lines(_key: string, labels: Labels, v: HistogramValue): string {
    let out = "";
    let cumulative = 0;
    BUCKETS.forEach((le, i) => {
      cumulative += v.buckets[i]!;
      out += `${this.name}_bucket${labelText({ ...labels, le: String(le) })} ${cumulative}\n`;
    });
    out += `${this.name}_bucket${labelText({ ...labels, le: "+Inf" })} ${v.count}\n`;
    out += `${this.name}_sum${labelText(labels)} ${formatNumber(v.sum)}\n`;
    out += `${this.name}_count${labelText(labels)} ${v.count}\n`;
    return out;
  }
}

/** `{a="x",b="y"}`, or nothing without labels; values escaped as the format requires. */
function labelText(labels: Labels): string {
  const parts = Object.entries(labels).map(([k, v]) => `${k}="${String(v).replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n")}"`);
  return parts.length === 0 ? "" : `{${parts.join(",")}}`;
}

const escapeHelp = (text: string) => text.replace(/\\/g, "\\\\").replace(/\n/g, "\\n");

function formatNumber(n: number): string {
  if (Number.isNaN(n)) return "NaN";
  if (n === Infinity) return "+Inf";
  if (n === -Infinity) return "-Inf";
  return String(n);
}

/** The families of one process, in the order they are declared. */
class Registry {
  readonly contentType = "text/plain; version=0.0.4; charset=utf-8";
  private readonly families: { render(): string }[] = [];
  add<F extends { render(): string }>(family: F): F {
    this.families.push(family);
    return family;
  }
  metrics(): string {
    return this.families.map((f) => f.render()).join("\n") + "\n";
  }
}

export class Metrics {
  readonly registry = new Registry();
  private readonly p = "pgtrickle_relay_";
  readonly published = this.counter("messages_published_total", "Messages accepted by the sink");
  readonly consumed = this.counter("messages_consumed_total", "Messages read from the source");
  readonly publishErrors = this.counter("publish_errors_total", "Failed sink writes");
  readonly sourceErrors = this.counter("source_errors_total", "Failed polls");
  readonly errors = this.counter("errors_total", "Errors by kind");
  readonly dedupSkipped = this.counter("dedup_skipped_total", "Inbox rows skipped by ON CONFLICT");
  readonly inboxWrites = this.counter("inbox_writes_total", "Inbox rows inserted");
  readonly polls = this.counter("polls_total", "Source polls");
  readonly batchesCommitted = this.counter("batches_committed_total", "Batches acknowledged at the source");
  readonly claimCheckFetches = this.counter("claim_check_fetches_total", "Claim-check pages read");
  readonly fullRefreshBatches = this.counter("full_refresh_batches_total", "Batches carrying full-refresh messages");
  readonly deadLetters = this.counter("dead_letters_total", "Messages written to the dead-letter table");
  readonly pollDuration = this.histogram("poll_duration_seconds", "Time to obtain one batch from the source");
  readonly publishDuration = this.histogram("batch_publish_duration_seconds", "Time to write one batch to the sink");
  readonly healthy = this.gauge("pipeline_healthy", "1 when the pipeline is running without errors and not stalled");
  readonly stalled = this.gauge("pipeline_stalled", "1 when the pipeline has pending work and no commit for longer than --stall-timeout");
  readonly owned = this.gauge("pipelines_owned", "Pipelines whose lock this process holds", true);
  readonly lastOffset = this.gauge("last_committed_offset", "Last committed outbox id");
  readonly lagRows = this.gauge("consumer_lag_rows", "max(id) minus the committed offset");
  readonly lagSeconds = this.gauge("lag_seconds", "Age of the oldest unpublished outbox row");
  readonly sourceConnected = this.gauge("source_connected", "1 when the source is connected");
  readonly sinkConnected = this.gauge("sink_connected", "1 when the sink is connected");

  private counter(name: string, help: string) {
    return this.registry.add(new Counter(this.p + name, help));
  }
  private gauge(name: string, help: string, unlabelled = false) {
    return this.registry.add(new Gauge(this.p + name, help, unlabelled));
  }
  private histogram(name: string, help: string) {
    return this.registry.add(new Histogram(this.p + name, help));
  }
}
