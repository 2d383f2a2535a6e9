/**
 * Secrets never leave the process: each form a secret can take (URL password with and without a
 * user name, query tokens, headers, SASL / SQS / TLS key passwords, `${env:…}` and `${file:…}`
 * values) is fed through every command and endpoint against the real servers, and all output is
 * searched for it: run's logs, /health, /health/drained, /metrics, status (text and JSON), check
 * (text and JSON), drain, pipeline list/show, dead-letters list, tail, the status table, dead
 * letters and the catalog's own error messages.
 */
import { afterAll, beforeAll, expect, test } from "bun:test";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createStreamTable, enableOutbox, writeV1Inline } from "../fixtures/outbox.ts";
import { getText, httpBase } from "../helpers/observe.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { eventually, relayOnce, RunningRelay } from "../helpers/relay.ts";
import { KAFKA_SASL_BROKERS, REDIS_URL, requireServer, SQS_ENDPOINT } from "../helpers/servers.ts";

const dir = mkdtempSync(join(tmpdir(), "relay-secrets-"));
let db: TestDatabase;
let relay: RunningRelay | undefined;

beforeAll(async () => {
  for (const s of ["postgres", "redis", "kafka", "sqs", "rabbitmq"] as const) await requireServer(s);
  db = await testDatabase("secrets");
});
afterAll(async () => {
  if (relay && relay.proc.exitCode === null) relay.proc.kill("SIGKILL");
  await db?.drop();
});

const secret = (label: string) => `${label}-${crypto.randomUUID().slice(0, 13)}`;

