/**
 * `pgtrickle-relay status` and `check` as subprocesses against real PostgreSQL, and the promise
 * that a resolved secret never appears in any output: logs, /metrics, /health, status, check,
 * the status table.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync } from "node:fs";
import { hostname, tmpdir } from "node:os";
import { join } from "node:path";
import { createStreamTable, enableOutbox, writeRaw, writeV1Inline } from "../fixtures/outbox.ts";
import { coordinatorBackend, getText, httpBase, payloadIds } from "../helpers/observe.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { eventually, relayCommand, relayOnce, RunningRelay } from "../helpers/relay.ts";

const dir = mkdtempSync(join(tmpdir(), "relay-commands-"));
let db: TestDatabase;
const relays: RunningRelay[] = [];
const outbox = new Map<string, string>();

beforeAll(async () => {
  db = await testDatabase("commands");
});
afterAll(async () => {
  for (const r of relays) if (r.proc.exitCode === null) r.proc.kill("SIGKILL");
  await Promise.all(relays.map((r) => r.proc.exited));
  await db?.drop();
});

async function pipeline(name: string, sink: Record<string, unknown>, options: { source?: Record<string, unknown>; table?: string; group?: string } = {}) {
  const table = options.table ?? name;
  if (!outbox.has(table)) {
    await createStreamTable(db.sql, `public.${table}`, "id int primary key");
    outbox.set(table, (await enableOutbox(db.sql, `public.${table}`)).outboxTable);
  }
  await db.sql.begin(async (tx) => {
    await tx`SELECT pgtrickle.set_relay_outbox(${name}, ${`public.${table}`}, ${options.group ?? null}, ${tx.json(sink as never)})`;
    await tx`UPDATE pgtrickle.relay_outbox_config SET config = jsonb_set(config, '{source}', config->'source' || ${tx.json({ poll_interval_ms: 100, ...options.source } as never)}) WHERE name = ${name}`;
  });
}

const rows = (table: string, ids: number[]) => writeV1Inline(db.sql, outbox.get(table)!, { inserted: ids.map((id) => ({ id })), deleted: [] });

describe("status", () => {
  let relay: RunningRelay;
  afterAll(async () => {
    if (relay) expect(await relay.stop()).toBe(0);
    await db.sql`DELETE FROM pgtrickle.relay_outbox_config`;
  });

  test("one line per pipeline: state, owner from pg_locks/pg_stat_activity, source → sink, offset, lag, dead letters, last error; --json", async () => {
    await pipeline("st_run", { type: "file", output: join(dir, "st_run.jsonl") });
    await pipeline("st_off", { type: "file", output: join(dir, "st_off.jsonl") });
    await pipeline("st_fail", { type: "file", format: "xml" });
    await db.sql`SELECT pgtrickle.disable_relay('st_off')`;
    await rows("st_run", [1]);
    await writeRaw(db.sql, outbox.get("st_run")!, { v: 99 });
    const last = await rows("st_run", [2]);
    await rows("st_off", [1]);
    await rows("st_off", [2]);
    relay = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0", "--coordinator-tick-ms", "100"]);
    relays.push(relay);
    await eventually(() => payloadIds(join(dir, "st_run.jsonl")).length === 2, 20_000, "st_run delivered");
    await relay.waitForLog(/\[st_fail\] failed/);

    let st: any;
    await eventually(
      async () => {
        const out = await relayOnce(["status", "--postgres-url", db.url, "--json"]);
        st = JSON.parse(out.stdout);
        const run = st.pipelines.find((p: { name: string }) => p.name === "st_run");
        const failed = st.pipelines.find((p: { name: string }) => p.name === "st_fail")?.state === "failed";
        expect(out.exitCode).toBe(failed ? 1 : 0); // exit 1 while a pipeline is failed
        return run?.state === "running" && run.committed_offset === last && failed;
      },
      10_000,
      "status to show st_run running and st_fail failed",
    );
    const identity = `${hostname()}:${relay.proc.pid}`;
    const backend = await coordinatorBackend(db.sql, relay);
    expect(st.relay_group_id).toBe("default");
    expect(st.processes).toEqual([{ process: identity, backend_pid: backend, application_name: `pgtrickle-relay coordinator ${identity}`.slice(0, 63), client_addr: "127.0.0.1" }]);
    const by = (name: string) => st.pipelines.find((p: { name: string }) => p.name === name);
    expect(by("st_run")).toMatchObject({
      direction: "forward",
      enabled: true,
      state: "running",
      owner: { process: identity, backend_pid: backend },
      source: "outbox public.st_run",
      sink: `file ${join(dir, "st_run.jsonl")}`,
      committed_offset: last,
      lag_rows: 0,
      lag_seconds: 0,
      dead_letters: 1,
      last_error: null,
    });
    expect(by("st_off")).toMatchObject({ enabled: false, state: "disabled", owner: null, committed_offset: null, lag_rows: 2, dead_letters: 0 });
    expect(by("st_off").lag_seconds).toBeGreaterThanOrEqual(0);
    expect(by("st_fail")).toMatchObject({ state: "failed", owner: null });
    expect(by("st_fail").last_error).toContain("sink.format");

    const table = await relayOnce(["status", "--postgres-url", db.url, "--wide"]);
    expect(table.exitCode).toBe(1);
    const lines = table.stdout.trim().split("\n");
    expect(lines[0]).toBe(`relay group 'default': 1 relay process(es): ${identity} (backend ${backend}, 127.0.0.1)`);
    expect(lines[1]).toMatch(/^PIPELINE\s+DIRECTION\s+ENABLED\s+STATE\s+OWNER\s+SOURCE → SINK\s+OFFSET\s+LAG\s+DEAD\s+LAST ERROR$/);
    const runLine = lines.find((l) => l.startsWith("st_run "))!;
    expect(runLine).toMatch(new RegExp(`^st_run\\s+forward\\s+yes\\s+running\\s+${identity.replace(/[.]/g, "\\.")} \\(backend ${backend}, 127\\.0\\.0\\.1\\)\\s+outbox public\\.st_run → file \\S+st_run\\.jsonl\\s+${last}\\s+0 rows / 0 s\\s+1\\s+-$`));
    expect(lines.find((l) => l.startsWith("st_off "))).toMatch(/^st_off\s+forward\s+no\s+disabled\s+-\s+.*\s+-\s+2 rows \/ \S+ s\s+0\s+-$/);
    expect(lines.find((l) => l.startsWith("st_fail "))).toMatch(/\s+failed\s+-\s+.*sink\.format/);

    // Without --wide: the main columns, within the width (COLUMNS when piped), no colour off a terminal.
    const narrow = await relayOnce(["status", "--postgres-url", db.url], { COLUMNS: "90" });
    const narrowLines = narrow.stdout.trim().split("\n");
    expect(narrowLines[1]).toMatch(/^PIPELINE\s+DIR\s+STATE\s+SOURCE → SINK\s+LAG\s+DEAD\s+LAST ERROR$/);
    for (const l of narrowLines.slice(1)) expect(l.length).toBeLessThanOrEqual(90);
    expect(narrowLines.find((l) => l.startsWith("st_fail "))).toMatch(/^st_fail\s+fwd\s+failed\s+.*…$/);
    expect(narrow.stdout).not.toContain("\u001b[");
    const one = await relayOnce(["status", "--postgres-url", db.url, "--pipeline", "st_run"]);
    expect(one.exitCode).toBe(0);
    expect(one.stdout).toContain("st_run ");
    expect(one.stdout).not.toContain("st_fail");
  }, 60_000);

  test("a lock held by something that is not a relay is shown as such; no relay running says so", async () => {
    await relay.stop();
    const other = (await import("../../src/db.ts")).connect(db.url, { max: 1, applicationName: "some psql" });
    try {
      await other`SELECT pg_advisory_lock(hashtext('default'), hashtext('st_run'))`;
      const out = await relayOnce(["status", "--postgres-url", db.url, "--json"]);
      const st = JSON.parse(out.stdout);
      expect(st.processes).toEqual([]);
      const run = st.pipelines.find((p: { name: string }) => p.name === "st_run");
      expect(run.owner).toMatchObject({ process: null, application_name: "some psql" });
      expect(run.state).toBe("starting");
      const text = await relayOnce(["status", "--postgres-url", db.url]);
      expect(text.stdout.split("\n")[0]).toBe("relay group 'default': no relay process running");

      // On a terminal (`script` gives it one) the failed state is red, unless NO_COLOR is set.
      const onTerminal = async (env: Record<string, string>) => {
        const command = relayCommand(["status", "--postgres-url", db.url]).map((a) => `'${a}'`).join(" ");
        const proc = Bun.spawn(["script", "-qec", command, "/dev/null"], { stdout: "pipe", stderr: "pipe", env: { ...process.env, ...env } });
        return new Response(proc.stdout).text();
      };
      expect(await onTerminal({})).toContain("\u001b[31mfailed");
      expect(await onTerminal({ NO_COLOR: "1" })).not.toContain("\u001b[");

      // --watch redraws until stopped.
      const watch = Bun.spawn(relayCommand(["status", "--postgres-url", db.url, "--watch", "--interval", "0.2"]), { stdout: "pipe", stderr: "ignore" });
      let seen = "";
      const reader = (async () => {
        for await (const chunk of watch.stdout) seen += new TextDecoder().decode(chunk);
      })();
      await eventually(() => (seen.match(/^relay group 'default'/gm)?.length ?? 0) >= 2, 20_000, "two redraws");
      watch.kill("SIGINT");
      await Promise.all([watch.exited, reader]);
    } finally {
      await other.end();
    }
  }, 60_000);
});

describe("check", () => {
  afterAll(async () => {
    await db.sql`DELETE FROM pgtrickle.relay_outbox_config`;
  });

  test("one verdict per pipeline, exit 1 when any fails; nothing is left behind in the database", async () => {
    await pipeline("ck_ok", { type: "file", output: join(dir, "ck_ok.jsonl") });
    await pipeline("ck_group", { type: "file", output: join(dir, "ck_group.jsonl") }, { table: "ck_ok", group: "ck_consumers" });
    await pipeline("ck_format", { type: "file", format: "xml" }, { table: "ck_ok" });
    await pipeline("ck_secret", { type: "file", output: "/tmp/${env:RELAY_CHECK_MISSING}.jsonl" }, { table: "ck_ok" });
    await pipeline("ck_nodir", { type: "file", output: join(dir, "no", "such", "dir.jsonl") }, { table: "ck_ok" });
    await db.sql`SELECT pgtrickle.set_relay_outbox('ck_nosource', 'public.no_such_table', NULL, '{"type":"stdout"}'::jsonb)`;
    await db.sql`SELECT pgtrickle.disable_relay('ck_nodir')`;

    const out = await relayOnce(["check", "--postgres-url", db.url]);
    expect(out.exitCode).toBe(1);
    const lines = out.stdout.trim().split("\n");
    // A verdict that passed describes the started source and sink in their own words.
    expect(lines).toContain(`ok    ck_ok (forward): outbox public.ck_ok → file ${join(dir, "ck_ok.jsonl")} (jsonl)`);
    expect(lines).toContain(`ok    ck_group (forward): outbox public.ck_ok (group ck_consumers, consumer default:ck_group) → file ${join(dir, "ck_group.jsonl")} (jsonl)`);
    const verdict = (name: string) => {
      const i = lines.findIndex((l) => l.includes(` ${name} (`));
      return `${lines[i]}\n${lines[i + 1]}`;
    };
    expect(verdict("ck_format")).toMatch(/^FAIL  ck_format \(forward\): .*\n\s+config: .*sink\.format/);
    expect(verdict("ck_secret")).toMatch(/^FAIL  ck_secret .*\n\s+secret: .*RELAY_CHECK_MISSING is not set/);
    expect(verdict("ck_nodir")).toMatch(/^FAIL  ck_nodir \(forward, disabled\).*\n\s+sink: .*cannot open/);
    expect(verdict("ck_nosource")).toMatch(/^FAIL  ck_nosource .*\n\s+source: .*public\.no_such_table/);
    expect(out.stderr).toContain("check: 4 problem(s) found");
    // The group-mode start ran inside a rolled-back transaction: no consumer group was created.
    expect(await db.sql`SELECT 1 FROM pgtrickle.pgt_consumer_groups WHERE group_name = 'ck_consumers'`).toHaveLength(0);

    const one = await relayOnce(["check", "--postgres-url", db.url, "--pipeline", "ck_ok,ck_group", "--json"]);
    expect(one.exitCode).toBe(0);
    const body = JSON.parse(one.stdout);
    expect(body.pipelines.map((p: { name: string; ok: boolean }) => [p.name, p.ok])).toEqual([["ck_group", true], ["ck_ok", true]]);
    expect(body.missing).toEqual([]);

    const missing = await relayOnce(["check", "--postgres-url", db.url, "--pipeline", "nope"]);
    expect(missing.exitCode).toBe(1);
    expect(missing.stdout).toContain("FAIL  nope: no such pipeline");
  }, 60_000);
});

describe("secrets", () => {
  afterAll(async () => {
    await db.sql`DELETE FROM pgtrickle.relay_outbox_config`;
  });

  test("resolved values appear nowhere: logs, /metrics, /health, status, check, the status table — while they do reach the systems", async () => {
    const token = `tok-${crypto.randomUUID()}`;
    const password = `pw-${crypto.randomUUID()}`;
    const env = { RELAY_TEST_TOKEN: token, RELAY_TEST_PGPW: password };
    const received: string[] = [];
    const server = Bun.serve({
      hostname: "127.0.0.1",
      port: 0,
      fetch(req) {
        received.push(req.headers.get("authorization") ?? "");
        return new Response("ok");
      },
    });
    try {
      await pipeline("sec_http", { type: "http", url: `http://127.0.0.1:${server.port}/hook`, headers: { Authorization: "Bearer ${env:RELAY_TEST_TOKEN}" } });
      // A path holding the token in a directory that does not exist: its error message would carry it.
      await pipeline("sec_path", { type: "file", output: join(dir, "missing-dir", "${env:RELAY_TEST_TOKEN}.jsonl") }, { table: "sec_http" });
      await pipeline("sec_unset", { type: "file", output: "${env:RELAY_TEST_UNSET}" }, { table: "sec_http" });
      await rows("sec_http", [1, 2]);
      // The URL's password comes from the environment too (the test server trusts loopback, so any password works).
      const url = new URL(db.url);
      url.password = "${env:RELAY_TEST_PGPW}";
      const pgUrl = url.toString().replace("%24%7Benv%3ARELAY_TEST_PGPW%7D", "${env:RELAY_TEST_PGPW}");
      const relay = new RunningRelay(["--postgres-url", pgUrl, "--metrics-addr", "127.0.0.1:0", "--coordinator-tick-ms", "100", "--log-level", "trace"], env);
      relays.push(relay);
      const base = await httpBase(relay);
      await eventually(() => received.length > 0, 20_000, "the webhook to be called");
      expect(received[0]).toBe(`Bearer ${token}`);
      await relay.waitForLog(/\[sec_path\] failed/);
      await relay.waitForLog(/\[sec_unset\] failed: .*RELAY_TEST_UNSET is not set/);

      const outputs: Record<string, string> = {};
      outputs.metrics = (await getText(`${base}/metrics`)).body;
      outputs.health = (await getText(`${base}/health`)).body;
      outputs.drained = (await getText(`${base}/health/drained`)).body;
      const status = await relayOnce(["status", "--postgres-url", pgUrl, "--json"], env);
      const statusText = await relayOnce(["status", "--postgres-url", pgUrl], env);
      const check = await relayOnce(["check", "--postgres-url", pgUrl, "--log-level", "trace"], env);
      const checkJson = await relayOnce(["check", "--postgres-url", pgUrl, "--json"], env);
      expect(await relay.stop()).toBe(0);
      outputs.relay = relay.stderr + relay.stdout;
      for (const [k, r] of Object.entries({ status, statusText, check, checkJson })) outputs[k] = r.stdout + r.stderr;
      outputs.table = JSON.stringify(await db.sql`SELECT * FROM pgtrickle.relay_pipeline_status`);

      expect(outputs.health).toContain("sec_path");
      expect(outputs.health).toContain("missing-dir/***.jsonl");
      expect(outputs.check).toContain("FAIL  sec_path");
      expect(outputs.table).toContain("sec_path");
      for (const [where, text] of Object.entries(outputs)) {
        expect({ where, leaked: text.includes(token) }).toEqual({ where, leaked: false });
        expect({ where, leaked: text.includes(password) }).toEqual({ where, leaked: false });
      }
    } finally {
      server.stop(true);
    }
  }, 60_000);
});
