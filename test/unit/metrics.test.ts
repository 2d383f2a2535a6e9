/**
 * The metrics text (src/observe/metrics.ts) as Prometheus reads it: checked by promtool, the
 * Prometheus project's own parser, and by value.
 */
import { describe, expect, test } from "bun:test";
import { Metrics } from "../../src/observe/metrics.ts";
import { requireTool } from "../helpers/deploy.ts";

function scrape(m: Metrics): string {
  return m.registry.metrics();
}

describe("metrics exposition", () => {
  test("promtool parses it: counters, gauges, a histogram, label values with quotes, backslashes and newlines", async () => {
    const m = new Metrics();
    const odd = { pipeline: 'a "quoted"\\ name\nwith a newline', direction: "forward" };
    m.published.inc(odd, 3);
    m.errors.inc({ ...odd, kind: "transient" });
    m.healthy.set({ pipeline: odd.pipeline }, 1);
    m.publishDuration.observe(odd, 0.02);
    m.publishDuration.startTimer(odd)();
    const promtool = requireTool("promtool", "scripts/services (Debian's prometheus package)");
    const proc = Bun.spawn([promtool, "check", "metrics"], { stdin: new Blob([scrape(m)]), stdout: "pipe", stderr: "pipe" });
    const problems = (await new Response(proc.stdout).text()) + (await new Response(proc.stderr).text());
    expect(await proc.exited).toBe(0);
    // promtool's lint only asks for units in counter names it does not know; nothing is malformed
    expect(problems).not.toMatch(/error|parse/i);
  });

  test("values: counters add up per label set, gauges keep the last value, remove() drops a series", () => {
    const m = new Metrics();
    m.consumed.inc({ pipeline: "p", direction: "forward" }, 10);
    m.consumed.inc({ pipeline: "p", direction: "forward" }, 5);
    m.consumed.inc({ pipeline: "q", direction: "reverse" });
    m.lagRows.set({ pipeline: "p" }, 7);
    m.lagRows.set({ pipeline: "p" }, 2);
    m.lagRows.set({ pipeline: "q" }, 9);
    m.lagRows.remove({ pipeline: "q" });
    m.owned.set(3);
    const text = scrape(m);
    expect(text).toContain('pgtrickle_relay_messages_consumed_total{pipeline="p",direction="forward"} 15\n');
    expect(text).toContain('pgtrickle_relay_messages_consumed_total{pipeline="q",direction="reverse"} 1\n');
    expect(text).toContain('pgtrickle_relay_consumer_lag_rows{pipeline="p"} 2\n');
    expect(text).not.toContain('pgtrickle_relay_consumer_lag_rows{pipeline="q"}');
    expect(text).toContain("pgtrickle_relay_pipelines_owned 3\n");
    expect(text).toContain("# TYPE pgtrickle_relay_messages_consumed_total counter\n");
  });

  test("a histogram's buckets are cumulative, with +Inf equal to the count", () => {
    const m = new Metrics();
    const labels = { pipeline: "p", direction: "forward" };
    for (const s of [0.0005, 0.003, 0.003, 0.2, 100]) m.pollDuration.observe(labels, s);
    const text = scrape(m);
    const bucket = (le: string) => Number(text.match(new RegExp(`pgtrickle_relay_poll_duration_seconds_bucket\\{pipeline="p",direction="forward",le="${le.replace("+", "\\+")}"\\} (\\S+)`))![1]);
    expect([bucket("0.001"), bucket("0.005"), bucket("0.1"), bucket("0.5"), bucket("30"), bucket("+Inf")]).toEqual([1, 3, 3, 4, 4, 5]);
    expect(text).toContain('pgtrickle_relay_poll_duration_seconds_count{pipeline="p",direction="forward"} 5\n');
    expect(text).toMatch(/pgtrickle_relay_poll_duration_seconds_sum\{pipeline="p",direction="forward"\} 100\.2065/);
  });
});
