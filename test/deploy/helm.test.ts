import { beforeAll, describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import pkg from "../../package.json" with { type: "json" };
import { SETTINGS } from "../../src/settings.ts";
import { ROOT, catalogInstallWith, nativeBinary, ok, run } from "../helpers/deploy.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";

/*
 * deploy/helm/pgtrickle-relay: `helm lint --strict` and `helm template` with assertions on the
 * rendered objects. Helm v4 comes from scripts/helm (go install from the Go module proxy, cached);
 * its first build takes minutes.
 */

const CHART = join(ROOT, "deploy", "helm", "pgtrickle-relay");
const URL_KEY = "DATABASE_URL";
const DB_URL = "postgres://relay:s3cret@db.example:5432/app";
let helm = "";

type Obj = { apiVersion: string; kind: string; metadata: { name: string; labels?: Record<string, string> }; spec?: any; stringData?: Record<string, string>; [k: string]: unknown };
type EnvVar = { name: string; value?: string };

beforeAll(async () => {
  helm = (await ok([join(ROOT, "scripts", "helm"), "--path"], { timeoutMs: 20 * 60_000 })).stdout.trim();
}, 20 * 60_000 + 10_000);

/** `helm template` with --set pairs, parsed into its objects. */
async function render(set: Record<string, string | number | boolean> = { [`secret.data.${URL_KEY}`]: DB_URL }): Promise<Obj[]> {
  const args = Object.entries(set).flatMap(([k, v]) => ["--set", `${k}=${v}`]);
  const r = await ok([helm, "template", "rel", CHART, "--namespace", "relays", ...args]);
  const docs = Bun.YAML.parse(r.stdout) as unknown;
  return (Array.isArray(docs) ? docs : [docs]).filter(Boolean) as Obj[];
}

const one = (objs: Obj[], kind: string): Obj => {
  const found = objs.filter((o) => o.kind === kind);
  expect(found).toHaveLength(1);
  return found[0]!;
};
const container = (objs: Obj[]) => one(objs, "Deployment").spec.template.spec.containers[0];
const envOf = (objs: Obj[]) => Object.fromEntries((container(objs).env as EnvVar[]).map((e) => [e.name, e.value]));

describe("helm lint --strict", () => {
  test("passes with the URL given, and with every optional object on", async () => {
    await ok([helm, "lint", "--strict", CHART, "--set", `secret.data.${URL_KEY}=${DB_URL}`]);
    await ok([helm, "lint", "--strict", CHART, "--set", "secret.existingSecret=relay-secrets", "--set", "serviceMonitor.enabled=true", "--set", "podMonitor.enabled=true"]);
  });

  test("helm template refuses a chart without a database URL, and a ServiceMonitor without its Service", async () => {
    const none = await run([helm, "template", "rel", CHART]);
    expect(none.exitCode).not.toBe(0);
    expect(none.stderr).toContain(`secret.data.${URL_KEY} (the PostgreSQL URL) is required`);
    const noService = await run([helm, "template", "rel", CHART, "--set", "secret.existingSecret=s", "--set", "service.enabled=false", "--set", "serviceMonitor.enabled=true"]);
    expect(noService.exitCode).not.toBe(0);
    expect(noService.stderr).toContain("serviceMonitor.enabled needs service.enabled");
  });
});

describe("helm template", () => {
  test("renders a Deployment, its Secret, Service, ServiceAccount and PodDisruptionBudget, and no monitor by default", async () => {
    const objs = await render();
    expect(objs.map((o) => o.kind).sort()).toEqual(["Deployment", "PodDisruptionBudget", "Secret", "Service", "ServiceAccount"]);
    for (const o of objs) expect(o.metadata.labels?.["app.kubernetes.io/instance"]).toBe("rel");
  });

  test("the Deployment: N replicas of the image, `run`, one relay group for all of them, every variable one the relay reads", async () => {
    const objs = await render({ [`secret.data.${URL_KEY}`]: DB_URL, replicaCount: 3, "relay.groupId": "orders" });
    const deployment = one(objs, "Deployment");
    expect(deployment.spec.replicas).toBe(3);
    const c = container(objs);
    expect(c.image).toBe(`ghcr.io/OWNER/pgtrickle-relay:${pkg.version}`);
    expect(c.args).toEqual(["run"]);
    const env = envOf(objs);
    // One pod template: every replica gets the same group id.
    expect(env.PGTRICKLE_RELAY_GROUP_ID).toBe("orders");
    const known = new Set(Object.values(SETTINGS).map((s) => s.env));
    for (const name of Object.keys(env)) expect(known).toContain(name);
    const port = c.ports.find((p: { name: string }) => p.name === "metrics").containerPort;
    expect(env.PGTRICKLE_RELAY_METRICS_ADDR).toBe(`0.0.0.0:${port}`);
    // A rolling update never takes a replica away before its successor runs.
    expect(deployment.spec.strategy.rollingUpdate).toEqual({ maxSurge: 1, maxUnavailable: 0 });
  });

  test("the URL and sink secrets come from the Secret as environment variables, referenced with ${env:…}; none is written into the Deployment", async () => {
    const objs = await render({ [`secret.data.${URL_KEY}`]: DB_URL, "secret.data.NATS_PASSWORD": "n4ts" });
    const secret = one(objs, "Secret");
    expect(secret.stringData).toEqual({ [URL_KEY]: DB_URL, NATS_PASSWORD: "n4ts" });
    const c = container(objs);
    expect(c.envFrom).toEqual([{ secretRef: { name: secret.metadata.name } }]);
    expect(envOf(objs).PGTRICKLE_RELAY_POSTGRES_URL).toBe(`\${env:${URL_KEY}}`);
    const deploymentText = JSON.stringify(one(objs, "Deployment"));
    expect(deploymentText).not.toContain("s3cret");
    expect(deploymentText).not.toContain("n4ts");

    // An existing Secret instead: none is rendered, and the pods read that one.
    const existing = await render({ "secret.existingSecret": "relay-secrets", "secret.postgresUrlKey": "PG_URL" });
    expect(existing.some((o) => o.kind === "Secret")).toBe(false);
    expect(container(existing).envFrom).toEqual([{ secretRef: { name: "relay-secrets" } }]);
    expect(envOf(existing).PGTRICKLE_RELAY_POSTGRES_URL).toBe("${env:PG_URL}");
  });

  test("the rendered environment works: the relay resolves ${env:DATABASE_URL} from the Secret's variables", async () => {
    let db: TestDatabase | undefined;
    try {
      db = await testDatabase("helm_env", { fixture: false, catalog: false });
      const objs = await render({ [`secret.data.${URL_KEY}`]: db.url });
      const env: Record<string, string> = { PATH: process.env.PATH ?? "/usr/bin:/bin", ...one(objs, "Secret").stringData };
      for (const [k, v] of Object.entries(envOf(objs))) if (v !== undefined) env[k] = v;
      env.PGTRICKLE_RELAY_LOG_FORMAT = "text";
      expect(await catalogInstallWith(await nativeBinary(), env, db)).toEqual({ installed: true, printedUrl: false });
    } finally {
      await db?.drop();
    }
  }, 300_000);

  test("termination grace above the shutdown timeout, following it when raised", async () => {
    for (const timeout of [30, 120]) {
      const objs = await render({ [`secret.data.${URL_KEY}`]: DB_URL, "relay.shutdownTimeoutSeconds": timeout });
      expect(envOf(objs).PGTRICKLE_RELAY_SHUTDOWN_TIMEOUT_SECS).toBe(String(timeout));
      expect(one(objs, "Deployment").spec.template.spec.terminationGracePeriodSeconds).toBeGreaterThan(timeout);
    }
  });

  test("probes: readiness on /health (503 while degraded), liveness and startup on /metrics, all on the metrics port", async () => {
    const c = container(await render());
    expect(c.readinessProbe.httpGet).toEqual({ path: "/health", port: "metrics" });
    expect(c.livenessProbe.httpGet).toEqual({ path: "/metrics", port: "metrics" });
    expect(c.startupProbe.httpGet).toEqual({ path: "/metrics", port: "metrics" });
    // /health waits up to 2 s for each source's lag: the probe must wait longer.
    expect(c.readinessProbe.timeoutSeconds).toBeGreaterThan(2);
  });

  test("non-root as the image's user, read-only root filesystem, no privileges, resource requests, only /tmp writable", async () => {
    const objs = await render();
    const pod = one(objs, "Deployment").spec.template.spec;
    const c = container(objs);
    // The image's USER (Dockerfile) and the user scripts/rootfs writes into /etc/passwd.
    const imageUser = /^USER (\d+):(\d+)$/m.exec(readFileSync(join(ROOT, "Dockerfile"), "utf8"));
    expect(imageUser).not.toBeNull();
    expect(readFileSync(join(ROOT, "scripts", "rootfs"), "utf8")).toContain(`RELAY_UID=${imageUser![1]}`);
    expect(pod.securityContext).toMatchObject({ runAsNonRoot: true, runAsUser: Number(imageUser![1]), runAsGroup: Number(imageUser![2]) });
    expect(c.securityContext).toEqual({ allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: { drop: ["ALL"] } });
    expect(pod.automountServiceAccountToken).toBe(false);
    expect(c.resources.requests.cpu).toBeDefined();
    expect(c.resources.requests.memory).toBeDefined();
    expect(c.resources.limits.memory).toBeDefined();
    expect(c.volumeMounts).toEqual([{ name: "tmp", mountPath: "/tmp" }]);
  });

  test("the PodDisruptionBudget and the Service select exactly the Deployment's pods", async () => {
    const objs = await render();
    const podLabels = one(objs, "Deployment").spec.template.metadata.labels;
    const pdb = one(objs, "PodDisruptionBudget");
    expect(pdb.spec.maxUnavailable).toBe(1);
    expect(pdb.spec.selector.matchLabels).toEqual(one(objs, "Deployment").spec.selector.matchLabels);
    for (const [k, v] of Object.entries(pdb.spec.selector.matchLabels)) expect(podLabels[k]).toBe(v);
    const service = one(objs, "Service");
    expect(service.spec.selector).toEqual(pdb.spec.selector.matchLabels);
    expect(service.spec.ports).toEqual([{ name: "metrics", port: 9090, targetPort: "metrics", protocol: "TCP" }]);

    const minAvailable = await render({ [`secret.data.${URL_KEY}`]: DB_URL, "podDisruptionBudget.maxUnavailable": "", "podDisruptionBudget.minAvailable": 1 });
    expect(one(minAvailable, "PodDisruptionBudget").spec).toMatchObject({ minAvailable: 1 });
    expect(one(minAvailable, "PodDisruptionBudget").spec.maxUnavailable).toBeUndefined();
  });

  test("ServiceMonitor and PodMonitor for the Prometheus operator, on request, scraping /metrics of these pods", async () => {
    const objs = await render({ [`secret.data.${URL_KEY}`]: DB_URL, "serviceMonitor.enabled": true, "podMonitor.enabled": true, "serviceMonitor.labels.release": "kps" });
    const sm = one(objs, "ServiceMonitor");
    const pm = one(objs, "PodMonitor");
    expect(sm.apiVersion).toBe("monitoring.coreos.com/v1");
    expect(pm.apiVersion).toBe("monitoring.coreos.com/v1");
    expect(sm.metadata.labels?.release).toBe("kps");
    const service = one(objs, "Service");
    for (const [k, v] of Object.entries(sm.spec.selector.matchLabels)) expect(service.metadata.labels?.[k]).toBe(v as string);
    expect(sm.spec.endpoints).toEqual([{ port: "metrics", path: "/metrics", interval: "30s", scrapeTimeout: "10s" }]);
    expect(pm.spec.selector.matchLabels).toEqual(one(objs, "Deployment").spec.selector.matchLabels);
    expect(pm.spec.podMetricsEndpoints[0]).toMatchObject({ port: "metrics", path: "/metrics" });
  });
});

