/**
 * The HTTP sink under `pgtrickle-relay run` and `drain`: killed with SIGKILL in the middle of
 * requests, and facing a receiver that fails now and then. The receivers are Bun.serve listeners
 * on 127.0.0.1 in this process (the real server of a webhook) that record every request; one can
 * hold a request unanswered while the relay is killed.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { createStreamTable, enableOutbox, writeClaimCheck, writeV1Inline, type OutboxTables } from "../fixtures/outbox.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { eventually, relayOnce, RunningRelay } from "../helpers/relay.ts";

interface Received {
  idempotencyKey: string;
  dedupKeys: string[];
  answered: number;
}

/** Answers 200 until a request matches `holdWhen`; holds that one and any later until `release()`. */
class Receiver {
  requests: Received[] = [];
  held: (() => void)[] = [];
  private holdWhen: (r: Received) => boolean = () => false;
  private holding = false;
  private released = false;
  readonly server = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    fetch: async (req) => {
      const body = JSON.parse(await req.text());
      const events: { dedup_key: string }[] = Array.isArray(body) ? body : [body];
      const record: Received = { idempotencyKey: req.headers.get("idempotency-key") ?? "", dedupKeys: events.map((e) => e.dedup_key), answered: 0 };
      this.requests.push(record);
      if (this.holding || this.holdWhen(record)) {
        this.holding = true;
        await new Promise<void>((r) => this.held.push(r));
      }
      // A held request answered after its relay was killed: the relay cannot read it anyway.
      record.answered = this.released ? 503 : 200;
      return new Response(record.answered === 200 ? "ok" : "gone", { status: record.answered });
    },
  });

  get url(): string {
    return `http://127.0.0.1:${this.server.port}/hook`;
  }

  /** Accepts requests until one matches `when`, then holds. */
  holdFrom(when: (r: Received) => boolean): void {
    this.holdWhen = when;
    this.holding = false;
    this.released = false;
  }

  /** Accepts `count` requests, then holds. */
  acceptThenHold(count: number): void {
    let left = count;
    this.holdFrom(() => left-- <= 0);
  }

  /** Answers the held requests (503). */
  release(): void {
    this.released = true;
    for (const r of this.held.splice(0)) r();
  }
}

let db: TestDatabase;
let receiver: Receiver;
beforeAll(async () => {
  db = await testDatabase("http_replay");
  receiver = new Receiver();
});
afterAll(async () => {
  receiver?.server.stop(true);
  await db?.drop();
});

const runRelay = () => new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0"]);

