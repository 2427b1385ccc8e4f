// qcow2 backing links: attach a different backing node, and rewrite the header's backing file name.
import type { BlockNode } from '../node.js';
import { genericError } from '../../qapi/errors.js';
import { EXT_BACKING_FORMAT, EXT_END } from './header.js';
import type { Qcow2State } from './index.js';

/** The node this image reads unallocated ranges from (the graph keeps node.children in step). */
export function qcow2SetBackingNode(state: Qcow2State, backing: BlockNode | undefined): void {
  state.img.backing = backing;
}

/**
 * QEMU's qcow2_change_backing_file(): the header names `backingFile` (none if undefined) with
 * `backingFormat` as its format extension. Cluster 0 is rebuilt as QEMU lays it out: fixed header,
 * the backing format extension first, every other extension as it was, the end marker, then the name.
 */
export async function qcow2ChangeBackingFile(state: Qcow2State, backingFile?: string, backingFormat?: string): Promise<void> {
  const img = state.img;
  const h = img.h;
  const name = backingFile === undefined ? undefined : Buffer.from(backingFile, 'latin1');
  if (name && name.length > 1023) throw genericError('Could not change the backing file: File name too long');
  const exts = h.extensions.filter((e) => e.type !== EXT_BACKING_FORMAT);
  if (backingFile !== undefined && backingFormat !== undefined) {
    exts.unshift({ type: EXT_BACKING_FORMAT, data: Buffer.from(backingFormat, 'latin1') });
  }
  const area = Buffer.alloc(img.cs);
  let off = h.headerLength;
  for (const e of exts) {
    const padded = (e.data.length + 7) & ~7;
    if (off + 8 + padded + 8 > img.cs) throw genericError('Could not change the backing file: No space left on device');
    area.writeUInt32BE(e.type, off);
    area.writeUInt32BE(e.data.length, off + 4);
    e.data.copy(area, off + 8);
    off += 8 + padded;
  }
  area.writeUInt32BE(EXT_END, off);
  off += 8;
  if (name && off + name.length > img.cs) throw genericError('Could not change the backing file: No space left on device');
  name?.copy(area, off);
  await img.meta.run(async () => {
    // Everything the old header described stays valid; only the fixed fields 8..20 change.
    const fixed = Buffer.alloc(h.headerLength);
    await img.file.read(0, fixed);
    fixed.writeBigUInt64BE(name ? BigInt(off) : 0n, 8);
    fixed.writeUInt32BE(name ? name.length : 0, 16);
    fixed.copy(area, 0);
    await img.flushLocked();
    await img.file.write(0, area.subarray(0, name ? off + name.length : off));
    await img.file.flush();
  });
  h.extensions = exts;
  h.backingFile = backingFile;
  h.backingFormat = backingFile !== undefined ? backingFormat : undefined;
  h.backingFileOffset = name ? off : 0;
  h.backingFileSize = name ? name.length : 0;
}
