import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pkg from "../../package.json" with { type: "json" };
import { verifySignature } from "../../scripts/macho-codesign.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { requireServer } from "../helpers/servers.ts";

/*
 * The distribution: scripts/build (every target, once for this file), the archives and
 * SHA256SUMS, the executables that can run here (natively, and the other Linux architecture
 * under qemu-user), install.sh against a loopback server, the container image's file tree
 * under chroot, the Homebrew formula and the GitHub workflows. Tools come from
 * scripts/dev-packages; a missing one fails the test that needs it.
 */

const ROOT = join(import.meta.dir, "..", "..");
const DIST = join(ROOT, "dist");
const VERSION = pkg.version;
const NAME = "pgtrickle-relay";
const BUILD_TIMEOUT = 15 * 60_000;
/** Per test: unpacking 100 MB archives and qemu start-up are slow on a loaded 2-core machine. */
const SLOW = 240_000;
const slow = (name: string, fn: () => Promise<void> | void) => test(name, fn, SLOW);

const TARGETS = [
  "linux-x64",
  "linux-x64-baseline",
  "linux-arm64",
  "linux-x64-musl",
  "linux-arm64-musl",
  "darwin-x64",
  "darwin-arm64",
] as const;
type Target = (typeof TARGETS)[number];

const EM_X86_64 = 0x3e;
const EM_AARCH64 = 0xb7;
const CPU_X86_64 = 0x01000007;
const CPU_ARM64 = 0x0100000c;
const FORMAT: Record<Target, { elf: number; interp: string } | { macho: number }> = {
  "linux-x64": { elf: EM_X86_64, interp: "/lib64/ld-linux-x86-64.so.2" },
  "linux-x64-baseline": { elf: EM_X86_64, interp: "/lib64/ld-linux-x86-64.so.2" },
  "linux-arm64": { elf: EM_AARCH64, interp: "/lib/ld-linux-aarch64.so.1" },
  "linux-x64-musl": { elf: EM_X86_64, interp: "/lib/ld-musl-x86_64.so.1" },
  "linux-arm64-musl": { elf: EM_AARCH64, interp: "/lib/ld-musl-aarch64.so.1" },
  "darwin-x64": { macho: CPU_X86_64 },
  "darwin-arm64": { macho: CPU_ARM64 },
};

// This machine's Linux architecture, and the other one with its qemu and glibc.
const HOST: Target = process.arch === "arm64" ? "linux-arm64" : "linux-x64";
const FOREIGN: Target = HOST === "linux-x64" ? "linux-arm64" : "linux-x64";
const QEMU = FOREIGN === "linux-arm64" ? "qemu-aarch64" : "qemu-x86_64";
const QEMU_SYSROOT = FOREIGN === "linux-arm64" ? "/usr/aarch64-linux-gnu" : "/usr/x86_64-linux-gnu";

interface Ran {
  exitCode: number;
  stdout: string;
  stderr: string;
}

async function run(
  cmd: string[],
  opts: { cwd?: string; env?: Record<string, string | undefined>; timeoutMs?: number } = {},
): Promise<Ran> {
  const proc = Bun.spawn(cmd, {
    cwd: opts.cwd ?? ROOT,
    env: opts.env ?? process.env,
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
  });
  const timer = setTimeout(() => proc.kill("SIGKILL"), opts.timeoutMs ?? 60_000);
  const [stdout, stderr, exitCode] = await Promise.all([
    new Response(proc.stdout).text(),
    new Response(proc.stderr).text(),
    proc.exited,
  ]);
  clearTimeout(timer);
  return { exitCode, stdout, stderr };
}

function explain(r: Ran): string {
  return `exit ${r.exitCode}\nstdout:\n${r.stdout}\nstderr:\n${r.stderr}`;
}

async function ok(cmd: string[], opts: Parameters<typeof run>[1] = {}): Promise<Ran> {
  const r = await run(cmd, opts);
  if (r.exitCode !== 0) throw new Error(`${cmd.join(" ")} failed: ${explain(r)}`);
  return r;
}

async function requireTool(tool: string): Promise<string> {
  const path = Bun.which(tool);
  if (!path) throw new Error(`${tool} is not installed; scripts/dev-packages installs it`);
  return path;
}

const archiveName = (t: Target) => `${NAME}-${VERSION}-${t}.tar.gz`;

const scratch = mkdtempSync(join(tmpdir(), "pgtrickle-relay-dist-"));
/** Executables unpacked from the archives, by target. */
const unpacked = new Map<Target, string>();

