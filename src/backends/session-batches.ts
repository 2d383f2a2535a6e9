/**
 * The consuming loop of the sources that hand batches out of one live session (a Kafka group
 * membership, a RabbitMQ consumer channel): the source keeps the session in hand for close()
 * and lag(), and a failed session is closed and replaced by a new one on the pipeline's retry.
 */
import type { Batch } from "./types.ts";

/** One session: opened once, then asked for batches until it answers null (aborted or drained). */
export interface BatchSession {
  open(): Promise<void>;
  next(signal: AbortSignal): Promise<Batch | null>;
  close(): Promise<void>;
}

/** The session's batches until it ends or fails; `ended` runs before the session is closed. */
export async function* sessionBatches(session: BatchSession, signal: AbortSignal, ended: () => void): AsyncGenerator<Batch> {
  try {
    await session.open();
    for (;;) {
      const batch = await session.next(signal);
      if (!batch) return;
      yield batch;
    }
  } finally {
    ended();
    await session.close();
  }
}
