/**
 * The reverse stdin/file source (docs/interface.md §5.4, §6.5): a bad line is a dead letter of
 * its own, a file's position survives restarts, and keys are never random.
 */
import { open, stat, type FileHandle } from "node:fs/promises";
import { resolve as resolvePath } from "node:path";
import { configError, decodeError, errorMessage } from "../../errors.ts";
import { bodyDedupKey, inboundMessage, parseJson, readAheadBatchSize, sha256Hex, utf8OrNull } from "../../inbound.ts";
import type { Message } from "../../message.ts";
import { Sleeper } from "../../sleep.ts";
import { loadSourcePosition, saveSourcePosition } from "../../source-positions.ts";
import { sourceSpec, type BackendContext, type Batch, type DeadLetter, type Lag, type Source } from "../types.ts";
import { StdinSourceConfig } from "./config.ts";
import { RecordScanner, type RawRecord } from "./scanner.ts";

/** Where a file source stands: stored as JSON text in pgtrickle.relay_source_positions. */
interface FilePosition {
  path: string;
  offset: number;
  line: number;
  /** Inode of the file read; a different one means the file was replaced. */
  ino: string | null;
  /**
   * How often the file under this path was replaced or truncated. Part of the synthesized keys
   * (`file:<path>:g<n>:<line>`), so line 3 of a new file never takes the key of line 3 of the
   * old one (ON CONFLICT would silently drop it). 0 for the first file: plain `file:<path>:<line>`.
   */
  generation?: number;
  /**
   * SHA-256 of the file's first `headLength` bytes when the position was committed: a file
   * replaced by one of the same size that reuses the inode (common after unlink) is still told
   * apart by its content.
   */
  head?: string;
  headLength?: number;
}

/** Bytes of a file's beginning that identify it (as log shippers' fingerprints do). */
const HEAD_BYTES = 1024;

async function headHash(path: string, length: number): Promise<string | null> {
  const f = await open(path, "r").catch(() => null);
  if (!f) return null;
  try {
    const buf = Buffer.alloc(length);
    const { bytesRead } = await f.read(buf, 0, length, 0);
    return bytesRead === length ? sha256Hex(buf) : null;
  } finally {
    await f.close();
  }
}

/** lag() reads at most this much of a file's unread tail; past it, the record count is an estimate. */
const LAG_SCAN_BYTES = 1024 * 1024;

/**
 * Reads JSON values from standard input or a file into inbox messages. Dedup key: the body's
 * `dedup_key` (or `pgt_dedup_key`) verbatim, else `file:<absolute path>:<line>` (with `g<n>:` before
 * the line once the file was replaced or truncated n times) or `stdin:` + SHA-256 of the line
 * (docs/interface.md §6.5). A value that is not JSON (or not UTF-8) becomes a `decode` dead
 * letter of its batch, so the lines around it are delivered and the position moves past it.
 * A file's position (byte offset past the last acknowledged value) is committed in the relay
 * catalog by ack(), after the inbox commit; a crash in between replays values whose keys the
 * inbox already holds, so nothing is duplicated.
 *
 * It reads ahead (docs/PIPELINE.md): the next batch is cut from where the last one handed out
 * ended, and each ack() commits its own batch's end. A new pass (after a failure) starts again at
 * the committed position. Standard input cannot be read again, so the batches a failed pass
 * hands back (release()) are kept and handed out first by the next pass.
 */
export class StdinSource implements Source {
  readonly describe: string;
  readonly readAhead = Number.POSITIVE_INFINITY;
  private readonly sourceType: "file" | "stdin";
  /** Absolute path, or null for standard input. */
  private readonly path: string | null;
  private readonly sleeper = new Sleeper();
  private committed: FilePosition | null = null;
  /** The head hash of the file being read (inode and generation in `key`), once it covers HEAD_BYTES. */
  private fullHead: { key: string; head: string } | null = null;
  private stdin: {
    reader: ReadableStreamDefaultReader<Uint8Array>;
    scanner: RecordScanner;
    pending: ReturnType<ReadableStreamDefaultReader<Uint8Array>["read"]> | null;
    eof: boolean;
    /** Records of batches handed back unwritten, oldest first: delivered again before anything new. */
    returned: RawRecord[][];
  } | null = null;
  /** Records per batch. */
  private readonly batchSize: number;
  private ended = false;

  constructor(
    private readonly cfg: StdinSourceConfig,
    private readonly ctx: BackendContext,
  ) {
    const input = cfg.input ?? cfg.path;
    this.path = input && input !== "-" ? resolvePath(input) : null;
    this.sourceType = this.path ? "file" : "stdin";
    this.describe = `${this.path ? `file ${this.path}` : "stdin"} (${cfg.format}${cfg.follow && this.path ? ", follow" : ""})`;
    this.batchSize = readAheadBatchSize(cfg.batch_size, ctx);
  }

