import { expect } from "bun:test";
import type { BackendContext } from "../../src/backends/types.ts";
import { RelayError } from "../../src/errors.ts";
import { log } from "../../src/observe/log.ts";

/**
 * The context a backend gets when a test creates its sink or source directly: forward, no
 * database, not draining, the relay's logger — `overrides` changes any of it (a reverse source
 * gets `direction`, `sql`, `postgresUrl`, `drain`).
 */
export function backendContext(pipeline: string, overrides: Partial<BackendContext> = {}): BackendContext {
  return {
    pipeline,
    direction: "forward",
    relayGroupId: "test",
    log,
    sql: undefined as never,
    postgresUrl: "postgres://unused",
    drain: false,
    ...overrides,
  };
}

/** The RelayError `p` rejects with; fails the test when it resolves or rejects with anything else. */
export async function errorOf(p: Promise<unknown>): Promise<RelayError> {
  try {
    await p;
  } catch (err) {
    expect(err).toBeInstanceOf(RelayError);
    return err as RelayError;
  }
  throw new Error("expected a RelayError, but the call succeeded");
}

/** Like `errorOf`, and the error is of `kind`. */
export async function expectRelayError(p: Promise<unknown>, kind: RelayError["kind"]): Promise<RelayError> {
  const err = await errorOf(p);
  expect(err.kind).toBe(kind);
  return err;
}

/** The config error `fn` throws at once; fails the test when it throws anything else or nothing. */
export function configErrorOf(fn: () => unknown): RelayError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(RelayError);
    expect((err as RelayError).kind).toBe("config");
    return err as RelayError;
  }
  throw new Error("expected a config error, got none");
}