async function unpack(t: Target): Promise<string> {
  const have = unpacked.get(t);
  if (have) return have;
  const dir = join(scratch, "unpacked", t);
  mkdirSync(dir, { recursive: true });
  await ok(["tar", "-xzf", join(DIST, archiveName(t)), "-C", dir]);
  const exe = join(dir, NAME);
  unpacked.set(t, exe);
  return exe;
}

/** The commit scripts/build puts into `--version` (without its "-dirty" mark). */
async function headCommit(): Promise<string> {
  const head = await run(["git", "rev-parse", "--short", "HEAD"]);
  return head.exitCode === 0 ? head.stdout.trim() : "unknown";
}
let commitAtBuild = "unknown";
let buildLog = "";
let buildSeconds = 0;

beforeAll(async () => {
  commitAtBuild = await headCommit();
  const started = performance.now();
  const r = await run(["scripts/build"], { timeoutMs: BUILD_TIMEOUT });
  buildSeconds = (performance.now() - started) / 1000;
  buildLog = r.stderr;
  if (r.exitCode !== 0) throw new Error(`scripts/build failed: ${explain(r)}`);
}, BUILD_TIMEOUT + 10_000);

afterAll(() => {
  rmSync(scratch, { recursive: true, force: true });
});

function versionPattern(commit = commitAtBuild): RegExp {
  return new RegExp(`^pgtrickle-relay ${VERSION.replace(/\./g, "\\.")} \\(${commit}(-dirty)?\\)\\n?$`);
}

