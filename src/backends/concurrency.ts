/**
 * Ordered, bounded concurrency shared by the sinks that send several requests per batch (HTTP
 * per-event mode, SQS batch calls).
 */

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
