// qcow2 persistent dirty bitmaps: the bitmaps header extension, the bitmap directory and tables (docs/interop/qcow2.txt).
//
// Life cycle, as QEMU 7.2: at a read-write open every stored bitmap is loaded and marked in_use in
// the image (the directory is rewritten in place); one already in_use was not stored cleanly and
// is loaded empty and inconsistent. At close the in-memory persistent bitmaps are written to new
// clusters, then a new directory, then the header points at it, and only then the old tables and
// directory are freed: a crash at any point leaves the old or the new state plus leaks at worst.
// New persistent bitmaps reach the image only at close (QEMU does the same). Read-only nodes load
// bitmaps read-only and never write.
import type { BlockNode } from '../node.js';
import { genericError } from '../../qapi/errors.js';
import { DirtyBitmap, nodeBitmaps } from '../dirty-bitmap.js';
import { AUTOCLEAR_BITMAPS, EXT_FEATURE_TABLE, OFF_AUTOCLEAR } from './header.js';
import type { Qcow2Image } from './image.js';
import { setTableEntry, tableOffset } from './refcount.js';

export const EXT_BITMAPS = 0x23852875;
const FLAG_IN_USE = 1;
const FLAG_AUTO = 2;
const FLAG_EXTRA_DATA_COMPATIBLE = 4;
const FLAGS_RESERVED = ~7 >>> 0;
const TYPE_DIRTY_TRACKING = 1;
/** QEMU's limits (block/qcow2.h, qcow2-bitmap.c). */
export const QCOW2_MAX_BITMAPS = 65535;
const QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS;
const BME_MAX_TABLE_SIZE = 0x8000000;
const BME_MAX_PHYS_SIZE = 0x20000000;
const BME_MAX_GRANULARITY_BITS = 31;
const BME_MIN_GRANULARITY_BITS = 9;
const BME_MAX_NAME_SIZE = 1023;
const DIR_ENTRY_FIXED = 24;

/** One bitmap directory entry. */
export interface StoredBitmap {
  name: string;
  flags: number;
  granularityBits: number;
  tableOffset: number;
  /** Entries of the bitmap table (one per cluster of serialized bits). */
  tableSize: number;
  /** Extra data QEMU keeps verbatim (only when flagged compatible). */
  extra: Buffer;
}

/** The stored-bitmaps state of one open image. */
export interface BitmapDirectory {
  list: StoredBitmap[];
  offset: number;
  size: number;
}

const align8 = (n: number) => (n + 7) & ~7;
const entrySize = (nameBytes: number, extra: number) => align8(DIR_ENTRY_FIXED + extra + nameBytes);

/** Bytes of serialized bits for a node of `length` bytes (QEMU's get_bitmap_bytes_needed). */
function bitmapBytes(length: number, granularity: number): number {
  return Math.ceil(Math.ceil(length / granularity) / 8);
}

/**
 * Reads the bitmaps extension and the directory it names. Returns undefined when the image has
 * none, or when the autoclear bit says a program without bitmap support wrote it (the caller then
 * drops the extension at a read-write open, as QEMU does).
 */
