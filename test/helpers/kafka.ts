import type { Kafka } from "kafkajs";

/**
 * The pgt_dedup_key header of every record of `topic` (duplicates kept), read from the
 * beginning by a consumer group of its own, once `expected` records arrived or `timeoutMs` passed.
 */
export async function topicDedupKeys(client: Kafka, topic: string, expected: number, groupPrefix: string, timeoutMs = 20_000): Promise<string[]> {
  const consumer = client.consumer({ groupId: `${groupPrefix}-${Math.random().toString(36).slice(2)}` });
  const keys: string[] = [];
  await consumer.connect();
  try {
    await consumer.subscribe({ topics: [topic], fromBeginning: true });
    const done = Promise.withResolvers<void>();
    await consumer.run({
      eachMessage: async ({ message }) => {
        keys.push(String(message.headers?.pgt_dedup_key ?? ""));
        if (keys.length >= expected) done.resolve();
      },
    });
    await Promise.race([done.promise, Bun.sleep(timeoutMs)]);
    await Bun.sleep(300); // anything beyond `expected` (replays) arrives too
  } finally {
    await consumer.disconnect();
  }
  return keys;
}

/** A topic of one partition, created before the test's relay starts. */
export async function createTopic(client: Kafka, topic: string): Promise<void> {
  const admin = client.admin();
  await admin.connect();
  try {
    await admin.createTopics({ topics: [{ topic, numPartitions: 1 }], waitForLeaders: true });
  } finally {
    await admin.disconnect();
  }
}

/** Removes a test's topic, best effort (cleanup). */
export async function deleteTopic(client: Kafka, topic: string): Promise<void> {
  const admin = client.admin();
  await admin.connect().then(() => admin.deleteTopics({ topics: [topic] })).catch(() => {});
  await admin.disconnect().catch(() => {});
}
