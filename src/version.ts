import pkg from "../package.json" with { type: "json" };

declare const PGTRICKLE_RELAY_COMMIT: string | undefined;

export const VERSION: string = pkg.version;
/** Set by scripts/build through `bun build --define`; "dev" when run from source. */
export const COMMIT: string = typeof PGTRICKLE_RELAY_COMMIT === "string" ? PGTRICKLE_RELAY_COMMIT : "dev";
