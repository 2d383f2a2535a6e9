/**
 * The HTTP receiver over HTTPS (docs/TLS.md, "The HTTP receiver"), under `pgtrickle-relay run`
 * against the real PostgreSQL, with the certificates scripts/services made (TLS_FILES): the
 * listener's certificate is valid for 127.0.0.1, the client certificates are signed by the same
 * CA or by another one.
 */
import { afterAll, afterEach, beforeAll, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { freePort } from "../helpers/proxy.ts";
import { RunningRelay } from "../helpers/relay.ts";
import { disableInboxes, enableOnly, inboxCount, setRelayInbox } from "../helpers/reverse.ts";
import { requireServer, TLS_FILES, TLS_KEY_PASSPHRASE } from "../helpers/servers.ts";

let db: TestDatabase;
const run = Math.random().toString(36).slice(2, 7);
const pem = (path: string) => readFileSync(path, "utf8");

beforeAll(async () => {
  await requireServer("postgres");
  db = await testDatabase("http_receiver_tls");
});
afterAll(async () => {
  await db?.drop();
});
afterEach(() => disableInboxes(db));

/** A receiver pipeline with `tls` keys, run by its own relay until it listens; its https URL. */
async function receiver(label: string, tls: Record<string, string>) {
  const name = `${label}_${run}`;
  const inbox = `${name}_inbox`;
  const port = await freePort();
  await setRelayInbox(db, name, inbox, { type: "http", listen_addr: `127.0.0.1:${port}`, path: "/hooks", ...tls });
  await enableOnly(db, name);
  const relay = new RunningRelay(["--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0"]);
  return { name, inbox, port, relay, url: `https://127.0.0.1:${port}/hooks` };
}

/** The status of a POST, or the error's code when the connection or handshake failed. */
async function post(url: string, tls: Record<string, string>, key: string): Promise<number | string> {
  try {
    const r = await fetch(url, { method: "POST", body: JSON.stringify({ key }), headers: { "Idempotency-Key": key }, tls } as RequestInit);
    await r.arrayBuffer();
    return r.status;
  } catch (err) {
    return (err as { code?: string }).code ?? String(err);
  }
}

test("tls_cert and tls_key: the receiver answers over HTTPS, and only over it", async () => {
  const r = await receiver("https", { tls_cert: TLS_FILES.serverCert, tls_key: pem(TLS_FILES.serverKey) });
  try {
    await r.relay.waitForLog(/listening: http receiver .*\(https\)/);
    await r.relay.waitForLog(new RegExp(`\\[${r.name}\\] started`));
    expect(await post(r.url, { ca: pem(TLS_FILES.ca) }, "over-https")).toBe(200);
    // A client that does not trust the listener's CA refuses it.
    expect(await post(r.url, {}, "untrusted")).not.toBe(200);
    expect(await post(r.url.replace("https:", "http:"), {}, "plaintext")).not.toBe(200);
    expect(await inboxCount(db, r.inbox)).toBe(1);
  } finally {
    await r.relay.stop();
  }
});

test("tls_ca: only a client certificate signed by that CA gets through the handshake; nothing else is written", async () => {
  const r = await receiver("mtls", { tls_cert: TLS_FILES.serverCert, tls_key: TLS_FILES.serverKey, tls_ca: TLS_FILES.ca });
  try {
    await r.relay.waitForLog(/listening: http receiver .*\(https, client certificate required\)/);
    await r.relay.waitForLog(new RegExp(`\\[${r.name}\\] started`));
    const ca = pem(TLS_FILES.ca);
    expect(await post(r.url, { ca, cert: pem(TLS_FILES.clientCert), key: pem(TLS_FILES.clientKey) }, "signed")).toBe(200);
    expect(await post(r.url, { ca }, "none")).not.toBe(200);
    expect(await post(r.url, { ca, cert: pem(TLS_FILES.otherClientCert), key: pem(TLS_FILES.otherClientKey) }, "other-ca")).not.toBe(200);
    expect(await post(r.url, { ca, cert: pem(TLS_FILES.expiredClientCert), key: pem(TLS_FILES.expiredClientKey) }, "expired")).not.toBe(200);
    expect(await inboxCount(db, r.inbox)).toBe(1);
  } finally {
    await r.relay.stop();
  }
});

test("a key that cannot be read: the pipeline fails with one error naming the key, the passphrase never printed; an encrypted key with its passphrase works", async () => {
  const wrong = `not-${TLS_KEY_PASSPHRASE}`;
  const bad = await receiver("badkey", { tls_cert: TLS_FILES.clientCert, tls_key: TLS_FILES.clientKeyEncrypted, tls_key_password: wrong });
  try {
    await bad.relay.waitForLog(new RegExp(`\\[${bad.name}\\] failed: pipeline '${bad.name}': http receiver: tls_key cannot be decrypted with tls_key_password`));
    expect(bad.relay.stderr + bad.relay.stdout).not.toContain(wrong);
  } finally {
    await bad.relay.stop();
  }
  // The client certificate's own key, encrypted: a listener takes any certificate with its key.
  const good = await receiver("goodkey", { tls_cert: TLS_FILES.clientCert, tls_key: TLS_FILES.clientKeyEncrypted, tls_key_password: TLS_KEY_PASSPHRASE });
  try {
    await good.relay.waitForLog(/listening: http receiver .*\(https\)/);
    expect(good.relay.stderr + good.relay.stdout).not.toContain(TLS_KEY_PASSPHRASE);
  } finally {
    await good.relay.stop();
  }
});
