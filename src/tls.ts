/**
 * The one TLS vocabulary of every backend (docs/TLS.md): the keys each backend schema spreads in
 * (`TLS_ENTRIES`), the old spellings still accepted (`TLS_ALIAS_ENTRIES`), the one loader that
 * turns them into Node `tls` connection options (`loadTls`), and the one reading of handshake
 * failures (`describeTlsError`). Errors name the key and, for a file, its path: never PEM text
 * or a passphrase.
 */
import { X509Certificate, createPrivateKey, type KeyObject } from "node:crypto";
import { readFileSync } from "node:fs";
import type { ConnectionOptions } from "node:tls";
import * as v from "valibot";
import { RelayError, configError } from "./errors.ts";
import { log } from "./observe/log.ts";
import { registerSecrets } from "./redact.ts";

const nonEmptyText = (description: string) => v.optional(v.pipe(v.string(), v.minLength(1, "must not be empty"), v.description(description)));

const TLS_DESCRIPTION =
  "Connect over TLS. Implied by any other `tls_*` key and by a TLS URL (`tls://`, `rediss://`, `amqps://`, `https://`, a PostgreSQL `sslmode`); `false` with another `tls_*` key is an error.";

/** The TLS keys, spread into every backend schema that connects over a network. */
export const TLS_ENTRIES = {
  tls: v.optional(v.pipe(v.boolean(), v.description(TLS_DESCRIPTION))),
  tls_ca: nonEmptyText("CA certificate(s) that signed the server's certificate: a PEM file path or the PEM text itself. Default: the system's CAs."),
  tls_cert: nonEmptyText("Client certificate for mutual TLS (needs `tls_key`): a PEM file path or the PEM text itself."),
  tls_key: nonEmptyText("Private key of `tls_cert`: a PEM file path or the PEM text itself."),
  tls_key_password: nonEmptyText("Passphrase of an encrypted `tls_key`; a secret, shown as `***` everywhere (keep it out of the catalog with `${env:…}` or `${file:…}`)."),
  tls_server_name: nonEmptyText("Host name the server's certificate must carry, and the TLS server name (SNI) sent, when it differs from the host connected to."),
  tls_insecure_skip_verify: v.optional(
    v.pipe(v.boolean(), v.description("Accept any server certificate: no CA and no host-name check. For tests only; logs a warning.")),
  ),
};

/** The old `ssl`/`tls` object form (Redis' `tls: {ca, cert, key}`, a kafkajs-style `ssl: {…}`). */
const TlsObject = v.looseObject({
  ca: v.optional(v.string()),
  cert: v.optional(v.string()),
  key: v.optional(v.string()),
  passphrase: v.optional(v.string()),
  password: v.optional(v.string()),
  servername: v.optional(v.string()),
  reject_unauthorized: v.optional(v.boolean()),
  rejectUnauthorized: v.optional(v.boolean()),
});
type TlsObject = v.InferOutput<typeof TlsObject>;

const alias = (newKey: string) => `Old spelling of \`${newKey}\`, accepted with a warning.`;

/**
 * Old spellings per backend, accepted beside `TLS_ENTRIES` and mapped by `loadTls` with one
 * warning naming the new key. NATS, HTTP and RabbitMQ already used the new names.
 */
export const TLS_ALIAS_ENTRIES = {
  kafka: {
    ssl: v.optional(
      v.pipe(
        v.union([v.boolean(), TlsObject]),
        v.description("Old spelling of `tls` (a boolean) or of the `tls_*` keys (an object `{ca, cert, key, passphrase, servername, rejectUnauthorized}`), accepted with a warning."),
      ),
    ),
    ssl_ca_file: v.optional(v.pipe(v.string(), v.description(alias("tls_ca")))),
    ssl_cert_file: v.optional(v.pipe(v.string(), v.description(alias("tls_cert")))),
    ssl_key_file: v.optional(v.pipe(v.string(), v.description(alias("tls_key")))),
    ssl_key_password: v.optional(v.pipe(v.string(), v.description(alias("tls_key_password")))),
  },
  /** Redis' `tls` takes the old object form too, so it replaces `TLS_ENTRIES.tls` there. */
  redis: {
    tls: v.optional(
      v.pipe(
        v.union([v.boolean(), TlsObject]),
        v.description(`${TLS_DESCRIPTION} The old object form \`{ca, cert, key, servername, reject_unauthorized}\` is accepted with a warning.`),
      ),
    ),
  },
};

