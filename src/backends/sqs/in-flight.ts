/**
 * The messages of one batch of the SQS source while the inbox writes them (see SqsSource in
 * source.ts): their visibility kept extended, then deleted or handed back.
 */
import type { Message as SqsMessage } from "@aws-sdk/client-sqs";
import type { SqsSource } from "./source.ts";

export interface HandleFailure {
  handle: string;
  code: string;
  message: string;
  senderFault: boolean;
}

/**
 * The messages of one batch from their receipt until they are deleted (ack) or handed back
 * (release). Meanwhile their visibility is extended every visibility_timeout/2, so however long
 * the inbox write takes, no other consumer (nor this one) receives them again.
 */
export class InFlight {
  /** receipt handle → message id (for logs). */
  readonly held = new Map<string, string>();
  private timer: ReturnType<typeof setInterval> | null = null;
  private extending: Promise<void> | null = null;
  private acking = false;

  constructor(private readonly source: SqsSource) {}

  add(messages: SqsMessage[]): void {
    for (const m of messages) if (m.ReceiptHandle) this.held.set(m.ReceiptHandle, m.MessageId ?? "?");
    if (!this.timer && this.held.size > 0) {
      this.timer = setInterval(() => void this.extend(), (this.source.visibility * 1000) / 2);
      this.timer.unref?.();
    }
  }

  private extend(): Promise<void> {
    if (this.extending || this.acking || this.held.size === 0) return this.extending ?? Promise.resolve();
    this.extending = (async () => {
      const failures = await this.source.changeVisibility([...this.held.keys()], this.source.visibility);
      for (const f of failures) {
        this.source.log.warn(
          `could not extend the visibility of message ${this.held.get(f.handle) ?? "?"} on ${this.source.queueUrl}: ${f.code}: ${f.message}; it may be delivered again (the inbox deduplicates it)`,
        );
      }
    })().finally(() => {
      this.extending = null;
    });
    return this.extending;
  }

  private stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  /** Deletes every message still held; what cannot be deleted after a few attempts fails the ack (the pipeline retries it). */
  async ack(): Promise<void> {
    this.acking = true;
    try {
      await this.extending;
      await this.source.deleteAll(this.held);
      this.stop();
    } finally {
      this.acking = false;
    }
  }

  /** Makes the messages visible again at once, so they are redelivered promptly. */
  async release(): Promise<void> {
    this.stop();
    this.acking = true;
    await this.extending;
    const handles = [...this.held.keys()];
    this.held.clear();
    if (handles.length === 0) return;
    const failures = await this.source.changeVisibility(handles, 0);
    if (failures.length > 0) {
      this.source.log.warn(
        `could not hand ${failures.length} message(s) back to ${this.source.queueUrl} (${failures[0]!.code}: ${failures[0]!.message}); they return after their visibility timeout`,
      );
    }
  }
}
