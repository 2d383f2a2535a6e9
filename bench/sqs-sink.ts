/**
 * SQS sink throughput against the emulator (scripts/services start sqs): 20k messages through
 * `sink.write` in batches of 500, on a standard queue and on a FIFO queue (8 message groups, and
 * one group). For comparison, the raw client sending the same bodies with SendMessageBatch,
 * 16 calls in flight. DESIGN.md: SQS batch send (emulator) ≈ 11k msg/s on the reference machine.
 * msg/s swings widely when other work shares the two cores (the emulator runs on them too), so
 * the client CPU per message is printed as well.
 *
 *   node_modules/.bin/bun bench/sqs-sink.ts [total=20000] [batch=500] [max_in_flight=16]
 */
import { CreateQueueCommand, DeleteQueueCommand, GetQueueAttributesCommand, SendMessageBatchCommand, SQSClient } from "@aws-sdk/client-sqs";
import * as v from "valibot";
import sqsSink from "../src/backends/sqs/sink.ts";
import { envelopeJson } from "../src/message.ts";
import { benchContext, benchBatches, timedWrites } from "./lib.ts";
import { forwardMessages } from "../test/helpers/messages.ts";
import { AWS_CREDENTIALS, requireServer, SQS_CLIENT_CONFIG, SQS_ENDPOINT } from "../test/helpers/servers.ts";

const total = Number(process.argv[2] ?? 20_000);
const batchSize = Number(process.argv[3] ?? 500);
const maxInFlight = Number(process.argv[4] ?? 16);

await requireServer("sqs");
const admin = new SQSClient(SQS_CLIENT_CONFIG);
const run = `${process.pid}-${Date.now() % 1e6}`;
const ctx = benchContext();

async function queue(name: string, fifo: boolean): Promise<string> {
  const out = await admin.send(
    new CreateQueueCommand({ QueueName: `bench-${name}-${run}${fifo ? ".fifo" : ""}`, Attributes: fifo ? { FifoQueue: "true" } : {} }),
  );
  return out.QueueUrl!;
}

async function depth(url: string): Promise<number> {
  const out = await admin.send(new GetQueueAttributesCommand({ QueueUrl: url, AttributeNames: ["ApproximateNumberOfMessages"] }));
  return Number(out.Attributes?.ApproximateNumberOfMessages);
}

const batches = benchBatches(total, batchSize);

/** Client-side CPU per message: steadier than msg/s when other work shares the cores. */
function cpuPerMessage(since: NodeJS.CpuUsage): string {
  const used = process.cpuUsage(since);
  return ((used.user + used.system) / total).toFixed(1);
}

async function measure(label: string, fifo: boolean, options: Record<string, unknown>): Promise<number> {
  const url = await queue(label.replace(/\W+/g, "").slice(0, 20), fifo);
  const sink = sqsSink.create(
    v.parse(sqsSink.config, {
      queue_url: url,
      endpoint: SQS_ENDPOINT,
      region: "us-east-1",
      access_key_id: AWS_CREDENTIALS.accessKeyId,
      secret_access_key: AWS_CREDENTIALS.secretAccessKey,
      max_in_flight: maxInFlight,
      ...options,
    }),
    ctx,
  );
  await sink.start();
  await sink.write(forwardMessages(100, { outboxId: 1_000_000 })); // warm-up
  const c0 = process.cpuUsage();
  const secs = await timedWrites(sink, batches);
  const cpu = cpuPerMessage(c0);
  await sink.close();
  const stored = await depth(url);
  await admin.send(new DeleteQueueCommand({ QueueUrl: url }));
  if (stored !== total + 100) throw new Error(`${label}: queue holds ${stored}, expected ${total + 100}`);
  const rate = Math.round(total / secs);
  console.log(`${label.padEnd(36)} ${String(rate).padStart(7)} msg/s  (${total} in ${secs.toFixed(2)} s, client CPU ${cpu} µs/msg)`);
  return rate;
}

async function raw(report = true): Promise<number> {
  const url = await queue("raw", false);
  const all = batches.flat();
  const calls = Array.from({ length: Math.ceil(all.length / 10) }, (_, i) => all.slice(i * 10, i * 10 + 10));
  let next = 0;
  const c0 = process.cpuUsage();
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: maxInFlight }, async () => {
      while (next < calls.length) {
        const call = calls[next++]!;
        await admin.send(
          new SendMessageBatchCommand({
            QueueUrl: url,
            Entries: call.map((m, i) => ({
              Id: String(i),
              MessageBody: envelopeJson(m),
              MessageAttributes: { pgt_dedup_key: { DataType: "String", StringValue: m.dedup_key } },
            })),
          }),
        );
      }
    }),
  );
  const secs = (performance.now() - t0) / 1000;
  const cpu = cpuPerMessage(c0);
  await admin.send(new DeleteQueueCommand({ QueueUrl: url }));
  const rate = Math.round(total / secs);
  if (report) console.log(`${"raw SendMessageBatch, same window".padEnd(36)} ${String(rate).padStart(7)} msg/s  (client CPU ${cpu} µs/msg)`);
  return rate;
}

// Warm-up: whatever runs first otherwise pays for JIT compilation of the SDK and of the sink.
await raw(false);
await measure("(warm-up) standard queue", false, {});
const std = await measure("standard queue", false, {});
await measure("FIFO, 7 groups ({customer})", true, { message_group_id: "{stream_table}-{customer}" });
await measure("FIFO, one group ({stream_table})", true, {});
const rawRate = await raw();
console.log(`standard-queue sink / raw client: ${((std / rawRate) * 100).toFixed(0)} %`);
admin.destroy();
