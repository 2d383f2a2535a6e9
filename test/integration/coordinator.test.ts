/**
 * The coordinator against real PostgreSQL with relay processes as subprocesses: advisory-lock
 * ownership over three replicas, takeover after kill -9, graceful SIGTERM, loss of the lock
 * connection, reconnects, and hot reload. File sinks stand in for brokers (no broker needed).
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connect, type Sql } from "../../src/db.ts";
import { createStreamTable, enableOutbox } from "../fixtures/outbox.ts";
import { coordinatorBackend, getJson, httpBase, lockHolders, payloadIds } from "../helpers/observe.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { eventually, RunningRelay } from "../helpers/relay.ts";

const dir = mkdtempSync(join(tmpdir(), "relay-coordinator-"));

interface Fixture {
  db: TestDatabase;
  outbox: Map<string, string>;
  relays: RunningRelay[];
  file(name: string): string;
}

/** A database with one stream table, outbox and file pipeline per name. */
async function fixture(label: string, names: string[], source: Record<string, unknown> = {}): Promise<Fixture> {
  const db = await testDatabase(label);
  const outbox = new Map<string, string>();
  const file = (name: string) => join(dir, `${db.name}-${name}.jsonl`);
  for (const name of names) {
    await createStreamTable(db.sql, `public.${name}`, "id int primary key");
    outbox.set(name, (await enableOutbox(db.sql, `public.${name}`)).outboxTable);
    await addPipeline(db.sql, name, { type: "file", output: file(name) }, source);
  }
  return { db, outbox, relays: [], file };
}

/** One transaction, so a running relay sees one change (its NOTIFYs arrive together at commit). */
async function addPipeline(sql: Sql, name: string, sink: Record<string, unknown>, source: Record<string, unknown> = {}) {
  await sql.begin(async (tx) => {
    await tx`SELECT pgtrickle.set_relay_outbox(${name}, ${`public.${name}`}, NULL, ${tx.json(sink as never)})`;
    if (Object.keys(source).length > 0) {
      await tx`UPDATE pgtrickle.relay_outbox_config SET config = jsonb_set(config, '{source}', config->'source' || ${tx.json(source as never)}) WHERE name = ${name}`;
    }
  });
}

/** Rows with payload ids from..to (one transaction, consecutive outbox ids). */
async function insertRows(f: Fixture, name: string, from: number, to: number) {
  await f.db.sql.unsafe(
    `INSERT INTO pgtrickle."${f.outbox.get(name)}" (payload)
     SELECT jsonb_build_object('v', 1, 'inserted', jsonb_build_array(jsonb_build_object('id', g)), 'deleted', '[]'::jsonb)
     FROM generate_series(${from}, ${to}) g`,
  );
}

const range = (from: number, to: number) => Array.from({ length: to - from + 1 }, (_, i) => from + i);
const hasAll = (ids: number[], from: number, to: number) => {
  const got = new Set(ids);
  return range(from, to).every((i) => got.has(i));
};

async function offsetOf(sql: Sql, name: string, group = "default"): Promise<string | null> {
  const [row] = await sql<{ last: string }[]>`
    SELECT last_change_id::text AS last FROM pgtrickle.relay_consumer_offsets WHERE relay_group_id = ${group} AND pipeline_id = ${name}`;
  return row?.last ?? null;
}

const FAST = ["--metrics-addr", "127.0.0.1:0", "--discovery-interval", "1", "--coordinator-tick-ms", "100"];

function startRelay(f: Fixture, extra: string[] = [], env: Record<string, string> = {}): RunningRelay {
  const relay = new RunningRelay(["--postgres-url", f.db.url, ...FAST, ...extra], env);
  f.relays.push(relay);
  return relay;
}

async function teardown(f: Fixture | undefined) {
  if (!f) return;
  for (const r of f.relays) if (r.proc.exitCode === null) r.proc.kill("SIGKILL");
  await Promise.all(f.relays.map((r) => r.proc.exited));
  if (process.env.PGTRICKLE_TEST_VERBOSE) for (const r of f.relays) console.error(`---- relay ${r.proc.pid}\n${r.stderr}`);
  await f.db.drop();
}

