/** What several backends do the same way with secrets and the files their TLS settings name. */
import { readFileSync } from "node:fs";
import { configError, errorMessage } from "../errors.ts";

/** `text` with every occurrence of each (non-empty) secret replaced by `***`. */
export function redactSecrets(text: string, secrets: readonly string[]): string {
  let out = text;
  for (const s of secrets) if (s) out = out.split(s).join("***");
  return out;
}

/** `text` with the userinfo of any `scheme://user:pass@` taken out, then every secret redacted. */
export function redactUrlsAndSecrets(text: string, secrets: readonly string[]): string {
  return redactSecrets(text.replace(/(\w+:\/\/)[^@\s/]+@/g, "$1***@"), secrets);
}

/** The bytes of the file `path`; a config error naming `setting` (e.g. `kafka ssl_ca`) when it cannot be read. */
export function readSettingFile(path: string, setting: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    throw configError(`${setting} '${path}' cannot be read (${(err as { code?: string }).code ?? errorMessage(err)})`);
  }
}
