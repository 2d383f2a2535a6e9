/**
 * Kafka record-batch codecs that kafkajs leaves to the application: snappy, lz4 and zstd
 * (kafkajs itself has gzip). All are pure JavaScript or Bun built-ins, imported statically so
 * that `bun build --compile` bundles them (the rule src/backends/index.ts states).
 *
 * - snappy (snappyjs): Kafka's Java client writes snappy in the xerial framing (a 16-byte
 *   header, then blocks of [int32 compressed length][raw snappy]); other clients may write raw
 *   snappy. Both are read; the xerial framing is written, as Java does.
 * - lz4 (lz4js): the LZ4 frame format, independent blocks, no checksums but the header's, as
 *   Kafka's KafkaLZ4BlockOutputStream writes it (its reader refuses dependent blocks).
 * - zstd: Bun's built-in zstd (Bun.zstdCompress/zstdDecompress); it reads concatenated frames and
 *   frames without a content size, as streaming writers (zstd-jni in Kafka's Java client) produce.
 */
import { gzipSync } from "node:zlib";
import { CompressionCodecs, CompressionTypes } from "kafkajs";
import snappy from "snappyjs";
import * as lz4 from "lz4js";
import { hash as xxh32 } from "lz4js/xxh32.js";

export type KafkaCompression = "none" | "gzip" | "snappy" | "lz4" | "zstd";

const XERIAL_MAGIC = Buffer.from([0x82, 0x53, 0x4e, 0x41, 0x50, 0x50, 0x59, 0x00]); // \x82SNAPPY\0
const XERIAL_HEADER_BYTES = 16; // magic, int32 version 1, int32 compatible version 1
/** snappy-java's default block size (SnappyOutputStream). */
const XERIAL_BLOCK_BYTES = 32 * 1024;

export function snappyCompress(data: Buffer): Buffer {
  const parts: Buffer[] = [XERIAL_MAGIC, int32(1), int32(1)];
  for (let at = 0; at < data.length; at += XERIAL_BLOCK_BYTES) {
    const block = snappy.compress(data.subarray(at, at + XERIAL_BLOCK_BYTES));
    parts.push(int32(block.length), block);
  }
  return Buffer.concat(parts);
}

export function snappyDecompress(data: Buffer): Buffer {
  if (!(data.length >= XERIAL_HEADER_BYTES && data.subarray(0, XERIAL_MAGIC.length).equals(XERIAL_MAGIC))) {
    return snappy.uncompress(data);
  }
  const parts: Buffer[] = [];
  let at = XERIAL_HEADER_BYTES;
  while (at < data.length) {
    if (at + 4 > data.length) throw new Error("snappy: truncated xerial block length");
    const size = data.readInt32BE(at);
    at += 4;
    if (size < 0 || at + size > data.length) throw new Error("snappy: truncated xerial block");
    parts.push(snappy.uncompress(data.subarray(at, at + size)));
    at += size;
  }
  return Buffer.concat(parts);
}

const LZ4_MAGIC = 0x184d2204;
/** FLG: version 01, block independence; no block/content checksum, no content size. */
const LZ4_FLG = 0x60;
/** BD: 256 KiB maximum block size (code 5). */
const LZ4_BD = 5 << 4;
/**
 * Blocks are written 64 KiB long under the declared 256 KiB maximum: lz4js may start a match
 * up to 10 bytes before a block's end, which decoders that put their end-of-output margin
 * (LZ4's MFLIMIT, 12 bytes) at the block maximum then never see.
 */
const LZ4_BLOCK_BYTES = 64 * 1024;
const LZ4_UNCOMPRESSED_BIT = 0x80000000;

export function lz4Compress(data: Buffer): Buffer {
  const descriptor = Buffer.from([LZ4_FLG, LZ4_BD]);
  const parts: Buffer[] = [uint32le(LZ4_MAGIC), descriptor, Buffer.from([(xxh32(0, descriptor, 0, 2) >>> 8) & 0xff])];
  const scratch = new Uint8Array(lz4.compressBound(LZ4_BLOCK_BYTES));
  for (let at = 0; at < data.length; at += LZ4_BLOCK_BYTES) {
    const block = data.subarray(at, at + LZ4_BLOCK_BYTES);
    // A fresh hash table per block keeps every match inside its block (independent blocks).
    const size = lz4.compressBlock(block, scratch, 0, block.length, new Uint32Array(1 << 16));
    if (size === 0 || size >= block.length) parts.push(uint32le(LZ4_UNCOMPRESSED_BIT | block.length), block);
    else parts.push(uint32le(size), Buffer.from(scratch.subarray(0, size)));
  }
  parts.push(uint32le(0)); // end mark
  return Buffer.concat(parts);
}