/** Which relay (index) holds each pipeline's lock, from pg_locks and each relay's coordinator backend. */
async function ownership(f: Fixture, names: string[], relays: RunningRelay[]) {
  const backends = await Promise.all(relays.map((r) => coordinatorBackend(f.db.sql, r)));
  const holders = await lockHolders(f.db.sql, names);
  const byRelay = relays.map(() => [] as string[]);
  const orphans: string[] = [];
  for (const [name, pids] of holders) {
    if (pids.length > 1) throw new Error(`pipeline ${name} has ${pids.length} lock holders: ${pids.join(", ")}`);
    const i = pids.length === 1 ? backends.indexOf(pids[0]!) : -1;
    if (i < 0) orphans.push(name);
    else byRelay[i]!.push(name);
  }
  return { byRelay, orphans };
}

describe("three relays, ten pipelines", () => {
  const names = range(0, 9).map((i) => `ha${i}`);
  let f: Fixture;
  let a: RunningRelay, b: RunningRelay, c: RunningRelay;
  beforeAll(async () => {
    f = await fixture("coord_ha", names, { poll_interval_ms: 100, batch_size: 5 });
  });
  afterAll(() => teardown(f));

  test("each pipeline is owned by exactly one process, spread over the three; a process runs exactly the pipelines whose lock it holds", async () => {
    [a, b, c] = [startRelay(f), startRelay(f), startRelay(f)];
    // Fair share: ceil(10 / 3) = 4 at most each, every pipeline owned.
    await eventually(
      async () => {
        const { byRelay, orphans } = await ownership(f, names, [a, b, c]);
        return orphans.length === 0 && byRelay.every((owned) => owned.length >= 2 && owned.length <= 4);
      },
      30_000,
      "ten pipelines spread over three relays",
    );
    // /health of each process lists exactly what pg_locks says it holds.
    await eventually(
      async () => {
        const { byRelay } = await ownership(f, names, [a, b, c]);
        for (const [i, relay] of [a, b, c].entries()) {
          const health = await getJson(`${await httpBase(relay)}/health`);
          const running = health.body.pipelines.map((p: { name: string }) => p.name).sort();
          if (JSON.stringify(running) !== JSON.stringify([...byRelay[i]!].sort())) return false;
          if (health.body.pipelines_owned !== byRelay[i]!.length) return false;
        }
        return true;
      },
      20_000,
      "/health to match pg_locks",
    );
    for (const name of names) await insertRows(f, name, 1, 20);
    await eventually(() => names.every((n) => hasAll(payloadIds(f.file(n)), 1, 20)), 20_000, "rows 1..20 in every file");
  }, 60_000);

  test("kill -9 of an owner: the others take over its pipelines and deliver every row", async () => {
    const { byRelay } = await ownership(f, names, [a, b, c]);
    const victimIndex = byRelay.findIndex((o) => o.length === Math.max(...byRelay.map((x) => x.length)));
    const victim = [a, b, c][victimIndex]!;
    const survivors = [a, b, c].filter((r) => r !== victim);
    // Rows are flowing when the owner dies.
    const writing = (async () => {
      for (let k = 0; k < 10; k++) {
        for (const name of names) await insertRows(f, name, 21 + k * 10, 30 + k * 10);
        await Bun.sleep(20);
      }
    })();
    await Bun.sleep(50);
    victim.proc.kill("SIGKILL");
    await victim.proc.exited;
    await writing;
    await eventually(
      async () => {
        const { byRelay: now, orphans } = await ownership(f, names, survivors);
        return orphans.length === 0 && now.every((o) => o.length === 5);
      },
      20_000,
      "the two survivors to own five pipelines each",
    );
    await eventually(() => names.every((n) => hasAll(payloadIds(f.file(n)), 1, 120)), 30_000, "every row 1..120 in every file");
    for (const s of survivors) expect(s.proc.exitCode).toBeNull();
    [a, b] = survivors as [RunningRelay, RunningRelay];
  }, 60_000);

  test("SIGTERM: the in-flight batch is committed, the locks are released, exit 0; the last relay takes over without a duplicate", async () => {
    for (const name of names) await insertRows(f, name, 1001, 1300);
    await eventually(() => names.some((n) => payloadIds(f.file(n)).some((id) => id > 1050)), 20_000, "the backlog to be flowing");
    a.proc.kill("SIGTERM");
    expect(await a.proc.exited).toBe(0);
    expect(a.stderr).toContain("received SIGTERM");
    await eventually(async () => (await ownership(f, names, [b])).byRelay[0]!.length === 10, 20_000, "the last relay to own all ten");
    await eventually(() => names.every((n) => hasAll(payloadIds(f.file(n)), 1001, 1300)), 30_000, "the whole backlog");
    for (const name of names) {
      const [row] = await f.db.sql.unsafe<{ max: string }[]>(`SELECT max(id)::text AS max FROM pgtrickle."${f.outbox.get(name)}"`);
      await eventually(async () => (await offsetOf(f.db.sql, name)) === row!.max, 10_000, `${name}'s offset at the last row`);
      const ids = payloadIds(f.file(name)).filter((id) => id > 1000);
      expect(ids.length).toBe(300); // graceful stop committed everything it published: no replay
    }
  }, 60_000);
});

