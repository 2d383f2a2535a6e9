import { beforeAll, describe, expect, test } from "bun:test";
import { normalizePipeline, parseBackendConfig } from "../../src/pipeline-config.ts";
import { loadBackends, sinkOf } from "../../src/backends/index.ts";

describe("normalizePipeline (docs/interface.md §5.1)", () => {
  beforeAll(() => loadBackends([{ sourceType: "outbox", sinkType: "stdout" }, { sourceType: "kafka", sinkType: "kafka" }]));
  test("the nested shape written by set_relay_outbox", () => {
    const spec = normalizePipeline({
      name: "p", direction: "forward", enabled: true,
      config: { source_type: "outbox", source: { outbox: "public.orders", group: null, retention_hours: 24 }, sink_type: "nats", sink: { type: "nats", url: "nats://x" } },
    });
    expect(spec).toMatchObject({ sourceType: "outbox", sinkType: "nats", source: { outbox: "public.orders" }, sink: { url: "nats://x" }, warnings: [] });
    expect(spec.sink.type).toBeUndefined();
  });
  test("flat keys are mapped with a deprecation warning; tuning keys move into source", () => {
    const spec = normalizePipeline({ name: "p", direction: "forward", enabled: true, config: { stream_table: "orders", sink_type: "webhook", webhook_url: "http://x", batch_size: 5 } });
    expect(spec.source).toEqual({ outbox: "orders", batch_size: 5 });
    expect(spec.sink).toEqual({ url: "http://x" });
    expect(spec.warnings.join()).toContain("webhook_url");
  });
  test("disagreeing type keys are a config error naming the pipeline", () => {
    expect(() => normalizePipeline({ name: "p9", direction: "forward", enabled: true, config: { sink_type: "nats", sink: { type: "kafka" } } })).toThrow(/pipeline 'p9'.*disagree/);
  });
  test("validation errors name the pipeline, the key and the value received", () => {
    const spec = normalizePipeline({ name: "p", direction: "forward", enabled: true, config: { source: { outbox: "o" }, sink: { type: "file", format: "s3cr3t-xml" } } });
    const b = sinkOf(spec.sinkType, "p");
    let message = "";
    try {
      parseBackendConfig(spec, "sink", b);
    } catch (err) {
      message = (err as Error).message;
    }
    expect(message).toContain("pipeline 'p'");
    expect(message).toContain("'sink.format' must be one of");
    expect(message).toContain('got "s3cr3t-xml"');
  });

  test("every problem of a side at once, in plain words, with the value received; secret-named keys never shown; unknown keys with a suggestion", () => {
    const spec = normalizePipeline({
      name: "k",
      direction: "forward",
      enabled: true,
      config: { source: { outbox: "o" }, sink: { type: "kafka", "brokers ": "x", acks: "some", sasl_password: 42, ack_timout_ms: 5 } },
    });
    const b = sinkOf(spec.sinkType, "k");
    let message = "";
    try {
      parseBackendConfig(spec, "sink", b);
    } catch (err) {
      message = (err as Error).message;
    }
    expect(message).toContain("'sink.brokers' is required");
    expect(message).toContain("'sink.sasl_password' must be a string, got (hidden)");
    expect(message).toContain("unknown kafka sink key 'sink.brokers ' (did you mean 'sink.brokers'?)");
    expect(message).not.toContain("Invalid key");
    expect(message).not.toContain("42");

    const ok = normalizePipeline({ name: "h", direction: "forward", enabled: true, config: { source: { outbox: "o" }, sink: { type: "file", formt: "csv" } } });
    const file = sinkOf(ok.sinkType, "h");
    parseBackendConfig(ok, "sink", file);
    expect(ok.unknownKeys).toEqual(["unknown stdout sink key 'sink.formt' (did you mean 'sink.format'?)"]);
  });

  test("pipeline names: non-empty, letters, digits and _ - . : only", () => {
    for (const name of ["", " x", "a b", "ünïcode", "x".repeat(129)]) {
      expect(() => normalizePipeline({ name, direction: "forward", enabled: true, config: { sink: { type: "stdout" } } })).toThrow(/pipeline name .* is not valid/);
    }
    expect(normalizePipeline({ name: "orders.eu-1:v2_x", direction: "forward", enabled: true, config: { sink: { type: "stdout" } } }).name).toBe("orders.eu-1:v2_x");
  });
  test("on_permanent_error: validated once for every backend, from source, sink or top level", () => {
    const row = (config: Record<string, unknown>) => ({ name: "pe", direction: "forward" as const, enabled: true, config: { sink: { type: "stdout" }, ...config } });
    expect(normalizePipeline(row({})).onPermanentError).toBe("dead_letter");
    expect(normalizePipeline(row({ on_permanent_error: "halt" })).onPermanentError).toBe("halt");
    expect(normalizePipeline(row({ sink: { type: "stdout", on_permanent_error: "halt" } })).onPermanentError).toBe("halt");
    // Any value but "halt" used to mean dead-letter in silence.
    expect(() => normalizePipeline(row({ source: { on_permanent_error: "stop" } }))).toThrow(/pipeline 'pe': 'pipeline.on_permanent_error' must be one of "dead_letter", "halt", got "stop"/);
  });
  test("unknown sink types list the known ones", () => {
    expect(() => sinkOf("carrier-pigeon", "p")).toThrow(/unknown sink type 'carrier-pigeon' \(known: .*stdout/);
  });
});
