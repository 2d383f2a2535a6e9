/**
 * RabbitMQ under the shared contract (suite.ts). RabbitMQ does not drop a replayed message: each
 * copy arrives with the same `message_id`, for consumers to deduplicate. The shared broker's one
 * user is guest/guest, so no config here holds a password of its own: a wrong password's error
 * is rabbitmq-sink.test.ts's.
 */
import amqp from "amqplib";
import { AMQP_URL, portOf } from "../helpers/servers.ts";
import { RUN, sinkContract, sourceContract, type Arrived } from "./suite.ts";

const urlAt = (port: number) => {
  const u = new URL(AMQP_URL);
  u.port = String(port);
  return u.toString();
};

sinkContract({
  system: "rabbitmq",
  servers: ["rabbitmq"],
  serverPort: portOf(AMQP_URL),
  dedups: false,
  ordered: true,
  hasSecret: false,
  // A routing key over AMQP's 255 bytes: refused for good.
  poisonRow: { k: "k".repeat(300) },
  async target(reach) {
    const conn = await amqp.connect(AMQP_URL);
    const ch = await conn.createChannel();
    const exchange = `contract-${RUN}`;
    await ch.assertExchange(exchange, "topic", { durable: true });
    await ch.assertQueue(exchange, { durable: false });
    await ch.bindQueue(exchange, exchange, "#");
    const got: Arrived[] = [];
    return {
      config: { type: "rabbitmq", url: urlAt(reach.port), exchange, routing_key_template: "contract.{k}" },
      // Reading a queue takes its messages: keep what came so far.
      async arrived() {
        for (let m = await ch.get(exchange, { noAck: true }); m; m = await ch.get(exchange, { noAck: true })) {
          got.push({ key: m.properties.messageId, payload: JSON.parse(m.content.toString()).payload });
        }
        return [...got];
      },
      async cleanup() {
        await ch.deleteQueue(exchange).catch(() => {});
        await ch.deleteExchange(exchange).catch(() => {});
        await conn.close().catch(() => {});
      },
    };
  },
});

sourceContract({
  system: "rabbitmq",
  servers: ["rabbitmq"],
  serverPort: portOf(AMQP_URL),
  hasSecret: false,
  async target(reach) {
    const conn = await amqp.connect(AMQP_URL);
    const ch = await conn.createConfirmChannel();
    const queue = `contract-in-${RUN}`;
    await ch.assertQueue(queue, { durable: true });
    return {
      // RabbitMQ pushes: a cut connection is found by the AMQP heartbeat.
      config: { type: "rabbitmq", url: urlAt(reach.port), queue, heartbeat_seconds: 2 },
      async publish(events) {
        for (const e of events) ch.sendToQueue(queue, Buffer.from(e.body), { persistent: true, messageId: e.key, contentType: "application/json" });
        await ch.waitForConfirms();
      },
      // With no relay connected, unacknowledged deliveries are back in the queue and counted.
      pending: async () => (await ch.checkQueue(queue)).messageCount,
      async cleanup() {
        await ch.deleteQueue(queue).catch(() => {});
        await conn.close().catch(() => {});
      },
    };
  },
});
