// qcow2 on-disk header: field layout, feature bits and header extensions (docs/interop/qcow2.txt).
import type { BlockNode } from '../node.js';
import { genericError } from '../../qapi/errors.js';

export const QCOW2_MAGIC = 0x514649fb;

/** Incompatible feature bits (header offset 72). */
export const INCOMPAT_DIRTY = 1 << 0;
export const INCOMPAT_CORRUPT = 1 << 1;
export const INCOMPAT_DATA_FILE = 1 << 2;
export const INCOMPAT_COMPRESSION = 1 << 3;
export const INCOMPAT_EXTL2 = 1 << 4;
const INCOMPAT_KNOWN = 0x1f;
/** Compatible feature bits (offset 80). */
export const COMPAT_LAZY_REFCOUNTS = 1 << 0;
/** Autoclear feature bits (offset 88). */
export const AUTOCLEAR_BITMAPS = 1 << 0;
export const AUTOCLEAR_DATA_FILE_RAW = 1 << 1;

/** Header extension types. */
export const EXT_END = 0;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_DATA_FILE = 0x44415441;

/** Field offsets that the driver rewrites in place (never the whole header: unknown extensions stay). */
export const OFF_SIZE = 24;
export const OFF_L1_SIZE = 36;
export const OFF_REFTABLE = 48;
export const OFF_INCOMPAT = 72;
export const OFF_AUTOCLEAR = 88;

/** QEMU's limits: L1 and refcount tables stay below these byte sizes. */
export const QCOW_MAX_L1_SIZE = 0x2000000;
export const QCOW_MAX_REFTABLE_SIZE = 0x800000;

/** The feature name table QEMU writes into v3 images (type, bit, name). */
export const FEATURE_NAMES: ReadonlyArray<[number, number, string]> = [
  [0, 0, 'dirty bit'],
  [0, 1, 'corrupt bit'],
  [0, 2, 'external data file'],
  [0, 3, 'compression type'],
  [0, 4, 'extended L2 entries'],
  [1, 0, 'lazy refcounts'],
  [2, 0, 'bitmaps'],
  [2, 1, 'raw external data'],
];

export interface HeaderExtension {
  type: number;
  data: Buffer;
}

/** A parsed qcow2 header (offsets as numbers: images beyond 2^53 bytes do not exist here). */
export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  /** Feature bit words; bits above 31 are only checked at open, never used. */
  incompatible: bigint;
  compatible: bigint;
  autoclear: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  extensions: HeaderExtension[];
  backingFile?: string;
  backingFormat?: string;
  /** Names from the feature name table, keyed "type:bit". */
  featureNames: Map<string, string>;
}

function u64(buf: Buffer, off: number): number {
  return Number(buf.readBigUInt64BE(off));
}

