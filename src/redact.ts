/**
 * The one redaction of the process. Every output path — log lines, command output (status,
 * check, pipeline, dead-letters, JSON), /health, /metrics, errors stored in the catalog — passes
 * its text through `redact`, so a secret cannot leave the process even when a library echoes it
 * back inside an error message. Secrets are known in three ways:
 * - registered values: resolved `${env:…}` / `${file:…}` results, URL passwords, and the values of
 *   secret-named keys of every pipeline config the process reads (`registerConfigSecrets`);
 * - the shape of a URL: the password of `scheme://user:password@` or `scheme://:password@`;
 * - the shape of a query string: the value of `token=`, `password=`, `api_key=`, `signature=` ….
 */

const secretValues = new Set<string>();
/**
 * The registered values longest first (a secret that contains another must be replaced whole),
 * sorted when the set changes rather than on every call: redact runs on every log line.
 */
let longestFirst: string[] = [];
/** Shorter values would blank out ordinary words; a secret that short protects nothing anyway. */
const MIN_SECRET_LENGTH = 3;

const byLengthDescending = (a: string, b: string) => b.length - a.length;

export function registerSecrets(values: Iterable<string>): void {
  const before = secretValues.size;
  for (const v of values) {
    if (typeof v !== "string") continue;
    if (v.length >= MIN_SECRET_LENGTH) secretValues.add(v);
    // A value may also appear URL-encoded (credentials inside a URL).
    const enc = encodeURIComponent(v);
    if (enc !== v && enc.length >= MIN_SECRET_LENGTH) secretValues.add(enc);
  }
  if (secretValues.size !== before) longestFirst = [...secretValues].sort(byLengthDescending);
}

/** `scheme://user:password@` and `scheme://:password@`: the password part. */
const URL_PASSWORD = /(\b[a-zA-Z][\w+.-]*:\/\/[^\s:/@?#]*:)([^\s@/?#]+)@/g;
/** `nats://token@`: NATS reads a user name without a password as a token. */
const NATS_TOKEN = /(\bnats:\/\/)([^\s:/@?#]+)@/gi;
/** Query parameters that carry credentials (HTTP sinks' `?token=`, presigned URLs, …). */
const QUERY_SECRET = /([?&;](?:[\w.-]*(?:token|password|passwd|pwd|secret|api[_-]?key|apikey|key|signature|sig|auth|credential)[\w.-]*)=)([^&#;\s"']+)/gi;
/** The same test for one parameter, without the global flag's lastIndex state. */
const QUERY_SECRET_ONCE = new RegExp(QUERY_SECRET.source, "i");

/** `text` with every known secret, URL password and credential query value replaced by `***`. */
export function redact(text: string, extra: readonly string[] = []): string {
  let out = text.replace(URL_PASSWORD, "$1***@").replace(NATS_TOKEN, "$1***@").replace(QUERY_SECRET, "$1***");
  const more = extra.filter((s) => s.length > 0);
  const values = more.length === 0 ? longestFirst : [...longestFirst, ...more].sort(byLengthDescending);
  for (const v of values) if (out.includes(v)) out = out.split(v).join("***");
  return out;
}

/** Text → text with secrets masked. */
export type Scrub = (text: string) => string;

/**
 * `redact` that also masks one connection's own secrets (a password, a token, a key passphrase),
 * the values a backend knows even when nothing registered them. Values shorter than
 * MIN_SECRET_LENGTH are left out, for the reason registerSecrets leaves them out.
 */
export function scrubberFor(secrets: Iterable<string | null | undefined>): Scrub {
  const own = [...secrets].filter((s): s is string => typeof s === "string" && s.length >= MIN_SECRET_LENGTH);
  return (text) => redact(text, own);
}

/** The password of a URL (raw and decoded), empty when there is none or `url` is not a URL. */
export function urlSecrets(url: string): string[] {
  try {
    const u = new URL(url);
    const out = u.password ? [u.password, decodeURIComponent(u.password)] : [];
    if (u.protocol === "nats:" && u.username && !u.password) out.push(u.username, decodeURIComponent(u.username));
    for (const [k, v] of u.searchParams) if (QUERY_SECRET_ONCE.test(`?${k}=x`) && v) out.push(v);
    return out;
  } catch {
    return [];
  }
}

/** Config keys whose value is a secret: passwords, tokens, keys, signing secrets, auth headers. */
const SECRET_KEY = /pass(word|phrase)?|secret|token|api[_-]?key|credential|authorization|^auth$|cookie|signature/i;

/** PEM text holding a private key. */
const PRIVATE_KEY_PEM = /-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----/;

/** True for a config key (or dotted path) whose value is a secret, header values included. */
export const isSecretKey = (key: string) => SECRET_KEY.test(key) || /(^|\.)headers\./.test(key);

/**
 * Registers every secret a pipeline config holds: values of secret-named keys (at any depth,
 * headers included), private keys given as PEM text, and the passwords and credential parameters of URLs in any string. Called
 * wherever a config is read, so whatever prints that config or an error about it is masked.
 */
export function registerConfigSecrets(value: unknown, key = ""): void {
  const secret = SECRET_KEY.test(key) || key === "headers";
  if (typeof value === "string") {
    if (secret) registerSecrets([value]);
    // an inline private key (`tls_key`, docs/TLS.md) whatever its key; also as printed inside JSON
    if (PRIVATE_KEY_PEM.test(value)) registerSecrets([value, JSON.stringify(value).slice(1, -1)]);
    if (value.includes("://")) registerSecrets(urlSecrets(value));
    return;
  }
  if (Array.isArray(value)) for (const v of value) registerConfigSecrets(v, key);
  else if (value && typeof value === "object") {
    for (const [k, v] of Object.entries(value)) registerConfigSecrets(v, secret ? key : k);
  }
}
