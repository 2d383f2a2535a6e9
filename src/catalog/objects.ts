/** What the relay catalog consists of (catalog.sql, its objects and grants) and how to probe a database for them. */
import type postgres from "postgres";
import type { Sql } from "../db.ts";
import { configError, errorKind, errorMessage, RelayError } from "../errors.ts";
// A static text import: `bun build --compile` embeds the file, so the binary can install the
// catalog with nothing else on disk.
import catalogSql from "./catalog.sql" with { type: "text" };

/** The whole catalog script (docs/interface.md §3, relay-only objects of §3.5 included); `psql -1 -f`-able. */
export const CATALOG_SQL: string = catalogSql;
/** Written to `pgtrickle.relay_catalog_version` by catalog.sql; bump both together. */
export const CATALOG_VERSION = "1";
export const RELAY_SCHEMA = "pgtrickle";
export const RELAY_ROLE = "pgtrickle_relay";
/** Also taken by catalog.sql itself, so `psql -1 -f catalog.sql` serialises with the binary. */
export const INSTALL_LOCK = "pgtrickle-relay catalog install";

export type Q = postgres.ISql<Record<string, never>>;

// ── What the catalog consists of ────────────────────────────────────────────────────────────

export type CatalogSection = "common" | "core" | "relay";

/** catalog.sql split at its `-- >>> section: <name>` markers. */
export function catalogSections(text: string = CATALOG_SQL): Record<CatalogSection, string> {
  const parts = text.split(/^-- >>> section: (\w+)[ \t]*$/m);
  const out: Partial<Record<CatalogSection, string>> = {};
  for (let i = 1; i + 1 < parts.length; i += 2) out[parts[i] as CatalogSection] = parts[i + 1]!;
  for (const s of ["common", "core", "relay"] as const) {
    if (!out[s]?.trim()) throw new Error(`catalog.sql has no "${s}" section`);
  }
  return out as Record<CatalogSection, string>;
}

/** The §3 tables; if an extension owns them, the whole core section is left alone. */
const CORE_TABLES = ["relay_outbox_config", "relay_inbox_config", "relay_consumer_offsets"] as const;
/** The seven API functions, as `name(argtypes)` without spaces. */
export const RELAY_FUNCTIONS = [
  "set_relay_outbox(text,text,text,jsonb,integer,boolean)",
  "set_relay_inbox(text,text,jsonb,integer,text,boolean,integer,boolean)",
  "enable_relay(text)",
  "disable_relay(text)",
  "delete_relay(text)",
  "get_relay_config(text)",
  "list_relay_configs()",
] as const;
const TRIGGER_FUNCTION = "relay_config_notify()";
const CORE_TRIGGERS = [
  { name: "relay_outbox_config_notify", table: "relay_outbox_config" },
  { name: "relay_inbox_config_notify", table: "relay_inbox_config" },
] as const;
const RELAY_TABLES = ["relay_dead_letters", "relay_catalog_version", "relay_pipeline_status", "relay_source_positions"] as const;
const RELAY_INDEXES = ["relay_dead_letters_replay_pending"] as const;
const REPLAY_FUNCTION = "replay_relay_dead_letters(text,bigint)";
const DEAD_LETTER_SEQUENCE = "relay_dead_letters_id_seq";

type ObjectKind = "schema" | "role" | "table" | "index" | "function" | "trigger";

interface ObjectSpec {
  kind: ObjectKind;
  /** table/index/function (signature)/trigger name; for a trigger, `table` is its table. */
  name: string;
  table?: string;
  section: CatalogSection;
}

const OBJECTS: readonly ObjectSpec[] = [
  { kind: "schema", name: RELAY_SCHEMA, section: "common" },
  { kind: "role", name: RELAY_ROLE, section: "common" },
  ...CORE_TABLES.map((name) => ({ kind: "table" as const, name, section: "core" as const })),
  { kind: "function", name: TRIGGER_FUNCTION, section: "core" },
  ...CORE_TRIGGERS.map((t) => ({ kind: "trigger" as const, name: t.name, table: t.table, section: "core" as const })),
  ...RELAY_FUNCTIONS.map((name) => ({ kind: "function" as const, name, section: "core" as const })),
  ...RELAY_TABLES.map((name) => ({ kind: "table" as const, name, section: "relay" as const })),
  ...RELAY_INDEXES.map((name) => ({ kind: "index" as const, name, section: "relay" as const })),
  { kind: "function", name: REPLAY_FUNCTION, section: "relay" },
];

