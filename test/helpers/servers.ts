import { connect as tcpConnect } from "node:net";

/**
 * Where the real servers that `scripts/services` starts listen: loopback only, fixed ports.
 * Integration tests take every address from here and call `requireServer` first, so a missing
 * server fails the test with a message saying how to start it; tests never skip.
 */

/** PostgreSQL 15, user postgres with trust auth. PGTRICKLE_TEST_PG_URL overrides (as in pg.ts). */
export const POSTGRES_URL = process.env.PGTRICKLE_TEST_PG_URL ?? "postgres://postgres@127.0.0.1:5432/postgres";

/** nats-server with JetStream; its monitoring endpoint is NATS_MONITOR_URL. */
export const NATS_URL = "nats://127.0.0.1:4222";
export const NATS_MONITOR_URL = "http://127.0.0.1:8222";

/** Redis 7, no persistence. */
export const REDIS_URL = "redis://127.0.0.1:6379";

/** RabbitMQ 3.10, default vhost, guest/guest (allowed from loopback only). */
export const AMQP_URL = "amqp://guest:guest@127.0.0.1:5672";

/** Single-node KRaft Kafka 3.9; topics are auto-created, every replication factor is 1. */
export const KAFKA_BROKERS = ["127.0.0.1:9092"];
/**
 * The same broker's SASL_PLAINTEXT listener: mechanisms PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512,
 * one user (PLAIN from the listener's JAAS config, SCRAM credentials set by scripts/services).
 */
export const KAFKA_SASL_BROKERS = ["127.0.0.1:9094"];
export const KAFKA_SASL_USER = "relay";
export const KAFKA_SASL_PASSWORD = "relay-secret";
/**
 * The same broker's listener for clients behind a test's proxy: it listens on KAFKA_PROXIED_PORT
 * and advertises KAFKA_PROXIED_ADVERTISED_PORT, where the test's proxy must listen (forwarding to
 * KAFKA_PROXIED_PORT), so clients following the advertised address stay behind the proxy.
 */
export const KAFKA_PROXIED_PORT = 9095;
export const KAFKA_PROXIED_ADVERTISED_PORT = 9096;

/**
 * TLS listeners beside the plaintext ones, all with the server certificate of TLS_FILES (signed
 * by TLS_FILES.ca, valid for 127.0.0.1 and localhost). PostgreSQL speaks TLS on POSTGRES_URL's
 * own port; its role TLS_CLIENT_ROLE logs in only with TLS_FILES.clientCert (pg_hba `cert`).
 */
export const TLS_CLIENT_ROLE = "relay_tls";
/** A second nats-server, JetStream over TLS only, requiring a client certificate. */
export const NATS_TLS_URL = "tls://127.0.0.1:4223";
/** The same Redis over TLS; a client certificate is verified when given, not required. */
export const REDIS_TLS_URL = "rediss://127.0.0.1:6380";
/** The same RabbitMQ over TLS; a client certificate is verified when given, not required. */
export const AMQPS_URL = "amqps://guest:guest@127.0.0.1:5671";
/** The same Kafka broker: SSL; SSL requiring a client certificate; SASL_SSL (the SASL users above). */
export const KAFKA_SSL_BROKERS = ["127.0.0.1:9097"];
export const KAFKA_MTLS_BROKERS = ["127.0.0.1:9098"];
export const KAFKA_SASL_SSL_BROKERS = ["127.0.0.1:9099"];

/** Where scripts/services keeps the local CA and certificates (.services/tls of this clone). */
export const TLS_DIR = new URL("../../.services/tls/", import.meta.url).pathname;
/**
 * The files of TLS_DIR: the CA, the server's and a client's certificate and key (the client's
 * common name is TLS_CLIENT_ROLE; its key also encrypted with TLS_KEY_PASSPHRASE), certificates
 * that expired in 2020, and certificates of an unrelated CA.
 */
export const TLS_FILES = {
  ca: `${TLS_DIR}ca.crt`,
  serverCert: `${TLS_DIR}server.crt`,
  serverKey: `${TLS_DIR}server.key`,
  clientCert: `${TLS_DIR}client.crt`,
  clientKey: `${TLS_DIR}client.key`,
  clientKeyEncrypted: `${TLS_DIR}client-encrypted.key`,
  expiredServerCert: `${TLS_DIR}expired-server.crt`,
  expiredServerKey: `${TLS_DIR}expired-server.key`,
  expiredClientCert: `${TLS_DIR}expired-client.crt`,
  expiredClientKey: `${TLS_DIR}expired-client.key`,
  otherCa: `${TLS_DIR}other-ca.crt`,
  otherServerCert: `${TLS_DIR}other-server.crt`,
  otherServerKey: `${TLS_DIR}other-server.key`,
  otherClientCert: `${TLS_DIR}other-client.crt`,
  otherClientKey: `${TLS_DIR}other-client.key`,
} as const;
export const TLS_KEY_PASSPHRASE = "relay-key-passphrase";

