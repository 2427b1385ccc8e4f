// qcow2 block driver: the BlockDriver table over Qcow2Image (docs/interop/qcow2.txt).
//
// Concurrency design: one async metadata mutex plus per-guest-cluster in-flight tracking.
// - Reads and in-place writes (cluster allocated, refcount 1) take no lock: they look the L2
//   entry up in the cache and go straight to the file, so the common path costs no queueing.
// - A write that needs allocation (or COW from backing/compressed/shared clusters) marks its
//   guest clusters busy synchronously right after planning (no await in between, so two writers
//   can never plan the same cluster), allocates under the mutex, writes data and COW head/tail
//   outside it, then updates L2 under the mutex and releases the clusters. Reads, writes,
//   zeroing and discards that touch a busy cluster wait for it. This keeps concurrent 64-deep
//   queues from allocating twice or losing data without serializing all I/O behind one lock.
// - Metadata is write-back: L2 tables and refcount blocks are dirty in memory and written in
//   dependency order on flush (refcounts, flush, L2 tables, flush, then refcount decrements for
//   clusters the L2 change dropped), so a kill -9 at any point leaves leaks at worst. New L2
//   tables, refcount blocks and tables are written through before anything points at them.
//   Lazy refcounts are never used by us; a dirty image is repaired when opened read-write (as
//   QEMU does), or only appended to (never reusing space) while read-only.
// TODO(#5): describe()/openReplica() for iothread replicas; until then qcow2 nodes are served
// from the main thread only (the agreed fallback).
import { constants as osConstants } from 'node:os';
import { dirname, isAbsolute } from 'node:path';
import type { BlockDriver, DriverImageInfo, PreallocMode } from '../driver.js';
import { BlockIoError, type BlockNode } from '../node.js';
import { genericError } from '../../qapi/errors.js';
import { QCOW2_MAGIC } from './header.js';
import type { Qcow2Image } from './image.js';
import { openImage } from './open.js';
import { nodeBitmaps } from '../dirty-bitmap.js';
import { checkCanStoreNew, loadBitmaps, removeStoredBitmap, storeBitmaps } from './bitmaps.js';
import { createSnapshot, deleteSnapshot, findSnapshot, snapshotInfo, snapshotList, type NewSnapshot } from './snapshots.js';

export { qcow2BackingInfo } from './header.js';
export { qcow2Create, type Qcow2CreateOptions } from './create.js';
export { qcow2ChangeBackingFile, qcow2SetBackingNode } from './backing.js';

const { EINVAL } = osConstants.errno;

/** Per-node state of the qcow2 driver. */
export interface Qcow2State {
  img: Qcow2Image;
  node: BlockNode;
  /** discard=unmap on this node: discards and MAY_UNMAP are honoured. */
  unmap: boolean;
  /** Opened read-write: stored bitmaps were marked in_use and must be written back at close. */
  openedRw: boolean;
}

/** QEMU's path_combine(): a relative backing name is relative to the image's directory. */
function fullBackingName(imageFilename: string | undefined, backing: string): string {
  if (isAbsolute(backing) || backing.includes(':') || imageFilename === undefined) return backing;
  const dir = imageFilename.includes('/') ? dirname(imageFilename) + '/' : '';
  return dir + backing;
}

/**
 * QEMU's bdrv_can_store_new_dirty_bitmap for a qcow2 node: throws an Error whose message is
 * QEMU's reason (the caller adds "Can't make bitmap … persistent in …: ").
 */
export function qcow2CheckCanStoreBitmap(state: Qcow2State, name: string, granularity: number): void {
  checkCanStoreNew(state.img, state.node, name, granularity);
}

/** Removes a persistent bitmap from the image right away (block-dirty-bitmap-remove). */
export function qcow2RemoveStoredBitmap(state: Qcow2State, name: string): Promise<void> {
  return removeStoredBitmap(state.img, name);
}

/** pass-discard-snapshot: QEMU discards clusters freed by snapshot operations unless told not to. */
function snapshotOpts(state: Qcow2State) {
  return { passDiscard: (state.node.options['pass-discard-snapshot'] as boolean | undefined) ?? true };
}

/** bdrv_snapshot_create on a qcow2 node: the new snapshot's SnapshotInfo. */
export async function qcow2SnapshotCreate(state: Qcow2State, sn: NewSnapshot): Promise<Record<string, unknown>> {
  return snapshotInfo(await createSnapshot(state.img, sn, snapshotOpts(state)));
}

/** bdrv_snapshot_find_by_id_and_name on a qcow2 node: the snapshot's SnapshotInfo, if any. */
export function qcow2SnapshotFind(state: Qcow2State, id?: string, name?: string): Record<string, unknown> | undefined {
  const i = findSnapshot(state.img, id, name);
  return i < 0 ? undefined : snapshotInfo(snapshotList(state.img)[i]!);
}

/**
 * bdrv_snapshot_delete on a qcow2 node. Throws an Error with QEMU's message and `errno`
 * (the caller appends strerror as error_setg_errno does).
 */