/** The new keys: what every old spelling is mapped onto. */
interface Vocabulary {
  tls?: boolean;
  tls_ca?: string;
  tls_cert?: string;
  tls_key?: string;
  tls_key_password?: string;
  tls_server_name?: string;
  tls_insecure_skip_verify?: boolean;
}

/** What `loadTls` reads: the new keys and any old spelling. */
export interface TlsConfig extends Omit<Vocabulary, "tls"> {
  tls?: boolean | TlsObject;
  ssl?: boolean | TlsObject | string;
  ssl_ca_file?: string;
  ssl_cert_file?: string;
  ssl_key_file?: string;
  ssl_key_password?: string;
}

type NewKey = "tls_ca" | "tls_cert" | "tls_key" | "tls_key_password" | "tls_server_name";
const FLAT_ALIASES: Record<string, NewKey> = {
  ssl_ca_file: "tls_ca",
  ssl_cert_file: "tls_cert",
  ssl_key_file: "tls_key",
  ssl_key_password: "tls_key_password",
};
const OBJECT_ALIASES: Record<string, NewKey> = {
  ca: "tls_ca",
  cert: "tls_cert",
  key: "tls_key",
  passphrase: "tls_key_password",
  password: "tls_key_password",
  servername: "tls_server_name",
};

/** Old spellings warn once per place and key, not at every reconnect. */
const warned = new Set<string>();
function warnOnce(where: string, text: string): void {
  const id = `${where}\0${text}`;
  if (warned.has(id)) return;
  warned.add(id);
  log.warn(`${where}: ${text}`);
}

/** The new keys of `cfg`, each old spelling mapped onto its new key (a warning names it). */
function newVocabulary(cfg: TlsConfig, where: string): Vocabulary {
  const out: Vocabulary = {
    tls_ca: cfg.tls_ca,
    tls_cert: cfg.tls_cert,
    tls_key: cfg.tls_key,
    tls_key_password: cfg.tls_key_password,
    tls_server_name: cfg.tls_server_name,
    tls_insecure_skip_verify: cfg.tls_insecure_skip_verify,
  };
  const take = (oldKey: string, newKey: keyof Vocabulary, value: unknown) => {
    if (value === undefined) return;
    if (out[newKey] !== undefined && out[newKey] !== value) throw configError(`${where}: ${oldKey} and ${newKey} are both set; keep only ${newKey}`);
    warnOnce(where, `${oldKey} is an old spelling; use ${newKey}`);
    (out as Record<string, unknown>)[newKey] = value;
  };
  for (const [oldKey, newKey] of Object.entries(FLAT_ALIASES)) take(oldKey, newKey, (cfg as Record<string, unknown>)[oldKey]);
  for (const key of ["tls", "ssl"] as const) {
    const value = cfg[key];
    if (typeof value === "boolean") {
      if (key === "ssl") take("ssl", "tls", value);
      else out.tls = value;
    } else if (value && typeof value === "object") {
      for (const [sub, newKey] of Object.entries(OBJECT_ALIASES)) take(`${key}.${sub}`, newKey, value[sub]);
      const reject = value.reject_unauthorized ?? value.rejectUnauthorized;
      if (reject !== undefined) take(`${key}.reject_unauthorized`, "tls_insecure_skip_verify", !reject);
      out.tls ??= true;
    }
  }
  return out;
}

/** True when `cfg` asks for TLS by a key (for descriptions; `loadTls` decides and checks). */
export function tlsWanted(cfg: TlsConfig): boolean {
  if (cfg.tls === false || cfg.ssl === false) return false;
  return Object.entries(cfg).some(([key, value]) => value !== undefined && value !== false && (key.startsWith("tls") || key === "ssl" || key in FLAT_ALIASES));
}

