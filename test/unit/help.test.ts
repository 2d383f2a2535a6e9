/** Help with examples for every command, and shell completion written from the same command tree. */
import { expect, test } from "bun:test";
import { relayOnce } from "../helpers/relay.ts";

const PATHS = [
  "", "run", "drain", "status", "check", "catalog", "catalog install", "catalog status",
  "pipeline", "pipeline list", "pipeline show", "pipeline set", "pipeline enable", "pipeline disable", "pipeline delete",
  "dead-letters", "dead-letters list", "dead-letters show", "dead-letters replay", "dead-letters purge",
  "tail", "demo", "completion", "help", "version",
];

test("every command's help: plain, within 80 columns when piped, with examples; the top level lists the exit codes", async () => {
  const helps = await Promise.all(PATHS.map((p) => relayOnce(["help", ...p.split(" ").filter(Boolean)])));
  for (const [i, h] of helps.entries()) {
    const where = PATHS[i] || "(top)";
    expect({ where, exit: h.exitCode }).toEqual({ where, exit: 0 });
    expect({ where, examples: h.stdout.includes("\nExamples:\n") }).toEqual({ where, examples: true });
    expect({ where, usage: h.stdout.includes(`Usage: pgtrickle-relay ${PATHS[i]}`.trimEnd()) }).toEqual({ where, usage: true });
    expect(h.stdout).not.toContain("\u001b[");
    // Example command lines are kept whole (they are meant to be copied).
    const examples = h.stdout.slice(h.stdout.indexOf("\nExamples:\n"));
    const long = h.stdout.replace(examples, "").split("\n").filter((l) => l.length > 80);
    expect({ where, long }).toEqual({ where, long: [] });
  }
  expect(helps[0]!.stdout).toContain("Exit codes:");
  expect(helps[0]!.stdout).toContain("pipeline");
  expect((await relayOnce(["-V"])).stdout).toMatch(/^pgtrickle-relay \d+\.\d+\.\d+ /);
}, 60_000);

test("bash completion completes commands, subcommands and flags", async () => {
  const script = (await relayOnce(["completion", "bash"])).stdout;
  const complete = (words: string[]) => {
    const line = `${script}\nCOMP_WORDS=(${words.map((w) => `'${w}'`).join(" ")}); COMP_CWORD=${words.length - 1}; _pgtrickle_relay; echo "\${COMPREPLY[@]}"`;
    return Bun.spawnSync(["bash", "-c", line]).stdout.toString().trim();
  };
  expect(complete(["pgtrickle-relay", "dead"])).toBe("dead-letters");
  expect(complete(["pgtrickle-relay", "dead-letters", "re"])).toBe("replay");
  expect(complete(["pgtrickle-relay", "status", "--wi"])).toBe("--wide");
  expect((await relayOnce(["completion", "tcsh"])).exitCode).toBe(2);
}, 60_000);

test("zsh completion offers each level's subcommands and flags (zsh, from scripts/dev-packages)", async () => {
  const script = (await relayOnce(["completion", "zsh"])).stdout;
  // Outside the completion system compadd is not loaded: a stand-in prints what would be offered
  // (zsh itself then keeps those matching the word under the cursor).
  const offered = (words: string[]) => {
    const line = `compadd() { shift; print -l -- "$@"; }; words=(${words.map((w) => `'${w}'`).join(" ")}); CURRENT=${words.length}\n${script}`;
    const r = Bun.spawnSync(["zsh", "-c", line]);
    expect(r.stderr.toString()).toBe("");
    return r.stdout.toString().trim().split("\n");
  };
  expect(offered(["pgtrickle-relay", "dead"])).toContain("dead-letters");
  expect(offered(["pgtrickle-relay", "dead-letters", "re"])).toEqual(["list", "show", "replay", "purge", "--help"]);
  expect(offered(["pgtrickle-relay", "catalog", "install", "--p"])).toContain("--postgres-url");
  expect(offered(["pgtrickle-relay", "drain", "--"])).toContain("--allow-dead-letters");
}, 60_000);

test("fish completion completes commands, subcommands and flags (fish, from scripts/dev-packages)", async () => {
  const script = (await relayOnce(["completion", "fish"])).stdout;
  const complete = (line: string) => {
    const r = Bun.spawnSync(["fish", "--no-config", "-c", `${script}\ncomplete -C ${JSON.stringify(line)}`]);
    expect(r.stderr.toString()).toBe("");
    return r.stdout.toString().trim().split("\n").map((l) => l.split("\t")[0]);
  };
  expect(complete("pgtrickle-relay dead")).toEqual(["dead-letters"]);
  expect(complete("pgtrickle-relay dead-letters re")).toEqual(["replay"]);
  expect(complete("pgtrickle-relay status --wi")).toEqual(["--wide"]);
}, 60_000);