export async function readBitmapDirectory(img: Qcow2Image): Promise<BitmapDirectory | undefined> {
  const ext = img.h.extensions.find((e) => e.type === EXT_BITMAPS);
  if (ext === undefined) return undefined;
  if ((img.h.autoclear & BigInt(AUTOCLEAR_BITMAPS)) === 0n) {
    // QEMU's warn_report and hint (the hint without a final newline, as QEMU prints it).
    const what = img.h.version < 3
      ? 'This qcow2 v2 image contains bitmaps, but they may have been modified by a program without persistent bitmap support; so now they must all be considered inconsistent'
      : 'a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent';
    process.stderr.write(`qsd-ts: warning: ${what}\nSome clusters may be leaked, run 'qemu-img check -r' on the image file to fix.`);
    return undefined;
  }
  const d = ext.data;
  if (d.length !== 24) throw genericError('bitmaps_ext: Invalid extension length');
  const nb = d.readUInt32BE(0);
  if (d.readUInt32BE(4) !== 0) throw genericError('bitmaps_ext: Reserved field is not zero');
  const size = Number(d.readBigUInt64BE(8));
  const offset = Number(d.readBigUInt64BE(16));
  if (nb > QCOW2_MAX_BITMAPS) {
    throw genericError(`bitmaps_ext: Image has ${nb} bitmaps, exceeding the QEMU supported maximum of ${QCOW2_MAX_BITMAPS}`);
  }
  if (nb === 0) throw genericError('found bitmaps extension with zero bitmaps');
  if (offset % img.cs !== 0) throw genericError('bitmaps_ext: invalid bitmap directory offset');
  if (size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE) {
    throw genericError(`bitmaps_ext: bitmap directory size (${size}) exceeds the maximum supported size (${QCOW2_MAX_BITMAP_DIRECTORY_SIZE})`);
  }
  const buf = Buffer.alloc(size);
  if (offset + size > img.file.getLength()) throw genericError('Failed to read bitmap directory: Input/output error');
  await img.file.read(offset, buf);
  const list: StoredBitmap[] = [];
  let pos = 0;
  for (let i = 0; i < nb; i++) {
    if (pos + DIR_ENTRY_FIXED > size) throw genericError('Bitmap directory is corrupted');
    const flags = buf.readUInt32BE(pos + 12);
    const type = buf[pos + 16]!;
    const granularityBits = buf[pos + 17]!;
    const nameSize = buf.readUInt16BE(pos + 18);
    const extraSize = buf.readUInt32BE(pos + 20);
    const e = entrySize(nameSize, extraSize);
    if (pos + e > size) throw genericError('Bitmap directory is corrupted');
    const sb: StoredBitmap = {
      tableOffset: tableOffset(buf.subarray(pos, pos + 8), 0),
      tableSize: buf.readUInt32BE(pos + 8),
      flags,
      granularityBits,
      extra: Buffer.from(buf.subarray(pos + DIR_ENTRY_FIXED, pos + DIR_ENTRY_FIXED + extraSize)),
      name: buf.subarray(pos + DIR_ENTRY_FIXED + extraSize, pos + DIR_ENTRY_FIXED + extraSize + nameSize).toString('utf8'),
    };
    // QEMU's check_dir_entry.
    const bad = sb.tableSize * img.cs > BME_MAX_PHYS_SIZE || sb.tableSize > BME_MAX_TABLE_SIZE ||
      sb.tableOffset % img.cs !== 0 || granularityBits > BME_MAX_GRANULARITY_BITS ||
      granularityBits < BME_MIN_GRANULARITY_BITS || (flags & FLAGS_RESERVED) !== 0 ||
      nameSize > BME_MAX_NAME_SIZE || type !== TYPE_DIRTY_TRACKING ||
      (extraSize !== 0 && (flags & FLAG_EXTRA_DATA_COMPATIBLE) === 0);
    if (bad) throw genericError('Bitmap directory is corrupted');
    list.push(sb);
    pos += e;
  }
  return { list, offset, size };
}

function serializeDirectory(list: StoredBitmap[]): Buffer {
  const names = list.map((b) => Buffer.from(b.name, 'utf8'));
  const total = list.reduce((n, b, i) => n + entrySize(names[i]!.length, b.extra.length), 0);
  const buf = Buffer.alloc(total);
  let pos = 0;
  list.forEach((b, i) => {
    setTableEntry(buf.subarray(pos, pos + 8), 0, b.tableOffset);
    buf.writeUInt32BE(b.tableSize, pos + 8);
    buf.writeUInt32BE(b.flags >>> 0, pos + 12);
    buf[pos + 16] = TYPE_DIRTY_TRACKING;
    buf[pos + 17] = b.granularityBits;
    buf.writeUInt16BE(names[i]!.length, pos + 18);
    buf.writeUInt32BE(b.extra.length, pos + 20);
    b.extra.copy(buf, pos + DIR_ENTRY_FIXED);
    names[i]!.copy(buf, pos + DIR_ENTRY_FIXED + b.extra.length);
    pos += entrySize(names[i]!.length, b.extra.length);
  });
  return buf;
}

/** Reads a bitmap table (entries as stored). */
async function readTable(img: Qcow2Image, sb: StoredBitmap): Promise<Buffer> {
  const t = Buffer.alloc(sb.tableSize * 8);
  if (t.length > 0) await img.file.read(sb.tableOffset, t);
  return t;
}