describe("http sink across SIGKILLs of the relay", () => {
  test("batch mode: every message is sent under one Idempotency-Key, and every key always names the same messages", async () => {
    await createStreamTable(db.sql, "public.hooked", "id int primary key");
    const tables: OutboxTables = await enableOutbox(db.sql, "public.hooked");
    await db.sql`SELECT pgtrickle.set_relay_outbox('hooked', 'public.hooked', NULL, ${db.sql.json({ type: "http", url: receiver.url, timeout_ms: 120_000 } as never)})`;
    // Small source batches, so that change sets are cut into several batches and a batch holds
    // several change sets: the two ways a replay could regroup messages.
    await db.sql`UPDATE pgtrickle.relay_outbox_config SET config = jsonb_set(config, '{source}', config->'source' || '{"max_batch_messages": 10}'::jsonb) WHERE name = 'hooked'`;

    const expected: string[] = [];
    let nextRow = 0;
    const writeSet = async (rows: number) => {
      const inserted = Array.from({ length: rows }, () => ({ id: nextRow++ }));
      const id = await writeV1Inline(db.sql, tables.outboxTable, { inserted, deleted: [] });
      for (let i = 0; i < rows; i++) expected.push(`${tables.outboxTable}:${id}:${i}`);
      return id;
    };
    const writeClaimCheckSet = async (rows: number) => {
      const data = Array.from({ length: rows }, () => ({ op: "INSERT" as const, data: { id: nextRow++ } }));
      const id = await writeClaimCheck(db.sql, tables.outboxTable, tables.deltaTable, data, { v1Header: true });
      for (let i = 0; i < rows; i++) expected.push(`${tables.outboxTable}:${id}:${i}`);
    };

    // Per cycle: change sets written before the start, which request is held (after the ones
    // before it were accepted), change sets written while it is held. The held request is sent
    // again by the next relay, which may find a longer outbox (cycle 0) or start at a change set
    // that the first relay had begun in the middle of a batch (cycle 1).
    let large = "";
    const largeFrom = (index: number) => (r: Received) =>
      r.dedupKeys.some((d) => d.startsWith(`${tables.outboxTable}:${large}:`) && Number(d.split(":").at(-1)) >= index);
    const writeSets = async (...sizes: number[]) => {
      for (const n of sizes) await writeSet(n);
    };
    const cycles: { before: () => Promise<void>; hold: () => void; during: () => Promise<void> }[] = [
      { before: () => writeSets(2, 1, 2), hold: () => receiver.acceptThenHold(0), during: () => writeSets(3, 3) },
      {
        before: async () => {
          await writeSet(3);
          large = await writeSet(23);
        },
        hold: () => receiver.holdFrom(largeFrom(10)),
        during: () => writeSets(1),
      },
      { before: () => writeSets(3, 3, 3, 3), hold: () => receiver.acceptThenHold(2), during: () => writeSets(5) },
      {
        before: async () => {
          await writeSet(1);
          await writeClaimCheckSet(12);
          await writeSet(2);
        },
        hold: () => receiver.acceptThenHold(1),
        during: () => writeSets(1, 1),
      },
      { before: () => writeSets(4, 4, 4), hold: () => receiver.acceptThenHold(3), during: () => writeSets(2, 2) },
    ];
    for (const [index, cycle] of cycles.entries()) {
      await cycle.before();
      cycle.hold();
      const relay = runRelay();
      try {
        await eventually(() => receiver.held.length > 0, 30_000, `cycle ${index}: a request to be held`);
        await cycle.during();
      } finally {
        await relay.stop("SIGKILL");
        receiver.release();
      }
    }
    receiver.holdFrom(() => false);
    const drained = await relayOnce(["drain", "--postgres-url", db.url, "--pipeline", "hooked"]);
    expect(drained.exitCode).toBe(0);

    const accepted = new Set(receiver.requests.filter((r) => r.answered === 200).flatMap((r) => r.dedupKeys));
    expect([...accepted].sort()).toEqual([...expected].sort());
    const keysOfMessage = new Map<string, Set<string>>();
    const messagesOfKey = new Map<string, Set<string>>();
    for (const r of receiver.requests) {
      for (const d of r.dedupKeys) keysOfMessage.set(d, (keysOfMessage.get(d) ?? new Set()).add(r.idempotencyKey));
      messagesOfKey.set(r.idempotencyKey, (messagesOfKey.get(r.idempotencyKey) ?? new Set()).add(r.dedupKeys.join(",")));
    }
    const underSeveralKeys = [...keysOfMessage].filter(([, keys]) => keys.size > 1).map(([d]) => d);
    expect(underSeveralKeys).toEqual([]);
    const keysWithSeveralContents = [...messagesOfKey].filter(([, contents]) => contents.size > 1).map(([k]) => k);
    expect(keysWithSeveralContents).toEqual([]);
    // Five held requests were sent again after the kills: the replays the assertions are about.
    const sentTwice = receiver.requests.filter((r, i) => receiver.requests.findIndex((o) => o.idempotencyKey === r.idempotencyKey) !== i);
    expect(sentTwice.length).toBeGreaterThanOrEqual(cycles.length);
  }, 240_000);

  test("per-event mode: a non-ASCII outbox name is delivered, its Idempotency-Key percent-encoded", async () => {
    receiver.holdFrom(() => false);
    receiver.requests = [];
    await createStreamTable(db.sql, "public.commandes_été_注文", "id int primary key");
    const tables = await enableOutbox(db.sql, "public.commandes_été_注文");
    await db.sql`SELECT pgtrickle.set_relay_outbox('commandes', 'public.commandes_été_注文', NULL, ${db.sql.json({ type: "http", url: receiver.url, batch_mode: false } as never)})`;
    await writeV1Inline(db.sql, tables.outboxTable, { inserted: [{ id: 1 }, { id: 2 }], deleted: [] });
    const drained = await relayOnce(["drain", "--postgres-url", db.url, "--pipeline", "commandes", "--timeout", "30"]);
    expect(drained.exitCode).toBe(0);
    expect(receiver.requests).toHaveLength(2);
    for (const r of receiver.requests) {
      expect(r.idempotencyKey).toMatch(/^[\x21-\x7e]+$/);
      expect(decodeURIComponent(r.idempotencyKey)).toBe(r.dedupKeys[0]!);
    }
    expect(receiver.requests[0]!.dedupKeys[0]).toContain("注文");
  }, 60_000);
});

describe("http sink per-event mode against a mildly flaky receiver", () => {
  test("the first try of every 20th message fails (5 %): all 1,000 rows drain, no message sent more than twice", async () => {
    const sends = new Map<string, number>();
    const flaky = Bun.serve({
      hostname: "127.0.0.1",
      port: 0,
      fetch: async (req) => {
        const { dedup_key, payload } = JSON.parse(await req.text());
        const count = (sends.get(dedup_key) ?? 0) + 1;
        sends.set(dedup_key, count);
        return payload.id % 20 === 7 && count === 1 ? new Response("hiccup", { status: 500 }) : new Response("ok");
      },
    });
    try {
      await createStreamTable(db.sql, "public.flaky", "id int primary key");
      const tables = await enableOutbox(db.sql, "public.flaky");
      await db.sql`SELECT pgtrickle.set_relay_outbox('flaky', 'public.flaky', NULL, ${db.sql.json({ type: "http", url: `http://127.0.0.1:${flaky.port}/`, batch_mode: false } as never)})`;
      await db.sql.unsafe(
        `INSERT INTO pgtrickle."${tables.outboxTable}" (payload)
         SELECT jsonb_build_object('v', 1, 'inserted', (SELECT jsonb_agg(jsonb_build_object('id', g * 10 + i)) FROM generate_series(0, 9) i), 'deleted', '[]'::jsonb)
         FROM generate_series(0, 99) g`,
      );
      // Generous bound for a slow shared machine; today's main needs minutes for a tenth of the rows.
      const drained = await relayOnce(["drain", "--postgres-url", db.url, "--pipeline", "flaky", "--timeout", "90"], {}, 120_000);
      expect(drained.exitCode).toBe(0);
      expect(sends.size).toBe(1000);
      expect(Math.max(...sends.values())).toBe(2);
      expect([...sends.values()].filter((n) => n === 2)).toHaveLength(50);
    } finally {
      flaky.stop(true);
    }
  }, 150_000);
});
