/**
 * The delivery contract every sink and every source keeps (issue 13 point 6; the shape of Redpanda
 * Connect's `integration.StreamTests`): one suite, run once per backend by the small files next
 * to this one, each supplying only what is specific to its system — how to create the
 * destination, read back what arrived or publish into the source, which server port a loopback
 * proxy stands in front of, and whether the system deduplicates.
 *
 * The cases of one backend share one database, one destination and one `run` relay, in order:
 * N in → N out, poison, unreachable (the proxy cut, /health 503, then recovered), secrets, kill -9
 * between write and acknowledgement, replay. Forward runs read the outbox (the forward source of
 * every sink run); reverse runs write a pg_trickle inbox. The shared servers are never stopped:
 * "unreachable" is the proxy stopping.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import type { ReservedSql } from "postgres";
import { createStreamTable, enableOutbox, writeRaw, writeV1Inline } from "../fixtures/outbox.ts";
import { expectAllDegraded, expectAllRecovered, httpBase } from "../helpers/observe.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { POISONS } from "../helpers/poison.ts";
import { tcpProxy } from "../helpers/proxy.ts";
import { eventually, relayOnce, RunningRelay } from "../helpers/relay.ts";
import { deadLetters, inboxRows, setRelayInbox } from "../helpers/reverse.ts";
import { requireServer, type ServerName } from "../helpers/servers.ts";

/** The password every contract config carries where its system takes one; no output may show it. */
export const SECRET = "contract-s3cret-pw-9271";

/** A run label unique to this process: streams, topics, queues and keys of one suite run. */
export const RUN = `${process.pid}${Math.floor(Math.random() * 1e6)}`;

/** How the relay reaches a system: the proxy of the "unreachable" case, or the server itself. */
export interface Reach {
  /** The loopback port the relay must use (the proxy's, when the backend has a server port). */
  port: number;
  /** The proxy the unreachable case stops and resumes (on the same port); null without a server. */
  proxy: { stop(): Promise<void>; resume(): Promise<void> } | null;
}

/** Starts a proxy in front of `serverPort`; `startProxy` overrides how (Kafka's advertised port). */
async function reach(serverPort: number | null, startProxy?: () => Promise<Reach["proxy"] & { port: number }>): Promise<Reach> {
  if (serverPort === null) return { port: 0, proxy: null };
  const proxy = startProxy ? await startProxy() : await tcpProxy(serverPort);
  return { port: proxy.port, proxy };
}

/** The sessions of this database waiting for a lock on `relation` (pg_locks spans all databases). */
const waitersOn = (db: TestDatabase, relation: string) => db.sql<{ pid: number }[]>`
  SELECT pid FROM pg_locks WHERE relation = ${relation}::regclass AND NOT granted
     AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`;

/**
 * Ends the sessions a killed relay left waiting for a lock on `relation`: PostgreSQL would
 * otherwise run their statement once the lock is free, as if the relay had lived on.
 */
async function terminateWaiters(db: TestDatabase, relation: string): Promise<void> {
  for (const { pid } of await waitersOn(db, relation)) await db.sql`SELECT pg_terminate_backend(${pid})`;
}

/**
 * The config holds SECRET, and neither the running relay's output (which by now tells of the
 * unreachable case's errors) nor `check` (which connects) nor `status --wide` shows it.
 */
async function expectSecretHidden(db: TestDatabase, name: string, config: Record<string, unknown>, relay: RunningRelay, env?: Record<string, string>): Promise<void> {
  expect(JSON.stringify(config)).toContain(SECRET);
  const check = await relayOnce(["check", "--postgres-url", db.url], env);
  const status = await relayOnce(["status", "--wide", "--postgres-url", db.url]);
  for (const out of [relay.stdout, relay.stderr, check.stdout, check.stderr, status.stdout, status.stderr]) expect(out).not.toContain(SECRET);
  expect(check.stdout + check.stderr).toContain(name);
}

/** Waits until `relay` runs pipeline `name`; gives the base URL of its /health. */
async function pipelineStarted(relay: RunningRelay, name: string): Promise<string> {
  const base = await httpBase(relay);
  await relay.waitForLog(new RegExp(`\\[${name}\\] started`), 60_000);
  return base;
}

/** After a backend's cases: the relay killed, the proxy stopped, the target and database removed. */
async function tearDown(relay: RunningRelay | undefined, via: Reach | undefined, target: { cleanup(): Promise<void> } | undefined, db: TestDatabase | undefined) {
  if (relay && relay.proc.exitCode === null) await relay.stop("SIGKILL");
  await via?.proxy?.stop();
  await target?.cleanup();
  await db?.drop();
}

