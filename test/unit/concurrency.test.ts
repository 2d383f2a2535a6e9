/**
 * runKeyed (src/backends/concurrency.ts): the scheduler of the HTTP sink's requests and the SQS
 * sink's calls. Each task here finishes only when the test says so, so which tasks have started
 * at each moment is exact, whatever the machine's load.
 */
import { describe, expect, test } from "bun:test";
import { runKeyed } from "../../src/backends/concurrency.ts";

/** Tasks that record their start and finish when `finish(name)` (or `fail(name)`) is called. */
function controlledTasks(specs: { name: string; keys: string[] }[]) {
  const started: string[] = [];
  const settle = new Map<string, { resolve: (v: string) => void; reject: (e: Error) => void }>();
  let running = 0;
  let maxRunning = 0;
  const tasks = specs.map(({ name, keys }) => ({
    keys,
    run: () =>
      new Promise<string>((resolve, reject) => {
        started.push(name);
        maxRunning = Math.max(maxRunning, ++running);
        settle.set(name, {
          resolve: (v) => (running--, resolve(v)),
          reject: (e) => (running--, reject(e)),
        });
      }),
  }));
  const turn = () => new Promise((r) => setTimeout(r, 0));
  return {
    tasks,
    started,
    maxRunning: () => maxRunning,
    async finish(name: string) {
      settle.get(name)!.resolve(name);
      await turn();
    },
    async fail(name: string) {
      settle.get(name)!.reject(new Error(`${name} failed`));
      await turn();
    },
    turn,
  };
}

describe("runKeyed", () => {
  test("a task starts only after every earlier task sharing a key finished; other keys go ahead, at most `limit` at once", async () => {
    const c = controlledTasks([
      { name: "a1", keys: ["a"] },
      { name: "b1", keys: ["b"] },
      { name: "a2", keys: ["a"] },
      { name: "ab", keys: ["a", "b"] },
      { name: "c1", keys: ["c"] },
      { name: "d1", keys: ["d"] },
    ]);
    const done = runKeyed(c.tasks, 3);
    await c.turn();
    expect(c.started).toEqual(["a1", "b1", "c1"]); // a2 and ab wait for a1; d1 for a free place
    await c.finish("b1");
    expect(c.started).toEqual(["a1", "b1", "c1", "d1"]); // ab still waits for a1 and a2
    await c.finish("a1");
    expect(c.started).toEqual(["a1", "b1", "c1", "d1", "a2"]);
    await c.finish("c1");
    expect(c.started).toEqual(["a1", "b1", "c1", "d1", "a2"]); // a free place, but ab waits for a2
    await c.finish("a2");
    expect(c.started.at(-1)).toBe("ab");
    await c.finish("d1");
    await c.finish("ab");
    const { results, errors } = await done;
    expect(errors).toEqual([]);
    expect(results).toEqual(["b1", "a1", "c1", "a2", "d1", "ab"]);
    expect(c.maxRunning()).toBe(3);
  });

  test("after the first failure no task starts; it resolves once the running ones finished, with every error", async () => {
    const c = controlledTasks(["x1", "y1", "x2", "z1", "w1"].map((name) => ({ name, keys: [name[0]!] })));
    let resolved = false;
    const done = runKeyed(c.tasks, 2).then((r) => ((resolved = true), r));
    await c.turn();
    expect(c.started).toEqual(["x1", "y1"]);
    await c.fail("x1");
    expect(c.started).toEqual(["x1", "y1"]); // neither x2 (its key failed) nor z1 starts
    expect(resolved).toBe(false); // y1 is still running
    await c.fail("y1");
    const { results, errors } = await done;
    expect(c.started).toEqual(["x1", "y1"]);
    expect(results).toEqual([]);
    expect(errors.map((e) => (e as Error).message)).toEqual(["x1 failed", "y1 failed"]);
  });

  test("a task that throws before returning its promise counts as failed; no tasks resolve at once", async () => {
    const { errors } = await runKeyed(
      [
        {
          keys: [],
          run: () => {
            throw new Error("sync");
          },
        },
      ],
      4,
    );
    expect(errors.map((e) => (e as Error).message)).toEqual(["sync"]);
    expect(await runKeyed([], 4)).toEqual({ results: [], errors: [] });
  });

  test("one key: every task in order, one at a time, over thousands of tasks", async () => {
    const order: number[] = [];
    let running = 0;
    const tasks = Array.from({ length: 5000 }, (_, i) => ({
      keys: ["same"],
      run: async () => {
        expect(++running).toBe(1);
        await Promise.resolve();
        order.push(i);
        running--;
        return i;
      },
    }));
    const { results, errors } = await runKeyed(tasks, 16);
    expect(errors).toEqual([]);
    expect(order).toEqual([...Array(5000).keys()]);
    expect(results).toEqual(order);
  });
});
