/**
 * The stand-in (test/fixtures/pg_trickle.sql) against the real extension, 0.45.0 and 0.39.0:
 * every function it defines in schema pgtrickle has the real arguments, defaults and result,
 * and every column of its tables the real type, nullability and default — apart from the
 * differences docs/pg_trickle.md lists, which are spelled out here so a new one fails.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import type { Sql } from "../../src/db.ts";
import { enableOutbox } from "../fixtures/outbox.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { pgTrickleDatabase, PGTRICKLE_VERSIONS, realStreamTable } from "../helpers/pgtrickle.ts";

interface Fn {
  proname: string;
  args: string;
  result: string;
  strict: boolean;
}
interface Column {
  relname: string;
  attname: string;
  type: string;
  notnull: boolean;
  def: string | null;
}

/** Functions and table/view columns of schema pgtrickle, with an outbox and an inbox made. */
async function shape(sql: Sql): Promise<{ fns: Fn[]; columns: Column[] }> {
  const fns = await sql<Fn[]>`
    SELECT p.proname, pg_get_function_arguments(p.oid) AS args, pg_get_function_result(p.oid) AS result, p.proisstrict AS strict
      FROM pg_proc p WHERE p.pronamespace = 'pgtrickle'::regnamespace`;
  const columns = await sql<Column[]>`
    SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull AS notnull, pg_get_expr(d.adbin, d.adrelid) AS def
      FROM pg_class c
      JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
      LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
     WHERE c.relnamespace = 'pgtrickle'::regnamespace AND c.relkind IN ('r', 'v', 'p')`;
  return { fns: [...fns], columns: [...columns] };
}

/** The functions the extension marks STRICT and the stand-in does not (docs/pg_trickle.md). */
const STRICT_ONLY_IN_REAL = [
  "create_consumer_group",
  "create_inbox",
  "disable_outbox",
  "drop_consumer_group",
  "drop_inbox",
  "enable_inbox_tracking",
  "enable_outbox",
  "extend_lease",
  "poll_outbox",
];

let standin: TestDatabase;
let standinShape: Awaited<ReturnType<typeof shape>>;

beforeAll(async () => {
  standin = await testDatabase("standin_shape", { catalog: false });
  await standin.sql`CREATE TABLE public.shaped (id int PRIMARY KEY, amount int)`;
  await enableOutbox(standin.sql, "public.shaped");
  await standin.sql`SELECT pgtrickle.create_inbox('shaped_box')`;
  standinShape = await shape(standin.sql);
});
afterAll(async () => {
  await standin?.drop();
});

describe.each(PGTRICKLE_VERSIONS)("pg_trickle %s", (version) => {
  test("the stand-in's functions and columns are the real ones, apart from the documented differences", async () => {
    const real = await pgTrickleDatabase("standin_real", version, { catalog: false });
    try {
      await realStreamTable(real.sql, "shaped");
      await real.sql`SELECT pgtrickle.create_inbox('shaped_box')`;
      const r = await shape(real.sql);

      const signature = (f: Fn) => `${f.proname}(${f.args}) → ${f.result}`;
      const realSignatures = new Set(r.fns.map(signature));
      expect(standinShape.fns.map(signature).filter((s) => !realSignatures.has(s))).toEqual([]);
      const strictDiffers = standinShape.fns
        .filter((f) => r.fns.find((x) => signature(x) === signature(f))!.strict !== f.strict)
        .map((f) => f.proname)
        .sort();
      expect(strictDiffers).toEqual(STRICT_ONLY_IN_REAL);

      // pgt_stream_tables is cut down in the stand-in; the inbox companions are views there.
      const compared = (c: Column) => c.relname !== "pgt_stream_tables" && !c.attname.startsWith("__pgt_");
      const key = (c: Column) => `${c.relname}.${c.attname} ${c.type}${c.notnull ? " not null" : ""}${c.def ? ` default ${c.def}` : ""}`;
      const standinColumns = standinShape.columns.filter(compared).map(key).sort();
      const realColumns = r.columns.filter((c) => compared(c) && standinShape.columns.some((s) => s.relname === c.relname)).map(key).sort();
      expect(standinColumns).toEqual(realColumns);
    } finally {
      await real.drop();
    }
  });
});