  get exhausted(): boolean {
    return this.ended;
  }

  async start(): Promise<void> {
    if (!this.path) return;
    const stored = await loadSourcePosition(this.ctx.sql, this.ctx);
    const st = await stat(this.path).catch((err: { code?: string }) => {
      if (err.code === "ENOENT" && this.cfg.follow) return null;
      throw configError(`pipeline '${this.ctx.pipeline}': source.input ${this.path}: ${err.code === "ENOENT" ? "no such file" : (err.code ?? errorMessage(err))}`);
    });
    this.committed = await this.resumePosition(stored, st ? { size: st.size, ino: String(st.ino) } : null);
  }

  /** Where to start: the stored position when it still describes this file, else its beginning. */
  private async resumePosition(stored: string | null, file: { size: number; ino: string } | null): Promise<FilePosition> {
    const fresh: FilePosition = { path: this.path!, offset: 0, line: 1, ino: file?.ino ?? null, generation: 0 };
    if (!stored) return fresh;
    let p: Partial<FilePosition>;
    try {
      p = JSON.parse(stored);
    } catch {
      this.ctx.log.warn(`stored position ${JSON.stringify(stored)} is unreadable; reading ${this.path} from the beginning`);
      return fresh;
    }
    if (p.path !== this.path || typeof p.offset !== "number" || typeof p.line !== "number") {
      this.ctx.log.info(`input changed (was ${p.path ?? "?"}): reading ${this.path} from the beginning`);
      return fresh;
    }
    const generation = p.generation ?? 0;
    if (!file) return { path: this.path, offset: p.offset, line: p.line, ino: p.ino ?? null, generation };
    const next = { ...fresh, generation: generation + 1 };
    if (p.ino && p.ino !== file.ino) {
      this.ctx.log.warn(`${this.path} was replaced since the last run (new inode): reading it from the beginning`);
      return next;
    }
    if (file.size < p.offset) {
      this.ctx.log.warn(`${this.path} is shorter than the stored position (${file.size} < ${p.offset} bytes): it was truncated; reading it from the beginning`);
      return next;
    }
    if (p.head && p.headLength && (await headHash(this.path, p.headLength)) !== p.head) {
      this.ctx.log.warn(`${this.path} begins differently than when last read: it was replaced; reading it from the beginning`);
      return next;
    }
    return { path: this.path, offset: p.offset, line: p.line, ino: file.ino, generation };
  }

  /**
   * What of the file is not yet committed, in records: the unread tail (file size − committed
   * byte offset; the whole file when it was replaced or truncated since) is read and cut into
   * records the way batches() cuts them, when it is at most LAG_SCAN_BYTES. A longer tail is
   * estimated: the records of its first LAG_SCAN_BYTES scaled by the tail's length (at least 1).
   * With follow, a last value still waiting for its newline is not counted (it is not deliverable
   * yet). One stat and at most one bounded read; the position is neither moved nor stored.
   * Standard input has no size to compare with: null (unknown). Seconds: unknown, reported 0.
   */
  async lag(): Promise<Lag | null> {
    if (!this.path || !this.committed) return null;
    const st = await stat(this.path).catch(() => null);
    if (!st) return { rows: 0, seconds: 0 };
    const c = this.committed;
    const replaced = (c.ino !== null && c.ino !== String(st.ino) && c.offset > 0) || st.size < c.offset;
    const from = replaced ? 0 : c.offset;
    const tail = st.size - from;
    if (tail <= 0) return { rows: 0, seconds: 0 };
    const length = Math.min(tail, LAG_SCAN_BYTES);
    const buf = Buffer.alloc(length);
    const file = await open(this.path, "r");
    let read = 0;
    try {
      while (read < length) {
        const { bytesRead } = await file.read(buf, read, length - read, from + read);
        if (bytesRead === 0) break;
        read += bytesRead;
      }
    } finally {
      await file.close().catch(() => {});
    }
    const scanner = new RecordScanner(this.cfg.format, from, 1);
    scanner.push(buf.subarray(0, read));
    let records = 0;
    while (scanner.next()) records++;
    const whole = read >= tail;
    if (whole && !this.cfg.follow && scanner.finish()) records++;
    if (!whole) records = Math.max(1, Math.ceil((records * tail) / Math.max(1, read)));
    return { rows: records, seconds: 0 };
  }

  wake(): void {
    this.sleeper.wake();
  }

  async close(): Promise<void> {
    this.sleeper.wake();
    const reader = this.stdin?.reader;
    this.stdin = null;
    try {
      reader?.releaseLock();
    } catch {
      /* a read still pending: the process is ending anyway */
    }
  }

