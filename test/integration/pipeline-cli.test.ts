/**
 * `pipeline`, `dead-letters` and `tail` against real PostgreSQL: every change goes through the
 * catalog's SQL functions (seen in SQL afterwards), a config is validated before it is written,
 * secrets are masked in what is shown, and tail moves no offset.
 */
import { afterAll, beforeAll, expect, test } from "bun:test";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createStreamTable, enableOutbox, writeRaw, writeV1Inline } from "../fixtures/outbox.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { relayCommand, relayOnce } from "../helpers/relay.ts";

const dir = mkdtempSync(join(tmpdir(), "relay-pipeline-cli-"));
let db: TestDatabase;
let outbox = "";

beforeAll(async () => {
  db = await testDatabase("pipeline_cli");
  await createStreamTable(db.sql, "public.cli_orders", "id int primary key");
  outbox = (await enableOutbox(db.sql, "public.cli_orders")).outboxTable;
});
afterAll(async () => {
  await db?.drop();
});

const cli = (...args: string[]) => relayOnce([...args, "--postgres-url", db.url]);
const stored = async (name: string) => (await db.sql`SELECT name, direction, enabled, config FROM pgtrickle.list_relay_configs() WHERE name = ${name}`)[0];

test("pipeline set from flags, a YAML file and stdin; validated before anything is written; list, show, disable, enable, delete", async () => {
  const secret = `pw-${crypto.randomUUID().slice(0, 8)}`;
  const set = await cli("pipeline", "set", "to_amqp", "--outbox", "public.cli_orders", "--type", "rabbitmq", "--set", `url=amqp://guest:${secret}@127.0.0.1:5672`, "--set", "exchange=cli");
  expect(set.exitCode).toBe(0);
  expect((await stored("to_amqp"))?.config).toMatchObject({ source_type: "outbox", source: { outbox: "public.cli_orders", group: null }, sink: { type: "rabbitmq", exchange: "cli" } });

  const show = await cli("pipeline", "show", "to_amqp");
  expect(show.exitCode).toBe(0);
  expect(JSON.parse(show.stdout).config.sink.url).toBe("amqp://guest:***@127.0.0.1:5672");
  expect(show.stdout + show.stderr).not.toContain(secret);

  // Invalid: a misspelled key and a wrong value — refused, every problem named, nothing written.
  const bad = await cli("pipeline", "set", "bad", "--outbox", "public.cli_orders", "--type", "stdout", "--set", "formt=csv", "--set", "format=xml");
  expect(bad.exitCode).toBe(2);
  expect(bad.stderr).toContain("'sink.format' must be one of");
  expect(bad.stderr).toContain("did you mean 'sink.format'?");
  expect(await stored("bad")).toBeUndefined();
  expect((await cli("pipeline", "set", "", "--outbox", "x", "--type", "stdout")).exitCode).toBe(2);

  const yaml = join(dir, "in.yaml");
  writeFileSync(yaml, "inbox: cli_inbox\nsource:\n  type: stdin\n  input: /dev/null\n");
  expect((await cli("pipeline", "set", "from_yaml", "--config", yaml)).exitCode).toBe(0);
  expect((await stored("from_yaml"))?.direction).toBe("reverse");

  const proc = Bun.spawn(relayCommand(["pipeline", "set", "from_stdin", "--config", "-", "--disabled", "--postgres-url", db.url]), { stdin: "pipe", stdout: "pipe", stderr: "pipe" });
  proc.stdin.write(JSON.stringify({ outbox: "public.cli_orders", sink: { type: "stdout", format: "jsonl" } }));
  proc.stdin.end();
  expect(await proc.exited).toBe(0);
  expect(await stored("from_stdin")).toMatchObject({ direction: "forward", enabled: false });

  const list = await cli("pipeline", "list");
  expect(list.stdout).toMatch(/from_stdin\s+forward\s+no\s+outbox public\.cli_orders → stdout/);
  expect(list.stdout).toMatch(/from_yaml\s+reverse\s+yes/);
  expect(list.stdout).not.toContain(secret);

  expect((await cli("pipeline", "enable", "from_stdin")).exitCode).toBe(0);
  expect((await stored("from_stdin"))?.enabled).toBe(true);
  expect((await cli("pipeline", "disable", "from_yaml")).exitCode).toBe(0);
  expect((await stored("from_yaml"))?.enabled).toBe(false);
  expect((await cli("pipeline", "delete", "to_amqp")).exitCode).toBe(0);
  expect(await stored("to_amqp")).toBeUndefined();
  expect((await cli("pipeline", "delete", "to_amqp")).exitCode).toBe(1);
  await db.sql`DELETE FROM pgtrickle.relay_outbox_config`;
  await db.sql`DELETE FROM pgtrickle.relay_inbox_config`;
}, 120_000);