describe("losing PostgreSQL connections", () => {
  const names = ["c1", "c2"];
  let f: Fixture;
  beforeAll(async () => {
    f = await fixture("coord_loss", names, { poll_interval_ms: 60_000 });
  });
  afterAll(() => teardown(f));

  test("the coordinator connection killed: every worker stops before any further publish or commit; it reconnects and races again", async () => {
    const relay = startRelay(f);
    await relay.waitForLog(/\[c1\] started/);
    await relay.waitForLog(/\[c2\] started/);
    for (const n of names) await insertRows(f, n, 1, 10);
    await eventually(() => names.every((n) => hasAll(payloadIds(f.file(n)), 1, 10)), 20_000, "rows 1..10");

    const coordinator = (await coordinatorBackend(f.db.sql, relay))!;
    expect(coordinator).toBeNumber();
    // Another session queues for c1's lock: the server grants it to that waiter the moment the
    // relay's session dies, before the relay can race for it again.
    const thief = connect(f.db.url, { max: 1, applicationName: "lock thief" });
    try {
      const stolen = thief`SELECT pg_advisory_lock(hashtext('default'), hashtext('c1'))`.execute();
      await eventually(
        async () => (await f.db.sql`SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`).length === 1,
        10_000,
        "the test session to wait for c1's lock",
      );
      await f.db.sql`SELECT pg_terminate_backend(${coordinator})`;
      await stolen;
      await relay.waitForLog(/coordinator connection closed: every advisory lock is gone; stopping 2 pipeline/);
      await relay.waitForLog(/new session/);
      await Bun.sleep(300); // whatever was in flight at the kill has landed
      const offsetBefore = await offsetOf(f.db.sql, "c1");
      const linesBefore = payloadIds(f.file("c1")).length;
      for (const n of names) await insertRows(f, n, 11, 20);
      // c2 is won back by the new session; c1 stays with the thief: nothing published, nothing committed.
      await eventually(() => hasAll(payloadIds(f.file("c2")), 11, 20), 20_000, "c2 rows 11..20");
      await Bun.sleep(500);
      expect(payloadIds(f.file("c1")).length).toBe(linesBefore);
      expect(await offsetOf(f.db.sql, "c1")).toBe(offsetBefore);
      const holders = await lockHolders(f.db.sql, names);
      expect(holders.get("c2")).toEqual([(await coordinatorBackend(f.db.sql, relay))!]);

      await thief`SELECT pg_advisory_unlock(hashtext('default'), hashtext('c1'))`;
      await eventually(() => hasAll(payloadIds(f.file("c1")), 11, 20), 20_000, "c1 rows 11..20 once the lock is free");
    } finally {
      await thief.end();
    }
  }, 60_000);

  test("every connection of the relay killed: it reconnects (pool, LISTEN, coordinator) and resumes by itself", async () => {
    const relay = f.relays[0]!;
    const base = await httpBase(relay);
    const killed = await f.db.sql<{ n: number }[]>`
      SELECT count(pg_terminate_backend(pid))::int AS n FROM pg_stat_activity
       WHERE datname = current_database() AND application_name LIKE ${`pgtrickle-relay %:${relay.proc.pid}`}`;
    expect(killed[0]!.n).toBeGreaterThanOrEqual(3);
    await eventually(async () => (await getJson(`${base}/health`)).status === 200, 20_000, "/health to be healthy again");
    // poll_interval_ms is 60 s: these rows arrive only through a re-established LISTEN.
    for (const n of names) await insertRows(f, n, 21, 30);
    await eventually(() => names.every((n) => hasAll(payloadIds(f.file(n)), 21, 30)), 20_000, "rows 21..30 after the reconnect");
    expect(relay.proc.exitCode).toBeNull();
  }, 60_000);
});

