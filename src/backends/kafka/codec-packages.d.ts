// Types of the pure-JavaScript codec packages used by codecs.ts (they ship none).
declare module "snappyjs" {
  const snappy: { compress(data: Buffer): Buffer; uncompress(data: Buffer): Buffer };
  export default snappy;
}
declare module "lz4js" {
  export function compressBound(n: number): number;
  /** Compresses src[sIndex, sIndex+sLength) into dst as one raw LZ4 block; 0 = nothing gained. */
  export function compressBlock(src: Uint8Array, dst: Uint8Array, sIndex: number, sLength: number, hashTable: Uint32Array): number;
  /** Decodes one raw LZ4 block src[sIndex, sIndex+sLength) into dst from dIndex; returns the new end. */
  export function decompressBlock(src: Uint8Array, dst: Uint8Array, sIndex: number, sLength: number, dIndex: number): number;
}
declare module "lz4js/xxh32.js" {
  export function hash(seed: number, src: Uint8Array, index: number, length: number): number;
}
