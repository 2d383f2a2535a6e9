/**
 * The three stages of a pipeline run, concurrent and in order (docs/PIPELINE.md): the reader
 * takes the next batches from the source while the writer hands them to the sink, one at a time
 * unless a batch has no order with the ones before it, and the committer acknowledges written
 * batches, oldest first. At most `depth` batches are read and not yet committed.
 */
export interface Stages<B, W> {
  /** The next batch, or null at the source's end (drain mode, or the epoch was aborted). */
  read(): Promise<B | null>;
  /** Writes one batch; retries transient failures itself and throws only when it gives up. */
  write(batch: B): Promise<W>;
  /**
   * Proof of ownership, dead letters, acknowledgement; retries like `write`. `covered`: earlier
   * written batches that this commit commits too (see `covers`), oldest first; their own commits
   * are left out.
   */
  commit(batch: B, written: W, covered: Written<B, W>[]): Promise<void>;
  /**
   * True when committing `newer` also commits `older` (written, awaiting its commit), so that
   * `older` need not be committed on its own. Absent: every batch is committed on its own.
   */
  covers?(newer: B, older: Written<B, W>): boolean;
  /**
   * True when `batch` has no order with the batches read before it, so that its write may start
   * while theirs are still running (the HTTP receiver's requests). Absent: one write at a time.
   */
  independent?(batch: B): boolean;
  /** Called once for every batch that was read but will not be committed (the run ended early). */
  abandon(batch: B): Promise<void>;
}

/** A batch whose write resolved, with what the write returned. */
export interface Written<B, W> {
  batch: B;
  written: W;
}

/** A one-shot wake-up: `wait()` resolves at the next `notify()` (or at once if one is pending). */
class Signal {
  private pending = false;
  private waiter: (() => void) | null = null;

  notify(): void {
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = null;
      w();
    } else this.pending = true;
  }

  wait(): Promise<void> {
    if (this.pending) {
      this.pending = false;
      return Promise.resolve();
    }
    return new Promise((resolve) => (this.waiter = resolve));
  }
}

/**
 * Runs the stages until the source ends or a stage fails, then returns (or throws the failure)
 * once every stage has stopped. `abort` is called at the first write or commit failure, so that a
 * read waiting on an idle source returns at once.
 *
 * Ordering: the writer starts the writes in the order the batches were read, the next one only
 * after the previous one resolved unless `independent` says the batch may overlap them; the
 * committer takes written batches in read order, so a batch is committed only after its own write
 * and every earlier commit (or with a later batch's commit that covers it, after that batch's
 * write: see `coveredCount`). A failed read lets the writer and committer finish the batches read
 * before it (they are valid). A failed write or commit stops everything: the batches written
 * ahead of a failed write are still committed (their writes resolved, and so did every write
 * before them); whatever is behind the failure is abandoned, even when its own write resolved,
 * and read again by the next run from the last committed position.
 */
export async function runStages<B, W>(stages: Stages<B, W>, depth: number, abort: () => void): Promise<void> {
  const toWrite: B[] = []; // read, write not started
  const writing: { batch: B; written?: { value: W } }[] = []; // write started, in read order, not yet passed on
  const toCommit: Written<B, W>[] = [];
  let inFlight = 0; // read and not yet committed
  let readerDone = false;
  let writerDone = false;
  let readFailure: { error: unknown } | null = null;
  let failure: { error: unknown } | null = null;
  const readerWake = new Signal();
  const writerWake = new Signal();
  const committerWake = new Signal();

  const fail = (error: unknown) => {
    failure ??= { error };
    abort();
    readerWake.notify();
    writerWake.notify();
  };

  const reader = async () => {
    try {
      while (!failure) {
        if (inFlight >= depth) {
          await readerWake.wait();
          continue;
        }
        const batch = await stages.read();
        if (batch === null) return;
        inFlight++;
        toWrite.push(batch);
        writerWake.notify();
      }
    } catch (err) {
      readFailure = { error: err };
    } finally {
      readerDone = true;
      writerWake.notify();
    }
  };

  /** Written batches at the head of `writing` go to the committer; one behind a write still running waits for it. */
  const passWritten = () => {
    for (let head = writing[0]; head?.written; head = writing[0]) {
      writing.shift();
      toCommit.push({ batch: head.batch, written: head.written.value });
    }
    committerWake.notify();
  };

  const writer = async () => {
    let running = 0;
    try {
      while (!failure) {
        const batch = toWrite[0];
        if (batch === undefined && readerDone) break;
        if (batch === undefined || (running > 0 && !stages.independent?.(batch))) {
          await writerWake.wait();
          continue;
        }
        toWrite.shift();
        const slot: (typeof writing)[number] = { batch };
        writing.push(slot);
        running++;
        stages
          .write(batch)
          .then(
            (value) => {
              slot.written = { value };
              passWritten();
            },
            fail, // the slot stays unwritten: it and every batch behind it are abandoned
          )
          .finally(() => {
            running--;
            writerWake.notify();
          });
      }
      while (running > 0) await writerWake.wait();
    } finally {
      writerDone = true;
      committerWake.notify();
    }
  };

  const committer = async () => {
    try {
      for (;;) {
        const next = toCommit[0];
        if (next === undefined) {
          if (writerDone) return;
          await committerWake.wait();
          continue;
        }
        const covered = toCommit.slice(0, coveredCount(toCommit));
        const newest = toCommit[covered.length]!;
        await stages.commit(newest.batch, newest.written, covered);
        toCommit.splice(0, covered.length + 1); // only now, as in the writer
        inFlight -= covered.length + 1;
        readerWake.notify();
      }
    } catch (err) {
      fail(err);
    }
  };

  /**
   * How many of the written batches waiting, oldest first, the one after them commits too. Each
   * commit is a durable write (a WAL flush for the outbox offset) and the slowest stage: batches
   * that queued up behind one are committed by one statement instead of one each, or the
   * committer would hold the reader back through `depth` (bench/RESULTS.md, "Commit → publish
   * latency"). A batch alone is committed at once, never held back to wait for company.
   */
  const coveredCount = (waiting: Written<B, W>[]): number => {
    let count = 0;
    while (count + 1 < waiting.length && waiting.slice(0, count + 1).every((older) => stages.covers?.(waiting[count + 1]!.batch, older))) count++;
    return count;
  };

  await Promise.all([reader(), writer(), committer()]);
  for (const { batch } of [...toCommit.splice(0), ...writing.splice(0)]) await stages.abandon(batch);
  for (const batch of toWrite.splice(0)) await stages.abandon(batch);
  const first = failure ?? readFailure;
  if (first) throw (first as { error: unknown }).error;
}
