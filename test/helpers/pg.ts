import { connect, type Sql } from "../../src/db.ts";

/** The PostgreSQL that scripts/services starts. Tests use only loopback servers. */
export const PG_ADMIN_URL = process.env.PGTRICKLE_TEST_PG_URL ?? "postgres://postgres@127.0.0.1:5432/postgres";

const FIXTURE = new URL("../fixtures/pg_trickle.sql", import.meta.url).pathname;

export interface TestDatabase {
  url: string;
  name: string;
  sql: Sql;
  /** Closes the client and drops the database. */
  drop(): Promise<void>;
}

function urlFor(db: string, adminUrl: string): string {
  const u = new URL(adminUrl);
  u.pathname = `/${db}`;
  return u.toString();
}

/**
 * A new database of its own for one test file, so files never see each other's rows or
 * notifications. `fixture` loads the pg_trickle test double (docs/interface.md §2); `catalog`
 * installs the relay catalog the way `pgtrickle-relay catalog install` does; `adminUrl` picks
 * another server (test/helpers/pgtrickle.ts: the real extension). `setup` runs before the
 * catalog install. Fails loudly, naming the server, when PostgreSQL is not running.
 */
export async function testDatabase(
  label: string,
  options: { fixture?: boolean; catalog?: boolean; adminUrl?: string; setup?: (sql: Sql) => Promise<unknown> } = {},
): Promise<TestDatabase> {
  const adminUrl = options.adminUrl ?? PG_ADMIN_URL;
  const name = `relay_test_${label.replace(/[^a-z0-9_]/gi, "_").toLowerCase()}_${process.pid}_${Math.floor(Math.random() * 1e6)}`;
  const admin = connect(adminUrl, { max: 1, connectTimeout: 5 });
  try {
    await admin.unsafe(`CREATE DATABASE "${name}"`);
  } catch (err) {
    await admin.end();
    throw new Error(
      `PostgreSQL is not usable at ${adminUrl} (${(err as Error).message}); start it with scripts/services`,
    );
  }
  await admin.end();
  const url = urlFor(name, adminUrl);
  const sql = connect(url, { max: 4 });
  if (options.fixture ?? true) await sql.file(FIXTURE).simple();
  await options.setup?.(sql);
  if (options.catalog ?? true) {
    const { installCatalog } = await import("../../src/catalog/install.ts");
    await installCatalog(sql);
  }
  return {
    url,
    name,
    sql,
    async drop() {
      await sql.end({ timeout: 1 });
      const a = connect(adminUrl, { max: 1 });
      await a.unsafe(`DROP DATABASE IF EXISTS "${name}" WITH (FORCE)`);
      await a.end();
    },
  };
}
