/**
 * /metrics, /health, /health/drained, logs and backpressure of a running relay (a subprocess)
 * against real PostgreSQL. An HTTP receiver started by the test stands in for a sink whose
 * system goes down and comes back.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connect as natsConnect } from "nats";
import type { Sql } from "../../src/db.ts";
import { createStreamTable, enableOutbox, outboxTables, writeClaimCheck, writeRaw, writeV1Inline } from "../fixtures/outbox.ts";
import { getJson, getText, httpBase, metric, payloadIds } from "../helpers/observe.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { eventually, RunningRelay } from "../helpers/relay.ts";
import { inboxCount } from "../helpers/reverse.ts";
import { NATS_URL, requireServer } from "../helpers/servers.ts";

const dir = mkdtempSync(join(tmpdir(), "relay-observe-"));
let db: TestDatabase;
const relays: RunningRelay[] = [];
const outbox = new Map<string, string>();

beforeAll(async () => {
  db = await testDatabase("observe");
});
afterAll(async () => {
  for (const r of relays) if (r.proc.exitCode === null) r.proc.kill("SIGKILL");
  await Promise.all(relays.map((r) => r.proc.exited));
  if (process.env.PGTRICKLE_TEST_VERBOSE) for (const r of relays) console.error(`---- relay ${r.proc.pid}\n${r.stderr}`);
  await db?.drop();
});

async function pipeline(name: string, sink: Record<string, unknown>, source: Record<string, unknown> = {}) {
  if (!outbox.has(name)) {
    await createStreamTable(db.sql, `public.${name}`, "id int primary key");
    outbox.set(name, (await enableOutbox(db.sql, `public.${name}`)).outboxTable);
  }
  await db.sql.begin(async (tx) => {
    await tx`SELECT pgtrickle.set_relay_outbox(${name}, ${`public.${name}`}, NULL, ${tx.json(sink as never)})`;
    await tx`UPDATE pgtrickle.relay_outbox_config SET config = jsonb_set(config, '{source}', config->'source' || ${tx.json({ poll_interval_ms: 100, ...source } as never)}) WHERE name = ${name}`;
  });
}

async function rows(name: string, ids: number[]): Promise<string> {
  return writeV1Inline(db.sql, outbox.get(name)!, { inserted: ids.map((id) => ({ id })), deleted: [] });
}

function start(args: string[] = []): RunningRelay {
  const r = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0", "--discovery-interval", "1", "--coordinator-tick-ms", "100", ...args]);
  relays.push(r);
  return r;
}

async function stopAll() {
  for (const r of relays.splice(0)) {
    if (r.proc.exitCode === null) expect(await r.stop()).toBe(0);
  }
}

async function clearPipelines(sql: Sql) {
  await sql`DELETE FROM pgtrickle.relay_outbox_config`;
}

/** A port nothing listens on (yet). */
function freePort(): number {
  const s = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: () => new Response("") });
  const port = s.port!;
  s.stop(true);
  return port;
}

