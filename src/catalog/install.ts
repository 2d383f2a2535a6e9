/** `catalog install`: applies catalog.sql idempotently, granting what the relay login lacks (docs/interface.md §3). */
import type { Sql } from "../db.ts";
import { errorKind, errorMessage, RelayError } from "../errors.ts";
import { CATALOG_VERSION, INSTALL_LOCK, RELAY_ROLE, catalogSections, coreOwnerExtension, grantLabel, isPresent, probeGrants, probeObjects, probePublicExecute, readCatalogVersion, type GrantSpec, type Q } from "./objects.ts";

export interface InstallResult {
  database: string;
  /** The catalog version now installed (CATALOG_VERSION). */
  version: string;
  previousVersion: string | null;
  /** Who owns the §3 objects: this relay's script, or an extension (then they were not touched). */
  owner: "relay" | "extension";
  ownerExtension: string | null;
  created: string[];
  /** Existed before with a different definition (functions) or version. */
  updated: string[];
  /** Privileges pgtrickle_relay did not hold before. */
  granted: string[];
  /** SECURITY DEFINER functions whose PUBLIC EXECUTE was revoked. */
  revoked: string[];
  /** Already present and identical. */
  unchanged: string[];
  /** Extension-owned objects left as they are. */
  skipped: string[];
  nothingToDo: boolean;
  /** One line for a log: what changed, or "nothing to do". */
  summary: string;
  /** Things an operator should know (grants the extension lacks, objects it is missing). */
  notes: string[];
  /**
   * GRANT statements, one each, that the owner of an extension-owned catalog must still run
   * because this login could not (it is neither a superuser nor the objects' owner).
   */
  ownerStatements: string[];
}

/**
 * Grants pgtrickle_relay what it lacks where an extension owns the §3 objects (pg_trickle 0.29–0.45
 * creates them, and its schema, without those grants: docs/pg_trickle.md). Only a superuser or
 * the owner may; for anyone else GRANT fails or grants nothing, and the caller's next probe
 * reports what is still missing as statements for an owner. Each GRANT runs in a savepoint so
 * a refusal does not abort the install.
 */
async function grantOnExtensionObjects(tx: Q & { savepoint: Sql["begin"] }, held: Map<GrantSpec, boolean>): Promise<void> {
  for (const [g, ok] of held) {
    if (ok) continue;
    try {
      await tx.savepoint((sp) => sp.unsafe(grantLabel(g, RELAY_ROLE)));
    } catch (err) {
      if ((err as { code?: string }).code !== "42501") throw err;
    }
  }
}

/**
 * Applies catalog.sql in one transaction under an advisory lock, so replicas starting together
 * do not collide. Idempotent: a second run creates nothing and reports `nothingToDo`. When an
 * extension owns the §3 tables (pg_trickle 0.29–0.45), only the relay-only objects are added.
 */