/**
 * fauxqs, an SQS emulator. Queue URLs it hands out look like
 * http://sqs.us-east-1.localhost:4566/000000000000/<name>; clients must set `endpoint` to
 * SQS_ENDPOINT (the AWS SDK then sends every call there, whatever the queue URL's host).
 */
export const SQS_ENDPOINT = "http://127.0.0.1:4566";
/** The emulator accepts any credentials; these dummies keep the AWS SDK from looking further. */
export const AWS_REGION = "us-east-1";
export const AWS_CREDENTIALS = { accessKeyId: "test", secretAccessKey: "test" } as const;
/** The same credentials as the environment of a relay process (the SDK's default chain reads them). */
export const AWS_ENV = { AWS_ACCESS_KEY_ID: AWS_CREDENTIALS.accessKeyId, AWS_SECRET_ACCESS_KEY: AWS_CREDENTIALS.secretAccessKey };
/** The port of a server URL. */
export const portOf = (url: string) => Number(new URL(url).port);
/** Ready-made SQSClient options for the emulator. */
export const SQS_CLIENT_CONFIG = {
  endpoint: SQS_ENDPOINT,
  region: AWS_REGION,
  credentials: AWS_CREDENTIALS,
} as const;

/**
 * PostgreSQL 18.6 with the real pg_trickle extension preloaded, one cluster per extension
 * version (`scripts/services pgtrickle`); user postgres, trust auth. Databases get the
 * extension through test/helpers/pgtrickle.ts.
 */
export const PGTRICKLE_VERSIONS = ["0.45.0", "0.39.0"] as const;
export type PgTrickleVersion = (typeof PGTRICKLE_VERSIONS)[number];
export const PGTRICKLE_URLS: Record<PgTrickleVersion, string> = {
  "0.45.0": "postgres://postgres@127.0.0.1:5433/postgres",
  "0.39.0": "postgres://postgres@127.0.0.1:5434/postgres",
};

export type ServerName = "postgres" | "nats" | "redis" | "rabbitmq" | "kafka" | "sqs" | "prometheus" | `pgtrickle-${PgTrickleVersion}`;

/**
 * Prometheus (Debian's package) for the dashboard and alert-rule tests: scrape targets are
 * file_sd JSON files and rules are YAML files in the directories its loaded config names
 * (GET /api/v1/status/config); POST /-/reload after adding rules.
 */
export const PROMETHEUS_URL = "http://127.0.0.1:9091";

function hostPort(url: string): { host: string; port: number } {
  const u = new URL(url);
  return { host: u.hostname.replace(/^\[|\]$/g, ""), port: Number(u.port) };
}

/** host and port of each server, as `requireServer` probes them. */
export const SERVER_ADDRESSES: Record<ServerName, { host: string; port: number }> = {
  postgres: { host: hostPort(POSTGRES_URL).host, port: hostPort(POSTGRES_URL).port || 5432 },
  nats: hostPort(NATS_URL),
  redis: hostPort(REDIS_URL),
  rabbitmq: hostPort(AMQP_URL),
  kafka: hostPort(`kafka://${KAFKA_BROKERS[0]}`),
  sqs: hostPort(SQS_ENDPOINT),
  "pgtrickle-0.45.0": hostPort(PGTRICKLE_URLS["0.45.0"]),
  "pgtrickle-0.39.0": hostPort(PGTRICKLE_URLS["0.39.0"]),
  prometheus: hostPort(PROMETHEUS_URL),
};

function portAnswers(host: string, port: number, timeoutMs: number): Promise<true | string> {
  return new Promise((resolve) => {
    const socket = tcpConnect({ host, port });
    const done = (result: true | string) => {
      clearTimeout(timer);
      socket.destroy();
      resolve(result);
    };
    const timer = setTimeout(() => done(`no answer within ${timeoutMs} ms`), timeoutMs);
    socket.once("connect", () => done(true));
    socket.once("error", (err: NodeJS.ErrnoException) => done(err.code ?? err.message));
  });
}

/**
 * Throws unless `name`'s port accepts a TCP connection within 2 s. Call it at the top of a
 * test (or in beforeAll) so a stopped server is a failure that says how to fix it.
 */
export async function requireServer(name: ServerName): Promise<void> {
  const addr = SERVER_ADDRESSES[name];
  if (!addr) throw new Error(`unknown server "${name}"; known: ${Object.keys(SERVER_ADDRESSES).join(", ")}`);
  const result = await portAnswers(addr.host, addr.port, 2000);
  if (result !== true) {
    const start = name.startsWith("pgtrickle") ? "scripts/services pgtrickle" : "scripts/services";
    throw new Error(`${name} is not running at ${addr.host}:${addr.port}; start it with ${start}`, {
      cause: result,
    });
  }
}
