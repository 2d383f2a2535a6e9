import { describe, expect, test } from "bun:test";
import { runStages, type Stages } from "../../src/pipeline-loop.ts";

/** Stages over batches 1…n whose writes take a moment; records what happened, in order. */
function recorder(n: number, fail: { read?: number; write?: number; commit?: number } = {}, writeTicks = (_b: number) => 2) {
  const events: string[] = [];
  let next = 1;
  let inFlight = 0;
  let maxInFlight = 0;
  const tick = () => new Promise((r) => setTimeout(r, 1));
  const stages: Stages<number, string> = {
    read: async () => {
      await tick();
      if (next === fail.read) throw new Error(`read ${next} failed`);
      if (next > n) return null;
      inFlight++;
      maxInFlight = Math.max(maxInFlight, inFlight);
      events.push(`read ${next}`);
      return next++;
    },
    write: async (b) => {
      events.push(`write ${b} start`);
      for (let i = 0; i < writeTicks(b); i++) await tick();
      if (b === fail.write) throw new Error(`write ${b} failed`);
      events.push(`write ${b} done`);
      return `w${b}`;
    },
    commit: async (b, w) => {
      await tick();
      if (b === fail.commit) throw new Error(`commit ${b} failed`);
      expect(w).toBe(`w${b}`);
      inFlight--;
      events.push(`commit ${b}`);
    },
    abandon: async (b) => {
      inFlight--;
      events.push(`abandon ${b}`);
    },
  };
  const of = (kind: string) => events.filter((e) => e.startsWith(kind)).map((e) => Number(e.split(" ")[1]));
  return { stages, events, of, maxInFlight: () => maxInFlight };
}

