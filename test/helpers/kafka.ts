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
