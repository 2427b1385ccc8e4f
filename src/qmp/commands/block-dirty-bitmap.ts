// Commands of schema/block-dirty-bitmap.json: dirty bitmaps and the write threshold, with QEMU 7.2's checks and messages.
import type { CommandHandler } from './types.js';
import { genericError } from '../../qapi/errors.js';
import type { BlockNode } from '../../block/node.js';
import type { Daemon } from '../../daemon.js';
import { qcow2CheckCanStoreBitmap, qcow2RemoveStoredBitmap, type Qcow2State } from '../../block/qcow2/index.js';
import {
  BITMAP_MAX_NAME_SIZE, DirtyBitmap, findDirtyBitmap, nodeTracking, setBitmapGraphAccess, setWriteThresholdListener,
} from '../../block/dirty-bitmap.js';

/** QEMU's BDRV_BITMAP_* check flags. */
const CHECK_BUSY = 1;
const CHECK_RO = 2;
const CHECK_INCONSISTENT = 4;
export const BITMAP_CHECK_DEFAULT = CHECK_BUSY | CHECK_RO | CHECK_INCONSISTENT;
export const BITMAP_CHECK_ALLOW_RO = CHECK_BUSY | CHECK_INCONSISTENT;

/** QEMU's bdrv_dirty_bitmap_check. */
export function checkBitmap(bitmap: DirtyBitmap, flags: number): void {
  if (flags & CHECK_BUSY && bitmap.busy) {
    throw genericError(`Bitmap '${bitmap.name}' is currently in use by another operation and cannot be used`);
  }
  if (flags & CHECK_RO && bitmap.readonly) {
    throw genericError(`Bitmap '${bitmap.name}' is readonly and cannot be modified`);
  }
  if (flags & CHECK_INCONSISTENT && bitmap.inconsistent) {
    throw genericError(`Bitmap '${bitmap.name}' is inconsistent and cannot be used`);
  }
}

/** QEMU's block_dirty_bitmap_lookup. */
export function lookupBitmap(daemon: Daemon, node: string, name: string): DirtyBitmap {
  const bs = daemon.graph.lookup(node);
  if (!bs) throw genericError(`Node '${node}' not found`);
  const bitmap = findDirtyBitmap(bs, name);
  if (!bitmap) throw genericError(`Dirty bitmap '${name}' not found`);
  return bitmap;
}

/** QEMU's bdrv_get_default_bitmap_granularity: the cluster size within [4 KiB, 64 KiB], else 64 KiB. */
function defaultGranularity(node: BlockNode): number {
  const cluster = node.driver.imageInfo?.(node.state)['cluster-size'];
  return cluster !== undefined && cluster > 0 ? Math.min(65536, Math.max(4096, cluster)) : 65536;
}

/** QEMU's bdrv_merge_dirty_bitmap: both checked, and of the same size. */
function mergeInto(dst: DirtyBitmap, src: DirtyBitmap): void {
  checkBitmap(dst, BITMAP_CHECK_DEFAULT);
  checkBitmap(src, BITMAP_CHECK_ALLOW_RO);
  if (src.size !== dst.size) {
    throw genericError(`Bitmaps are of different sizes (destination size is ${dst.size}, source size is ${src.size}) and can't be merged`);
  }
  dst.mergeFrom(src);
}