function objectLabel(o: ObjectSpec): string {
  switch (o.kind) {
    case "schema":
    case "role":
      return `${o.kind} ${o.name}`;
    case "trigger":
      return `trigger ${o.name} on ${RELAY_SCHEMA}.${o.table}`;
    default:
      return `${o.kind} ${RELAY_SCHEMA}.${o.name}`;
  }
}

type PrivKind = "schema" | "table" | "sequence" | "function";
export interface GrantSpec {
  kind: PrivKind;
  /** Name without schema (schema: the schema itself); functions as signatures. */
  object: string;
  privilege: string;
  section: CatalogSection;
  /** Needed by the running relay (as opposed to pipeline management). */
  runtime: boolean;
}

export const GRANTS: readonly GrantSpec[] = [
  { kind: "schema", object: RELAY_SCHEMA, privilege: "USAGE", section: "common", runtime: true },
  ...RELAY_FUNCTIONS.map((f) => ({
    kind: "function" as const,
    object: f,
    privilege: "EXECUTE",
    section: "core" as const,
    runtime: f.startsWith("list_relay_configs") || f.startsWith("get_relay_config"),
  })),
  ...["relay_outbox_config", "relay_inbox_config"].map((t) => ({
    kind: "table" as const,
    object: t,
    privilege: "SELECT",
    section: "core" as const,
    runtime: true,
  })),
  ...["SELECT", "INSERT", "UPDATE"].map((privilege) => ({
    kind: "table" as const,
    object: "relay_consumer_offsets",
    privilege,
    section: "core" as const,
    runtime: true,
  })),
  { kind: "function", object: REPLAY_FUNCTION, privilege: "EXECUTE", section: "relay", runtime: false },
  // The tables the running relay writes: dead letters, its status, source positions.
  ...["relay_dead_letters", "relay_pipeline_status", "relay_source_positions"].flatMap((object) =>
    ["SELECT", "INSERT", "UPDATE"].map((privilege) => ({
      kind: "table" as const,
      object,
      privilege,
      section: "relay" as const,
      runtime: true,
    })),
  ),
  { kind: "sequence", object: DEAD_LETTER_SEQUENCE, privilege: "USAGE", section: "relay", runtime: true },
  { kind: "table", object: "relay_catalog_version", privilege: "SELECT", section: "relay", runtime: true },
];

function grantObjectName(g: GrantSpec): string {
  return g.kind === "schema" ? g.object : `${RELAY_SCHEMA}.${g.object}`;
}

export function grantLabel(g: GrantSpec, grantee: string): string {
  const kind = g.kind === "table" ? "" : `${g.kind.toUpperCase()} `;
  return `GRANT ${g.privilege} ON ${kind}${grantObjectName(g)} TO ${grantee}`;
}

/** SECURITY DEFINER functions the catalog revokes from PUBLIC. */
const DEFINER_FUNCTIONS: readonly { name: string; section: CatalogSection }[] = [
  { name: TRIGGER_FUNCTION, section: "core" },
  ...RELAY_FUNCTIONS.map((name) => ({ name, section: "core" as const })),
  { name: REPLAY_FUNCTION, section: "relay" },
];

// ── Probing the database ────────────────────────────────────────────────────────────────────

export interface ObjectState {
  spec: ObjectSpec;
  label: string;
  present: boolean;
  /** Name of the extension the object belongs to (pg_depend deptype 'e'), if any. */
  extension: string | null;
  /** md5 of pg_get_functiondef for functions: tells a replaced definition from an identical one. */
  fingerprint: string | null;
}

/**
 * Which catalog objects exist, and the extension owning each, in one statement: postgres.js
 * sends a new parameterized statement in two round trips (describe, then execute) and queues
 * whatever follows behind it, so one statement costs a cold process two round trips where five
 * cost ten. `fingerprints: false` leaves the function fingerprints out (pg_get_functiondef is the
 * costliest part; only install compares them).
 */
