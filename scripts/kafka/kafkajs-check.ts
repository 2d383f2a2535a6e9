/**
 * Does kafkajs (the relay's Kafka client) work against a broker? Runs what the relay does:
 * admin calls, an idempotent acks=all producer, a consumer group that commits offsets.
 * Usage: bun scripts/kafka/kafkajs-check.ts 127.0.0.1:19092
 * Prints one line per step and exits non-zero on the first failure.
 */
import { Kafka, logLevel } from "kafkajs";

const broker = process.argv[2] ?? "127.0.0.1:9092";
const kafka = new Kafka({ clientId: "kafkajs-check", brokers: [broker], logLevel: logLevel.ERROR });
const tag = `kafkajs_check_${Date.now().toString(36)}`;
const topic = tag;

async function step<T>(name: string, fn: () => Promise<T>): Promise<T> {
  const t0 = performance.now();
  try {
    const result = await fn();
    console.log(`ok    ${name} (${Math.round(performance.now() - t0)} ms)`);
    return result;
  } catch (err) {
    const e = err as Error & { type?: string; code?: number };
    console.log(`FAIL  ${name}: ${e.name}: ${e.message}${e.type ? ` [${e.type}${e.code != null ? ` code ${e.code}` : ""}]` : ""}`);
    process.exit(1);
  }
}

const admin = kafka.admin();
await step("admin.connect", () => admin.connect());
// kafkajs negotiates each API's version (ApiVersions) on connect: the highest both sides know
const cluster = await step("admin.describeCluster", () => admin.describeCluster());
console.log(`      cluster ${cluster.clusterId}, controller ${cluster.controller}, brokers ${cluster.brokers.map((b) => `${b.host}:${b.port}`).join(",")}`);
await step("admin.createTopics (3 partitions)", () =>
  admin.createTopics({ topics: [{ topic, numPartitions: 3 }], waitForLeaders: true }),
);
await step("admin.listTopics", async () => {
  if (!(await admin.listTopics()).includes(topic)) throw new Error("topic missing from listTopics");
});
await step("admin.fetchTopicMetadata", () => admin.fetchTopicMetadata({ topics: [topic] }));

const producer = kafka.producer({ idempotent: true, maxInFlightRequests: 1 });
await step("producer.connect (idempotent)", () => producer.connect());
await step("producer.send 100 messages, acks=all", () =>
  producer.send({
    topic,
    acks: -1,
    messages: Array.from({ length: 100 }, (_, i) => ({ key: `k${i % 7}`, value: `v${i}`, headers: { n: String(i) } })),
  }),
);

const consumer = kafka.consumer({ groupId: tag, sessionTimeout: 10000, heartbeatInterval: 1000 });
await step("consumer.connect", () => consumer.connect());
await step("consumer.subscribe", () => consumer.subscribe({ topics: [topic], fromBeginning: true }));
await step("consumer group: join, fetch all 100, commit", () =>
  new Promise<void>((resolve, reject) => {
    let seen = 0;
    const timer = setTimeout(() => reject(new Error(`timed out after 30 s with ${seen}/100 messages`)), 30000);
    consumer.on(consumer.events.CRASH, (e) => {
      clearTimeout(timer);
      reject(e.payload.error);
    });
    consumer
      .run({
        autoCommit: true,
        eachMessage: async () => {
          seen += 1;
          if (seen === 100) {
            clearTimeout(timer);
            resolve();
          }
        },
      })
      .catch(reject);
  }),
);
await step("consumer.commitOffsets + disconnect", () => consumer.disconnect());
await step("admin.fetchOffsets (committed by the group)", async () => {
  const offsets = await admin.fetchOffsets({ groupId: tag, topics: [topic] });
  const total = offsets[0]!.partitions.reduce((n, p) => n + Number(p.offset), 0);
  if (total !== 100) throw new Error(`committed offsets add up to ${total}, expected 100`);
});
await step("admin.describeGroups", () => admin.describeGroups([tag]));

const txProducer = kafka.producer({ transactionalId: `${tag}_tx`, idempotent: true, maxInFlightRequests: 1 });
await step("transactional producer: connect, send, commit", async () => {
  await txProducer.connect();
  const tx = await txProducer.transaction();
  await tx.send({ topic, messages: [{ value: "in-tx" }] });
  await tx.commit();
  await txProducer.disconnect();
});

await step("producer.disconnect", () => producer.disconnect());
await step("admin.deleteTopics + deleteGroups", async () => {
  await admin.deleteGroups([tag]);
  await admin.deleteTopics({ topics: [topic] });
});
await admin.disconnect();
console.log(`kafkajs works against ${broker}`);
