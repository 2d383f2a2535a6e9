export { sink as default } from "./backend.ts";
