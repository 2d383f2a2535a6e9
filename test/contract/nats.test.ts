/**
 * NATS JetStream under the shared contract (suite.ts). JetStream deduplicates on `Nats-Msg-Id`
 * within the stream's duplicate window (2 minutes by default), so a replay adds nothing.
 */
import { connect, headers, type NatsConnection } from "nats";
import { NATS_URL, portOf } from "../helpers/servers.ts";
import { RUN, sinkContract, sourceContract, type Arrived } from "./suite.ts";

/** A connection to the real server (never through the proxy). */
const direct = () => connect({ servers: NATS_URL });

async function stored(nc: NatsConnection, stream: string): Promise<Arrived[]> {
  const jsm = await nc.jetstreamManager();
  const info = await jsm.streams.info(stream);
  const out: Arrived[] = [];
  // An empty stream reports first_seq 0, and message 0 does not exist.
  for (let seq = info.state.first_seq; info.state.messages > 0 && seq <= info.state.last_seq; seq++) {
    const m = await jsm.streams.getMessage(stream, { seq });
    out.push({ key: m.header.get("Nats-Msg-Id"), payload: JSON.parse(new TextDecoder().decode(m.data)).payload });
  }
  return out;
}

sinkContract({
  system: "nats",
  servers: ["nats"],
  serverPort: portOf(NATS_URL),
  dedups: true,
  ordered: true,
  hasSecret: true,
  // Over the server's max_payload (1 MiB): refused for good.
  poisonRow: { blob: "x".repeat(2 * 1024 * 1024) },
  async target(reach, secret) {
    const nc = await direct();
    const stream = `CONTRACT_${RUN}`;
    await (await nc.jetstreamManager()).streams.add({ name: stream, subjects: [`contract${RUN}.>`] });
    return {
      // The server has no authorization: it takes any user and password.
      config: { type: "nats", url: `nats://relay:${secret}@127.0.0.1:${reach.port}`, stream, subject_template: `contract${RUN}.{k}`, ack_timeout_ms: 1000 },
      arrived: () => stored(nc, stream),
      async cleanup() {
        await (await nc.jetstreamManager()).streams.delete(stream).catch(() => {});
        await nc.close();
      },
    };
  },
});

sourceContract({
  system: "nats",
  servers: ["nats"],
  serverPort: portOf(NATS_URL),
  hasSecret: true,
  async target(reach, secret) {
    const nc = await direct();
    const stream = `CONTRACT_IN_${RUN}`;
    const subject = `contractin${RUN}.events`;
    await (await nc.jetstreamManager()).streams.add({ name: stream, subjects: [subject] });
    const js = nc.jetstream();
    return {
      // A short ack wait: what a killed relay held unacknowledged comes back soon.
      config: { type: "nats", url: `nats://relay:${secret}@127.0.0.1:${reach.port}`, stream, subject, ack_wait_seconds: 2 },
      async publish(events) {
        for (const e of events) {
          const h = headers();
          h.set("Nats-Msg-Id", e.key);
          await js.publish(subject, new TextEncoder().encode(e.body), { headers: h });
        }
      },
      async pending() {
        const info = await (await nc.jetstreamManager()).consumers.info(stream, "pgtrickle-relay-contract_nats_in");
        return info.num_pending + info.num_ack_pending;
      },
      async cleanup() {
        await (await nc.jetstreamManager()).streams.delete(stream).catch(() => {});
        await nc.close();
      },
    };
  },
});
