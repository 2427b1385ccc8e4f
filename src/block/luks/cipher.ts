// LUKS sector encryption: the header's cipher spec parsed as QEMU does, and 512-byte-sector en/decryption with its IV generators.
import { createCipheriv, createDecipheriv, createHash, type Cipher, type Decipher } from 'node:crypto';
import { genericError } from '../../qapi/errors.js';
import { LUKS_SECTOR_SIZE, type LuksHeader } from './header.js';

export type CipherMode = 'ecb' | 'cbc' | 'xts' | 'ctr';
export type IvGen = 'plain' | 'plain64' | 'essiv';

/** What the header's cipher-name, cipher-mode and hash-spec strings mean. */
export interface CipherSpec {
  /** QCryptoCipherAlgorithm name: 'aes-128', 'aes-192', 'aes-256'. */
  alg: string;
  mode: CipherMode;
  ivgen: IvGen;
  /** ESSIV only: the hash of the master key that keys the IV cipher. */
  ivHash?: string;
  /** The hash for PBKDF2 and the anti-forensic splitter. */
  hash: string;
  /** Master key bytes (both halves for xts). */
  keyBytes: number;
}

/** Hashes QEMU's LUKS code knows (QCryptoHashAlgorithm names, as Node also names them). */
const HASHES = new Set(['md5', 'sha1', 'sha224', 'sha256', 'sha384', 'sha512', 'ripemd160']);
const MODES = new Set<string>(['ecb', 'cbc', 'xts', 'ctr']);
const IVGENS = new Set<string>(['plain', 'plain64', 'essiv']);
/** Cipher names QEMU accepts and their key sizes; only AES is implemented here (OpenSSL has no serpent/twofish). */
const AES_KEYS: Record<number, string> = { 16: 'aes-128', 24: 'aes-192', 32: 'aes-256' };

export function hashLength(hash: string): number {
  return createHash(hash).digest().length;
}

function lookupHash(name: string): string {
  if (!HASHES.has(name)) throw genericError(`Hash algorithm '${name}' not supported`);
  return name;
}

function lookupCipher(name: string, mode: CipherMode, keyBytes: number): string {
  // xts keys hold two cipher keys (data and tweak).
  const single = mode === 'xts' ? keyBytes / 2 : keyBytes;
  const alg = name === 'aes' ? AES_KEYS[single] : undefined;
  if (alg === undefined) throw genericError(`Algorithm '${name}' with key size ${single} bytes not supported`);
  return alg;
}

/** QEMU's qcrypto_block_luks_parse_header: the cipher spec, with its messages and order. */
export function parseCipherSpec(h: LuksHeader): CipherSpec {
  const dash = h.cipherMode.indexOf('-');
  if (dash < 0) throw genericError(`Unexpected cipher mode string format '${h.cipherMode}'`);
  const modeName = h.cipherMode.slice(0, dash);
  let ivgenName = h.cipherMode.slice(dash + 1);
  let ivHash: string | undefined;
  const colon = ivgenName.indexOf(':');
  if (colon >= 0) {
    ivHash = lookupHash(ivgenName.slice(colon + 1));
    ivgenName = ivgenName.slice(0, colon);
  }
  if (!MODES.has(modeName)) throw genericError(`Cipher mode '${modeName}' not supported`);
  const mode = modeName as CipherMode;
  const alg = lookupCipher(h.cipherName, mode, h.masterKeyLen);
  const hash = lookupHash(h.hashSpec);
  if (!IVGENS.has(ivgenName)) throw genericError(`IV generator '${ivgenName}' not supported`);
  const ivgen = ivgenName as IvGen;
  if (ivgen === 'essiv') {
    if (ivHash === undefined) throw genericError('Missing IV generator hash specification');
    essivAlg(alg, ivHash);
  }
  return { alg, mode, ivgen, ivHash, hash, keyBytes: h.masterKeyLen };
}

/** QEMU's qcrypto_block_luks_essiv_cipher: the same cipher family keyed by the whole digest. */
function essivAlg(alg: string, ivHash: string): string {
  const digestLen = hashLength(ivHash);
  const essiv = AES_KEYS[digestLen];
  if (essiv === undefined || !alg.startsWith('aes-')) {
    throw genericError(`No AES cipher with key size ${digestLen} available`);
  }
  return essiv;
}

const ecbName = (alg: string) => `${alg}-ecb`;

