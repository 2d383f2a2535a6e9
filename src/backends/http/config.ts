/**
 * Options of the HTTP webhook sink and of the webhook receiver source (docs/interface.md §5.3,
 * §5.4 http), and the pure helpers that validate them.
 */
import * as v from "valibot";
import { TLS_ENTRIES } from "../../tls.ts";
import { intInRange, positiveInt } from "../schema.ts";
import { reverseSourceKeys } from "../../inbound.ts";

export const HEADER_NAME = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;

// Custom messages throughout: valibot's defaults echo the received value, and header values and
// the signing secret are secrets.
export const HttpSinkConfig = v.looseObject({
  /** Sink type (`http` or `webhook`); ignored here. */
  type: v.optional(v.string()),
  url: v.pipe(
    v.string("url must be a string"),
    v.check((u) => /^https?:\/\/[^/]/i.test(u) && URL.canParse(u), "url must be an absolute http:// or https:// URL"),
    v.description("Destination URL, `http://` or `https://`. Query strings are sent but never logged."),
  ),
  method: v.pipe(v.optional(v.picklist(["POST", "PUT"], "method must be POST or PUT"), "POST"), v.description("HTTP method of every request.")),
  headers: v.pipe(
    v.optional(
      v.pipe(
        v.record(v.string(), v.string("header values must be strings"), "headers must be an object of strings"),
        v.check(
          (h) => Object.keys(h).every((k) => HEADER_NAME.test(k)),
          "headers: a header name contains characters not allowed in HTTP header names",
        ),
        v.check(
          (h) => Object.values(h).every((x) => !/[\r\n\0]/.test(x)),
          "headers: a header value contains a line break or NUL",
        ),
      ),
      {},
    ),
    v.description("Extra request headers, e.g. `{\"Authorization\": \"Bearer ${env:HOOK_TOKEN}\"}`. Values may hold secrets and are never logged. Content-Type, Idempotency-Key and the X-Pgtrickle-* headers are set by the relay and cannot be overridden."),
  ),
  timeout_ms: v.pipe(
    v.optional(positiveInt(), 10000),
    v.description("Per-request timeout in milliseconds; a timeout is a transient failure."),
  ),
  batch_mode: v.pipe(
    v.optional(v.boolean(), true),
    v.description("true: one request carries a JSON array of the envelopes of one change set (outbox row), with `Idempotency-Key` = `batch:` + hex SHA-256 of their newline-joined dedup keys, the same on every replay while the batch options are unchanged; false: one request per message, with `Idempotency-Key` = its dedup key (percent-encoded outside visible ASCII and for `%`)."),
  ),
  max_batch_messages: v.pipe(
    v.optional(positiveInt(), 500),
    v.description("Batch mode: at most this many messages per request (a larger change set is split)."),
  ),
  max_batch_bytes: v.pipe(
    v.optional(intInRange(1024), 1048576),
    v.description("Batch mode: a request body stays under this many bytes where possible (a single larger message still goes alone in one request)."),
  ),
  max_in_flight: v.pipe(
    v.optional(positiveInt(), 16),
    v.description("Requests in flight at once (across ordering keys)."),
  ),
  ordering_key_template: v.pipe(
    v.optional(v.string(), "{stream_table}"),
    v.description("Messages with the same rendered key are delivered one after another, in order; different keys go in parallel. Variables as in subject templates plus row fields and `{dedup_key}`; the default keeps a whole stream table in order, `{stream_table}:{id}` keeps order per row id."),
  ),
  retry_on_status: v.pipe(
    v.optional(v.array(intInRange(100, 599)), [
      429, 500, 502, 503, 504,
    ]),
    v.description("Response statuses retried as transient failures: the request is tried again (4 tries in all, pauses from 200 ms to 2 s), then the batch is replayed without the requests already answered (a timeout or refused connection goes straight to the replay). 408 and 429 are always transient; any other non-2xx status rejects the request's messages to the dead-letter table (a batch request refused with a 4xx is first split, down to single messages, so only the refused ones go there)."),
  ),
  signing_secret: v.pipe(
    v.optional(v.pipe(v.string("signing_secret must be a string"), v.minLength(1, "signing_secret is empty"))),
    v.description("HMAC-SHA256 key of the `X-Pgtrickle-Signature` header. Sink: every request is signed with it. Source: requests without a valid signature made with it answer 401. Never logged."),
  ),
  cloudevents: v.pipe(v.optional(v.boolean(), false), v.description("Send CloudEvents 1.0 in structured JSON mode instead of relay envelopes.")),
  ce_source: v.pipe(v.optional(v.string()), v.description("CloudEvents `source` (template); default `pgtrickle-relay/<pipeline>`.")),
  ce_type: v.pipe(v.optional(v.string(), "pgtrickle.{op}"), v.description("CloudEvents `type` (template).")),
  ...TLS_ENTRIES,
});

export type HttpSinkOptions = v.InferOutput<typeof HttpSinkConfig>;

// ---------------------------------------------------------------------------------------------
// The receiver (reverse source)

