/**
 * The relay's per-message helpers alone (src/message.ts), in this process: no I/O.
 *
 *   node_modules/.bin/bun bench/per-message.ts [messages=200000] [rounds=7]
 *
 * Times, over `messages` forward messages, each helper every sink or the outbox source calls once
 * per message: renderTemplate with the default subject template, with a fixed key (no
 * placeholder), with a row field; envelopeJson. Prints the median of `rounds` rounds in ns of
 * this process's CPU time per message (CPU time, not wall time: on a shared machine it varies far
 * less). PGTRICKLE_RELAY_MESSAGE_TS=<path of another message.ts> (e.g. of an older checkout)
 * measures that one instead, for a before/after in the same machine state.
 */
import type { Message } from "../src/message.ts";
import { forwardMessages } from "../test/helpers/messages.ts";
import { median } from "./lib.ts";

const { DEFAULT_SUBJECT_TEMPLATE, envelopeJson, renderTemplate } = (await import(
  process.env.PGTRICKLE_RELAY_MESSAGE_TS ?? "../src/message.ts"
)) as typeof import("../src/message.ts");
const total = Number(process.argv[2] ?? 200_000);
const rounds = Number(process.argv[3] ?? 7);
const messages: Message[] = forwardMessages(total, { stream_table: "orders", outboxId: 123456 });

let sink = 0; // results feed this, so the work cannot be optimized away
const cases: [string, (m: Message) => string][] = [
  [`renderTemplate "${DEFAULT_SUBJECT_TEMPLATE}"`, (m) => renderTemplate(DEFAULT_SUBJECT_TEMPLATE, m)],
  [`renderTemplate "orders-stream" (no placeholder)`, (m) => renderTemplate("orders-stream", m)],
  [`renderTemplate "{stream_table}:{customer}" (a row field)`, (m) => renderTemplate("{stream_table}:{customer}", m)],
  ["envelopeJson", envelopeJson],
];
for (const [name, fn] of cases) {
  const ns: number[] = [];
  for (let r = 0; r < rounds; r++) {
    const t0 = process.cpuUsage();
    for (const m of messages) sink += fn(m).length;
    const cpu = process.cpuUsage(t0);
    ns.push(((cpu.user + cpu.system) * 1000) / total);
  }
  console.log(`${name.padEnd(60)} ${median(ns).toFixed(0).padStart(5)} ns/message`);
}
if (sink === 0) throw new Error("nothing rendered");
