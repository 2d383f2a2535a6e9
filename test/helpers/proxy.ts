import { createServer, connect as tcpConnect, type Server, type Socket } from "node:net";
import { KAFKA_PROXIED_ADVERTISED_PORT, KAFKA_PROXIED_PORT } from "./servers.ts";

/** A loopback port nothing listens on right now. */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const port = (srv.address() as { port: number }).port;
      srv.close(() => resolve(port));
    });
  });
}

/**
 * A TCP forwarder to the real server that a test can cut and restore (`stop`/`resume`, on the
 * same port), or freeze: from `freeze()` on, every connection, open or new, goes silent for good —
 * accepted, bytes taken, nothing forwarded in either direction, nothing closed: a peer that stopped
 * answering (a dropped flow, a vanished host). After `thaw()` new connections work again; the
 * silent ones stay silent until `stop()`, so only a client that gives up its socket recovers.
 * `port` fixes the listening port.
 */
export async function tcpProxy(targetPort: number, port = 0) {
  const sockets = new Set<Socket>();
  const silenced: (() => void)[] = [];
  let frozen = false;
  let server: Server | null = null;
  const listen = (port: number) =>
    new Promise<number>((resolve, reject) => {
      server = createServer((client) => {
        const upstream = tcpConnect({ host: "127.0.0.1", port: targetPort });
        sockets.add(client).add(upstream);
        const link = { silent: frozen };
        silenced.push(() => (link.silent = true));
        client.on("data", (chunk: Buffer) => void (link.silent || upstream.write(chunk)));
        upstream.on("data", (chunk: Buffer) => void (link.silent || client.write(chunk)));
        const end = () => {
          client.destroy();
          upstream.destroy();
          sockets.delete(client);
          sockets.delete(upstream);
        };
        client.on("error", end).on("close", end);
        upstream.on("error", end).on("close", end);
      });
      server.once("error", reject);
      server.listen(port, "127.0.0.1", () => resolve((server!.address() as { port: number }).port));
    });
  const bound = await listen(port);
  return {
    port: bound,
    async stop() {
      for (const s of sockets) s.destroy();
      sockets.clear();
      const s = server;
      server = null;
      if (s) await new Promise<void>((resolve) => s.close(() => resolve()));
    },
    async resume() {
      await listen(bound);
    },
    freeze() {
      frozen = true;
      for (const silence of silenced) silence();
    },
    thaw() {
      frozen = false;
    },
  };
}

/**
 * A TCP forwarder to the real server that goes silent in both directions the moment the client
 * sends a chunk `freezesOn` matches (the broker acknowledgement): the relay has committed the
 * batch to the inbox by then, and the acknowledgement never arrives — the window a kill -9 must
 * survive.
 */
export async function freezingProxy(targetPort: number, freezesOn: (chunk: Buffer) => boolean) {
  const sockets = new Set<Socket>();
  const state = { frozen: false };
  const server: Server = createServer((client) => {
    const upstream = tcpConnect({ host: "127.0.0.1", port: targetPort });
    sockets.add(client).add(upstream);
    client.on("data", (chunk: Buffer) => {
      if (!state.frozen && freezesOn(chunk)) state.frozen = true;
      if (!state.frozen) upstream.write(chunk);
    });
    upstream.on("data", (chunk: Buffer) => {
      if (!state.frozen) client.write(chunk);
    });
    const end = () => {
      client.destroy();
      upstream.destroy();
    };
    client.on("error", end).on("close", end);
    upstream.on("error", end).on("close", end);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    port: (server.address() as { port: number }).port,
    get frozen() {
      return state.frozen;
    },
    async stop() {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/**
 * One loopback proxy in front of each server a test cuts off: `via(port)` starts one and gives
 * its port; `kafka()` the one for the broker's proxied listener (its advertised address is where
 * that proxy listens). `all` serves freezing, resuming and stopping them together.
 */
export function proxyGroup() {
  const all: Awaited<ReturnType<typeof tcpProxy>>[] = [];
  const add = async (target: number, port?: number) => {
    const p = await tcpProxy(target, port);
    all.push(p);
    return p;
  };
  return {
    all,
    via: async (port: number) => (await add(port)).port,
    kafka: () => add(KAFKA_PROXIED_PORT, KAFKA_PROXIED_ADVERTISED_PORT),
  };
}
