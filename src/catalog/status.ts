/** What the database holds of pg_trickle and the relay catalog (`status`, `catalog status`, `requireCatalog`). */
import type { Sql } from "../db.ts";
import { configError } from "../errors.ts";
import { CATALOG_VERSION, GRANTS, RELAY_ROLE, RELAY_SCHEMA, coreOwnerExtension, grantLabel, isPresent, probeGrants, probeObjects, probePublicExecute, readCatalogVersion, type CatalogSection, type GrantSpec, type ObjectState } from "./objects.ts";

export type Completeness = "complete" | "partial" | "missing";

export interface ObjectPresence {
  name: string;
  present: boolean;
  /** The extension that owns it, if one does. */
  extension: string | null;
}

/** Which generation of pg_trickle objects the database looks like (docs/interface.md §0). */
export type Era = "none" | "pre-0.29" | "0.29-0.45" | "0.46+";

export interface CatalogStatus {
  database: string;
  serverVersion: string;
  currentUser: string;
  relayCatalog: {
    state: Completeness;
    /** Owner of the §3 objects: an extension (0.29–0.45) or the relay's own install. */
    owner: "extension" | "relay" | null;
    ownerExtension: string | null;
    /** `pgtrickle.relay_catalog_version`, null before a relay install. */
    version: string | null;
    objects: ObjectPresence[];
    missing: string[];
  };
  /** Dead-letter table, replay function, version marker: never shipped by an extension. */
  relayOnly: { state: Completeness; objects: ObjectPresence[]; missing: string[] };
  grants: {
    roleExists: boolean;
    /** Privileges role pgtrickle_relay lacks (for objects that exist). */
    missing: string[];
    /** SECURITY DEFINER relay functions PUBLIC can still execute. */
    publicExecute: string[];
  };
  /** What the connected user lacks to run the relay (objects that exist only). */
  access: { user: string; missing: string[] };
  outboxApi: { state: Completeness; simpleMode: boolean; consumerGroups: boolean; missing: string[] };
  inboxApi: { state: Completeness; missing: string[] };
  /** pg_extension row for pg_trickle; `functionVersion` is what pgtrickle.version() returns. */
  extension: { installed: boolean; version: string | null; schema: string | null; functionVersion: string | null };
  tide: { schema: boolean; extensionVersion: string | null };
  era: Era;
  eraReason: string;
}

const OUTBOX_TABLES = ["pgt_outbox_config", "pgt_consumer_groups", "pgt_consumer_offsets"] as const;
const OUTBOX_FUNCTIONS = [
  "enable_outbox",
  "outbox_rows_consumed",
  "create_consumer_group",
  "poll_outbox",
  "commit_offset",
  "extend_lease",
  "seek_offset",
  "consumer_heartbeat",
  "consumer_lag",
] as const;
const INBOX_TABLES = ["pgt_inbox_config"] as const;
const INBOX_FUNCTIONS = ["create_inbox"] as const;

function completeness(present: number, total: number): Completeness {
  return present === 0 ? "missing" : present === total ? "complete" : "partial";
}

function versionAtLeast(version: string, major: number, minor: number): boolean {
  const [maj, min] = version.split(/[.-]/).map((p) => Number.parseInt(p, 10));
  if (maj === undefined || Number.isNaN(maj)) return false;
  return maj > major || (maj === major && (min ?? 0) >= minor);
}

/** The relay catalog's part of CatalogStatus, from the probed objects and the catalog version. */
function relayCatalogState(objects: readonly ObjectState[], version: string | null): Pick<CatalogStatus, "relayCatalog" | "relayOnly"> {
  const presence = (section: CatalogSection): ObjectPresence[] =>
    objects
      .filter((o) => o.spec.section === section || (section === "core" && o.spec.kind === "role"))
      .map((o) => ({ name: o.label, present: o.present, extension: o.extension }));
  const core = presence("core");
  const relayOnly = presence("relay");
  const ownerExtension = coreOwnerExtension(objects);
  // The role is cluster-wide: another database's install leaves it behind, so it alone does
  // not make this database's catalog "partial".
  const coreState = core.some((o) => o.present && !o.name.startsWith("role "))
    ? completeness(core.filter((o) => o.present).length, core.length)
    : "missing";
  return {
    relayCatalog: {
      state: coreState,
      owner: coreState === "missing" ? null : ownerExtension ? "extension" : "relay",
      ownerExtension,
      version,
      objects: core,
      missing: core.filter((o) => !o.present).map((o) => o.name),
    },
    relayOnly: {
      state: completeness(relayOnly.filter((o) => o.present).length, relayOnly.length),
      objects: relayOnly,
      missing: relayOnly.filter((o) => !o.present).map((o) => o.name),
    },
  };
}

