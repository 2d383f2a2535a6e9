/**
 * Cutting the file source's input into records (docs/interface.md §6.5): one JSON value each,
 * with where it was, so that a bad one costs one dead letter and positions are exact.
 */

/** One JSON value of the input, with where it was in the input. */
export interface RawRecord {
  /** The bytes, without the line terminator. */
  bytes: Buffer;
  /** 1-based line where it starts. */
  line: number;
  /** Byte offset just past it (and past its newline in jsonl). */
  end: number;
  /** Line number at `end`. */
  endLine: number;
}

const isBlank = (b: Buffer) => {
  for (const c of b) if (c !== 0x20 && c !== 0x09 && c !== 0x0d && c !== 0x0a) return false;
  return true;
};

/**
 * Cuts a byte stream into records without decoding it: jsonl at newlines; json_pretty at the
 * bracket that closes a top-level `{…}`/`[…]` (strings and escapes respected), and anything else
 * at depth 0 up to the end of its line, so that garbage costs one record, not the rest of the input.
 */
export class RecordScanner {
  private buf = Buffer.alloc(0);
  /** Input offset and line number of buf[0]. */
  private base: number;
  private line: number;
  /** Scan progress within buf, and the line number there. */
  private pos = 0;
  private posLine: number;
  private mode: "between" | "value" | "line" = "between";
  private depth = 0;
  private inString = false;
  private escaped = false;
  private startLine = 0;

  constructor(
    private readonly format: "jsonl" | "json_pretty",
    offset: number,
    line: number,
  ) {
    this.base = offset;
    this.line = line;
    this.posLine = line;
  }

  push(chunk: Uint8Array): void {
    this.buf = this.buf.length === 0 ? Buffer.from(chunk) : Buffer.concat([this.buf, chunk]);
  }

  /** Bytes held that are not yet a complete record. */
  get pending(): boolean {
    return !isBlank(this.buf);
  }

  private consume(n: number, lineAfter: number): void {
    this.buf = this.buf.subarray(n);
    this.base += n;
    this.line = lineAfter;
    this.pos = 0;
    this.posLine = lineAfter;
  }

  /** The next complete record, or null until more input arrives. */
  next(): RawRecord | null {
    return this.format === "jsonl" ? this.nextLine() : this.nextValue();
  }

  private nextLine(): RawRecord | null {
    for (;;) {
      const nl = this.buf.indexOf(0x0a, this.pos);
      if (nl < 0) {
        this.pos = this.buf.length;
        return null;
      }
      let stop = nl;
      if (stop > 0 && this.buf[stop - 1] === 0x0d) stop--;
      const bytes = Buffer.from(this.buf.subarray(0, stop));
      const record = { bytes, line: this.line, end: this.base + nl + 1, endLine: this.line + 1 };
      this.consume(nl + 1, this.line + 1);
      if (!isBlank(bytes)) return record;
    }
  }

  private nextValue(): RawRecord | null {
    const buf = this.buf;
    for (let i = this.pos; i < buf.length; i++) {
      const c = buf[i]!;
      if (this.mode === "between") {
        if (c === 0x0a) this.posLine++;
        if (c === 0x20 || c === 0x09 || c === 0x0d || c === 0x0a) continue;
        // Whitespace between records is done with: drop it so buf[0] starts the record.
        this.consume(i, this.posLine);
        return this.startRecord();
      }
      const done = this.step(c);
      if (c === 0x0a) this.posLine++;
      if (done) return this.cut(i + 1);
    }
    this.pos = buf.length;
    if (this.mode === "between") this.consume(buf.length, this.posLine);
    return null;
  }

  /** buf[0] is the first byte of a record. */
  private startRecord(): RawRecord | null {
    const c = this.buf[0]!;
    this.startLine = this.line;
    this.mode = c === 0x7b || c === 0x5b ? "value" : "line";
    this.depth = 0;
    this.inString = false;
    this.escaped = false;
    return this.nextValue();
  }

  /** Feeds one byte of a record; true when the record ends with it. */
  private step(c: number): boolean {
    if (this.mode === "line") return c === 0x0a;
    if (this.inString) {
      if (this.escaped) this.escaped = false;
      else if (c === 0x5c) this.escaped = true;
      else if (c === 0x22) this.inString = false;
      return false;
    }
    if (c === 0x22) this.inString = true;
    else if (c === 0x7b || c === 0x5b) this.depth++;
    else if (c === 0x7d || c === 0x5d) return --this.depth === 0;
    return false;
  }

  private cut(n: number): RawRecord {
    let stop = n;
    while (stop > 0 && (this.buf[stop - 1] === 0x0a || this.buf[stop - 1] === 0x0d)) stop--;
    const record = { bytes: Buffer.from(this.buf.subarray(0, stop)), line: this.startLine, end: this.base + n, endLine: this.posLine };
    this.mode = "between";
    this.consume(n, this.posLine);
    return record;
  }

  /** At the end of the input: whatever is left, as one last record (null when only blanks remain). */
  finish(): RawRecord | null {
    if (isBlank(this.buf)) {
      this.consume(this.buf.length, this.line + this.buf.filter((c) => c === 0x0a).length);
      this.mode = "between";
      return null;
    }
    const n = this.buf.length;
    const lines = this.buf.filter((c) => c === 0x0a).length;
    let stop = n;
    while (stop > 0 && (this.buf[stop - 1] === 0x0a || this.buf[stop - 1] === 0x0d)) stop--;
    const startLine = this.format === "jsonl" || this.mode === "between" ? this.line : this.startLine;
    const record = { bytes: Buffer.from(this.buf.subarray(0, stop)), line: startLine, end: this.base + n, endLine: this.line + lines };
    this.mode = "between";
    this.consume(n, record.endLine);
    return record;
  }
}