/** `host:port`, `[v6]:port` or `:port` (all interfaces) → parts, or null. */
export function parseListenAddr(addr: string): { host: string; port: number } | null {
  const m = /^(?:\[([0-9A-Fa-f:.]+)\]|([^:[\]\s]*)):(\d{1,5})$/.exec(addr.trim());
  if (!m) return null;
  const port = Number(m[3]);
  if (port > 65535) return null;
  return { host: m[1] ?? (m[2] || "0.0.0.0"), port };
}

/** A TLS key of the receiver: non-empty text (src/tls.ts loadServerTls reads and checks it). */
const pemKey = (description: string) => v.pipe(v.optional(v.pipe(v.string(), v.minLength(1, "must not be empty"))), v.description(description));

export const HttpSourceConfig = v.pipe(
  v.looseObject({
    /** Source type (`http` or `webhook`); ignored here. */
    type: v.optional(v.string()),
    ...reverseSourceKeys,
    listen_addr: v.pipe(
      v.optional(
        v.pipe(v.string("listen_addr must be a string"), v.check((a) => parseListenAddr(a) !== null, "listen_addr must be host:port, e.g. 0.0.0.0:8080 or [::1]:8080")),
        "0.0.0.0:8080",
      ),
      v.description("Address the receiver listens on, `host:port` (`[::1]:8080` for IPv6; port 0 = any free port, logged at start). Must differ from the relay's metrics address."),
    ),
    path: v.pipe(
      v.optional(
        v.pipe(v.string("path must be a string"), v.check((p) => /^\/[^\s?#]*$/.test(p), "path must start with / and hold no query, fragment or spaces")),
        "/inbox",
      ),
      v.description("Requests to `<path>` and `<path>/<suffix>` are accepted (POST or PUT); the suffix is the event type when the request has no event-type header. Any other path answers 404."),
    ),
    tls_cert: pemKey("The receiver's own certificate, to listen over HTTPS (needs `tls_key`): a PEM file path or the PEM text itself (docs/TLS.md)."),
    tls_key: pemKey("Private key of `tls_cert`: a PEM file path or the PEM text itself."),
    tls_key_password: pemKey("Passphrase of an encrypted `tls_key`; a secret, shown as `***` everywhere (keep it out of the catalog with `${env:…}` or `${file:…}`)."),
    tls_ca: pemKey("Require a client certificate signed by this CA (mutual TLS; needs `tls_cert`): a PEM file path or the PEM text itself. A client without one fails the handshake."),
    auth_header: v.pipe(
      v.optional(
        v.pipe(v.string("auth_header must be a string"), v.check((h) => HEADER_NAME.test(h), "auth_header is not a valid HTTP header name")),
      ),
      v.description("Header that must carry `auth_value` (e.g. `Authorization`); requests without it answer 401."),
    ),
    auth_value: v.pipe(
      v.optional(v.pipe(v.string("auth_value must be a string"), v.minLength(1, "auth_value is empty"))),
      v.description("The value `auth_header` must hold exactly (e.g. `Bearer ${env:INBOX_TOKEN}`); compared in constant time, never logged."),
    ),
    signing_secret: v.pipe(
      v.optional(v.pipe(v.string("signing_secret must be a string"), v.minLength(1, "signing_secret is empty"))),
      v.description("Requests must carry a valid `X-Pgtrickle-Signature` made with this secret (as the http sink signs); others answer 401. Never logged."),
    ),
    signature_tolerance_seconds: v.pipe(
      v.optional(positiveInt(), 300),
      v.description("Oldest accepted `X-Pgtrickle-Signature` timestamp, in seconds from now (replay protection)."),
    ),
    max_body_bytes: v.pipe(v.optional(positiveInt(), 10485760), v.description("Larger request bodies answer 413.")),
    event_type_header: v.pipe(
      v.optional(
        v.pipe(v.string(), v.check((h) => HEADER_NAME.test(h), "event_type_header is not a valid HTTP header name")),
        "X-Event-Type",
      ),
      v.description("Request header naming the event type (before the path suffix)."),
    ),
    split_arrays: v.pipe(
      v.optional(v.boolean(), true),
      v.description("A top-level JSON array body is one event per element; false: the array is one event."),
    ),
    max_pending: v.pipe(
      v.optional(positiveInt(), 1000),
      v.description("Messages accepted but not yet committed to the inbox, across requests; a request that does not fit answers 503 with Retry-After (backpressure). A single request with more events answers 413."),
    ),
    linger_ms: v.pipe(
      v.optional(intInRange(0), 0),
      v.description("While a batch is being written to the inbox, how long the next one waits for more requests to join it. 0: it goes at once, and is written alongside the batches in flight (up to three); requests arriving while three are in flight gather into the next one anyway."),
    ),
    request_timeout_ms: v.pipe(
      v.optional(intInRange(100), 30000),
      v.description("A request not committed within this time answers 503 (its events may still land: a retry is deduplicated). While a batch has been in flight this long, new requests answer 503 at once."),
    ),
  }),
  v.check((c) => Boolean(c.auth_header) === Boolean(c.auth_value), "auth_header and auth_value must be set together"),
);
export type HttpSourceOptions = v.InferOutput<typeof HttpSourceConfig>;
