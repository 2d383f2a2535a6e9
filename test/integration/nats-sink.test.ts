import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { createConsola } from "consola";
import { connect, type JetStreamManager, type NatsConnection, type StoredMsg } from "nats";
import * as v from "valibot";
import natsSink from "../../src/backends/nats/sink.ts";
import { defaultStreamSubjects, filterCovers, invalidSubject, NatsSinkConfig, subjectsOverlap, templatePattern } from "../../src/backends/nats/config.ts";
import type { Sink } from "../../src/backends/types.ts";
import { RelayError } from "../../src/errors.ts";
import { envelopeJson, type Message } from "../../src/message.ts";
import { backendContext, errorOf } from "../helpers/backend.ts";
import { forwardMessages } from "../helpers/messages.ts";
import { freePort, tcpProxy } from "../helpers/proxy.ts";
import { NATS_URL, requireServer, SERVER_ADDRESSES } from "../helpers/servers.ts";

const RUN = `${process.pid}_${Math.floor(Math.random() * 1e6)}`;
const ctx = backendContext("nats_sink_test", { log: createConsola({ level: 0 }), postgresUrl: "" });

let nc: NatsConnection;
let jsm: JetStreamManager;
const streams: string[] = [];
const sinks: Sink[] = [];

function sinkFor(options: Record<string, unknown>): Sink {
  const cfg = v.parse(NatsSinkConfig, { type: "nats", url: NATS_URL, ...options });
  const sink = natsSink.create(cfg, ctx);
  sinks.push(sink);
  return sink;
}

/** A stream of this run, removed afterwards. */
async function stream(label: string, subjects: string[], extra: { max_msg_size?: number } = {}): Promise<string> {
  const name = `RT_${label}_${RUN}`;
  await jsm.streams.add({ name, subjects, ...extra });
  streams.push(name);
  return name;
}

async function stored(name: string): Promise<StoredMsg[]> {
  const info = await jsm.streams.info(name);
  const out: StoredMsg[] = [];
  for (let seq = info.state.first_seq; seq <= info.state.last_seq && info.state.messages > 0; seq++) {
    out.push(await jsm.streams.getMessage(name, { seq }));
  }
  return out;
}

beforeAll(async () => {
  await requireServer("nats");
  nc = await connect({ servers: NATS_URL });
  jsm = await nc.jetstreamManager();
});

afterAll(async () => {
  for (const s of sinks) await s.close();
  for (const s of streams) await jsm.streams.delete(s).catch(() => {});
  await nc?.close();
});