function ecbCipher(alg: string, key: Buffer): Cipher {
  const c = createCipheriv(ecbName(alg), key, null);
  c.setAutoPadding(false);
  return c;
}

function ecbDecipher(alg: string, key: Buffer): Decipher {
  const d = createDecipheriv(ecbName(alg), key, null);
  d.setAutoPadding(false);
  return d;
}

if (new Uint8Array(new Uint32Array([1]).buffer)[0] !== 1) throw new Error('luks: XTS tweaks assume a little-endian host');

/** dst[i] = a[i] ^ b[i] for len bytes; by 32-bit words when all three are aligned (b always is). */
function xorInto(dst: Buffer, a: Buffer, b32: Uint32Array, len: number): void {
  if ((dst.byteOffset & 3) === 0 && (a.byteOffset & 3) === 0) {
    const d = new Uint32Array(dst.buffer, dst.byteOffset, len >>> 2);
    const x = new Uint32Array(a.buffer, a.byteOffset, len >>> 2);
    for (let i = 0; i < d.length; i++) d[i] = x[i]! ^ b32[i]!;
    return;
  }
  const b = new Uint8Array(b32.buffer, b32.byteOffset, len);
  for (let i = 0; i < len; i++) dst[i] = a[i]! ^ b[i]!;
}

/**
 * En/decrypts runs of whole 512-byte sectors with one key. ECB contexts are stateless between
 * update() calls, so one long-lived context per key serves every request: XTS is built on them
 * (tweaks computed here), CBC decryption too; only CBC encryption and CTR need a context per
 * sector. Scratch buffers are reused; they are only used synchronously, so requests never share
 * them across an await.
 */
export class SectorCipher {
  private readonly dataEnc?: Cipher;
  private readonly dataDec?: Decipher;
  /** xts: encrypts the IVs into tweaks with the second key half. */
  private readonly tweakEnc?: Cipher;
  /** essiv: encrypts plain64 IVs with the hashed key. */
  private readonly essivEnc?: Cipher;
  private readonly key: Buffer;
  private ivs = Buffer.alloc(0);
  private scratch = Buffer.alloc(0);
  private pad32 = new Uint32Array(0);

  constructor(readonly spec: CipherSpec, key: Buffer) {
    this.key = Buffer.from(key);
    if (spec.mode === 'xts') {
      const half = key.length / 2;
      this.dataEnc = ecbCipher(spec.alg, key.subarray(0, half));
      this.dataDec = ecbDecipher(spec.alg, key.subarray(0, half));
      this.tweakEnc = ecbCipher(spec.alg, key.subarray(half));
    } else if (spec.mode === 'ecb' || spec.mode === 'cbc') {
      this.dataEnc = ecbCipher(spec.alg, key);
      this.dataDec = ecbDecipher(spec.alg, key);
    }
    if (spec.ivgen === 'essiv') {
      const digest = createHash(spec.ivHash!).update(key).digest();
      this.essivEnc = ecbCipher(essivAlg(spec.alg, spec.ivHash!), digest);
    }
  }

  private grow(len: number): void {
    if (this.scratch.length < len) {
      // Buffer.alloc never slices the shared pool: scratch starts 4-byte aligned for the word views.
      this.scratch = Buffer.alloc(len);
      this.pad32 = new Uint32Array(len / 4);
    }
  }

  /** The IVs of `n` sectors from `first` (QEMU's qcrypto_ivgen_calculate), 16 bytes each, in this.ivs. */
  private computeIvs(first: number, n: number): Buffer {
    const len = n * 16;
    if (this.ivs.length < len) this.ivs = Buffer.alloc(Math.max(len, 2 * this.ivs.length));
    const ivs = this.ivs.subarray(0, len);
    ivs.fill(0);
    for (let i = 0; i < n; i++) {
      const sector = first + i;
      if (this.spec.ivgen === 'plain') {
        ivs.writeUInt32LE(sector % 0x100000000, i * 16);
      } else {
        ivs.writeUInt32LE(sector % 0x100000000, i * 16);
        ivs.writeUInt32LE(Math.floor(sector / 0x100000000), i * 16 + 4);
      }
    }
    if (this.essivEnc) ivs.set(this.essivEnc.update(ivs));
    return ivs;
  }

