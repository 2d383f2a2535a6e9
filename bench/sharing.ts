/**
 * Sharing: three relays, ten pipelines, default settings (--coordinator-tick-ms 500,
 * --discovery-interval 30) unless given. Each round: relay a alone owns all ten; b and c start;
 * measured from the moment both are connected to a 3/3/4 split, and the handovers logged on the
 * way. Then a relay other than a is killed with SIGKILL: measured until the two survivors own
 * 5/5.
 *
 *   node_modules/.bin/bun bench/sharing.ts [rounds=3] [tick_ms=500] [discovery_s=30]
 */
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createStreamTable, enableOutbox } from "../test/fixtures/outbox.ts";
import { coordinatorBackend, lockHolders } from "../test/helpers/observe.ts";
import { testDatabase } from "../test/helpers/pg.ts";
import { RunningRelay } from "../test/helpers/relay.ts";
import { median } from "./lib.ts";

const rounds = Number(process.argv[2] ?? 3);
const tick = process.argv[3] ?? "500";
const discovery = process.argv[4] ?? "30";
const names = Array.from({ length: 10 }, (_, i) => `sh_${i}`);
const db = await testDatabase("bench_sharing");
const dir = mkdtempSync(join(tmpdir(), "relay-sharing-"));
const relays: RunningRelay[] = [];
process.on("exit", () => relays.forEach((r) => r.proc.kill("SIGKILL")));
const start = () => {
  const r = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0", "--coordinator-tick-ms", tick, "--discovery-interval", discovery]);
  relays.push(r);
  return r;
};

/** Pipelines owned per relay, ascending ("3/3/4"), or "unowned" while one has no owner among them. */
async function split(among: RunningRelay[]): Promise<string> {
  const backends = await Promise.all(among.map((r) => coordinatorBackend(db.sql, r)));
  const counts = among.map(() => 0);
  for (const pids of (await lockHolders(db.sql, names)).values()) {
    const i = pids.length === 1 ? backends.indexOf(pids[0]!) : -1;
    if (i < 0) return "unowned";
    counts[i]!++;
  }
  return counts.sort((x, y) => x - y).join("/");
}

/** Milliseconds until `among` own the pipelines as `expected`. */
async function until(among: RunningRelay[], expected: string): Promise<number> {
  const t0 = performance.now();
  while ((await split(among)) !== expected) {
    if (performance.now() - t0 > 180_000) throw new Error(`no ${expected} split after 180 s`);
    await Bun.sleep(20);
  }
  return performance.now() - t0;
}

try {
  await createStreamTable(db.sql, "public.sh", "id int primary key");
  await enableOutbox(db.sql, "public.sh");
  for (const name of names) {
    await db.sql`SELECT pgtrickle.set_relay_outbox(${name}, 'public.sh', NULL, ${db.sql.json({ type: "file", output: join(dir, `${name}.jsonl`) })})`;
  }
  const join3: number[] = [];
  const moves: number[] = [];
  const loss: number[] = [];
  for (let round = 0; round < rounds; round++) {
    const a = start();
    await until([a], "10");
    const [b, c] = [start(), start()];
    while ((await coordinatorBackend(db.sql, b)) === null || (await coordinatorBackend(db.sql, c)) === null) await Bun.sleep(20);
    join3.push(await until([a, b, c], "3/3/4"));
    moves.push([a, b, c].reduce((n, r) => n + (r.stderr.match(/handing over/g)?.length ?? 0), 0));
    b.proc.kill("SIGKILL");
    await b.proc.exited;
    loss.push(await until([a, c], "5/5"));
    await Promise.all([a.stop("SIGKILL"), c.stop("SIGKILL")]);
  }
  const ms = (xs: number[]) => `median ${median(xs).toFixed(0)} ms, max ${Math.max(...xs).toFixed(0)} ms`;
  console.log(`sharing, tick ${tick} ms, discovery ${discovery} s, ${rounds} rounds:`);
  console.log(`  b and c join a (10 pipelines) → 3/3/4: ${ms(join3)}; handovers per join ${moves.join(", ")}`);
  console.log(`  kill -9 of b → a and c own 5/5: ${ms(loss)}`);
} finally {
  for (const r of relays) if (r.proc.exitCode === null) await r.stop("SIGKILL");
  await db.drop();
}
