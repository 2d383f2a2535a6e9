import { join } from "node:path";

/** Shared by the tests of deploy/ (Helm chart, systemd unit, monitoring, container image). */
export const ROOT = join(import.meta.dir, "..", "..");

export interface Ran {
  exitCode: number;
  stdout: string;
  stderr: string;
}

/** Runs a command to completion (SIGKILL after timeoutMs), collecting its output. */
export async function run(
  cmd: string[],
  opts: { cwd?: string; env?: Record<string, string | undefined>; timeoutMs?: number; stdin?: string } = {},
): Promise<Ran> {
  const proc = Bun.spawn(cmd, {
    cwd: opts.cwd ?? ROOT,
    env: opts.env ?? process.env,
    stdin: opts.stdin === undefined ? "ignore" : new TextEncoder().encode(opts.stdin),
    stdout: "pipe",
    stderr: "pipe",
  });
  const timer = setTimeout(() => proc.kill("SIGKILL"), opts.timeoutMs ?? 120_000);
  const [stdout, stderr, exitCode] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  clearTimeout(timer);
  return { exitCode, stdout, stderr };
}

/** Like run, but a non-zero exit fails with the command and its output. */
export async function ok(cmd: string[], opts: Parameters<typeof run>[1] = {}): Promise<Ran> {
  const r = await run(cmd, opts);
  if (r.exitCode !== 0) throw new Error(`${cmd.join(" ")} exited ${r.exitCode}\nstdout: ${r.stdout.slice(-3000)}\nstderr: ${r.stderr.slice(-3000)}`);
  return r;
}

/** A tool the test needs; missing, it fails naming the script that installs it. */
export function requireTool(tool: string, installer = "scripts/dev-packages"): string {
  const path = Bun.which(tool, { PATH: `${process.env.PATH ?? ""}:/usr/sbin:/sbin` });
  if (!path) throw new Error(`${tool} is not installed; ${installer} installs it`);
  return path;
}

/** dist/pgtrickle-relay compiled from this tree (scripts/build --native, about a second). */
export async function nativeBinary(): Promise<string> {
  await ok([join(ROOT, "scripts", "build"), "--native"], { timeoutMs: 300_000 });
  return join(ROOT, "dist", "pgtrickle-relay");
}

/**
 * `catalog install` run with env alone (the URL setting as a deployment gives it): whether the
 * relay catalog then exists in the database, and whether the URL showed up in the output.
 */
export async function catalogInstallWith(
  exe: string,
  env: Record<string, string | undefined>,
  db: { url: string; sql: import("../../src/db.ts").Sql },
): Promise<{ installed: boolean; printedUrl: boolean }> {
  const r = await ok([exe, "catalog", "install"], { env });
  const [row] = await db.sql<{ n: number }[]>`SELECT count(*)::int AS n FROM pg_tables WHERE schemaname = 'pgtrickle' AND tablename = 'relay_outbox_config'`;
  return { installed: row?.n === 1, printedUrl: (r.stdout + r.stderr).includes(db.url) };
}
