// qcow2 image creation (blockdev-create / qemu-img create): formats an empty, opened file node.
import type { BlockNode } from '../node.js';
import { genericError } from '../../qapi/errors.js';
import {
  COMPAT_LAZY_REFCOUNTS, EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, INCOMPAT_EXTL2, QCOW2_MAGIC,
  QCOW_MAX_L1_SIZE, featureTable,
} from './header.js';
import { openImage } from './open.js';

export interface Qcow2CreateOptions {
  /** A uint64 from the schema: a number where exact, else a bigint (wrapped negatives too). */
  size: number | bigint;
  version?: 'v2' | 'v3';
  'cluster-size'?: number;
  'lazy-refcounts'?: boolean;
  'refcount-bits'?: number;
  'backing-file'?: string;
  'backing-fmt'?: string;
  'extended-l2'?: boolean;
  preallocation?: 'off' | 'metadata' | 'falloc' | 'full';
}

const isPow2 = (n: number) => Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0;

/** Writes a new qcow2 image into `file` (which must be empty); QEMU's validation messages. */
export async function qcow2Create(
  file: BlockNode,
  opts: Qcow2CreateOptions,
  /**
   * Throws if others' use of `file` forbids a step: 'write' (writing and resizing it, after the
   * option checks) or 'open' (opening the new image as a qcow2 node, after the header is written).
   */
  checkPerms: (step: 'write' | 'open') => void = () => undefined,
): Promise<void> {
  const {
    size: rawSize, version = 'v3', 'cluster-size': cs = 65536, 'lazy-refcounts': lazy = false,
    'refcount-bits': refcountBits = 16, 'backing-file': backingFile, 'backing-fmt': backingFmt,
    'extended-l2': extL2 = false, preallocation = 'off',
  } = opts;
  // Checks in QEMU's order (verified against qemu-storage-daemon 7.2 blockdev-create).
  // The schema hands over a uint64 (negative input already wrapped to 2^64 + size). Alignment
  // is checked first; sizes past int64 are "negative" and, like sizes too large for the L1
  // table, only fail in the resize that follows the format step.
  const size64 = BigInt(rawSize);
  if (size64 % 512n !== 0n) throw genericError('Image size must be a multiple of 512 bytes');
  const size = size64 >= 1n << 63n ? -1 : size64 > BigInt(Number.MAX_SAFE_INTEGER) ? Infinity : Number(size64);
  if (extL2 && version === 'v2') {
    throw genericError('Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)');
  }
  if (!isPow2(cs) || cs < 512 || cs > 2 * 1024 * 1024) {
    throw genericError('Cluster size must be a power of two between 512 and 2048k');
  }
  if (extL2 && cs < 16384) {
    throw genericError('Extended L2 entries are only supported with cluster sizes of at least 16384 bytes');
  }
  if (backingFile !== undefined && preallocation !== 'off' && !extL2) {
    throw genericError('Backing file and preallocation can only be used at the same time if extended_l2 is on');
  }
  if (backingFmt !== undefined && backingFile === undefined) {
    throw genericError('Backing format cannot be used without backing file');
  }
  if (version === 'v2' && lazy) {
    throw genericError('Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)');
  }
  if (!isPow2(refcountBits) || refcountBits > 64) {
    throw genericError('Refcount width must be a power of two and may not exceed 64 bits');
  }
  if (version === 'v2' && refcountBits !== 16) {
    throw genericError('Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)');
  }
  if (size < 0) throw genericError('Could not resize image: Image size cannot be negative');
  const refcountOrder = Math.log2(refcountBits);
  const l2Entries = cs / (extL2 ? 16 : 8);
  if (!Number.isFinite(size) || Math.ceil(size / (l2Entries * cs)) > QCOW_MAX_L1_SIZE / 8) {
    // blockdev-create fails in the resize that follows the format step.
    throw genericError('Could not resize image: Failed to grow the L1 table: File too large');
  }

  // QEMU takes the write permission on the file only after checking the options.
  if (file.readOnly) throw genericError('Block node is read-only');
  checkPerms('write');

  // Cluster 0: header and extensions; cluster 1: refcount table; cluster 2: its first block.
  const hdr = Buffer.alloc(cs);
  hdr.writeUInt32BE(QCOW2_MAGIC, 0);
  hdr.writeUInt32BE(version === 'v3' ? 3 : 2, 4);
  hdr.writeUInt32BE(Math.log2(cs), 20);
  hdr.writeBigUInt64BE(0n, 24); // size 0; the resize below grows L1 like any other resize.
  hdr.writeBigUInt64BE(BigInt(cs), 48);
  hdr.writeUInt32BE(1, 56);
  let off = 72;
  if (version === 'v3') {
    hdr.writeBigUInt64BE(extL2 ? BigInt(INCOMPAT_EXTL2) : 0n, 72);
    hdr.writeBigUInt64BE(lazy ? BigInt(COMPAT_LAZY_REFCOUNTS) : 0n, 80);
    hdr.writeUInt32BE(refcountOrder, 96);
    hdr.writeUInt32BE(112, 100);
    off = 112;
  }
  const addExt = (type: number, data: Buffer) => {
    hdr.writeUInt32BE(type, off);
    hdr.writeUInt32BE(data.length, off + 4);
    data.copy(hdr, off + 8);
    off += 8 + ((data.length + 7) & ~7);
  };
  if (backingFmt !== undefined) addExt(EXT_BACKING_FORMAT, Buffer.from(backingFmt, 'latin1'));
  if (version === 'v3') addExt(EXT_FEATURE_TABLE, featureTable());
  off += 8; // end-of-extensions marker (zeroes)
  if (backingFile !== undefined) {
    const name = Buffer.from(backingFile, 'latin1');
    if (name.length > 1023 || off + name.length > cs) throw genericError('Backing file name too long');
    hdr.writeBigUInt64BE(BigInt(off), 8);
    hdr.writeUInt32BE(name.length, 16);
    name.copy(hdr, off);
  }
  const rt = Buffer.alloc(cs);
  rt.writeBigUInt64BE(BigInt(2 * cs), 0);
  const rb = Buffer.alloc(cs);
  for (let c = 0; c < 3; c++) {
    switch (refcountBits) {
      case 1: case 2: case 4: rb[Math.floor((c * refcountBits) / 8)]! |= 1 << ((c * refcountBits) % 8); break;
      case 8: rb[c] = 1; break;
      case 16: rb.writeUInt16BE(1, c * 2); break;
      case 32: rb.writeUInt32BE(1, c * 4); break;
      default: rb.writeBigUInt64BE(1n, c * 8);
    }
  }
  if (file.getLength() !== 0) await file.truncate(0);
  await file.write(0, Buffer.concat([hdr, rt, rb]));
  await file.flush();

  checkPerms('open');
  const img = await openImage(file, undefined, { readOnly: false, passDiscard: false });
  if (size > 0) await img.truncate(size);
  if (preallocation !== 'off') {
    await img.preallocateMetadata();
    await img.flush();
    // The data clusters exist in the file (sparse for 'metadata').
    const last = Math.max(file.getLength(), img.rc.freeHint * cs);
    await file.truncate(last, true, preallocation === 'metadata' ? 'off' : preallocation);
  }
  await img.flush();
}
