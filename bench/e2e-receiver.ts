/**
 * The HTTP servers bench/e2e.ts needs, in a process of their own so that they do not share an
 * event loop (and a core's time slices) with the raw client being measured.
 *
 *   bun bench/e2e-receiver.ts webhook            counts the envelopes POSTed to /<tag>
 *                                                (a JSON array counts its elements); GET /count/<tag>
 *   bun bench/e2e-receiver.ts inbox <postgres-url> <inbox>
 *                                                the hand-written safe HTTP inbox: each request's
 *                                                events INSERT … ON CONFLICT DO NOTHING, answered 200
 *                                                only after the commit
 *
 * Listens on a free loopback port and prints it as the first line on stdout.
 */
import postgres from "postgres";

const [mode, pgUrl, inbox] = process.argv.slice(2);

function webhook() {
  const counts = new Map<string, number>();
  return Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(req) {
      const path = new URL(req.url).pathname;
      if (req.method === "GET" && path.startsWith("/count/")) return new Response(String(counts.get(path.slice(7)) ?? 0));
      const body = (await req.json()) as unknown;
      const tag = path.slice(1);
      counts.set(tag, (counts.get(tag) ?? 0) + (Array.isArray(body) ? body.length : 1));
      return new Response("ok");
    },
  });
}

function rawInbox() {
  const sql = postgres(pgUrl!, { max: 8, onnotice: () => {} });
  return Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(req) {
      const events = (await req.json()) as Record<string, unknown>[];
      const list = Array.isArray(events) ? events : [events];
      await sql`INSERT INTO pgtrickle.${sql(inbox!)} (event_id, event_type, source, payload)
        SELECT x.id, x.type, 'http', x.body::jsonb
          FROM unnest(${list.map((e) => String(e.event_id))}::text[], ${list.map((e) => String(e.event_type))}::text[],
                      ${list.map((e) => JSON.stringify(e))}::text[]) AS x(id, type, body)
        ON CONFLICT (event_id) DO NOTHING`;
      return new Response("ok");
    },
  });
}

if (mode !== "webhook" && mode !== "inbox") throw new Error("usage: e2e-receiver.ts webhook | inbox <postgres-url> <inbox>");
const server = mode === "webhook" ? webhook() : rawInbox();
console.log(server.port);