/**
 * Loads the image's bitmaps into `node` (called once, right after the image opened). Read-write:
 * marks them in_use in the image before anything else can write.
 */
export async function loadBitmaps(img: Qcow2Image, node: BlockNode, readOnly: boolean): Promise<void> {
  const dir = img.bitmapDir;
  if (dir === undefined) return;
  const cs = img.cs;
  let changed = false;
  for (const sb of dir.list) {
    const gran = 2 ** sb.granularityBits;
    const bm = new DirtyBitmap(node, sb.name, gran, img.size);
    bm.setEnabled(false);
    bm.persistent = true;
    if (sb.flags & FLAG_IN_USE) {
      // Not stored cleanly: the bits are unknown (QEMU's inconsistent bitmap, never written back).
      bm.inconsistent = true;
      continue;
    }
    const need = Math.ceil(bitmapBytes(img.size, gran) / cs);
    if (sb.tableSize !== need) throw genericError(`Bitmap '${sb.name}' is corrupted`);
    const table = await readTable(img, sb);
    const bytes = bm.serialized();
    const cluster = Buffer.alloc(cs);
    for (let i = 0; i < sb.tableSize; i++) {
      const off = tableOffset(table, i);
      const start = i * cs;
      const len = Math.min(cs, bytes.length - start);
      if (off === 0) {
        if (table[i * 8 + 7]! & 1) bytes.fill(0xff, start, start + len);
        continue;
      }
      await img.file.read(off, cluster);
      bytes.set(cluster.subarray(0, len), start);
    }
    bm.trimTail();
    if (sb.flags & FLAG_AUTO) bm.setEnabled(true);
    if (readOnly) bm.readonly = true;
    else {
      sb.flags |= FLAG_IN_USE;
      changed = true;
    }
  }
  if (changed) {
    // The directory keeps its size: rewrite it in place.
    await img.file.write(dir.offset, serializeDirectory(dir.list));
    await img.file.flush();
  }
}

/**
 * QEMU's qcow2_co_can_store_new_dirty_bitmap; throws the reason without QEMU's prefix. The limits
 * count the node's persistent bitmaps in memory (every stored one is loaded), plus the new one.
 */
export function checkCanStoreNew(img: Qcow2Image, node: BlockNode, name: string, granularity: number): void {
  if (img.h.version < 3) throw new Error('Cannot store dirty bitmaps in qcow2 v2 files');
  const bits = Math.log2(granularity);
  if (bits < BME_MIN_GRANULARITY_BITS) throw new Error(`Granularity exceeds minimum (${2 ** BME_MIN_GRANULARITY_BITS} bytes)`);
  if (bits > BME_MAX_GRANULARITY_BITS) throw new Error(`Granularity exceeds maximum (${2 ** BME_MAX_GRANULARITY_BITS} bytes)`);
  const bytes = bitmapBytes(img.size, granularity);
  if (bytes > BME_MAX_PHYS_SIZE || Math.ceil(bytes / img.cs) > BME_MAX_TABLE_SIZE) {
    throw new Error('Too much space will be occupied by the bitmap. Use larger granularity');
  }
  if (Buffer.byteLength(name) > BME_MAX_NAME_SIZE) throw new Error(`Name length exceeds maximum (${BME_MAX_NAME_SIZE} characters)`);
  let count = 1;
  let dirSize = entrySize(Buffer.byteLength(name), 0);
  for (const b of nodeBitmaps(node)) {
    if (!b.persistent) continue;
    count++;
    dirSize += entrySize(Buffer.byteLength(b.name), 0);
  }
  if (count > QCOW2_MAX_BITMAPS) throw new Error('Maximum number of persistent bitmaps is already reached');
  if (dirSize > QCOW2_MAX_BITMAP_DIRECTORY_SIZE) throw new Error('Not enough space in the bitmap directory');
}

/** Frees a bitmap's data clusters and table (caller holds the metadata lock). */
async function freeTable(img: Qcow2Image, sb: StoredBitmap): Promise<void> {
  // A dirty image's refcounts are not trusted: leak rather than free (as image.ts does).
  if (sb.tableOffset === 0 || sb.tableSize === 0 || img.rc.appendOnly) return;
  const table = await readTable(img, sb);
  for (let i = 0; i < sb.tableSize; i++) {
    const off = tableOffset(table, i);
    if (off !== 0) await img.rc.add(off / img.cs, -1);
  }
  const clusters = Math.ceil((sb.tableSize * 8) / img.cs);
  for (let c = 0; c < clusters; c++) await img.rc.add(sb.tableOffset / img.cs + c, -1);
}

