import { OutboxSource, OutboxSourceConfig } from "../outbox/source.ts";
import { defineBackend, sourceSpec } from "./types.ts";

/** The forward source: a pg_trickle outbox in the relay's own database. */
export default defineBackend({
  type: "outbox",
  source: sourceSpec({ config: OutboxSourceConfig, create: (cfg, ctx) => new OutboxSource(cfg, ctx) }),
});
