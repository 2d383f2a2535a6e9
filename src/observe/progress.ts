import type { Coordinator } from "../coordinator.ts";

/**
 * What `drain` shows while it works: on a terminal one line, rewritten every second, with the
 * rows each pipeline still has to relay; elsewhere (CI logs) a plain line every 10 seconds.
 * Returns the function that stops it.
 */
export function showDrainProgress(coordinator: Coordinator, out: NodeJS.WriteStream = process.stderr): () => void {
  const tty = out.isTTY === true;
  let lastLength = 0;
  let busy = false;
  const tick = async () => {
    if (busy) return;
    busy = true;
    try {
      const parts = await Promise.all(
        coordinator.pipelines.map(async (p) => {
          const lag = await p.source.lag?.().catch(() => null);
          return `${p.name}: ${lag ? `${lag.rows} rows remaining` : `${p.delivered} relayed`}`;
        }),
      );
      if (parts.length === 0) return;
      const line = `drain: ${parts.join(", ")}`;
      if (tty) {
        // Ends with the cursor at the line's start, so a log line written next overwrites it.
        out.write(`\r${line.padEnd(lastLength)}\r`);
        lastLength = line.length;
      } else {
        out.write(`${line}\n`);
      }
    } finally {
      busy = false;
    }
  };
  const timer = setInterval(() => void tick(), tty ? 1000 : 10_000);
  return () => {
    clearInterval(timer);
    if (tty && lastLength > 0) out.write(`\r${" ".repeat(lastLength)}\r`);
  };
}
