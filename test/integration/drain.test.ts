/**
 * `drain` for CI, against real PostgreSQL: nothing runs on a flag it does not know, an empty
 * catalog or a relay group without offsets (a typo) is refused, dead letters make it exit 4,
 * --timeout bounds the whole run against a receiver that never answers, and a new simple-mode
 * pipeline can start at the end of its outbox.
 */
import { afterAll, beforeAll, expect, test } from "bun:test";
import { existsSync, mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createStreamTable, enableOutbox, writeRaw, writeV1Inline } from "../fixtures/outbox.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { relayOnce } from "../helpers/relay.ts";

const dir = mkdtempSync(join(tmpdir(), "relay-drain-"));
let db: TestDatabase;
const outboxes = new Map<string, string>();

beforeAll(async () => {
  db = await testDatabase("drain");
});
afterAll(async () => {
  await db?.drop();
});

async function pipeline(name: string, sink: Record<string, unknown>, source: Record<string, unknown> = {}) {
  await createStreamTable(db.sql, `public.${name}`, "id int primary key");
  outboxes.set(name, (await enableOutbox(db.sql, `public.${name}`)).outboxTable);
  await db.sql`SELECT pgtrickle.set_relay_outbox(${name}, ${`public.${name}`}, NULL, ${db.sql.json(sink as never)})`;
  if (Object.keys(source).length) {
    await db.sql`UPDATE pgtrickle.relay_outbox_config SET config = jsonb_set(config, '{source}', config->'source' || ${db.sql.json(source as never)}) WHERE name = ${name}`;
  }
}
const rows = (name: string, ids: number[]) => writeV1Inline(db.sql, outboxes.get(name)!, { inserted: ids.map((id) => ({ id })), deleted: [] });
const drain = (...extra: string[]) => relayOnce(["drain", "--postgres-url", db.url, ...extra]);
const ids = (path: string) => (existsSync(path) ? readFileSync(path, "utf8").trim().split("\n").filter(Boolean).map((l) => JSON.parse(l).payload.id) : []);

test("an empty catalog is refused (exit 5) unless --allow-empty; an unknown flag runs nothing (exit 2)", async () => {
  const empty = await drain();
  expect(empty.exitCode).toBe(5);
  expect(empty.stderr).toContain("no enabled pipeline");
  expect((await drain("--allow-empty")).exitCode).toBe(0);

  const out = join(dir, "dry.jsonl");
  await pipeline("dry", { type: "file", output: out });
  await rows("dry", [1]);
  const dry = await drain("--dry-run");
  expect(dry.exitCode).toBe(2);
  expect(dry.stderr).toContain("unknown flag '--dry-run'");
  expect(existsSync(out)).toBe(false);
  const named = await drain("--pipeline", "dyr");
  expect(named.exitCode).toBe(5);
  expect(named.stderr).toContain("no enabled pipeline named dyr (did you mean 'dry'?)");
  expect((await drain("--pipeline", "dry")).exitCode).toBe(0);
  expect(ids(out)).toEqual([1]);
});

test("a relay group without offsets while others have some is refused (a typo would replay everything) unless --new-group", async () => {
  const typo = await drain("--pipeline", "dry", "--relay-group-id", "defualt");
  expect(typo.exitCode).toBe(5);
  expect(typo.stderr).toContain("relay group 'defualt' has no stored offsets, but 'default' do (did you mean 'default'?)");
  expect(ids(join(dir, "dry.jsonl"))).toEqual([1]);
  expect((await drain("--pipeline", "dry", "--relay-group-id", "second", "--new-group")).exitCode).toBe(0);
  expect(ids(join(dir, "dry.jsonl"))).toEqual([1, 1]);
});

test("messages dead-lettered during the run: exit 4, or 0 with --allow-dead-letters", async () => {
  await pipeline("poison", { type: "file", output: join(dir, "poison.jsonl") });
  await rows("poison", [1]);
  await writeRaw(db.sql, outboxes.get("poison")!, { v: 99 });
  const result = await drain("--pipeline", "poison");
  expect(result.exitCode).toBe(4);
  expect(result.stderr).toContain("1 message(s) were dead-lettered during the run");
  await writeRaw(db.sql, outboxes.get("poison")!, { v: 98 });
  expect((await drain("--pipeline", "poison", "--allow-dead-letters")).exitCode).toBe(0);
  expect((await drain("--pipeline", "poison")).exitCode).toBe(0); // nothing new dead-lettered
});

test("--timeout bounds the whole run, the graceful stop included, against a receiver that never answers", async () => {
  const frozen = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: () => new Promise<Response>(() => {}) });
  try {
    await pipeline("frozen", { type: "http", url: `http://127.0.0.1:${frozen.port}/hook` });
    await rows("frozen", [1]);
    const started = Date.now();
    const result = await drain("--pipeline", "frozen", "--timeout", "3", "--shutdown-timeout", "60");
    const seconds = (Date.now() - started) / 1000;
    expect(result.exitCode).toBe(1);
    expect(result.stderr).toContain("drain --timeout (3 s) passed");
    // Well under --shutdown-timeout: the graceful stop does not get its own 60 s after the 3.
    expect(seconds).toBeLessThan(30);
  } finally {
    frozen.stop(true);
    await db.sql`SELECT pgtrickle.disable_relay('frozen')`;
  }
}, 90_000);

test("a new simple-mode pipeline starts at the beginning by default, at the end with start_position latest", async () => {
  const late = join(dir, "late.jsonl");
  await pipeline("late", { type: "file", output: late }, { start_position: "latest" });
  await rows("late", [1, 2]);
  expect((await drain("--pipeline", "late")).exitCode).toBe(0);
  expect(ids(late)).toEqual([]);
  await rows("late", [3]);
  expect((await drain("--pipeline", "late")).exitCode).toBe(0);
  expect(ids(late)).toEqual([3]);
});
