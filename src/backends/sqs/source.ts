export { source as default } from "./backend.ts";
