import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { createStreamTable, enableOutbox, writeV1Inline } from "../fixtures/outbox.ts";
import { ROOT, ok, requireTool } from "../helpers/deploy.ts";
import { httpBase } from "../helpers/observe.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { RunningRelay, eventually } from "../helpers/relay.ts";
import { PROMETHEUS_URL, requireServer } from "../helpers/servers.ts";
import { Metrics } from "../../src/observe/metrics.ts";

/*
 * deploy/grafana/pgtrickle-relay.json and deploy/prometheus/pgtrickle-relay-alerts.yml against a
 * real Prometheus (scripts/services) scraping running relays under load. Two relays share one
 * database's pipelines: three healthy ones writing files, one whose HTTP sink answers 503 (it
 * falls behind), one whose sink answers 400 (dead letters), one with an invalid config (failed).
 * A third relay on a second database owns one pipeline and is killed (no owner). Every panel's
 * and every rule's expression must return data for these pipelines, and the "pipeline failed"
 * alert must fire, after its real `for`, for the failed one only.
 */

const RULES = join(ROOT, "deploy", "prometheus", "pgtrickle-relay-alerts.yml");
const DASHBOARD = join(ROOT, "deploy", "grafana", "pgtrickle-relay.json");
const u = `mon${process.pid}_${Math.floor(Math.random() * 1e6)}`;
const P = { ok: [0, 1, 2].map((i) => `${u}_ok_${i}`), lag: `${u}_lag`, dlq: `${u}_dlq`, bad: `${u}_bad`, orphan: `${u}_orphan` };

type Sample = { metric: Record<string, string>; value: [number, string] };
type Rule = { alert: string; expr: string; for?: string };

async function query(expr: string): Promise<Sample[]> {
  const res = await fetch(`${PROMETHEUS_URL}/api/v1/query?query=${encodeURIComponent(expr)}`);
  const body = (await res.json()) as { status: string; error?: string; data?: { result: Sample[] } };
  if (body.status !== "success") throw new Error(`Prometheus rejected ${expr}: ${body.error}`);
  return body.data!.result;
}

/** Grafana's variables as a dashboard user picking this test's pipelines would set them. */
function substitute(expr: string): string {
  return expr
    .replaceAll("$__rate_interval", "20s")
    .replaceAll("$job", "pgtrickle-relay")
    .replaceAll("$pipeline", `${u}_.*`);
}

const rules = (): Rule[] => (Bun.YAML.parse(readFileSync(RULES, "utf8")) as { groups: { rules: Rule[] }[] }).groups.flatMap((g) => g.rules);
const panels = (): { title: string; targets: { expr: string }[] }[] => JSON.parse(readFileSync(DASHBOARD, "utf8")).panels;

let db: TestDatabase;
let orphanDb: TestDatabase;
let sinkServer: ReturnType<typeof Bun.serve>;
const relays: RunningRelay[] = [];
let targetsFile = "";
let rulesFile = "";
let writing = true;
let writer: Promise<void> = Promise.resolve();
const dir = mkdtempSync(join(tmpdir(), "relay-monitoring-"));

async function reloadPrometheus(): Promise<void> {
  const res = await fetch(`${PROMETHEUS_URL}/-/reload`, { method: "POST" });
  if (!res.ok) throw new Error(`POST /-/reload answered ${res.status}: ${await res.text()}`);
}