describe("runStages", () => {
  test("every batch is written and committed in read order, each commit after its own write, never more than depth in flight", async () => {
    const r = recorder(20);
    await runStages(r.stages, 3, () => {});
    const all = Array.from({ length: 20 }, (_, i) => i + 1);
    expect(r.of("commit")).toEqual(all);
    expect(r.events.filter((e) => e.endsWith("done")).map((e) => Number(e.split(" ")[1]))).toEqual(all);
    for (const b of all) expect(r.events.indexOf(`commit ${b}`)).toBeGreaterThan(r.events.indexOf(`write ${b} done`));
    // One write at a time: every write starts after the previous one finished.
    for (const b of all.slice(1)) expect(r.events.indexOf(`write ${b} start`)).toBeGreaterThan(r.events.indexOf(`write ${b - 1} done`));
    expect(r.maxInFlight()).toBe(3); // and read-ahead did happen
  });

  test("depth 1: the next batch is read only after the previous one was committed", async () => {
    const r = recorder(5);
    await runStages(r.stages, 1, () => {});
    for (let b = 2; b <= 5; b++) expect(r.events.indexOf(`read ${b}`)).toBeGreaterThan(r.events.indexOf(`commit ${b - 1}`));
    expect(r.maxInFlight()).toBe(1);
  });

  test("a failed write: the batches before it are committed, it and those behind it abandoned, nothing after it written", async () => {
    const r = recorder(20, { write: 5 });
    let aborted = false;
    await expect(runStages(r.stages, 3, () => (aborted = true))).rejects.toThrow("write 5 failed");
    expect(aborted).toBe(true);
    expect(r.of("commit")).toEqual([1, 2, 3, 4]);
    expect(r.of("abandon")[0]).toBe(5);
    expect(r.of("abandon")).toEqual(r.of("read").filter((b) => b >= 5));
    expect(r.events).not.toContain("write 6 start");
  });

  test("a failed commit: nothing after it is committed; every batch read and not committed is abandoned, oldest first", async () => {
    const r = recorder(20, { commit: 4 });
    await expect(runStages(r.stages, 3, () => {})).rejects.toThrow("commit 4 failed");
    expect(r.of("commit")).toEqual([1, 2, 3]);
    const abandoned = r.of("abandon");
    expect(abandoned).toEqual(r.of("read").filter((b) => b >= 4));
    expect(abandoned).toEqual([...abandoned].sort((a, b) => a - b));
  });

  test("a failed read: the batches read before it are still written and committed, then the error", async () => {
    const r = recorder(20, { read: 6 });
    await expect(runStages(r.stages, 3, () => {})).rejects.toThrow("read 6 failed");
    expect(r.of("commit")).toEqual([1, 2, 3, 4, 5]);
    expect(r.of("abandon")).toEqual([]);
  });

  test("independent batches: their writes overlap, yet each is committed in read order, after its own write and every earlier one", async () => {
    // Batch 1's write is the slowest: 2 and 3 finish before it and must still wait for its commit.
    const r = recorder(9, {}, (b) => (b % 3 === 1 ? 6 : 1));
    r.stages.independent = () => true;
    await runStages(r.stages, 3, () => {});
    const all = Array.from({ length: 9 }, (_, i) => i + 1);
    expect(r.of("commit")).toEqual(all);
    expect(r.events.indexOf("write 2 start")).toBeLessThan(r.events.indexOf("write 1 done"));
    expect(r.events.indexOf("write 2 done")).toBeLessThan(r.events.indexOf("write 1 done"));
    for (const b of all) for (const k of all.slice(0, b)) expect(r.events.indexOf(`commit ${b}`)).toBeGreaterThan(r.events.indexOf(`write ${k} done`));
    expect(r.maxInFlight()).toBe(3);
  });

  test("a batch that is not independent waits for every write before it", async () => {
    const r = recorder(6, {}, (b) => (b === 1 ? 6 : 1));
    r.stages.independent = (b) => b !== 3;
    await runStages(r.stages, 3, () => {});
    expect(r.events.indexOf("write 2 start")).toBeLessThan(r.events.indexOf("write 1 done"));
    expect(r.events.indexOf("write 3 start")).toBeGreaterThan(r.events.indexOf("write 1 done"));
    expect(r.events.indexOf("write 3 start")).toBeGreaterThan(r.events.indexOf("write 2 done"));
    expect(r.of("commit")).toEqual([1, 2, 3, 4, 5, 6]);
  });

  test("a failed independent write: a later batch whose write resolved is abandoned with it, never committed", async () => {
    const r = recorder(9, { write: 2 }, (b) => (b === 2 ? 4 : 1));
    r.stages.independent = () => true;
    await expect(runStages(r.stages, 3, () => {})).rejects.toThrow("write 2 failed");
    expect(r.of("commit")).toEqual([1]);
    expect(r.events).toContain("write 3 done"); // it overlapped the failing write and resolved first
    expect(r.of("abandon")).toEqual(r.of("read").filter((b) => b >= 2));
    expect(r.of("abandon")).toContain(3);
  });

  test("written batches that queue up behind a slow commit are committed by the newest one's commit when it covers them", async () => {
    const commits: { batch: number; covered: number[] }[] = [];
    const stages = queuedBehindFirstCommit(6, async (batch, covered) => void commits.push({ batch, covered }));
    // Batch 5 cannot be covered (say it has dead letters to write first).
    stages.covers = (_newer, older) => older.batch !== 5 && older.written === `w${older.batch}`;
    await runStages(stages, 3, () => {});
    expect(commits[0]).toEqual({ batch: 1, covered: [] });
    expect(commits[1]).toEqual({ batch: 3, covered: [2] });
    // Every batch committed exactly once, in order, either alone or covered by a later one.
    expect(commits.flatMap((c) => [...c.covered, c.batch])).toEqual([1, 2, 3, 4, 5, 6]);
    expect(commits.find((c) => c.covered.includes(5))).toBeUndefined();
  });

  test("a failed commit that would have covered earlier batches: they are abandoned with it, none committed", async () => {
    const commits: number[][] = [];
    const stages = queuedBehindFirstCommit(4, async (batch, covered) => {
      if (batch === 3) throw new Error("commit 3 failed");
      commits.push([...covered, batch]);
    });
    const abandoned: number[] = [];
    stages.abandon = async (b) => void abandoned.push(b);
    await expect(runStages(stages, 3, () => {})).rejects.toThrow("commit 3 failed");
    expect(commits).toEqual([[1]]);
    expect(abandoned.slice(0, 2)).toEqual([2, 3]);
  });
});

/**
 * Stages over batches 1…n, every later batch covering the earlier ones, whose first commit is
 * held until batch 3 is written: batches 2 and 3 queue up written behind it. `commit` gets the
 * batch and the batches it covers.
 */
function queuedBehindFirstCommit(n: number, commit: (batch: number, covered: number[]) => Promise<void>): Stages<number, string> {
  let next = 1;
  let release!: () => void;
  const firstCommit = new Promise<void>((r) => (release = r));
  return {
    read: async () => (next > n ? null : next++),
    write: async (b) => {
      if (b === 3) release();
      return `w${b}`;
    },
    commit: async (b, w, covered) => {
      expect(w).toBe(`w${b}`);
      if (b === 1) await firstCommit;
      await commit(b, covered.map((c) => c.batch));
    },
    covers: () => true,
    abandon: async () => {},
  };
}
