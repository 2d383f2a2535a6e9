/**
 * src/tls.ts: the loader's refusals, the old spellings, and handshake failures read by
 * describeTlsError against real local TLS servers. Certificates are made here with openssl
 * (the same tool scripts/services uses), in a temporary folder.
 */
import { afterAll, beforeAll, describe, expect, spyOn, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer as createTcpServer, type AddressInfo, type Server } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connect, createServer, type ConnectionOptions, type TLSSocket } from "node:tls";
import * as v from "valibot";
import { RelayError } from "../../src/errors.ts";
import { redact } from "../../src/redact.ts";
import { describeTlsError, loadServerTls, loadTls, TLS_ALIAS_ENTRIES, TLS_ENTRIES } from "../../src/tls.ts";
import { configErrorOf as configErrorOfCall } from "../helpers/backend.ts";

const PASSPHRASE = "unit-key-passphrase";
let dir = "";
const file = (name: string) => join(dir, name);
const text = (name: string) => readFileSync(file(name), "utf8");

function openssl(...args: string[]): void {
  const r = Bun.spawnSync(["openssl", ...args], { cwd: dir, stderr: "pipe", stdout: "pipe" });
  if (r.exitCode !== 0) throw new Error(`openssl ${args.join(" ")}: ${r.stderr.toString()}`);
}

function newCa(name: string): void {
  openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", `${name}.key`, "-out", `${name}.crt`, "-days", "30",
    "-subj", `/CN=${name}`, "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign");
}

/** `openssl ca` writes a certificate for any dates, an expired one included. */
function sign(name: string, ext: "server" | "client", ca: string, dates: string[] = ["-days", "30"]): void {
  openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", `${name}.key`, "-out", `${name}.csr`, "-subj", `/CN=${name}`);
  openssl("ca", "-batch", "-config", "ca.cnf", "-cert", `${ca}.crt`, "-keyfile", `${ca}.key`, "-in", `${name}.csr`,
    "-out", `${name}.crt`, "-extensions", ext, "-notext", ...dates);
}

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "relay-tls-unit-"));
  writeFileSync(file("index"), "");
  writeFileSync(file("serial"), "01\n");
  writeFileSync(file("ca.cnf"), `[ca]\ndefault_ca = local\n[local]\ndatabase = ${file("index")}\nnew_certs_dir = ${dir}\nserial = ${file("serial")}\ndefault_md = sha256\npolicy = any\nunique_subject = no\n[any]\ncommonName = supplied\n[server]\nsubjectAltName = IP:127.0.0.1,DNS:localhost\nextendedKeyUsage = serverAuth\n[client]\nextendedKeyUsage = clientAuth\n`);
  newCa("ca");
  newCa("other-ca");
  sign("server", "server", "ca");
  sign("expired-server", "server", "ca", ["-startdate", "20200101000000Z", "-enddate", "20200102000000Z"]);
  sign("client", "client", "ca");
  sign("expired-client", "client", "ca", ["-startdate", "20200101000000Z", "-enddate", "20200102000000Z"]);
  sign("future-client", "client", "ca", ["-startdate", "20900101000000Z", "-enddate", "20900102000000Z"]);
  openssl("pkey", "-in", "client.key", "-aes256", "-passout", `pass:${PASSPHRASE}`, "-out", "client-encrypted.key");
  writeFileSync(file("not-pem.txt"), "just some text\n");
});