describe("scripts/build", () => {
  slow("makes one archive per target and a SHA256SUMS that sha256sum -c accepts", async () => {
    const archives = readdirSync(DIST)
      .filter((f) => f.endsWith(".tar.gz"))
      .sort();
    expect(archives).toEqual(TARGETS.map(archiveName).sort());

    const sums = readFileSync(join(DIST, "SHA256SUMS"), "utf8").trim().split("\n");
    expect(sums.map((l) => l.replace(/^[0-9a-f]{64} {2}/, "")).sort()).toEqual(archives);
    const check = await ok(["sha256sum", "-c", "SHA256SUMS"], { cwd: DIST });
    expect(check.stdout.trim().split("\n")).toHaveLength(TARGETS.length);

    const sizes = TARGETS.map((t) => `${t} ${(statSync(join(DIST, archiveName(t))).size / 2 ** 20).toFixed(1)} MiB`);
    console.log(`scripts/build: ${buildSeconds.toFixed(0)} s for ${TARGETS.length} targets; archives: ${sizes.join(", ")}`);
  });

  slow("each archive holds only the executable (mode 0755, owner 0), LICENSE/README when the repository has them, and on Linux the systemd unit", async () => {
    const extras = ["LICENSE", "README.md"].filter((f) => existsSync(join(ROOT, f)));
    for (const t of TARGETS) {
      const list = await ok(["tar", "-tvzf", join(DIST, archiveName(t))]);
      const entries = list.stdout.trim().split("\n");
      const unit = t.startsWith("linux-") ? [`${NAME}.service`] : [];
      expect(entries.map((l) => l.split(/\s+/).pop()).sort()).toEqual([NAME, ...extras, ...unit].sort());
      const exe = entries.find((l) => l.endsWith(` ${NAME}`)) ?? "";
      expect(exe).toMatch(/^-rwxr-xr-x 0\/0 /);
    }
  });

  slow("each executable is built for its platform, with the program inside", async () => {
    for (const t of TARGETS) {
      const exe = await unpack(t);
      const buf = Buffer.from(await Bun.file(exe).arrayBuffer());
      const want = FORMAT[t];
      if ("elf" in want) {
        expect(buf.subarray(0, 4).toString("latin1")).toBe("\x7fELF");
        expect(buf.readUInt16LE(18)).toBe(want.elf);
        expect(elfInterpreter(buf)).toBe(want.interp);
        // The program lives in the .bun section; `strip` would remove it.
        expect(elfSectionNames(buf)).toContain(".bun");
      } else {
        expect(buf.readUInt32LE(0)).toBe(0xfeedfacf);
        expect(buf.readUInt32LE(4)).toBe(want.macho);
        expect(buf.indexOf("__BUN\0")).toBeGreaterThan(0);
        // macOS kills a process whose code pages do not match its signature.
        const sig = verifySignature(buf);
        expect(sig.problems).toEqual([]);
      }
      expect(buf.indexOf(`/$bunfs/root/${NAME}`)).toBeGreaterThan(0);
      if (t !== HOST && t !== FOREIGN && t !== "linux-x64-baseline") {
        rmSync(exe);
        unpacked.delete(t);
      }
    }
  });

  slow(`the ${HOST} executable prints its version and commit, from any directory`, async () => {
    const exe = await unpack(HOST);
    const r = await ok([exe, "--version"], { cwd: "/" });
    expect(r.stdout).toMatch(versionPattern());
    if (HOST === "linux-x64") {
      const baseline = await ok([await unpack("linux-x64-baseline"), "--version"], { cwd: "/" });
      expect(baseline.stdout).toBe(r.stdout);
    }
  });

  slow(`the ${FOREIGN} executable prints its version under ${QEMU} (qemu-user)`, async () => {
    const qemu = await requireTool(QEMU);
    if (!existsSync(QEMU_SYSROOT)) throw new Error(`${QEMU_SYSROOT} is missing; scripts/dev-packages installs it`);
    const exe = await unpack(FOREIGN);
    const started = performance.now();
    const r = await ok([qemu, "-L", QEMU_SYSROOT, exe, "--version"], { cwd: "/", timeoutMs: 200_000 });
    expect(r.stdout).toMatch(versionPattern());
    console.log(`${FOREIGN} under ${QEMU}: --version in ${((performance.now() - started) / 1000).toFixed(1)} s`);
  });

  /** A database with one outbox row and a stdout pipeline: what `drain` of each executable must relay. */
  async function oneRowDatabase(label: string): Promise<TestDatabase> {
    await requireServer("postgres");
    const rdb = await testDatabase(label);
    await rdb.sql`CREATE TABLE public.orders (id int primary key)`;
    await rdb.sql`SELECT pgtrickle.enable_outbox('public.orders')`;
    await rdb.sql`INSERT INTO pgtrickle.outbox_orders (payload) VALUES ('{"v":1,"inserted":[{"id":7}],"deleted":[]}')`;
    await rdb.sql`SELECT pgtrickle.set_relay_outbox('to_stdout', 'public.orders', NULL, '{"type":"stdout"}')`;
    return rdb;
  }

  function expectOneRelayedRow(r: Ran): void {
    expect(r.exitCode, explain(r)).toBe(0);
    const lines = r.stdout.trim().split("\n").map((l) => JSON.parse(l) as { dedup_key: string; payload: unknown });
    expect(lines).toEqual([expect.objectContaining({ dedup_key: "outbox_orders:1:0", payload: { id: 7 } })]);
  }

  slow(`the ${HOST} executable relays one outbox row to stdout (drain)`, async () => {
    const rdb = await oneRowDatabase("dist_host_row");
    try {
      expectOneRelayedRow(await run([await unpack(HOST), "drain", "--postgres-url", rdb.url], { cwd: "/" }));
    } finally {
      await rdb.drop();
    }
  });

  slow(`the ${FOREIGN} executable relays one outbox row to stdout under ${QEMU}`, async () => {
    const qemu = await requireTool(QEMU);
    const rdb = await oneRowDatabase("dist_foreign_row");
    try {
      const r = await run([qemu, "-L", QEMU_SYSROOT, await unpack(FOREIGN), "drain", "--postgres-url", rdb.url], { cwd: "/", timeoutMs: 200_000 });
      expectOneRelayedRow(r);
    } finally {
      await rdb.drop();
    }
  });

  slow("--native writes dist/pgtrickle-relay, which runs from any directory", async () => {
    const commit = await headCommit();
    const started = performance.now();
    await ok(["scripts/build", "--native"], { timeoutMs: 120_000 });
    const seconds = (performance.now() - started) / 1000;
    const r = await ok([join(DIST, NAME), "--version"], { cwd: "/" });
    expect(r.stdout).toMatch(versionPattern(commit));
    console.log(`scripts/build --native: ${seconds.toFixed(1)} s, ${(statSync(join(DIST, NAME)).size / 2 ** 20).toFixed(1)} MiB`);
  });

  slow("dist/pgtrickle-relay.rb lists the four Homebrew archives with SHA256SUMS's hashes", async () => {
    const sums = new Map(
      readFileSync(join(DIST, "SHA256SUMS"), "utf8")
        .trim()
        .split("\n")
        .map((l) => [l.slice(66), l.slice(0, 64)] as const),
    );
    const f = await formulaFacts(join(DIST, "pgtrickle-relay.rb"));
    expect(f.version).toBe(VERSION);
    for (const [os, arch, target] of [
      ["macos", "arm", "darwin-arm64"],
      ["macos", "intel", "darwin-x64"],
      ["linux", "arm", "linux-arm64"],
      ["linux", "intel", "linux-x64"],
    ] as const) {
      const entry = f.urls[`${os}/${arch}`];
      expect(entry?.url).toEndWith(`/releases/download/v${VERSION}/${archiveName(target)}`);
      expect(entry?.sha256).toBe(sums.get(archiveName(target)));
    }
  });
});