export async function probeObjects(q: Q, { fingerprints = true } = {}): Promise<ObjectState[]> {
  const relNames = OBJECTS.filter((o) => o.kind === "table" || o.kind === "index").map((o) => o.name);
  // Signatures in the RELAY_FUNCTIONS form: `name(type,type)`.
  const sigs = OBJECTS.filter((o) => o.kind === "function").map((o) => o.name);
  // The extension an object belongs to (pg_depend deptype 'e'), for objects of catalog `cls`.
  const owner = (cls: string, oid: string) => `(SELECT e.extname FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid
             WHERE d.classid = '${cls}'::regclass AND d.objid = ${oid}
               AND d.refclassid = 'pg_catalog.pg_extension'::regclass AND d.deptype = 'e' LIMIT 1)`;
  // Functions are matched through the catalogs, not to_regprocedure(): that needs USAGE on the
  // schema, and status must work for a login that lacks it. Their names are matched first: a
  // signature costs type lookups, which a schema with many functions (pg_trickle's) makes slow.
  const rows = await q.unsafe<{ kind: "schema" | "role" | "rel" | "function" | "trigger"; name: string; relname: string | null; extension: string | null; fingerprint: string | null }[]>(
    // Text columns: a `name` column (63 bytes) would cut the longest signatures short.
    `SELECT 'schema' AS kind, n.nspname::text AS name, NULL::text AS relname, ${owner("pg_catalog.pg_namespace", "n.oid")}::text AS extension, NULL::text AS fingerprint
       FROM pg_catalog.pg_namespace n WHERE n.nspname = $1
     UNION ALL
     SELECT 'role', r.rolname, NULL, NULL, NULL FROM pg_catalog.pg_roles r WHERE r.rolname = $2
     UNION ALL
     SELECT 'rel', c.relname, NULL, ${owner("pg_catalog.pg_class", "c.oid")}, NULL
       FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
      WHERE n.nspname = $1 AND c.relname = ANY($3::text[])
     UNION ALL
     SELECT 'function', f.sig, NULL, ${owner("pg_catalog.pg_proc", "f.oid")},
            CASE WHEN $5 THEN md5(pg_catalog.pg_get_functiondef(f.oid)) END
       FROM (SELECT p.oid, p.proname || '(' || replace(pg_catalog.oidvectortypes(p.proargtypes), ' ', '') || ')' AS sig
               FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = $1 AND p.proname = ANY($7::text[])) f
      WHERE f.sig = ANY($4::text[])
     UNION ALL
     SELECT 'trigger', t.tgname, c.relname, NULL, NULL
       FROM pg_catalog.pg_trigger t
       JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
       JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
      WHERE n.nspname = $1 AND NOT t.tgisinternal AND t.tgname = ANY($6::text[])`,
    [RELAY_SCHEMA, RELAY_ROLE, relNames, sigs, fingerprints, CORE_TRIGGERS.map((t) => t.name), sigs.map((sig) => sig.slice(0, sig.indexOf("(")))],
  );
  const found = (kind: string, name: string, relname: string | null = null) => rows.find((r) => r.kind === kind && r.name === name && r.relname === relname);

  return OBJECTS.map((spec): ObjectState => {
    const base = { spec, label: objectLabel(spec), extension: null, fingerprint: null, present: false };
    const row =
      spec.kind === "trigger" ? found("trigger", spec.name, spec.table!) : found(spec.kind === "table" || spec.kind === "index" ? "rel" : spec.kind, spec.name);
    if (!row) return base;
    return { ...base, present: true, extension: row.extension, fingerprint: row.fingerprint };
  });
}

export function isPresent(objects: readonly ObjectState[], kind: ObjectKind, name: string): boolean {
  return objects.some((o) => o.spec.kind === kind && o.spec.name === name && o.present);
}

/** Whether the object a grant is about exists, so the has_*_privilege call cannot fail. */
function grantTargetPresent(objects: readonly ObjectState[], g: GrantSpec): boolean {
  switch (g.kind) {
    case "schema":
      return isPresent(objects, "schema", g.object);
    case "table":
      return isPresent(objects, "table", g.object);
    case "function":
      return isPresent(objects, "function", g.object);
    case "sequence":
      return isPresent(objects, "table", "relay_dead_letters");
  }
}