/**
 * Makes `list` the image's directory: new clusters, then the header, then the old directory is
 * freed (QEMU's update_ext_header_and_dir). Caller holds the metadata lock; `freeAfter` lists
 * tables to free once nothing points at them.
 */
async function replaceDirectory(img: Qcow2Image, list: StoredBitmap[], freeAfter: StoredBitmap[]): Promise<void> {
  const old = img.bitmapDir;
  let offset = 0;
  let size = 0;
  if (list.length > 0) {
    const buf = serializeDirectory(list);
    size = buf.length;
    offset = await img.rc.alloc(Math.ceil(size / img.cs));
    await img.file.write(offset, buf);
    await img.rc.cache.writeBack();
    await img.file.flush();
  }
  img.bitmapDir = list.length > 0 ? { list, offset, size } : undefined;
  await writeBitmapsHeader(img);
  if (old !== undefined && old.size > 0 && !img.rc.appendOnly) {
    const n = Math.ceil(old.size / img.cs);
    for (let c = 0; c < n; c++) await img.rc.add(old.offset / img.cs + c, -1);
  }
  for (const sb of freeAfter) await freeTable(img, sb);
  await img.rc.cache.writeBack();
  await img.file.flush();
}

/**
 * Rewrites the header extensions with the current bitmaps extension (after the feature table, as
 * QEMU orders them), moving the backing file name after them, and sets the autoclear bit.
 */
export async function writeBitmapsHeader(img: Qcow2Image): Promise<void> {
  const h = img.h;
  const dir = img.bitmapDir;
  const exts = h.extensions.filter((e) => e.type !== EXT_BITMAPS);
  if (dir !== undefined) {
    const data = Buffer.alloc(24);
    data.writeUInt32BE(dir.list.length, 0);
    data.writeBigUInt64BE(BigInt(dir.size), 8);
    data.writeBigUInt64BE(BigInt(dir.offset), 16);
    const ft = exts.findIndex((e) => e.type === EXT_FEATURE_TABLE);
    exts.splice(ft >= 0 ? ft + 1 : exts.length, 0, { type: EXT_BITMAPS, data });
  }
  const parts: Buffer[] = [];
  for (const e of exts) {
    const hd = Buffer.alloc(8);
    hd.writeUInt32BE(e.type, 0);
    hd.writeUInt32BE(e.data.length, 4);
    parts.push(hd, e.data, Buffer.alloc(align8(e.data.length) - e.data.length));
  }
  parts.push(Buffer.alloc(8));
  let area = Buffer.concat(parts);
  const backing = h.backingFile !== undefined ? Buffer.from(h.backingFile, 'latin1') : undefined;
  const backingOffset = backing ? h.headerLength + area.length : 0;
  if (backing) area = Buffer.concat([area, backing]);
  if (h.headerLength + area.length > img.cs) throw genericError('Cannot update the qcow2 header: Operation not supported');
  const oldEnd = h.backingFileOffset > 0 ? h.backingFileOffset + h.backingFileSize : img.cs;
  const region = Buffer.alloc(Math.max(area.length, Math.min(img.cs, oldEnd) - h.headerLength));
  area.copy(region);
  await img.file.write(h.headerLength, region);
  if (backing && backingOffset !== h.backingFileOffset) {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(BigInt(backingOffset));
    await img.file.write(8, b);
    h.backingFileOffset = backingOffset;
  }
  h.extensions = exts;
  // The bit says the extension is in sync; without bitmaps QEMU clears it.
  if (dir !== undefined) h.autoclear |= BigInt(AUTOCLEAR_BITMAPS);
  else h.autoclear &= ~BigInt(AUTOCLEAR_BITMAPS);
  if (h.version >= 3) {
    // v2 headers end at byte 72: there is no autoclear field.
    const ac = Buffer.alloc(8);
    ac.writeBigUInt64BE(h.autoclear);
    await img.file.write(OFF_AUTOCLEAR, ac);
  }
  await img.file.flush();
}

