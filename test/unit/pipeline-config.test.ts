import { describe, expect, test } from "bun:test";
import { normalizePipeline, parseBackendConfig } from "../../src/pipeline-config.ts";
import { sinkBackend } from "../../src/backends/index.ts";

describe("normalizePipeline (CONTRACT.md §5.1)", () => {
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
  test("validation errors name the pipeline and the key, never the value", () => {
    const spec = normalizePipeline({ name: "p", direction: "forward", enabled: true, config: { source: { outbox: "o" }, sink: { type: "file", format: "s3cr3t-xml" } } });
    const b = sinkBackend(spec.sinkType, "p");
    let message = "";
    try {
      parseBackendConfig(spec, "sink", b, b.sink!.config);
    } catch (err) {
      message = (err as Error).message;
    }
    expect(message).toContain("pipeline 'p'");
    expect(message).toContain("sink.format");
    expect(message).not.toContain("s3cr3t");
  });
  test("unknown sink types list the known ones", () => {
    expect(() => sinkBackend("carrier-pigeon", "p")).toThrow(/unknown sink type 'carrier-pigeon' \(known: .*stdout/);
  });
});