  batches(signal: AbortSignal): AsyncIterable<Batch> {
    signal.addEventListener("abort", () => this.sleeper.wake(), { once: true });
    return this.path ? this.fileBatches(signal) : this.stdinBatches(signal);
  }

  private async *fileBatches(signal: AbortSignal): AsyncIterable<Batch> {
    const path = this.path!;
    const chunk = Buffer.alloc(256 * 1024);
    let file: FileHandle | null = null;
    let ino: string | null = null;
    // Every call resumes at the committed position: after a failed iteration nothing is skipped.
    let at = { ...this.committed! };
    let scanner = new RecordScanner(this.cfg.format, at.offset, at.line);
    let readOffset = at.offset;
    try {
      while (!signal.aborted) {
        if (!file) {
          file = await open(path, "r").catch((err: { code?: string }) => {
            if (err.code === "ENOENT" && this.cfg.follow) return null;
            throw configError(`pipeline '${this.ctx.pipeline}': cannot read source.input ${path}: ${err.code ?? errorMessage(err)}`);
          });
          if (!file) {
            if (this.ctx.drain) return;
            await this.sleeper.sleep(this.cfg.poll_interval_ms);
            continue;
          }
          ino = String((await file.stat()).ino);
          if (at.ino !== null && at.ino !== ino && at.offset > 0) {
            this.ctx.log.warn(`${path} was replaced: reading the new file from the beginning`);
            at = { path, offset: 0, line: 1, ino, generation: (at.generation ?? 0) + 1 };
            scanner = new RecordScanner(this.cfg.format, 0, 1);
            readOffset = 0;
          }
          at.ino = ino;
        }
        const records: RawRecord[] = [];
        let atEof = false;
        while (records.length < this.batchSize) {
          const r = scanner.next();
          if (r) {
            records.push(r);
            continue;
          }
          const { bytesRead } = await file.read(chunk, 0, chunk.length, readOffset);
          if (bytesRead === 0) {
            atEof = true;
            break;
          }
          readOffset += bytesRead;
          scanner.push(chunk.subarray(0, bytesRead));
        }
        // Without follow the file is complete: a last line without a newline is a record too.
        // With follow it may still be being written, so it waits for its newline.
        if (atEof && records.length === 0 && !this.cfg.follow) {
          const last = scanner.finish();
          if (last) records.push(last);
        }
        if (records.length > 0) {
          yield this.batch(records, ino, at.generation ?? 0);
          continue;
        }
        if (!this.cfg.follow) {
          this.ended = true;
          return;
        }
        if (this.ctx.drain) return;
        await this.sleeper.sleep(this.cfg.poll_interval_ms);
        // Rotated (a new file under the path) or truncated: start over on what is there now.
        const now = await stat(path).catch(() => null);
        if (now && (String(now.ino) !== ino || now.size < readOffset)) {
          if (String(now.ino) === ino || !scanner.pending) {
            await file.close();
            file = null;
            this.ctx.log.warn(`${path} was ${String(now.ino) !== ino ? "rotated" : "truncated"}: reading it from the beginning`);
            at = { path, offset: 0, line: 1, ino: null, generation: (at.generation ?? 0) + 1 };
            scanner = new RecordScanner(this.cfg.format, 0, 1);
            readOffset = 0;
          } else {
            // Rotated with an unterminated last value: deliver it before moving on.
            const last = scanner.finish();
            if (last) yield this.batch([last], ino, at.generation ?? 0);
          }
        }
      }
    } finally {
      await file?.close().catch(() => {});
    }
  }

  private async *stdinBatches(signal: AbortSignal): AsyncIterable<Batch> {
    // One reader for the process lifetime of this source: standard input cannot be re-read.
    const s = (this.stdin ??= {
      reader: Bun.stdin.stream().getReader() as ReadableStreamDefaultReader<Uint8Array>,
      scanner: new RecordScanner(this.cfg.format, 0, 1),
      pending: null,
      eof: false,
      returned: [],
    });
    const aborted = new Promise<"aborted">((resolve) => {
      if (signal.aborted) resolve("aborted");
      signal.addEventListener("abort", () => resolve("aborted"), { once: true });
    });
    while (!signal.aborted) {
      const returned = s.returned.shift();
      if (returned) {
        yield this.batch(returned, null, 0);
        continue;
      }
      const records: RawRecord[] = [];
      for (let r = s.scanner.next(); r; r = records.length < this.batchSize ? s.scanner.next() : null) records.push(r);
      if (records.length === 0 && s.eof) {
        const last = s.scanner.finish();
        if (last) records.push(last);
        else {
          this.ended = true;
          return;
        }
      }
      if (records.length > 0) {
        // What is buffered goes out now: waiting to fill the batch could wait for ever.
        yield this.batch(records, null, 0);
        continue;
      }
      s.pending ??= s.reader.read();
      const got = await Promise.race([s.pending, aborted]);
      if (got === "aborted") return;
      s.pending = null;
      if (got.done) s.eof = true;
      else s.scanner.push(got.value);
    }
  }