export const blockDirtyBitmapCommands: Record<string, CommandHandler> = {
  'block-dirty-bitmap-add'(args: { node: string; name: string; granularity?: number; persistent?: boolean; disabled?: boolean }, { daemon }) {
    // NBD exports resolve {node, name} bitmaps through this (see lookupBitmapNode).
    setBitmapGraphAccess({
      lookup: (nodeName) => daemon.graph.lookup(nodeName),
      hasWriter: (n) => [...daemon.graph.entry(n.nodeName)?.users ?? []].some((u) => u.perms.has('write')),
    });
    const { node, name, granularity, persistent = false, disabled = false } = args;
    if (name === '') throw genericError('Bitmap name cannot be empty');
    const bs = daemon.graph.lookup(node);
    if (!bs) throw genericError(`Cannot find device='${node}' nor node-name='${node}'`);
    if (granularity !== undefined && (granularity < 512 || (granularity & (granularity - 1)) !== 0)) {
      throw genericError('Granularity must be power of 2 and at least 512');
    }
    const gran = granularity ?? defaultGranularity(bs);
    if (persistent) {
      // Only qcow2 stores bitmaps (its bitmaps extension); other drivers refuse as QEMU's do.
      if (bs.driver.name !== 'qcow2') throw genericError(`Can't store persistent bitmaps to ${bs.nodeName}: Operation not supported`);
      try {
        qcow2CheckCanStoreBitmap(bs.state as Qcow2State, name, gran);
      } catch (e) {
        throw genericError(`Can't make bitmap '${name}' persistent in '${bs.nodeName}': ${(e as Error).message}`);
      }
    }
    if (findDirtyBitmap(bs, name)) throw genericError(`Bitmap already exists: ${name}`);
    if (Buffer.byteLength(name) > BITMAP_MAX_NAME_SIZE) throw genericError(`Bitmap name too long: ${name}`);
    const bitmap = new DirtyBitmap(bs, name, gran, bs.getLength());
    if (disabled) bitmap.setEnabled(false);
    bitmap.persistent = persistent;
    return {};
  },

  async 'block-dirty-bitmap-remove'(args: { node: string; name: string }, { daemon }) {
    const bitmap = lookupBitmap(daemon, args.node, args.name);
    checkBitmap(bitmap, CHECK_BUSY | CHECK_RO);
    // The node by name: after a node replacement bitmap.node may be the other object.
    const bs = daemon.graph.lookup(args.node)!;
    if (bitmap.persistent && bs.driver.name === 'qcow2') await qcow2RemoveStoredBitmap(bs.state as Qcow2State, bitmap.name);
    bitmap.release();
    return {};
  },

  'block-dirty-bitmap-clear'(args: { node: string; name: string }, { daemon }) {
    const bitmap = lookupBitmap(daemon, args.node, args.name);
    checkBitmap(bitmap, BITMAP_CHECK_DEFAULT);
    bitmap.clear();
    return {};
  },

  'block-dirty-bitmap-enable'(args: { node: string; name: string }, { daemon }) {
    const bitmap = lookupBitmap(daemon, args.node, args.name);
    checkBitmap(bitmap, BITMAP_CHECK_ALLOW_RO);
    bitmap.setEnabled(true);
    return {};
  },

  'block-dirty-bitmap-disable'(args: { node: string; name: string }, { daemon }) {
    const bitmap = lookupBitmap(daemon, args.node, args.name);
    checkBitmap(bitmap, BITMAP_CHECK_ALLOW_RO);
    bitmap.setEnabled(false);
    return {};
  },

  'block-dirty-bitmap-merge'(args: { node: string; target: string; bitmaps: (string | { node: string; name: string })[] }, { daemon }) {
    const dst = lookupBitmap(daemon, args.node, args.target);
    // QEMU 7.2 refuses a busy or read-only target before looking at the sources.
    checkBitmap(dst, BITMAP_CHECK_DEFAULT);
    const bs = dst.node;
    // Sources are merged into an anonymous bitmap first, so that the target is unchanged on error.
    const anon = new DirtyBitmap(bs, '', dst.granularity, bs.getLength());
    anon.setEnabled(false);
    try {
      for (const item of args.bitmaps) {
        let src: DirtyBitmap | undefined;
        if (typeof item === 'string') {
          src = findDirtyBitmap(bs, item);
          if (!src || src === anon) throw genericError(`Dirty bitmap '${item}' not found`);
        } else {
          src = lookupBitmap(daemon, item.node, item.name);
        }
        mergeInto(anon, src);
      }
      mergeInto(dst, anon);
    } finally {
      anon.release();
    }
    return {};
  },

  'x-debug-block-dirty-bitmap-sha256'(args: { node: string; name: string }, { daemon }) {
    return { sha256: lookupBitmap(daemon, args.node, args.name).sha256() };
  },

  'block-set-write-threshold'(args: { 'node-name': string; 'write-threshold': number }, { daemon }) {
    const { 'node-name': nodeName, 'write-threshold': threshold } = args;
    const bs = daemon.graph.lookup(nodeName);
    if (!bs) throw genericError(`Device '${nodeName}' not found`);
    setWriteThresholdListener((data) => daemon.emitEvent('BLOCK_WRITE_THRESHOLD', data));
    nodeTracking(bs).setWriteThreshold(Number(threshold));
    return {};
  },
};