/**
 * For each grant whose object exists: does `role` hold the privilege (directly, via a role it
 * inherits, or via PUBLIC)? `role` may be `public`. Superusers hold everything.
 */
export async function probeGrants(
  q: Q,
  role: string,
  objects: readonly ObjectState[],
  specs: readonly GrantSpec[] = GRANTS,
): Promise<Map<GrantSpec, boolean>> {
  const checkable = specs.filter((g) => grantTargetPresent(objects, g));
  const out = new Map<GrantSpec, boolean>();
  if (checkable.length === 0) return out;
  // By OID: a name argument is resolved with a USAGE check on the schema, which would turn a
  // missing privilege into an error instead of an answer.
  const rows = await q<{ i: string; ok: boolean }[]>`
    WITH ns AS (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = ${RELAY_SCHEMA})
    SELECT x.i, CASE x.kind
             WHEN 'schema' THEN pg_catalog.has_schema_privilege(${role}::name, (SELECT oid FROM ns), x.priv)
             WHEN 'table' THEN pg_catalog.has_table_privilege(${role}::name,
                 (SELECT c.oid FROM pg_catalog.pg_class c WHERE c.relnamespace = (SELECT oid FROM ns) AND c.relname = x.obj), x.priv)
             WHEN 'sequence' THEN pg_catalog.has_sequence_privilege(${role}::name,
                 (SELECT c.oid FROM pg_catalog.pg_class c WHERE c.relnamespace = (SELECT oid FROM ns) AND c.relname = x.obj), x.priv)
             WHEN 'function' THEN pg_catalog.has_function_privilege(${role}::name,
                 (SELECT p.oid FROM pg_catalog.pg_proc p WHERE p.pronamespace = (SELECT oid FROM ns) AND p.proname || '(' || replace(pg_catalog.oidvectortypes(p.proargtypes), ' ', '') || ')' = x.obj), x.priv)
           END AS ok
      FROM unnest(${checkable.map((g) => g.kind)}::text[], ${checkable.map((g) => g.object)}::text[],
                  ${checkable.map((g) => g.privilege)}::text[]) WITH ORDINALITY AS x(kind, obj, priv, i)`;
  for (const r of rows) out.set(checkable[Number(r.i) - 1]!, r.ok);
  return out;
}

/** Definer functions (that exist) still executable by PUBLIC. */
export async function probePublicExecute(q: Q, objects: readonly ObjectState[]): Promise<string[]> {
  const specs = DEFINER_FUNCTIONS.filter((f) => isPresent(objects, "function", f.name)).map(
    (f): GrantSpec => ({ kind: "function", object: f.name, privilege: "EXECUTE", section: f.section, runtime: false }),
  );
  const held = await probeGrants(q, "public", objects, specs);
  return specs.filter((s) => held.get(s)).map((s) => `${RELAY_SCHEMA}.${s.object}`);
}

/**
 * `pgtrickle.relay_catalog_version`, or null when the table is missing or unreadable. Needs no
 * object probe first, and its statements take no parameters (postgres.js sends those without
 * waiting for a describe round trip), so it travels with the statements issued beside it.
 */
export async function readCatalogVersion(q: Q): Promise<string | null> {
  // Status must work for any login: check first, because a denied SELECT aborts the transaction.
  // By OID, like probeGrants: resolving the name would itself need USAGE on the schema. A
  // missing table answers no row.
  const [can] = await q<{ ok: boolean }[]>`
    SELECT pg_catalog.has_schema_privilege(n.oid, 'USAGE') AND pg_catalog.has_table_privilege(c.oid, 'SELECT') AS ok
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = 'pgtrickle' AND c.relname = 'relay_catalog_version'`;
  if (!can?.ok) return null;
  const rows = await q<{ version: string }[]>`SELECT version FROM pgtrickle.relay_catalog_version LIMIT 1`;
  return rows[0]?.version ?? null;
}

/** The extension owning any of the §3 tables or functions, if one does. */
export function coreOwnerExtension(objects: readonly ObjectState[]): string | null {
  return objects.find((o) => o.spec.section === "core" && o.present && o.extension)?.extension ?? null;
}