export async function qcow2SnapshotDelete(state: Qcow2State, id?: string, name?: string): Promise<Record<string, unknown>> {
  const i = findSnapshot(state.img, id, name);
  if (i < 0) throw Object.assign(new Error("Can't find the snapshot"), { errno: osConstants.errno.ENOENT });
  return snapshotInfo(await deleteSnapshot(state.img, i, snapshotOpts(state)));
}

export const qcow2Driver: BlockDriver<Qcow2State> = {
  metadataChild: true,
  name: 'qcow2',
  isProtocol: false,

  probe(header: Buffer): number {
    return header.length >= 8 && header.readUInt32BE(0) === QCOW2_MAGIC && header.readUInt32BE(4) >= 2 ? 100 : 0;
  },

  async open(node, options) {
    const file = node.children.get('file');
    if (file === undefined) throw genericError("Parameter 'file' is missing");
    const unmap = options.discard === 'unmap';
    const passDiscard = (options['pass-discard-request'] as boolean | undefined) ?? unmap;
    const img = await openImage(file, node.children.get('backing'), { readOnly: node.readOnly, passDiscard, options });
    try {
      await loadBitmaps(img, node, node.readOnly);
    } catch (e) {
      // The node never comes to exist: drop what was loaded before the error.
      for (const b of [...nodeBitmaps(node)]) b.release();
      throw e;
    }
    return { img, node, unmap, openedRw: !node.readOnly };
  },

  async close(state) {
    if (state.node.readOnly) {
      // Opened read-write, made read-only later (e.g. under a snapshot overlay): QEMU stores the
      // bitmaps when it reopens the node read-only; there is no reopen hook here, so they are
      // stored now, through the file opened read-write at open (its descriptor still is).
      if (!state.openedRw) return;
      const file = state.img.file;
      const fileRo = file.readOnly;
      file.readOnly = false;
      try {
        await storeBitmaps(state.img, state.node);
        await state.img.flush();
      } finally {
        file.readOnly = fileRo;
      }
      return;
    }
    // Persistent bitmaps go back to the image (in_use cleared) before the final flush; if that
    // fails they stay in_use (inconsistent next time) but the image data is still flushed.
    try {
      await storeBitmaps(state.img, state.node);
    } finally {
      await state.img.flush();
    }
  },

  getLength(state) {
    return state.img.size;
  },

  async getAllocatedFileSize(state) {
    return state.img.file.getAllocatedFileSize();
  },

  read(state, offset, buf) {
    return state.img.read(offset, buf);
  },

  readNow: (state, offset, buf) => state.img.readNow(offset, buf),
  // FUA needs the image flushed: the asynchronous path.
  writeNow: (state, offset, buf, flags) => !flags.fua && state.img.writeNow(offset, buf),

  async write(state, offset, buf, flags) {
    await state.img.write(offset, buf);
    if (flags.fua) await state.img.flush();
  },

  async writeZeroes(state, offset, bytes, flags) {
    await state.img.writeZeroes(offset, bytes, state.unmap && flags.mayUnmap === true);
    if (flags.fua) await state.img.flush();
  },

  async discard(state, offset, bytes) {
    // QEMU drops discards on nodes opened with discard=ignore (the default).
    if (!state.unmap) return;
    await state.img.discard(offset, bytes);
  },

  flush(state) {
    return state.img.flush();
  },

  async truncate(state, size, _exact, prealloc: PreallocMode) {
    if (prealloc !== 'off' && size < state.img.size) {
      throw new BlockIoError(EINVAL, "Preallocation can't be used for shrinking an image");
    }
    // Growing with preallocation: qcow2 stays sparse; the new range reads as zeroes either way.
    await state.img.truncate(size);
  },

  blockStatus(state, offset, bytes) {
    return state.img.blockStatus(offset, bytes);
  },

  imageInfo(state): DriverImageInfo {
    const img = state.img;
    const h = img.h;
    const data: Record<string, unknown> = h.version >= 3
      ? {
          compat: '1.1',
          'compression-type': h.compressionType === 1 ? 'zstd' : 'zlib',
          'lazy-refcounts': img.lazyRefcounts,
          'refcount-bits': 2 ** h.refcountOrder,
          corrupt: img.corrupt,
          'extended-l2': img.ext,
        }
      : { compat: '0.10', 'compression-type': 'zlib', 'refcount-bits': 16 };
    const info: DriverImageInfo = {
      'cluster-size': img.cs,
      'dirty-flag': img.dirty,
      'format-specific': { type: 'qcow2', data },
    };
    const snapshots = snapshotList(img);
    if (snapshots.length > 0) info.snapshots = snapshots.map(snapshotInfo);
    if (h.backingFile !== undefined) {
      info['backing-filename'] = h.backingFile;
      info['full-backing-filename'] = fullBackingName(img.file.options.filename as string | undefined, h.backingFile);
      if (h.backingFormat !== undefined) info['backing-filename-format'] = h.backingFormat;
    }
    return info;
  },
};
