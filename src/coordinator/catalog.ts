/**
 * What the catalog wants running (docs/interface.md §7.2, §7.4): the enabled pipelines of
 * `list_relay_configs()`, each with the fingerprint of its secret-resolved config, so that a
 * changed config — or a rotated secret — restarts the pipeline and nothing else does.
 */
import { createHash } from "node:crypto";
import type { Sql } from "../db.ts";
import { errorMessage } from "../errors.ts";
import { loadBackends } from "../backends/index.ts";
import { normalizePipeline, type CatalogRow, type PipelineSpec } from "../pipeline-config.ts";
import { resolveSecrets } from "../secrets.ts";

/** A pipeline the catalog wants running, with the fingerprint of its secret-resolved config. */
export interface Desired {
  row: CatalogRow;
  fingerprint: string;
  /** Set when a `${env:…}`/`${file:…}` token cannot be resolved: the pipeline fails, others run. */
  secretError: string | null;
}

export const keyOf = (r: { name: string; direction: string }) => `${r.direction}:${r.name}`;

/**
 * The desired pipelines by key: the enabled ones (only those named in `only`, when given), their
 * backends loaded — the coordinator builds pipelines synchronously, so client libraries load here.
 */
export async function loadDesired(sql: Sql, only: string[] | undefined): Promise<Map<string, Desired>> {
  const rows = await loadCatalog(sql, only);
  await loadBackends(rows.flatMap(validSpecs));
  return new Map(rows.map((r) => [keyOf(r), desire(r)]));
}

async function loadCatalog(sql: Sql, only: string[] | undefined): Promise<CatalogRow[]> {
  const rows = await sql<CatalogRow[]>`SELECT name, direction, enabled, config FROM pgtrickle.list_relay_configs()`;
  return rows.filter((r) => r.enabled && (!only || only.includes(r.name)));
}

/** The pipeline a catalog row names; none when the row is invalid (startWorker reports that). */
function validSpecs(row: CatalogRow): PipelineSpec[] {
  try {
    return [normalizePipeline(row)];
  } catch {
    return [];
  }
}

/** Resolves secrets now (they may have rotated) and fingerprints the RESOLVED config. */
function desire(row: CatalogRow): Desired {
  const raw = JSON.stringify(row.config);
  try {
    const resolved = JSON.stringify(resolveSecrets(row.config, `pipeline '${row.name}'`));
    return { row, fingerprint: sha256(resolved), secretError: null };
  } catch (err) {
    return { row, fingerprint: `unresolved:${sha256(raw)}`, secretError: errorMessage(err) };
  }
}

function sha256(text: string): string {
  return createHash("sha256").update(text).digest("hex");
}
