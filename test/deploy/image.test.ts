import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pkg from "../../package.json" with { type: "json" };
import { createStreamTable, enableOutbox, writeV1Inline } from "../fixtures/outbox.ts";
import { ROOT, nativeBinary, ok, requireTool, run } from "../helpers/deploy.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { freePort } from "../helpers/proxy.ts";
import { eventually } from "../helpers/relay.ts";
import { requireServer } from "../helpers/servers.ts";

/*
 * The scratch image for real: podman builds the Dockerfile's final stage (`FROM scratch`) from
 * the tree scripts/rootfs lays out, and runs it. The Dockerfile's earlier stages pull base images,
 * which cannot be fetched here; they only produce that tree. Facts of this machine (docs/operations.md):
 * podman's default runtime crun fails on its cgroups, runc works, and podman's default
 * ulimits must be off (containers.conf default_ulimits = []). This test gives podman a
 * containers.conf and a storage of its own (CONTAINERS_CONF, --root, --runroot), so it changes
 * nothing on the machine. Containers use the host network, so PostgreSQL is at 127.0.0.1.
 */

const IMAGE = `localhost/pgtrickle-relay-test:${process.pid}`;
const scratch = mkdtempSync(join(tmpdir(), "relay-image-"));
const env = { ...process.env, CONTAINERS_CONF: join(scratch, "containers.conf") };
let podman: string[] = [];
let db: TestDatabase;
const containers: string[] = [];