/** What every backend's file supplies, sink or source. */
interface Contract<Target> {
  system: string;
  /** The servers besides PostgreSQL that must run. */
  servers: ServerName[];
  /** The server port a proxy stands in front of; null without a server to lose (files, HTTP receiver). */
  serverPort: number | null;
  /** Starts the proxy another way than a tcpProxy to `serverPort` (Kafka: its advertised port). */
  startProxy?: () => Promise<NonNullable<Reach["proxy"]> & { port: number }>;
  /** Creates the destination or source; `secret` goes where the system takes a password. */
  target(reach: Reach, secret: string): Promise<Target>;
  /** Whether `SECRET` is in the config the target builds. */
  hasSecret: boolean;
  /** Environment of the relay processes (AWS credentials for the SDK's chain). */
  env?: Record<string, string>;
}

// ---- sinks ------------------------------------------------------------------------------------

/** One message as the destination holds it: its dedup key and the row it carries. */
export interface Arrived {
  key: string;
  payload: { id: number; k: string } & Record<string, unknown>;
}

export interface SinkTarget {
  /** The sink config (`type` included), its server reached at `reach.port`. */
  config: Record<string, unknown>;
  /** Everything that arrived so far, in arrival order where the system keeps one. */
  arrived(): Promise<Arrived[]>;
  /** Removes what the target created. */
  cleanup(): Promise<void>;
}

export interface SinkContract extends Contract<SinkTarget> {
  /** Whether the system itself drops a replayed message (else each copy arrives with its key). */
  dedups: boolean;
  /** Whether `arrived()` is in arrival order (per-key order is then checked). */
  ordered: boolean;
  /** A row the system refuses for good (besides the decode poison every forward run gets). */
  poisonRow?: Record<string, unknown>;
}

const N_HEADERS = 3;
const ROWS_PER_HEADER = 20;
const KEYS = ["a", "b", "c", "d"];

/**
 * Registers the contract's cases for one sink. The outbox is the forward source: rows are
 * written to a test-double outbox and `run` relays them.
 */
