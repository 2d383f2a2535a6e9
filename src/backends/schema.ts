/**
 * Valibot building blocks every backend's options use. The messages omit the key: the config
 * error (pipeline-config.ts describeIssue) already names it, e.g. `'sink.max_in_flight': must be
 * ≥ 1, got 0`.
 */
import * as v from "valibot";

/** An integer from `min` to `max`. */
export const intInRange = (min: number, max = Number.MAX_SAFE_INTEGER) =>
  v.pipe(v.number(), v.integer("must be an integer"), v.minValue(min, `must be ≥ ${min}`), v.maxValue(max, `must be ≤ ${max}`));

/** An integer from 1 to `max`. */
export const positiveInt = (max = Number.MAX_SAFE_INTEGER) => intInRange(1, max);

/** An optional positive integer with its default and its documentation. */
export const positiveIntOption = (fallback: number, description: string) => v.pipe(v.optional(positiveInt(), fallback), v.description(description));

/** A string with at least one character. */
export const nonEmptyString = () => v.pipe(v.string(), v.nonEmpty("must not be empty"));

/** The type guard of the same: a string with at least one character. */
export const isNonEmptyString = (x: unknown): x is string => typeof x === "string" && x !== "";
