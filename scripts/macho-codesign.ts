/**
 * Ad-hoc code signatures for the macOS executables, checked and written without macOS.
 *
 *   bun scripts/macho-codesign.ts verify FILE...    exit 1 unless every page hash matches
 *   bun scripts/macho-codesign.ts ensure FILE...    re-sign ad hoc where the signature does not verify
 *
 * `bun build --compile` appends the program to a copy of the Bun runtime. For darwin-arm64 Bun
 * 1.4.5 writes a fresh ad-hoc signature; for darwin-x64 it keeps the runtime's original
 * signature, whose page hashes no longer match the file, and macOS may kill such a process.
 * The signature written here is the one Go's linker gives every darwin executable
 * (cmd/internal/codesign): a SuperBlob holding one CodeDirectory, SHA-256 per 4 KiB page,
 * flags adhoc|linker-signed. Apple's `codesign --verify --strict` accepts it; the release
 * workflow checks that on a Mac.
 */

import { chmodSync, renameSync, statSync } from "node:fs";

const MH_MAGIC_64 = 0xfeedfacf;
const MH_EXECUTE = 2;
const LC_SEGMENT_64 = 0x19;
const LC_CODE_SIGNATURE = 0x1d;
const CSMAGIC_EMBEDDED_SIGNATURE = 0xfade0cc0;
const CSMAGIC_CODEDIRECTORY = 0xfade0c02;
const CS_HASHTYPE_SHA256 = 2;
const PAGE_BITS = 12;
const PAGE = 1 << PAGE_BITS;
const SUPERBLOB_SIZE = 12;
const BLOB_INDEX_SIZE = 8;
const CODEDIRECTORY_SIZE = 88;
/** Segment sizes in memory are rounded to the larger (arm64) page size. */
const VM_PAGE = 0x4000;

interface Segment {
  name: string;
  /** Offset of the load command in the file. */
  at: number;
  vmsize: bigint;
  fileoff: bigint;
  filesize: bigint;
}

interface MachO {
  cputype: number;
  filetype: number;
  segments: Segment[];
  /** Offset of the LC_CODE_SIGNATURE command, and its data. */
  signature: { at: number; dataoff: number; datasize: number } | null;
}

function parse(buf: Buffer): MachO {
  if (buf.length < 32 || buf.readUInt32LE(0) !== MH_MAGIC_64) throw new Error("not a 64-bit little-endian Mach-O file");
  const ncmds = buf.readUInt32LE(16);
  const segments: Segment[] = [];
  let signature: MachO["signature"] = null;
  let off = 32;
  for (let i = 0; i < ncmds; i++) {
    const cmd = buf.readUInt32LE(off);
    const size = buf.readUInt32LE(off + 4);
    if (cmd === LC_SEGMENT_64) {
      segments.push({
        name: buf.toString("latin1", off + 8, off + 24).replace(/\0+$/, ""),
        at: off,
        vmsize: buf.readBigUInt64LE(off + 32),
        fileoff: buf.readBigUInt64LE(off + 40),
        filesize: buf.readBigUInt64LE(off + 48),
      });
    } else if (cmd === LC_CODE_SIGNATURE) {
      signature = { at: off, dataoff: buf.readUInt32LE(off + 8), datasize: buf.readUInt32LE(off + 12) };
    }
    off += size;
  }
  return { cputype: buf.readUInt32LE(4), filetype: buf.readUInt32LE(12), segments, signature };
}

function sha256(data: Uint8Array): Buffer {
  return new Bun.CryptoHasher("sha256").update(data).digest();
}

export interface SignatureCheck {
  ok: boolean;
  /** Why it is not ok; empty when ok. */
  problems: string[];
  identifier: string | null;
  pages: number;
  badPages: number;
}

