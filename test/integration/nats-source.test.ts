// Section numbers (§…) in test names refer to docs/interface.md.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { createConsola } from "consola";
import { AckPolicy, connect, headers as natsHeaders, nanos, type JetStreamClient, type JetStreamManager, type NatsConnection } from "nats";
import * as v from "valibot";
import natsSink from "../../src/backends/nats/sink.ts";
import natsSource from "../../src/backends/nats/source.ts";
import { NatsSinkConfig, NatsSourceConfig } from "../../src/backends/nats/config.ts";
import type { Batch, BackendContext, Source } from "../../src/backends/types.ts";
import { envelopeJson } from "../../src/message.ts";
import { backendContext, errorOf } from "../helpers/backend.ts";
import { forwardMessages } from "../helpers/messages.ts";
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { freePort, freezingProxy, tcpProxy } from "../helpers/proxy.ts";
import { eventually, RunningRelay } from "../helpers/relay.ts";
import { drainPipeline, inboxCount, inboxRows, setRelayInbox } from "../helpers/reverse.ts";
import { expectPoisonIsolated, poisonedStream } from "../helpers/poison.ts";
import { NATS_URL, requireServer, SERVER_ADDRESSES } from "../helpers/servers.ts";

const RUN = `${process.pid}_${Math.floor(Math.random() * 1e6)}`;
const TRACE = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACEPARENT = `00-${TRACE}-00f067aa0ba902b7-01`;
const enc = new TextEncoder();

let db: TestDatabase;
let nc: NatsConnection;
let js: JetStreamClient;
let jsm: JetStreamManager;
const streams: string[] = [];
const sources: Source[] = [];

beforeAll(async () => {
  await requireServer("nats");
  await requireServer("postgres");
  db = await testDatabase("nats_source");
  nc = await connect({ servers: NATS_URL });
  js = nc.jetstream();
  jsm = await nc.jetstreamManager();
});

afterAll(async () => {
  for (const s of sources) await s.close();
  for (const s of streams) await jsm?.streams.delete(s).catch(() => {});
  await nc?.close();
  await db?.drop();
});

/** A stream of this run capturing `rs<RUN>.<label>.>`, removed afterwards. */
async function stream(label: string, extra: { duplicate_window?: number } = {}): Promise<{ name: string; prefix: string }> {
  const name = `RS_${label}_${RUN}`;
  const prefix = `rs${RUN}.${label}`;
  await jsm.streams.add({ name, subjects: [`${prefix}.>`], ...extra });
  streams.push(name);
  return { name, prefix };
}

async function publish(subject: string, body: string | Uint8Array, hdrs: Record<string, string> = {}, msgID?: string): Promise<number> {
  const h = natsHeaders();
  for (const [k, value] of Object.entries(hdrs)) h.set(k, value);
  const ack = await js.publish(subject, typeof body === "string" ? enc.encode(body) : body, { headers: h, ...(msgID ? { msgID } : {}) });
  return ack.seq;
}

async function pipeline(name: string, inbox: string, source: Record<string, unknown>, database: TestDatabase = db): Promise<void> {
  await setRelayInbox(database, name, inbox, { type: "nats", url: NATS_URL, ...source });
}

const drain = (name: string, extra: string[] = [], database: TestDatabase = db) => drainPipeline(database, name, extra);

async function consumerState(streamName: string, durable: string) {
  const info = await jsm.consumers.info(streamName, durable);
  return { pending: info.num_pending, unacked: info.num_ack_pending, redelivered: info.num_redelivered };
}

function ctxFor(pipelineName: string, drainMode: boolean): BackendContext {
  return backendContext(pipelineName, { direction: "reverse", log: createConsola({ level: 0 }), sql: db.sql, postgresUrl: db.url, drain: drainMode });
}

function sourceFor(options: Record<string, unknown>, drainMode = true, name = `direct_${RUN}`): Source {
  const cfg = v.parse(NatsSourceConfig, { type: "nats", url: NATS_URL, ...options });
  const source = natsSource.create(cfg, ctxFor(name, drainMode));
  sources.push(source);
  return source;
}

/** Takes batches until `n` messages (or dead letters) arrived, without acknowledging them. */
async function take(it: AsyncIterator<Batch>, n: number): Promise<Batch[]> {
  const out: Batch[] = [];
  let got = 0;
  while (got < n) {
    const r = await it.next();
    if (r.done) break;
    out.push(r.value);
    got += r.value.messages.length + r.value.deadLetters.length;
  }
  return out;
}

