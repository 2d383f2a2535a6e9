// The Kafka codecs of src/backends/kafka-codecs.ts against the reference lz4 and zstd command
// line tools (Debian's lz4 and zstd packages); against the broker in
// test/integration/kafka-compression.test.ts.
import { describe, expect, test } from "bun:test";
import { randomBytes } from "node:crypto";
import { lz4Compress, lz4Decompress, snappyCompress, snappyDecompress, zstdCompress, zstdDecompress } from "../../src/backends/kafka/codecs.ts";
import snappy from "snappyjs";

/** Inputs: empty, shorter than LZ4's minimum block, repetitive across several blocks, incompressible. */
const SAMPLES: Record<string, Buffer> = {
  empty: Buffer.alloc(0),
  tiny: Buffer.from("{}"),
  records: Buffer.from(Array.from({ length: 9000 }, (_, i) => `{"id":${i},"op":"insert","payload":{"name":"row ${i % 97}"}}\n`).join("")),
  random: randomBytes(150_000),
};

function tool(cmd: string[], input: Buffer): Buffer {
  const r = Bun.spawnSync(cmd, { stdin: input });
  if (r.exitCode !== 0) throw new Error(`${cmd.join(" ")} failed (is Debian's ${cmd[0]} package installed?): ${r.stderr.toString()}`);
  return Buffer.from(r.stdout);
}

describe("kafka codecs", () => {
  for (const [name, data] of Object.entries(SAMPLES)) {
    test(`lz4 ${name}: our frames decode with the reference tool, its frames with ours`, () => {
      const ours = lz4Compress(data);
      expect(ours.readUInt32LE(0)).toBe(0x184d2204);
      expect(ours[4]! & 0x20).toBe(0x20); // independent blocks: Kafka's Java reader refuses others
      expect(tool(["lz4", "-d", "-c"], ours).equals(data)).toBe(true);
      expect(lz4Decompress(ours).equals(data)).toBe(true);
      // The reference writer with block dependency, block checksums and the content size.
      const theirs = tool(["lz4", "-c", "-BD", "-BX", "--content-size", "-B4"], data);
      expect(lz4Decompress(theirs).equals(data)).toBe(true);
    });

    test(`snappy ${name}: xerial framing written, xerial and raw read`, () => {
      const framed = snappyCompress(data);
      expect(framed.subarray(0, 8).equals(Buffer.from("\x82SNAPPY\0", "latin1"))).toBe(true);
      expect(snappyDecompress(framed).equals(data)).toBe(true);
      expect(snappyDecompress(snappy.compress(data)).equals(data)).toBe(true);
    });

    test(`zstd ${name}: our frames decode with the reference tool, its streamed frames with ours`, async () => {
      const ours = await zstdCompress(data);
      expect(tool(["zstd", "-d", "-c"], ours).equals(data)).toBe(true);
      // Two frames back to back, written from a pipe (no content size), as streaming writers do.
      const theirs = Buffer.concat([tool(["zstd", "-c", "-q"], data), tool(["zstd", "-c", "-q"], data)]);
      expect((await zstdDecompress(theirs)).equals(Buffer.concat([data, data]))).toBe(true);
    });
  }

  test("a truncated xerial block is an error, not short data", () => {
    const framed = snappyCompress(SAMPLES.records!);
    expect(() => snappyDecompress(framed.subarray(0, framed.length - 10))).toThrow("truncated");
  });
});