beforeAll(async () => {
  await requireServer("postgres");
  await requireServer("prometheus");
  // Where this Prometheus reads targets and rules, from its loaded configuration.
  const config = (await (await fetch(`${PROMETHEUS_URL}/api/v1/status/config`)).json()) as { data: { yaml: string } };
  const loaded = Bun.YAML.parse(config.data.yaml) as { rule_files: string[]; scrape_configs: { job_name: string; file_sd_configs: { files: string[] }[] }[] };
  const job = loaded.scrape_configs.find((j) => j.job_name === "pgtrickle-relay");
  if (!job) throw new Error("the Prometheus of scripts/services has no job pgtrickle-relay; restart it with scripts/services");
  targetsFile = join(dirname(job.file_sd_configs[0]!.files[0]!), `${u}.json`);
  rulesFile = join(dirname(loaded.rule_files[0]!), `${u}.yml`);

  sinkServer = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    fetch: (req) => new Response("no", { status: new URL(req.url).pathname === "/dead" ? 400 : 503 }),
  });
  const sink = (path: string) => ({ type: "http", url: `http://127.0.0.1:${sinkServer.port}${path}` });

  db = await testDatabase("monitoring");
  await createStreamTable(db.sql, "public.mon", "id int primary key");
  const { outboxTable } = await enableOutbox(db.sql, "public.mon");
  const pipelines: [string, unknown][] = [
    ...P.ok.map((name) => [name, { type: "file", output: join(dir, `${name}.jsonl`) }] as [string, unknown]),
    [P.lag, sink("/slow")],
    [P.dlq, sink("/dead")],
    [P.bad, { type: "file", format: "xml" }],
  ];
  for (const [name, config] of pipelines) {
    await db.sql`SELECT pgtrickle.set_relay_outbox(${name}, 'public.mon', NULL, ${db.sql.json(config as never)})`;
  }
  orphanDb = await testDatabase("monitoring_orphan");
  await createStreamTable(orphanDb.sql, "public.mon", "id int primary key");
  await enableOutbox(orphanDb.sql, "public.mon");
  await orphanDb.sql`SELECT pgtrickle.set_relay_outbox(${P.orphan}, 'public.mon', NULL, ${orphanDb.sql.json({ type: "file", output: join(dir, "orphan.jsonl") })})`;

  const args = (url: string) => ["--postgres-url", url, "--metrics-addr", "127.0.0.1:0", "--coordinator-tick-ms", "200"];
  relays.push(new RunningRelay(args(db.url)), new RunningRelay(args(db.url)), new RunningRelay(args(orphanDb.url)));
  const addresses = await Promise.all(relays.map(async (r) => new URL(await httpBase(r)).host));
  writeFileSync(targetsFile, JSON.stringify([{ targets: addresses, labels: { test_run: u } }]));
  writeFileSync(rulesFile, readFileSync(RULES));
  await reloadPrometheus();

  // The load: a change every 100 ms, relayed by every pipeline of the first database.
  writer = (async () => {
    for (let id = 0; writing; id++) {
      await writeV1Inline(db.sql, outboxTable, { inserted: [{ id }], deleted: [] });
      await Bun.sleep(100);
    }
  })();
}, 120_000);

afterAll(async () => {
  writing = false;
  await writer.catch(() => {});
  for (const r of relays) r.proc.kill("SIGKILL");
  await Promise.all(relays.map((r) => r.proc.exited));
  for (const f of [targetsFile, rulesFile]) if (f) rmSync(f, { force: true });
  if (rulesFile) await reloadPrometheus().catch(() => {});
  sinkServer?.stop(true);
  await db?.drop();
  await orphanDb?.drop();
  rmSync(dir, { recursive: true, force: true });
});

describe("the alert rules", () => {
  test("pass promtool check rules", async () => {
    const promtool = requireTool("promtool", "scripts/services (Debian's prometheus package)");
    const r = await ok([promtool, "check", "rules", RULES]);
    expect(r.stdout).toContain(`SUCCESS: ${rules().length} rules found`);
    expect(rules().map((r) => r.alert).sort()).toEqual([
      "PgtrickleRelayDeadLetters",
      "PgtrickleRelayLagGrowing",
      "PgtrickleRelayPipelineFailed",
      "PgtrickleRelayPipelineWithoutOwner",
    ]);
  });
});