describe("hot reload", () => {
  const names = ["r1", "r2"];
  let f: Fixture;
  let relay: RunningRelay;
  const started = (name: string) => relay.stderr.split("\n").filter((l) => l.includes(`[${name}] started`)).length;
  const holderOf = async (name: string) => (await lockHolders(f.db.sql, [name])).get(name)!;

  beforeAll(async () => {
    f = await fixture("coord_reload", names, { poll_interval_ms: 100 });
    // A discovery interval of an hour: every change below must arrive by NOTIFY (or SIGHUP).
    relay = new RunningRelay(["--postgres-url", f.db.url, "--metrics-addr", "127.0.0.1:0", "--discovery-interval", "3600", "--coordinator-tick-ms", "100"]);
    f.relays.push(relay);
    await relay.waitForLog(/\[r1\] started/);
    await relay.waitForLog(/\[r2\] started/);
  });
  afterAll(() => teardown(f));

  test("set_relay_outbox of a new pipeline starts it without a restart, leaving the others alone", async () => {
    await createStreamTable(f.db.sql, "public.r3", "id int primary key");
    f.outbox.set("r3", (await enableOutbox(f.db.sql, "public.r3")).outboxTable);
    await addPipeline(f.db.sql, "r3", { type: "file", output: f.file("r3") });
    await insertRows(f, "r3", 1, 5);
    await eventually(() => hasAll(payloadIds(f.file("r3")), 1, 5), 20_000, "r3 rows");
    expect(started("r1")).toBe(1);
    expect(started("r2")).toBe(1);
  }, 60_000);

  test("disable_relay stops the pipeline and releases its lock; enable_relay resumes it where it stopped", async () => {
    await f.db.sql`SELECT pgtrickle.disable_relay('r3')`;
    await eventually(async () => (await holderOf("r3")).length === 0, 10_000, "r3's lock to be released");
    await relay.waitForLog(/\[r3\] disabled or deleted: stopping/);
    await insertRows(f, "r3", 6, 10);
    await Bun.sleep(400);
    expect(payloadIds(f.file("r3"))).not.toContain(6);
    await f.db.sql`SELECT pgtrickle.enable_relay('r3')`;
    await eventually(() => hasAll(payloadIds(f.file("r3")), 6, 10), 20_000, "r3 rows after enable");
    expect(payloadIds(f.file("r3")).length).toBe(10);
    expect(started("r1")).toBe(1);
  }, 60_000);

  test("a changed config restarts only that pipeline, after the batch in hand: nothing lost, nothing repeated", async () => {
    await f.db.sql`UPDATE pgtrickle.relay_outbox_config SET config = jsonb_set(config, '{source,batch_size}', '2') WHERE name = 'r1'`;
    await eventually(() => started("r1") === 2, 10_000, "r1 to restart with batch_size 2");
    await insertRows(f, "r1", 1, 400);
    await eventually(() => payloadIds(f.file("r1")).length >= 40, 20_000, "r1 to be busy");
    // Switch the output file while the backlog flows (usually mid-stream).
    const second = join(dir, `${f.db.name}-r1-second.jsonl`);
    await addPipeline(f.db.sql, "r1", { type: "file", output: second }, { batch_size: 2, poll_interval_ms: 100 });
    await eventually(() => started("r1") === 3, 10_000, "r1 to restart with the new output");
    await insertRows(f, "r1", 401, 410);
    await eventually(() => hasAll([...payloadIds(f.file("r1")), ...payloadIds(second)], 1, 410), 20_000, "all of r1's rows");
    const all = [...payloadIds(f.file("r1")), ...payloadIds(second)];
    expect(all.length).toBe(410);
    expect(payloadIds(second)).toContain(410);
    expect(payloadIds(f.file("r1"))).not.toContain(410);
    expect(started("r2")).toBe(1);
    expect(started("r3")).toBe(2); // from the enable above, not from this change
  }, 60_000);

  test("delete_relay stops the pipeline and releases its lock", async () => {
    await f.db.sql`SELECT pgtrickle.delete_relay('r3')`;
    await eventually(async () => (await holderOf("r3")).length === 0, 10_000, "r3's lock to be released");
    await insertRows(f, "r3", 11, 12);
    await Bun.sleep(300);
    expect(payloadIds(f.file("r3"))).not.toContain(11);
  }, 60_000);

  test("SIGHUP re-resolves secrets: a rotated ${file:} value restarts the pipeline although its catalog JSON is unchanged", async () => {
    const secret = join(dir, `${f.db.name}-part`);
    writeFileSync(secret, "v1\n");
    const out = (v: string) => join(dir, `${f.db.name}-r2-${v}.jsonl`);
    await addPipeline(f.db.sql, "r2", { type: "file", output: join(dir, `${f.db.name}-r2-\${file:${secret}}.jsonl`) });
    await eventually(() => started("r2") === 2, 10_000, "r2 to restart with the templated output");
    await insertRows(f, "r2", 1, 3);
    await eventually(() => hasAll(payloadIds(out("v1")), 1, 3), 20_000, "r2 rows in the v1 file");
    writeFileSync(secret, "v2\n");
    relay.proc.kill("SIGHUP");
    await eventually(() => started("r2") === 3, 10_000, "r2 to restart after SIGHUP");
    await insertRows(f, "r2", 4, 6);
    await eventually(() => hasAll(payloadIds(out("v2")), 4, 6), 20_000, "r2 rows in the v2 file");
    expect(payloadIds(out("v1"))).toEqual([1, 2, 3]);
    expect(started("r1")).toBe(3);
  }, 60_000);
});

