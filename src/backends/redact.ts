/** What several backends do the same way with the files their TLS settings name. */
import { readFileSync } from "node:fs";
import { configError, errorMessage } from "../errors.ts";

/** The bytes of the file `path`; a config error naming `setting` (e.g. `kafka ssl_ca`) when it cannot be read. */
export function readSettingFile(path: string, setting: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    throw configError(`${setting} '${path}' cannot be read (${(err as { code?: string }).code ?? errorMessage(err)})`);
  }
}
