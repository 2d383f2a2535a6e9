/**
 * NATS JetStream source throughput: `total` messages taken through `source.batches()` in drain
 * mode, every batch acknowledged (the batch's acks confirmed by the server) as the pipeline does
 * after the inbox commit — the inbox itself is left out, this measures the source. Next to it the
 * raw client on the same stream: the same no_wait fetches, fire-and-forget acks and one flush per
 * batch, no decoding of headers or bodies.
 *
 *   node_modules/.bin/bun bench/nats-source.ts [total=20000] [batch=500]
 */
import { AckPolicy, connect } from "nats";
import * as v from "valibot";
import natsSource from "../src/backends/nats/source.ts";
import { NatsSourceConfig } from "../src/backends/nats/config.ts";
import { benchContext, median } from "./lib.ts";
import { NATS_URL, requireServer } from "../test/helpers/servers.ts";

const total = Number(process.argv[2] ?? 20_000);
const batchSize = Number(process.argv[3] ?? 500);
const rounds = Number(process.env.ROUNDS ?? 3);

await requireServer("nats");
const run = `${process.pid}_${Date.now() % 1e6}`;
const ctx = benchContext({ direction: "reverse", drain: true });
const nc = await connect({ servers: NATS_URL });
const jsm = await nc.jetstreamManager();
const js = nc.jetstream();
const body = new TextEncoder().encode(JSON.stringify({ event_type: "order.created", aggregate_id: "ord-1", amount: 12.5, customer: "c1" }));

async function filled(round: number): Promise<{ stream: string; subject: string }> {
  const stream = `BENCHSRC_${run}_${round}`;
  const subject = `benchsrc${run}_${round}.>`;
  await jsm.streams.add({ name: stream, subjects: [subject] });
  const pending: Promise<unknown>[] = [];
  for (let i = 0; i < total; i++) {
    pending.push(js.publish(`benchsrc${run}_${round}.e`, body, { msgID: `m-${i}` }));
    if (pending.length >= 256) await Promise.all(pending.splice(0));
  }
  await Promise.all(pending);
  return { stream, subject };
}

async function viaSource(round: number): Promise<number> {
  const { stream, subject } = await filled(round);
  const source = natsSource.create(v.parse(NatsSourceConfig, { url: NATS_URL, subject, stream, durable_name: "bench", batch_size: batchSize }), ctx);
  await source.start();
  let got = 0;
  let secs = 0;
  const t0 = performance.now();
  for await (const batch of source.batches(new AbortController().signal)) {
    got += batch.messages.length;
    await batch.ack();
    // Stop the clock at the last ack: the drain's final empty fetch is a fixed wait, not throughput.
    if (got === total) secs = (performance.now() - t0) / 1000;
  }
  await source.close();
  if (got !== total) throw new Error(`got ${got} of ${total}`);
  const info = await jsm.consumers.info(stream, "bench");
  if (info.num_ack_pending !== 0 || info.num_pending !== 0) throw new Error("left unacknowledged");
  await jsm.streams.delete(stream);
  return total / secs;
}

async function raw(round: number): Promise<number> {
  const { stream, subject } = await filled(100 + round);
  await jsm.consumers.add(stream, { durable_name: "raw", ack_policy: AckPolicy.Explicit, filter_subject: subject, max_ack_pending: Math.max(1000, batchSize) });
  let got = 0;
  const t0 = performance.now();
  while (got < total) {
    const msgs = [];
    for await (const m of js.fetch(stream, "raw", { batch: batchSize, no_wait: true, expires: 500 })) msgs.push(m);
    for (const m of msgs) m.ack();
    await nc.flush();
    got += msgs.length;
  }
  const secs = (performance.now() - t0) / 1000;
  await jsm.streams.delete(stream);
  return total / secs;
}

const results: { source: number; raw: number }[] = [];
for (let round = 0; round < rounds; round++) results.push({ source: await viaSource(round), raw: await raw(round) });
await nc.close();
const fmt = (n: number) => `${Math.round(n).toLocaleString("en")} msg/s`;
console.log(`nats source, ${total} messages, batch ${batchSize}, ${rounds} rounds (median):`);
console.log(`  source (confirmed acks): ${fmt(median(results.map((r) => r.source)))}`);
console.log(`  raw fetch + ack + flush:  ${fmt(median(results.map((r) => r.raw)))}`);