describe("nats sink", () => {
  test("writes every message with envelope body, Nats-Msg-Id and full-refresh header; a replay adds nothing", async () => {
    const name = await stream("basic", [`rt${RUN}.basic.>`]);
    const sink = sinkFor({ subject_template: `rt${RUN}.basic.{stream_table}.{op}`, stream: name });
    await sink.start();
    const plain = forwardMessages(300, { outboxId: 1 });
    const refresh = forwardMessages(50, { outboxId: 2, full_refresh: true });
    const batch = [...plain, ...refresh];

    expect(await sink.write(batch)).toEqual([]);
    let msgs = await stored(name);
    expect(msgs.length).toBe(350);
    msgs.forEach((m, i) => {
      const sent = batch[i]!;
      expect(m.subject).toBe(`rt${RUN}.basic.orders.insert`);
      expect(new TextDecoder().decode(m.data)).toBe(envelopeJson(sent));
      expect(m.header.get("Nats-Msg-Id")).toBe(sent.dedup_key);
      expect(m.header.get("Pgtrickle-Full-Refresh")).toBe(sent.is_full_refresh ? "true" : "");
    });
    expect(Object.keys(JSON.parse(new TextDecoder().decode(msgs[0]!.data)))).toEqual([
      "dedup_key", "subject", "payload", "op", "is_full_refresh", "outbox_id", "refresh_id",
    ]);

    // The pipeline retries whole batches: JetStream's duplicate window must absorb the replay.
    expect(await sink.write(batch)).toEqual([]);
    expect(await sink.write(plain.slice(100, 200))).toEqual([]);
    msgs = await stored(name);
    expect(msgs.length).toBe(350);
  });

  test("uses message.subject when no subject_template is set, and `subject` as its alias", async () => {
    const name = await stream("alias", [`rt${RUN}.alias.>`]);
    const bySource = sinkFor({ stream: name });
    await bySource.start();
    const msgs = forwardMessages(5, { outboxId: 3 }).map((m) => ({ ...m, subject: `rt${RUN}.alias.from_source` }));
    expect(await bySource.write(msgs)).toEqual([]);

    const byAlias = sinkFor({ subject: `rt${RUN}.alias.{outbox_id}.{customer}`, stream: name });
    expect(byAlias.describe).toContain(`rt${RUN}.alias.{outbox_id}.{customer}`);
    await byAlias.start();
    expect(await byAlias.write(forwardMessages(3, { outboxId: 4 }))).toEqual([]);

    const subjects = (await stored(name)).map((m) => m.subject);
    expect(subjects).toEqual([
      ...Array(5).fill(`rt${RUN}.alias.from_source`),
      `rt${RUN}.alias.4.c0`,
      `rt${RUN}.alias.4.c1`,
      `rt${RUN}.alias.4.c2`,
    ]);
  });

  test("keeps batch order within each subject with many publishes in flight", async () => {
    const name = await stream("order", [`rt${RUN}.order.>`]);
    const sink = sinkFor({ subject_template: `rt${RUN}.order.{customer}`, stream: name, max_in_flight: 64 });
    await sink.start();
    const batch = forwardMessages(2000, { outboxId: 5 });
    expect(await sink.write(batch)).toEqual([]);
    const msgs = await stored(name);
    expect(msgs.length).toBe(2000);
    const lastIdBySubject = new Map<string, number>();
    for (const m of msgs) {
      const id = (JSON.parse(new TextDecoder().decode(m.data)).payload as { id: number }).id;
      expect(id).toBeGreaterThan(lastIdBySubject.get(m.subject) ?? -1);
      lastIdBySubject.set(m.subject, id);
    }
    expect(lastIdBySubject.size).toBe(7);
  });

  test("returns messages the server will never take as rejections and delivers the rest", async () => {
    const name = await stream("reject", [`rt${RUN}.reject.>`], { max_msg_size: 2048 });
    const sink = sinkFor({ subject_template: `rt${RUN}.reject.{customer}`, stream: name });
    await sink.start();
    const batch = forwardMessages(20, {
      outboxId: 6,
      payload: (i) =>
        i === 3
          ? { id: i, customer: "c3", blob: "x".repeat(5000) } // over the stream's max_msg_size
          : i === 7
            ? { id: i, customer: "has space", amount: 1 } // renders an illegal subject
            : i === 11
              ? { id: i, customer: "c11", blob: "y".repeat(1_200_000) } // over the server's max_payload
              : { id: i, customer: `c${i % 3}`, amount: i },
    });
    const rejections = await sink.write(batch);
    expect(rejections.map((r) => r.message.dedup_key).sort()).toEqual([batch[11]!, batch[3]!, batch[7]!].map((m) => m.dedup_key).sort());
    expect(rejections.find((r) => r.message === batch[3])!.error).toContain("max_msg_size");
    expect(rejections.find((r) => r.message === batch[7])!.error).toContain("whitespace");
    expect(rejections.find((r) => r.message === batch[11])!.error).toContain("max_payload");
    const msgs = await stored(name);
    expect(msgs.map((m) => m.header.get("Nats-Msg-Id"))).toEqual(
      batch.filter((_, i) => ![3, 7, 11].includes(i)).map((m) => m.dedup_key),
    );
  });

  test("start() refuses a missing or non-capturing stream with a config error, and creates it when told to", async () => {
    const missing = `RT_missing_${RUN}`;
    const e1 = await errorOf(sinkFor({ subject_template: `rt${RUN}.m.{op}`, stream: missing }).start());
    expect(e1.kind).toBe("config");
    expect(e1.message).toContain(`"${missing}"`);
    expect(e1.message).toContain("create_stream");

    const e2 = await errorOf(sinkFor({ subject_template: `rt${RUN}.nowhere.{stream_table}.{op}` }).start());
    expect(e2.kind).toBe("config");
    expect(e2.message).toContain(`rt${RUN}.nowhere.*.*`);

    const other = await stream("other", [`rt${RUN}.other.>`]);
    const e3 = await errorOf(sinkFor({ subject_template: `rt${RUN}.elsewhere.{op}`, stream: other }).start());
    expect(e3.kind).toBe("config");
    expect(e3.message).toContain(other);

    const created = `RT_created_${RUN}`;
    streams.push(created);
    const sink = sinkFor({ subject_template: `rt${RUN}.created.{stream_table}.{op}`, stream: created, create_stream: true, duplicate_window_seconds: 600 });
    await sink.start();
    const info = await jsm.streams.info(created);
    expect(info.config.subjects).toEqual([`rt${RUN}.created.>`]);
    expect(info.config.duplicate_window).toBe(600 * 1e9);
    expect(await sink.write(forwardMessages(10, { outboxId: 7 }))).toEqual([]);
    expect((await jsm.streams.info(created)).state.messages).toBe(10);
    // A second start finds the stream and leaves it alone.
    await sinkFor({ subject_template: `rt${RUN}.created.{stream_table}.{op}`, stream: created, create_stream: true }).start();
    expect((await jsm.streams.info(created)).config.duplicate_window).toBe(600 * 1e9);
  });

  test("a subject no stream captures fails the write as a config error (no responders)", async () => {
    const sink = sinkFor({});
    await sink.start(); // subjects come from the source: nothing to check yet
    const msgs = forwardMessages(3, { outboxId: 8 }).map((m) => ({ ...m, subject: `rt${RUN}.uncaptured.x` }));
    const err = await errorOf(sink.write(msgs));
    expect(err.kind).toBe("config");
    expect(err.message).toContain(`rt${RUN}.uncaptured.x`);
  });

  test("with `stream` set, a subject captured by another stream is a config error naming it", async () => {
    const mine = await stream("mine", [`rt${RUN}.mine.>`]);
    await stream("theirs", [`rt${RUN}.theirs.>`]);
    const sink = sinkFor({ stream: mine });
    await sink.start();
    const msgs = forwardMessages(2, { outboxId: 20 }).map((m) => ({ ...m, subject: `rt${RUN}.theirs.x` }));
    const err = await errorOf(sink.write(msgs));
    expect(err.kind).toBe("config");
    expect(err.message).toContain(mine);
    expect((await jsm.streams.info(mine)).state.messages).toBe(0);
  });

  test("an unreachable server is a transient error naming host:port and no secret", async () => {
    const port = await freePort();
    const sink = sinkFor({ url: `nats://alice:pw-s3cret-42@127.0.0.1:${port}`, token: "tok-s3cret-99" });
    expect(sink.describe).toContain(`127.0.0.1:${port}`);
    expect(sink.describe).not.toContain("s3cret");
    const err = await errorOf(sink.start());
    expect(err.kind).toBe("transient");
    expect(err.message).toContain(`127.0.0.1:${port}`);
    expect(err.message).not.toContain("s3cret");
    const err2 = await errorOf(sink.write(forwardMessages(1)));
    expect(err2.kind).toBe("transient");
    expect(err2.message).toContain(`127.0.0.1:${port}`);
  });

  test("after a lost connection writes fail as transient, then succeed without duplicates once it is back", async () => {
    const proxy = await tcpProxy(SERVER_ADDRESSES.nats.port);
    try {
      const name = await stream("reconnect", [`rt${RUN}.reconnect.>`]);
      const sink = sinkFor({ url: `nats://127.0.0.1:${proxy.port}`, subject_template: `rt${RUN}.reconnect.{op}`, stream: name, ack_timeout_ms: 500 });
      await sink.start();
      expect(await sink.write(forwardMessages(10, { outboxId: 9 }))).toEqual([]);

      await proxy.stop();
      const batch = forwardMessages(20, { outboxId: 10 });
      const err = await errorOf(sink.write(batch));
      expect(err.kind).toBe("transient");
      expect(err.message).toContain(`127.0.0.1:${proxy.port}`);

      await proxy.resume();
      // What the pipeline does: retry the batch with backoff until the client has reconnected.
      let rejections: unknown = null;
      for (let attempt = 0; attempt < 20 && rejections === null; attempt++) {
        rejections = await sink.write(batch).catch(async (e: RelayError) => {
          expect(e.kind).toBe("transient");
          await Bun.sleep(250);
          return null;
        });
      }
      expect(rejections).toEqual([]);
      expect((await jsm.streams.info(name)).state.messages).toBe(30);
    } finally {
      await proxy.stop();
    }
  });
});