/** A read-only look at what the database holds; needs no privileges beyond connecting. */
export async function catalogStatus(sql: Sql): Promise<CatalogStatus> {
  return sql.begin("read only", async (tx) => {
    const info = (
      await tx<{ database: string; server_version: string; current_user: string }[]>`
        SELECT current_database() AS database, current_setting('server_version') AS server_version,
               current_user::text AS current_user`
    )[0]!;
    const [objects, version] = await Promise.all([probeObjects(tx), readCatalogVersion(tx)]);
    const roleExists = isPresent(objects, "role", RELAY_ROLE);
    const roleGrants = roleExists ? await probeGrants(tx, RELAY_ROLE, objects) : new Map<GrantSpec, boolean>();
    const userGrants = await probeGrants(
      tx,
      info.current_user,
      objects,
      GRANTS.filter((g) => g.runtime),
    );
    const publicExecute = await probePublicExecute(tx, objects);

    const apiRels = await tx<{ relname: string }[]>`
      SELECT c.relname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
       WHERE n.nspname = ${RELAY_SCHEMA} AND c.relname = ANY(${[...OUTBOX_TABLES, ...INBOX_TABLES]})`;
    const apiFuncs = await tx<{ proname: string }[]>`
      SELECT DISTINCT p.proname FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
       WHERE n.nspname = ${RELAY_SCHEMA} AND p.proname = ANY(${[...OUTBOX_FUNCTIONS, ...INBOX_FUNCTIONS]})`;
    const tideColumn = await tx`
      SELECT 1 FROM pg_catalog.pg_attribute
        JOIN pg_catalog.pg_class c ON c.oid = attrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
       WHERE n.nspname = ${RELAY_SCHEMA} AND c.relname = 'pgt_outbox_config' AND attname = 'tide_outbox_name'
         AND NOT attisdropped`;
    const exts = await tx<{ extname: string; extversion: string; schema: string }[]>`
      SELECT e.extname, e.extversion, n.nspname AS schema
        FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
       WHERE e.extname IN ('pg_trickle', 'pg_tide')`;
    const tideSchema = await tx`SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = 'tide'`;
    // pg_trickle also answers pgtrickle.version(); it is the only version there is when the
    // objects exist without a pg_extension row (restored dumps, test doubles).
    let functionVersion: string | null = null;
    const versionFn = await tx`
      SELECT 1 FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
       WHERE n.nspname = ${RELAY_SCHEMA} AND p.proname = 'version' AND p.pronargs = 0
         AND p.prorettype = 'pg_catalog.text'::pg_catalog.regtype`;
    if (versionFn.length > 0) {
      try {
        functionVersion = await tx.savepoint(
          async (sp) => (await sp<{ v: string | null }[]>`SELECT pgtrickle.version() AS v`)[0]?.v ?? null,
        );
      } catch {
        functionVersion = null;
      }
    }

    const has = (names: readonly string[], found: readonly string[]) => names.filter((n) => found.includes(n));
    const relNames = apiRels.map((r) => r.relname);
    const funcNames = apiFuncs.map((f) => f.proname);
    const outboxPresent = [...has(OUTBOX_TABLES, relNames), ...has(OUTBOX_FUNCTIONS, funcNames)];
    const outboxMissing = [
      ...OUTBOX_TABLES.filter((t) => !relNames.includes(t)).map((t) => `table ${RELAY_SCHEMA}.${t}`),
      ...OUTBOX_FUNCTIONS.filter((f) => !funcNames.includes(f)).map((f) => `function ${RELAY_SCHEMA}.${f}`),
    ];
    const inboxPresent = [...has(INBOX_TABLES, relNames), ...has(INBOX_FUNCTIONS, funcNames)];
    const inboxMissing = [
      ...INBOX_TABLES.filter((t) => !relNames.includes(t)).map((t) => `table ${RELAY_SCHEMA}.${t}`),
      ...INBOX_FUNCTIONS.filter((f) => !funcNames.includes(f)).map((f) => `function ${RELAY_SCHEMA}.${f}`),
    ];

    const trickle = exts.find((e) => e.extname === "pg_trickle");
    const tideExt = exts.find((e) => e.extname === "pg_tide");
    let era: Era;
    let eraReason: string;
    if (trickle) {
      const v = trickle.extversion;
      era = versionAtLeast(v, 0, 46) ? "0.46+" : versionAtLeast(v, 0, 29) ? "0.29-0.45" : "pre-0.29";
      eraReason = `extension pg_trickle ${v}`;
    } else if (functionVersion && /^\d+\.\d+/.test(functionVersion)) {
      const v = functionVersion;
      era = versionAtLeast(v, 0, 46) ? "0.46+" : versionAtLeast(v, 0, 29) ? "0.29-0.45" : "pre-0.29";
      eraReason = `pgtrickle.version() = ${v}, no pg_extension row`;
    } else if (tideExt || tideSchema.length > 0 || tideColumn.length > 0) {
      era = "0.46+";
      eraReason = tideExt
        ? `extension pg_tide ${tideExt.extversion}`
        : tideSchema.length > 0
          ? "schema tide exists"
          : "pgtrickle.pgt_outbox_config has tide_outbox_name";
    } else if (relNames.includes("pgt_outbox_config") || funcNames.includes("poll_outbox")) {
      era = "0.29-0.45";
      eraReason = "pgtrickle outbox objects present without the pg_trickle extension row";
    } else {
      era = "none";
      eraReason = "no pg_trickle extension and no outbox objects";
    }

    return {
      database: info.database,
      serverVersion: info.server_version,
      currentUser: info.current_user,
      ...relayCatalogState(objects, version),
      grants: {
        roleExists,
        missing: [...roleGrants].filter(([, ok]) => !ok).map(([g]) => grantLabel(g, RELAY_ROLE)),
        publicExecute,
      },
      access: {
        user: info.current_user,
        missing: [...userGrants].filter(([, ok]) => !ok).map(([g]) => grantLabel(g, info.current_user)),
      },
      outboxApi: {
        state: completeness(outboxPresent.length, OUTBOX_TABLES.length + OUTBOX_FUNCTIONS.length),
        simpleMode: relNames.includes("pgt_outbox_config"),
        consumerGroups:
          relNames.includes("pgt_consumer_groups") && funcNames.includes("poll_outbox") && funcNames.includes("commit_offset"),
        missing: outboxMissing,
      },
      inboxApi: {
        state: completeness(inboxPresent.length, INBOX_TABLES.length + INBOX_FUNCTIONS.length),
        missing: inboxMissing,
      },
      extension: {
        installed: !!trickle,
        version: trickle?.extversion ?? null,
        schema: trickle?.schema ?? null,
        functionVersion,
      },
      tide: { schema: tideSchema.length > 0, extensionVersion: tideExt?.extversion ?? null },
      era,
      eraReason,
    };
  });
}

