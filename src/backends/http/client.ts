/**
 * What the HTTP sink and receiver share about reaching the other side: the URL as logs may show
 * it, and request signing (TLS material comes from src/tls.ts).
 *
 * Signing (`signing_secret`), Stripe style:
 *   X-Pgtrickle-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>
 * A receiver verifies it by recomputing the HMAC over the exact raw request body bytes (before any
 * JSON parsing), comparing in constant time, and refusing timestamps older than a tolerance
 * (5 minutes is usual) to block replays of captured requests. `verifySignature` below does that.
 */
import { createHmac, timingSafeEqual } from "node:crypto";

/** `https://host:port/path` without credentials or query: what logs and errors may show. */
export function describeHttpUrl(url: string): string {
  try {
    const u = new URL(url);
    const port = u.port || (u.protocol === "https:" ? "443" : "80");
    return `${u.protocol}//${u.hostname}:${port}${u.pathname}`;
  } catch {
    return "(unparseable URL)";
  }
}

// ---------------------------------------------------------------------------------------------
// Signing

/** The `X-Pgtrickle-Signature` value for `body` signed at `timestamp` (unix seconds). */
export function signPayload(secret: string, body: string | Uint8Array, timestamp: number = Math.floor(Date.now() / 1000)): string {
  const mac = createHmac("sha256", secret).update(`${timestamp}.`).update(body).digest("hex");
  return `t=${timestamp},v1=${mac}`;
}

/**
 * Checks an `X-Pgtrickle-Signature` header against the raw body. Accepts any of several `v1=`
 * entries (secret rotation) and refuses timestamps further than `toleranceSeconds` from now.
 */
export function verifySignature(
  secret: string,
  body: string | Uint8Array,
  header: string | null | undefined,
  options: { toleranceSeconds?: number; now?: number } = {},
): boolean {
  if (!header) return false;
  let timestamp: number | undefined;
  const candidates: string[] = [];
  for (const part of header.split(",")) {
    const eq = part.indexOf("=");
    if (eq < 0) continue;
    const name = part.slice(0, eq).trim();
    const value = part.slice(eq + 1).trim();
    if (name === "t" && /^\d+$/.test(value)) timestamp = Number(value);
    else if (name === "v1" && /^[0-9a-f]{64}$/i.test(value)) candidates.push(value.toLowerCase());
  }
  if (timestamp === undefined || candidates.length === 0) return false;
  const now = options.now ?? Math.floor(Date.now() / 1000);
  if (Math.abs(now - timestamp) > (options.toleranceSeconds ?? 300)) return false;
  const expected = Buffer.from(createHmac("sha256", secret).update(`${timestamp}.`).update(body).digest("hex"));
  return candidates.some((c) => timingSafeEqual(Buffer.from(c), expected));
}
