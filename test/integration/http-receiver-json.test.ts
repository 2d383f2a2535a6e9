/**
 * The HTTP receiver refuses a body declared JSON that does not parse (400, nothing written), so a
 * sender's bug is seen; bodies of other types are kept as before (a JSON string, base64).
 */
import { afterAll, beforeAll, expect, test } from "bun:test";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { freePort } from "../helpers/proxy.ts";
import { eventually, RunningRelay } from "../helpers/relay.ts";

let db: TestDatabase;
let relay: RunningRelay | undefined;

beforeAll(async () => {
  db = await testDatabase("http_receiver_json");
});
afterAll(async () => {
  if (relay) await relay.stop();
  await db?.drop();
});

test("declared JSON that does not parse: 400 and no row; text/plain and application/json that parse: stored", async () => {
  const port = await freePort();
  await db.sql`SELECT pgtrickle.create_inbox('hj_inbox')`;
  await db.sql`SELECT pgtrickle.set_relay_inbox('hj', 'hj_inbox', ${db.sql.json({ type: "http", listen_addr: `127.0.0.1:${port}`, path: "/in" } as never)})`;
  relay = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0"]);
  await relay.waitForLog(/\[hj\] started/);
  const post = (body: string, type: string, key: string) =>
    fetch(`http://127.0.0.1:${port}/in`, { method: "POST", body, headers: { "Content-Type": type, "Idempotency-Key": key } });

  for (const [type, key] of [["application/json", "bad-1"], ["application/json; charset=utf-8", "bad-2"], ["application/cloudevents+json", "bad-3"]] as const) {
    const res = await post("{not json", type, key);
    expect({ type, status: res.status }).toEqual({ type, status: 400 });
    expect(await res.text()).toContain("declared application/json but is not valid JSON");
  }
  expect((await post('{"ok":1}', "application/json", "good")).status).toBe(200);
  expect((await post("{not json", "text/plain", "text")).status).toBe(200);
  await eventually(async () => (await db.sql`SELECT count(*)::int AS n FROM pgtrickle.hj_inbox`)[0]!.n === 2, 20_000, "two rows");
  const rows = await db.sql`SELECT event_id, payload FROM pgtrickle.hj_inbox ORDER BY event_id`;
  expect(rows.map((r) => [r.event_id, r.payload])).toEqual([
    ["good", { ok: 1 }],
    ["text", "{not json"],
  ]);
}, 60_000);