test("every secret form, through every command and endpoint, appears in no output", async () => {
  const s = {
    redisNoUser: secret("redisnouser"),
    redisUser: secret("redisuser"),
    query: secret("querytoken"),
    header: secret("headerkey"),
    sasl: secret("saslpw"),
    sqs: secret("sqssecret"),
    tlsKey: secret("tlskeypw"),
    env: secret("envvalue"),
    file: secret("filevalue"),
    catalog: secret("catalogpw"),
  };
  const secretFile = join(dir, "token");
  writeFileSync(secretFile, `${s.file}\n`);
  const env = { RELAY_SECRET_TEST_ENV: s.env };
  await createStreamTable(db.sql, "public.sec_orders", "id int primary key");
  const outbox = (await enableOutbox(db.sql, "public.sec_orders")).outboxTable;
  const closed = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: () => new Response("") });
  const closedPort = closed.port;
  closed.stop(true);
  const redisHost = new URL(REDIS_URL).host;
  const sinks: Record<string, Record<string, unknown>> = {
    sec_redis_nouser: { type: "redis", url: `redis://:${s.redisNoUser}@${redisHost}`, stream_key: "sec" },
    sec_redis_user: { type: "redis", url: `redis://someone:${s.redisUser}@${redisHost}`, stream_key: "sec" },
    sec_http: { type: "http", url: `http://127.0.0.1:${closedPort}/hook?token=${s.query}`, headers: { "X-Api-Key": s.header, Authorization: "Bearer ${file:" + secretFile + "}" } },
    sec_kafka_sasl: { type: "kafka", brokers: KAFKA_SASL_BROKERS.join(","), topic: "sec", security_protocol: "SASL_PLAINTEXT", sasl_mechanism: "plain", sasl_username: "relay", sasl_password: s.sasl, connection_timeout_ms: 2000 },
    sec_kafka_tls: { type: "kafka", brokers: "127.0.0.1:1", topic: "sec", security_protocol: "SSL", ssl_cert_file: join(dir, "missing.pem"), ssl_key_file: join(dir, "missing.key"), ssl_key_password: s.tlsKey },
    sec_sqs: { type: "sqs", endpoint: SQS_ENDPOINT, region: "us-east-1", queue_url: `${SQS_ENDPOINT}/000000000000/sec-missing-${Date.now()}`, access_key_id: "test", secret_access_key: s.sqs },
    sec_rabbit_env: { type: "rabbitmq", url: "amqp://guest:${env:RELAY_SECRET_TEST_ENV}@127.0.0.1:5672", exchange: "sec" },
  };
  for (const [name, sink] of Object.entries(sinks)) {
    await db.sql`SELECT pgtrickle.set_relay_outbox(${name}, 'public.sec_orders', NULL, ${db.sql.json(sink as never)})`;
  }
  await writeV1Inline(db.sql, outbox, { inserted: [{ id: 1 }], deleted: [] });

  const outputs: Record<string, string> = {};
  // The catalog's own error: a config without "type" must not be echoed back.
  const refused = await db.sql`SELECT pgtrickle.set_relay_outbox('sec_bad', 'public.sec_orders', NULL, ${db.sql.json({ url: `amqp://guest:${s.catalog}@127.0.0.1:5672` } as never)})`.catch(
    (err: Error) => err.message,
  );
  expect(String(refused)).toContain('must contain a "type" key');
  expect(String(refused)).toContain("an object with keys url");
  outputs.catalogError = String(refused);

  const url = db.url;
  relay = new RunningRelay(["--postgres-url", url, "--metrics-addr", "127.0.0.1:0", "--coordinator-tick-ms", "100", "--log-level", "trace"], env);
  const base = await httpBase(relay);
  // Every pipeline but the Redis ones fails (wrong password, closed port, missing files or queue).
  const failing = Object.keys(sinks).filter((n) => !n.startsWith("sec_redis"));
  await eventually(
    async () => {
      const rows = await db.sql<{ pipeline: string }[]>`SELECT pipeline FROM pgtrickle.relay_pipeline_status WHERE last_error IS NOT NULL`;
      return failing.every((n) => rows.some((r) => r.pipeline === n));
    },
    60_000,
    `${failing.join(", ")} to record an error`,
  );
  outputs.health = (await getText(`${base}/health`)).body;
  outputs.drained = (await getText(`${base}/health/drained`)).body;
  outputs.metrics = (await getText(`${base}/metrics`)).body;
  outputs.status = JSON.stringify(await relayOnce(["status", "--postgres-url", url], env));
  outputs.statusWide = JSON.stringify(await relayOnce(["status", "--wide", "--postgres-url", url], env));
  outputs.statusJson = JSON.stringify(await relayOnce(["status", "--postgres-url", url, "--json"], env));
  outputs.check = JSON.stringify(await relayOnce(["check", "--postgres-url", url, "--timeout", "5", "--log-level", "trace"], env));
  outputs.checkJson = JSON.stringify(await relayOnce(["check", "--postgres-url", url, "--timeout", "5", "--json"], env));
  relay.proc.kill("SIGTERM");
  await relay.proc.exited;
  outputs.run = relay.stderr + relay.stdout;
  outputs.drain = JSON.stringify(await relayOnce(["drain", "--postgres-url", url, "--timeout", "10", "--log-level", "trace"], env));
  outputs.pipelineList = JSON.stringify(await relayOnce(["pipeline", "list", "--postgres-url", url], env));
  outputs.pipelineListJson = JSON.stringify(await relayOnce(["pipeline", "list", "--json", "--postgres-url", url], env));
  for (const name of Object.keys(sinks)) outputs[`show ${name}`] = JSON.stringify(await relayOnce(["pipeline", "show", name, "--postgres-url", url], env));
  outputs.deadLetterList = JSON.stringify(await relayOnce(["dead-letters", "list", "--all", "--json", "--postgres-url", url], env));
  outputs.tail = JSON.stringify(await relayOnce(["tail", "public.sec_orders", "--from-start", "--count", "1", "--postgres-url", url], env));
  outputs.table = JSON.stringify(await db.sql`SELECT * FROM pgtrickle.relay_pipeline_status`);
  outputs.deadLetters = JSON.stringify(await db.sql`SELECT error FROM pgtrickle.relay_dead_letters`);

  // The outputs are about these pipelines (so the search below searches something) …
  for (const name of Object.keys(sinks)) expect(outputs.statusJson).toContain(name);
  expect(outputs.statusWide).toContain(`redis://:***@${redisHost}`);
  expect(outputs.statusWide).toContain("token=***");
  expect(outputs.check).toContain("FAIL  sec_kafka_sasl");
  expect(outputs["show sec_http"]).toContain("token=***");
  expect(outputs["show sec_kafka_sasl"]).toContain('\\"sasl_password\\": \\"***\\"');
  // … and no secret is in any of them.
  for (const [where, text] of Object.entries(outputs)) {
    for (const [form, value] of Object.entries(s)) expect({ where, form, leaked: text.includes(value) }).toEqual({ where, form, leaked: false });
  }
}, 180_000);