describe("periodic reload", () => {
  let f: Fixture;
  beforeAll(async () => {
    f = await fixture("coord_discovery", ["d1"], { poll_interval_ms: 100 });
  });
  afterAll(() => teardown(f));

  test("a change whose notification was lost, and a rotated secret, are picked up by the discovery interval", async () => {
    const relay = startRelay(f);
    const restarts = () => relay.stderr.split("\n").filter((l) => l.includes("[d1] config changed")).length;
    await relay.waitForLog(/\[d1\] started/);
    // No NOTIFY: the trigger is off while the config changes.
    const other = join(dir, `${f.db.name}-d1-other.jsonl`);
    await f.db.sql.begin(async (tx) => {
      await tx`ALTER TABLE pgtrickle.relay_outbox_config DISABLE TRIGGER relay_outbox_config_notify`;
      await tx`UPDATE pgtrickle.relay_outbox_config SET config = jsonb_set(config, '{sink,output}', ${tx.json(other)}) WHERE name = 'd1'`;
      await tx`ALTER TABLE pgtrickle.relay_outbox_config ENABLE TRIGGER relay_outbox_config_notify`;
    });
    await eventually(() => restarts() === 1, 20_000, "the un-notified change to be picked up");
    await insertRows(f, "d1", 1, 3);
    await eventually(() => hasAll(payloadIds(other), 1, 3), 20_000, "rows in the file named by the un-notified change");

    // The catalog JSON stays the same from here on; only the secret file changes.
    const secret = join(dir, `${f.db.name}-d1-secret`);
    const out = (v: string) => join(dir, `${f.db.name}-d1-${v}.jsonl`);
    writeFileSync(secret, "a");
    await addPipeline(f.db.sql, "d1", { type: "file", output: join(dir, `${f.db.name}-d1-\${file:${secret}}.jsonl`) }, { poll_interval_ms: 100 });
    await eventually(() => restarts() === 2, 20_000, "the templated output");
    await insertRows(f, "d1", 4, 5);
    await eventually(() => hasAll(payloadIds(out("a")), 4, 5), 20_000, "rows in the 'a' file");
    writeFileSync(secret, "b");
    await eventually(() => restarts() === 3, 20_000, "the rotated secret to restart the pipeline without SIGHUP");
    await insertRows(f, "d1", 6, 7);
    await eventually(() => hasAll(payloadIds(out("b")), 6, 7), 20_000, "rows in the 'b' file");
    expect(payloadIds(out("a"))).toEqual([4, 5]);
  }, 60_000);
});

