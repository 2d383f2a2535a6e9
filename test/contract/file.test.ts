/**
 * Files under the shared contract (suite.ts): the file sink (JSON Lines) and the file source
 * following a file. A file keeps every copy a replay appends, each under its original dedup key;
 * there is no server to lose, no password, and no row a file refuses (only the decode poison
 * every forward run gets). Standard input: reverse-inbox.test.ts.
 */
import { appendFileSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { readJsonLines } from "../helpers/messages.ts";
import { POISONS } from "../helpers/poison.ts";
import { sinkContract, sourceContract, type Arrived } from "./suite.ts";

const tempDir = () => mkdtempSync(join(tmpdir(), "relay-contract-"));

sinkContract({
  system: "file",
  servers: [],
  serverPort: null,
  dedups: false,
  ordered: true,
  hasSecret: false,
  async target() {
    const dir = tempDir();
    const output = join(dir, "out.jsonl");
    return {
      config: { type: "file", output },
      arrived: async () => readJsonLines<{ dedup_key: string; payload: Arrived["payload"] }>(output).map((l) => ({ key: l.dedup_key, payload: l.payload })),
      async cleanup() {
        rmSync(dir, { recursive: true, force: true });
      },
    };
  },
});

sourceContract({
  system: "file",
  servers: [],
  serverPort: null,
  hasSecret: false,
  // The file source refuses the deep line as it parses it: a decode dead letter, raw line kept.
  poisonKinds: { [POISONS[0]!.label]: "decode" },
  async target() {
    const dir = tempDir();
    const path = join(dir, "in.jsonl");
    writeFileSync(path, "");
    return {
      config: { type: "file", path, follow: true },
      async publish(events) {
        appendFileSync(path, events.map((e) => e.body + "\n").join(""));
      },
      async cleanup() {
        rmSync(dir, { recursive: true, force: true });
      },
    };
  },
});
