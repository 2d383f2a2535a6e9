/**
 * Redis Streams under the shared contract (suite.ts). A plain XADD appends a replay again; with
 * `dedup_window_seconds` (set here) the sink skips a dedup key it wrote within the window, so a
 * replay adds nothing. Redis accepts any entry size up to 512 MB: no sink-side poison.
 */
import Redis from "ioredis";
import { portOf, REDIS_URL } from "../helpers/servers.ts";
import { RUN, sinkContract, sourceContract } from "./suite.ts";

/** The shared server has no password: the default user takes any one. */
const url = (port: number, secret: string) => `redis://default:${secret}@127.0.0.1:${port}`;

sinkContract({
  system: "redis",
  servers: ["redis"],
  serverPort: portOf(REDIS_URL),
  dedups: true,
  ordered: true,
  hasSecret: true,
  async target(reach, secret) {
    const redis = new Redis(REDIS_URL);
    const key = `contract:${RUN}`;
    return {
      config: { type: "redis", url: url(reach.port, secret), stream_key: key, dedup_window_seconds: 600, command_timeout_ms: 1000 },
      async arrived() {
        const entries = await redis.xrange(key, "-", "+");
        return entries.map(([, f]) => ({ key: f[f.indexOf("pgt_dedup_key") + 1]!, payload: JSON.parse(f[f.indexOf("payload") + 1]!) }));
      },
      async cleanup() {
        await redis.del(key);
        redis.disconnect();
      },
    };
  },
});

sourceContract({
  system: "redis",
  servers: ["redis"],
  serverPort: portOf(REDIS_URL),
  hasSecret: true,
  async target(reach, secret) {
    const redis = new Redis(REDIS_URL);
    const key = `contract-in:${RUN}`;
    return {
      // Long polls shorter than the I/O timeout (docs/WATCHDOG.md); a killed relay's pending
      // entries are claimed after a second.
      config: { type: "redis", url: url(reach.port, secret), stream_key: key, block_ms: 2000, claim_idle_ms: 1000 },
      async publish(events) {
        for (const e of events) await redis.xadd(key, "*", "payload", e.body, "pgt_dedup_key", e.key);
      },
      // The group's undelivered entries (XINFO GROUPS lag) plus its pending ones (XPENDING).
      async pending() {
        const groups = (await redis.xinfo("GROUPS", key)) as unknown[][];
        const group = groups.map((g) => Object.fromEntries(g.flatMap((v, i) => (i % 2 === 0 ? [[v, g[i + 1]]] : [])))).find((g) => g.name === "pgtrickle-relay")!;
        return Number(group.lag ?? 0) + Number(group.pending);
      },
      async cleanup() {
        await redis.del(key);
        redis.disconnect();
      },
    };
  },
});