test("dead-letters list, show, replay, purge", async () => {
  await cli("pipeline", "set", "dl", "--outbox", "public.cli_orders", "--type", "file", "--set", `output=${join(dir, "dl.jsonl")}`);
  await writeV1Inline(db.sql, outbox, { inserted: [{ id: 1 }], deleted: [] });
  await writeRaw(db.sql, outbox, { v: 99 });
  expect((await cli("drain", "--pipeline", "dl")).exitCode).toBe(4);
  const list = await cli("dead-letters", "list", "--json");
  const rows = JSON.parse(list.stdout);
  expect(rows).toHaveLength(1);
  expect(rows[0]).toMatchObject({ pipeline: "dl", direction: "forward", error_kind: "decode" });
  expect((await cli("dead-letters", "list")).stdout).toMatch(new RegExp(`^${rows[0].id}  dl \\(forward\\)  open  decode`));
  const show = JSON.parse((await cli("dead-letters", "show", rows[0].id)).stdout);
  expect(JSON.stringify(show.message)).toContain('{"v":99}');

  expect((await cli("dead-letters", "replay", "--pipeline", "dl")).exitCode).toBe(0);
  const [marked] = await db.sql`SELECT replay_requested_at FROM pgtrickle.relay_dead_letters WHERE id = ${rows[0].id}::bigint`;
  expect(marked?.replay_requested_at).not.toBeNull();
  expect((await cli("dead-letters", "replay", "--pipeline", "nope")).exitCode).toBe(1);

  expect((await cli("dead-letters", "purge")).exitCode).toBe(2);
  const dry = await cli("dead-letters", "purge", "--pipeline", "dl");
  expect(dry.stderr).toContain("1 dead letter(s) would be deleted");
  expect((await db.sql`SELECT count(*)::int AS n FROM pgtrickle.relay_dead_letters`)[0]?.n).toBe(1);
  expect((await cli("dead-letters", "purge", "--pipeline", "dl", "--yes")).exitCode).toBe(0);
  expect((await db.sql`SELECT count(*)::int AS n FROM pgtrickle.relay_dead_letters`)[0]?.n).toBe(0);
  await db.sql`DELETE FROM pgtrickle.relay_outbox_config`;
}, 120_000);

test("tail prints an outbox's rows without moving any offset", async () => {
  const before = await db.sql`SELECT * FROM pgtrickle.relay_consumer_offsets`;
  const all = await cli("tail", "public.cli_orders", "--from-start", "--count", "2");
  expect(all.exitCode).toBe(0);
  const lines = all.stdout.trim().split("\n").map((l) => JSON.parse(l));
  expect(lines.map((l) => l.payload)).toEqual([{ v: 1, inserted: [{ id: 1 }], deleted: [] }, { v: 99 }]);

  // Live: started at the end, it prints only what is written after it.
  const proc = Bun.spawn(relayCommand(["tail", "public.cli_orders", "--count", "1", "--postgres-url", db.url]), { stdout: "pipe", stderr: "pipe" });
  await Bun.sleep(1500);
  await writeV1Inline(db.sql, outbox, { inserted: [{ id: 7 }], deleted: [] });
  const [out, code] = await Promise.all([new Response(proc.stdout).text(), proc.exited]);
  expect(code).toBe(0);
  expect(JSON.parse(out.trim()).payload.inserted).toEqual([{ id: 7 }]);
  expect(await db.sql`SELECT * FROM pgtrickle.relay_consumer_offsets`).toEqual(before);
}, 60_000);
