import { expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { generate } from "../../scripts/docs.ts";

test("docs/OPTIONS.md matches the backends' schemas (regenerate with bun scripts/docs.ts)", async () => {
  const committed = readFileSync(new URL("../../docs/OPTIONS.md", import.meta.url), "utf8");
  expect(committed).toBe(await generate());
});

test("every backend option has a description", async () => {
  const undocumented = (await generate())
    .split("\n")
    .filter((l) => l.startsWith("| `") && /\|\s*\|$/.test(l));
  expect(undocumented).toEqual([]);
});