function elfInterpreter(buf: Buffer): string | null {
  const phoff = Number(buf.readBigUInt64LE(32));
  const phentsize = buf.readUInt16LE(54);
  const phnum = buf.readUInt16LE(56);
  for (let i = 0; i < phnum; i++) {
    const ph = phoff + i * phentsize;
    if (buf.readUInt32LE(ph) === 3 /* PT_INTERP */) {
      const off = Number(buf.readBigUInt64LE(ph + 8));
      const size = Number(buf.readBigUInt64LE(ph + 32));
      return buf.toString("latin1", off, off + size).replace(/\0+$/, "");
    }
  }
  return null;
}

function elfSectionNames(buf: Buffer): string[] {
  const shoff = Number(buf.readBigUInt64LE(40));
  const shentsize = buf.readUInt16LE(58);
  const shnum = buf.readUInt16LE(60);
  const shstrndx = buf.readUInt16LE(62);
  const strtab = Number(buf.readBigUInt64LE(shoff + shstrndx * shentsize + 24));
  const names: string[] = [];
  for (let i = 0; i < shnum; i++) {
    const nameOff = buf.readUInt32LE(shoff + i * shentsize);
    names.push(buf.toString("latin1", strtab + nameOff, buf.indexOf(0, strtab + nameOff)));
  }
  return names;
}

// ---------------------------------------------------------------------------------------------