describe("nats source → inbox (set_relay_inbox, drain)", () => {
  test("every message lands once with the §6.6 columns; redelivery to a recreated consumer and a producer retry add nothing", async () => {
    const { name, prefix } = await stream("basic", { duplicate_window: nanos(1000) });
    const seqs: number[] = [];
    // Producer-keyed events with body event types, aggregates and trace context.
    for (let i = 0; i < 100; i++) {
      seqs.push(
        await publish(`${prefix}.orders`, JSON.stringify({ event_type: "order.created", aggregate_id: `ord-${i}`, amount: i }), i % 2 === 0 ? { traceparent: TRACEPARENT } : {}, `order-${i}`),
      );
    }
    // No producer key: the key comes from the stream sequence, the event type from the subject.
    for (let i = 0; i < 100; i++) seqs.push(await publish(`${prefix}.payments.p${i % 3}`, JSON.stringify({ n: i, source: i === 0 ? "billing" : undefined })));
    // Not JSON, and not even UTF-8: stored, never null.
    const textSeq = await publish(`${prefix}.raw`, "plain text, not json");
    const binSeq = await publish(`${prefix}.raw`, new Uint8Array([0xff, 0xfe, 0x00, 0x41]));

    await pipeline("nats_basic", "nats_basic_inbox", { subject: `${prefix}.>`, batch_size: 64, event_type: "unused.because.subject" });
    const r = await drain("nats_basic");
    expect(r.stderr).toContain("drained, 202 delivered, 0 dead-lettered");
    expect(r.exitCode).toBe(0);

    const all = await inboxRows(db, "nats_basic_inbox");
    expect(all.length).toBe(202);
    const byId = Object.fromEntries(all.map((row) => [row.event_id, row]));
    expect(byId["order-0"]).toEqual({
      event_id: "order-0",
      event_type: "order.created",
      source: `nats:${prefix}.orders`,
      aggregate_id: "ord-0",
      payload: { event_type: "order.created", aggregate_id: "ord-0", amount: 0 },
      trace_id: TRACE,
    });
    expect(byId["order-1"]!.trace_id).toBeNull();
    expect(byId[`nats:${name}:${seqs[100]}`]).toEqual({
      event_id: `nats:${name}:${seqs[100]}`,
      event_type: `${prefix}.payments.p0`,
      source: "billing",
      aggregate_id: null,
      payload: { n: 0, source: "billing" },
      trace_id: null,
    });
    expect(byId[`nats:${name}:${seqs[104]}`]).toMatchObject({ event_type: `${prefix}.payments.p1`, source: `nats:${prefix}.payments.p1`, payload: { n: 4 } });
    expect(byId[`nats:${name}:${textSeq}`]!.payload).toBe("plain text, not json");
    expect(byId[`nats:${name}:${binSeq}`]!.payload).toEqual({ base64: Buffer.from([0xff, 0xfe, 0x00, 0x41]).toString("base64") });

    // The consumer is durable, named after the pipeline, and has nothing left.
    const durable = "pgtrickle-relay-nats_basic";
    expect(await consumerState(name, durable)).toMatchObject({ pending: 0, unacked: 0 });
    expect((await drain("nats_basic")).stderr).toContain("drained, 0 delivered");

    // Redelivery: a consumer created anew hands out the whole stream again; the keys are the same.
    await jsm.consumers.delete(name, durable);
    const again = await drain("nats_basic");
    expect(again.stderr).toContain("drained, 202 delivered");
    expect(await inboxRows(db, "nats_basic_inbox")).toEqual(all);

    // Producer retry after the stream's duplicate window: the stream stores them again, the inbox not.
    await Bun.sleep(1100);
    for (let i = 0; i < 50; i++) await publish(`${prefix}.orders`, JSON.stringify({ event_type: "order.created", aggregate_id: `ord-${i}`, amount: i }), {}, `order-${i}`);
    expect((await jsm.streams.info(name)).state.messages).toBe(252);
    const retry = await drain("nats_basic");
    expect(retry.stderr).toContain("drained, 50 delivered");
    expect(await inboxCount(db, "nats_basic_inbox")).toBe(202);
    expect(await consumerState(name, durable)).toMatchObject({ pending: 0, unacked: 0 });
  }, 60_000);

  test("what this relay's nats sink published comes back with its original dedup keys", async () => {
    const { name, prefix } = await stream("roundtrip");
    const sink = natsSink.create(v.parse(NatsSinkConfig, { type: "nats", url: NATS_URL, subject_template: `${prefix}.{stream_table}.{op}`, stream: name }), {
      ...ctxFor("forward_leg", false),
      direction: "forward",
    });
    await sink.start();
    const sent = forwardMessages(30, { outboxId: 7 });
    expect(await sink.write(sent)).toEqual([]);
    // A forward replay is absorbed by the stream; the reverse leg sees each message once.
    expect(await sink.write(sent.slice(0, 10))).toEqual([]);
    await sink.close();

    await pipeline("nats_roundtrip", "nats_roundtrip_inbox", { subject: `${prefix}.>`, stream: name, durable_name: `rt_${RUN}` });
    expect((await drain("nats_roundtrip")).exitCode).toBe(0);
    const got = await inboxRows(db, "nats_roundtrip_inbox");
    expect(got.map((row) => row.event_id).sort()).toEqual(sent.map((m) => m.dedup_key).sort());
    const first = got.find((row) => row.event_id === sent[0]!.dedup_key)!;
    expect(first.event_type).toBe(`${prefix}.orders.insert`);
    expect(first.payload).toEqual(JSON.parse(envelopeJson(sent[0]!)));
    expect(await consumerState(name, `rt_${RUN}`)).toMatchObject({ pending: 0, unacked: 0 });
  }, 30_000);

  test("poison messages between valid ones (nested 30,000 deep, a lone surrogate, NUL) are dead-lettered and acked; every valid one lands", async () => {
    const { name, prefix } = await stream("poisonany");
    const { bodies, valid } = poisonedStream();
    for (const body of bodies) await publish(`${prefix}.e`, body);
    await pipeline("nats_poison_any", "nats_poison_any_inbox", { subject: `${prefix}.>`, batch_size: 100 });
    const r = await drain("nats_poison_any", ["--allow-dead-letters"]);
    expect(r.exitCode).toBe(0);
    await expectPoisonIsolated(db, "nats_poison_any", "nats_poison_any_inbox", valid);
    expect(await consumerState(name, "pgtrickle-relay-nats_poison_any")).toMatchObject({ pending: 0, unacked: 0 });
  }, 60_000);

  test("a poison message goes to relay_dead_letters and is acked while the others land", async () => {
    const { name, prefix } = await stream("poison");
    // The inbox refuses negative amounts: that row, and only that row, can never be written.
    await db.sql`SELECT pgtrickle.create_inbox('nats_poison_inbox')`;
    await db.sql`ALTER TABLE pgtrickle.nats_poison_inbox ADD CHECK ((payload->>'amount')::numeric >= 0)`;
    const seqs: number[] = [];
    for (let i = 0; i < 10; i++) seqs.push(await publish(`${prefix}.e`, JSON.stringify({ i, amount: i === 4 ? -1 : i })));
    await pipeline("nats_poison", "nats_poison_inbox", { subject: `${prefix}.>`, batch_size: 100 });
    const r = await drain("nats_poison", ["--allow-dead-letters"]);
    expect(r.stderr).toContain("drained, 9 delivered, 1 dead-lettered");
    expect(r.exitCode).toBe(0);
    expect(await inboxCount(db, "nats_poison_inbox")).toBe(9);
    const dl = await db.sql`SELECT dedup_key, error_kind, error FROM pgtrickle.relay_dead_letters WHERE pipeline = 'nats_poison'`;
    expect(dl.length).toBe(1);
    expect(dl[0]).toMatchObject({ dedup_key: `nats:${name}:${seqs[4]}`, error_kind: "inbox_permanent" });
    expect(await consumerState(name, "pgtrickle-relay-nats_poison")).toMatchObject({ pending: 0, unacked: 0 });
    expect((await drain("nats_poison")).stderr).toContain("drained, 0 delivered, 0 dead-lettered");
  }, 30_000);

  test("kill -9 between the inbox commit and the broker ack, then a restart: every row once, nothing pending or unacked", async () => {
    const own = await testDatabase("nats_source_kill");
    const proxy = await freezingProxy(SERVER_ADDRESSES.nats.port, (chunk) => chunk.includes("+ACK"));
    try {
      const { name, prefix } = await stream("kill");
      for (let i = 0; i < 300; i++) await publish(`${prefix}.e`, JSON.stringify({ i }), {}, `kill-${i}`);
      const source = { subject: `${prefix}.>`, batch_size: 100, ack_wait_seconds: 2 };
      await pipeline("nats_kill", "nats_kill_inbox", { ...source, url: `nats://127.0.0.1:${proxy.port}` }, own);
      const relay = new RunningRelay(["--postgres-url", own.url, "--metrics-addr", "127.0.0.1:0"]);
      try {
        // The first batch commits; its acknowledgements never reach the server. Batches read
        // ahead of it (docs/PIPELINE.md) may be in the inbox too: none of them is acknowledged either.
        await eventually(async () => proxy.frozen && (await inboxCount(own, "nats_kill_inbox").catch(() => 0)) >= 100, 20_000, "the first batch in the inbox");
        const committed = await inboxCount(own, "nats_kill_inbox");
        const state = await consumerState(name, "pgtrickle-relay-nats_kill");
        expect(state.unacked).toBeGreaterThanOrEqual(committed);
      } finally {
        await relay.stop("SIGKILL");
      }
      await pipeline("nats_kill", "nats_kill_inbox", source, own);
      const r = await drain("nats_kill", [], own);
      // The 100 committed-but-unacked messages come back after their ack wait and are absorbed.
      expect(r.stderr).toContain("drained, 300 delivered");
      expect(r.exitCode).toBe(0);
      expect(await inboxCount(own, "nats_kill_inbox")).toBe(300);
      expect(await consumerState(name, "pgtrickle-relay-nats_kill")).toMatchObject({ pending: 0, unacked: 0 });
    } finally {
      await proxy.stop();
      await own.drop();
    }
  }, 60_000);

  test("an unreachable broker: the pipeline is degraded, the error names host:port and no secret", async () => {
    const port = await freePort();
    await pipeline("nats_down", "nats_down_inbox", { url: `nats://alice:pw-s3cret-42@127.0.0.1:${port}`, subject: `rs${RUN}.down.>` });
    const r = await drain("nats_down", ["--timeout", "3"]);
    expect(r.exitCode).toBe(1);
    expect(r.stderr).toContain("degraded");
    expect(r.stderr).toContain(`127.0.0.1:${port}`);
    expect(r.stderr).not.toContain("s3cret");
  }, 30_000);

  test("a missing stream is a config error naming the subject; nothing is created unless create_stream", async () => {
    await pipeline("nats_nostream", "nats_nostream_inbox", { subject: `rs${RUN}.nowhere.>` });
    const r = await drain("nats_nostream");
    expect(r.exitCode).toBe(1);
    expect(r.stderr).toContain(`rs${RUN}.nowhere.>`);
    expect(r.stderr).toContain("create_stream");
    const names: string[] = [];
    for await (const n of jsm.streams.names(`rs${RUN}.nowhere.>`)) names.push(n);
    expect(names).toEqual([]);
  }, 30_000);
});