/** Checks the embedded ad-hoc signature the way the kernel does: every code page's SHA-256. */
export function verifySignature(buf: Buffer): SignatureCheck {
  const problems: string[] = [];
  const result = (identifier: string | null, pages = 0, badPages = 0): SignatureCheck => ({
    ok: problems.length === 0,
    problems,
    identifier,
    pages,
    badPages,
  });
  const m = parse(buf);
  if (!m.signature) {
    problems.push("no LC_CODE_SIGNATURE");
    return result(null);
  }
  const { dataoff, datasize } = m.signature;
  if (dataoff + datasize > buf.length) problems.push("the signature runs past the end of the file");
  if (dataoff + datasize < buf.length) problems.push("bytes after the signature (codesign --strict rejects them)");
  if (buf.readUInt32BE(dataoff) !== CSMAGIC_EMBEDDED_SIGNATURE) {
    problems.push("no embedded-signature SuperBlob at the signature offset");
    return result(null);
  }
  const count = buf.readUInt32BE(dataoff + 8);
  let cd = -1;
  for (let i = 0; i < count; i++) {
    const at = dataoff + buf.readUInt32BE(dataoff + SUPERBLOB_SIZE + i * BLOB_INDEX_SIZE + 4);
    if (buf.readUInt32BE(at) === CSMAGIC_CODEDIRECTORY) {
      cd = at;
      break;
    }
  }
  if (cd < 0) {
    problems.push("no CodeDirectory");
    return result(null);
  }
  const hashOffset = buf.readUInt32BE(cd + 16);
  const identOffset = buf.readUInt32BE(cd + 20);
  const nCodeSlots = buf.readUInt32BE(cd + 28);
  const codeLimit = buf.readUInt32BE(cd + 32);
  const hashSize = buf[cd + 36] ?? 0;
  const hashType = buf[cd + 37];
  const pageSize = 1 << (buf[cd + 39] ?? 0);
  const identifier = buf.toString("latin1", cd + identOffset, buf.indexOf(0, cd + identOffset));
  if (hashType !== CS_HASHTYPE_SHA256 || hashSize !== 32) problems.push(`hash type ${hashType}, not SHA-256`);
  if (codeLimit !== dataoff) problems.push(`the signature covers ${codeLimit} bytes, the code is ${dataoff}`);
  if (nCodeSlots !== Math.ceil(codeLimit / pageSize)) problems.push(`${nCodeSlots} page hashes for ${codeLimit} bytes`);
  const linkedit = m.segments.find((s) => s.name === "__LINKEDIT");
  if (!linkedit || linkedit.fileoff + linkedit.filesize < BigInt(dataoff + datasize)) {
    problems.push("__LINKEDIT does not hold the signature");
  }
  let badPages = 0;
  if (hashType === CS_HASHTYPE_SHA256) {
    for (let p = 0; p < nCodeSlots; p++) {
      const start = p * pageSize;
      const want = buf.subarray(cd + hashOffset + p * hashSize, cd + hashOffset + (p + 1) * hashSize);
      if (!sha256(buf.subarray(start, Math.min(start + pageSize, codeLimit))).equals(want)) badPages++;
    }
  }
  if (badPages > 0) problems.push(`${badPages} of ${nCodeSlots} page hashes do not match`);
  return result(identifier, nCodeSlots, badPages);
}

/**
 * Replaces the signature with a fresh ad-hoc one over everything before it, growing __LINKEDIT
 * (which ends the file) as needed. Returns the new file contents.
 */
