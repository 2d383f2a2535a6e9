import { readFileSync } from "node:fs";
import { nearest } from "./cli.ts";
import { configError } from "./errors.ts";
import { LOG_LEVELS, type LogFormat, type LogLevel } from "./observe/log.ts";
import { registerSecrets, urlSecrets } from "./redact.ts";
import { resolveSecretsIn } from "./secrets.ts";

/** Process-wide settings (README "Running it": the settings table). Precedence per key: flag > environment > file > default. */
export interface Settings {
  postgresUrl: string;
  relayGroupId: string;
  metricsAddr: string;
  logFormat: LogFormat;
  logLevel: LogLevel;
  discoveryIntervalSecs: number;
  coordinatorTickMs: number;
  maxWorkers: number;
  shutdownTimeoutSecs: number;
  sinkMaxInflight: number;
  ioTimeoutSecs: number;
  stallTimeoutSecs: number;
}

interface Key {
  flag: string;
  env: string;
  file: string;
  fallback?: string;
  /** What the value is, for `--help`: `<url>`, `<seconds>` … */
  hint: string;
}

/** The single table of process settings; `--help` texts and the README are written from it. */
export const SETTINGS: Record<keyof Settings, Key> = {
  postgresUrl: { flag: "postgres-url", env: "PGTRICKLE_RELAY_POSTGRES_URL", file: "postgres_url", hint: "url" },
  relayGroupId: { flag: "relay-group-id", env: "PGTRICKLE_RELAY_GROUP_ID", file: "relay_group_id", fallback: "default", hint: "name" },
  metricsAddr: { flag: "metrics-addr", env: "PGTRICKLE_RELAY_METRICS_ADDR", file: "metrics_addr", fallback: "0.0.0.0:9090", hint: "host:port" },
  logFormat: { flag: "log-format", env: "PGTRICKLE_RELAY_LOG_FORMAT", file: "log_format", fallback: "text", hint: "text|json" },
  logLevel: { flag: "log-level", env: "PGTRICKLE_RELAY_LOG_LEVEL", file: "log_level", fallback: "info", hint: "level" },
  discoveryIntervalSecs: { flag: "discovery-interval", env: "PGTRICKLE_RELAY_DISCOVERY_INTERVAL_SECS", file: "discovery_interval_secs", fallback: "30", hint: "seconds" },
  coordinatorTickMs: { flag: "coordinator-tick-ms", env: "PGTRICKLE_RELAY_COORDINATOR_TICK_MS", file: "coordinator_tick_ms", fallback: "500", hint: "ms" },
  maxWorkers: { flag: "max-workers", env: "PGTRICKLE_RELAY_MAX_WORKERS_PER_POD", file: "max_workers_per_pod", fallback: "10", hint: "n" },
  shutdownTimeoutSecs: { flag: "shutdown-timeout", env: "PGTRICKLE_RELAY_SHUTDOWN_TIMEOUT_SECS", file: "shutdown_timeout_seconds", fallback: "30", hint: "seconds" },
  sinkMaxInflight: { flag: "sink-max-inflight", env: "PGTRICKLE_RELAY_SINK_MAX_INFLIGHT", file: "sink_max_inflight", fallback: "3000", hint: "n" },
  ioTimeoutSecs: { flag: "io-timeout", env: "PGTRICKLE_RELAY_IO_TIMEOUT_SECS", file: "io_timeout_secs", fallback: "60", hint: "seconds" },
  stallTimeoutSecs: { flag: "stall-timeout", env: "PGTRICKLE_RELAY_STALL_TIMEOUT_SECS", file: "stall_timeout_secs", fallback: "300", hint: "seconds" },
};

function readConfigFile(path: string): Record<string, unknown> {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (err) {
    throw configError(`config file ${path} cannot be read (${(err as { code?: string }).code ?? "error"})`);
  }
  let parsed: Record<string, unknown>;
  try {
    parsed = Bun.TOML.parse(text) as Record<string, unknown>;
  } catch (err) {
    throw configError(`config file ${path} is not valid TOML: ${(err as Error).message}`);
  }
  const known = Object.values(SETTINGS).map((k) => k.file);
  const unknown = Object.keys(parsed).filter((k) => !known.includes(k));
  if (unknown.length > 0) {
    const hints = unknown.map((k) => `'${k}'${nearest(k, known)}`);
    throw configError(`config file ${path}: unknown key${unknown.length > 1 ? "s" : ""} ${hints.join(", ")} (known: ${known.join(", ")})`);
  }
  return parsed;
}