describe("/metrics", () => {
  afterAll(async () => {
    await stopAll();
    await clearPipelines(db.sql);
  });

  test("claim-check pages and full-refresh batches are counted", async () => {
    await stopAll();
    await pipeline("m_cc", { type: "file", output: join(dir, "m_cc.jsonl") }, { claim_check_fetch_size: 2 });
    const tables = await outboxTables(db.sql, "public.m_cc");
    // 0.37–0.45 claim-check: three snapshot rows, read in pages of two = 2 fetches, a full refresh.
    await writeClaimCheck(db.sql, tables.outboxTable, tables.deltaTable, [1, 2, 3].map((id) => ({ op: "INSERT" as const, data: { id } })));
    const relay = start();
    const base = await httpBase(relay);
    await eventually(() => payloadIds(join(dir, "m_cc.jsonl")).length === 3, 20_000, "the claim-check rows");
    const text = (await getText(`${base}/metrics`)).body;
    expect(metric(text, "pgtrickle_relay_claim_check_fetches_total", { pipeline: "m_cc" })).toBe(2);
    expect(metric(text, "pgtrickle_relay_full_refresh_batches_total", { pipeline: "m_cc" })).toBe(1);
    await stopAll();
    await db.sql`SELECT pgtrickle.disable_relay('m_cc')`;
  });

  test("counts what happened: published, consumed, polls, batches, errors by kind, dead letters, offsets, lag, ownership, health", async () => {
    await pipeline("m_ok", { type: "file", output: join(dir, "m_ok.jsonl") });
    await pipeline("m_poison", { type: "file", output: join(dir, "m_poison.jsonl") });
    await pipeline("m_bad", { type: "file", format: "xml" });
    await rows("m_ok", [1, 2, 3]);
    const last = await rows("m_ok", [4, 5]);
    await writeRaw(db.sql, outbox.get("m_poison")!, { v: 99 });
    const poisonLast = await rows("m_poison", [1]);
    const relay = start();
    const base = await httpBase(relay);
    await eventually(() => payloadIds(join(dir, "m_ok.jsonl")).length === 5 && payloadIds(join(dir, "m_poison.jsonl")).length === 1, 20_000, "delivery");

    let text = "";
    await eventually(
      async () => {
        const res = await getText(`${base}/metrics`);
        text = res.body;
        return (
          res.status === 200 &&
          metric(text, "pgtrickle_relay_last_committed_offset", { pipeline: "m_ok" }) === Number(last) &&
          metric(text, "pgtrickle_relay_consumer_lag_rows", { pipeline: "m_ok" }) === 0 &&
          metric(text, "pgtrickle_relay_last_committed_offset", { pipeline: "m_poison" }) === Number(poisonLast) &&
          metric(text, "pgtrickle_relay_pipeline_healthy", { pipeline: "m_bad" }) === 0
        );
      },
      10_000,
      "both pipelines committed, the bad one failed",
    );
    const fwd = (pipeline: string) => ({ pipeline, direction: "forward" });
    expect(metric(text, "pgtrickle_relay_messages_published_total", fwd("m_ok"))).toBe(5);
    expect(metric(text, "pgtrickle_relay_messages_consumed_total", fwd("m_ok"))).toBe(5);
    expect(metric(text, "pgtrickle_relay_polls_total", fwd("m_ok"))).toBeGreaterThanOrEqual(1);
    // Polls are counted where they happen, empty ones included: as many durations as polls.
    expect(metric(text, "pgtrickle_relay_poll_duration_seconds_count", fwd("m_ok"))).toBe(metric(text, "pgtrickle_relay_polls_total", fwd("m_ok")));
    expect(metric(text, "pgtrickle_relay_batches_committed_total", fwd("m_ok"))).toBeGreaterThanOrEqual(1);
    expect(metric(text, "pgtrickle_relay_batch_publish_duration_seconds_count", fwd("m_ok"))).toBeGreaterThanOrEqual(1);
    expect(metric(text, "pgtrickle_relay_errors_total", { ...fwd("m_poison"), kind: "decode" })).toBe(1);
    expect(metric(text, "pgtrickle_relay_dead_letters_total", { ...fwd("m_poison"), kind: "decode" })).toBe(1);
    expect(metric(text, "pgtrickle_relay_errors_total", { ...fwd("m_bad"), kind: "config" })).toBe(1);
    expect(metric(text, "pgtrickle_relay_pipelines_owned")).toBe(2);
    expect(metric(text, "pgtrickle_relay_pipeline_healthy", { pipeline: "m_ok" })).toBe(1);
    expect(metric(text, "pgtrickle_relay_pipeline_healthy", { pipeline: "m_bad" })).toBe(0);
    expect(metric(text, "pgtrickle_relay_consumer_lag_rows", { pipeline: "m_ok" })).toBe(0);
    expect(metric(text, "pgtrickle_relay_lag_seconds", { pipeline: "m_ok" })).toBe(0);
    expect(metric(text, "pgtrickle_relay_source_connected", { pipeline: "m_ok" })).toBe(1);
    expect(metric(text, "pgtrickle_relay_sink_connected", { pipeline: "m_ok" })).toBe(1);
    // Every family of docs/interface.md §7.11 is declared.
    for (const name of [
      "messages_published_total", "messages_consumed_total", "publish_errors_total", "source_errors_total", "errors_total",
      "dedup_skipped_total", "inbox_writes_total", "polls_total", "batches_committed_total", "claim_check_fetches_total",
      "full_refresh_batches_total", "poll_duration_seconds", "batch_publish_duration_seconds", "pipeline_healthy",
      "pipelines_owned", "last_committed_offset", "consumer_lag_rows", "lag_seconds", "source_connected", "sink_connected",
    ]) {
      expect(text).toContain(`# TYPE pgtrickle_relay_${name} `);
    }
    expect((await getText(`${base}/nope`)).status).toBe(404);
  }, 60_000);
});