export function sinkContract(def: SinkContract): void {
  describe(`${def.system} sink contract`, () => {
    const name = `contract_${def.system.replace(/\W/g, "_")}`;
    let db: TestDatabase;
    let outboxTable = "";
    let via: Reach;
    let target: SinkTarget;
    let relay: RunningRelay;
    let base = "";
    let nextId = 1;
    const written: string[] = [];
    const outputs: string[] = [];

    const keyOf = (headerId: string, i: number) => `${outboxTable}:${headerId}:${i}`;
    /** Writes `headers` outbox rows of ROWS_PER_HEADER rows each, keys spread over KEYS. */
    async function writeRows(headers: number): Promise<string[]> {
      const keys: string[] = [];
      for (let h = 0; h < headers; h++) {
        const rows = Array.from({ length: ROWS_PER_HEADER }, () => {
          const id = nextId++;
          return { id, k: KEYS[id % KEYS.length]! };
        });
        const headerId = await writeV1Inline(db.sql, outboxTable, { inserted: rows, deleted: [] });
        keys.push(...rows.map((_, i) => keyOf(headerId, i)));
      }
      written.push(...keys);
      return keys;
    }
    async function waitArrived(keys: string[], what: string, timeoutMs = 60_000): Promise<Arrived[]> {
      let got: Arrived[] = [];
      await eventually(
        async () => {
          got = await target.arrived();
          const have = new Set(got.map((a) => a.key));
          return keys.every((k) => have.has(k));
        },
        timeoutMs,
        what,
      ).catch((err) => {
        const have = new Set(got.map((a) => a.key));
        throw new Error(`${err.message}: ${keys.filter((k) => !have.has(k)).length} of ${keys.length} missing\n${relay?.stderr.slice(-3000)}`);
      });
      return got;
    }
    const startRelay = () => new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0", "--io-timeout", "5"], def.env);
    const stopRelay = async (signal: "SIGTERM" | "SIGKILL") => {
      await relay.stop(signal);
      outputs.push(relay.stdout, relay.stderr);
    };

    beforeAll(async () => {
      for (const s of ["postgres", ...def.servers] as ServerName[]) await requireServer(s);
      db = await testDatabase(name);
      const table = `public.${name}`;
      await createStreamTable(db.sql, table, "id int primary key, k text, blob text");
      ({ outboxTable } = await enableOutbox(db.sql, table));
      via = await reach(def.serverPort, def.startProxy);
      target = await def.target(via, SECRET);
      await db.sql`SELECT pgtrickle.set_relay_outbox(${name}, ${table}, NULL, ${db.sql.json(target.config as never)})`;
      relay = startRelay();
      base = await pipelineStarted(relay, name);
    });

    afterAll(() => tearDown(relay, via, target, db));

    test("N in → N out: every row once, its content intact, in order per key", async () => {
      const keys = await writeRows(N_HEADERS);
      const got = await waitArrived(keys, "every row downstream");
      const byKey = new Map(got.map((a) => [a.key, a.payload]));
      keys.forEach((key, i) => expect(byKey.get(key)).toMatchObject({ id: i + 1, k: KEYS[(i + 1) % KEYS.length] }));
      expect(got.length).toBe(keys.length);
      if (def.ordered) {
        for (const k of KEYS) {
          const ids = got.filter((a) => a.payload.k === k).map((a) => a.payload.id);
          expect(ids).toEqual([...ids].sort((x, y) => x - y));
        }
      }
    }, 120_000);

    test("poison → dead letter while the rest flow", async () => {
      const bad = await writeRaw(db.sql, outboxTable, { v: 99, inserted: [] });
      // A row that does not decode is dead-lettered under its `:decode` key.
      const poisonKeys = [`${outboxTable}:${bad}:decode`];
      if (def.poisonRow) {
        const id = await writeV1Inline(db.sql, outboxTable, { inserted: [{ id: 100_000, k: "poison", ...def.poisonRow }], deleted: [] });
        poisonKeys.push(keyOf(id, 0));
      }
      const after = await writeRows(1);
      await waitArrived(after, "the rows after the poison");
      await eventually(async () => (await deadLetters(db, name)).length === poisonKeys.length, 30_000, "the poison dead-lettered");
      const letters = await deadLetters(db, name);
      expect(letters.map((l) => l.dedup_key).sort()).toEqual(poisonKeys.sort());
      expect(letters.map((l) => l.error_kind).sort()).toEqual(def.poisonRow ? ["decode", "sink_permanent"] : ["decode"]);
      const delivered = new Set((await target.arrived()).map((a) => a.key));
      for (const k of poisonKeys.slice(1)) expect(delivered.has(k)).toBe(false);
    }, 120_000);

    if (def.serverPort !== null) {
      test("unreachable → degraded (/health 503), then recovered with every row", async () => {
        await via.proxy!.stop();
        const keys = await writeRows(1);
        await expectAllDegraded(base, [name], relay, 60_000, "sink");
        await via.proxy!.resume();
        await waitArrived(keys, "every row after the server came back", 120_000);
        await expectAllRecovered(db.sql, base, 1, 60_000);
      }, 240_000);
    }

    if (def.hasSecret) {
      test("the password in the config is in no output (relay log, check, status)", () => expectSecretHidden(db, name, target.config, relay, def.env), 120_000);
    }

    test("kill -9 between the write and the offset commit → nothing lost", async () => {
      const lock: ReservedSql = await db.sql.reserve();
      let keys: string[] = [];
      try {
        // The offset row stays locked: the sink writes, the commit that follows waits.
        await lock`BEGIN`;
        const [held] = await lock`SELECT last_change_id::text AS last FROM pgtrickle.relay_consumer_offsets WHERE pipeline_id = ${name} FOR UPDATE`;
        keys = await writeRows(1);
        await waitArrived(keys, "the batch downstream while its commit waits");
        const [still] = await db.sql`SELECT last_change_id::text AS last FROM pgtrickle.relay_consumer_offsets WHERE pipeline_id = ${name}`;
        expect(still!.last).toBe(held!.last);
        await stopRelay("SIGKILL");
        await terminateWaiters(db, "pgtrickle.relay_consumer_offsets");
      } finally {
        await lock`ROLLBACK`.catch(() => {});
        lock.release();
      }
      relay = startRelay();
      await writeRows(1);
      const got = await waitArrived(written, "every row after the restart");
      if (def.dedups) expect(got.length).toBe(new Set(got.map((a) => a.key)).size);
      await stopRelay("SIGTERM");
      // The restarted relay committed everything it sent.
      const [end] = await db.sql.unsafe(`SELECT max(id)::text AS id FROM pgtrickle."${outboxTable}"`);
      const [offset] = await db.sql`SELECT last_change_id::text AS last FROM pgtrickle.relay_consumer_offsets WHERE pipeline_id = ${name}`;
      expect(offset!.last).toBe(end!.id);
    }, 180_000);

    test(`replay from an old offset → ${def.dedups ? "no duplicate downstream" : "each copy arrives under its original key"}`, async () => {
      const before = await target.arrived();
      const distinct = new Set(before.map((a) => a.key));
      // Rewinding the stored offset: the relay sends every row again, with the same dedup keys.
      await db.sql`UPDATE pgtrickle.relay_consumer_offsets SET last_change_id = 0 WHERE pipeline_id = ${name}`;
      const r = await relayOnce(["drain", "--postgres-url", db.url, "--pipeline", name, "--timeout", "120", "--allow-dead-letters"], def.env, 180_000);
      outputs.push(r.stdout, r.stderr);
      expect(r.exitCode).toBe(0);
      let after: Arrived[] = [];
      await eventually(async () => {
        after = await target.arrived();
        return def.dedups ? true : after.length >= before.length + distinct.size;
      }, 60_000, "the replayed copies downstream");
      expect(new Set(after.map((a) => a.key))).toEqual(distinct);
      if (def.dedups) expect(after.length).toBe(distinct.size);
      else expect(after.length).toBe(before.length + distinct.size);
      if (def.hasSecret) for (const out of outputs) expect(out).not.toContain(SECRET);
    }, 240_000);
  });
}

