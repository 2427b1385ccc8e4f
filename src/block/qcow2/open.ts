// Opens a qcow2 image on a file child: reads the header, L1 and refcount tables into a Qcow2Image.
import type { BlockNode } from '../node.js';
import { genericError } from '../../qapi/errors.js';
import { AUTOCLEAR_BITMAPS, INCOMPAT_CORRUPT, OFF_AUTOCLEAR, readHeader } from './header.js';
import { EXT_BITMAPS, readBitmapDirectory, writeBitmapsHeader } from './bitmaps.js';
import { Qcow2Image } from './image.js';
import { readSnapshots } from './snapshots.js';

export interface OpenOptions {
  readOnly: boolean;
  /** Discards from the guest punch holes in the file (pass-discard-request). */
  passDiscard: boolean;
  /** The node's blockdev-add options: the cache and refcount ones are checked against the header. */
  options?: Record<string, any>;
}

/**
 * QEMU's qcow2_update_options checks, in its order: the cache sizes (which need the cluster size),
 * the cleaning interval and lazy refcounts (which need a version 3 image). The sizes themselves
 * only tune QEMU's metadata caches; ours size themselves, so they are checked, not used.
 */
function checkOptions(o: Record<string, any>, clusterSize: number, version: number): void {
  const combined = o['cache-size'];
  const l2 = o['l2-cache-size'];
  const refcount = o['refcount-cache-size'];
  if (combined !== undefined) {
    if (l2 !== undefined && refcount !== undefined) {
      throw genericError('cache-size, l2-cache-size and refcount-cache-size may not be set at the same time');
    } else if (l2 !== undefined && l2 > combined) {
      throw genericError('l2-cache-size may not exceed cache-size');
    } else if ((refcount ?? 0) > combined) {
      throw genericError('refcount-cache-size may not exceed cache-size');
    }
  }
  const entry = o['l2-cache-entry-size'] ?? clusterSize;
  if (entry < 512 || entry > clusterSize || (entry & (entry - 1)) !== 0) {
    throw genericError(`L2 cache entry size must be a power of two between 512 and the cluster size (${clusterSize})`);
  }
  // A negative interval reaches QEMU as a huge unsigned number.
  const interval = o['cache-clean-interval'];
  if (interval !== undefined && (interval < 0 || interval > 0xffffffff)) throw genericError('Cache clean interval too big');
  if (o['lazy-refcounts'] === true && version < 3) {
    throw genericError('Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level');
  }
}

export async function openImage(file: BlockNode, backing: BlockNode | undefined, opts: OpenOptions): Promise<Qcow2Image> {
  const h = await readHeader(file);
  const cs = 2 ** h.clusterBits;
  if (opts.options?.['data-file'] !== undefined) {
    // An image with an external data file was refused by readHeader (not supported here).
    throw genericError("'data-file' can only be set for images with an external data file");
  }
  if (opts.options) checkOptions(opts.options, cs, h.version);
  if (!opts.readOnly && (Number(h.incompatible & 0xffn) & INCOMPAT_CORRUPT)) {
    throw genericError('qcow2: Image is corrupt; cannot be opened read/write');
  }
  const l2Entries = cs / ((Number(h.incompatible & 0xffn) & 0x10) ? 16 : 8);
  if (h.l1Size < Math.ceil(h.size / (l2Entries * cs))) throw genericError('L1 table is too small');
  if (h.l1Size > 0 && (h.l1TableOffset % cs !== 0)) throw genericError('Invalid L1 table offset');
  if (h.refcountTableOffset % cs !== 0) throw genericError('Invalid reference count table offset');
  const l1 = Buffer.alloc(h.l1Size * 8);
  if (l1.length > 0) await readPadded(file, h.l1TableOffset, l1);
  const rt = Buffer.alloc(h.refcountTableClusters * cs);
  if (rt.length > 0) await readPadded(file, h.refcountTableOffset, rt);
  // Unknown autoclear bits are cleared (their extensions are stale once we write); the bitmaps
  // bit stays: we keep bitmaps in sync (bitmaps.ts).
  const keep = BigInt(AUTOCLEAR_BITMAPS);
  if (!opts.readOnly && h.version >= 3 && (h.autoclear & ~keep) !== 0n) {
    h.autoclear &= keep;
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(h.autoclear);
    await file.write(OFF_AUTOCLEAR, b);
    await file.flush();
  }
  const img = new Qcow2Image(file, backing, h, l1, rt, opts.passDiscard);
  img.bitmapDir = await readBitmapDirectory(img);
  // A bitmaps extension without the autoclear bit was left by a program without bitmap support:
  // QEMU ignores the bitmaps and drops the extension at a read-write open.
  if (!opts.readOnly && img.bitmapDir === undefined && h.extensions.some((e) => e.type === EXT_BITMAPS)) {
    await writeBitmapsHeader(img);
  }
  try {
    await readSnapshots(img);
  } catch (e) {
    throw genericError((e as Error).message);
  }
  // A dirty image opened read-write is repaired first, as QEMU's qcow2_do_open() does.
  if (!opts.readOnly) await img.repairRefcounts();
  return img;
}

/** Reads a table that may extend past the end of the file (the rest reads as zeroes). */
async function readPadded(file: BlockNode, offset: number, buf: Buffer): Promise<void> {
  const avail = Math.max(0, Math.min(buf.length, file.getLength() - offset));
  if (avail > 0) await file.read(offset, buf.subarray(0, avail));
}