describe("install.sh", () => {
  let server: ReturnType<typeof Bun.serve>;
  let base = "";

  beforeAll(() => {
    // /good/ serves dist/ as built; /tampered/ serves the same SHA256SUMS with one byte of every
    // archive changed, as a compromised mirror would.
    server = Bun.serve({
      hostname: "127.0.0.1",
      port: 0,
      async fetch(req) {
        const [, mode, file] = new URL(req.url).pathname.split("/");
        if (!file || file.includes("..") || (mode !== "good" && mode !== "tampered")) return new Response("no", { status: 404 });
        const path = join(DIST, file);
        if (!existsSync(path) || !(file === "SHA256SUMS" || file.endsWith(".tar.gz"))) {
          return new Response("not found", { status: 404 });
        }
        const bytes = Buffer.from(await Bun.file(path).arrayBuffer());
        if (mode === "tampered" && file.endsWith(".tar.gz")) {
          const at = Math.floor(bytes.length / 2);
          bytes[at] = (bytes[at] ?? 0) ^ 0xff;
        }
        return new Response(bytes);
      },
    });
    base = `http://127.0.0.1:${server.port}`;
  });

  afterAll(() => {
    server?.stop(true);
  });

  const installer = join(ROOT, "install.sh");

  function env(extra: Record<string, string>): Record<string, string> {
    return { PATH: process.env.PATH ?? "/usr/bin:/bin", HOME: join(scratch, "home"), ...extra };
  }

  slow("passes shellcheck as POSIX sh (and the build scripts as bash)", async () => {
    const shellcheck = await requireTool("shellcheck");
    await ok([shellcheck, "-s", "sh", installer]);
    await ok([
      shellcheck,
      "scripts/build",
      "scripts/formula",
      "scripts/rootfs",
      "scripts/dev-packages",
      "scripts/helm",
    ]);
  });

  slow("installs this platform's archive into --prefix DIR/bin, with curl", async () => {
    const prefix = join(scratch, "prefix-curl");
    const r = await ok(["sh", installer, "--prefix", prefix], {
      env: env({ PGTRICKLE_RELAY_DOWNLOAD_URL: `${base}/good` }),
    });
    expect(r.stderr).toContain(`${archiveName(HOST)} (${HOST})`);
    expect(r.stderr).toContain("is not on your PATH");
    const exe = join(prefix, "bin", NAME);
    expect(statSync(exe).mode & 0o777).toBe(0o755);
    expect(readdirSync(join(prefix, "bin"))).toEqual([NAME]);
    expect((await ok([exe, "--version"])).stdout).toMatch(versionPattern());
  });

  slow("installs with wget when curl is absent, into PGTRICKLE_RELAY_INSTALL_DIR", async () => {
    await requireTool("wget");
    // A PATH holding only the tools install.sh uses, wget but no curl.
    const bin = join(scratch, "no-curl-bin");
    mkdirSync(bin, { recursive: true });
    const tools = ["sh", "uname", "grep", "sed", "cut", "tr", "wc", "mktemp", "rm", "mkdir", "cp", "mv", "chmod", "tar", "gzip", "sha256sum", "cat", "ldd", "wget"];
    for (const tool of tools) {
      const path = Bun.which(tool);
      if (!path) throw new Error(`${tool} is not installed`);
      if (!existsSync(join(bin, tool))) symlinkSync(path, join(bin, tool));
    }
    const dir = join(scratch, "wget-dir");
    const r = await ok(["sh", installer], {
      env: { ...env({ PGTRICKLE_RELAY_DOWNLOAD_URL: `${base}/good`, PGTRICKLE_RELAY_INSTALL_DIR: dir }), PATH: `${bin}:${dir}` },
    });
    expect(r.stderr).toContain(`installed ${join(dir, NAME)}`);
    expect(r.stderr).not.toContain("is not on your PATH");
    expect((await ok([join(dir, NAME), "--version"])).stdout).toMatch(versionPattern());
  });

  slow("refuses a tampered archive and leaves nothing installed, nor an earlier install changed", async () => {
    const fresh = join(scratch, "prefix-tampered");
    const r = await run(["sh", installer, "--prefix", fresh], {
      env: env({ PGTRICKLE_RELAY_DOWNLOAD_URL: `${base}/tampered` }),
    });
    expect(r.exitCode).not.toBe(0);
    expect(r.stderr).toContain(`checksum mismatch for ${archiveName(HOST)}`);
    expect(existsSync(fresh)).toBe(false);

    // Over a good install: the old executable stays, byte for byte, with no temporary file beside it.
    const prefix = join(scratch, "prefix-curl");
    const before = await Bun.file(join(prefix, "bin", NAME)).arrayBuffer();
    const again = await run(["sh", installer, "--prefix", prefix], {
      env: env({ PGTRICKLE_RELAY_DOWNLOAD_URL: `${base}/tampered` }),
    });
    expect(again.exitCode).not.toBe(0);
    expect(readdirSync(join(prefix, "bin"))).toEqual([NAME]);
    expect(Buffer.from(await Bun.file(join(prefix, "bin", NAME)).arrayBuffer()).equals(Buffer.from(before))).toBe(true);
  });

  slow("fails clearly on a failed download, a missing version and an unknown target", async () => {
    const dir = join(scratch, "prefix-fail");
    const closed = await run(["sh", installer, "--prefix", dir], {
      env: env({ PGTRICKLE_RELAY_DOWNLOAD_URL: "http://127.0.0.1:1/none" }),
    });
    expect(closed.exitCode).not.toBe(0);
    expect(closed.stderr).toContain("download failed: http://127.0.0.1:1/none/SHA256SUMS");

    const wrongVersion = await run(["sh", installer, "--prefix", dir, "--version", "0.0.0-none"], {
      env: env({ PGTRICKLE_RELAY_DOWNLOAD_URL: `${base}/good` }),
    });
    expect(wrongVersion.exitCode).not.toBe(0);
    expect(wrongVersion.stderr).toContain("asked for version 0.0.0-none");

    const badTarget = await run(["sh", installer, "--prefix", dir], {
      env: env({ PGTRICKLE_RELAY_DOWNLOAD_URL: `${base}/good`, PGTRICKLE_RELAY_TARGET: "windows-x64" }),
    });
    expect(badTarget.exitCode).not.toBe(0);
    expect(badTarget.stderr).toContain("not a release target");

    const noRepo = await run(["sh", installer, "--prefix", dir], { env: env({}) });
    expect(noRepo.exitCode).not.toBe(0);
    expect(noRepo.stderr).toContain("PGTRICKLE_RELAY_REPO");
    expect(existsSync(dir)).toBe(false);
  });
});

// ---------------------------------------------------------------------------------------------

