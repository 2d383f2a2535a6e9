import { chownSync, existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Sql } from "../../src/db.ts";
import { testDatabase, type TestDatabase } from "./pg.ts";
import { freePort } from "./proxy.ts";
import { PGTRICKLE_URLS, requireServer, type PgTrickleVersion } from "./servers.ts";

export { PGTRICKLE_VERSIONS, type PgTrickleVersion } from "./servers.ts";

/**
 * A database of its own on the PostgreSQL 18.6 cluster that runs the real pg_trickle `version`
 * (scripts/services pgtrickle), with `CREATE EXTENSION pg_trickle` done and, unless
 * `catalog: false`, the relay catalog installed beside the extension's own.
 */
export async function pgTrickleDatabase(
  label: string,
  version: PgTrickleVersion,
  options: { catalog?: boolean } = {},
): Promise<TestDatabase> {
  await requireServer(`pgtrickle-${version}`);
  return testDatabase(`${label}_${version.replaceAll(".", "")}`, {
    fixture: false,
    catalog: options.catalog ?? true,
    adminUrl: PGTRICKLE_URLS[version],
    setup: (sql) => sql`CREATE EXTENSION pg_trickle`,
  });
}

export interface RealStreamTable {
  /** `public.<name>`, the stream table. */
  name: string;
  /** `public.<name>_src`, the plain table it selects from: write here, then refresh. */
  source: string;
  /** The outbox header table in schema pgtrickle, as pgt_outbox_config names it. */
  outboxTable: string;
}

/**
 * A real stream table `public.<name>` = `SELECT id, amount FROM public.<name>_src`, with its
 * outbox enabled. `schedule` '1h' leaves refreshes to refresh_stream_table; '1s' to the scheduler.
 */
export async function realStreamTable(
  sql: Sql,
  name: string,
  options: { schedule?: string; mode?: "DIFFERENTIAL" | "FULL" } = {},
): Promise<RealStreamTable> {
  const st = `public.${name}`;
  const source = `public.${name}_src`;
  await sql.unsafe(`CREATE TABLE ${source} (id int PRIMARY KEY, amount int NOT NULL)`);
  await sql`SELECT pgtrickle.create_stream_table(${st}, ${`SELECT id, amount FROM ${source}`},
              schedule => ${options.schedule ?? "1h"}, refresh_mode => ${options.mode ?? "DIFFERENTIAL"})`;
  await sql`SELECT pgtrickle.enable_outbox(${st}, 24)`;
  const [row] = await sql<{ outbox_table_name: string }[]>`
    SELECT outbox_table_name FROM pgtrickle.pgt_outbox_config WHERE stream_table_name = ${name}`;
  return { name: st, source, outboxTable: row!.outbox_table_name };
}

/** The outbox header rows of `st`, oldest first. */
export async function outboxRows(sql: Sql, st: RealStreamTable) {
  return sql<{ id: string; inserted_count: string; deleted_count: string; is_claim_check: boolean; payload: unknown }[]>`
    SELECT id, inserted_count, deleted_count, is_claim_check, payload FROM ${sql(`pgtrickle.${st.outboxTable}`)} ORDER BY id`;
}

/** Where scripts/services put the PostgreSQL 18.6 trees, one per extension version. */
function serverTree(version: PgTrickleVersion): string {
  const homeFile = new URL("../../.services/pgtrickle.home", import.meta.url).pathname;
  if (!existsSync(homeFile)) throw new Error(`no ${homeFile}: run scripts/services pgtrickle first`);
  const tree = join(readFileSync(homeFile, "utf8").trim(), `postgresql-18.6.0-pgtrickle-${version}`);
  if (!existsSync(join(tree, "bin", "pg_ctl"))) throw new Error(`no PostgreSQL tree at ${tree}: run scripts/services pgtrickle`);
  return tree;
}

/** PostgreSQL refuses to run as root: as root, the server tools run as user postgres. */
async function asServerUser(args: string[]): Promise<void> {
  const cmd = process.getuid?.() === 0 ? ["runuser", "-u", "postgres", "--", ...args] : args;
  const proc = Bun.spawn(cmd, { stdout: "pipe", stderr: "pipe", stdin: "ignore" });
  const [out, err, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  if (code !== 0) throw new Error(`${args.join(" ")} exited ${code}:\n${out}${err}`);
}

/**
 * A cluster of the test's own (a temporary data directory, a free loopback port), for what
 * must restart the server, such as loading another build of the extension. `restart(version)`
 * stops it and starts the same data directory with that version's tree.
 */
export async function privateCluster(version: PgTrickleVersion) {
  const dir = mkdtempSync(join(tmpdir(), "relay-pgtrickle-cluster-"));
  if (process.getuid?.() === 0) chownSync(dir, Number(await idOf("-u")), Number(await idOf("-g")));
  const data = join(dir, "data");
  const port = await freePort();
  let running: PgTrickleVersion = version;
  const pgCtl = (v: PgTrickleVersion, ...args: string[]) => asServerUser([join(serverTree(v), "bin", "pg_ctl"), "-D", data, ...args]);
  const start = (v: PgTrickleVersion) =>
    pgCtl(v, "-l", join(dir, "postgres.log"), "-w", "-t", "60", "start", "-o",
      `-c listen_addresses=127.0.0.1 -c unix_socket_directories= -c shared_preload_libraries=pg_trickle -c max_worker_processes=16 -c max_connections=50 -p ${port}`);
  await asServerUser([join(serverTree(version), "bin", "initdb"), "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C.UTF-8"]);
  await start(version);
  return {
    url: `postgres://postgres@127.0.0.1:${port}/postgres`,
    log: join(dir, "postgres.log"),
    async restart(next: PgTrickleVersion) {
      await pgCtl(running, "-m", "fast", "-w", "stop");
      running = next;
      await start(next);
    },
    async destroy() {
      await pgCtl(running, "-m", "immediate", "-w", "stop").catch(() => {});
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

async function idOf(flag: "-u" | "-g"): Promise<string> {
  return (await new Response(Bun.spawn(["id", flag, "postgres"], { stdout: "pipe" }).stdout).text()).trim();
}