function integer(name: string, raw: string, min: number): number {
  const n = Number(raw);
  if (!Number.isInteger(n) || n < min) throw configError(`--${name} must be an integer ≥ ${min}, got "${raw}"`);
  return n;
}

/** `flags` are the parsed command-line values keyed by flag name (undefined when not given). */
export function resolveSettings(flags: Record<string, unknown>, env: Record<string, string | undefined> = process.env): Settings {
  const configPath = (flags.config as string | undefined) ?? env.PGTRICKLE_RELAY_CONFIG;
  const file = configPath ? readConfigFile(configPath) : {};
  const raw = {} as Record<keyof Settings, string | undefined>;
  for (const [name, key] of Object.entries(SETTINGS) as [keyof Settings, Key][]) {
    const fromFile = file[key.file];
    raw[name] =
      (flags[key.flag] as string | undefined) ?? env[key.env] ?? (fromFile === undefined ? undefined : String(fromFile)) ?? key.fallback;
  }
  if (!raw.postgresUrl) throw configError("--postgres-url is required (or set PGTRICKLE_RELAY_POSTGRES_URL)");
  if (!LOG_LEVELS.includes(raw.logLevel as LogLevel)) {
    throw configError(`--log-level must be one of ${LOG_LEVELS.join(", ")}, got "${raw.logLevel}"`);
  }
  if (raw.logFormat !== "text" && raw.logFormat !== "json") throw configError(`--log-format must be text or json, got "${raw.logFormat}"`);
  const postgresUrl = resolveSecretsIn(raw.postgresUrl, "--postgres-url", env);
  registerSecrets(urlSecrets(postgresUrl));
  checkPostgresUrl(postgresUrl);
  checkListenAddr(raw.metricsAddr!);
  if (!raw.relayGroupId?.trim()) throw configError("--relay-group-id must not be empty");
  return {
    postgresUrl,
    relayGroupId: raw.relayGroupId!,
    metricsAddr: raw.metricsAddr!,
    logFormat: raw.logFormat,
    logLevel: raw.logLevel as LogLevel,
    discoveryIntervalSecs: integer("discovery-interval", raw.discoveryIntervalSecs!, 1),
    coordinatorTickMs: integer("coordinator-tick-ms", raw.coordinatorTickMs!, 10),
    maxWorkers: integer("max-workers", raw.maxWorkers!, 1),
    shutdownTimeoutSecs: integer("shutdown-timeout", raw.shutdownTimeoutSecs!, 0),
    sinkMaxInflight: integer("sink-max-inflight", raw.sinkMaxInflight!, 0),
    ioTimeoutSecs: integer("io-timeout", raw.ioTimeoutSecs!, 1),
    stallTimeoutSecs: integer("stall-timeout", raw.stallTimeoutSecs!, 1),
  };
}

/** A postgres:// or postgresql:// URL (the forms postgres.js accepts), else a config error that does not echo it. */
function checkPostgresUrl(url: string): void {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw configError("--postgres-url is not a URL; expected postgres://user[:password]@host[:port]/database");
  }
  if (parsed.protocol !== "postgres:" && parsed.protocol !== "postgresql:") {
    throw configError(`--postgres-url must start with postgres:// or postgresql://, got ${parsed.protocol}//…`);
  }
}

/** `host:port` or `[ipv6]:port` with a port 0–65535 (0: any free port). */
function checkListenAddr(addr: string): void {
  const m = /^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$/.exec(addr);
  if (!m || Number(m[2]) > 65535) throw configError(`--metrics-addr must be host:port (e.g. 0.0.0.0:9090 or 127.0.0.1:0), got "${addr}"`);
}

/** citty argument definitions for every setting, with the env var and default in the help text. */
export function settingArgs(descriptions: Partial<Record<keyof Settings, string>>) {
  const args: Record<string, { type: "string"; description: string; valueHint: string }> = {
    config: { type: "string", description: "TOML file with process settings (env PGTRICKLE_RELAY_CONFIG)", valueHint: "path" },
  };
  for (const [name, key] of Object.entries(SETTINGS) as [keyof Settings, Key][]) {
    const text = descriptions[name];
    if (!text) continue;
    const dflt = key.fallback ? `, default ${JSON.stringify(key.fallback)}` : "";
    args[key.flag] = { type: "string", description: `${text} (env ${key.env}, TOML ${key.file}${dflt})`, valueHint: key.hint };
  }
  return args;
}