describe("nats subject helpers", () => {
  test("template patterns, stream coverage and overlap", () => {
    expect(templatePattern("pgtrickle.{stream_table}.{op}")).toBe("pgtrickle.*.*");
    expect(templatePattern("a.x_{op}.b")).toBe("a.*.b");
    expect(defaultStreamSubjects("pgtrickle.{stream_table}.{op}")).toEqual(["pgtrickle.>"]);
    expect(defaultStreamSubjects("fixed.subject")).toEqual(["fixed.subject"]);
    expect(() => defaultStreamSubjects("{op}.x")).toThrow("stream_subjects");
    expect(filterCovers("pgtrickle.>", "pgtrickle.*.*")).toBe(true);
    expect(filterCovers("pgtrickle.*.*", "pgtrickle.*.*")).toBe(true);
    expect(filterCovers("pgtrickle.orders.*", "pgtrickle.*.*")).toBe(false);
    expect(filterCovers("pgtrickle.>", "pgtrickle")).toBe(false);
    expect(filterCovers("a.*", "a.b.c")).toBe(false);
    expect(subjectsOverlap("pgtrickle.orders.*", "pgtrickle.*.*")).toBe(true);
    expect(subjectsOverlap("pgtrickle.orders.*", "pgtrickle.*")).toBe(false);
    expect(subjectsOverlap("other.>", "pgtrickle.*.*")).toBe(false);
    expect(subjectsOverlap("a.>", "a")).toBe(false);
    expect(invalidSubject("a.b")).toBeNull();
    expect(invalidSubject("a..b")).toContain("empty token");
    expect(invalidSubject("a.b c")).toContain("whitespace");
    expect(invalidSubject("a.*")).toContain("wildcard");
  });
});
