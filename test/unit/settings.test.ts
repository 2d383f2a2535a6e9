import { describe, expect, test } from "bun:test";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { RelayError } from "../../src/errors.ts";
import { redact } from "../../src/redact.ts";
import { resolveSettings, settingArgs, SETTINGS } from "../../src/settings.ts";

const dir = mkdtempSync(join(tmpdir(), "relay-settings-"));
const URL_ = "postgres://relay@db:5432/app";

function file(toml: string): string {
  const path = join(dir, `${crypto.randomUUID()}.toml`);
  writeFileSync(path, toml);
  return path;
}

function configError(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(RelayError);
    expect((err as RelayError).kind).toBe("config");
    return (err as Error).message;
  }
  throw new Error("expected a config error");
}

describe("resolveSettings", () => {
  test("defaults of docs/interface.md §7.1", () => {
    expect(resolveSettings({ "postgres-url": URL_ }, {})).toEqual({
      postgresUrl: URL_,
      relayGroupId: "default",
      metricsAddr: "0.0.0.0:9090",
      logFormat: "text",
      logLevel: "info",
      discoveryIntervalSecs: 30,
      coordinatorTickMs: 500,
      maxWorkers: 10,
      shutdownTimeoutSecs: 30,
      sinkMaxInflight: 3000,
      ioTimeoutSecs: 60,
      stallTimeoutSecs: 300,
    });
  });

  test("precedence per key: flag > environment > file > default (the file survives where no flag is given)", () => {
    const path = file(`
postgres_url = "postgres://file/db"
metrics_addr = "127.0.0.1:9999"
log_level = "debug"
relay_group_id = "from-file"
log_format = "json"
discovery_interval_secs = 7
coordinator_tick_ms = 250
max_workers_per_pod = 3
shutdown_timeout_seconds = 5
sink_max_inflight = 0
io_timeout_secs = 9
stall_timeout_secs = 40
`);
    const fromFile = resolveSettings({ config: path }, {});
    expect(fromFile).toEqual({
      postgresUrl: "postgres://file/db",
      relayGroupId: "from-file",
      metricsAddr: "127.0.0.1:9999",
      logFormat: "json",
      logLevel: "debug",
      discoveryIntervalSecs: 7,
      coordinatorTickMs: 250,
      maxWorkers: 3,
      shutdownTimeoutSecs: 5,
      sinkMaxInflight: 0,
      ioTimeoutSecs: 9,
      stallTimeoutSecs: 40,
    });
    const env = { PGTRICKLE_RELAY_GROUP_ID: "from-env", PGTRICKLE_RELAY_MAX_WORKERS_PER_POD: "4", PGTRICKLE_RELAY_CONFIG: path };
    const mixed = resolveSettings({ "max-workers": "5", "log-level": "warn" }, env);
    expect(mixed.relayGroupId).toBe("from-env");
    expect(mixed.maxWorkers).toBe(5);
    expect(mixed.logLevel).toBe("warn");
    expect(mixed.metricsAddr).toBe("127.0.0.1:9999");
    expect(mixed.postgresUrl).toBe("postgres://file/db");
  });

  test("every setting has a flag, an environment variable and a file key", () => {
    const env = Object.fromEntries(Object.values(SETTINGS).map((k) => [k.env, k.flag.includes("url") ? URL_ : k.fallback ?? "x"]));
    expect(Object.keys(env)).toContain("PGTRICKLE_RELAY_SINK_MAX_INFLIGHT");
    expect(Object.keys(env)).toContain("PGTRICKLE_RELAY_COORDINATOR_TICK_MS");
    expect(resolveSettings({}, { ...env, PGTRICKLE_RELAY_SINK_MAX_INFLIGHT: "17" }).sinkMaxInflight).toBe(17);
    const args = settingArgs({ sinkMaxInflight: "window", maxWorkers: "workers" });
    expect(args["sink-max-inflight"]!.description).toBe('window (env PGTRICKLE_RELAY_SINK_MAX_INFLIGHT, TOML sink_max_inflight, default "3000")');
    expect(args["max-workers"]!.description).toBe('workers (env PGTRICKLE_RELAY_MAX_WORKERS_PER_POD, TOML max_workers_per_pod, default "10")');
  });

  test("the URL may hold ${env:…}/${file:…}; the resolved password is redacted from then on", () => {
    const pw = `pw-${crypto.randomUUID()}`;
    const s = resolveSettings({ "postgres-url": "postgres://relay:${env:PGPW}@db/app" }, { PGPW: pw });
    expect(s.postgresUrl).toBe(`postgres://relay:${pw}@db/app`);
    expect(redact(`login failed for postgres://relay:${pw}@db/app`)).toBe("login failed for postgres://relay:***@db/app");
    expect(configError(() => resolveSettings({ "postgres-url": "postgres://relay:${env:NOPE}@db/app" }, {}))).toBe(
      "--postgres-url: environment variable NOPE is not set (referenced as ${env:NOPE})",
    );
  });

  test("the URL must be a postgres URL and the metrics address host:port; neither message echoes a password", () => {
    expect(configError(() => resolveSettings({ "postgres-url": "not a url" }, {}))).toContain("--postgres-url is not a URL");
    const mysql = configError(() => resolveSettings({ "postgres-url": "mysql://u:hunter22@db/app" }, {}));
    expect(mysql).toContain("must start with postgres:// or postgresql://");
    expect(mysql).not.toContain("hunter22");
    expect(configError(() => resolveSettings({ "postgres-url": URL_, "metrics-addr": "garbage" }, {}))).toContain("--metrics-addr must be host:port");
    expect(configError(() => resolveSettings({ "postgres-url": URL_, "metrics-addr": "127.0.0.1:70000" }, {}))).toContain("--metrics-addr");
    expect(resolveSettings({ "postgres-url": URL_, "metrics-addr": "[::1]:0" }, {}).metricsAddr).toBe("[::1]:0");
    expect(configError(() => resolveSettings({ "postgres-url": URL_, "relay-group-id": " " }, {}))).toBe("--relay-group-id must not be empty");
  });

  test("a TOML key that is not a setting is refused, with a suggestion", () => {
    const path = join(mkdtempSync(join(tmpdir(), "relay-toml-")), "relay.toml");
    writeFileSync(path, `postgres_url = "${URL_}"\nrelay_group = "eu"\n`);
    expect(configError(() => resolveSettings({ config: path }, {}))).toContain("unknown key 'relay_group' (did you mean 'relay_group_id'?)");
  });

  test("bad values are config errors that name the flag", () => {
    expect(configError(() => resolveSettings({}, {}))).toBe("--postgres-url is required (or set PGTRICKLE_RELAY_POSTGRES_URL)");
    expect(configError(() => resolveSettings({ "postgres-url": URL_, "log-level": "loud" }, {}))).toContain("--log-level must be one of error, warn, info, debug, trace");
    expect(configError(() => resolveSettings({ "postgres-url": URL_, "log-format": "xml" }, {}))).toBe('--log-format must be text or json, got "xml"');
    expect(configError(() => resolveSettings({ "postgres-url": URL_, "max-workers": "0" }, {}))).toBe('--max-workers must be an integer ≥ 1, got "0"');
    expect(configError(() => resolveSettings({ "postgres-url": URL_, "coordinator-tick-ms": "1.5" }, {}))).toContain("--coordinator-tick-ms");
    expect(configError(() => resolveSettings({ "postgres-url": URL_ }, { PGTRICKLE_RELAY_SINK_MAX_INFLIGHT: "-1" }))).toContain("--sink-max-inflight");
    expect(configError(() => resolveSettings({ config: join(dir, "absent.toml") }, {}))).toContain("cannot be read (ENOENT)");
    expect(configError(() => resolveSettings({ config: file("this is = = not toml") }, {}))).toContain("is not valid TOML");
  });
});