/** Writes one bitmap's bits to fresh clusters; returns the new table offset (lock held). */
async function storeData(img: Qcow2Image, bm: DirtyBitmap): Promise<{ tableOffset: number; tableSize: number }> {
  const cs = img.cs;
  const bytes = bm.serialized();
  const tableSize = Math.ceil(bytes.length / cs);
  const table = Buffer.alloc(tableSize * 8);
  const cluster = Buffer.alloc(cs);
  for (let i = 0; i < tableSize; i++) {
    const part = bytes.subarray(i * cs, Math.min(bytes.length, (i + 1) * cs));
    let zero = true;
    for (let k = 0; k < part.length && zero; k++) zero = part[k] === 0;
    if (zero) continue;
    cluster.fill(0);
    cluster.set(part);
    const off = await img.rc.alloc(1);
    await img.file.write(off, cluster);
    setTableEntry(table, i, off);
  }
  const tableOffset = await img.rc.alloc(Math.ceil(table.length / cs));
  const padded = Buffer.alloc(Math.ceil(table.length / cs) * cs);
  table.copy(padded);
  await img.file.write(tableOffset, padded);
  return { tableOffset, tableSize };
}

/**
 * QEMU's qcow2_store_persistent_dirty_bitmaps: at close of a read-write node. Inconsistent and
 * read-only bitmaps keep their stored state.
 */
export async function storeBitmaps(img: Qcow2Image, node: BlockNode): Promise<void> {
  const all = nodeBitmaps(node).filter((b) => b.persistent);
  const mem = all.filter((b) => !b.inconsistent && !b.readonly);
  if (mem.length === 0 && img.bitmapDir === undefined) return;
  await img.meta.run(async () => {
    // Every stored bitmap was loaded at open; one no longer in memory was released by a path that
    // could not reach the image (a transaction's remove): it leaves the directory now.
    const stored = img.bitmapDir ? img.bitmapDir.list.map((b) => ({ ...b })) : [];
    const list = stored.filter((sb) => all.some((b) => b.name === sb.name));
    const freeAfter: StoredBitmap[] = stored.filter((sb) => !list.includes(sb));
    for (const bm of mem) {
      let sb = list.find((b) => b.name === bm.name);
      if (sb === undefined) {
        sb = { name: bm.name, flags: 0, granularityBits: 0, tableOffset: 0, tableSize: 0, extra: Buffer.alloc(0) };
        list.push(sb);
      } else {
        freeAfter.push({ ...sb });
      }
      const t = await storeData(img, bm);
      sb.tableOffset = t.tableOffset;
      sb.tableSize = t.tableSize;
      sb.granularityBits = Math.log2(bm.granularity);
      sb.flags = (bm.recording ? FLAG_AUTO : 0) | (sb.extra.length > 0 ? FLAG_EXTRA_DATA_COMPATIBLE : 0);
    }
    await img.rc.cache.writeBack();
    await img.file.flush();
    await replaceDirectory(img, list, freeAfter);
  });
}

/** QEMU's qcow2_co_remove_persistent_dirty_bitmap: absence from the image is not an error. */
export async function removeStoredBitmap(img: Qcow2Image, name: string): Promise<void> {
  const dir = img.bitmapDir;
  if (dir === undefined) return;
  const sb = dir.list.find((b) => b.name === name);
  if (sb === undefined) return;
  await img.meta.run(() => replaceDirectory(img, dir.list.filter((b) => b !== sb), [sb]));
}

/** Every host cluster the stored bitmaps use (directory, tables, data), for refcount repair. */
export async function bitmapClusters(img: Qcow2Image): Promise<number[]> {
  const dir = img.bitmapDir;
  if (dir === undefined) return [];
  const cs = img.cs;
  const out: number[] = [];
  for (let c = 0; c < Math.ceil(dir.size / cs); c++) out.push(dir.offset / cs + c);
  for (const sb of dir.list) {
    if (sb.tableOffset === 0) continue;
    for (let c = 0; c < Math.ceil((sb.tableSize * 8) / cs); c++) out.push(sb.tableOffset / cs + c);
    const table = await readTable(img, sb);
    for (let i = 0; i < sb.tableSize; i++) {
      const off = tableOffset(table, i);
      if (off !== 0) out.push(off / cs);
    }
  }
  return out;
}
