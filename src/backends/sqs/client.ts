/**
 * The SQS client shared by the sink and the source (docs/interface.md §5.3, §5.4), also for
 * SQS-compatible servers (`endpoint`): region and endpoint resolution, credentials, and the
 * classification of the SDK's errors (config or transient, no secret in any text).
 */
import { SQSClient } from "@aws-sdk/client-sqs";
import { configError, errorMessage, RelayError, transientError } from "../../errors.ts";
import { scrubberFor, type Scrub } from "../../redact.ts";
import type { SqsConnectionOptions } from "./config.ts";

/** Most entries SQS takes in one batch call (SendMessageBatch, DeleteMessageBatch, ChangeMessageVisibilityBatch). */
export const MAX_ENTRIES = 10;

/** Failure codes that say "try again later": the service's fault, not the message's. */
export const TRANSIENT_CODES = new Set([
  "ThrottlingException",
  "Throttling",
  "RequestThrottled",
  "RequestThrottledException",
  "TooManyRequestsException",
  "ServiceUnavailable",
  "InternalError",
  "InternalFailure",
  "RequestTimeout",
  "RequestTimeoutException",
  "KmsThrottled",
  "KMS.ThrottlingException",
]);
export const QUEUE_MISSING = new Set(["QueueDoesNotExist", "AWS.SimpleQueueService.NonExistentQueue", "NonExistentQueue"]);
export const AUTH_CODES = new Set([
  "CredentialsProviderError",
  "InvalidClientTokenId",
  "UnrecognizedClientException",
  "SignatureDoesNotMatch",
  "IncompleteSignature",
  "MissingAuthenticationToken",
  "AccessDenied",
  "AccessDeniedException",
  "InvalidSecurity",
  "ExpiredToken",
  "KmsAccessDenied",
  "KmsDisabled",
  "KmsNotFound",
  "KmsInvalidKeyUsage",
  "KmsInvalidState",
  "KMS.AccessDeniedException",
  "KMS.DisabledException",
  "KMS.NotFoundException",
]);
const NETWORK_CODES = new Set(["ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "EPIPE", "ENOTFOUND", "EAI_AGAIN", "EHOSTUNREACH", "ENETUNREACH", "ConnectionRefused", "ConnectionClosed"]);

/** The AWS error code of anything the SDK throws (`name` for service errors, `code` for sockets). */
export function awsCode(err: unknown): string {
  const e = err as { name?: string; code?: string; Code?: string };
  return e?.Code ?? (e?.name && e.name !== "Error" ? e.name : undefined) ?? e?.code ?? "Error";
}

function regionFromQueueUrl(url: string): string | undefined {
  const host = new URL(url).hostname;
  return /^sqs\.([a-z]{2}(?:-[a-z]+)+-\d+)\.amazonaws\.com/.exec(host)?.[1] ?? /^([a-z]{2}(?:-[a-z]+)+-\d+)\.queue\.amazonaws\.com/.exec(host)?.[1];
}

/**
 * The client side shared by the sink and the source: region and endpoint resolution, the client,
 * and the error classification (the endpoint's host:port in every connection error, no secret ever).
 */
export class SqsConnection {
  readonly region: string | undefined;
  /** host:port of the endpoint the client talks to. */
  readonly where: string;
  readonly redact: Scrub;

  constructor(private readonly cfg: SqsConnectionOptions) {
    if (Boolean(cfg.access_key_id) !== Boolean(cfg.secret_access_key)) {
      throw configError("access_key_id and secret_access_key must be set together");
    }
    if (cfg.session_token && !cfg.access_key_id) throw configError("session_token needs access_key_id and secret_access_key");
    this.region =
      cfg.region ??
      process.env.AWS_REGION ??
      process.env.AWS_DEFAULT_REGION ??
      regionFromQueueUrl(cfg.queue_url) ??
      (cfg.endpoint ? "us-east-1" : undefined);
    const endpoint = new URL(cfg.endpoint ?? (this.region ? `https://sqs.${this.region}.amazonaws.com` : cfg.queue_url));
    this.where = `${endpoint.hostname}:${endpoint.port || (endpoint.protocol === "https:" ? "443" : "80")}`;
    this.redact = scrubberFor([cfg.secret_access_key, cfg.session_token]);
  }

  /** A new client; `requestTimeoutMs` must cover a long poll where the caller long-polls. */
  client(requestTimeoutMs: number): SQSClient {
    const cfg = this.cfg;
    return new SQSClient({
      ...(this.region ? { region: this.region } : {}),
      ...(cfg.endpoint ? { endpoint: cfg.endpoint } : {}),
      ...(cfg.profile ? { profile: cfg.profile } : {}),
      ...(cfg.access_key_id && cfg.secret_access_key
        ? {
            credentials: {
              accessKeyId: cfg.access_key_id,
              secretAccessKey: cfg.secret_access_key,
              ...(cfg.session_token ? { sessionToken: cfg.session_token } : {}),
            },
          }
        : {}),
      maxAttempts: 3,
      requestHandler: { connectionTimeout: Math.min(cfg.timeout_ms, 5000), requestTimeout: requestTimeoutMs },
    });
  }

  classify(err: unknown, doing: string): RelayError {
    if (err instanceof RelayError) return err;
    const code = awsCode(err);
    const text = this.redact(errorMessage(err));
    if (QUEUE_MISSING.has(code)) {
      return configError(`sqs queue ${this.cfg.queue_url} does not exist (${doing} at ${this.where}); create it or fix queue_url`);
    }
    if (AUTH_CODES.has(code) || /could not load credentials/i.test(text)) {
      return configError(`${doing} at ${this.where}: credentials or permissions refused: ${code}: ${text}`);
    }
    if (/region is missing/i.test(text)) {
      return configError(`region: no AWS region configured (set region, AWS_REGION or the profile's region)`);
    }
    if (NETWORK_CODES.has(code) || code === "TimeoutError" || /ECONNREFUSED|socket|timed? ?out|connect/i.test(text)) {
      return transientError(`${doing}: sqs endpoint ${this.where} unreachable: ${code}: ${text}`);
    }
    return transientError(`${doing} at ${this.where} failed: ${code}: ${text}`);
  }
}