/** Every PEM block of a text, for bundles of several certificates. */
const PEM_BLOCK = /-----BEGIN ([A-Z0-9 ]+)-----[\s\S]*?-----END \1-----/g;

/** PEM text as given inline, or read from the file it names; nothing else passes. */
function readPem(value: string, key: string, where: string): string {
  let text = value;
  let source = "the inline value";
  if (!value.includes("-----BEGIN")) {
    source = value;
    try {
      text = readFileSync(value, "utf8");
    } catch (err) {
      throw configError(`${where}: ${key}: cannot read ${value} (${(err as { code?: string }).code ?? "unreadable"})`);
    }
  }
  if (!new RegExp(PEM_BLOCK.source).test(text)) throw configError(`${where}: ${key}: ${source} is not PEM (no BEGIN … END block)`);
  return text;
}

function certificates(pem: string, key: string, where: string): X509Certificate[] {
  const blocks = [...pem.matchAll(PEM_BLOCK)].filter((m) => m[1] === "CERTIFICATE" || m[1] === "TRUSTED CERTIFICATE");
  if (blocks.length === 0) throw configError(`${where}: ${key} holds no CERTIFICATE block`);
  return blocks.map((m) => {
    try {
      return new X509Certificate(m[0]);
    } catch {
      throw configError(`${where}: ${key} holds a CERTIFICATE block that does not parse`);
    }
  });
}

/** Why a certificate cannot be used now, or undefined when it can. */
function outsideValidity(cert: X509Certificate, now: Date): string | undefined {
  if (now < new Date(cert.validFrom)) return `is not valid before ${new Date(cert.validFrom).toISOString()}`;
  if (now > new Date(cert.validTo)) return `expired on ${new Date(cert.validTo).toISOString()}`;
  return undefined;
}

function privateKey(pem: string, passphrase: string | undefined, where: string): KeyObject {
  try {
    return createPrivateKey(passphrase === undefined ? { key: pem } : { key: pem, passphrase });
  } catch (err) {
    const code = (err as { code?: string }).code ?? "";
    if (code === "ERR_MISSING_PASSPHRASE") throw configError(`${where}: tls_key is encrypted; set tls_key_password`);
    if (passphrase !== undefined) throw configError(`${where}: tls_key cannot be decrypted with tls_key_password (wrong passphrase?)`);
    throw configError(`${where}: tls_key is not a private key this process can read${code ? ` (${code})` : ""}`);
  }
}

export interface LoadTlsOptions {
  /** TLS is on even without a `tls*` key: the URL says so (`tls://`, `rediss://`, a `sslmode` …). */
  implied?: boolean;
  /** The clock, for tests. */
  now?: Date;
}

/**
 * The Node `tls` connection options of a backend config, or undefined when it does not use TLS.
 * Reads each file once and refuses, with one config error naming the key: an unreadable file,
 * text that is not PEM, a certificate outside its validity period, `tls_cert` without `tls_key`
 * (or the reverse), a key that is encrypted without (or with a wrong) `tls_key_password`, and
 * a key that does not belong to the certificate.
 */