/** Reads and validates the header of a qcow2 image; throws QmpError with QEMU's message. */
export async function readHeader(file: BlockNode): Promise<Qcow2Header> {
  const fileLen = file.getLength();
  const first = Buffer.alloc(Math.min(fileLen, 104));
  if (first.length > 0) await file.read(0, first);
  if (first.length < 72 || first.readUInt32BE(0) !== QCOW2_MAGIC) {
    throw genericError('Image is not in qcow2 format');
  }
  const version = first.readUInt32BE(4);
  if (version < 2 || version > 3) throw genericError(`Unsupported qcow2 version ${version}`);
  const clusterBits = first.readUInt32BE(20);
  if (clusterBits < 9 || clusterBits > 21) throw genericError(`Unsupported cluster size: 2^${clusterBits}`);
  const clusterSize = 2 ** clusterBits;
  const h: Qcow2Header = {
    version: version as 2 | 3,
    backingFileOffset: u64(first, 8),
    backingFileSize: first.readUInt32BE(16),
    clusterBits,
    size: u64(first, 24),
    cryptMethod: first.readUInt32BE(32),
    l1Size: first.readUInt32BE(36),
    l1TableOffset: u64(first, 40),
    refcountTableOffset: u64(first, 48),
    refcountTableClusters: first.readUInt32BE(56),
    nbSnapshots: first.readUInt32BE(60),
    snapshotsOffset: u64(first, 64),
    incompatible: 0n,
    compatible: 0n,
    autoclear: 0n,
    refcountOrder: 4,
    headerLength: 72,
    compressionType: 0,
    extensions: [],
    featureNames: new Map(),
  };
  if (version === 3) {
    if (first.length < 104) throw genericError('qcow2 header too short');
    h.incompatible = first.readBigUInt64BE(72);
    h.compatible = first.readBigUInt64BE(80);
    h.autoclear = first.readBigUInt64BE(88);
    h.refcountOrder = first.readUInt32BE(96);
    h.headerLength = first.readUInt32BE(100);
    if (h.headerLength < 104) throw genericError('qcow2 header too short');
    if (h.headerLength > clusterSize) throw genericError('qcow2 header exceeds cluster size');
  }
  // Extensions live between the fixed header and the backing file name (or the cluster end).
  const extEnd = h.backingFileOffset > 0 ? Math.min(h.backingFileOffset, clusterSize) : clusterSize;
  const area = Buffer.alloc(Math.max(0, Math.min(extEnd, fileLen) - h.headerLength + 0));
  const whole = Buffer.alloc(Math.min(clusterSize, fileLen));
  await file.read(0, whole);
  if (version === 3 && h.headerLength > 104) h.compressionType = whole[104] ?? 0;
  whole.copy(area, 0, h.headerLength, h.headerLength + area.length);
  let off = 0;
  while (off + 8 <= area.length) {
    const type = area.readUInt32BE(off);
    const len = area.readUInt32BE(off + 4);
    off += 8;
    if (type === EXT_END) break;
    if (off + len > area.length) throw genericError('ext_magic 0x' + type.toString(16) + ': invalid extension length');
    const data = Buffer.from(area.subarray(off, off + len));
    h.extensions.push({ type, data });
    if (type === EXT_BACKING_FORMAT) h.backingFormat = data.toString('latin1');
    else if (type === EXT_FEATURE_TABLE) {
      for (let i = 0; i + 48 <= data.length; i += 48) {
        const name = data.subarray(i + 2, i + 48);
        const nul = name.indexOf(0);
        h.featureNames.set(`${data[i]}:${data[i + 1]}`, name.subarray(0, nul < 0 ? 46 : nul).toString('latin1'));
      }
    }
    off += (len + 7) & ~7;
  }
  if (h.backingFileOffset > 0 && h.backingFileSize > 0) {
    if (h.backingFileSize > 1023 || h.backingFileOffset + h.backingFileSize > clusterSize) {
      throw genericError('Backing file name too long');
    }
    h.backingFile = whole.subarray(h.backingFileOffset, h.backingFileOffset + h.backingFileSize).toString('latin1');
  }
  const unknown = h.incompatible & ~BigInt(INCOMPAT_KNOWN);
  if (unknown !== 0n) {
    const parts: string[] = [];
    let rest = unknown;
    for (let bit = 0; bit < 64; bit++) {
      const mask = 1n << BigInt(bit);
      if ((unknown & mask) === 0n) continue;
      const name = h.featureNames.get(`0:${bit}`);
      if (name !== undefined) {
        parts.push(name);
        rest &= ~mask;
      }
    }
    if (rest !== 0n) parts.push(`Unknown incompatible feature: ${rest.toString(16)}`);
    throw genericError(`Unsupported qcow2 feature(s): ${parts.join(', ')}`);
  }
  if (h.refcountOrder > 6) throw genericError('Reference count entry width too large; may not exceed 64 bits');
  const incompat = Number(h.incompatible & 0xffn);
  if (incompat & INCOMPAT_COMPRESSION) {
    if (h.compressionType === 0) {
      throw genericError('qcow2: Compression type incompatible feature bit must not be set');
    }
  } else if (h.compressionType !== 0) {
    throw genericError('qcow2: Compression type incompatible feature bit must be set');
  }
  if (h.compressionType > 1) throw genericError(`qcow2: unknown compression type: ${h.compressionType}`);
  if (incompat & INCOMPAT_DATA_FILE) throw genericError("'data-file' is required for this image");
  if (h.cryptMethod !== 0) throw genericError(`Unsupported encryption method: ${h.cryptMethod}`);
  if (h.l1Size > QCOW_MAX_L1_SIZE / 8) throw genericError('Active L1 table too large');
  if (h.refcountTableClusters * clusterSize > QCOW_MAX_REFTABLE_SIZE) {
    throw genericError('Reference count table too large');
  }
  return h;
}

/** The backing file name and format a qcow2 image's header names (for the graph's chain opening). */
export async function qcow2BackingInfo(file: BlockNode): Promise<{ backingFile?: string; backingFormat?: string }> {
  const h = await readHeader(file);
  return { backingFile: h.backingFile, backingFormat: h.backingFormat };
}

/** Serializes the feature name table extension's payload. */
export function featureTable(): Buffer {
  const buf = Buffer.alloc(48 * FEATURE_NAMES.length);
  FEATURE_NAMES.forEach(([type, bit, name], i) => {
    buf[i * 48] = type;
    buf[i * 48 + 1] = bit;
    buf.write(name, i * 48 + 2, 'latin1');
  });
  return buf;
}
