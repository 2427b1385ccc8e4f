// The LUKS anti-forensic splitter (AF split/merge with hash diffusion) that spreads a key over many stripes.
import { createHash, randomBytes } from 'node:crypto';
import { hashLength } from './cipher.js';

/** Replaces block with H(be32(i) || chunk_i) for each digest-sized chunk (the last one truncated). */
function diffuse(hash: string, block: Buffer): void {
  const digestLen = hashLength(hash);
  const index = Buffer.alloc(4);
  for (let i = 0, off = 0; off < block.length; i++, off += digestLen) {
    const end = Math.min(off + digestLen, block.length);
    index.writeUInt32BE(i, 0);
    const d = createHash(hash).update(index).update(block.subarray(off, end)).digest();
    d.copy(block, off, 0, end - off);
  }
}

function xorInto(dst: Buffer, src: Buffer): void {
  for (let i = 0; i < dst.length; i++) dst[i] ^= src[i]!;
}

/** Recovers the key from `stripes` blocks of `keyLen` bytes (QEMU's qcrypto_afsplit_decode). */
export function afMerge(hash: string, keyLen: number, stripes: number, material: Buffer): Buffer {
  const block = Buffer.alloc(keyLen);
  for (let i = 0; i < stripes - 1; i++) {
    xorInto(block, material.subarray(i * keyLen, (i + 1) * keyLen));
    diffuse(hash, block);
  }
  xorInto(block, material.subarray((stripes - 1) * keyLen, stripes * keyLen));
  return block;
}

/** Spreads key over `stripes` blocks, all but the last random (QEMU's qcrypto_afsplit_encode). */
export function afSplit(hash: string, key: Buffer, stripes: number): Buffer {
  const keyLen = key.length;
  const out = Buffer.alloc(keyLen * stripes);
  randomBytes(keyLen * (stripes - 1)).copy(out);
  const block = Buffer.alloc(keyLen);
  for (let i = 0; i < stripes - 1; i++) {
    xorInto(block, out.subarray(i * keyLen, (i + 1) * keyLen));
    diffuse(hash, block);
  }
  xorInto(block, key);
  block.copy(out, (stripes - 1) * keyLen);
  return out;
}