/** The Dockerfile's last stage, with its COPY --from=rootfs reading the tree from the build context. */
function finalStage(): string {
  const dockerfile = readFileSync(join(ROOT, "Dockerfile"), "utf8");
  const stage = dockerfile.slice(dockerfile.lastIndexOf("\nFROM scratch") + 1);
  const local = stage.replace(/COPY --from=rootfs (--chown=\S+ )?\/rootfs\//g, "COPY $1rootfs/");
  if (local.includes("--from=")) throw new Error(`the final stage copies from a stage this test does not lay out:\n${stage}`);
  return local;
}

const container = (args: string[], timeoutMs = 120_000) => run([...podman, "run", "--rm", "--network", "host", "--read-only", "--read-only-tmpfs=false", IMAGE, ...args], { env, timeoutMs });

beforeAll(async () => {
  await requireServer("postgres");
  podman = [requireTool("podman"), "--root", join(scratch, "storage"), "--runroot", join(scratch, "run")];
  requireTool("runc");
  writeFileSync(env.CONTAINERS_CONF, '[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n');
  const context = join(scratch, "context");
  mkdirSync(context);
  await ok([join(ROOT, "scripts", "rootfs"), join(context, "rootfs"), await nativeBinary()]);
  writeFileSync(join(context, "Containerfile"), finalStage());
  await ok([...podman, "build", "--quiet", "--tag", IMAGE, "--file", join(context, "Containerfile"), context], { env, timeoutMs: 300_000 });
  db = await testDatabase("image", { catalog: false });
}, 600_000);

afterAll(async () => {
  for (const c of containers) await run([...podman, "rm", "--force", c], { env });
  if (podman.length) await run([...podman, "rmi", "--force", IMAGE], { env });
  await db?.drop();
  // Storage holds files of uid 65532 and overlay mounts: podman unmounts them as it goes.
  if (podman.length) await run([...podman, "system", "reset", "--force"], { env });
  rmSync(scratch, { recursive: true, force: true });
}, 120_000);

describe("the scratch image under podman (runc, host network, read-only root filesystem)", () => {
  test("is the Dockerfile's final stage: user 65532, entrypoint the relay, nothing but the rootfs tree", async () => {
    const inspect = JSON.parse((await ok([...podman, "image", "inspect", IMAGE], { env })).stdout)[0];
    expect(inspect.Config.User).toBe("65532:65532");
    expect(inspect.Config.Entrypoint).toEqual(["/pgtrickle-relay"]);
    expect(inspect.RootFS.Layers.length).toBe(2);
  });

  test("--version", async () => {
    const r = await container(["--version"]);
    expect(r.exitCode).toBe(0);
    expect(r.stdout).toStartWith(`pgtrickle-relay ${pkg.version} (`);
  });

  test("catalog install, then drain relays an outbox row to stdout", async () => {
    const install = await container(["catalog", "install", "--postgres-url", db.url]);
    expect(install.exitCode).toBe(0);
    const status = await container(["catalog", "status", "--postgres-url", db.url]);
    expect(status.exitCode).toBe(0);
    expect(status.stdout).toContain("relay catalog");

    await createStreamTable(db.sql, "public.img", "id int primary key, note text");
    const { outboxTable } = await enableOutbox(db.sql, "public.img");
    await db.sql`SELECT pgtrickle.set_relay_outbox('img_stdout', 'public.img', NULL, '{"type":"stdout"}'::jsonb)`;
    await writeV1Inline(db.sql, outboxTable, { inserted: [{ id: 7, note: "from the image" }], deleted: [] });
    const drain = await container(["drain", "--postgres-url", db.url, "--timeout", "60"]);
    expect(drain.exitCode).toBe(0);
    const lines = drain.stdout.trim().split("\n").map((l) => JSON.parse(l));
    expect(lines).toHaveLength(1);
    expect(lines[0].payload).toEqual({ id: 7, note: "from the image" });
    expect(lines[0].op).toBe("insert");
  });

  test("run: /health answers, as uid 65532 on a read-only root; SIGTERM ends it cleanly within the shutdown timeout", async () => {
    const port = await freePort();
    const name = `relay-test-${process.pid}`;
    const shutdownTimeout = 10;
    await ok(
      [...podman, "run", "--detach", "--name", name, "--network", "host", "--read-only", "--read-only-tmpfs=false", IMAGE,
        "run", "--postgres-url", db.url, "--metrics-addr", `127.0.0.1:${port}`, "--shutdown-timeout", String(shutdownTimeout)],
      { env },
    );
    containers.push(name);
    let health: { status: number; body: { status?: string; postgres?: string } } = { status: 0, body: {} };
    await eventually(async () => {
      const res = await fetch(`http://127.0.0.1:${port}/health`).catch(() => null);
      if (!res) return false;
      health = { status: res.status, body: (await res.json()) as typeof health.body };
      return health.body.postgres === "connected";
    }, 60_000, "/health of the container");
    expect(health.status).toBe(200);
    expect(health.body.status).toBe("healthy");

    // The process as the kernel sees it: uid and gid 65532, root mounted read-only.
    const pid = (await ok([...podman, "inspect", "--format", "{{.State.Pid}}", name], { env })).stdout.trim();
    const status = readFileSync(`/proc/${pid}/status`, "utf8");
    expect(/^Uid:\s+(\d+)\s+(\d+)/m.exec(status)?.slice(1)).toEqual(["65532", "65532"]);
    expect(/^Gid:\s+(\d+)\s+(\d+)/m.exec(status)?.slice(1)).toEqual(["65532", "65532"]);
    const rootMount = readFileSync(`/proc/${pid}/mountinfo`, "utf8").split("\n").find((l) => l.split(" ")[4] === "/");
    expect(rootMount?.split(" ")[5]?.split(",")).toContain("ro");

    const started = performance.now();
    await ok([...podman, "kill", "--signal", "TERM", name], { env });
    const exit = (await ok([...podman, "wait", name], { env, timeoutMs: 60_000 })).stdout.trim();
    const seconds = (performance.now() - started) / 1000;
    expect(exit).toBe("0");
    expect(seconds).toBeLessThan(shutdownTimeout);
    const logs = await ok([...podman, "logs", name], { env });
    expect(logs.stderr + logs.stdout).toContain("received SIGTERM");
  }, 120_000);
});
