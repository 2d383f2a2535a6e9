/**
 * HTTP under the shared contract (suite.ts): the webhook sink against a receiver of this file,
 * and the relay's own HTTP receiver (source). A webhook receiver gets each replayed copy again,
 * under the same `Idempotency-Key` and dedup keys; deduplicating is the receiver's part. The
 * receiver source has no server of its own to lose (the relay is the server): no unreachable
 * case. A body nested too deep is answered 400 for that request (the sender keeps it), so only
 * the other poisons are dead-lettered.
 */
import { freePort } from "../helpers/proxy.ts";
import { POISONS } from "../helpers/poison.ts";
import { RUN, sinkContract, sourceContract, type Arrived, type Event } from "./suite.ts";

/** A webhook receiver that refuses (400) any request holding a row marked poison. */
function receiver() {
  const got: Arrived[] = [];
  const server = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(req) {
      const text = await req.text();
      if (text.includes(`poison-${RUN}`)) return new Response("refused", { status: 400 });
      for (const e of JSON.parse(text) as { dedup_key: string; payload: Arrived["payload"] }[]) got.push({ key: e.dedup_key, payload: e.payload });
      return new Response("ok");
    },
  });
  return { got, server };
}

let hook: ReturnType<typeof receiver>;

sinkContract({
  system: "http",
  servers: [],
  get serverPort() {
    hook ??= receiver();
    return hook.server.port!;
  },
  dedups: false,
  ordered: true,
  hasSecret: true,
  poisonRow: { blob: `poison-${RUN}` },
  async target(reach, secret) {
    return {
      config: { type: "http", url: `http://127.0.0.1:${reach.port}/hook`, timeout_ms: 2000, headers: { Authorization: `Bearer ${secret}` } },
      arrived: async () => [...hook.got],
      async cleanup() {
        hook.server.stop(true);
      },
    };
  },
});

/** POSTs one event until the relay answered it (200, or 400 for a body it can never take). */
async function post(url: string, secret: string, e: Event): Promise<void> {
  const until = Date.now() + 120_000;
  for (;;) {
    const res = await fetch(url, { method: "POST", body: e.body, headers: { "content-type": "application/json", Authorization: `Bearer ${secret}` } }).catch(() => null);
    if (res?.status === 200 || res?.status === 400) return;
    if (Date.now() > until) throw new Error(`the receiver never answered ${e.key}: ${res?.status ?? "no connection"}`);
    await Bun.sleep(200);
  }
}

sourceContract({
  system: "http",
  servers: [],
  serverPort: null,
  hasSecret: true,
  poisons: POISONS.slice(1),
  async target(_reach, secret) {
    const port = await freePort();
    const url = `http://127.0.0.1:${port}/hooks`;
    return {
      config: { type: "http", listen_addr: `127.0.0.1:${port}`, path: "/hooks", auth_header: "Authorization", auth_value: `Bearer ${secret}` },
      async publish(events) {
        await Promise.all(events.map((e) => post(url, secret, e)));
      },
      async cleanup() {},
    };
  },
});
