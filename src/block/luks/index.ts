// luks: the format driver for LUKS1-encrypted images (QEMU's block/crypto.c over crypto/block-luks.c).
//
// Served from the main loop only (no describe/openReplica): the unlocked key lives in this
// state's cipher contexts, which cannot cross to a worker; re-unlocking per replica would cost
// the slot's PBKDF2 time again. Requests are 512-byte-sector aligned for the cipher: unaligned
// reads decrypt whole sectors into a bounce buffer; unaligned writes read-modify-write whole
// sectors exclusively (aligned writes wait for them and they for aligned writes), as QEMU's
// request alignment of 512 serialises them.
import { pbkdf2 } from 'node:crypto';
import { promisify } from 'node:util';
import type { BlockDriver, DriverImageInfo, PreallocMode } from '../driver.js';
import type { BlockNode } from '../node.js';
import { genericError } from '../../qapi/errors.js';
import { objectsDaemon } from '../../objects/user-object.js';
import { secretString } from '../../objects/secret.js';
import { afMerge } from './af.js';
import { SectorCipher, parseCipherSpec, type CipherSpec } from './cipher.js';
import {
  LUKS_DIGEST_LEN, LUKS_HEADER_SIZE, LUKS_MAGIC, LUKS_SECTOR_SIZE, LUKS_SLOT_ACTIVE,
  checkHeader, parseHeader, splitKeySectors, type LuksHeader,
} from './header.js';

export { luksCreate, type LuksCreateOptions } from './create.js';

const pbkdf2Async = promisify(pbkdf2);
const SECTOR = LUKS_SECTOR_SIZE;
/** Requests are en/decrypted in pieces of at most this size, bounding the cipher's scratch buffers. */
const CHUNK = 1 << 20;

/** Aligned writes share the node; an unaligned read-modify-write takes it alone. */
class WriteGate {
  private shared = 0;
  private exclusive: Promise<void> | null = null;
  private drained: (() => void) | null = null;

  /** Enter as an aligned write: synchronous (no allocation) unless a read-modify-write runs. */
  enterShared(): Promise<void> | undefined {
    if (this.exclusive === null) {
      this.shared++;
      return undefined;
    }
    return this.waitShared();
  }

  private async waitShared(): Promise<void> {
    while (this.exclusive !== null) await this.exclusive;
    this.shared++;
  }

  leaveShared(): void {
    if (--this.shared === 0 && this.drained !== null) {
      const wake = this.drained;
      this.drained = null;
      wake();
    }
  }

  async runExclusive<T>(fn: () => Promise<T>): Promise<T> {
    while (this.exclusive !== null) await this.exclusive;
    let release!: () => void;
    this.exclusive = new Promise((resolve) => { release = resolve; });
    try {
      if (this.shared > 0) await new Promise<void>((resolve) => { this.drained = resolve; });
      return await fn();
    } finally {
      this.exclusive = null;
      release();
    }
  }
}

/** Per-node state of the luks driver. */
export interface LuksState {
  file: BlockNode;
  header: LuksHeader;
  spec: CipherSpec;
  /** Payload cipher keyed by the master key. */
  cipher: SectorCipher;
  /** Byte offset of sector 0 of the payload in the file. */
  payload: number;
  gate: WriteGate;
}

/** QEMU's qcrypto_block_luks_load_key: the master key if `password` opens slot `slot`. */
async function tryKeySlot(file: BlockNode, h: LuksHeader, spec: CipherSpec, slot: number, password: Buffer): Promise<Buffer | undefined> {
  const s = h.slots[slot]!;
  if (s.active !== LUKS_SLOT_ACTIVE) return undefined;
  const splitKey = await pbkdf2Async(password, s.salt, s.iterations, h.masterKeyLen, spec.hash);
  const material = Buffer.alloc(splitKeySectors(h.masterKeyLen, s.stripes) * SECTOR);
  await file.read(s.keyOffsetSectors * SECTOR, material);
  // Key material is encrypted like the payload, numbered from its own first sector.
  new SectorCipher(spec, splitKey).decrypt(0, material);
  const masterKey = afMerge(spec.hash, h.masterKeyLen, s.stripes, material);
  const digest = await pbkdf2Async(masterKey, h.mkDigestSalt, h.mkDigestIterations, LUKS_DIGEST_LEN, spec.hash);
  return digest.equals(h.mkDigest) ? masterKey : undefined;
}

/** Reads the header and unlocks it with the key-secret: QEMU's messages and their order. */
export async function luksOpen(file: BlockNode, keySecret: string | undefined): Promise<{ header: LuksHeader; spec: CipherSpec; masterKey: Buffer }> {
  if (keySecret === undefined) throw genericError("Parameter 'key-secret' is required for cipher");
  const daemon = objectsDaemon();
  if (daemon === undefined) throw genericError(`No secret with id '${keySecret}'`);
  const password = Buffer.from(secretString(daemon, keySecret), 'utf8');
  const raw = Buffer.alloc(LUKS_HEADER_SIZE);
  await file.read(0, raw);
  const header = parseHeader(raw);
  checkHeader(header);
  const spec = parseCipherSpec(header);
  for (let slot = 0; slot < header.slots.length; slot++) {
    const masterKey = await tryKeySlot(file, header, spec, slot, password);
    if (masterKey !== undefined) return { header, spec, masterKey };
  }
  throw genericError('Invalid password, cannot unlock any keyslot');
}