describe("the dashboard and the rules, read", () => {
  test("use only metric names the relay exports (src/observe/metrics.ts)", async () => {
    const exported = new Set([...new Metrics().registry.metrics().matchAll(/^# TYPE (\S+)/gm)].map((m) => m[1]!));
    expect(exported.size).toBeGreaterThan(15);
    const text = readFileSync(DASHBOARD, "utf8") + readFileSync(RULES, "utf8");
    const used = new Set([...text.matchAll(/pgtrickle_relay_[a-z_]+/g)].map((m) => m[0].replace(/_bucket$/, "")));
    expect(used.size).toBeGreaterThanOrEqual(9);
    for (const name of used) expect(exported).toContain(name);
  });

  test("the dashboard: a Prometheus data source variable, job and pipeline variables, unique panel ids, no overlapping panels", () => {
    const dashboard = JSON.parse(readFileSync(DASHBOARD, "utf8"));
    expect(dashboard.templating.list.map((v: { name: string }) => v.name)).toEqual(["datasource", "job", "pipeline"]);
    const ps = panels() as unknown as { id: number; datasource: { uid: string }; gridPos: { x: number; y: number; w: number; h: number } }[];
    expect(new Set(ps.map((p) => p.id)).size).toBe(ps.length);
    for (const p of ps) expect(p.datasource.uid).toBe("${datasource}");
    const cells = new Set<string>();
    for (const { gridPos: g } of ps) {
      for (let x = g.x; x < g.x + g.w; x++) for (let y = g.y; y < g.y + g.h; y++) {
        expect(cells.has(`${x},${y}`)).toBe(false);
        cells.add(`${x},${y}`);
      }
    }
  });
});

describe("against Prometheus scraping relays under load", () => {
  test("every dashboard panel's expression returns data for these pipelines", async () => {
    await eventually(async () => (await query(`up{test_run="${u}"} == 1`)).length === 3, 60_000, "Prometheus scraping the three relays");
    const exprs = panels().flatMap((p) => p.targets.map((t) => ({ title: p.title, expr: substitute(t.expr) })));
    expect(exprs.length).toBeGreaterThanOrEqual(14);
    const empty = new Set(exprs.map((e) => e.expr));
    await eventually(
      async () => {
        for (const e of exprs) if (empty.has(e.expr) && (await query(e.expr)).length > 0) empty.delete(e.expr);
        return empty.size === 0;
      },
      90_000,
      "data for every panel",
    ).catch((err) => {
      throw new Error(`${(err as Error).message}; still empty: ${exprs.filter((e) => empty.has(e.expr)).map((e) => e.title).join(", ")}`);
    });
    // Pipelines that work report their owner and throughput; the failed one reports 0.
    const owners = await query(substitute(exprs.find((e) => e.title === "Owner per pipeline")!.expr));
    const byPipeline = new Map(owners.map((s) => [s.metric.pipeline, s]));
    for (const name of P.ok) expect(byPipeline.get(name)?.value[1]).toBe("1");
    expect(byPipeline.get(P.bad)?.value[1]).toBe("0");
  }, 180_000);

  test("every rule's expression returns data for the pipeline it is about, and not for healthy ones", async () => {
    const byAlert = new Map(rules().map((r) => [r.alert, r.expr]));
    const expectations: [string, string][] = [
      ["PgtrickleRelayPipelineFailed", P.bad],
      ["PgtrickleRelayLagGrowing", P.lag],
      ["PgtrickleRelayDeadLetters", P.dlq],
      ["PgtrickleRelayPipelineWithoutOwner", P.orphan],
    ];
    // The orphan's relay dies once Prometheus has seen its pipeline.
    await eventually(async () => (await query(`pgtrickle_relay_pipeline_healthy{pipeline="${P.orphan}"}`)).length > 0, 60_000, "the orphan pipeline scraped");
    relays[2]!.proc.kill("SIGKILL");
    const missing = new Set(expectations.map(([alert]) => alert));
    const pipelinesOf = async (alert: string) => (await query(byAlert.get(alert)!)).map((s) => s.metric.pipeline);
    // Lag growing needs the oldest undelivered row to pass 60 s.
    await eventually(
      async () => {
        for (const [alert, pipeline] of expectations) if (missing.has(alert) && (await pipelinesOf(alert)).includes(pipeline)) missing.delete(alert);
        return missing.size === 0;
      },
      150_000,
      "every rule's expression to match",
    ).catch((err) => {
      throw new Error(`${(err as Error).message}; still without data: ${[...missing].join(", ")}`);
    });
    for (const [alert] of expectations) {
      const matched = await pipelinesOf(alert);
      for (const name of P.ok) expect(matched).not.toContain(name);
    }
  }, 200_000);

  test("the PipelineFailed alert fires for the failed pipeline (after its `for`), not for the healthy ones", async () => {
    type Alert = { labels: Record<string, string>; state: string };
    const alerts = async () => ((await (await fetch(`${PROMETHEUS_URL}/api/v1/alerts`)).json()) as { data: { alerts: Alert[] } }).data.alerts;
    const failed = (a: Alert) => a.labels.alertname === "PgtrickleRelayPipelineFailed" && a.labels.pipeline?.startsWith(`${u}_`);
    await eventually(async () => (await alerts()).some((a) => failed(a) && a.labels.pipeline === P.bad && a.state === "firing"), 150_000, `PgtrickleRelayPipelineFailed firing for ${P.bad}`);
    const firing = (await alerts()).filter((a) => failed(a) && a.state === "firing");
    expect(firing.find((a) => a.labels.pipeline === P.bad)?.labels.severity).toBe("critical");
    for (const name of P.ok) expect(firing.map((a) => a.labels.pipeline)).not.toContain(name);
  }, 180_000);
});
