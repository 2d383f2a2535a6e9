/**
 * NATS JetStream sink throughput: 20k messages through `sink.write` in batches of 500 against
 * the local server (scripts/services start nats). Prints msg/s; DESIGN.md gives the raw client
 * ceiling (acked publish, 256 in flight ≈ 20k msg/s on the 2-core reference machine).
 *
 *   node_modules/.bin/bun bench/nats-sink.ts [total=20000] [batch=500] [max_in_flight=256]
 */
import { createConsola } from "consola";
import { connect } from "nats";
import * as v from "valibot";
import nats, { NatsSinkConfig } from "../src/backends/nats.ts";
import type { BackendContext } from "../src/backends/types.ts";
import { forwardMessages } from "../test/helpers/messages.ts";
import { NATS_URL, requireServer } from "../test/helpers/servers.ts";

const total = Number(process.argv[2] ?? 20_000);
const batchSize = Number(process.argv[3] ?? 500);
const maxInFlight = Number(process.argv[4] ?? 256);

await requireServer("nats");
const run = `${process.pid}_${Date.now() % 1e6}`;
const stream = `BENCH_${run}`;
const ctx: BackendContext = {
  pipeline: "bench",
  direction: "forward",
  relayGroupId: "bench",
  log: createConsola({ level: 1 }),
  sql: undefined as never,
  postgresUrl: "",
  drain: false,
};
const cfg = v.parse(NatsSinkConfig, {
  url: NATS_URL,
  subject_template: `bench${run}.{stream_table}.{op}`,
  stream,
  create_stream: true,
  max_in_flight: maxInFlight,
});
const sink = nats.sink.create(cfg, ctx);
await sink.start();

// Distinct outbox ids per batch, so no publish is a dedup hit.
const batches = Array.from({ length: Math.ceil(total / batchSize) }, (_, b) =>
  forwardMessages(Math.min(batchSize, total - b * batchSize), { outboxId: b + 1 }),
);
await sink.write(forwardMessages(200, { outboxId: 1_000_000 })); // warm-up
const t0 = performance.now();
for (const batch of batches) {
  const rejected = await sink.write(batch);
  if (rejected.length) throw new Error(`${rejected.length} rejected: ${rejected[0]!.error}`);
}
const secs = (performance.now() - t0) / 1000;
await sink.close();

const nc = await connect({ servers: NATS_URL });
const jsm = await nc.jetstreamManager();
const stored = (await jsm.streams.info(stream)).state.messages;
if (stored !== total + 200) throw new Error(`stream holds ${stored} messages, expected ${total + 200}`);

// The raw client on the same stream right now (same bodies, msgID, window), since the machine's
// load moves both figures: the sink is judged by its ratio to this.
const js = nc.jetstream();
const encoder = new TextEncoder();
const all = batches.flat();
let next = 0;
const r0 = performance.now();
await Promise.all(
  Array.from({ length: maxInFlight }, async () => {
    while (next < all.length) {
      const m = all[next++]!;
      await js.publish(`bench${run}.raw`, encoder.encode(JSON.stringify(m.payload)), { msgID: `raw:${m.dedup_key}` });
    }
  }),
);
const rawSecs = (performance.now() - r0) / 1000;
await jsm.streams.delete(stream);
await nc.close();

const rate = Math.round(total / secs);
const raw = Math.round(total / rawSecs);
console.log(
  `nats sink: ${total} messages in batches of ${batchSize}, max_in_flight ${maxInFlight}: ${secs.toFixed(2)} s = ${rate} msg/s ` +
    `(raw js.publish, one continuous window: ${raw} msg/s; sink/raw ${((rate / raw) * 100).toFixed(0)} %)`,
);