describe("/health and /health/drained", () => {
  afterAll(async () => {
    await stopAll();
    await clearPipelines(db.sql);
  });

  test("healthy JSON; a failed pipeline makes it 503 until it is removed", async () => {
    await pipeline("h_ok", { type: "file", output: join(dir, "h_ok.jsonl") });
    const relay = start();
    const base = await httpBase(relay);
    await relay.waitForLog(/\[h_ok\] started/);
    await rows("h_ok", [1]);
    await eventually(async () => (await getJson(`${base}/health`)).body.pipelines[0]?.last_commit_at, 20_000, "delivery and commit");
    const ok = await getJson(`${base}/health`);
    expect(ok.status).toBe(200);
    expect(Object.keys(ok.body)).toEqual(["status", "pipelines_owned", "uptime_seconds", "postgres", "pipelines"]);
    expect(ok.body).toMatchObject({ status: "healthy", pipelines_owned: 1, postgres: "connected" });
    const p = ok.body.pipelines[0];
    expect(Object.keys(p)).toEqual([
      "name", "direction", "state", "source", "sink", "source_healthy", "sink_healthy", "last_poll_at", "last_commit_at", "lag_rows", "stalled_since", "last_error",
    ]);
    expect(p).toMatchObject({ name: "h_ok", direction: "forward", state: "running", source_healthy: true, sink_healthy: true, lag_rows: 0, stalled_since: null, last_error: null });
    expect(p.sink).toContain("h_ok.jsonl");
    expect(Date.parse(p.last_commit_at)).toBeGreaterThan(0);

    await pipeline("h_bad", { type: "file", format: "xml" });
    await eventually(async () => (await getJson(`${base}/health`)).status === 503, 10_000, "503 with a failed pipeline");
    const bad = await getJson(`${base}/health`);
    expect(bad.body.status).toBe("degraded");
    const failed = bad.body.pipelines.find((x: { name: string }) => x.name === "h_bad");
    expect(failed).toMatchObject({ state: "failed", source_healthy: false, sink_healthy: false });
    expect(failed.last_error).toContain("sink.format");

    // /health/drained names the failed pipeline with the rows waiting behind it, without being
    // held at 202 by it (it cannot make progress).
    await rows("h_bad", [1]);
    await rows("h_bad", [2]);
    const drained = await getJson(`${base}/health/drained`);
    expect(drained.status).toBe(200);
    expect(drained.body.failed_pipelines).toEqual([
      { name: "h_bad", direction: "forward", lag_rows: 2, last_error: expect.stringContaining("sink.format") },
    ]);

    await db.sql`SELECT pgtrickle.delete_relay('h_bad')`;
    await eventually(async () => (await getJson(`${base}/health`)).status === 200, 10_000, "200 again once the failed pipeline is gone");
  }, 60_000);

  test("a sink that is down: degraded (503, sink_healthy false, lagging in /health/drained), then resumes by itself", async () => {
    const port = freePort();
    await pipeline("h_http", { type: "http", url: `http://127.0.0.1:${port}/hook`, timeout_ms: 1000 });
    const relay = relays[0]!;
    const base = await httpBase(relay);
    await relay.waitForLog(/\[h_http\] started/);
    await rows("h_http", [1, 2]);
    await eventually(
      async () => (await getJson(`${base}/health`)).body.pipelines.some((x: { name: string; state: string }) => x.name === "h_http" && x.state === "degraded"),
      20_000,
      "h_http degraded",
    );
    const health = await getJson(`${base}/health`);
    expect(health.status).toBe(503);
    const h = health.body.pipelines.find((x: { name: string }) => x.name === "h_http");
    expect(h).toMatchObject({ sink_healthy: false, source_healthy: true, lag_rows: 1 });
    expect(h.last_error).toStartWith("sink:");
    const drained = await getJson(`${base}/health/drained`);
    expect(drained.status).toBe(202);
    expect(drained.body).toEqual({ drained: false, max_lag_rows: 1, lagging_pipelines: ["h_http"] });

    // The receiver comes up: the pipeline resumes without anyone touching it.
    const received: unknown[] = [];
    const server = Bun.serve({
      hostname: "127.0.0.1",
      port,
      async fetch(req) {
        received.push(await req.json());
        return new Response("ok");
      },
    });
    try {
      await eventually(async () => (await getJson(`${base}/health`)).status === 200, 60_000, "healthy again");
      expect(received.length).toBeGreaterThan(0);
      await eventually(async () => (await getJson(`${base}/health/drained`)).status === 200, 10_000, "drained");
      expect((await getJson(`${base}/health/drained`)).body).toEqual({ drained: true, max_lag_rows: 0 });
      expect(relay.stderr).toMatch(/\[h_http\] recovered/);
    } finally {
      server.stop(true);
    }
  }, 90_000);
});