afterAll(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

/** The config error of `fn`, whose message holds neither key material nor the passphrase. */
function configErrorOf(fn: () => unknown): RelayError {
  const err = configErrorOfCall(fn);
  expect(err.message).not.toContain("-----BEGIN");
  expect(err.message).not.toContain(PASSPHRASE);
  return err;
}

/** Everything the process logs while `fn` runs (logs go to stderr). */
function stderrOf(fn: () => void): string {
  const spy = spyOn(process.stderr, "write").mockImplementation(() => true);
  try {
    fn();
    return spy.mock.calls.map((c) => String(c[0])).join("");
  } finally {
    spy.mockRestore();
  }
}

describe("loadServerTls (the HTTP receiver's listener)", () => {
  test("nothing without tls_cert; the server's pair alone is HTTPS, with tls_ca a client certificate is required", () => {
    expect(loadServerTls({}, "w")).toBeUndefined();
    expect(loadServerTls({ tls_cert: file("server.crt"), tls_key: file("server.key") }, "w")).toEqual({ cert: text("server.crt"), key: text("server.key") });
    expect(loadServerTls({ tls_cert: text("server.crt"), tls_key: text("server.key"), tls_ca: file("ca.crt") }, "w")).toEqual({
      cert: text("server.crt"),
      key: text("server.key"),
      ca: text("ca.crt"),
      requestCert: true,
      rejectUnauthorized: true,
    });
  });

  test("half a pair, or a CA or passphrase without the pair, is one error naming what is missing", () => {
    expect(configErrorOf(() => loadServerTls({ tls_cert: file("server.crt") }, "w")).message).toBe("w: tls_cert needs tls_key (the listener's private key)");
    expect(configErrorOf(() => loadServerTls({ tls_key: file("server.key") }, "w")).message).toBe("w: tls_key needs tls_cert (the listener's certificate) and tls_key");
    expect(configErrorOf(() => loadServerTls({ tls_ca: file("ca.crt"), tls_key_password: PASSPHRASE }, "w")).message).toBe(
      "w: tls_key_password, tls_ca need tls_cert (the listener's certificate) and tls_key",
    );
  });

  test("an expired certificate, a key of another one, a wrong passphrase, an expired CA: refused as for a client", () => {
    expect(configErrorOf(() => loadServerTls({ tls_cert: file("expired-server.crt"), tls_key: file("expired-server.key") }, "w")).message).toBe(
      "w: tls_cert: the server certificate expired on 2020-01-02T00:00:00.000Z",
    );
    expect(configErrorOf(() => loadServerTls({ tls_cert: file("server.crt"), tls_key: file("client.key") }, "w")).message).toBe(
      "w: tls_key does not belong to tls_cert (a key of another certificate?)",
    );
    const encrypted = { tls_cert: file("client.crt"), tls_key: file("client-encrypted.key") };
    expect(configErrorOf(() => loadServerTls({ ...encrypted, tls_key_password: "not-the-passphrase" }, "w")).message).toBe(
      "w: tls_key cannot be decrypted with tls_key_password (wrong passphrase?)",
    );
    expect(loadServerTls({ ...encrypted, tls_key_password: PASSPHRASE }, "w")?.passphrase).toBe(PASSPHRASE);
    expect(configErrorOf(() => loadServerTls({ tls_cert: file("server.crt"), tls_key: file("server.key"), tls_ca: file("expired-server.crt") }, "w")).message).toContain(
      "tls_ca: the CA certificate expired on 2020-01-02",
    );
  });
});

describe("loadTls", () => {
  test("no TLS without a tls key; `implied` (a TLS URL) turns it on with the system CAs", () => {
    expect(loadTls({}, "w")).toBeUndefined();
    expect(loadTls({ tls: false }, "w")).toBeUndefined();
    expect(loadTls({}, "w", { implied: true })).toEqual({ rejectUnauthorized: true });
    expect(loadTls({ tls: true }, "w")).toEqual({ rejectUnauthorized: true });
  });

  test("a CA, client certificate and key, from files or inline PEM, are returned as PEM text", () => {
    const fromFiles = loadTls({ tls_ca: file("ca.crt"), tls_cert: file("client.crt"), tls_key: file("client.key"), tls_server_name: "localhost" }, "w");
    expect(fromFiles).toEqual({ rejectUnauthorized: true, ca: text("ca.crt"), cert: text("client.crt"), key: text("client.key"), servername: "localhost" });
    const inline = loadTls({ tls_ca: text("ca.crt"), tls_cert: text("client.crt"), tls_key: text("client.key") }, "w");
    expect(inline?.ca).toBe(text("ca.crt"));
    expect(inline?.key).toBe(text("client.key"));
  });

  test("a CA bundle passes while one of its certificates is valid", () => {
    const bundle = text("expired-server.crt") + text("ca.crt");
    expect(loadTls({ tls_ca: bundle }, "w")?.ca).toBe(bundle);
    expect(configErrorOf(() => loadTls({ tls_ca: text("expired-server.crt") }, "w")).message).toContain("tls_ca: the CA certificate expired on 2020-01-02");
  });

  test("an unreadable file or text that is not PEM is one error naming the key and the path", () => {
    expect(configErrorOf(() => loadTls({ tls_ca: file("missing.crt") }, "nats sink")).message).toBe(`nats sink: tls_ca: cannot read ${file("missing.crt")} (ENOENT)`);
    expect(configErrorOf(() => loadTls({ tls_ca: file("not-pem.txt") }, "w")).message).toBe(`w: tls_ca: ${file("not-pem.txt")} is not PEM (no BEGIN … END block)`);
    expect(configErrorOf(() => loadTls({ tls_ca: "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n" }, "w")).message).toContain(
      "tls_ca holds a CERTIFICATE block that does not parse",
    );
    expect(configErrorOf(() => loadTls({ tls_cert: file("client.key"), tls_key: file("client.key") }, "w")).message).toContain("tls_cert holds no CERTIFICATE block");
  });

  test("a client certificate outside its validity period is refused", () => {
    expect(configErrorOf(() => loadTls({ tls_cert: file("expired-client.crt"), tls_key: file("expired-client.key") }, "w")).message).toBe(
      "w: tls_cert: the client certificate expired on 2020-01-02T00:00:00.000Z",
    );
    expect(configErrorOf(() => loadTls({ tls_cert: file("future-client.crt"), tls_key: file("future-client.key") }, "w")).message).toBe(
      "w: tls_cert: the client certificate is not valid before 2090-01-01T00:00:00.000Z",
    );
  });

  test("a key of another certificate, or half a pair, is refused", () => {
    expect(configErrorOf(() => loadTls({ tls_cert: file("client.crt"), tls_key: file("server.key") }, "w")).message).toBe(
      "w: tls_key does not belong to tls_cert (a key of another certificate?)",
    );
    expect(configErrorOf(() => loadTls({ tls_cert: file("client.crt") }, "w")).message).toBe("w: tls_cert needs tls_key (mutual TLS takes both)");
    expect(configErrorOf(() => loadTls({ tls_key: file("client.key") }, "w")).message).toBe("w: tls_key needs tls_cert (mutual TLS takes both)");
  });

  test("an encrypted key needs the right tls_key_password, which is then redacted everywhere", () => {
    const pair = { tls_cert: file("client.crt"), tls_key: file("client-encrypted.key") };
    expect(configErrorOf(() => loadTls(pair, "w")).message).toBe("w: tls_key is encrypted; set tls_key_password");
    expect(configErrorOf(() => loadTls({ ...pair, tls_key_password: "not-the-passphrase" }, "w")).message).toBe(
      "w: tls_key cannot be decrypted with tls_key_password (wrong passphrase?)",
    );
    const ok = loadTls({ ...pair, tls_key_password: PASSPHRASE }, "w");
    expect(ok?.passphrase).toBe(PASSPHRASE);
    expect(redact(`the passphrase is ${PASSPHRASE}`)).toBe("the passphrase is ***");
  });

  test("tls: false beside TLS material is a contradiction, not a silent plaintext connection", () => {
    expect(configErrorOf(() => loadTls({ tls: false, tls_ca: file("ca.crt") }, "w")).message).toBe("w: tls is false but tls_ca is set");
  });

  test("tls_insecure_skip_verify turns verification off and warns (once per place)", () => {
    const logged = stderrOf(() => {
      expect(loadTls({ tls_insecure_skip_verify: true }, "insecure place")).toEqual({ rejectUnauthorized: false });
      loadTls({ tls_insecure_skip_verify: true }, "insecure place");
    });
    expect(logged.match(/insecure place: tls_insecure_skip_verify is true/g)?.length).toBe(1);
  });

  test("old spellings map onto the new keys, each with one warning naming the new key", () => {
    let kafka: ConnectionOptions | undefined;
    let redis: ConnectionOptions | undefined;
    const logged = stderrOf(() => {
      kafka = loadTls({ ssl_ca_file: file("ca.crt"), ssl_cert_file: file("client.crt"), ssl_key_file: file("client-encrypted.key"), ssl_key_password: PASSPHRASE }, "kafka sink");
      loadTls({ ssl_ca_file: file("ca.crt") }, "kafka sink");
    });
    expect(kafka).toEqual({ rejectUnauthorized: true, ca: text("ca.crt"), cert: text("client.crt"), key: text("client-encrypted.key"), passphrase: PASSPHRASE });
    expect(logged.match(/kafka sink: ssl_ca_file is an old spelling; use tls_ca/g)?.length).toBe(1);
    expect(logged).toContain("ssl_key_password is an old spelling; use tls_key_password");
    expect(logged).not.toContain(PASSPHRASE);

    const objectForms = stderrOf(() => {
      expect(loadTls({ ssl: true }, "kafka source")).toEqual({ rejectUnauthorized: true });
      expect(loadTls({ ssl: { ca: text("ca.crt"), rejectUnauthorized: false } }, "kafka source")).toEqual({ rejectUnauthorized: false, ca: text("ca.crt") });
      redis = loadTls({ tls: { ca: file("ca.crt"), cert: file("client.crt"), key: file("client.key"), servername: "localhost" } }, "redis sink");
    });
    expect(objectForms).toContain("kafka source: ssl.reject_unauthorized is an old spelling; use tls_insecure_skip_verify");
    expect(objectForms).toContain("redis sink: tls.ca is an old spelling; use tls_ca");
    expect(redis).toEqual({ rejectUnauthorized: true, ca: text("ca.crt"), cert: text("client.crt"), key: text("client.key"), servername: "localhost" });
    expect(configErrorOf(() => loadTls({ ssl_ca_file: file("ca.crt"), tls_ca: file("other-ca.crt") }, "w")).message).toBe(
      "w: ssl_ca_file and tls_ca are both set; keep only tls_ca",
    );
  });

  test("the schema entries validate, and each says what it is for (option docs come from it)", () => {
    const schema = v.object({ ...TLS_ENTRIES, ...TLS_ALIAS_ENTRIES.kafka });
    expect(v.parse(schema, { tls: true, tls_ca: "/ca.pem", ssl_ca_file: "/ca.pem" })).toEqual({ tls: true, tls_ca: "/ca.pem", ssl_ca_file: "/ca.pem" });
    expect(v.safeParse(schema, { tls_ca: "" }).success).toBe(false);
    expect(v.safeParse(schema, { tls: "yes" }).success).toBe(false);
    expect(v.safeParse(v.object({ ...TLS_ENTRIES, ...TLS_ALIAS_ENTRIES.redis }), { tls: { ca: "/ca.pem" } }).success).toBe(true);
    for (const [key, entry] of Object.entries({ ...TLS_ENTRIES, ...TLS_ALIAS_ENTRIES.kafka, ...TLS_ALIAS_ENTRIES.redis })) {
      const description = v.getDescription(entry.wrapped);
      expect({ key, described: (description ?? "").length > 20 }).toEqual({ key, described: true });
    }
  });
});

describe("describeTlsError, against real handshakes", () => {
  const servers: Server[] = [];
  afterAll(() => {
    for (const s of servers) s.close();
  });

  async function tlsServer(cert: string, key: string): Promise<number> {
    const server = createServer({ cert: text(cert), key: text(key) }, (socket) => {
      socket.on("error", () => {});
      socket.end("hello\n");
    });
    server.on("tlsClientError", () => {});
    servers.push(server);
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    return (server.address() as AddressInfo).port;
  }

  async function freePort(): Promise<number> {
    const probe = createTcpServer();
    await new Promise<void>((resolve) => probe.listen(0, "127.0.0.1", resolve));
    const { port } = probe.address() as AddressInfo;
    await new Promise((resolve) => probe.close(resolve));
    return port;
  }

  /** The error of one TLS connection, after the handshake (a refused client certificate shows up on the first read). */
  function handshakeError(port: number, options: ConnectionOptions): Promise<unknown> {
    return new Promise((resolve) => {
      const socket: TLSSocket = connect({ host: "127.0.0.1", port, ...options });
      socket.on("error", (err) => resolve(err));
      // s_server -rev answers only after a line; a refused client certificate arrives as an alert then
      socket.on("secureConnect", () => socket.write("ping\n"));
      socket.on("data", () => {
        socket.destroy();
        resolve(undefined);
      });
      socket.on("end", () => resolve(undefined));
    });
  }

  test("a connection that works is no error", async () => {
    const port = await tlsServer("server.crt", "server.key");
    expect(await handshakeError(port, { ca: text("ca.crt") })).toBeUndefined();
  });

  test("a server certificate from another CA: not signed by tls_ca", async () => {
    const port = await tlsServer("server.crt", "server.key");
    const err = await handshakeError(port, { ca: text("other-ca.crt") });
    const described = describeTlsError(err, "redis sink at 127.0.0.1");
    expect(described?.kind).toBe("config");
    expect(described?.message).toMatch(/^redis sink at 127\.0\.0\.1: TLS: the server's certificate is not signed by tls_ca .*\((SELF_SIGNED_CERT_IN_CHAIN|UNABLE_TO_VERIFY_LEAF_SIGNATURE|UNABLE_TO_GET_ISSUER_CERT_LOCALLY)\)$/);
  });

  test("an expired server certificate", async () => {
    const port = await tlsServer("expired-server.crt", "expired-server.key");
    expect(describeTlsError(await handshakeError(port, { ca: text("ca.crt") }), "w")?.message).toBe(
      "w: TLS: the server's certificate has expired; the server needs a new one (CERT_HAS_EXPIRED)",
    );
  });

  test("a certificate for another host name", async () => {
    const port = await tlsServer("server.crt", "server.key");
    const err = await handshakeError(port, { ca: text("ca.crt"), servername: "elsewhere.example" });
    expect(describeTlsError(err, "w")?.message).toBe(
      "w: TLS: the server's certificate does not carry the host name connected to; connect by a name it carries, or set tls_server_name to one (ERR_TLS_CERT_ALTNAME_INVALID)",
    );
  });

  test("a server that requires a client certificate, given none or an expired one", async () => {
    // openssl s_server: a TLS 1.3 server that checks client certificates as real servers do
    // (Bun's own TLS server does not refuse a connection without one)
    const port = await freePort();
    const server = Bun.spawn(
      ["openssl", "s_server", "-accept", `127.0.0.1:${port}`, "-cert", file("server.crt"), "-key", file("server.key"), "-CAfile", file("ca.crt"), "-Verify", "1", "-verify_return_error", "-rev"],
      { stdout: "pipe", stderr: "pipe" },
    );
    try {
      const good = { ca: text("ca.crt"), cert: text("client.crt"), key: text("client.key") };
      for (let i = 0; (await handshakeError(port, good)) !== undefined; i++) {
        if (i > 100) throw new Error("openssl s_server did not come up");
        await Bun.sleep(100);
      }
      for (const client of [{}, { cert: text("expired-client.crt"), key: text("expired-client.key") }]) {
        const err = await handshakeError(port, { ca: text("ca.crt"), ...client });
        expect(describeTlsError(err, "w")?.message).toStartWith("w: TLS: the server refused the client certificate: it requires one (set tls_cert and tls_key)");
      }
    } finally {
      server.kill();
    }
  });

  test("a plaintext port", async () => {
    const plain = createTcpServer((socket) => {
      socket.on("error", () => {});
      socket.end("-ERR not TLS at all, just a long enough line of plain text\r\n");
    });
    servers.push(plain);
    await new Promise<void>((resolve) => plain.listen(0, "127.0.0.1", resolve));
    const err = await handshakeError((plain.address() as AddressInfo).port, {});
    expect(describeTlsError(err, "w")?.message).toStartWith("w: TLS: the server does not speak TLS on this port");
  });

  test("wrapped errors are read through their causes; other failures are not TLS errors", () => {
    const inner = Object.assign(new Error("certificate has expired"), { code: "CERT_HAS_EXPIRED" });
    expect(describeTlsError(new Error("Connection error", { cause: inner }), "w")?.message).toContain("(CERT_HAS_EXPIRED)");
    expect(describeTlsError(Object.assign(new Error("connect ECONNREFUSED 127.0.0.1:1"), { code: "ECONNREFUSED" }), "w")).toBeUndefined();
    expect(describeTlsError(new RelayError("config", "w: tls_ca: cannot read /x (ENOENT)"), "w")).toBeUndefined();
  });
});