/** Reads and decrypts whole sectors [offset, offset + buf.length) of the payload. */
async function readSectors(state: LuksState, offset: number, buf: Buffer): Promise<void> {
  await state.file.read(state.payload + offset, buf);
  for (let done = 0; done < buf.length; done += CHUNK) {
    const end = Math.min(buf.length, done + CHUNK);
    state.cipher.decrypt((offset + done) / SECTOR, buf.subarray(done, end));
  }
}

/** Encrypts and writes whole sectors. */
async function writeSectors(state: LuksState, offset: number, buf: Buffer, fua: boolean | undefined): Promise<void> {
  for (let done = 0; done < buf.length; done += CHUNK) {
    const end = Math.min(buf.length, done + CHUNK);
    const ct = state.cipher.encrypt((offset + done) / SECTOR, buf.subarray(done, end));
    await state.file.write(state.payload + offset + done, ct, { fua });
  }
}

export const luksDriver: BlockDriver<LuksState> = {
  name: 'luks',
  isProtocol: false,
  metadataChild: true,

  probe(header: Buffer): number {
    // QEMU's block_crypto_probe_luks: the magic and version 1.
    return header.length >= 8 && header.subarray(0, 6).equals(LUKS_MAGIC) && header.readUInt16BE(6) === 1 ? 100 : 0;
  },

  async open(node, options) {
    const file = node.file;
    if (file === undefined) throw genericError('A block device must be specified for "file"');
    const { header, spec, masterKey } = await luksOpen(file, options['key-secret'] as string | undefined);
    return {
      file, header, spec, cipher: new SectorCipher(spec, masterKey),
      payload: header.payloadOffsetSectors * SECTOR, gate: new WriteGate(),
    };
  },

  async close() {},

  getLength: (state) => Math.max(0, state.file.getLength() - state.payload),
  getAllocatedFileSize: (state) => state.file.getAllocatedFileSize(),

  async read(state, offset, buf) {
    if (offset % SECTOR === 0 && buf.length % SECTOR === 0) return readSectors(state, offset, buf);
    const start = offset - (offset % SECTOR);
    const end = Math.ceil((offset + buf.length) / SECTOR) * SECTOR;
    const bounce = Buffer.allocUnsafe(end - start);
    await readSectors(state, start, bounce);
    bounce.copy(buf, 0, offset - start, offset - start + buf.length);
  },

  async write(state, offset, buf, flags) {
    const gate = state.gate;
    if (offset % SECTOR === 0 && buf.length % SECTOR === 0) {
      const wait = gate.enterShared();
      if (wait !== undefined) await wait;
      try {
        return await writeSectors(state, offset, buf, flags.fua);
      } finally {
        gate.leaveShared();
      }
    }
    // Partial sectors: decrypt the whole sectors, patch them, encrypt them back, alone.
    return gate.runExclusive(async () => {
      const start = offset - (offset % SECTOR);
      const end = Math.ceil((offset + buf.length) / SECTOR) * SECTOR;
      const bounce = Buffer.allocUnsafe(end - start);
      await readSectors(state, start, bounce);
      buf.copy(bounce, offset - start);
      await writeSectors(state, start, bounce, flags.fua);
    });
  },

  flush: (state) => state.file.flush(),

  async truncate(state, size, exact, prealloc: PreallocMode) {
    // QEMU's block_crypto_co_truncate: the payload offset moves the file's new end.
    await state.file.truncate(state.payload + size, exact, prealloc);
  },

  imageInfo(state): DriverImageInfo {
    const { header: h, spec } = state;
    const slots = h.slots.map((s) => (s.active === LUKS_SLOT_ACTIVE
      ? { active: true, iters: s.iterations, 'key-offset': s.keyOffsetSectors * SECTOR, stripes: s.stripes }
      : { active: false, 'key-offset': s.keyOffsetSectors * SECTOR }));
    const data: Record<string, unknown> = {
      'cipher-alg': spec.alg,
      'cipher-mode': spec.mode,
      'ivgen-alg': spec.ivgen,
      ...(spec.ivHash !== undefined ? { 'ivgen-hash-alg': spec.ivHash } : {}),
      'hash-alg': spec.hash,
      'payload-offset': state.payload,
      'master-key-iters': h.mkDigestIterations,
      uuid: h.uuid,
      slots,
    };
    return { 'dirty-flag': false, encrypted: true, 'format-specific': { type: 'luks', data } };
  },
};