describe("backpressure", () => {
  afterAll(async () => {
    await stopAll();
    await clearPipelines(db.sql);
  });

  test("--sink-max-inflight bounds what is in flight: a 12-row change goes out in batches of at most 5 / PIPELINE_DEPTH", async () => {
    await pipeline("bp", { type: "file", output: join(dir, "bp.jsonl") });
    await rows("bp", Array.from({ length: 12 }, (_, i) => i + 1));
    const relay = start(["--sink-max-inflight", "5"]);
    const base = await httpBase(relay);
    let text = "";
    await eventually(
      async () => {
        text = (await getText(`${base}/metrics`)).body;
        return metric(text, "pgtrickle_relay_messages_published_total", { pipeline: "bp", direction: "forward" }) === 12;
      },
      20_000,
      "all twelve published",
    );
    expect(payloadIds(join(dir, "bp.jsonl")).length).toBe(12);
    expect(metric(text, "pgtrickle_relay_messages_published_total", { pipeline: "bp", direction: "forward" })).toBe(12);
    // The outbox reads ahead (docs/PIPELINE.md): up to PIPELINE_DEPTH batches in flight, each of at
    // most floor(5 / 3) = 1 message, so 12 batches at least; an unbounded window would have taken one.
    expect(metric(text, "pgtrickle_relay_batches_committed_total", { pipeline: "bp", direction: "forward" })).toBeGreaterThanOrEqual(12);
  }, 60_000);
});