const ERA_LABEL: Record<Era, string> = {
  none: "no pg_trickle objects",
  "pre-0.29": "pg_trickle before 0.29 (no relay catalog in the extension)",
  "0.29-0.45": "pg_trickle 0.29–0.45 object set (pgtrickle.outbox_*, consumer groups, inbox API)",
  "0.46+": "pg_trickle 0.46+ (outbox/inbox moved to pg_tide, schema tide)",
};

function listShort(items: readonly string[], max = 4): string {
  return items.length <= max ? items.join(", ") : `${items.slice(0, max).join(", ")} and ${items.length - max} more`;
}

/** Human-readable lines for `pgtrickle-relay status` / `catalog status`. */
export function formatCatalogStatus(s: CatalogStatus): string {
  const rc = s.relayCatalog;
  const pad = (k: string) => `${k}:`.padEnd(15);
  const lines = [`${pad("database")}${s.database} (PostgreSQL ${s.serverVersion.split(" ")[0]}, connected as ${s.currentUser})`];
  lines.push(
    `${pad("pg_trickle")}${s.extension.installed ? `extension ${s.extension.version} in schema ${s.extension.schema}` : "no extension row"}; looks like ${ERA_LABEL[s.era]} (${s.eraReason})`,
  );
  if (s.tide.schema || s.tide.extensionVersion) {
    lines.push(`${pad("pg_tide")}${s.tide.extensionVersion ? `extension ${s.tide.extensionVersion}` : "schema tide present"}`);
  }
  const owner = rc.owner === "extension" ? `owned by extension ${rc.ownerExtension}` : rc.owner === "relay" ? "installed by the relay" : "";
  lines.push(
    `${pad("relay catalog")}${rc.state}${rc.state === "missing" ? " — run `pgtrickle-relay catalog install`" : `, ${owner}`}${rc.version ? `, version ${rc.version}` : ""}`,
  );
  if (rc.state === "partial") lines.push(`${" ".repeat(15)}missing: ${rc.missing.join(", ")}`);
  const ro = s.relayOnly;
  lines.push(
    `${pad("dead letters")}${ro.state === "complete" ? "present (pgtrickle.relay_dead_letters, replay_relay_dead_letters)" : `${ro.state} — run \`pgtrickle-relay catalog install\``}`,
  );
  if (ro.state === "partial") lines.push(`${" ".repeat(15)}missing: ${ro.missing.join(", ")}`);
  if (!s.grants.roleExists) lines.push(`${pad("role")}${RELAY_ROLE} does not exist`);
  else if (rc.state === "missing") lines.push(`${pad("role")}${RELAY_ROLE} exists (roles are cluster-wide)`);
  else if (s.grants.missing.length > 0) lines.push(`${pad("role")}${RELAY_ROLE} lacks: ${listShort(s.grants.missing)}`);
  else lines.push(`${pad("role")}${RELAY_ROLE} holds every grant the relay needs`);
  if (s.grants.publicExecute.length > 0) {
    lines.push(`${" ".repeat(15)}warning: PUBLIC may execute ${listShort(s.grants.publicExecute)}`);
  }
  lines.push(
    `${pad("access")}${s.access.missing.length === 0 ? `${s.access.user}: ok` : `${s.access.user} lacks: ${listShort(s.access.missing)}`}`,
  );
  const ob = s.outboxApi;
  lines.push(
    `${pad("outbox API")}${ob.state}${ob.state === "missing" ? "" : `; offsets mode ${ob.simpleMode ? "available" : "unavailable"}, consumer groups ${ob.consumerGroups ? "available" : "unavailable"}`}`,
  );
  if (ob.state === "partial") lines.push(`${" ".repeat(15)}missing: ${listShort(ob.missing)}`);
  lines.push(`${pad("inbox API")}${s.inboxApi.state}${s.inboxApi.state === "partial" ? ` (missing: ${s.inboxApi.missing.join(", ")})` : ""}`);
  return lines.join("\n");
}

// ── startup check ───────────────────────────────────────────────────────────────────────────

/**
 * The relay's startup gate (docs/interface.md §7.2): a config error naming the database and
 * the fix unless the relay catalog and the dead-letter table are both there. It reads only what
 * it decides on — not the grants, outbox/inbox APIs or pg_trickle version that catalogStatus
 * reads (some twenty statements, each a round trip or two): a few statements, one transaction.
 */
export async function requireCatalog(sql: Sql): Promise<Pick<CatalogStatus, "database" | "relayCatalog" | "relayOnly">> {
  // The version's statements first: without parameters, they go out with the probe's.
  const [version, objects, [info]] = await sql.begin("read only", (tx) =>
    Promise.all([readCatalogVersion(tx), probeObjects(tx, { fingerprints: false }), tx<{ database: string }[]>`SELECT current_database() AS database`]),
  );
  const status = { database: info!.database, ...relayCatalogState(objects, version) };
  const fix = "run `pgtrickle-relay catalog install`";
  const db = `"${status.database}"`;
  const rc = status.relayCatalog;
  if (rc.state === "missing") {
    throw configError(`relay catalog not found in database ${db} (no pgtrickle.relay_outbox_config): ${fix}`);
  }
  if (rc.state === "partial") {
    // `catalog install` never touches an extension's objects, so it cannot repair them.
    const howToFix = rc.owner === "extension" ? `it belongs to extension ${rc.ownerExtension}: repair or upgrade that extension` : fix;
    throw configError(`relay catalog incomplete in database ${db} (missing ${rc.missing.join(", ")}): ${howToFix}`);
  }
  if (status.relayOnly.state !== "complete") {
    throw configError(
      `relay dead-letter objects not found in database ${db} (missing ${status.relayOnly.missing.join(", ")}): ${fix}`,
    );
  }
  if (rc.version !== null && Number(rc.version) < Number(CATALOG_VERSION)) {
    throw configError(`relay catalog version ${rc.version} in database ${db} is older than ${CATALOG_VERSION}: ${fix}`);
  }
  return status;
}
