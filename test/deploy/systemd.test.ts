import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { chmodSync, cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pkg from "../../package.json" with { type: "json" };
import { createStreamTable, enableOutbox, writeV1Inline } from "../fixtures/outbox.ts";
import { ROOT, catalogInstallWith, nativeBinary, ok, requireTool, run } from "../helpers/deploy.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { eventually } from "../helpers/relay.ts";

/*
 * deploy/systemd/pgtrickle-relay.service: its hardening, `systemd-analyze verify` and the offline
 * security score, and install.sh --systemd installing it from a release-shaped archive served on
 * loopback. systemd itself does not run here (no PID 1 systemd), so the unit is verified, not
 * started; what the service would run is run directly, with the environment the unit gives it.
 */

const NAME = "pgtrickle-relay";
const UNIT = join(ROOT, "deploy", "systemd", `${NAME}.service`);
const scratch = mkdtempSync(join(tmpdir(), "relay-systemd-"));
let exe = "";

/** The [Service] section of a unit as key → values (a key may repeat). */
function directives(text: string): Map<string, string[]> {
  const out = new Map<string, string[]>();
  for (const line of text.split("\n")) {
    const m = /^([A-Za-z]+)=(.*)$/.exec(line.trim());
    if (m) out.set(m[1]!, [...(out.get(m[1]!) ?? []), m[2]!]);
  }
  return out;
}

/** The system calls of a systemd group such as @system-service, nested groups expanded. */
function syscallGroup(analyze: string, group: string): Set<string> {
  const out = Bun.spawnSync([analyze, "syscall-filter", "--no-pager", group]).stdout.toString();
  const calls = new Set<string>();
  for (const m of out.matchAll(/^ {4}(@?[a-z0-9_-]+)$/gm)) {
    if (m[1]!.startsWith("@")) for (const c of syscallGroup(analyze, m[1]!)) calls.add(c);
    else calls.add(m[1]!);
  }
  if (calls.size === 0) throw new Error(`systemd-analyze syscall-filter ${group} listed nothing`);
  return calls;
}

/** What the unit's SystemCallFilter= lines allow: the allow-list lines minus the `~` ones. */
function allowedSyscalls(analyze: string, filters: string[]): Set<string> {
  const expand = (items: string) => items.split(/\s+/).flatMap((i) => (i.startsWith("@") ? [...syscallGroup(analyze, i)] : [i]));
  const allowed = new Set(filters.filter((f) => !f.startsWith("~")).flatMap(expand));
  for (const denied of filters.filter((f) => f.startsWith("~")).flatMap((f) => expand(f.slice(1)))) allowed.delete(denied);
  return allowed;
}

/** The unit with ExecStart pointing at a real executable, as install.sh writes it. */
function unitFor(executable: string, dir: string): string {
  const path = join(dir, `${NAME}.service`);
  writeFileSync(path, readFileSync(UNIT, "utf8").replace(/^ExecStart=\/usr\/local\/bin\/pgtrickle-relay /m, `ExecStart=${executable} `));
  return path;
}

beforeAll(async () => {
  exe = await nativeBinary();
}, 300_000);

afterAll(() => rmSync(scratch, { recursive: true, force: true }));

describe("the systemd unit", () => {
  test("is hardened: DynamicUser, NoNewPrivileges, ProtectSystem=strict, a restart policy, SIGTERM with a stop timeout above the shutdown timeout", () => {
    const d = directives(readFileSync(UNIT, "utf8"));
    for (const [key, value] of Object.entries({
      DynamicUser: "yes",
      NoNewPrivileges: "yes",
      ProtectSystem: "strict",
      ProtectHome: "yes",
      PrivateTmp: "yes",
      PrivateDevices: "yes",
      Restart: "on-failure",
      KillSignal: "SIGTERM",
      CapabilityBoundingSet: "",
    })) {
      expect(d.get(key)).toEqual([value]);
    }
    const env = Object.fromEntries((d.get("Environment") ?? []).map((e) => e.split(/=(.*)/s).slice(0, 2)));
    const shutdown = Number(env.PGTRICKLE_RELAY_SHUTDOWN_TIMEOUT_SECS);
    expect(shutdown).toBe(30);
    expect(Number(d.get("TimeoutStopSec")?.[0])).toBeGreaterThan(shutdown);
    // The URL is a credential read through ${file:…}, never a plain environment variable.
    expect(env.PGTRICKLE_RELAY_POSTGRES_URL).toBe("${file:%d/postgres-url}");
    expect(d.get("LoadCredential")).toEqual(["postgres-url:/etc/pgtrickle-relay/postgres-url"]);
  });

  test("passes systemd-analyze verify and scores at most 2.0 (OK) in its offline security analysis", async () => {
    const analyze = requireTool("systemd-analyze", "the Debian package systemd (scripts/dev-packages)");
    const unit = unitFor(exe, scratch);
    const verify = await run([analyze, "verify", unit]);
    expect(`${verify.stdout}${verify.stderr}`).toBe("");
    expect(verify.exitCode).toBe(0);

    // The check can fail: the same unit with ExecStart naming a missing file does not verify.
    const broken = join(scratch, "broken");
    mkdirSync(broken);
    const missing = unitFor(join(scratch, "no-such-executable"), broken);
    expect((await run([analyze, "verify", missing])).exitCode).not.toBe(0);

    const security = await run([analyze, "security", "--offline=yes", "--threshold=20", unit]);
    const level = /Overall exposure level for pgtrickle-relay\.service: ([0-9.]+)/.exec(security.stdout);
    expect(Number(level?.[1])).toBeLessThanOrEqual(2.0);
    expect(security.exitCode).toBe(0);
  });

  test("relaying a row and stopping on SIGTERM, the relay makes no system call its SystemCallFilter denies and opens only sockets of RestrictAddressFamilies", async () => {
    const analyze = requireTool("systemd-analyze", "the Debian package systemd (scripts/dev-packages)");
    const strace = requireTool("strace");
    const unit = directives(readFileSync(UNIT, "utf8"));
    const allowed = allowedSyscalls(analyze, unit.get("SystemCallFilter") ?? []);
    expect(allowed.has("openat")).toBe(true);
    expect(allowed.has("mount")).toBe(false);
    // Only the calls outside the filter (and socket) are traced: seccomp-bpf keeps the rest at full speed.
    const traced = [...syscallGroup(analyze, "@known")].filter((c) => !allowed.has(c));
    const families = (unit.get("RestrictAddressFamilies")?.[0] ?? "").split(" ");
    expect(families).toContain("AF_INET");

    let db: TestDatabase | undefined;
    try {
      db = await testDatabase("systemd_syscalls");
      await createStreamTable(db.sql, "public.sc", "id int primary key");
      const { outboxTable } = await enableOutbox(db.sql, "public.sc");
      const output = join(scratch, "syscalls.jsonl");
      await db.sql`SELECT pgtrickle.set_relay_outbox('sc', 'public.sc', NULL, ${db.sql.json({ type: "file", output })})`;
      const trace = join(scratch, "strace.out");
      const filter = ["socket", ...traced].map((c) => `?${c}`).join(",");
      const proc = Bun.spawn([strace, "-f", "--seccomp-bpf", "-qq", "-e", `trace=${filter}`, "-o", trace, exe, "run", "--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0"], {
        stdout: "ignore",
        stderr: "pipe",
      });
      await writeV1Inline(db.sql, outboxTable, { inserted: [{ id: 1 }], deleted: [] });
      await eventually(() => existsSync(output) && readFileSync(output, "utf8").includes('"id":1'), 60_000, "the row relayed under strace");
      // strace's child is the relay; the signal goes to it, as systemd's KillSignal would.
      const relay = Number(readFileSync(`/proc/${proc.pid}/task/${proc.pid}/children`, "utf8").trim().split(" ")[0]);
      process.kill(relay, "SIGTERM");
      expect(await proc.exited).toBe(0);

      const lines = readFileSync(trace, "utf8").split("\n").filter((l) => /^\d+ +[a-z0-9_]+\(/.test(l));
      const calls = lines.map((l) => /^\d+ +([a-z0-9_]+)\(/.exec(l)![1]!);
      expect(calls.filter((c) => c !== "socket")).toEqual([]);
      const opened = lines.filter((l) => / socket\(/.test(l)).map((l) => /socket\((AF_[A-Z0-9]+)/.exec(l)![1]!);
      expect(opened.length).toBeGreaterThan(0);
      for (const family of opened) expect(families).toContain(family);
    } finally {
      await db?.drop();
    }
  }, 120_000);

  test("what it runs works: the URL from the credential file through ${file:%d/…}, masked", async () => {
    let db: TestDatabase | undefined;
    try {
      db = await testDatabase("systemd_cred", { fixture: false, catalog: false });
      const credentials = join(scratch, "credentials");
      mkdirSync(credentials);
      writeFileSync(join(credentials, "postgres-url"), `${db.url}\n`);
      chmodSync(join(credentials, "postgres-url"), 0o600);
      const env = { PATH: process.env.PATH, PGTRICKLE_RELAY_POSTGRES_URL: `\${file:${credentials}/postgres-url}` };
      expect(await catalogInstallWith(exe, env, db)).toEqual({ installed: true, printedUrl: false });
    } finally {
      await db?.drop();
    }
  });
});

describe("install.sh --systemd", () => {
  let server: ReturnType<typeof Bun.serve> | undefined;
  let base = "";
  const target = process.arch === "arm64" ? "linux-arm64" : "linux-x64";
  const archive = `${NAME}-${pkg.version}-${target}.tar.gz`;

  beforeAll(async () => {
    // A release directory as scripts/build lays it out for Linux: the executable and the unit.
    const release = join(scratch, "release");
    const stage = join(scratch, "stage");
    mkdirSync(release);
    mkdirSync(stage);
    cpSync(exe, join(stage, NAME));
    cpSync(UNIT, join(stage, `${NAME}.service`));
    await ok(["tar", "-czf", join(release, archive), "-C", stage, NAME, `${NAME}.service`]);
    const sum = (await ok(["sha256sum", archive], { cwd: release })).stdout;
    writeFileSync(join(release, "SHA256SUMS"), sum);
    server = Bun.serve({
      hostname: "127.0.0.1",
      port: 0,
      fetch(req) {
        const file = new URL(req.url).pathname.slice(1);
        const path = join(release, file);
        return file.includes("/") || !existsSync(path) ? new Response("not found", { status: 404 }) : new Response(Bun.file(path));
      },
    });
    base = `http://127.0.0.1:${server.port}`;
  });

  afterAll(() => {
    server?.stop(true);
  });

  const env = (extra: Record<string, string>) => ({
    PATH: process.env.PATH ?? "/usr/bin:/bin",
    HOME: join(scratch, "home"),
    PGTRICKLE_RELAY_DOWNLOAD_URL: base,
    ...extra,
  });

  test("installs the unit with ExecStart at the installed executable, and the result verifies", async () => {
    const prefix = join(scratch, "opt");
    const units = join(scratch, "units");
    const r = await ok(["sh", join(ROOT, "install.sh"), "--prefix", prefix, "--systemd"], { env: env({ PGTRICKLE_RELAY_SYSTEMD_DIR: units }) });
    expect(r.stderr).toContain(`installed ${units}/${NAME}.service`);
    expect(r.stderr).toContain(`systemctl enable --now ${NAME}`);
    const unit = readFileSync(join(units, `${NAME}.service`), "utf8");
    expect(unit).toContain(`\nExecStart=${prefix}/bin/${NAME} run\n`);
    // Only ExecStart differs from the unit in the archive.
    expect(unit.replace(`${prefix}/bin/`, "/usr/local/bin/")).toBe(readFileSync(UNIT, "utf8"));
    const analyze = requireTool("systemd-analyze", "the Debian package systemd (scripts/dev-packages)");
    await ok([analyze, "verify", join(units, `${NAME}.service`)]);
  });

  test("without --systemd, installs no unit; with it, refuses a home directory and macOS", async () => {
    const units = join(scratch, "units-none");
    await ok(["sh", join(ROOT, "install.sh"), "--prefix", join(scratch, "plain")], { env: env({ PGTRICKLE_RELAY_SYSTEMD_DIR: units }) });
    expect(existsSync(units)).toBe(false);

    const home = await run(["sh", join(ROOT, "install.sh"), "--bin-dir", "/home/someone/bin", "--systemd"], { env: env({ PGTRICKLE_RELAY_SYSTEMD_DIR: units }) });
    expect(home.exitCode).not.toBe(0);
    expect(home.stderr).toContain("ProtectHome=yes");
    const mac = await run(["sh", join(ROOT, "install.sh"), "--prefix", join(scratch, "mac"), "--systemd"], {
      env: env({ PGTRICKLE_RELAY_SYSTEMD_DIR: units, PGTRICKLE_RELAY_TARGET: "darwin-arm64" }),
    });
    expect(mac.exitCode).not.toBe(0);
    expect(mac.stderr).toContain("brew services");
    expect(existsSync(units)).toBe(false);
  });
});
