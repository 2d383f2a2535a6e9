/**
 * Health reflects progress (docs/WATCHDOG.md): a pipeline with work pending and no commit for
 * longer than --stall-timeout is reported stalled — /health 503 naming it, the
 * pipeline_stalled metric, `status` — although its state says running; it is healthy again
 * once a commit goes through. The sink is a webhook receiver that holds its answer.
 */
import { afterAll, beforeAll, expect, test } from "bun:test";
import { createStreamTable, enableOutbox, writeV1Inline } from "../fixtures/outbox.ts";
import { getJson, getText, httpBase, metric } from "../helpers/observe.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { eventually, relayOnce, RunningRelay } from "../helpers/relay.ts";
import { requireServer } from "../helpers/servers.ts";

let db: TestDatabase;
let outboxTable = "";
let server: ReturnType<typeof Bun.serve>;
let relay: RunningRelay;
let base = "";
const received = new Set<string>();
let answer = Promise.withResolvers<void>();

beforeAll(async () => {
  await requireServer("postgres");
  db = await testDatabase("stall");
  await createStreamTable(db.sql, "public.slow", "id int primary key");
  ({ outboxTable } = await enableOutbox(db.sql, "public.slow"));
  server = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    idleTimeout: 0,
    async fetch(req) {
      const events = (await req.json()) as { dedup_key: string }[];
      await answer.promise;
      for (const e of events) received.add(e.dedup_key);
      return new Response("ok");
    },
  });
  // The request stays unanswered far longer than the stall time, and within the sink's and the
  // watchdog's deadlines: the pipeline keeps saying "running".
  const sink = { type: "http", url: `http://127.0.0.1:${server.port}/hook`, timeout_ms: 300_000 };
  await db.sql`SELECT pgtrickle.set_relay_outbox('s_http', 'public.slow', NULL, ${db.sql.json(sink)})`;
  relay = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0", "--stall-timeout", "2", "--io-timeout", "300"]);
  base = await httpBase(relay);
});

afterAll(async () => {
  answer.resolve();
  if (relay && relay.proc.exitCode === null) await relay.stop("SIGKILL");
  server?.stop(true);
  await db?.drop();
});

type Health = { status: string; pipelines: { name: string; state: string; stalled_since: string | null }[] };

async function statusState(): Promise<string> {
  const out = await relayOnce(["status", "--postgres-url", db.url, "--json"]);
  return (JSON.parse(out.stdout) as { pipelines: { name: string; state: string }[] }).pipelines.find((p) => p.name === "s_http")!.state;
}

test("pending work without a commit for longer than --stall-timeout is unhealthy whatever the state says, and healthy again after a commit", async () => {
  await relay.waitForLog(/\[s_http\] started/, 30_000);
  const id = await writeV1Inline(db.sql, outboxTable, { inserted: [{ id: 1 }], deleted: [] });

  let health: { status: number; body: Health } | null = null;
  const stalled = async () => {
    health = await getJson<Health>(`${base}/health`);
    if (health.status === 503 && health.body.pipelines.some((p) => p.name === "s_http" && p.state === "stalled" && p.stalled_since !== null)) return true;
    await Bun.sleep(250);
    return false;
  };
  await eventually(stalled, 30_000, "/health 503 naming s_http stalled").catch((err) => {
    throw new Error(`${err.message}: ${JSON.stringify(health)}\n${relay.stderr}`);
  });
  expect(metric((await getText(`${base}/metrics`)).body, "pgtrickle_relay_pipeline_stalled", { pipeline: "s_http" })).toBe(1);
  expect(metric((await getText(`${base}/metrics`)).body, "pgtrickle_relay_pipeline_healthy", { pipeline: "s_http" })).toBe(0);
  await eventually(async () => (await statusState()) === "stalled", 20_000, "`status` showing s_http stalled");
  expect(received.size).toBe(0);

  answer.resolve();
  await eventually(() => received.has(`${outboxTable}:${id}:0`), 30_000, "the row delivered once the receiver answers");
  await eventually(async () => (await getJson<Health>(`${base}/health`)).status === 200, 30_000, "/health 200 after the commit");
  expect(metric((await getText(`${base}/metrics`)).body, "pgtrickle_relay_pipeline_stalled", { pipeline: "s_http" })).toBe(0);
  await eventually(async () => (await statusState()) === "running", 20_000, "`status` showing s_http running");
}, 120_000);