describe("container image file tree (scripts/rootfs, as the Dockerfile lays it out)", () => {
  let rootfs = "";
  let db: TestDatabase | undefined;

  beforeAll(async () => {
    rootfs = join(scratch, "rootfs");
    await ok(["scripts/rootfs", rootfs, await unpack(HOST)]);
  }, SLOW);

  afterAll(async () => {
    await db?.drop();
  }, SLOW);

  /** Runs the executable in the tree as uid 65532, with /proc mounted in a private mount namespace. */
  async function inChroot(args: string[]): Promise<Ran> {
    const unshare = await requireTool("unshare");
    const script = 'mount -t proc proc "$1/proc" && dir="$1" && shift && exec chroot --userspec=65532:65532 "$dir" /pgtrickle-relay "$@"';
    return run([unshare, "--mount", "sh", "-c", script, "sh", rootfs, ...args], { cwd: "/", env: { PATH: "/usr/sbin:/usr/bin:/sbin:/bin" } });
  }

  slow("holds the executable, the libraries ldd lists, CA certificates and a non-root user, and no shell", async () => {
    const files: string[] = [];
    const walk = (dir: string, rel: string) => {
      for (const e of readdirSync(dir, { withFileTypes: true })) {
        if (e.isDirectory()) walk(join(dir, e.name), `${rel}/${e.name}`);
        else files.push(`${rel}/${e.name}`);
      }
    };
    walk(rootfs, "");
    const ldd = await ok(["ldd", await unpack(HOST)]);
    const libs = ldd.stdout
      .split("\n")
      .map((l) => l.match(/=>\s*(\/\S+)/)?.[1] ?? l.match(/^\s*(\/\S+)/)?.[1])
      .filter((p): p is string => Boolean(p));
    expect(libs.length).toBeGreaterThan(0);
    expect(files.sort()).toEqual(
      [
        "/pgtrickle-relay",
        ...libs,
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/passwd",
        "/etc/group",
        "/etc/nsswitch.conf",
        "/etc/hosts",
        "/etc/pgtrickle-relay-rootfs",
      ].sort(),
    );
    expect(readFileSync(join(rootfs, "etc/passwd"), "utf8")).toMatch(/^relay:x:65532:65532:/m);
    const original = await Bun.file(await unpack(HOST)).arrayBuffer();
    expect(Buffer.from(await Bun.file(join(rootfs, NAME)).arrayBuffer()).equals(Buffer.from(original))).toBe(true);
  });

  slow("runs under chroot as uid 65532: --version", async () => {
    const r = await inChroot(["--version"]);
    expect(r.exitCode, explain(r)).toBe(0);
    expect(r.stdout).toMatch(versionPattern());
  });

  slow("connects to PostgreSQL at 127.0.0.1:5432 from the chroot (catalog status --json)", async () => {
    await requireServer("postgres");
    db = await testDatabase("dist_chroot");
    const r = await inChroot(["catalog", "status", "--json", "--postgres-url", db.url]);
    expect(r.exitCode, explain(r)).toBe(0);
    const status = JSON.parse(r.stdout) as { database: string; relayCatalog: { state: string } };
    expect(status.database).toBe(db.name);
    expect(status.relayCatalog.state).toBe("complete");
  });

  slow("resolves localhost through the tree's /etc/hosts, and names an unreachable server", async () => {
    const url = new URL(db?.url ?? "postgres://postgres@127.0.0.1:5432/postgres");
    url.hostname = "localhost";
    const viaName = await inChroot(["catalog", "status", "--json", "--postgres-url", url.toString()]);
    expect(viaName.exitCode, explain(viaName)).toBe(0);

    const refused = await inChroot(["catalog", "status", "--postgres-url", "postgres://postgres@127.0.0.1:1/postgres"]);
    expect(refused.exitCode).toBe(3);
    expect(refused.stderr + refused.stdout).toContain("127.0.0.1:1");
  });

  slow("the Dockerfile builds FROM scratch with that tree, a non-root USER and the executable as ENTRYPOINT", () => {
    const dockerfile = readFileSync(join(ROOT, "Dockerfile"), "utf8");
    const froms = [...dockerfile.matchAll(/^FROM\s+(.+)$/gm)].map((m) => m[1]?.trim());
    expect(froms.at(-1)).toBe("scratch");
    const final = dockerfile.slice(dockerfile.lastIndexOf("\nFROM scratch"));
    expect(final).toContain("COPY --from=rootfs /rootfs/ /");
    expect(final).toMatch(/^USER 65532:65532$/m);
    expect(final).toContain('ENTRYPOINT ["/pgtrickle-relay"]');
    expect(dockerfile).toContain("pgtrickle-relay-rootfs /rootfs /out/pgtrickle-relay");
    expect(dockerfile).toContain("scripts/build --target");
    // Everything the build stage copies must be in the build context.
    const ignored = readFileSync(join(ROOT, ".dockerignore"), "utf8").split("\n").map((l) => l.trim());
    for (const needed of ["src", "scripts", "package.json", "package-lock.json", ".npmrc", "tsconfig.json"]) {
      expect(ignored).not.toContain(needed);
      expect(existsSync(join(ROOT, needed))).toBe(true);
    }
  });
});