describe("limits and shutdown", () => {
  let f: Fixture;
  const names = ["w1", "w2", "w3", "w4", "w5"];
  beforeAll(async () => {
    f = await fixture("coord_limits", names, { poll_interval_ms: 100 });
  });
  afterAll(() => teardown(f));

  test("--max-workers caps what one process owns; a second process takes more, the rest waits unowned", async () => {
    const one = startRelay(f, ["--max-workers", "2"]);
    await eventually(async () => (await ownership(f, names, [one])).byRelay[0]!.length === 2, 20_000, "two pipelines in the first relay");
    const two = startRelay(f, ["--max-workers", "2"]);
    await eventually(
      async () => {
        const { byRelay, orphans } = await ownership(f, names, [one, two]);
        return byRelay.every((o) => o.length === 2) && orphans.length === 1;
      },
      20_000,
      "2 + 2 owned, one unowned",
    );
    await Bun.sleep(500);
    const { byRelay, orphans } = await ownership(f, names, [one, two]);
    expect(byRelay.map((o) => o.length)).toEqual([2, 2]);
    expect(orphans).toHaveLength(1);
    await Promise.all([one.stop(), two.stop()]);
  }, 60_000);

  test("a batch that cannot finish within --shutdown-timeout: exit 1; a second signal exits 130 at once", async () => {
    // A receiver that never answers keeps a batch in flight.
    const server = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: () => new Promise<Response>(() => {}) });
    try {
      await f.db.sql`DELETE FROM pgtrickle.relay_outbox_config WHERE name <> 'w1'`;
      await addPipeline(f.db.sql, "w1", { type: "http", url: `http://127.0.0.1:${server.port}/`, timeout_ms: 120_000 });
      await insertRows(f, "w1", 1, 3);
      const slow = startRelay(f, ["--shutdown-timeout", "1"]);
      await slow.waitForLog(/\[w1\] started/);
      await Bun.sleep(300);
      slow.proc.kill("SIGTERM");
      expect(await slow.proc.exited).toBe(1);
      expect(slow.stderr).toContain("shutdown timeout (1 s) passed with batches in flight");

      const impatient = startRelay(f, ["--shutdown-timeout", "60"]);
      await impatient.waitForLog(/\[w1\] started/);
      await Bun.sleep(300);
      impatient.proc.kill("SIGTERM");
      await impatient.waitForLog(/received SIGTERM/);
      impatient.proc.kill("SIGINT");
      expect(await impatient.proc.exited).toBe(130);
      expect(impatient.stderr).toContain("second SIGINT: exiting now");
    } finally {
      server.stop(true);
    }
  }, 60_000);
});