describe("logs", () => {
  afterAll(async () => {
    await stopAll();
    await clearPipelines(db.sql);
  });

  test("--log-format json: one JSON object per line, pipeline lines name the pipeline; --log-level filters", async () => {
    await pipeline("lg", { type: "file", output: join(dir, "lg.jsonl") });
    const json = start(["--log-format", "json", "--log-level", "debug"]);
    await json.waitForLog(/"pipeline":"lg","msg":"started/);
    const quiet = start(["--log-level", "warn", "--relay-group-id", "quiet"]);
    await db.sql`SELECT pgtrickle.set_relay_outbox('lg_bad', 'public.lg', NULL, '{"type":"file","format":"xml"}'::jsonb)`;
    await quiet.waitForLog(/ERROR \[lg_bad\] failed: .*sink\.format/);
    await json.waitForLog(/"pipeline":"lg_bad"/);
    await Promise.all([json.stop(), quiet.stop()]);
    const lines = json.stderr.trim().split("\n");
    const parsed = lines.map((l) => JSON.parse(l) as { time: string; level: string; pipeline?: string; msg: string });
    for (const p of parsed) {
      expect(Date.parse(p.time)).toBeGreaterThan(0);
      expect(["error", "warn", "info", "debug", "trace"]).toContain(p.level);
    }
    expect(parsed.some((p) => p.pipeline === "lg" && p.level === "info" && p.msg.startsWith("started: outbox public.lg → file"))).toBe(true);
    expect(parsed.some((p) => p.pipeline === "lg_bad" && p.level === "error")).toBe(true);
    expect(parsed.some((p) => p.level === "debug")).toBe(true);
    // warn level: errors and warnings only.
    expect(quiet.stderr).not.toContain(" INFO ");
    expect(quiet.stderr).toMatch(/^\S+ ERROR \[lg_bad\] failed/m);
  }, 60_000);
});

describe("/health/drained with a reverse pipeline", () => {
  const stream = `OBS_${process.pid}_${Math.floor(Math.random() * 1e6)}`;
  const subject = `obs${process.pid}.lag`;
  afterAll(async () => {
    await stopAll();
    await db.sql`DELETE FROM pgtrickle.relay_inbox_config`;
    const nc = await natsConnect({ servers: NATS_URL }).catch(() => null);
    if (nc) {
      await (await nc.jetstreamManager()).streams.delete(stream).catch(() => {});
      await nc.close();
    }
  });

  test("nats: 202 naming the pipeline while its messages wait (consumer lag), 200 once they are in the inbox", async () => {
    await requireServer("nats");
    const nc = await natsConnect({ servers: NATS_URL });
    const relay = start();
    const held = await db.sql.reserve();
    try {
      const jsm = await nc.jetstreamManager();
      await jsm.streams.add({ name: stream, subjects: [`${subject}.>`] });
      await db.sql`SELECT pgtrickle.create_inbox('obs_nats_inbox')`;
      await db.sql`SELECT pgtrickle.set_relay_inbox('obs_nats', 'obs_nats_inbox', ${db.sql.json({ type: "nats", url: NATS_URL, subject: `${subject}.>`, poll_interval_ms: 100 } as never)})`;
      const base = await httpBase(relay);
      await relay.waitForLog(/\[obs_nats\] started/);
      await eventually(async () => (await getJson(`${base}/health/drained`)).status === 200, 10_000, "drained before anything is published");
      // The inbox is locked: the relay fetches the messages but cannot commit them.
      await held`BEGIN`;
      await held`LOCK TABLE pgtrickle.obs_nats_inbox IN ACCESS EXCLUSIVE MODE`;
      const js = nc.jetstream();
      for (let i = 0; i < 7; i++) await js.publish(`${subject}.e`, new TextEncoder().encode(JSON.stringify({ i })));
      const lagging = await getJson(`${base}/health/drained`);
      expect(lagging.status).toBe(202);
      expect(lagging.body).toEqual({ drained: false, max_lag_rows: 7, lagging_pipelines: ["obs_nats"] });
      expect((await getJson(`${base}/health`)).body.pipelines.find((x: { name: string }) => x.name === "obs_nats")).toMatchObject({ direction: "reverse", lag_rows: 7 });
      await held`COMMIT`;
      await eventually(async () => (await getJson(`${base}/health/drained`)).status === 200, 20_000, "drained once the inbox took them");
      expect((await getJson(`${base}/health/drained`)).body).toEqual({ drained: true, max_lag_rows: 0 });
      expect(await inboxCount(db, "obs_nats_inbox")).toBe(7);
    } finally {
      await held`ROLLBACK`.catch(() => {});
      held.release();
      await nc.close();
    }
  }, 60_000);
});
