/**
 * Kafka under the shared contract (suite.ts), through the broker's proxied listener (its
 * advertised address is the proxy's fixed port, test/helpers/servers.ts). Kafka does not drop a
 * replayed record: each copy arrives with the same key and `pgt_dedup_key` header, for consumers
 * (or log compaction) to deduplicate. SASL passwords: kafka-sasl.test.ts (that listener is not
 * behind a proxy).
 */
import { Kafka, logLevel, type Consumer } from "kafkajs";
import { createTopic, deleteTopic } from "../helpers/kafka.ts";
import { proxyGroup } from "../helpers/proxy.ts";
import { KAFKA_BROKERS, KAFKA_PROXIED_PORT } from "../helpers/servers.ts";
import { RUN, sinkContract, sourceContract, type Arrived } from "./suite.ts";

const kafka = new Kafka({ clientId: "contract-test", brokers: KAFKA_BROKERS, logLevel: logLevel.NOTHING });
const proxies = proxyGroup();

/** Every record of `topic` from its beginning, collected by one consumer for the whole run. */
async function collect(topic: string): Promise<{ consumer: Consumer; got: Arrived[] }> {
  const consumer = kafka.consumer({ groupId: `contract-reader-${RUN}` });
  const got: Arrived[] = [];
  await consumer.connect();
  await consumer.subscribe({ topics: [topic], fromBeginning: true });
  await consumer.run({
    eachMessage: async ({ message }) => {
      got.push({ key: String(message.headers?.pgt_dedup_key ?? ""), payload: JSON.parse(message.value!.toString()).payload });
    },
  });
  return { consumer, got };
}

sinkContract({
  system: "kafka",
  servers: ["kafka"],
  serverPort: KAFKA_PROXIED_PORT,
  startProxy: proxies.kafka,
  dedups: false,
  ordered: true,
  hasSecret: false,
  // Over the topic's max.message.bytes: refused for good.
  poisonRow: { blob: "x".repeat(200_000) },
  async target(reach) {
    const topic = `contract-${RUN}`;
    const admin = kafka.admin();
    await admin.connect();
    await admin.createTopics({ topics: [{ topic, numPartitions: 3, configEntries: [{ name: "max.message.bytes", value: "100000" }] }], waitForLeaders: true });
    await admin.disconnect();
    const { consumer, got } = await collect(topic);
    return {
      config: { type: "kafka", brokers: `127.0.0.1:${reach.port}`, topic, key_template: "{k}" },
      arrived: async () => [...got],
      async cleanup() {
        await consumer.disconnect();
        await deleteTopic(kafka, topic);
      },
    };
  },
});

sourceContract({
  system: "kafka",
  servers: ["kafka"],
  serverPort: KAFKA_PROXIED_PORT,
  startProxy: proxies.kafka,
  hasSecret: false,
  async target(reach) {
    const topic = `contract-in-${RUN}`;
    await createTopic(kafka, topic);
    const producer = kafka.producer();
    await producer.connect();
    const group = `contract-${RUN}`;
    return {
      // A short session: the group gives a killed relay's partitions away soon.
      config: { type: "kafka", brokers: `127.0.0.1:${reach.port}`, topic, group_id: group, session_timeout_ms: 6000, heartbeat_interval_ms: 1000, rebalance_timeout_ms: 8000 },
      async publish(events) {
        await producer.send({ topic, messages: events.map((e) => ({ value: e.body, headers: { pgt_dedup_key: e.key } })) });
      },
      // Records past the group's committed offsets, over every partition.
      async pending() {
        const admin = kafka.admin();
        await admin.connect();
        try {
          const high = await admin.fetchTopicOffsets(topic);
          const [committed] = await admin.fetchOffsets({ groupId: group, topics: [topic] });
          return high.reduce((n, p) => {
            const at = Number(committed!.partitions.find((c) => c.partition === p.partition)?.offset ?? "-1");
            return n + Number(p.high) - Math.max(at, Number(p.low));
          }, 0);
        } finally {
          await admin.disconnect();
        }
      },
      async cleanup() {
        await producer.disconnect();
        await deleteTopic(kafka, topic);
      },
    };
  },
});
