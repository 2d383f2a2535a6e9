/**
 * Ordered, bounded concurrency shared by the sinks that send several requests per batch: keyed
 * tasks (HTTP per-event mode, SQS batch calls), lanes taking items in order (NATS publishes), and
 * consecutive chunks (Redis pipelines, SQS delete calls).
 */

/** `items` cut into consecutive slices of at most `size`. */
export function chunks<T>(items: readonly T[], size: number): T[][] {
  const out: T[][] = [];
  for (let i = 0; i < items.length; i += size) out.push(items.slice(i, i + size));
  return out;
}

/**
 * Runs `work` on every item with at most `limit` running. Each of `limit` lanes takes the next
 * item as soon as its last one finished, so items start in their order; once `stopped()` is true
 * no lane takes another.
 */
export async function inOrderLanes<T>(items: readonly T[], limit: number, work: (item: T) => Promise<void>, stopped: () => boolean): Promise<void> {
  let next = 0;
  const lane = async () => {
    while (!stopped() && next < items.length) await work(items[next++]!);
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, lane));
}

/**
 * Runs tasks with at most `limit` in flight; a task starts only after every earlier task sharing
 * one of its keys has finished. After the first throw no further task starts (the batch will be
 * replayed anyway, and later messages of a key must not overtake a failed earlier one).
 */
export async function runKeyed<T>(tasks: { keys: string[]; run: () => Promise<T> }[], limit: number): Promise<{ results: T[]; errors: unknown[] }> {
  const results: T[] = [];
  const errors: unknown[] = [];
  const tails = new Map<string, Promise<unknown>>();
  const waiting: (() => void)[] = [];
  let active = 0;
  let stopped = false;
  const acquire = () => (active < limit ? (active++, Promise.resolve()) : new Promise<void>((r) => waiting.push(r)));
  const release = () => {
    const next = waiting.shift();
    if (next) next();
    else active--;
  };
  const all = tasks.map((task) => {
    const deps = task.keys.map((k) => tails.get(k)).filter((p): p is Promise<unknown> => p !== undefined);
    const done = (async () => {
      if (deps.length) await Promise.all(deps);
      await acquire();
      try {
        if (stopped) return;
        results.push(await task.run());
      } catch (err) {
        stopped = true;
        errors.push(err);
      } finally {
        release();
      }
    })();
    for (const k of task.keys) tails.set(k, done);
    return done;
  });
  await Promise.all(all);
  return { results, errors };
}
