/**
 * The forward pg-inbox sink (a remote PostgreSQL inbox) under the shared contract (suite.ts). The
 * inbox's primary key is the dedup key (ON CONFLICT DO NOTHING): a replay adds no row. Rows are a
 * set, so no order is checked. Trust auth ignores the password in the URL; it is there to prove it
 * is never printed.
 */
import { testDatabase, type TestDatabase } from "../helpers/pg.ts";
import { poisonable } from "../helpers/reverse.ts";
import { POSTGRES_URL, portOf } from "../helpers/servers.ts";
import { sinkContract } from "./suite.ts";

sinkContract({
  system: "pg-inbox",
  servers: [],
  serverPort: portOf(POSTGRES_URL) || 5432,
  dedups: true,
  ordered: false,
  hasSecret: true,
  // The remote inbox refuses payloads with a `poison` key (a CHECK constraint, SQLSTATE 23514).
  poisonRow: { poison: true },
  async target(reach, secret) {
    const remote: TestDatabase = await testDatabase("contract_remote", { catalog: false });
    await remote.sql`SELECT pgtrickle.create_inbox('contract_inbox')`;
    await poisonable(remote, "contract_inbox");
    const url = new URL(remote.url);
    url.port = String(reach.port);
    url.password = secret;
    return {
      config: { type: "pg-inbox", url: url.toString(), inbox_table: "contract_inbox", timeout_ms: 2000 },
      async arrived() {
        const rows = await remote.sql<{ event_id: string; payload: any }[]>`SELECT event_id, payload FROM pgtrickle.contract_inbox`;
        return rows.map((r) => ({ key: r.event_id, payload: r.payload }));
      },
      cleanup: () => remote.drop(),
    };
  },
});