export function signAdhoc(input: Buffer, identifier: string): Buffer {
  const m = parse(input);
  if (!m.signature) throw new Error("no LC_CODE_SIGNATURE to fill (the file was linked without room for one)");
  const linkedit = m.segments.find((s) => s.name === "__LINKEDIT");
  const text = m.segments.find((s) => s.name === "__TEXT");
  if (!linkedit || !text) throw new Error("no __LINKEDIT or __TEXT segment");
  const codeSize = m.signature.dataoff;
  if (linkedit.fileoff > BigInt(codeSize)) throw new Error("the signature is not inside __LINKEDIT");
  for (const s of m.segments) {
    if (s !== linkedit && s.fileoff + s.filesize > BigInt(codeSize)) throw new Error(`segment ${s.name} lies past the signature`);
  }

  const nHashes = Math.ceil(codeSize / PAGE);
  const idOff = CODEDIRECTORY_SIZE;
  const id = Buffer.from(identifier + "\0", "latin1");
  const hashOff = idOff + id.length;
  const cdSize = hashOff + nHashes * 32;
  const sigSize = SUPERBLOB_SIZE + BLOB_INDEX_SIZE + cdSize;

  const out = Buffer.alloc(codeSize + sigSize);
  input.copy(out, 0, 0, codeSize);
  // The load commands are part of the hashed code, so they are updated first.
  out.writeUInt32LE(sigSize, m.signature.at + 12);
  const newFilesize = BigInt(codeSize + sigSize) - linkedit.fileoff;
  const roundedVm = ((newFilesize + BigInt(VM_PAGE - 1)) / BigInt(VM_PAGE)) * BigInt(VM_PAGE);
  out.writeBigUInt64LE(newFilesize, linkedit.at + 48);
  if (linkedit.vmsize < roundedVm) out.writeBigUInt64LE(roundedVm, linkedit.at + 32);

  let o = codeSize;
  o = out.writeUInt32BE(CSMAGIC_EMBEDDED_SIGNATURE, o);
  o = out.writeUInt32BE(sigSize, o);
  o = out.writeUInt32BE(1, o);
  o = out.writeUInt32BE(0, o); // CSSLOT_CODEDIRECTORY
  o = out.writeUInt32BE(SUPERBLOB_SIZE + BLOB_INDEX_SIZE, o);
  const cd = o;
  o = out.writeUInt32BE(CSMAGIC_CODEDIRECTORY, o);
  o = out.writeUInt32BE(cdSize, o);
  o = out.writeUInt32BE(0x20400, o); // version with execSeg fields
  o = out.writeUInt32BE(0x20002, o); // adhoc | linker-signed
  o = out.writeUInt32BE(hashOff, o);
  o = out.writeUInt32BE(idOff, o);
  o = out.writeUInt32BE(0, o); // nSpecialSlots
  o = out.writeUInt32BE(nHashes, o);
  o = out.writeUInt32BE(codeSize, o); // codeLimit
  o = out.writeUInt8(32, o); // hashSize
  o = out.writeUInt8(CS_HASHTYPE_SHA256, o);
  o = out.writeUInt8(0, o);
  o = out.writeUInt8(PAGE_BITS, o);
  o = out.writeUInt32BE(0, o); // spare2
  o = out.writeUInt32BE(0, o); // scatterOffset
  o = out.writeUInt32BE(0, o); // teamOffset
  o = out.writeUInt32BE(0, o); // spare3
  o = out.writeBigUInt64BE(0n, o); // codeLimit64
  o = out.writeBigUInt64BE(text.fileoff, o); // execSegBase
  o = out.writeBigUInt64BE(text.filesize, o); // execSegLimit
  o = out.writeBigUInt64BE(m.filetype === MH_EXECUTE ? 1n : 0n, o); // CS_EXECSEG_MAIN_BINARY
  if (o - cd !== CODEDIRECTORY_SIZE) throw new Error("CodeDirectory header size mismatch");
  o += id.copy(out, o);
  for (let p = 0; p < nHashes; p++) {
    const start = p * PAGE;
    o += sha256(out.subarray(start, Math.min(start + PAGE, codeSize))).copy(out, o);
  }
  if (o !== out.length) throw new Error("signature size mismatch");
  return out;
}

async function main(argv: string[]): Promise<number> {
  const [command, ...files] = argv;
  if ((command !== "verify" && command !== "ensure") || files.length === 0) {
    console.error("usage: bun scripts/macho-codesign.ts verify|ensure FILE...");
    return 2;
  }
  let failed = 0;
  for (const file of files) {
    const buf = Buffer.from(await Bun.file(file).arrayBuffer());
    let check = verifySignature(buf);
    if (!check.ok && command === "ensure") {
      const signed = signAdhoc(buf, "pgtrickle-relay");
      check = verifySignature(signed);
      if (check.ok) {
        // Written beside the file and renamed, keeping its mode.
        const tmp = `${file}.signing`;
        await Bun.write(tmp, signed);
        chmodSync(tmp, statSync(file).mode & 0o7777);
        renameSync(tmp, file);
        console.error(`macho-codesign: ${file}: re-signed ad hoc (${check.pages} pages)`);
      }
    }
    if (!check.ok) {
      failed++;
      console.error(`macho-codesign: ${file}: ${check.problems.join("; ")}`);
    }
  }
  return failed === 0 ? 0 : 1;
}

if (import.meta.main) process.exit(await main(process.argv.slice(2)));