// ---------------------------------------------------------------------------------------------

interface FormulaFacts {
  className: string;
  version: string;
  urls: Record<string, { url: string; sha256: string }>;
  installs: string[];
  hasTest: boolean;
  service?: { run: string[]; keepAlive: boolean; logPath: string; errorLogPath: string };
  caveats?: string;
}

/**
 * Loads a formula with `ruby` against a small stand-in for Homebrew's DSL and reports what it
 * declares for each OS and CPU. `ruby -c` alone only proves the syntax.
 */
async function formulaFacts(path: string): Promise<FormulaFacts> {
  const ruby = await requireTool("ruby");
  await ok([ruby, "-c", path]);
  const standIn = join(scratch, "formula-dsl.rb");
  writeFileSync(
    standIn,
    `require "json"
require "pathname"
class Formula
  @@facts = { "urls" => {}, "installs" => [], "hasTest" => false }
  @@os = nil; @@arch = nil
  def self.facts; @@facts; end
  def self.inherited(k); @@facts["className"] = k.name; end
  def self.desc(s); @@facts["desc"] = s; end
  def self.homepage(s); @@facts["homepage"] = s; end
  def self.license(s); @@facts["license"] = s; end
  def self.version(s); @@facts["version"] = s; end
  def self.on_macos; @@os = "macos"; yield; @@os = nil; end
  def self.on_linux; @@os = "linux"; yield; @@os = nil; end
  def self.on_arm; @@arch = "arm"; yield; @@arch = nil; end
  def self.on_intel; @@arch = "intel"; yield; @@arch = nil; end
  def self.url(u); (@@facts["urls"]["#{@@os}/#{@@arch}"] ||= {})["url"] = u; end
  def self.sha256(s); (@@facts["urls"]["#{@@os}/#{@@arch}"] ||= {})["sha256"] = s; end
  def self.test(&b); @@facts["hasTest"] = !b.nil?; end
  # brew services evaluates the block with the formula's paths (these are Homebrew's on Apple silicon).
  def self.service(&b); s = Service.new; s.instance_eval(&b); @@facts["service"] = s.facts; end
  class Service
    attr_reader :facts
    def initialize; @facts = {}; end
    def opt_bin; Pathname("/opt/homebrew/opt/pgtrickle-relay/bin"); end
    def etc; Pathname("/opt/homebrew/etc"); end
    def var; Pathname("/opt/homebrew/var"); end
    def run(a); @facts["run"] = a.map(&:to_s); end
    def keep_alive(v); @facts["keepAlive"] = v; end
    def log_path(p); @facts["logPath"] = p.to_s; end
    def error_log_path(p); @facts["errorLogPath"] = p.to_s; end
  end
  def etc; Pathname("/opt/homebrew/etc"); end
  def var; Pathname("/opt/homebrew/var"); end
  def bin; Bin.new; end
  class Bin; def install(*f); Formula.facts["installs"].concat(f); end; end
end
load ARGV[0]
formula = Object.const_get(Formula.facts["className"]).new
formula.install
Formula.facts["caveats"] = formula.caveats if formula.respond_to?(:caveats)
puts JSON.generate(Formula.facts)
`,
  );
  const r = await ok([ruby, standIn, path]);
  return JSON.parse(r.stdout) as FormulaFacts;
}