export async function installCatalog(sql: Sql): Promise<InstallResult> {
  const sections = catalogSections();
  try {
    return await sql.begin(async (tx) => {
      await tx`SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended(${INSTALL_LOCK}, 0))`;
      const database = (await tx<{ database: string }[]>`SELECT current_database() AS database`)[0]!.database;
      const before = await probeObjects(tx);
      const ownerExtension = coreOwnerExtension(before);
      const roleBefore = isPresent(before, "role", RELAY_ROLE);
      const grantsBefore = roleBefore ? await probeGrants(tx, RELAY_ROLE, before) : new Map<GrantSpec, boolean>();
      const publicBefore = await probePublicExecute(tx, before);
      const previousVersion = await readCatalogVersion(tx);

      await tx.unsafe(sections.common).simple();
      if (!ownerExtension) await tx.unsafe(sections.core).simple();
      await tx.unsafe(sections.relay).simple();

      const after = await probeObjects(tx);
      if (ownerExtension) await grantOnExtensionObjects(tx, await probeGrants(tx, RELAY_ROLE, after));
      const grantsAfter = await probeGrants(tx, RELAY_ROLE, after);
      const publicAfter = await probePublicExecute(tx, after);
      const version = (await readCatalogVersion(tx)) ?? CATALOG_VERSION;

      const result: InstallResult = {
        database,
        version,
        previousVersion,
        owner: ownerExtension ? "extension" : "relay",
        ownerExtension,
        created: [],
        updated: [],
        granted: [],
        revoked: publicBefore.filter((f) => !publicAfter.includes(f)),
        unchanged: [],
        skipped: [],
        nothingToDo: false,
        summary: "",
        notes: [],
        ownerStatements: [],
      };
      for (let i = 0; i < after.length; i++) {
        const b = before[i]!;
        const a = after[i]!;
        if (ownerExtension && a.spec.section === "core") {
          if (a.present) result.skipped.push(a.label);
          else result.notes.push(`${a.label} is missing, but the relay catalog belongs to extension ${ownerExtension}: repair or upgrade the extension`);
        } else if (!b.present && a.present) result.created.push(a.label);
        else if (b.present && a.fingerprint !== b.fingerprint) result.updated.push(a.label);
        else if (a.present) result.unchanged.push(a.label);
      }
      if (previousVersion !== null && previousVersion !== version) {
        result.updated.push(`relay catalog version ${previousVersion} → ${version}`);
      }
      for (const [g, ok] of grantsAfter) {
        if (ok && !grantsBefore.get(g)) result.granted.push(grantLabel(g, RELAY_ROLE));
      }
      if (ownerExtension) {
        result.ownerStatements = [...grantsAfter].filter(([, ok]) => !ok).map(([g]) => `${grantLabel(g, RELAY_ROLE)};`);
        if (result.ownerStatements.length > 0) {
          result.notes.push(
            `extension ${ownerExtension} owns the relay tables and this login may not grant on them: ` +
              `${RELAY_ROLE} lacks ${result.ownerStatements.length} privileges; an owner (a superuser) must run the statements printed below`,
          );
        }
        if (publicAfter.length > 0) {
          result.notes.push(`PUBLIC may execute the extension's SECURITY DEFINER functions: ${publicAfter.join(", ")}`);
        }
      }
      result.nothingToDo =
        result.created.length === 0 &&
        result.updated.length === 0 &&
        result.granted.length === 0 &&
        result.revoked.length === 0;
      result.summary = summarize(result);
      return result;
    });
  } catch (err) {
    if (err instanceof RelayError) throw err;
    const code = (err as { code?: string }).code;
    const hint =
      code !== "42501"
        ? ""
        : /pgt_stream_tables/.test(errorMessage(err))
          ? // pg_trickle's ddl_command_end trigger reads it as whoever runs DDL (docs/pg_trickle.md)
            " (pg_trickle's DDL event trigger reads pgtrickle.pgt_stream_tables as the installing login: install as a superuser, or GRANT SELECT ON pgtrickle.pgt_stream_tables to this login)"
          : " (installing needs a superuser, or the owner of schema pgtrickle with CREATEROLE when role pgtrickle_relay does not exist yet)";
    throw new RelayError(errorKind(err), `relay catalog install failed: ${errorMessage(err)}${hint}`, { cause: err });
  }
}

function summarize(r: InstallResult): string {
  const owner = r.ownerExtension ? `; relay tables owned by extension ${r.ownerExtension}, their definitions left untouched` : "";
  const notes = r.notes.length > 0 ? `; ${r.notes.join("; ")}` : "";
  if (r.nothingToDo) return `relay catalog version ${r.version} already installed in database ${r.database}: nothing to do${owner}${notes}`;
  const parts = [
    r.created.length > 0
      ? `created ${r.created.length <= 3 ? r.created.map(shortLabel).join(", ") : `${r.created.length} objects`}`
      : "",
    r.updated.length > 0 ? `updated ${r.updated.map(shortLabel).join(", ")}` : "",
    r.granted.length > 0 ? `granted ${r.granted.length} privileges to ${RELAY_ROLE}` : "",
    r.revoked.length > 0 ? `revoked PUBLIC EXECUTE on ${r.revoked.length} functions` : "",
  ].filter(Boolean);
  return `relay catalog version ${r.version} installed in database ${r.database}: ${parts.join(", ")}${owner}${notes}`;
}

/** `table pgtrickle.relay_dead_letters` → `relay_dead_letters`, for one-line summaries. */
function shortLabel(label: string): string {
  return label
    .replace(/^(table|index|function|schema|role|trigger) /, "")
    .replace(/ on pgtrickle\..*$/, "")
    .replace(/^pgtrickle\./, "")
    .replace(/\(.*\)$/, "()");
}
