/**
 * Every failure the relay handles carries a kind, because the kind decides what happens next:
 * - config:    never retried; the pipeline is marked failed with a message naming it and the key.
 * - transient: retried with jittered exponential backoff; nothing is skipped meanwhile.
 * - permanent: this message will never be accepted; it goes to the dead-letter table.
 * - decode:    the source data cannot be turned into messages; dead-lettered (or halt).
 */
export type ErrorKind = "config" | "transient" | "permanent" | "decode";

export class RelayError extends Error {
  readonly kind: ErrorKind;
  constructor(kind: ErrorKind, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.kind = kind;
    this.name = `RelayError(${kind})`;
  }
}

export const configError = (message: string, cause?: unknown) => new RelayError("config", message, { cause });
export const transientError = (message: string, cause?: unknown) => new RelayError("transient", message, { cause });
export const permanentError = (message: string, cause?: unknown) => new RelayError("permanent", message, { cause });
export const decodeError = (message: string, cause?: unknown) => new RelayError("decode", message, { cause });

/** SQLSTATE classes of docs/interface.md §7.8. */
export function pgErrorKind(code: string | undefined): ErrorKind {
  if (!code) return "transient";
  if (code.startsWith("08") || code.startsWith("53") || code.startsWith("57P")) return "transient";
  if (code === "40001" || code === "40P01") return "transient";
  if (["42P01", "42883", "42501", "P0001", "P0002", "3F000", "42704", "28000", "28P01", "3D000"].includes(code)) {
    return "config";
  }
  if (code.startsWith("22") || code.startsWith("23")) return "permanent";
  return "transient";
}

/**
 * SQLSTATEs caused by one row's own data, so the row can never be written and the others can:
 * data exceptions (class 22: a value the column type refuses, U+0000 or a lone surrogate in
 * JSON), integrity constraints (23), and program limits (54: a payload nested too deep for the
 * server's stack (54001), an index entry larger than a btree page allows (54000)). See
 * docs/LIMITS.md.
 */
export function isRowSqlstate(code: string | undefined): boolean {
  return code !== undefined && /^(22|23|54)[0-9A-Z]{3}$/.test(code);
}

/** The SQLSTATE of a PostgreSQL error (a five-character `code`), else undefined. */
export function sqlstateOf(err: unknown): string | undefined {
  const code = (err as { code?: unknown })?.code;
  return typeof code === "string" && /^[0-9A-Z]{5}$/.test(code) ? code : undefined;
}

/** The kind of any thrown value: RelayErrors say it, PostgreSQL errors by SQLSTATE, the rest are transient. */
export function errorKind(err: unknown): ErrorKind {
  if (err instanceof RelayError) return err.kind;
  const code = sqlstateOf(err);
  return code ? pgErrorKind(code) : "transient";
}

/** Of two errors, the one a failed batch reports: a config error wins, since retrying cannot cure it. */
export const worseError = (a: RelayError | null, b: RelayError): RelayError => (a === null || (b.kind === "config" && a.kind !== "config") ? b : a);

export function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
