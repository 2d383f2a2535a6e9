/** The stdout/file sink (docs/interface.md §5.3): envelopes as jsonl, indented JSON or CSV. */
import { constants } from "node:fs";
import { access, open, rename, stat, type FileHandle } from "node:fs/promises";
import { dirname } from "node:path";
import { configError, errorMessage, transientError } from "../../errors.ts";
import { toEnvelope, type Message } from "../../message.ts";
import { sinkSpec, type BackendContext, type Sink } from "../types.ts";
import { StdoutSinkConfig } from "./config.ts";

/** Stable CSV columns: the envelope's keys, the row payload as JSON. */
const CSV_COLUMNS = ["dedup_key", "subject", "op", "is_full_refresh", "outbox_id", "refresh_id", "payload"] as const;

function csvField(value: unknown): string {
  const text = value === null || value === undefined ? "" : typeof value === "object" ? JSON.stringify(value) : String(value);
  return /[",\r\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

export function formatMessages(format: StdoutSinkConfig["format"], messages: Message[]): string {
  if (format === "csv") {
    return messages.map((m) => {
      const e = toEnvelope(m) as unknown as Record<string, unknown>;
      return CSV_COLUMNS.map((c) => csvField(e[c])).join(",") + "\n";
    }).join("");
  }
  // One string grown in a loop: the per-message array and join of a map cost more (bench/RESULTS.md, "Claim-check").
  const indent = format === "json_pretty" ? 2 : undefined;
  let text = "";
  for (const m of messages) text += JSON.stringify(toEnvelope(m), null, indent) + "\n";
  return text;
}

const CSV_HEADER = CSV_COLUMNS.join(",") + "\n";

/** Writes to standard output; resolves once the data has been handed to the OS. */
class StdoutSink implements Sink {
  readonly describe: string;
  private wroteHeader = false;
  constructor(private readonly cfg: StdoutSinkConfig) {
    this.describe = `stdout (${cfg.format})`;
  }
  async start(): Promise<void> {}
  async write(messages: Message[]) {
    let text = formatMessages(this.cfg.format, messages);
    if (this.cfg.format === "csv" && !this.wroteHeader && messages.length > 0) {
      text = CSV_HEADER + text;
      this.wroteHeader = true;
    }
    if (text) {
      await new Promise<void>((resolve, reject) =>
        process.stdout.write(text, (err) => (err ? reject(transientError(`stdout write failed: ${err.message}`)) : resolve())),
      );
    }
    return [];
  }
  async close(): Promise<void> {}
}

/** Appends to a file, fsyncs before acknowledging, rotates by size. */
class FileSink implements Sink {
  readonly describe: string;
  private file: FileHandle | null = null;
  private size = 0;
  constructor(
    private readonly cfg: StdoutSinkConfig,
    private readonly path: string,
    private readonly check?: BackendContext["check"],
  ) {
    this.describe = `file ${path} (${cfg.format})`;
  }

  async start(): Promise<void> {
    // `check` creates no file: a missing one only needs a directory it may write to.
    if (this.check && !(await exists(this.path))) {
      await access(dirname(this.path), constants.W_OK).catch((err) => {
        throw configError(`file sink: cannot open ${this.path} for append: ${(err as { code?: string }).code ?? errorMessage(err)}`);
      });
      return this.check.wouldCreate(`file ${this.path}`);
    }
    await this.openFile();
  }

  private async openFile(): Promise<FileHandle> {
    try {
      this.file = await open(this.path, "a");
    } catch (err) {
      throw configError(`file sink: cannot open ${this.path} for append: ${(err as { code?: string }).code ?? errorMessage(err)}`);
    }
    this.size = (await this.file.stat()).size;
    return this.file;
  }

  async write(messages: Message[]) {
    if (messages.length === 0) return [];
    if (this.cfg.rotate_bytes && this.size >= this.cfg.rotate_bytes) await this.rotate();
    const file = this.file ?? (await this.openFile());
    let text = formatMessages(this.cfg.format, messages);
    if (this.cfg.format === "csv" && this.size === 0) text = CSV_HEADER + text;
    try {
      // The string as it is: copying it into a Buffer first cost a copy per batch.
      await file.write(text);
      if (this.cfg.fsync) await file.sync();
      this.size += Buffer.byteLength(text);
    } catch (err) {
      // The file may hold part of the batch now; the replay repeats it with the same keys.
      await this.close();
      throw transientError(`file sink: write to ${this.path} failed: ${(err as { code?: string }).code ?? errorMessage(err)}`);
    }
    return [];
  }

  private async rotate(): Promise<void> {
    await this.close();
    const stamp = new Date().toISOString().replace(/[-:]/g, "").replace(/\..*$/, "");
    let target = `${this.path}.${stamp}`;
    for (let n = 1; await exists(target); n++) target = `${this.path}.${stamp}-${n}`;
    await rename(this.path, target);
    await this.openFile();
  }

  async close(): Promise<void> {
    const f = this.file;
    this.file = null;
    await f?.close().catch(() => {});
  }
}

/** Whether anything exists at `path` (stat succeeds). */
async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

export default sinkSpec({
  type: "stdout",
  // `stdin` as a sink name is kept from when one entry held both sides.
  aliases: ["file", "stdin"],
  config: StdoutSinkConfig,
  create(cfg, ctx) {
    const path = cfg.output ?? cfg.path;
    return path && path !== "-" ? new FileSink(cfg, path, ctx.check) : new StdoutSink(cfg);
  },
});
