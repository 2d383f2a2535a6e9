import { existsSync } from "node:fs";
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

/** The broker's jars, fetched by scripts/services (the Kafka tools run from them). */
const KAFKA_LIB = new URL("../../.services/kafka/lib", import.meta.url).pathname;
const KAFKA_LOG_BATCHES = new URL("./KafkaLogBatches.java", import.meta.url).pathname;

async function runJava(args: string[], stdin?: string): Promise<string> {
  if (!existsSync(KAFKA_LIB)) throw new Error(`the Kafka jars are missing at ${KAFKA_LIB}: run scripts/services start kafka`);
  const proc = Bun.spawn(["java", "-Xmx256m", "-cp", `${KAFKA_LIB}/*`, ...args], {
    stdin: stdin === undefined ? "ignore" : new Blob([stdin]),
    stdout: "pipe",
    stderr: "pipe",
  });
  const [out, err, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  if (code !== 0) throw new Error(`java ${args[0]} exited ${code}: ${err.slice(-2000)}`);
  return out;
}

/**
 * Kafka's own console producer (kafka.tools.ConsoleProducer of the broker's distribution) writes
 * `lines`, one record each, with `codec`; a long linger puts them in one batch.
 */
export async function consoleProduce(brokers: string[], topic: string, codec: string, lines: string[]): Promise<void> {
  await runJava(
    [
      "kafka.tools.ConsoleProducer",
      "--bootstrap-server", brokers.join(","),
      "--topic", topic,
      "--compression-codec", codec,
      "--producer-property", "linger.ms=3000",
      "--producer-property", "batch.size=1048576",
      "--producer-property", "acks=all",
    ],
    lines.join("\n") + "\n",
  );
}

export interface StoredRecord {
  topic: string;
  partition: number;
  batchOffset: string;
  /** The batch's codec as the broker stored it: none, gzip, snappy, lz4, zstd. */
  codec: string;
  value: string;
}

/**
 * Every record of `topics` as the broker's log segments hold it (test/helpers/KafkaLogBatches.java):
 * in offset order within a partition, partitions in no particular order.
 */
export async function storedRecords(brokers: string[], topics: string[]): Promise<StoredRecord[]> {
  const out = await runJava([KAFKA_LOG_BATCHES, brokers.join(","), ...topics]);
  return out
    .split("\n")
    .filter((l) => l !== "")
    .map((l) => {
      const [topic, partition, batchOffset, codec, value] = l.split("\t") as [string, string, string, string, string];
      return { topic, partition: Number(partition), batchOffset, codec, value: Buffer.from(value, "base64").toString("utf8") };
    });
}