export function loadTls(cfg: TlsConfig, where: string, options: LoadTlsOptions = {}): ConnectionOptions | undefined {
  const c = newVocabulary(cfg, where);
  const material = (["tls_ca", "tls_cert", "tls_key", "tls_key_password", "tls_server_name", "tls_insecure_skip_verify"] as const).filter(
    (k) => c[k] !== undefined,
  );
  if (c.tls === false) {
    if (material.length > 0) throw configError(`${where}: tls is false but ${material.join(", ")} ${material.length > 1 ? "are" : "is"} set`);
    return undefined;
  }
  if (c.tls !== true && !options.implied && material.length === 0) return undefined;
  if (c.tls_key_password !== undefined) registerSecrets([c.tls_key_password]);
  if ((c.tls_cert === undefined) !== (c.tls_key === undefined)) {
    throw configError(`${where}: ${c.tls_cert === undefined ? "tls_key needs tls_cert" : "tls_cert needs tls_key"} (mutual TLS takes both)`);
  }
  if (c.tls_key_password !== undefined && c.tls_key === undefined) throw configError(`${where}: tls_key_password is set without tls_key`);
  const now = options.now ?? new Date();
  const out: ConnectionOptions = { rejectUnauthorized: c.tls_insecure_skip_verify !== true };
  if (c.tls_insecure_skip_verify === true) {
    warnOnce(where, "tls_insecure_skip_verify is true: the server's certificate is not checked, so anyone on the path can pose as the server");
  }
  if (c.tls_ca !== undefined) out.ca = caBundle(c.tls_ca, where, now);
  if (c.tls_cert !== undefined && c.tls_key !== undefined) Object.assign(out, certificateAndKey(c.tls_cert, c.tls_key, c.tls_key_password, "client", where, now));
  if (c.tls_server_name !== undefined) out.servername = c.tls_server_name;
  return out;
}

/** `tls_ca`'s PEM, refused when no certificate of it is valid now. */
function caBundle(value: string, where: string, now: Date): string {
  const pem = readPem(value, "tls_ca", where);
  const cas = certificates(pem, "tls_ca", where);
  if (!cas.some((ca) => outsideValidity(ca, now) === undefined)) {
    throw configError(`${where}: tls_ca: ${cas.length > 1 ? "no certificate of the bundle is valid now" : `the CA certificate ${outsideValidity(cas[0]!, now)}`}`);
  }
  return pem;
}

/** `tls_cert` and `tls_key` read and checked: the certificate valid now, the key its own and readable. */
function certificateAndKey(certValue: string, keyValue: string, password: string | undefined, whose: "client" | "server", where: string, now: Date) {
  const cert = readPem(certValue, "tls_cert", where);
  const leaf = certificates(cert, "tls_cert", where)[0]!;
  const invalid = outsideValidity(leaf, now);
  if (invalid) throw configError(`${where}: tls_cert: the ${whose} certificate ${invalid}`);
  const key = readPem(keyValue, "tls_key", where);
  if (!leaf.checkPrivateKey(privateKey(key, password, where))) throw configError(`${where}: tls_key does not belong to tls_cert (a key of another certificate?)`);
  return password === undefined ? { cert, key } : { cert, key, passphrase: password };
}

/** The TLS keys of a listener (the HTTP receiver): its own certificate, and the CA of its clients' certificates. */
export interface ServerTlsConfig {
  tls_cert?: string;
  tls_key?: string;
  tls_key_password?: string;
  tls_ca?: string;
}

/** What Bun.serve takes as `tls`. */
export interface ServerTlsOptions {
  cert: string;
  key: string;
  passphrase?: string;
  /** With `ca`: a client certificate signed by it is required (the handshake fails without one). */
  ca?: string;
  requestCert?: boolean;
  rejectUnauthorized?: boolean;
}

/**
 * A listener's TLS options (docs/TLS.md, "The HTTP receiver"), or undefined without `tls_cert`:
 * `tls_cert` and `tls_key` are the server's certificate and key, `tls_ca` makes the client
 * certificate required and names the CA it must be signed by. Refused with one config error
 * naming the key, as `loadTls` does.
 */
export function loadServerTls(cfg: ServerTlsConfig, where: string, now = new Date()): ServerTlsOptions | undefined {
  if (cfg.tls_key_password !== undefined) registerSecrets([cfg.tls_key_password]);
  if (cfg.tls_cert === undefined || cfg.tls_key === undefined) {
    const given = (["tls_key", "tls_key_password", "tls_ca"] as const).filter((k) => cfg[k] !== undefined);
    if (cfg.tls_cert !== undefined) throw configError(`${where}: tls_cert needs tls_key (the listener's private key)`);
    if (given.length > 0) throw configError(`${where}: ${given.join(", ")} ${given.length > 1 ? "need" : "needs"} tls_cert (the listener's certificate) and tls_key`);
    return undefined;
  }
  const out: ServerTlsOptions = certificateAndKey(cfg.tls_cert, cfg.tls_key, cfg.tls_key_password, "server", where, now);
  if (cfg.tls_ca !== undefined) Object.assign(out, { ca: caBundle(cfg.tls_ca, where, now), requestCert: true, rejectUnauthorized: true });
  return out;
}