describe("nats source (direct)", () => {
  test("creates the stream only with create_stream, and the durable pull consumer with the configured settings", async () => {
    const streamName = `RS_created_${RUN}`;
    const prefix = `rs${RUN}.created`;
    const missing = await errorOf(sourceFor({ subject: `${prefix}.>`, stream: streamName }).start());
    expect(missing.kind).toBe("config");
    expect(missing.message).toContain(streamName);

    streams.push(streamName);
    const src = sourceFor({ subject: `${prefix}.>`, stream: streamName, create_stream: true, consumer: `c_${RUN}`, ack_wait_seconds: 7, max_deliver: 3, deliver_policy: "new" });
    await src.start();
    expect((await jsm.streams.info(streamName)).config.subjects).toEqual([`${prefix}.>`]);
    const info = await jsm.consumers.info(streamName, `c_${RUN}`);
    expect(info.config).toMatchObject({ durable_name: `c_${RUN}`, ack_policy: AckPolicy.Explicit, ack_wait: nanos(7000), max_deliver: 3, filter_subject: `${prefix}.>`, deliver_policy: "new" });
    expect(info.config.deliver_subject).toBeUndefined();

    // A restart with other settings updates what can be updated, keeps the position.
    await sourceFor({ subject: `${prefix}.a`, stream: streamName, durable_name: `c_${RUN}`, ack_wait_seconds: 9, max_deliver: -1 }).start();
    expect((await jsm.consumers.info(streamName, `c_${RUN}`)).config).toMatchObject({ ack_wait: nanos(9000), max_deliver: -1, filter_subject: `${prefix}.a`, deliver_policy: "new" });

    // A push consumer under the same name is refused, not silently taken over.
    await jsm.consumers.add(streamName, { durable_name: `push_${RUN}`, ack_policy: AckPolicy.Explicit, deliver_subject: `deliver.${RUN}` });
    const push = await errorOf(sourceFor({ subject: `${prefix}.>`, stream: streamName, durable_name: `push_${RUN}` }).start());
    expect(push.kind).toBe("config");
    expect(push.message).toContain("push consumer");
  });

  test("options: subject is required, by_start_time needs opt_start_time, durable names are checked", () => {
    expect(v.safeParse(NatsSourceConfig, { url: NATS_URL }).success).toBe(false);
    expect(v.safeParse(NatsSourceConfig, { url: NATS_URL, subject: "a.>", deliver_policy: "by_start_time" }).success).toBe(false);
    expect(v.safeParse(NatsSourceConfig, { url: NATS_URL, subject: "a.>", create_stream: true }).success).toBe(false);
    expect(v.safeParse(NatsSourceConfig, { url: NATS_URL, subject: "a.>", max_deliver: 0 }).success).toBe(false);
    const ok = v.parse(NatsSourceConfig, { url: NATS_URL, subject: "a.>", consumer: "x" });
    expect(ok).toMatchObject({ durable_name: "x", deliver_policy: "all", ack_wait_seconds: 30, max_deliver: 5, batch_size: 100, create_stream: false });
    expect(() => sourceFor({ subject: "a.>", durable_name: "has.dot" })).toThrow("durable_name");
    expect(sourceFor({ subject: "a.>" }, true, "my pipeline.v2").describe).toContain("pgtrickle-relay-my_pipeline_v2");
  });

  test("lag(): pending plus unacknowledged messages of the consumer, read without consuming; 0 once drained", async () => {
    const { prefix } = await stream("lag");
    const src = sourceFor({ subject: `${prefix}.>`, durable_name: `lag_${RUN}`, batch_size: 10 }, true, `lag_${RUN}`);
    expect(await src.lag!()).toBeNull(); // not started: nothing known yet
    for (let i = 0; i < 25; i++) await publish(`${prefix}.e`, JSON.stringify({ i }));
    await src.start();
    expect(await src.lag!()).toEqual({ rows: 25, seconds: 0 });
    expect(await src.lag!()).toEqual({ rows: 25, seconds: 0 }); // asking again consumed nothing
    expect(await consumerState(`RS_lag_${RUN}`, `lag_${RUN}`)).toMatchObject({ pending: 25, unacked: 0 });
    const it = src.batches(new AbortController().signal)[Symbol.asyncIterator]();
    const [b1] = await take(it, 10);
    expect(await src.lag!()).toEqual({ rows: 25, seconds: 0 }); // a batch in hand counts until its ack
    await b1!.ack();
    expect((await src.lag!())!.rows).toBe(15);
    for (let r = await it.next(); !r.done; r = await it.next()) await r.value.ack();
    expect(await src.lag!()).toEqual({ rows: 0, seconds: 0 });
  });

  test("batches hold at most batch_size; release() hands them back at once; the last delivery is dead-lettered instead", async () => {
    const { name, prefix } = await stream("release");
    for (let i = 0; i < 25; i++) await publish(`${prefix}.e`, JSON.stringify({ i }), {}, `rel-${i}`);
    const durable = `rel_${RUN}`;
    const src = sourceFor({ subject: `${prefix}.>`, durable_name: durable, batch_size: 10, max_deliver: 2 }, true, `release_${RUN}`);
    await src.start();
    const it = src.batches(new AbortController().signal)[Symbol.asyncIterator]();
    const [b1] = await take(it, 10);
    expect(b1!.messages.map((m) => m.dedup_key)).toEqual(Array.from({ length: 10 }, (_, i) => `rel-${i}`));
    await b1!.release!();
    // Handed back with a nak: the same ten come again, now on their second (last) delivery.
    const [b2] = await take(it, 10);
    expect(b2!.messages.map((m) => m.dedup_key)).toEqual(b1!.messages.map((m) => m.dedup_key));
    await b2!.release!();
    const letters = await db.sql`SELECT dedup_key, error_kind, error FROM pgtrickle.relay_dead_letters WHERE pipeline = ${`release_${RUN}`} ORDER BY dedup_key`;
    expect(letters.map((l) => l.dedup_key)).toEqual(b1!.messages.map((m) => m.dedup_key).sort());
    expect(letters[0]!.error_kind).toBe("inbox_permanent");
    expect(letters[0]!.error).toContain("max_deliver");
    // The rest flows on; nothing is left pending or unacknowledged.
    const rest = await take(it, 15);
    expect(rest.map((b) => b.messages.length)).toEqual([10, 5]);
    for (const b of rest) await b.ack();
    expect((await it.next()).done).toBe(true);
    expect(await consumerState(name, durable)).toMatchObject({ pending: 0, unacked: 0 });
  });

  test("a batch held longer than ack_wait is kept alive and not redelivered", async () => {
    const { name, prefix } = await stream("slow");
    for (let i = 0; i < 5; i++) await publish(`${prefix}.e`, JSON.stringify({ i }));
    const durable = `slow_${RUN}`;
    const src = sourceFor({ subject: `${prefix}.>`, durable_name: durable, ack_wait_seconds: 1 });
    const it = src.batches(new AbortController().signal)[Symbol.asyncIterator]();
    const [batch] = await take(it, 5);
    // While the inbox write is slow, a competing pull on the same consumer would get whatever the
    // server considers abandoned.
    const stolen: number[] = [];
    for await (const m of js.fetch(name, durable, { batch: 5, expires: 2600 })) stolen.push(m.seq);
    expect(stolen).toEqual([]);
    expect(await consumerState(name, durable)).toMatchObject({ unacked: 5, redelivered: 0 });
    await batch!.ack();
    expect((await it.next()).done).toBe(true);
    expect(await consumerState(name, durable)).toMatchObject({ pending: 0, unacked: 0, redelivered: 0 });
  }, 20_000);

  test("run mode: an idle fetch waits for new messages, and aborting ends the iteration promptly", async () => {
    const { prefix } = await stream("idle");
    const src = sourceFor({ subject: `${prefix}.>`, durable_name: `idle_${RUN}` }, false);
    const stop = new AbortController();
    const it = src.batches(stop.signal)[Symbol.asyncIterator]();
    const next = it.next();
    await Bun.sleep(300);
    await publish(`${prefix}.e`, "{}", {}, "late-1");
    const r = await next;
    expect((r.value as Batch).messages.map((m) => m.dedup_key)).toEqual(["late-1"]);
    await (r.value as Batch).ack();
    const pending = it.next();
    await Bun.sleep(100);
    stop.abort();
    expect((await pending).done).toBe(true);
  });

  test("a lost connection fails the iteration as transient naming host:port; a new one resumes without loss", async () => {
    const proxy = await tcpProxy(SERVER_ADDRESSES.nats.port);
    try {
      const { name, prefix } = await stream("reconnect");
      for (let i = 0; i < 20; i++) await publish(`${prefix}.e`, JSON.stringify({ i }), {}, `rc-${i}`);
      const durable = `rc_${RUN}`;
      const src = sourceFor({ url: `nats://127.0.0.1:${proxy.port}`, subject: `${prefix}.>`, durable_name: durable, batch_size: 10, request_timeout_ms: 500 });
      const it1 = src.batches(new AbortController().signal)[Symbol.asyncIterator]();
      const [b1] = await take(it1, 10);
      await b1!.ack();
      const [b2] = await take(it1, 10);
      await proxy.stop();
      const ackErr = await errorOf(b2!.ack());
      expect(ackErr.kind).toBe("transient");
      expect(ackErr.message).toContain(`127.0.0.1:${proxy.port}`);
      const iterErr = await errorOf(it1.next());
      expect(iterErr.kind).toBe("transient");
      expect(iterErr.message).toContain(`127.0.0.1:${proxy.port}`);
      await proxy.resume();
      // What the pipeline does: retry the acknowledgement once the client is back.
      await eventually(async () => b2!.ack().then(() => true, () => false), 20_000, "the ack after reconnecting");
      let it2: AsyncIterator<Batch> | null = null;
      await eventually(async () => {
        it2 = src.batches(new AbortController().signal)[Symbol.asyncIterator]();
        return it2.next().then((r) => r.done === true, () => false);
      }, 20_000, "a drained iteration after reconnecting");
      expect(await consumerState(name, durable)).toMatchObject({ pending: 0, unacked: 0 });
    } finally {
      await proxy.stop();
    }
  }, 60_000);
});