  /** xts: the tweak of every 16-byte block of `n` sectors, in this.pad32. */
  private xtsTweaks(first: number, n: number): void {
    const t0 = this.tweakEnc!.update(this.computeIvs(first, n));
    const w = this.pad32;
    // 32-bit words, as little-endian as the tweak (x86 and arm64 are; checked at load below).
    for (let s = 0; s < n; s++) {
      let a = t0.readUInt32LE(s * 16);
      let b = t0.readUInt32LE(s * 16 + 4);
      let c = t0.readUInt32LE(s * 16 + 8);
      let d = t0.readUInt32LE(s * 16 + 12);
      const end = (s + 1) * (LUKS_SECTOR_SIZE / 4);
      for (let i = s * (LUKS_SECTOR_SIZE / 4); i < end; i += 4) {
        w[i] = a; w[i + 1] = b; w[i + 2] = c; w[i + 3] = d;
        // Multiply by x in GF(2^128), little-endian (IEEE 1619).
        const carry = d >>> 31;
        d = ((d << 1) | (c >>> 31)) >>> 0;
        c = ((c << 1) | (b >>> 31)) >>> 0;
        b = ((b << 1) | (a >>> 31)) >>> 0;
        a = ((a << 1) ^ (carry * 0x87)) >>> 0;
      }
    }
  }

  /** Decrypts buf (whole sectors, the first numbered `first`) in place. */
  decrypt(first: number, buf: Buffer): void {
    const len = buf.length;
    const n = len / LUKS_SECTOR_SIZE;
    this.grow(len);
    const { scratch } = this;
    switch (this.spec.mode) {
      case 'xts': {
        this.xtsTweaks(first, n);
        xorInto(scratch, buf, this.pad32, len);
        const out = this.dataDec!.update(scratch.subarray(0, len));
        xorInto(buf, out, this.pad32, len);
        return;
      }
      case 'cbc': {
        // P_i = D(C_i) xor C_{i-1}, with the sector's IV as C_{-1}.
        const ivs = this.computeIvs(first, n);
        const out = this.dataDec!.update(buf);
        for (let s = 0; s < n; s++) {
          const base = s * LUKS_SECTOR_SIZE;
          // Backwards, so each C_{i-1} is still in buf when block i needs it.
          for (let i = base + LUKS_SECTOR_SIZE - 1; i >= base + 16; i--) buf[i] = out[i]! ^ buf[i - 16]!;
          for (let k = 0; k < 16; k++) buf[base + k] = out[base + k]! ^ ivs[s * 16 + k]!;
        }
        return;
      }
      case 'ecb':
        buf.set(this.dataDec!.update(buf));
        return;
      case 'ctr':
        for (let s = 0; s < n; s++) this.ctrSector(first + s, buf.subarray(s * LUKS_SECTOR_SIZE, (s + 1) * LUKS_SECTOR_SIZE));
        return;
    }
  }

  /** Encrypts src (whole sectors, the first numbered `first`); returns the ciphertext in a new buffer. */
  encrypt(first: number, src: Buffer): Buffer {
    const len = src.length;
    const n = len / LUKS_SECTOR_SIZE;
    this.grow(len);
    const { scratch } = this;
    switch (this.spec.mode) {
      case 'xts': {
        this.xtsTweaks(first, n);
        xorInto(scratch, src, this.pad32, len);
        const out = this.dataEnc!.update(scratch.subarray(0, len));
        xorInto(out, out, this.pad32, len);
        return out;
      }
      case 'cbc': {
        const ivs = this.computeIvs(first, n);
        const out = Buffer.allocUnsafe(len);
        for (let s = 0; s < n; s++) {
          const c = createCipheriv(`${this.spec.alg}-cbc`, this.key, ivs.subarray(s * 16, s * 16 + 16));
          c.setAutoPadding(false);
          out.set(c.update(src.subarray(s * LUKS_SECTOR_SIZE, (s + 1) * LUKS_SECTOR_SIZE)), s * LUKS_SECTOR_SIZE);
        }
        return out;
      }
      case 'ecb':
        return this.dataEnc!.update(src);
      case 'ctr': {
        const out = Buffer.from(src);
        for (let s = 0; s < n; s++) this.ctrSector(first + s, out.subarray(s * LUKS_SECTOR_SIZE, (s + 1) * LUKS_SECTOR_SIZE));
        return out;
      }
    }
  }

  /** ctr is its own inverse: XOR the keystream of one sector into buf. */
  private ctrSector(sector: number, buf: Buffer): void {
    const iv = Buffer.from(this.computeIvs(sector, 1));
    const c = createCipheriv(`${this.spec.alg}-ctr`, this.key, iv);
    buf.set(c.update(buf));
  }
}
