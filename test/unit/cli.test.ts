import { describe, expect, test } from "bun:test";
import { defineCommand } from "citty";
import { parseCommandLine, renderHelp, suggest, UsageError } from "../../src/cli.ts";

const leaf = defineCommand({
  meta: { name: "drain", description: "Drain." },
  args: { timeout: { type: "string", description: "seconds" }, json: { type: "boolean", description: "json" } },
});
const root = defineCommand({
  meta: { name: "x", description: "root" },
  subCommands: { drain: leaf, catalog: defineCommand({ meta: { description: "c" }, subCommands: { install: leaf } }) },
});

const usage = (argv: string[]) => {
  try {
    parseCommandLine(root, argv);
  } catch (err) {
    if (err instanceof UsageError) return err.message;
    throw err;
  }
  throw new Error(`accepted: ${argv.join(" ")}`);
};

describe("strict command line", () => {
  test("flags and values in every form", () => {
    expect(parseCommandLine(root, ["drain", "--timeout", "5", "--json"]).args).toMatchObject({ timeout: "5", json: true });
    expect(parseCommandLine(root, ["drain", "--timeout=7"]).args.timeout).toBe("7");
    expect(parseCommandLine(root, ["catalog", "install", "-h"]).help).toBe(true);
    expect(parseCommandLine(root, []).help).toBe(true);
  });

  test("anything not understood is refused with a suggestion, before anything runs", () => {
    expect(usage(["drain", "--timout", "5"])).toContain("unknown flag '--timout' for 'drain'; did you mean --timeout?");
    expect(usage(["drain", "--dry-run"])).toContain("unknown flag '--dry-run'");
    expect(usage(["drian"])).toContain("unknown command 'drian'; did you mean drain?");
    expect(usage(["toString"])).toContain("unknown command 'toString'");
    expect(usage(["drain", "--constructor"])).toContain("unknown flag '--constructor'");
    expect(usage(["catalog", "instal"])).toContain("did you mean install?");
    expect(usage(["catalog"])).toContain("needs a subcommand: install");
    expect(usage(["drain", "--timeout"])).toBe("--timeout needs a value");
    expect(usage(["drain", "--json=yes"])).toBe("--json takes no value");
    expect(usage(["drain", "extra"])).toContain("unexpected argument 'extra'");
    expect(usage(["drain", "--timeout", "1", "--timeout", "2"])).toBe("--timeout given twice");
  });

  test("suggestions only for near misses", () => {
    expect(suggest("jsno", ["json", "pipeline"])).toBe("json");
    expect(suggest("frobnicate", ["json", "pipeline"])).toBeUndefined();
  });

  test("help is plain text: no escape codes, lines within 80 columns when piped, the program name in the usage line", () => {
    const text = renderHelp(leaf, ["catalog", "install"], { examples: ["x catalog install"] });
    expect(text).not.toContain("\u001b[");
    expect(text).toContain("Usage: pgtrickle-relay catalog install [flags]");
    expect(text).toContain("Examples:");
    for (const line of text.split("\n")) expect(line.length).toBeLessThanOrEqual(80);
  });
});
