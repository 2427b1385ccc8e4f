// luks image creation (blockdev-create): a LUKS1 header with key slot 0 for the key-secret, laid out as QEMU lays it out.
import { pbkdf2, randomBytes, randomUUID } from 'node:crypto';
import { promisify } from 'node:util';
import type { BlockNode } from '../node.js';
import type { PreallocMode } from '../driver.js';
import { genericError } from '../../qapi/errors.js';
import { objectsDaemon } from '../../objects/user-object.js';
import { secretString } from '../../objects/secret.js';
import { afSplit } from './af.js';
import { SectorCipher, parseCipherSpec } from './cipher.js';
import {
  LUKS_ALIGN, LUKS_DIGEST_LEN, LUKS_MIN_MK_ITERS, LUKS_MIN_SLOT_ITERS, LUKS_NUM_SLOTS, LUKS_SALT_LEN,
  LUKS_SECTOR_SIZE, LUKS_SLOT_ACTIVE, LUKS_SLOT_DISABLED, LUKS_STRIPES, serializeHeader, splitKeySectors,
  type LuksHeader,
} from './header.js';

const pbkdf2Async = promisify(pbkdf2);

/** BlockdevCreateOptionsLUKS without 'driver' and 'file' (schema-checked). */
export interface LuksCreateOptions {
  /** A uint64 from the schema: a number where exact, else a bigint. */
  size: number | bigint;
  'key-secret'?: string;
  'cipher-alg'?: string;
  'cipher-mode'?: string;
  'ivgen-alg'?: string;
  'ivgen-hash-alg'?: string;
  'hash-alg'?: string;
  'iter-time'?: number;
  preallocation?: PreallocMode;
}

/** PBKDF2 iterations that take `ms` milliseconds here (QEMU benchmarks CPU time the same way). */
async function itersFor(hash: string, keyLen: number, ms: number): Promise<number> {
  const salt = randomBytes(LUKS_SALT_LEN);
  const pw = randomBytes(keyLen);
  for (let n = 1 << 12; ; n *= 4) {
    const t0 = process.hrtime.bigint();
    await pbkdf2Async(pw, salt, n, keyLen, hash);
    const took = Number(process.hrtime.bigint() - t0) / 1e6;
    if (took >= 50 || n >= 1 << 24) return Math.floor((n * ms) / took);
  }
}

/** Writes a new LUKS1 volume into `file` (QEMU's qcrypto_block_luks_create + block_crypto_co_create_generic). */
export async function luksCreate(file: BlockNode, opts: LuksCreateOptions, checkPerms: () => void = () => undefined): Promise<void> {
  const {
    'key-secret': keySecret, 'cipher-alg': cipherAlg = 'aes-256', 'cipher-mode': cipherMode = 'xts',
    'ivgen-alg': ivgenAlg = 'plain64', 'hash-alg': hashAlg = 'sha256', 'iter-time': iterTime = 2000,
    preallocation = 'off',
  } = opts;
  const ivgenHash = opts['ivgen-hash-alg'] ?? (ivgenAlg === 'essiv' ? 'sha256' : undefined);
  if (keySecret === undefined) throw genericError("Parameter 'key-secret' is required for cipher");
  const daemon = objectsDaemon();
  if (daemon === undefined) throw genericError(`No secret with id '${keySecret}'`);
  const password = Buffer.from(secretString(daemon, keySecret), 'utf8');
  const m = /^aes-(128|192|256)$/.exec(cipherAlg);
  if (!m) throw genericError(`Cipher algorithm '${cipherAlg}' is not supported by qsd-ts`);
  const singleKey = Number(m[1]) / 8;
  const keyBytes = cipherMode === 'xts' ? 2 * singleKey : singleKey;
  const modeSpec = ivgenHash !== undefined && ivgenAlg === 'essiv'
    ? `${cipherMode}-${ivgenAlg}:${ivgenHash}` : `${cipherMode}-${ivgenAlg}`;

  const splitSectors = splitKeySectors(keyBytes, LUKS_STRIPES);
  const alignSectors = LUKS_ALIGN / LUKS_SECTOR_SIZE;
  const slotSectors = Math.ceil(splitSectors / alignSectors) * alignSectors;
  const header: LuksHeader = {
    version: 1, cipherName: 'aes', cipherMode: modeSpec, hashSpec: hashAlg,
    payloadOffsetSectors: alignSectors + LUKS_NUM_SLOTS * slotSectors,
    masterKeyLen: keyBytes, mkDigest: Buffer.alloc(LUKS_DIGEST_LEN), mkDigestSalt: randomBytes(LUKS_SALT_LEN),
    mkDigestIterations: 0, uuid: randomUUID(),
    slots: Array.from({ length: LUKS_NUM_SLOTS }, (_, i) => ({
      active: LUKS_SLOT_DISABLED, iterations: 0, salt: Buffer.alloc(LUKS_SALT_LEN),
      keyOffsetSectors: alignSectors + i * slotSectors, stripes: LUKS_STRIPES,
    })),
  };
  // The same parser that opens the volume validates what we are about to write.
  const spec = parseCipherSpec(header);

  const size = BigInt(opts.size);
  const payload = header.payloadOffsetSectors * LUKS_SECTOR_SIZE;
  if (size > (1n << 63n) - 1n - BigInt(payload)) throw genericError('The requested file size is too large');

  const masterKey = randomBytes(keyBytes);
  const perSecond = await itersFor(spec.hash, keyBytes, 1000);
  header.mkDigestIterations = Math.max(LUKS_MIN_MK_ITERS, Math.floor((perSecond * iterTime) / 1000 / 8));
  header.mkDigest = await pbkdf2Async(masterKey, header.mkDigestSalt, header.mkDigestIterations, LUKS_DIGEST_LEN, spec.hash);
  const slot = header.slots[0]!;
  slot.active = LUKS_SLOT_ACTIVE;
  slot.salt = randomBytes(LUKS_SALT_LEN);
  slot.iterations = Math.max(LUKS_MIN_SLOT_ITERS, Math.floor((perSecond * iterTime) / 1000));
  const splitKey = await pbkdf2Async(password, slot.salt, slot.iterations, keyBytes, spec.hash);
  const material = Buffer.alloc(splitSectors * LUKS_SECTOR_SIZE);
  afSplit(spec.hash, masterKey, LUKS_STRIPES).copy(material);
  const encrypted = new SectorCipher(spec, splitKey).encrypt(0, material);

  checkPerms();
  await file.truncate(Number(size) + payload, false, preallocation);
  await file.write(0, serializeHeader(header));
  await file.write(slot.keyOffsetSectors * LUKS_SECTOR_SIZE, encrypted);
  await file.flush();
}
