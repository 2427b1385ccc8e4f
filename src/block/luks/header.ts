// LUKS1 on-disk header (cryptsetup's LUKS1 spec as QEMU's crypto/block-luks.c reads it): layout, parsing, checks.
import { genericError } from '../../qapi/errors.js';

/** "LUKS\xBA\xBE": the first 6 bytes of every LUKS volume. */
export const LUKS_MAGIC = Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]);
export const LUKS_HEADER_SIZE = 592;
export const LUKS_SECTOR_SIZE = 512;
export const LUKS_NUM_SLOTS = 8;
export const LUKS_STRIPES = 4000;
export const LUKS_DIGEST_LEN = 20;
export const LUKS_SALT_LEN = 32;
export const LUKS_SLOT_ACTIVE = 0x00ac71f3;
export const LUKS_SLOT_DISABLED = 0x0000dead;
/** QEMU refuses slots and digests with fewer PBKDF2 iterations (QCRYPTO_BLOCK_LUKS_MIN_*). */
export const LUKS_MIN_SLOT_ITERS = 1000;
export const LUKS_MIN_MK_ITERS = 1000;
/** Key material and payload are aligned to 4 KiB (QEMU's QCRYPTO_BLOCK_LUKS_KEY_SLOT_OFFSET too). */
export const LUKS_ALIGN = 4096;

/** One of the 8 key slots. */
export interface LuksKeySlot {
  active: number;
  iterations: number;
  salt: Buffer;
  /** Start of the slot's key material, in 512-byte sectors. */
  keyOffsetSectors: number;
  stripes: number;
}

/** The parsed header (strings without their NUL padding). */
export interface LuksHeader {
  version: number;
  cipherName: string;
  cipherMode: string;
  hashSpec: string;
  /** Start of the encrypted payload, in 512-byte sectors. */
  payloadOffsetSectors: number;
  masterKeyLen: number;
  mkDigest: Buffer;
  mkDigestSalt: Buffer;
  mkDigestIterations: number;
  uuid: string;
  slots: LuksKeySlot[];
}

const cstr = (buf: Buffer, start: number, len: number): string => {
  const field = buf.subarray(start, start + len);
  const nul = field.indexOf(0);
  return field.subarray(0, nul < 0 ? len : nul).toString('latin1');
};

/** Decodes the 592 header bytes; throws QEMU's errors for a foreign or unsupported volume. */
export function parseHeader(buf: Buffer): LuksHeader {
  if (buf.length < LUKS_HEADER_SIZE || !buf.subarray(0, 6).equals(LUKS_MAGIC)) {
    throw genericError('Volume is not in LUKS format');
  }
  const version = buf.readUInt16BE(6);
  if (version !== 1) throw genericError(`LUKS version ${version} is not supported`);
  const slots: LuksKeySlot[] = [];
  for (let i = 0; i < LUKS_NUM_SLOTS; i++) {
    const o = 208 + i * 48;
    slots.push({
      active: buf.readUInt32BE(o),
      iterations: buf.readUInt32BE(o + 4),
      salt: Buffer.from(buf.subarray(o + 8, o + 40)),
      keyOffsetSectors: buf.readUInt32BE(o + 40),
      stripes: buf.readUInt32BE(o + 44),
    });
  }
  return {
    version,
    cipherName: cstr(buf, 8, 32),
    cipherMode: cstr(buf, 40, 32),
    hashSpec: cstr(buf, 72, 32),
    payloadOffsetSectors: buf.readUInt32BE(104),
    masterKeyLen: buf.readUInt32BE(108),
    mkDigest: Buffer.from(buf.subarray(112, 132)),
    mkDigestSalt: Buffer.from(buf.subarray(132, 164)),
    mkDigestIterations: buf.readUInt32BE(164),
    uuid: cstr(buf, 168, 40),
    slots,
  };
}

/** Encodes a header (the inverse of parseHeader) into 592 bytes. */
export function serializeHeader(h: LuksHeader): Buffer {
  const buf = Buffer.alloc(LUKS_HEADER_SIZE);
  LUKS_MAGIC.copy(buf, 0);
  buf.writeUInt16BE(h.version, 6);
  buf.write(h.cipherName, 8, 31, 'latin1');
  buf.write(h.cipherMode, 40, 31, 'latin1');
  buf.write(h.hashSpec, 72, 31, 'latin1');
  buf.writeUInt32BE(h.payloadOffsetSectors, 104);
  buf.writeUInt32BE(h.masterKeyLen, 108);
  h.mkDigest.copy(buf, 112);
  h.mkDigestSalt.copy(buf, 132);
  buf.writeUInt32BE(h.mkDigestIterations, 164);
  buf.write(h.uuid, 168, 39, 'latin1');
  h.slots.forEach((s, i) => {
    const o = 208 + i * 48;
    buf.writeUInt32BE(s.active, o);
    buf.writeUInt32BE(s.iterations, o + 4);
    s.salt.copy(buf, o + 8);
    buf.writeUInt32BE(s.keyOffsetSectors, o + 40);
    buf.writeUInt32BE(s.stripes, o + 44);
  });
  return buf;
}

/** Bytes of one slot's key material, rounded up to whole sectors. */
export function splitKeySectors(masterKeyLen: number, stripes: number): number {
  return Math.ceil((masterKeyLen * stripes) / LUKS_SECTOR_SIZE);
}

/** QEMU's qcrypto_block_luks_check_header: slot and payload layout sanity, with its messages. */
export function checkHeader(h: LuksHeader): void {
  // Slots may start right after the 592-byte header (QEMU checks against the header struct).
  const headerSectors = Math.ceil(LUKS_HEADER_SIZE / LUKS_SECTOR_SIZE);
  for (let i = 0; i < LUKS_NUM_SLOTS; i++) {
    const s = h.slots[i]!;
    const start1 = s.keyOffsetSectors;
    const len1 = splitKeySectors(h.masterKeyLen, s.stripes);
    if (s.stripes !== LUKS_STRIPES) {
      throw genericError(`Keyslot ${i} is corrupted (stripes ${s.stripes} != ${LUKS_STRIPES})`);
    }
    if (s.active !== LUKS_SLOT_DISABLED && s.active !== LUKS_SLOT_ACTIVE) {
      throw genericError(`Keyslot ${i} state (active/disable) is corrupted`);
    }
    if (s.active === LUKS_SLOT_ACTIVE && s.iterations === 0) {
      throw genericError(`Keyslot ${i} iteration count is zero`);
    }
    if (start1 < headerSectors) throw genericError(`Keyslot ${i} is overlapping with the LUKS header`);
    if (start1 + len1 > h.payloadOffsetSectors) throw genericError(`Keyslot ${i} is overlapping with the encrypted payload`);
    for (let j = i + 1; j < LUKS_NUM_SLOTS; j++) {
      const t = h.slots[j]!;
      const start2 = t.keyOffsetSectors;
      const len2 = splitKeySectors(h.masterKeyLen, t.stripes);
      if (start1 + len1 > start2 && start2 + len2 > start1) {
        throw genericError(`Keyslots ${i} and ${j} are overlapping in the header`);
      }
    }
  }
}