describe("Formula/pgtrickle-relay.rb", () => {
  slow("is valid Ruby and declares an archive with a sha256 for macOS and Linux on arm and intel, and a test", async () => {
    const f = await formulaFacts(join(ROOT, "Formula", "pgtrickle-relay.rb"));
    expect(f.className).toBe("PgtrickleRelay");
    expect(Object.keys(f.urls).sort()).toEqual(["linux/arm", "linux/intel", "macos/arm", "macos/intel"]);
    for (const [key, target] of Object.entries({
      "macos/arm": "darwin-arm64",
      "macos/intel": "darwin-x64",
      "linux/arm": "linux-arm64",
      "linux/intel": "linux-x64",
    })) {
      expect(f.urls[key]?.url).toMatch(
        new RegExp(`^https://github\\.com/[^/]+/[^/]+/releases/download/v${f.version}/${NAME}-${f.version}-${target}\\.tar\\.gz$`),
      );
      expect(f.urls[key]?.sha256).toMatch(/^[0-9a-f]{64}$/);
    }
    expect(f.installs).toEqual([NAME]);
    expect(f.hasTest).toBe(true);
    expect(readFileSync(join(ROOT, "Formula", "pgtrickle-relay.rb"), "utf8")).toContain("--version");
  });

  slow("declares a service for brew services: run with the TOML file of its caveats, kept alive, logged", async () => {
    const f = await formulaFacts(join(ROOT, "Formula", "pgtrickle-relay.rb"));
    const config = "/opt/homebrew/etc/pgtrickle-relay.toml";
    expect(f.service?.run).toEqual([`/opt/homebrew/opt/pgtrickle-relay/bin/${NAME}`, "run", "--config", config, "--shutdown-timeout", "15"]);
    expect(f.service?.keepAlive).toBe(true);
    expect(f.service?.logPath).toBe("/opt/homebrew/var/log/pgtrickle-relay.log");
    expect(f.service?.errorLogPath).toBe(f.service?.logPath);
    expect(f.caveats).toContain(config);
    // The caveats show a config file with the relay's own keys.
    const example = (f.caveats ?? "").split("\n").filter((l) => /^\s+\w+ = "/.test(l)).map((l) => l.trim());
    expect(example.map((l) => l.split(" ")[0])).toEqual(["postgres_url", "relay_group_id", "metrics_addr"]);
  });
});

// ---------------------------------------------------------------------------------------------

describe("GitHub workflows", () => {
  type Step = { uses?: string; run?: string; with?: Record<string, unknown> };
  type Workflow = { on?: unknown; jobs?: Record<string, { "runs-on"?: unknown; steps?: Step[]; needs?: unknown }> };

  function load(name: string): Workflow {
    return Bun.YAML.parse(readFileSync(join(ROOT, ".github", "workflows", name), "utf8")) as Workflow;
  }

  function commonShape(w: Workflow): Step[] {
    expect(w.on).toBeDefined();
    expect(Object.keys(w.jobs ?? {}).length).toBeGreaterThan(0);
    const all: Step[] = [];
    for (const [name, job] of Object.entries(w.jobs ?? {})) {
      expect(job["runs-on"], `job ${name} runs-on`).toBeDefined();
      expect(Array.isArray(job.steps) && job.steps.length > 0, `job ${name} has steps`).toBe(true);
      for (const step of job.steps ?? []) {
        expect(Boolean(step.uses) !== Boolean(step.run), `a step of ${name} has exactly one of uses/run`).toBe(true);
        if (step.uses) expect(step.uses).toMatch(/^[\w.-]+\/[\w./-]+@v\d+$/);
      }
      for (const need of [job.needs ?? []].flat()) expect(Object.keys(w.jobs ?? {})).toContain(String(need));
      all.push(...(job.steps ?? []));
    }
    return all;
  }

  slow("ci.yml installs the dependencies, starts the servers, tests and builds", () => {
    const w = load("ci.yml");
    const runs = commonShape(w)
      .map((s) => s.run ?? "")
      .join("\n");
    for (const command of ["npm ci", "scripts/dev-packages", "scripts/services start", "scripts/test", "scripts/build"]) {
      expect(runs).toContain(command);
    }
  });

  slow("release.yml builds on v* tags, publishes archives, SHA256SUMS and install.sh, a multi-arch image and the formula", () => {
    const w = load("release.yml");
    expect(w.on).toEqual({ push: { tags: ["v*"] } });
    const steps = commonShape(w);
    const runs = steps.map((s) => s.run ?? "").join("\n");
    expect(runs).toContain("scripts/build");
    expect(runs).toContain("sha256sum -c SHA256SUMS");
    expect(runs).toMatch(/gh release create[\s\S]*dist\/\*\.tar\.gz dist\/SHA256SUMS dist\/install\.sh/);
    expect(runs).toContain("scripts/formula --repo");
    expect(runs).toContain("Formula/pgtrickle-relay.rb");
    expect(runs).toContain("codesign --verify --strict");
    // The published install.sh gets this repository in place of the placeholder it carries.
    expect(runs).toContain("s|__PGTRICKLE_RELAY_REPO__|$GITHUB_REPOSITORY|");
    expect(readFileSync(join(ROOT, "install.sh"), "utf8")).toContain('REPO_DEFAULT="__PGTRICKLE_RELAY_REPO__"');
    const image = steps.find((s) => s.uses?.startsWith("docker/build-push-action@"));
    expect(image?.with?.platforms).toBe("linux/amd64,linux/arm64");
    expect(image?.with?.push).toBe(true);
  });
});