  private batch(records: RawRecord[], ino: string | null, generation: number): Batch {
    const messages: Message[] = [];
    const deadLetters: DeadLetter[] = [];
    for (const r of records) {
      const item = this.convert(r, this.synthesizedKey(r, generation));
      if (item.ok) messages.push(item.message);
      else deadLetters.push(item.deadLetter);
    }
    const last = records[records.length - 1]!;
    const position: FilePosition | null = this.path ? { path: this.path, offset: last.end, line: last.endLine, ino, generation } : null;
    return {
      messages,
      deadLetters,
      ack: async () => {
        if (!position) return;
        position.headLength = Math.min(HEAD_BYTES, position.offset);
        position.head = await this.headOf(position);
        await saveSourcePosition(this.ctx.sql, this.ctx, JSON.stringify(position));
        this.committed = position;
      },
      // A file is read again from the committed position; standard input only once.
      release: async () => {
        if (!this.path) this.stdin?.returned.push(records);
      },
    };
  }

  /**
   * The position's head hash. Once it covers HEAD_BYTES it is the same for every later batch of
   * the same file, so it is hashed once, not at every ack (an open, a read and a close each: 6 %
   * of a drain's profile). Were the file rewritten in place meanwhile, the stored hash is still
   * that of the content the offset was read from, and the next start sees the difference.
   */
  private async headOf(position: FilePosition): Promise<string | undefined> {
    const key = `${position.ino}:${position.generation}`;
    const full = position.headLength === HEAD_BYTES;
    if (full && this.fullHead?.key === key) return this.fullHead.head;
    const head = (await headHash(position.path, position.headLength!)) ?? undefined;
    if (full && head) this.fullHead = { key, head };
    return head;
  }

  private synthesizedKey(r: RawRecord, generation: number): string {
    if (!this.path) return `stdin:${sha256Hex(r.bytes)}`;
    return generation === 0 ? `file:${this.path}:${r.line}` : `file:${this.path}:g${generation}:${r.line}`;
  }

  /** One record → its message, or a `decode` dead letter holding the raw text for a later fix and replay. */
  private convert(r: RawRecord, key: string): { ok: true; message: Message } | { ok: false; deadLetter: DeadLetter } {
    const text = utf8OrNull(r.bytes);
    const parsed = text === null ? null : parseJson(text);
    if (parsed?.ok) {
      const message = inboundMessage({
        pipeline: this.ctx.pipeline,
        sourceType: this.sourceType,
        where: this.path,
        body: { payload: parsed.value, json: true },
        producerKey: bodyDedupKey(parsed.value),
        synthesizedKey: key,
        config: this.cfg,
      });
      return { ok: true, message };
    }
    const where = `${this.path ?? "stdin"} line ${r.line}`;
    const error =
      text === null ? `${where} is not valid UTF-8` : parsed && !parsed.ok && parsed.tooDeep ? `${where}: ${parsed.error}` : `${where} is not JSON (${this.cfg.format}): ${parsed && !parsed.ok ? parsed.error : ""}`;
    this.ctx.log.warn(`${error}; dead-lettered as ${key}`);
    const deadLetter: DeadLetter = {
      dedup_key: key,
      outbox_id: null,
      message: {
        input: this.path ? `file:${this.path}` : "stdin",
        line: r.line,
        key,
        format: this.cfg.format,
        raw: text ?? { base64: r.bytes.toString("base64") },
      },
      error,
      kind: "decode",
    };
    return { ok: false, deadLetter };
  }

  /** A fixed dead letter (operator edited `message.raw`) → its message, under the original key. */
  async decodeStored(stored: unknown): Promise<Message[]> {
    const s = stored as { raw?: unknown; line?: unknown; key?: unknown } | null;
    if (typeof s?.raw !== "string") throw decodeError("dead letter holds no text line (message.raw)");
    const line = typeof s.line === "number" ? s.line : 0;
    const record: RawRecord = { bytes: Buffer.from(s.raw), line, end: 0, endLine: line };
    // The original key, so a replay after a fix lands where the first attempt would have.
    const item = this.convert(record, typeof s.key === "string" && s.key !== "" ? s.key : this.synthesizedKey(record, 0));
    if (!item.ok) throw decodeError(item.deadLetter.error);
    return [item.message];
  }
}

/**
 * `file` names both this source and the stdout sink's alias; `stdin` reads standard input and
 * `stdout` is accepted as before (the source was once registered under the stdout sink's name).
 */
export default sourceSpec({
  type: "file",
  aliases: ["stdin", "stdout"],
  config: StdinSourceConfig,
  create: (cfg, ctx) => new StdinSource(cfg, ctx),
});
