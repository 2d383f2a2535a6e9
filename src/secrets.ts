import { readFileSync } from "node:fs";
import { configError } from "./errors.ts";
import { registerSecrets } from "./redact.ts";

/**
 * `${env:NAME}`, `${ENV:NAME}` and `${file:/path}` anywhere inside a string (README "Running it", secrets).
 * The database keeps only the tokens; resolved values live in memory only. Every value resolved
 * here is registered with the log redactor, and every error below names the token, never a value.
 */
const TOKEN = /\$\{(env|ENV|file):([^}]*)\}/g;
const ENV_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;

export type Env = Record<string, string | undefined>;

export function resolveSecretsIn(text: string, where: string, env: Env = process.env): string {
  const resolved: string[] = [];
  const out = text.replace(TOKEN, (_match, kind: string, ref: string) => {
    let value: string;
    if (kind === "file") {
      try {
        value = readFileSync(ref, "utf8").replace(/[\r\n]+$/, "");
      } catch (err) {
        const code = (err as { code?: string }).code ?? "unreadable";
        throw configError(`${where}: secret file \${file:${ref}} cannot be read (${code})`);
      }
    } else {
      if (!ENV_NAME.test(ref)) throw configError(`${where}: \${${kind}:${ref}} is not a valid environment variable name`);
      const v = env[ref];
      if (v === undefined) throw configError(`${where}: environment variable ${ref} is not set (referenced as \${${kind}:${ref}})`);
      value = v;
    }
    resolved.push(value);
    return value;
  });
  registerSecrets(resolved);
  return out;
}

/** Resolves tokens in every string of a JSON value, objects and arrays recursively. */
export function resolveSecrets<T>(value: T, where: string, env: Env = process.env): T {
  if (typeof value === "string") return resolveSecretsIn(value, where, env) as T;
  if (Array.isArray(value)) return value.map((v, i) => resolveSecrets(v, `${where}[${i}]`, env)) as T;
  if (value && typeof value === "object") {
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(value)) out[k] = resolveSecrets(v, `${where}.${k}`, env);
    return out as T;
  }
  return value;
}

