/** A sleep that a notification can cut short. */
export class Sleeper {
  private wakeUp: (() => void) | null = null;
  private pendingWake = false;

  sleep(ms: number): Promise<void> {
    if (this.pendingWake) {
      // A wake-up that arrived while busy must not be lost: the next sleep returns at once.
      this.pendingWake = false;
      return Promise.resolve();
    }
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      const self = this;
      function done() {
        clearTimeout(timer);
        self.wakeUp = null;
        resolve();
      }
      this.wakeUp = done;
    });
  }

  wake(): void {
    if (this.wakeUp) this.wakeUp();
    else this.pendingWake = true;
  }

  /** `work()`, with this sleeper woken when `signal` aborts, so a sleep inside it ends at once. */
  async wakingOn<T>(signal: AbortSignal, work: () => Promise<T>): Promise<T> {
    const wake = () => this.wake();
    signal.addEventListener("abort", wake, { once: true });
    try {
      return await work();
    } finally {
      signal.removeEventListener("abort", wake);
    }
  }
}

/**
 * Sleeps on `sleeper` (woken by whoever changes what `done` reads, and by the signal) until
 * `done()` holds; true when the signal aborted first.
 */
export async function sleepUntil(done: () => boolean, sleeper: Sleeper, signal: AbortSignal): Promise<boolean> {
  await sleeper.wakingOn(signal, async () => {
    while (!done() && !signal.aborted) await sleeper.sleep(1000);
  });
  return signal.aborted;
}

/** Exponential backoff with ±20 % jitter: base·2^attempt, capped. */
export function backoffMs(attempt: number, baseMs = 500, capMs = 60_000): number {
  const raw = Math.min(capMs, baseMs * 2 ** Math.min(attempt, 30));
  return Math.round(raw * (0.8 + Math.random() * 0.4));
}

/**
 * `work`, or a rejection naming `what` once `ms` passed (`expired` builds another error); the
 * timer never outlives the race.
 */
export function withTimeout<T>(work: Promise<T>, ms: number, what: string, expired?: () => Error): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const error = expired ?? (() => new Error(`${what} timed out after ${ms} ms`));
  const timeout = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(error()), ms)));
  return Promise.race([work, timeout]).finally(() => clearTimeout(timer));
}

/** Resolves after `ms`, or early when the signal aborts. */
export function abortableDelay(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const timer = setTimeout(finish, ms);
    function finish() {
      clearTimeout(timer);
      signal.removeEventListener("abort", finish);
      resolve();
    }
    signal.addEventListener("abort", finish, { once: true });
  });
}
