/**
 * Amazon SQS (the fauxqs emulator) under the shared contract (suite.ts). The sink writes a FIFO
 * queue, which drops a message whose deduplication id (the dedup key) it saw within 5 minutes: a
 * replay adds nothing. A standard queue keeps every copy (sqs-sink.test.ts). The emulator takes
 * any credentials, so the secret access key is the contract's password.
 */
import { CreateQueueCommand, DeleteMessageBatchCommand, DeleteQueueCommand, GetQueueAttributesCommand, ReceiveMessageCommand, SendMessageBatchCommand, SQSClient } from "@aws-sdk/client-sqs";
import { AWS_ENV, portOf, SQS_CLIENT_CONFIG, SQS_ENDPOINT } from "../helpers/servers.ts";
import { RUN, sinkContract, sourceContract, type Arrived } from "./suite.ts";

const sqs = new SQSClient(SQS_CLIENT_CONFIG);
const credentials = (port: number, secret: string) => ({ endpoint: `http://127.0.0.1:${port}`, region: "us-east-1", access_key_id: "contract", secret_access_key: secret });

sinkContract({
  system: "sqs",
  servers: ["sqs"],
  serverPort: portOf(SQS_ENDPOINT),
  dedups: true,
  ordered: true,
  hasSecret: true,
  env: AWS_ENV,
  // Over the queue's 1 MiB limit: refused for good.
  poisonRow: { blob: "x".repeat(2 * 1024 * 1024) },
  async target(reach, secret) {
    const queueUrl = (await sqs.send(new CreateQueueCommand({ QueueName: `contract-${RUN}.fifo`, Attributes: { FifoQueue: "true" } }))).QueueUrl!;
    const got: Arrived[] = [];
    return {
      config: { type: "sqs", queue_url: queueUrl, message_group_id: "{k}", timeout_ms: 2000, ...credentials(reach.port, secret) },
      // Messages are deleted once received (a FIFO group hands out no more while one is in
      // flight): keep what came so far.
      async arrived() {
        for (;;) {
          const r = await sqs.send(new ReceiveMessageCommand({ QueueUrl: queueUrl, MaxNumberOfMessages: 10, WaitTimeSeconds: 0, VisibilityTimeout: 600 }));
          if (!r.Messages?.length) return [...got];
          for (const m of r.Messages) {
            const envelope = JSON.parse(m.Body!);
            got.push({ key: envelope.dedup_key, payload: envelope.payload });
          }
          const entries = r.Messages.map((m, i) => ({ Id: String(i), ReceiptHandle: m.ReceiptHandle! }));
          await sqs.send(new DeleteMessageBatchCommand({ QueueUrl: queueUrl, Entries: entries }));
        }
      },
      async cleanup() {
        await sqs.send(new DeleteQueueCommand({ QueueUrl: queueUrl })).catch(() => {});
      },
    };
  },
});

sourceContract({
  system: "sqs",
  servers: ["sqs"],
  serverPort: portOf(SQS_ENDPOINT),
  hasSecret: true,
  env: AWS_ENV,
  async target(reach, secret) {
    const queueUrl = (await sqs.send(new CreateQueueCommand({ QueueName: `contract-in-${RUN}` }))).QueueUrl!;
    return {
      // Short polls and visibility: a killed relay's messages come back after 2 s.
      config: { type: "sqs", queue_url: queueUrl, wait_time_seconds: 2, visibility_timeout: 2, ...credentials(reach.port, secret) },
      async publish(events) {
        for (let i = 0; i < events.length; i += 10) {
          const entries = events.slice(i, i + 10).map((e, j) => ({
            Id: String(j),
            MessageBody: e.body,
            MessageAttributes: { pgt_dedup_key: { DataType: "String", StringValue: e.key } },
          }));
          await sqs.send(new SendMessageBatchCommand({ QueueUrl: queueUrl, Entries: entries }));
        }
      },
      // Visible plus in-flight messages: 0 once every one was deleted.
      async pending() {
        const names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"] as const;
        const out = await sqs.send(new GetQueueAttributesCommand({ QueueUrl: queueUrl, AttributeNames: [...names] }));
        return names.reduce((n, a) => n + Number(out.Attributes![a]), 0);
      },
      async cleanup() {
        await sqs.send(new DeleteQueueCommand({ QueueUrl: queueUrl })).catch(() => {});
      },
    };
  },
});
