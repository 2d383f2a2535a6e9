/**
 * A test file's Kafka admin and producer and RabbitMQ channel, with the one-partition topics and
 * durable queues it makes for reverse sources; close() deletes them (and each topic's consumer
 * group `<topic>-group`).
 */
import amqp, { type Channel, type ChannelModel } from "amqplib";
import { Kafka, logLevel, type Admin, type Producer } from "kafkajs";
import { AMQP_URL, KAFKA_BROKERS } from "./servers.ts";

export class KafkaAndRabbit {
  admin!: Admin;
  private producer!: Producer;
  private conn!: ChannelModel;
  ch!: Channel;
  private readonly topics: string[] = [];
  private readonly queues: string[] = [];

  async open(): Promise<void> {
    const kafka = new Kafka({ brokers: KAFKA_BROKERS, logLevel: logLevel.NOTHING });
    this.admin = kafka.admin();
    await this.admin.connect();
    this.producer = kafka.producer();
    await this.producer.connect();
    this.conn = await amqp.connect(AMQP_URL);
    this.ch = await this.conn.createChannel();
  }

  /** A topic of one partition (offsets in publishing order) and the group name its source uses. */
  async topic(topic: string): Promise<{ topic: string; group: string }> {
    await this.admin.createTopics({ topics: [{ topic, numPartitions: 1 }], waitForLeaders: true });
    this.topics.push(topic);
    return { topic, group: `${topic}-group` };
  }

  async queue(queue: string): Promise<string> {
    await this.ch.assertQueue(queue, { durable: true });
    this.queues.push(queue);
    return queue;
  }

  /** One record per event: `{"id": …}` with the event id as its `pgt_dedup_key` header. */
  async sendKafka(topic: string, eventIds: string[]): Promise<void> {
    await this.producer.send({ topic, messages: eventIds.map((id) => ({ value: JSON.stringify({ id }), headers: { pgt_dedup_key: id } })) });
  }

  /** One message per event: `{"id": …}` with the event id as its message id. */
  sendRabbit(queue: string, eventIds: string[]): void {
    for (const id of eventIds) this.ch.sendToQueue(queue, Buffer.from(JSON.stringify({ id })), { messageId: id });
  }

  async close(): Promise<void> {
    await this.producer?.disconnect();
    if (this.admin) {
      if (this.topics.length) await this.admin.deleteTopics({ topics: this.topics }).catch(() => {});
      await this.admin.deleteGroups(this.topics.map((t) => `${t}-group`)).catch(() => {});
      await this.admin.disconnect();
    }
    if (this.ch) {
      for (const q of this.queues) await this.ch.deleteQueue(q).catch(() => {});
      await this.conn.close().catch(() => {});
    }
  }
}
