// copy-on-read: the filter driver whose reads copy data found below its child into the child.
import type { BlockDriver, BlockStatus } from './driver.js';
import type { BlockNode } from './node.js';
import { genericError } from '../qapi/errors.js';
import { allocatedAbove, layerAllocated } from '../jobs/job-context.js';
import { filterImageInfo } from './throttle.js';

interface CorState {
  file: BlockNode;
  /** The lowest backing node whose data is copied (inclusive); undefined = the whole chain. */
  bottom?: BlockNode;
}

/** QEMU's MAX_BOUNCE_BUFFER: the largest piece copied at once. */
const MAX_BOUNCE = 32768 * 512;

/** The bottom node by name in the child's backing chain (QEMU refuses filters there). */
function findBottom(file: BlockNode, name: string): BlockNode {
  for (let n: BlockNode | undefined = file; n; n = n.backing ?? (isFilter(n) ? n.file : undefined)) {
    if (n.nodeName !== name) continue;
    if (isFilter(n)) throw genericError(`Bottom node '${name}' is a filter`);
    return n;
  }
  throw genericError(`Bottom node '${name}' not found`);
}

function isFilter(node: BlockNode): boolean {
  return ['copy-on-read', 'throttle', 'blkdebug'].includes(node.driver.name);
}

/**
 * QEMU's bdrv_co_do_copy_on_readv: the cluster-aligned range around [offset, offset+buf.length)
 * is read through the child; what the child lacks is written into it, then the caller's part copied out.
 */
async function copyOnRead(file: BlockNode, offset: number, buf: Buffer): Promise<void> {
  const info = file.driver.imageInfo?.(file.state) ?? {};
  const cluster = info['cluster-size'] ?? Math.max(1, file.requestAlignment());
  const length = file.getLength();
  let pos = Math.floor(offset / cluster) * cluster;
  const end = Math.min(length, Math.ceil((offset + buf.length) / cluster) * cluster);
  while (pos < end) {
    const own = await layerAllocated(file, pos, end - pos);
    let n = Math.min(own.pnum, end - pos);
    if (n <= 0) break;
    const from = Math.max(pos, offset);
    const to = Math.min(pos + n, offset + buf.length);
    if (own.allocated) {
      if (to > from) await file.read(from, buf.subarray(from - offset, to - offset));
    } else {
      n = Math.min(n, MAX_BOUNCE);
      const bounce = Buffer.allocUnsafe(n);
      await file.read(pos, bounce);
      // As QEMU: an all-zero piece is written as zeroes, so the child can keep it sparse.
      if (file.driver.writeZeroes && bounce.every((b) => b === 0)) await file.writeZeroes(pos, n, {});
      else await file.write(pos, bounce, {});
      const toN = Math.min(pos + n, offset + buf.length);
      if (toN > from) bounce.copy(buf, from - offset, from - pos, toN - pos);
    }
    pos += n;
  }
}

/** Served in the main loop only (no openReplica): copies write into the child's metadata. */
export const copyOnReadDriver: BlockDriver<CorState> = {
  name: 'copy-on-read',
  isFilter: true,
  isProtocol: false,
  async open(node, options) {
    const file = node.file!;
    // QEMU's filter always asks its child for 'write unchanged' (copies go into it), so a
    // read-only child is refused when attached, whatever the filter's own read-only option says.
    if (file.readOnly) throw genericError('Block node is read-only');
    const bottom = options.bottom === undefined ? undefined : findBottom(file, options.bottom as string);
    return { file, bottom };
  },
  async close() {},
  getLength: (state) => state.file.getLength(),
  getAllocatedFileSize: (state) => state.file.getAllocatedFileSize(),
  requestAlignment: (state) => state.file.requestAlignment(),
  async read(state, offset, buf) {
    const { file, bottom } = state;
    for (let pos = 0; pos < buf.length;) {
      const off = offset + pos;
      const own = await layerAllocated(file, off, buf.length - pos);
      let n = Math.min(own.pnum, buf.length - pos);
      let copy = false;
      const backing = file.backing;
      if (!own.allocated && backing && bottom !== file) {
        const below = await allocatedAbove(backing, bottom, off, n);
        n = Math.min(n, below.pnum);
        copy = below.allocated;
      }
      if (n <= 0) {
        // Past the end of the backing chain: what is left reads as the child has it.
        await file.read(off, buf.subarray(pos));
        return;
      }
      const view = buf.subarray(pos, pos + n);
      if (copy) await copyOnRead(file, off, view);
      else await file.read(off, view);
      pos += n;
    }
  },
  write: (state, offset, buf, flags) => state.file.write(offset, buf, flags),
  writeZeroes: (state, offset, bytes, flags) => state.file.writeZeroes(offset, bytes, flags),
  discard: (state, offset, bytes) => state.file.discard(offset, bytes),
  flush: (state) => state.file.flush(),
  blockStatus: (state, offset, bytes): Promise<BlockStatus> => state.file.blockStatus(offset, bytes),
  imageInfo: (state) => filterImageInfo(state.file),
};
