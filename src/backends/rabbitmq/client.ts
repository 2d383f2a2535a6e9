/**
 * The connection to RabbitMQ through amqplib: the URL and socket options (heartbeat, TLS), the
 * description of the server that reaches logs (never the password), and how amqplib's errors
 * are classified (config or transient).
 */
import { configError, errorMessage, RelayError, transientError } from "../../errors.ts";
import { scrubberFor, urlSecrets, type Scrub } from "../../redact.ts";
import { describeTlsError, loadTls, type TlsConfig } from "../../tls.ts";

/** `amqp://user@host:port/vhost` — never the password. */
export function describeAmqpUrl(url: string, tls = false): string {
  try {
    const u = new URL(url);
    const secure = tls || u.protocol === "amqps:";
    const user = u.username ? `${decodeURIComponent(u.username)}@` : "";
    const port = u.port || (secure ? "5671" : "5672");
    const vhost = u.pathname.length > 1 ? decodeURIComponent(u.pathname.slice(1)) : "/";
    return `${secure ? "amqps" : "amqp"}://${user}${u.hostname}:${port}/${vhost === "/" ? "" : encodeURIComponent(vhost)}`;
  } catch {
    return "(unparseable amqp URL)";
  }
}

/** Connection settings the sink and the source share; TLS in the vocabulary of docs/TLS.md. */
export interface AmqpConnectionOptions extends TlsConfig {
  url: string;
  heartbeat_seconds: number;
  connection_timeout_ms: number;
}

/** The URL and socket options amqplib gets (heartbeat goes in the URL, TLS material in the socket). */
export function amqpConnectArgs(cfg: AmqpConnectionOptions, connectionName = "pgtrickle-relay"): { url: string; socket: Record<string, unknown> } {
  const u = new URL(cfg.url);
  if (!u.searchParams.has("heartbeat")) u.searchParams.set("heartbeat", String(cfg.heartbeat_seconds));
  const socket: Record<string, unknown> = { timeout: cfg.connection_timeout_ms, noDelay: true, clientProperties: { connection_name: connectionName } };
  applyTls(cfg, u, socket);
  return { url: u.toString(), socket };
}

/** TLS: `amqps://` or a `tls*` key; an amqp:// URL then becomes amqps://, the material goes in the socket options. */
function applyTls(cfg: AmqpConnectionOptions, u: URL, socket: Record<string, unknown>): void {
  const tls = loadTls(cfg, "rabbitmq", { implied: u.protocol === "amqps:" });
  if (!tls) return;
  if (u.protocol === "amqp:") u.protocol = "amqps:";
  Object.assign(socket, tls);
}

/** Server close codes that an operator has to fix (AMQP reply codes). */
const CONFIG_CODES = new Set([403 /* access refused */, 530 /* not allowed (vhost) */]);

/** Removes the URL's password (and the TLS key passphrase) from any text amqplib hands us. */
export const amqpScrubber = (cfg: AmqpConnectionOptions): Scrub => scrubberFor([...urlSecrets(cfg.url), cfg.tls_key_password]);

/** A RelayError naming host:port (`where`); access problems are config, everything else transient. */
export function amqpFailure(err: unknown, doing: string, where: string, scrub: (t: string) => string): RelayError {
  const tls = describeTlsError(err, `rabbitmq ${doing} on ${where}`);
  if (tls) return tls;
  const code = (err as { code?: unknown }).code;
  const text = scrub(errorMessage(err));
  const msg = `rabbitmq ${doing} on ${where}: ${text}`;
  if ((typeof code === "number" && CONFIG_CODES.has(code)) || /ACCESS[-_]REFUSED|NOT[-_]ALLOWED/.test(text)) {
    return configError(`${msg} — check the user name, password, vhost and permissions in url`);
  }
  // amqplib reports a refused connection.open without its reason; RabbitMQ refuses it only
  // for a virtual host that is missing or that the user may not access (530 NOT_ALLOWED).
  if (/Expected ConnectionOpenOk; got <ConnectionClose/.test(text)) {
    const vhost = where.replace(/^amqps?:\/\/[^/]*\//, "") || "/";
    return configError(`rabbitmq ${doing} on ${where}: the server refused virtual host '${decodeURIComponent(vhost)}' (it does not exist, or the user has no permission on it)`);
  }
  return transientError(msg);
}
