import { describe, expect, test } from "bun:test";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { configErrorOf } from "../helpers/backend.ts";
import { redact, registerConfigSecrets, registerSecrets } from "../../src/redact.ts";
import { resolveSecrets, resolveSecretsIn } from "../../src/secrets.ts";

const dir = mkdtempSync(join(tmpdir(), "relay-secrets-"));
const env = { TOKEN: "t0ken-value", Other_1: "o", EMPTY: "" };


describe("resolveSecretsIn", () => {
  test("${env:…} and ${ENV:…} anywhere in a string, several per string", () => {
    expect(resolveSecretsIn("Bearer ${env:TOKEN}", "x", env)).toBe("Bearer t0ken-value");
    expect(resolveSecretsIn("postgres://u:${ENV:TOKEN}@h/${env:Other_1}", "x", env)).toBe("postgres://u:t0ken-value@h/o");
    expect(resolveSecretsIn("${env:EMPTY}", "x", env)).toBe("");
  });

  test("${file:/path}: UTF-8 contents with trailing newlines stripped, inner ones kept", () => {
    const path = join(dir, "pw");
    writeFileSync(path, "line1\nlíne2\r\n\n");
    expect(resolveSecretsIn("<${file:" + path + "}>", "x", env)).toBe("<line1\nlíne2>");
  });

  test("text without tokens, unknown kinds and unclosed tokens pass through untouched", () => {
    for (const s of ["plain", "${vault:a}", "${env:TOKEN", "$env:TOKEN", "{env:TOKEN}"]) expect(resolveSecretsIn(s, "x", env)).toBe(s);
  });

  test("an unset variable, a bad name or an unreadable file is a config error naming the token, never a value", () => {
    const unset = configErrorOf(() => resolveSecretsIn("a ${env:NOPE} ${env:TOKEN}", "pipeline 'p'.sink.url", env));
    expect(unset.message).toBe("pipeline 'p'.sink.url: environment variable NOPE is not set (referenced as ${env:NOPE})");
    const bad = configErrorOf(() => resolveSecretsIn("${env:1BAD}", "w", env));
    expect(bad.message).toBe("w: ${env:1BAD} is not a valid environment variable name");
    const file = configErrorOf(() => resolveSecretsIn("${file:/no/such/secret}", "w", env));
    expect(file.message).toBe("w: secret file ${file:/no/such/secret} cannot be read (ENOENT)");
    for (const e of [unset, bad, file]) expect(e.message).not.toContain("t0ken-value");
  });
});

describe("resolveSecrets", () => {
  test("every string of objects and arrays, recursively; other values unchanged; the input is not modified", () => {
    const config = { url: "${env:TOKEN}", n: 3, on: true, none: null, headers: { a: "x-${env:Other_1}" }, list: ["${env:TOKEN}", 1, { k: "${ENV:Other_1}" }] };
    const copy = structuredClone(config);
    expect(resolveSecrets(config, "p", env)).toEqual({ url: "t0ken-value", n: 3, on: true, none: null, headers: { a: "x-o" }, list: ["t0ken-value", 1, { k: "o" }] });
    expect(config).toEqual(copy);
  });

  test("the error names the path of the key that failed", () => {
    const err = configErrorOf(() => resolveSecrets({ sink: { headers: ["ok", "${env:MISSING_X}"] } }, "pipeline 'p'", env));
    expect(err.message).toStartWith("pipeline 'p'.sink.headers[1]: environment variable MISSING_X is not set");
  });
});

describe("redaction", () => {
  test("every resolved value is registered and redacted, URL-encoded forms too; short values are left alone", () => {
    const value = `s3cr3t/${crypto.randomUUID()}`;
    resolveSecretsIn("${env:V}", "x", { V: value, S: "ab" });
    resolveSecretsIn("${env:S}", "x", { S: "ab" });
    expect(redact(`failed: connect to https://u:${value}@host (${encodeURIComponent(value)})`)).toBe("failed: connect to https://u:***@host (***)");
    expect(redact("about a cab")).toBe("about a cab");
  });

  test("a secret containing another is replaced whole", () => {
    registerSecrets(["inner-secret", "outer-inner-secret-x"]);
    expect(redact("v=outer-inner-secret-x; w=inner-secret")).toBe("v=***; w=***");
  });
});

describe("the shapes redact masks without being told", () => {
  test("URL passwords with and without a user, credential query parameters; user names and other parameters stay", () => {
    expect(redact("redis://:hunter2@h:6379 and amqp://guest:pa55@h/vh")).toBe("redis://:***@h:6379 and amqp://guest:***@h/vh");
    expect(redact("http://h/hook?token=abc&x=1&api_key=k1;sig=zz")).toBe("http://h/hook?token=***&x=1&api_key=***;sig=***");
    expect(redact("http://user@h:8080/p")).toBe("http://user@h:8080/p");
    expect(redact("nats://s3cr3ttoken@h:4222")).toBe("nats://***@h:4222");
  });

  test("registerConfigSecrets: secret-named keys at any depth, every header value, URL passwords inside strings", () => {
    const tag = crypto.randomUUID().slice(0, 8);
    registerConfigSecrets({ sink: { sasl_password: `sp-${tag}`, headers: { "X-Custom": `hv-${tag}` }, url: `amqp://u:up-${tag}@h`, topic: `t-${tag}` } });
    expect(redact(`sp-${tag} hv-${tag} up-${tag} t-${tag}`)).toBe(`*** *** *** t-${tag}`);
  });

  test("registerConfigSecrets: a private key given as PEM text, under any key, raw and inside printed JSON; a key file path stays", () => {
    const tag = crypto.randomUUID().slice(0, 8);
    const key = `-----BEGIN PRIVATE KEY-----\nMIIE${tag}\n-----END PRIVATE KEY-----\n`;
    registerConfigSecrets({ tls_key: key, tls: { key }, tls_cert: `/etc/relay/${tag}.crt` });
    expect(redact(`inline ${key} path /etc/relay/${tag}.crt`)).toBe(`inline *** path /etc/relay/${tag}.crt`);
    expect(redact(JSON.stringify({ tls_key: key }))).toBe('{"tls_key":"***"}');
  });
});
