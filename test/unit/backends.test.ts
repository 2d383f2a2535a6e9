import { describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { allSinks, allSources, SINKS, SOURCES } from "../../src/backends/index.ts";

const root = new URL("../..", import.meta.url).pathname;
const CLIENT_LIBRARIES = ["kafkajs", "nats", "amqplib", "ioredis", "@aws-sdk/client-sqs"];

/** The npm packages a fresh `bun …args` process imported (test/fixtures/loaded-packages.ts). */
function packagesLoadedBy(args: string[]): string[] {
  const file = join(mkdtempSync(join(tmpdir(), "relay-loaded-")), "packages");
  const proc = Bun.spawnSync([process.execPath, "--preload", join(root, "test/fixtures/loaded-packages.ts"), ...args], {
    cwd: root,
    env: { ...process.env, LOADED_PACKAGES_FILE: file },
    stdout: "pipe",
    stderr: "pipe",
  });
  expect(proc.stderr.toString()).toBe("");
  expect(proc.exitCode).toBe(0);
  return readFileSync(file, "utf8").split("\n");
}

describe("backend registry: client libraries load only when used", () => {
  test("each entry names its module's type and aliases", async () => {
    const names = (specs: { type: string; aliases?: string[] }[]) => specs.map((s) => ({ type: s.type, aliases: s.aliases ?? [] }));
    expect(names(await allSinks())).toEqual(names(SINKS));
    expect(names(await allSources())).toEqual(names(SOURCES));
  });

  test("--version imports no client library, nor the database driver", () => {
    const loaded = packagesLoadedBy(["src/main.ts", "--version"]);
    expect(loaded).toContain("citty");
    for (const lib of [...CLIENT_LIBRARIES, "postgres"]) expect(loaded).not.toContain(lib);
  });

  test("the drain command with an outbox → stdout pipeline imports no client library", () => {
    const script = `await import("./src/commands/run.ts"); await (await import("./src/backends/index.ts")).loadBackends([{ sourceType: "outbox", sinkType: "stdout" }]);`;
    const loaded = packagesLoadedBy(["-e", script]);
    expect(loaded).toContain("postgres");
    for (const lib of CLIENT_LIBRARIES) expect(loaded).not.toContain(lib);
  });

  test("the drain command's modules do not import valibot: the coordinator, its pipelines and the metrics load when the relay starts, which a drain with nothing to do never does", () => {
    const loaded = packagesLoadedBy(["-e", `await import("./src/commands/run.ts");`]);
    expect(loaded).toContain("postgres");
    expect(loaded).not.toContain("valibot");
  });

  test("a kafka pipeline imports kafkajs and nothing else of the kind (the check above can see a library)", () => {
    const loaded = packagesLoadedBy(["-e", `await (await import("./src/backends/index.ts")).loadBackends([{ sourceType: "kafka", sinkType: "kafka" }]);`]);
    expect(CLIENT_LIBRARIES.filter((lib) => loaded.includes(lib))).toEqual(["kafkajs"]);
  });
});
