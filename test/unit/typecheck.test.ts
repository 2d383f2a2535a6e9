import { expect, test } from "bun:test";

/** Bun runs TypeScript without checking it: the compiler's verdict is a test like any other. */
test("the whole project type-checks (tsc --noEmit, strict)", () => {
  const root = new URL("../..", import.meta.url).pathname;
  const tsc = Bun.spawnSync([`${root}node_modules/.bin/tsc`, "--noEmit", "-p", root], { stdout: "pipe", stderr: "pipe" });
  const output = tsc.stdout.toString() + tsc.stderr.toString();
  expect(output).toBe("");
  expect(tsc.exitCode).toBe(0);
}, 120_000);
