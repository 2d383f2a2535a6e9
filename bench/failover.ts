/**
 * Failover time: two relays share four pipelines; the owner of pipeline `fo_0` is killed with
 * SIGKILL and a row is written at once. Measured: kill → that row delivered by the other relay
 * (lock freed when PostgreSQL notices the dead session, next coordinator tick, pipeline start,
 * first poll). Default settings (--coordinator-tick-ms 500) unless given. With SIGTERM instead,
 * the hand-over of a rolling update: the owner finishes its batch and releases its locks.
 *
 *   node_modules/.bin/bun bench/failover.ts [rounds=5] [tick_ms=500] [signal=SIGKILL]
 */
import { mkdtempSync, readFileSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createStreamTable, enableOutbox, writeV1Inline } from "../test/fixtures/outbox.ts";
import { testDatabase } from "../test/helpers/pg.ts";
import { RunningRelay } from "../test/helpers/relay.ts";

const rounds = Number(process.argv[2] ?? 5);
const tick = process.argv[3] ?? "500";
const signal = (process.argv[4] ?? "SIGKILL") as "SIGKILL" | "SIGTERM";
const db = await testDatabase("bench_failover");
const dir = mkdtempSync(join(tmpdir(), "relay-failover-"));
const relays: RunningRelay[] = [];
process.on("exit", () => relays.forEach((r) => r.proc.kill("SIGKILL")));
const start = () => {
  const r = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0", "--coordinator-tick-ms", tick, "--log-level", "warn"]);
  relays.push(r);
  return r;
};
const lines = (f: string) => (existsSync(f) ? readFileSync(f, "utf8").split("\n").filter(Boolean).length : 0);

try {
  await createStreamTable(db.sql, "public.fo", "id int primary key");
  const { outboxTable } = await enableOutbox(db.sql, "public.fo");
  for (let p = 0; p < 4; p++) {
    await db.sql`SELECT pgtrickle.set_relay_outbox(${`fo_${p}`}, 'public.fo', NULL, ${db.sql.json({ type: "file", output: join(dir, `fo_${p}.jsonl`) })})`;
  }
  let a = start();
  let b = start();
  const times: number[] = [];
  for (let round = 0; round < rounds; round++) {
    const file = join(dir, "fo_0.jsonl");
    // Both relays up and the pipelines spread; find fo_0's owner by its lock.
    for (;;) {
      const [row] = await db.sql<{ pid: number | null }[]>`
        SELECT (SELECT a.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                WHERE l.locktype = 'advisory' AND l.classid::int = hashtext('default') AND l.objid::int = hashtext('fo_0') AND l.granted) AS pid`;
      const owners = await db.sql<{ n: number }[]>`SELECT count(DISTINCT pid)::int AS n FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2`;
      if (row?.pid && owners[0]!.n >= 2) break;
      await Bun.sleep(50);
    }
    const ownerApp = (await db.sql<{ app: string }[]>`
      SELECT a.application_name AS app FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
      WHERE l.locktype = 'advisory' AND l.classid::int = hashtext('default') AND l.objid::int = hashtext('fo_0') AND l.granted`)[0]!.app;
    const victim = ownerApp.endsWith(`:${a.proc.pid}`) ? a : b;
    const before = lines(file);
    const t0 = performance.now();
    victim.proc.kill(signal);
    await writeV1Inline(db.sql, outboxTable, { inserted: [{ id: round }], deleted: [] });
    while (lines(file) < before + 1) await Bun.sleep(5);
    times.push(performance.now() - t0);
    await victim.proc.exited;
    if (victim === a) a = start();
    else b = start();
  }
  times.sort((x, y) => x - y);
  console.log(`failover (${signal} to the owner → next row delivered by the other relay), tick ${tick} ms, ${rounds} rounds: min ${times[0]!.toFixed(0)} ms, median ${times[Math.floor(times.length / 2)]!.toFixed(0)} ms, max ${times[times.length - 1]!.toFixed(0)} ms`);
} finally {
  for (const r of relays) if (r.proc.exitCode === null) await r.stop("SIGKILL");
  await db.drop();
}