/** Handshake failures (Node's codes and OpenSSL/BoringSSL alert names) → what to change. */
const HANDSHAKE_FAILURES: [RegExp, string][] = [
  [
    /UNABLE_TO_VERIFY_LEAF_SIGNATURE|UNABLE_TO_GET_ISSUER_CERT(_LOCALLY)?|SELF_SIGNED_CERT_IN_CHAIN|DEPTH_ZERO_SELF_SIGNED_CERT|CERT_SIGNATURE_FAILURE|unable to verify the first certificate|self[- ]signed certificate/i,
    "the server's certificate is not signed by tls_ca (without tls_ca: by no system CA); set tls_ca to the CA that signed it",
  ],
  [/CERT_HAS_EXPIRED|certificate has expired/i, "the server's certificate has expired; the server needs a new one"],
  [/CERT_NOT_YET_VALID|certificate is not yet valid/i, "the server's certificate is not valid yet (check both clocks)"],
  [
    /ERR_TLS_CERT_ALTNAME_INVALID|does not match certificate's altnames/i,
    "the server's certificate does not carry the host name connected to; connect by a name it carries, or set tls_server_name to one",
  ],
  [
    /CERTIFICATE_REQUIRED|ALERT_BAD_CERTIFICATE|ALERT_UNKNOWN_CA|ALERT_CERTIFICATE_EXPIRED|ALERT_CERTIFICATE_UNKNOWN|ALERT_CERTIFICATE_REVOKED|ALERT_ACCESS_DENIED|ALERT_HANDSHAKE_FAILURE|peer did not return a certificate|requires a valid client certificate/i,
    "the server refused the client certificate: it requires one (set tls_cert and tls_key), or the one given is expired or not signed by a CA the server trusts",
  ],
  [
    /WRONG_VERSION_NUMBER|packet length too long|unknown protocol|HTTP_REQUEST|ERR_SSL_WRONG_VERSION/i,
    "the server does not speak TLS on this port; use its TLS port, or turn tls off",
  ],
];

/** The codes and messages of an error and its causes (libraries wrap handshake errors). */
function errorTexts(err: unknown): string[] {
  const out: string[] = [];
  const seen = new Set<unknown>();
  for (let e: unknown = err; e && typeof e === "object" && !seen.has(e) && out.length < 20; ) {
    seen.add(e);
    const { code, message, cause, originalError, errors } = e as Record<string, unknown>;
    if (typeof code === "string") out.push(code);
    if (typeof message === "string") out.push(message);
    if (Array.isArray(errors)) for (const inner of errors) out.push(...errorTexts(inner));
    e = cause ?? originalError;
  }
  if (typeof err === "string") out.push(err);
  return out;
}

/**
 * One permanent config error for a TLS handshake failure (a wrong CA, an expired certificate, a
 * refused client certificate, a host-name mismatch, a plaintext port), or undefined when `err`
 * is not one: retrying cannot fix any of these, the configuration (or the server) must change.
 */
export function describeTlsError(err: unknown, where = "TLS connection"): RelayError | undefined {
  if (err instanceof RelayError && err.kind === "config") return undefined;
  const texts = errorTexts(err);
  for (const [pattern, meaning] of HANDSHAKE_FAILURES) {
    if (!texts.some((t) => pattern.test(t))) continue;
    // the code names the failure exactly; messages are only for libraries that drop it
    const code = texts.map((t) => t.match(/\b[A-Z][A-Z0-9_]{6,}\b/g) ?? []).flat().find((c) => pattern.test(c));
    return configError(`${where}: TLS: ${meaning}${code ? ` (${code})` : ""}`, err);
  }
  return undefined;
}