/** Maximum block size by the BD byte's code (4–7). */
const LZ4_BLOCK_MAX: Record<number, number> = { 4: 64 * 1024, 5: 256 * 1024, 6: 1024 * 1024, 7: 4 * 1024 * 1024 };

/**
 * Decodes one LZ4 frame, whatever its flags (dependent blocks, block and content checksums,
 * content size, dictionary id); checksums are not verified. lz4js's own frame reader is not
 * used: it reads a block checksum before its block instead of after, and a content size wrong.
 */
export function lz4Decompress(data: Buffer): Buffer {
  if (data.length < 7 || data.readUInt32LE(0) !== LZ4_MAGIC) throw new Error("lz4: not an LZ4 frame (bad magic number)");
  const flg = data[4]!;
  if ((flg & 0xc0) !== 0x40) throw new Error("lz4: unsupported LZ4 frame version");
  const maxBlock = LZ4_BLOCK_MAX[(data[5]! >> 4) & 7];
  if (maxBlock === undefined) throw new Error("lz4: invalid LZ4 block maximum size");
  const hasBlockChecksum = (flg & 0x10) !== 0;
  let at = 6 + (flg & 0x08 ? 8 : 0) + (flg & 0x01 ? 4 : 0) + 1; // content size, dictionary id, header checksum
  const blocks: { start: number; size: number; stored: boolean }[] = [];
  let bound = 0;
  for (;;) {
    if (at + 4 > data.length) throw new Error("lz4: truncated LZ4 frame");
    const word = data.readUInt32LE(at);
    at += 4;
    if (word === 0) break; // end mark; an optional content checksum follows
    const stored = (word & LZ4_UNCOMPRESSED_BIT) !== 0;
    const size = word & 0x7fffffff;
    if (size > maxBlock || at + size > data.length) throw new Error("lz4: truncated or oversized LZ4 block");
    blocks.push({ start: at, size, stored });
    bound += stored ? size : maxBlock;
    at += size + (hasBlockChecksum ? 4 : 0);
  }
  // One output buffer for all blocks: a dependent block's matches reach into earlier blocks.
  const out = Buffer.alloc(bound);
  let end = 0;
  for (const b of blocks) {
    if (b.stored) end += data.copy(out, end, b.start, b.start + b.size);
    else end = lz4.decompressBlock(data, out, b.start, b.size, end);
  }
  return out.subarray(0, end);
}

export const zstdCompress = (data: Buffer): Promise<Buffer> => Bun.zstdCompress(data);
export const zstdDecompress = (data: Buffer): Promise<Buffer> => Bun.zstdDecompress(data);

/** The codec applied synchronously to one record's bytes, for the sink's size estimate. */
export function compressSync(codec: KafkaCompression, data: Buffer): Buffer {
  switch (codec) {
    case "none":
      return data;
    case "gzip":
      return gzipSync(data);
    case "snappy":
      return snappyCompress(data);
    case "lz4":
      return lz4Compress(data);
    case "zstd":
      return Buffer.from(Bun.zstdCompressSync(data));
  }
}

export const COMPRESSION_TYPES: Record<KafkaCompression, CompressionTypes> = {
  none: CompressionTypes.None,
  gzip: CompressionTypes.GZIP,
  snappy: CompressionTypes.Snappy,
  lz4: CompressionTypes.LZ4,
  zstd: CompressionTypes.ZSTD,
};

/** kafkajs hands `compress` its record encoder and `decompress` the batch's record bytes. */
type Codec = { compress(encoder: { buffer: Buffer }): Promise<Buffer>; decompress(data: Buffer): Promise<Buffer> };
const syncCodec = (compress: (b: Buffer) => Buffer, decompress: (b: Buffer) => Buffer): Codec => ({
  compress: async (encoder) => compress(encoder.buffer),
  decompress: async (data) => decompress(data),
});

/** Registers snappy, lz4 and zstd with kafkajs, for producers and consumers alike. */
export function registerKafkaCodecs(): void {
  CompressionCodecs[CompressionTypes.Snappy] = () => syncCodec(snappyCompress, snappyDecompress);
  CompressionCodecs[CompressionTypes.LZ4] = () => syncCodec(lz4Compress, lz4Decompress);
  CompressionCodecs[CompressionTypes.ZSTD] = (): Codec => ({
    compress: (encoder) => zstdCompress(encoder.buffer),
    decompress: zstdDecompress,
  });
}

function int32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeInt32BE(n);
  return b;
}

function uint32le(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(n >>> 0);
  return b;
}
