/** The file backend's options: the stdout/file sink's and the stdin/file source's schemas. */
import * as v from "valibot";
import { positiveInt } from "../schema.ts";
import { reverseSourceKeys } from "../../inbound.ts";

/** Options of the stdout/file sink (docs/interface.md §5.3). */
export const StdoutSinkConfig = v.looseObject({
  format: v.pipe(
    v.optional(v.picklist(["jsonl", "json_pretty", "csv"]), "jsonl"),
    v.description("`jsonl` (one envelope per line), `json_pretty` (indented), or `csv` (header once per file)."),
  ),
  output: v.pipe(v.optional(v.string()), v.description("File path, opened for append; absent = standard output. Alias `path`.")),
  path: v.pipe(v.optional(v.string()), v.description("Alias of `output`.")),
  rotate_bytes: v.pipe(
    v.optional(positiveInt()),
    v.description("Rotate the file once it reaches this many bytes: it is renamed to `<output>.<timestamp>`."),
  ),
  fsync: v.pipe(v.optional(v.boolean(), true), v.description("fsync the file after every batch, before the batch is acknowledged.")),
});
export type StdoutSinkConfig = v.InferOutput<typeof StdoutSinkConfig>;

/** Options of the stdin/file source (docs/interface.md §5.4). */
export const StdinSourceConfig = v.looseObject({
  ...reverseSourceKeys,
  format: v.pipe(
    v.optional(v.picklist(["jsonl", "json_pretty"]), "jsonl"),
    v.description("`jsonl` (one JSON value per line) or `json_pretty` (JSON values spanning lines, as the stdout sink writes them)."),
  ),
  input: v.pipe(
    v.optional(v.pipe(v.string(), v.minLength(1))),
    v.description("File to read; absent or `-` = standard input. The position in a file survives restarts. Alias `path`."),
  ),
  path: v.pipe(v.optional(v.pipe(v.string(), v.minLength(1))), v.description("Alias of `input`.")),
  follow: v.pipe(
    v.optional(v.boolean(), false),
    v.description("Keep reading a file as it grows (like `tail -F`); false: the pipeline ends once the file is read."),
  ),
});
export type StdinSourceConfig = v.InferOutput<typeof StdinSourceConfig>;
