/**
 * The file/stdin source's lag() against PostgreSQL (where a file's committed position lives):
 * records of the unread tail, counted the way batches() cuts them, or estimated past 1 MiB.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { appendFileSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createConsola } from "consola";
import * as v from "valibot";
import fileSource from "../../src/backends/file/source.ts";
import type { Source } from "../../src/backends/types.ts";
import { backendContext } from "../helpers/backend.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { requireServer } from "../helpers/servers.ts";

let db: TestDatabase;
let dir: string;
const sources: Source[] = [];

beforeAll(async () => {
  await requireServer("postgres");
  db = await testDatabase("stdin_source");
  dir = mkdtempSync(join(tmpdir(), "relay-stdin-source-"));
});

afterAll(async () => {
  for (const s of sources) await s.close();
  rmSync(dir, { recursive: true, force: true });
  await db?.drop();
});

function sourceFor(options: Record<string, unknown>, name: string): Source {
  const cfg = v.parse(fileSource.config, { type: "file", ...options });
  const ctx = backendContext(name, { direction: "reverse", log: createConsola({ level: 0 }), sql: db.sql, postgresUrl: db.url, drain: true });
  const source = fileSource.create(cfg, ctx);
  sources.push(source);
  return source;
}

async function drainDirect(source: Source): Promise<number> {
  let n = 0;
  for await (const b of source.batches(new AbortController().signal)) {
    n += b.messages.length + b.deadLetters.length;
    await b.ack();
  }
  return n;
}

describe("file source lag()", () => {
  test("records of the unread tail (blank lines not counted), read without moving the position; 0 once drained", async () => {
    const path = join(dir, "lag.jsonl");
    writeFileSync(path, Array.from({ length: 25 }, (_, i) => JSON.stringify({ i }) + "\n").join("") + "\n\n");
    const src = sourceFor({ input: path, batch_size: 10 }, "file_lag");
    expect(await src.lag!()).toBeNull(); // not started: no position known yet
    await src.start();
    expect(await src.lag!()).toEqual({ rows: 25, seconds: 0 });
    expect(await src.lag!()).toEqual({ rows: 25, seconds: 0 });
    const it = src.batches(new AbortController().signal)[Symbol.asyncIterator]();
    const first = (await it.next()).value!;
    expect(first.messages).toHaveLength(10);
    expect((await src.lag!())!.rows).toBe(25); // counts until the position is committed
    await first.ack();
    expect((await src.lag!())!.rows).toBe(15);
    for (let r = await it.next(); !r.done; r = await it.next()) await r.value.ack();
    expect(await src.lag!()).toEqual({ rows: 0, seconds: 0 });
    // A last line without its newline is a record too (without follow).
    appendFileSync(path, '{"more":1}\n{"more":2}');
    expect(await src.lag!()).toEqual({ rows: 2, seconds: 0 });
    expect(await drainDirect(src)).toBe(2);
    expect(await src.lag!()).toEqual({ rows: 0, seconds: 0 });
  });

  test("json_pretty values spanning lines count once; with follow a half-written value is not counted", async () => {
    const path = join(dir, "pretty.json");
    writeFileSync(path, '{\n  "a": 1\n}\n[\n  1,\n  2\n]\n{\n  "half": ');
    const src = sourceFor({ input: path, format: "json_pretty", follow: true }, "file_lag_pretty");
    await src.start();
    expect(await src.lag!()).toEqual({ rows: 2, seconds: 0 });
  });

  test("a tail over 1 MiB is estimated from its first MiB; standard input has no lag", async () => {
    const path = join(dir, "big.jsonl");
    const line = JSON.stringify({ pad: "x".repeat(90) }) + "\n"; // 101 bytes
    writeFileSync(path, line.repeat(30_000)); // ≈ 2.9 MiB
    const src = sourceFor({ input: path }, "file_lag_big");
    await src.start();
    const { rows } = (await src.lag!())!;
    expect(Math.abs(rows - 30_000)).toBeLessThan(300);
    const stdin = sourceFor({}, "stdin_lag");
    await stdin.start();
    expect(await stdin.lag!()).toBeNull();
  });
});
