import type { Subprocess } from "bun";

const MAIN = new URL("../../src/main.ts", import.meta.url).pathname;
const BUN = process.execPath;

/**
 * The command that runs the relay: the compiled binary when PGTRICKLE_RELAY_BIN is set (so the
 * same tests prove the binary), otherwise the sources under Bun.
 */
export function relayCommand(args: string[]): string[] {
  const bin = process.env.PGTRICKLE_RELAY_BIN;
  return bin ? [bin, ...args] : [BUN, MAIN, ...args];
}

export interface OneShot {
  exitCode: number;
  stdout: string;
  stderr: string;
}

/** Runs a one-shot relay command (drain, catalog …) to completion. */
export async function relayOnce(args: string[], env: Record<string, string> = {}, timeoutMs = 60_000): Promise<OneShot> {
  const proc = Bun.spawn(relayCommand(args), { stdout: "pipe", stderr: "pipe", env: { ...process.env, ...env } });
  const timer = setTimeout(() => proc.kill("SIGKILL"), timeoutMs);
  const [stdout, stderr, exitCode] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  clearTimeout(timer);
  return { exitCode, stdout, stderr };
}

/** A long-running `pgtrickle-relay run`, with its stderr collected for assertions. */
export class RunningRelay {
  readonly proc: Subprocess<"ignore", "pipe", "pipe">;
  stderr = "";
  stdout = "";

  constructor(args: string[], env: Record<string, string> = {}) {
    this.proc = Bun.spawn(relayCommand(["run", ...args]), { stdout: "pipe", stderr: "pipe", stdin: "ignore", env: { ...process.env, ...env } });
    void this.collect(this.proc.stderr, (t) => (this.stderr += t));
    void this.collect(this.proc.stdout, (t) => (this.stdout += t));
  }

  private async collect(stream: ReadableStream<Uint8Array>, add: (t: string) => void) {
    const decoder = new TextDecoder();
    for await (const chunk of stream) add(decoder.decode(chunk, { stream: true }));
  }

  /** Waits until stderr matches, or fails with what the relay said. */
  async waitForLog(pattern: RegExp, timeoutMs = 20_000): Promise<void> {
    const until = Date.now() + timeoutMs;
    while (!pattern.test(this.stderr)) {
      if (Date.now() > until) throw new Error(`relay never logged ${pattern}; stderr so far:\n${this.stderr}`);
      if (this.proc.exitCode !== null) throw new Error(`relay exited (${this.proc.exitCode}) before logging ${pattern}:\n${this.stderr}`);
      await Bun.sleep(25);
    }
  }

  async stop(signal: "SIGTERM" | "SIGINT" | "SIGKILL" = "SIGTERM"): Promise<number> {
    this.proc.kill(signal);
    return this.proc.exited;
  }
}

/** Polls `check` until it returns true. */
export async function eventually(check: () => Promise<boolean> | boolean, timeoutMs = 20_000, what = "condition"): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await Bun.sleep(25);
  }
}