// ---- sources ----------------------------------------------------------------------------------

export interface SourceTarget {
  /** The source config (`type` included), its server reached at `reach.port`. */
  config: Record<string, unknown>;
  /**
   * Puts events into the system (straight to the server, never through the proxy), each with its
   * producer's dedup key where the system carries one. A source the relay serves itself (HTTP)
   * keeps retrying until the relay answered.
   */
  publish(events: Event[]): Promise<void>;
  /**
   * What the system still holds for the relay once no relay runs: undelivered or unacknowledged
   * messages (0 when every one, poison included, was acknowledged). Absent where the relay
   * keeps the position itself (files) or answers the sender (HTTP).
   */
  pending?(): Promise<number>;
  cleanup(): Promise<void>;
}

export interface SourceContract extends Contract<SourceTarget> {
  /** The poisons this source dead-letters, when not all of POISONS (the rest it refuses otherwise). */
  poisons?: typeof POISONS;
  /** The dead letter's kind by poison label, where not `inbox_permanent`. */
  poisonKinds?: Record<string, string>;
}

/** An event as a producer sends it: its dedup key (the inbox `event_id`) and its JSON body. */
export interface Event {
  key: string;
  body: string;
}

/**
 * Registers the contract's cases for one source, writing the inbox `<name>_inbox` of a database
 * with the pg_trickle test double. Every event carries its producer's key (a resend is the same
 * event), also as `dedup_key` in the body, where files and HTTP bodies carry it.
 */
