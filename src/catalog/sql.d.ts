// `import x from "./file.sql" with { type: "text" }`: Bun inlines the file's text, also into
// `bun build --compile` binaries.
declare module "*.sql" {
  const text: string;
  export default text;
}
