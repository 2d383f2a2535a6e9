/**
 * The Kafka codecs alone (src/backends/kafka-codecs.ts, no broker): compress and decompress one
 * record batch's worth of relay envelopes (500 messages, about 95 KB) repeatedly; prints the
 * compressed size and MB/s of uncompressed data for each codec, gzip (node:zlib) as reference.
 *
 *   node_modules/.bin/bun bench/kafka-codecs.ts [rounds=200]
 */
import { gunzipSync, gzipSync } from "node:zlib";
import { lz4Compress, lz4Decompress, snappyCompress, snappyDecompress, zstdCompress, zstdDecompress } from "../src/backends/kafka/codecs.ts";
import { envelopeJson } from "../src/message.ts";
import { forwardMessages } from "../test/helpers/messages.ts";

const rounds = Number(process.argv[2] ?? 200);
const batch = Buffer.from(forwardMessages(500).map(envelopeJson).join(""));

const codecs: Record<string, [(b: Buffer) => Buffer | Promise<Buffer>, (b: Buffer) => Buffer | Promise<Buffer>]> = {
  gzip: [gzipSync, gunzipSync],
  snappy: [snappyCompress, snappyDecompress],
  lz4: [lz4Compress, lz4Decompress],
  zstd: [zstdCompress, zstdDecompress],
};

const mbps = (ms: number) => ((batch.length * rounds) / 1e6 / (ms / 1000)).toFixed(0);
console.log(`batch: ${batch.length} bytes, ${rounds} rounds`);
for (const [name, [compress, decompress]] of Object.entries(codecs)) {
  const packed = await compress(batch);
  if (!(await decompress(packed)).equals(batch)) throw new Error(`${name}: round trip differs`);
  let t = performance.now();
  for (let i = 0; i < rounds; i++) await compress(batch);
  const compressMs = performance.now() - t;
  t = performance.now();
  for (let i = 0; i < rounds; i++) await decompress(packed);
  const decompressMs = performance.now() - t;
  console.log(`${name}: ${packed.length} bytes (${((100 * packed.length) / batch.length).toFixed(1)} %), compress ${mbps(compressMs)} MB/s, decompress ${mbps(decompressMs)} MB/s`);
}