export function sourceContract(def: SourceContract): void {
  describe(`${def.system} source contract`, () => {
    const name = `contract_${def.system.replace(/\W/g, "_")}_in`;
    const inbox = `${name}_inbox`;
    let db: TestDatabase;
    let via: Reach;
    let target: SourceTarget;
    let relay: RunningRelay;
    let base = "";
    let next = 0;
    const sent: Event[] = [];

    /** `count` events with fresh dedup keys. */
    function events(count: number): Event[] {
      const out = Array.from({ length: count }, () => {
        const seq = next++;
        const key = `contract-${RUN}-${seq}`;
        return { key, body: JSON.stringify({ dedup_key: key, seq, k: KEYS[seq % KEYS.length] }) };
      });
      sent.push(...out);
      return out;
    }
    async function landed(): Promise<Map<string, unknown>> {
      const rows = await inboxRows(db, inbox).catch(() => []);
      return new Map(rows.map((r) => [r.event_id, r.payload]));
    }
    async function waitLanded(sent: Event[], what: string, timeoutMs = 60_000): Promise<void> {
      const keys = sent.map((e) => e.key);
      let have = new Map<string, unknown>();
      await eventually(
        async () => {
          have = await landed();
          return keys.every((k) => have.has(k));
        },
        timeoutMs,
        what,
      ).catch((err) => {
        throw new Error(`${err.message}: ${keys.filter((k) => !have.has(k)).length} of ${keys.length} missing\n${relay?.stderr.slice(-3000)}`);
      });
    }
    const startRelay = () => new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0", "--io-timeout", "8"], def.env);

    beforeAll(async () => {
      for (const s of ["postgres", ...def.servers] as ServerName[]) await requireServer(s);
      db = await testDatabase(name);
      await db.sql`SELECT pgtrickle.create_inbox(${inbox})`;
      via = await reach(def.serverPort, def.startProxy);
      target = await def.target(via, SECRET);
      await setRelayInbox(db, name, inbox, target.config);
      relay = startRelay();
      base = await pipelineStarted(relay, name);
    });

    afterAll(() => tearDown(relay, via, target, db));

    test("N in → N out: every event once in the inbox, its body intact", async () => {
      const batch = events(60);
      await target.publish(batch);
      await waitLanded(batch, "every event in the inbox");
      const have = await landed();
      expect(have.size).toBe(60);
      for (const e of batch) expect(have.get(e.key)).toEqual(JSON.parse(e.body));
    }, 120_000);

    test("replay: the producer sending the same events again adds no row", async () => {
      await target.publish(sent.slice(0, 20));
      const marker = events(1);
      await target.publish(marker);
      await waitLanded(marker, "the event sent after the resend");
      expect((await landed()).size).toBe(sent.length);
    }, 120_000);

    test("poison → dead letter while the rest flow", async () => {
      const kinds = def.poisons ?? POISONS;
      const valid = events(kinds.length + 1);
      const poisons = kinds.map((p, i) => ({ key: `contract-${RUN}-poison-${i}`, body: p.body }));
      await target.publish(valid.flatMap((e, i) => (i < poisons.length ? [e, poisons[i]!] : [e])));
      await waitLanded(valid, "the valid events around the poison");
      await eventually(async () => (await deadLetters(db, name)).length === kinds.length, 30_000, "every poison dead-lettered");
      const letters = await deadLetters(db, name);
      for (const p of kinds) {
        expect(letters.filter((d) => p.reason.test(d.error)).map((d) => d.error_kind)).toEqual([def.poisonKinds?.[p.label] ?? "inbox_permanent"]);
      }
      expect((await landed()).size).toBe(sent.length);
    }, 120_000);

    if (def.serverPort !== null) {
      test("unreachable → degraded (/health 503), then recovered with every event", async () => {
        await via.proxy!.stop();
        await expectAllDegraded(base, [name], relay, 60_000, "source");
        const batch = events(10);
        await target.publish(batch);
        await via.proxy!.resume();
        await waitLanded(batch, "every event after the server came back", 120_000);
        await expectAllRecovered(db.sql, base, 1, 60_000);
      }, 240_000);
    }

    if (def.hasSecret) {
      test("the password in the config is in no output (relay log, check, status)", () => expectSecretHidden(db, name, target.config, relay, def.env), 120_000);
    }

    test("kill -9 between the inbox commit and the acknowledgement, restart → every event once", async () => {
      // The pipeline commits the inbox rows, writes the batch's dead letters, then acknowledges:
      // with the dead-letter table locked, a batch holding a poison stops in between.
      const lock: ReservedSql = await db.sql.reserve();
      const batch = events(20);
      // A NUL character (jsonb refuses it), the key also in the body for files and HTTP.
      const poison = { key: `contract-${RUN}-kill-poison`, body: JSON.stringify({ dedup_key: `contract-${RUN}-kill-poison`, text: "a\u0000b" }) };
      const letters = async () => (await deadLetters(db, name)).filter((d) => d.dedup_key === poison.key);
      let publishing: Promise<void> = Promise.resolve();
      try {
        await lock`BEGIN`;
        await lock`LOCK TABLE pgtrickle.relay_dead_letters IN EXCLUSIVE MODE`;
        publishing = target.publish([...batch, poison]);
        await waitLanded(batch, "the batch committed to the inbox");
        await eventually(async () => (await waitersOn(db, "pgtrickle.relay_dead_letters")).length > 0, 60_000, "the relay to wait for the dead-letter table");
        expect(await letters()).toEqual([]);
        await relay.stop("SIGKILL");
        await terminateWaiters(db, "pgtrickle.relay_dead_letters");
      } finally {
        await lock`ROLLBACK`.catch(() => {});
        lock.release();
      }
      relay = startRelay();
      await publishing;
      await eventually(async () => (await letters()).length > 0, 120_000, "the poison dead-lettered after the restart");
      // Dead-lettered once: by the restarted relay, which got the unacknowledged batch again.
      expect((await letters()).map((d) => d.attempts)).toEqual([1]);
      expect((await landed()).size).toBe(sent.length);
      if (def.hasSecret) expect(relay.stderr + relay.stdout).not.toContain(SECRET);
      // Everything this suite published, poison included, ends acknowledged to the system: the
      // batches the killed relay had read ahead come back once their delivery times out, so the
      // restarted relay is still running while this waits.
      if (target.pending) await eventually(async () => (await target.pending!()) === 0, 120_000, "nothing left unacknowledged");
      await relay.stop("SIGTERM");
    }, 300_000);
  });
}
