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
const INSTALL_LOCK = "pgtrickle-relay catalog install";

type Q = postgres.ISql<Record<string, never>>;

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
interface GrantSpec {
  kind: PrivKind;
  /** Name without schema (schema: the schema itself); functions as signatures. */
  object: string;
  privilege: string;
  section: CatalogSection;
  /** Needed by the running relay (as opposed to pipeline management). */
  runtime: boolean;
}

const GRANTS: readonly GrantSpec[] = [
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

function grantLabel(g: GrantSpec, grantee: string): string {
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

interface ObjectState {
  spec: ObjectSpec;
  label: string;
  present: boolean;
  /** Name of the extension the object belongs to (pg_depend deptype 'e'), if any. */
  extension: string | null;
  /** md5 of pg_get_functiondef for functions: tells a replaced definition from an identical one. */
  fingerprint: string | null;
}

async function probeObjects(q: Q): Promise<ObjectState[]> {
  const schemaRows = await q<{ extension: string | null }[]>`
    SELECT (SELECT e.extname FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid
             WHERE d.classid = 'pg_catalog.pg_namespace'::regclass AND d.objid = n.oid
               AND d.refclassid = 'pg_catalog.pg_extension'::regclass AND d.deptype = 'e' LIMIT 1) AS extension
      FROM pg_catalog.pg_namespace n WHERE n.nspname = ${RELAY_SCHEMA}`;
  const roleRows = await q`SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = ${RELAY_ROLE}`;
  const relNames = OBJECTS.filter((o) => o.kind === "table" || o.kind === "index").map((o) => o.name);
  const rels = await q<{ relname: string; extension: string | null }[]>`
    SELECT c.relname,
           (SELECT e.extname FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid
             WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid
               AND d.refclassid = 'pg_catalog.pg_extension'::regclass AND d.deptype = 'e' LIMIT 1) AS extension
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = ${RELAY_SCHEMA} AND c.relname = ANY(${relNames})`;
  // Signatures in the RELAY_FUNCTIONS form: `name(type,type)`.
  const sigs = OBJECTS.filter((o) => o.kind === "function").map((o) => o.name);
  // Matched through the catalogs, not to_regprocedure(): that needs USAGE on the schema, and
  // status must work for a login that lacks it.
  const funcs = await q<{ sig: string; fingerprint: string; extension: string | null }[]>`
    SELECT f.sig, md5(pg_catalog.pg_get_functiondef(f.oid)) AS fingerprint,
           (SELECT e.extname FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid
             WHERE d.classid = 'pg_catalog.pg_proc'::regclass AND d.objid = f.oid
               AND d.refclassid = 'pg_catalog.pg_extension'::regclass AND d.deptype = 'e' LIMIT 1) AS extension
      FROM (SELECT p.oid, p.proname || '(' || replace(pg_catalog.oidvectortypes(p.proargtypes), ' ', '') || ')' AS sig
              FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = ${RELAY_SCHEMA}) f
     WHERE f.sig = ANY(${sigs}::text[])`;
  const trigs = await q<{ tgname: string; relname: string }[]>`
    SELECT t.tgname, c.relname
      FROM pg_catalog.pg_trigger t
      JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = ${RELAY_SCHEMA} AND NOT t.tgisinternal
       AND t.tgname = ANY(${CORE_TRIGGERS.map((t) => t.name)})`;

  return OBJECTS.map((spec): ObjectState => {
    const base = { spec, label: objectLabel(spec), extension: null, fingerprint: null, present: false };
    switch (spec.kind) {
      case "schema":
        return { ...base, present: schemaRows.length > 0, extension: schemaRows[0]?.extension ?? null };
      case "role":
        return { ...base, present: roleRows.length > 0 };
      case "table":
      case "index": {
        const r = rels.find((x) => x.relname === spec.name);
        return { ...base, present: !!r, extension: r?.extension ?? null };
      }
      case "function": {
        const f = funcs.find((x) => x.sig === spec.name);
        return { ...base, present: !!f, extension: f?.extension ?? null, fingerprint: f?.fingerprint ?? null };
      }
      case "trigger":
        return { ...base, present: trigs.some((t) => t.tgname === spec.name && t.relname === spec.table) };
    }
  });
}

function isPresent(objects: readonly ObjectState[], kind: ObjectKind, name: string): boolean {
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
async function probeGrants(
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
async function probePublicExecute(q: Q, objects: readonly ObjectState[]): Promise<string[]> {
  const specs = DEFINER_FUNCTIONS.filter((f) => isPresent(objects, "function", f.name)).map(
    (f): GrantSpec => ({ kind: "function", object: f.name, privilege: "EXECUTE", section: f.section, runtime: false }),
  );
  const held = await probeGrants(q, "public", objects, specs);
  return specs.filter((s) => held.get(s)).map((s) => `${RELAY_SCHEMA}.${s.object}`);
}

async function readCatalogVersion(q: Q, objects: readonly ObjectState[]): Promise<string | null> {
  if (!isPresent(objects, "table", "relay_catalog_version")) return null;
  // Status must work for any login: check first, because a denied SELECT aborts the transaction.
  // By OID, like probeGrants: resolving the name would itself need USAGE on the schema.
  const [can] = await q<{ ok: boolean }[]>`
    SELECT pg_catalog.has_schema_privilege(n.oid, 'USAGE') AND pg_catalog.has_table_privilege(c.oid, 'SELECT') AS ok
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = ${RELAY_SCHEMA} AND c.relname = 'relay_catalog_version'`;
  if (!can?.ok) return null;
  const rows = await q<{ version: string }[]>`SELECT version FROM pgtrickle.relay_catalog_version LIMIT 1`;
  return rows[0]?.version ?? null;
}

/** The extension owning any of the §3 tables or functions, if one does. */
function coreOwnerExtension(objects: readonly ObjectState[]): string | null {
  return objects.find((o) => o.spec.section === "core" && o.present && o.extension)?.extension ?? null;
}

// ── install ─────────────────────────────────────────────────────────────────────────────────

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
      const previousVersion = await readCatalogVersion(tx, before);

      await tx.unsafe(sections.common).simple();
      if (!ownerExtension) await tx.unsafe(sections.core).simple();
      await tx.unsafe(sections.relay).simple();

      const after = await probeObjects(tx);
      if (ownerExtension) await grantOnExtensionObjects(tx, await probeGrants(tx, RELAY_ROLE, after));
      const grantsAfter = await probeGrants(tx, RELAY_ROLE, after);
      const publicAfter = await probePublicExecute(tx, after);
      const version = (await readCatalogVersion(tx, after)) ?? CATALOG_VERSION;

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

// ── status ──────────────────────────────────────────────────────────────────────────────────

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

/** A read-only look at what the database holds; needs no privileges beyond connecting. */
export async function catalogStatus(sql: Sql): Promise<CatalogStatus> {
  return sql.begin("read only", async (tx) => {
    const info = (
      await tx<{ database: string; server_version: string; current_user: string }[]>`
        SELECT current_database() AS database, current_setting('server_version') AS server_version,
               current_user::text AS current_user`
    )[0]!;
    const objects = await probeObjects(tx);
    const roleExists = isPresent(objects, "role", RELAY_ROLE);
    const roleGrants = roleExists ? await probeGrants(tx, RELAY_ROLE, objects) : new Map<GrantSpec, boolean>();
    const userGrants = await probeGrants(
      tx,
      info.current_user,
      objects,
      GRANTS.filter((g) => g.runtime),
    );
    const publicExecute = await probePublicExecute(tx, objects);
    const version = await readCatalogVersion(tx, objects);

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
 * the fix unless the relay catalog and the dead-letter table are both there.
 */
export async function requireCatalog(sql: Sql): Promise<CatalogStatus> {
  const status = await catalogStatus(sql);
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
