/**
 * The top self-time functions of a `.cpuprofile` (Chrome format, as `bun --cpu-prof` writes it).
 *
 *   node_modules/.bin/bun bench/cpuprofile.ts <file.cpuprofile> [top=25]
 *
 * Profile a drain like this (the profile lands in the current directory):
 *   node_modules/.bin/bun --cpu-prof src/main.ts drain --postgres-url … --pipeline …
 * Self time of a function = the time of the samples taken while it was the innermost frame,
 * summed over every place it appears in the call tree; "(program)"/"(garbage collector)" are
 * native frames. Files are shown relative to node_modules or the repository.
 */
import { readFileSync } from "node:fs";

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
}
interface Profile {
  nodes: ProfileNode[];
  samples: number[];
  timeDeltas: number[];
}

const [file, topArg] = process.argv.slice(2);
if (!file) throw new Error("usage: bench/cpuprofile.ts <file.cpuprofile> [top]");
const profile = JSON.parse(readFileSync(file, "utf8")) as Profile;
const top = Number(topArg ?? 25);

const shortUrl = (url: string) => url.replace(/^.*node_modules\//, "").replace(/^.*\/(src|bench|test)\//, "$1/");
const keyOf = new Map(
  profile.nodes.map((n) => {
    const f = n.callFrame;
    const where = f.url ? ` ${shortUrl(f.url)}:${f.lineNumber + 1}` : "";
    return [n.id, `${f.functionName || "(anonymous)"}${where}`];
  }),
);

const self = new Map<string, number>();
let total = 0;
profile.samples.forEach((id, i) => {
  const dt = profile.timeDeltas[i] ?? 0;
  total += dt;
  const key = keyOf.get(id) ?? "?";
  self.set(key, (self.get(key) ?? 0) + dt);
});

console.log(`${file}: ${(total / 1000).toFixed(0)} ms sampled`);
for (const [key, us] of [...self].sort((a, b) => b[1] - a[1]).slice(0, top)) {
  console.log(`${((100 * us) / total).toFixed(1).padStart(5)} %  ${(us / 1000).toFixed(0).padStart(6)} ms  ${key}`);
}