// A discovery interval far longer than the test's waits (sharing must not wait for it), and one
// of a second (a pipeline unowned that long may be taken beyond a share: still no thrashing).
describe.each([120, 1])("fair, stable sharing (discovery interval %d s)", (discoverySecs) => {
  const names = range(0, 9).map((i) => `fs${i}`);
  const SHARING = ["--metrics-addr", "127.0.0.1:0", "--discovery-interval", String(discoverySecs), "--coordinator-tick-ms", "200"];
  let f: Fixture;
  beforeAll(async () => {
    f = await fixture(`coord_share_${discoverySecs}`, names, { poll_interval_ms: 100, batch_size: 5 });
  });
  afterAll(() => teardown(f));

  const start = () => {
    const relay = new RunningRelay(["--postgres-url", f.db.url, ...SHARING]);
    f.relays.push(relay);
    return relay;
  };
  /** Ownership sizes in ascending order, once every pipeline is owned by one of `relays`. */
  const split = async (relays: RunningRelay[]) => {
    const { byRelay, orphans } = await ownership(f, names, relays);
    return orphans.length > 0 ? "unowned" : byRelay.map((o) => o.length).sort((x, y) => x - y).join("/");
  };
  const converges = (relays: RunningRelay[], expected: string, what: string) =>
    eventually(async () => (await split(relays)) === expected, 20_000, `${what}: a ${expected} split`);
  const handovers = (relay: RunningRelay) => relay.stderr.match(/handing over/g)?.length ?? 0;
  /** Pipelines a relay started again after handing them over (taken back), in its log from `since` on. */
  const takenBack = (relay: RunningRelay, since = 0) =>
    names.filter((n) => {
      const at = relay.stderr.indexOf(`[${n}] handing over`, since);
      return at >= 0 && relay.stderr.indexOf(`[${n}] started`, at) >= 0;
    });

  test("three relays joining and leaving under load: a fair split within a few ticks, no pipeline taken back, every row delivered", async () => {
    let next = 1;
    let writing = true;
    const writer = (async () => {
      while (writing) {
        for (const name of names) await insertRows(f, name, next, next);
        next++;
        await Bun.sleep(50);
      }
    })();
    try {
      const a = start();
      await converges([a], "10", "one relay alone");
      const [b, c] = [start(), start()];
      await eventually(async () => (await coordinatorBackend(f.db.sql, b)) !== null && (await coordinatorBackend(f.db.sql, c)) !== null, 20_000, "b and c connected");
      await converges([a, b, c], "3/3/4", "b and c joined");
      const settled = await ownership(f, names, [a, b, c]);
      await Bun.sleep(3000); // ~15 ticks: the split holds, nothing moves back and forth
      expect((await ownership(f, names, [a, b, c])).byRelay).toEqual(settled.byRelay);
      // Each join moves at most the newcomer's share: 5 when b (or c) is seen first, then at
      // most 4 more; at least the 6 that a gave away. Nobody took back what it released.
      const moved = [a, b, c].reduce((n, r) => n + handovers(r), 0);
      expect(moved).toBeGreaterThanOrEqual(6);
      expect(moved).toBeLessThanOrEqual(9);
      for (const r of [a, b, c]) expect(takenBack(r)).toEqual([]);
      // Graceful handovers commit what they published: every row so far delivered exactly once.
      for (const n of names) {
        const ids = payloadIds(f.file(n));
        expect(new Set(ids).size).toBe(ids.length);
      }

      // A loss of a relay that got its pipelines from a: a takes back some of what it handed
      // over (a new round), the other survivor the rest.
      const victim = settled.byRelay[1]!.length >= settled.byRelay[2]!.length ? b : c;
      const victimOwned = settled.byRelay[[a, b, c].indexOf(victim)]!;
      const survivors = [a, b, c].filter((r) => r !== victim);
      victim.proc.kill("SIGKILL");
      await victim.proc.exited;
      await converges(survivors, "5/5", "after a kill -9");

      // A join: the newcomer gets its share from both.
      const since = survivors.map((r) => r.stderr.length);
      const d = start();
      await converges([...survivors, d], "3/3/4", "after d joined");
      survivors.forEach((r, i) => expect(takenBack(r, since[i])).toEqual([]));
      // A graceful leave: its pipelines go to the two others.
      const leaving = survivors[0]!;
      expect(await leaving.stop("SIGTERM")).toBe(0);
      await converges([survivors[1]!, d], "5/5", "after a SIGTERM");

      writing = false;
      await writer;
      const last = next - 1;
      await eventually(() => names.every((n) => hasAll(payloadIds(f.file(n)), 1, last)), 30_000, `rows 1..${last} in every file`);
      for (const n of names) {
        const ids = payloadIds(f.file(n));
        // Only the kill -9 replays: its unacknowledged batch (batch_size 5), with the same keys.
        const duplicates = ids.length - new Set(ids).size;
        expect(duplicates).toBeLessThanOrEqual(victimOwned.includes(n) ? 5 : 0);
      }
    } finally {
      writing = false;
      await writer;
    }
  }, 120_000);
});
