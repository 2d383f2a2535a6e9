/**
 * HTTP webhook sink throughput: 20k messages through `sink.write` in batches of 500 against a
 * Bun.serve receiver on 127.0.0.1, run in a child process so the receiver does not share this
 * event loop. Three shapes: batch mode (one request per 500), per-event mode with 16 requests in
 * flight across keys (`ordering_key_template: "{dedup_key}"`), and per-event mode with the default
 * ordering key (one stream table = one request at a time). Batch mode sends one request per
 * change set (outbox row), so a last shape writes batches of one-message change sets: the worst
 * case, one request per message. Prints msg/s per shape.
 *
 *   node_modules/.bin/bun bench/http-sink.ts [total=20000] [batch=500]
 */
import * as v from "valibot";
import httpSink from "../src/backends/http/sink.ts";
import { benchContext, benchBatches, timedWrites } from "./lib.ts";
import type { Message } from "../src/message.ts";
import { forwardMessages } from "../test/helpers/messages.ts";

const total = Number(process.argv[2] ?? 20_000);
const batchSize = Number(process.argv[3] ?? 500);

const receiver = Bun.spawn(
  [
    process.execPath,
    "-e",
    `let received = 0;
     const server = Bun.serve({ hostname: "127.0.0.1", port: 0, async fetch(req) {
       if (req.method === "GET") return new Response(String(received));
       const body = await req.json();
       received += Array.isArray(body) ? body.length : 1;
       return new Response("ok");
     }});
     console.log(server.port);`,
  ],
  { stdout: "pipe", stderr: "inherit" },
);
const reader = receiver.stdout.getReader();
const port = Number(new TextDecoder().decode((await reader.read()).value).trim());
const url = `http://127.0.0.1:${port}/hook`;
const received = async () => Number(await (await fetch(url)).text());

const ctx = benchContext();

/** Batches of `batchSize` change sets of one message each. */
function oneMessageChangeSets(count: number): Message[][] {
  const batches: Message[][] = [];
  for (let first = 0; first < count; first += batchSize) {
    const size = Math.min(batchSize, count - first);
    batches.push(Array.from({ length: size }, (_, i) => forwardMessages(1, { outboxId: first + i + 1 })[0]!));
  }
  return batches;
}

async function measure(label: string, options: Record<string, unknown>, count: number, batches = benchBatches(count, batchSize)): Promise<void> {
  const sink = httpSink.create(v.parse(httpSink.config, { url, ...options }), ctx);
  await sink.start();
  await sink.write(forwardMessages(100, { outboxId: 1_000_000 })); // warm-up
  const before = await received();
  const secs = await timedWrites(sink, batches);
  await sink.close();
  const got = (await received()) - before;
  if (got !== count) throw new Error(`${label}: receiver counted ${got}, expected ${count}`);
  console.log(`${label.padEnd(44)} ${String(Math.round(count / secs)).padStart(7)} msg/s  (${count} in ${secs.toFixed(2)} s)`);
}

try {
  await measure("batch mode (500 per request)", {}, total);
  await measure("per-event, 16 in flight, key {dedup_key}", { batch_mode: false, ordering_key_template: "{dedup_key}" }, total);
  await measure("per-event, default key (serial per table)", { batch_mode: false }, Math.min(total, 5000));
  await measure("batch mode, signed + CloudEvents", { signing_secret: "bench-secret", cloudevents: true }, total);
  const small = Math.min(total, 5000);
  await measure("batch mode, one-message change sets", {}, small, oneMessageChangeSets(small));
} finally {
  receiver.kill();
}
