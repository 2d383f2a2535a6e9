import { describe, expect, test } from "bun:test";
import { cleanRow, planFor, safeOutboxId, type HeaderRow } from "../../src/backends/outbox/decode.ts";
import { renderTemplate, toEnvelope, type Message } from "../../src/message.ts";
import { errorKind } from "../../src/errors.ts";

const header = (payload: unknown, extra: Partial<HeaderRow> = {}): HeaderRow => ({
  id: "42",
  refresh_id: null,
  created_at: "2026-01-01T00:00:00Z",
  inserted_count: "2",
  deleted_count: "1",
  is_claim_check: false,
  payload,
  ...extra,
});
const opts = { summaryMessages: true, keepInternalColumns: false };

describe("planFor (docs/interface.md §4.3)", () => {
  test("v1 inline keeps arrays and the full_refresh flag", () => {
    expect(planFor(header({ v: 1, inserted: [{ a: 1 }], deleted: [], full_refresh: true }), "t", opts)).toEqual({
      kind: "rows", fullRefresh: true, refreshId: null, inserted: [{ a: 1 }], deleted: [],
    });
  });
  test("claim-check from the column or the payload flag; NULL payload claim-check is a snapshot", () => {
    expect(planFor(header(null, { is_claim_check: true }), "t", opts)).toMatchObject({ kind: "claim_check", fullRefresh: true });
    expect(planFor(header({ v: 1, claim_check: true }), "t", opts)).toMatchObject({ kind: "claim_check", fullRefresh: false });
    expect(planFor(header({ v: 1, claim_check: true, full_refresh: true }), "t", opts)).toMatchObject({ kind: "claim_check", fullRefresh: true });
  });
  test("bare array is a full refresh of inserts", () => {
    expect(planFor(header([{ a: 1 }]), "t", opts)).toMatchObject({ kind: "rows", fullRefresh: true, inserted: [{ a: 1 }], deleted: [] });
  });
  test("NULL payload, pg_tide counts and an emptied table's snapshot become one summary, or nothing when summaries are off", () => {
    expect(planFor(header(null), "t", opts)).toMatchObject({ kind: "summary", fullRefresh: false, payload: { outbox_id: 42, inserted_count: 2, deleted_count: 1, stream_table: "t" } });
    expect(planFor(header({ v: 1, inserted: 3, deleted: 0, source: "s.t" }), "t", opts)).toMatchObject({ kind: "summary", fullRefresh: false });
    expect(planFor(header([]), "t", opts)).toMatchObject({ kind: "summary", fullRefresh: true });
    expect(planFor(header([]), "t", { ...opts, summaryMessages: false })).toEqual({ kind: "none" });
    expect(planFor(header(null), "t", { ...opts, summaryMessages: false })).toEqual({ kind: "none" });
  });
  test("refresh id: payload refresh_id, then legacy pgt_id, then the column", () => {
    expect(planFor(header({ v: 1, refresh_id: "r1", pgt_id: "p1" }), "t", opts)).toMatchObject({ refreshId: "r1" });
    expect(planFor(header({ v: 1, pgt_id: "p1" }), "t", opts)).toMatchObject({ refreshId: "p1" });
    expect(planFor(header({ v: 1 }, { refresh_id: "c1" }), "t", opts)).toMatchObject({ refreshId: "c1" });
  });
  test("unknown versions and types are decode errors", () => {
    for (const bad of [{ v: 2 }, { inserted: [] }, "text", 5, { v: 1, inserted: "x" }]) {
      let caught: unknown;
      try {
        planFor(header(bad), "t", opts);
      } catch (err) {
        caught = err;
      }
      expect(errorKind(caught)).toBe("decode");
    }
  });
  test("ids beyond 2^53-1 are refused rather than rounded", () => {
    expect(safeOutboxId("9007199254740991")).toBe(9007199254740991);
    expect(() => safeOutboxId("9007199254740993")).toThrow(/2\^53/);
  });
  test("internal __pgt_ columns are stripped unless kept", () => {
    expect(cleanRow({ a: 1, __pgt_row_id: 2, __pgt_count: 1 }, false)).toEqual({ a: 1 });
    expect(cleanRow({ a: 1, __pgt_row_id: 2 }, true)).toEqual({ a: 1, __pgt_row_id: 2 });
  });
});

describe("templates and envelope (docs/interface.md §6)", () => {
  const m: Message = {
    dedup_key: "outbox_orders:7:0", subject: "", payload: { region: "eu", id: 3, nested: { a: 1 } }, op: "insert",
    is_full_refresh: false, outbox_id: 7, refresh_id: null,
    context: { pipeline: "p", stream_table: "orders", schema: "sales", outbox: "outbox_orders" },
  };
  test("fixed variables, row fields, null refresh id as empty, unknown placeholders kept", () => {
    expect(renderTemplate("pgtrickle.{stream_table}.{op}", m)).toBe("pgtrickle.orders.insert");
    expect(renderTemplate("{schema}/{outbox}/{pipeline}/{outbox_id}/{refresh_id}", m)).toBe("sales/outbox_orders/p/7/");
    expect(renderTemplate("{region}.{id}.{nested}.{missing}", m)).toBe('eu.3.{"a":1}.{missing}');
  });
  test("row fields are the row's own: JavaScript built-ins stay as written, real fields of those names render", () => {
    const builtins = "{constructor}|{__proto__}|{toString}|{hasOwnProperty}|{valueOf}";
    expect(renderTemplate(builtins, m)).toBe(builtins);
    // JSON.parse makes `__proto__` an own field, as a decoded outbox row would have it.
    const row = JSON.parse('{"constructor":"c1","__proto__":"p1","toString":"t1"}');
    expect(renderTemplate("{constructor}.{__proto__}.{toString}", { ...m, payload: row })).toBe("c1.p1.t1");
  });
  test("envelope has exactly the contract's keys in order, without the context", () => {
    expect(Object.keys(toEnvelope(m))).toEqual(["dedup_key", "subject", "payload", "op", "is_full_refresh", "outbox_id", "refresh_id"]);
  });
});
