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
 * one of its keys has finished. Tasks ready to start go in the order they became ready (their
 * own order when nothing holds them back). After the first throw no further task starts (the
 * batch will be replayed anyway, and later messages of a key must not overtake a failed earlier
 * one); the call resolves once the tasks already started have finished.
 *
 * Each task waits for the last earlier task of each of its keys, so the waits form a graph known
 * before anything starts: a count of the tasks each one waits for, and who waits for it. A task
 * costs one promise (its own run). The async function per task this replaced, awaiting its
 * predecessors and then a place, took 12 % off the rate of 16 fetch calls in flight
 * (bench/RESULTS.md, "Forward HTTP per event").
 */
export function runKeyed<T>(tasks: { keys: string[]; run: () => Promise<T> }[], limit: number): Promise<{ results: T[]; errors: unknown[] }> {
  const results: T[] = [];
  const errors: unknown[] = [];
  const waitsFor = new Array<number>(tasks.length).fill(0);
  const waitedOnBy: (number[] | undefined)[] = new Array(tasks.length);
  const lastOfKey = new Map<string, number>();
  const ready: number[] = [];
  tasks.forEach((task, i) => {
    for (const key of task.keys) {
      const before = lastOfKey.get(key);
      lastOfKey.set(key, i);
      if (before === undefined) continue;
      const followers = (waitedOnBy[before] ??= []);
      if (followers.at(-1) === i) continue; // two keys shared with the same earlier task
      followers.push(i);
      waitsFor[i]!++;
    }
    if (waitsFor[i] === 0) ready.push(i);
  });
  let nextReady = 0;
  let running = 0;
  let stopped = false;
  return new Promise((resolve) => {
    const startMore = () => {
      while (!stopped && running < limit && nextReady < ready.length) start(ready[nextReady++]!);
      if (running === 0) resolve({ results, errors });
    };
    const start = (i: number) => {
      running++;
      let run: Promise<T>;
      try {
        run = tasks[i]!.run();
      } catch (err) {
        run = Promise.reject(err);
      }
      run.then(
        (result) => {
          results.push(result);
          finished(i);
        },
        (err) => {
          stopped = true;
          errors.push(err);
          finished(i);
        },
      );
    };
    const finished = (i: number) => {
      running--;
      for (const follower of waitedOnBy[i] ?? []) if (--waitsFor[follower]! === 0) ready.push(follower);
      startMore();
    };
    startMore();
  });
}
