// qcow2 internal snapshots: the snapshot table, creating and deleting snapshots (refcounts, COPIED flags).
//
// Layout (docs/interop/qcow2.txt, "Snapshots"): the header's nb_snapshots/snapshots_offset point
// at a table of 8-byte aligned entries: a 40-byte fixed part, extra data (QEMU writes 24 bytes:
// vm_state_size_large, disk_size, icount), the id and the name. A snapshot owns a copy of the
// active L1 table; L2 tables and data clusters are shared, their refcounts counting each tree.
// The COPIED flag (bit 63 of L1/L2 entries) is set exactly where the refcount is 1, which is what
// the write path tests (image.ts inPlace()): shared clusters are never written in place.
import { constants as osConstants } from 'node:os';
import { BlockIoError } from '../node.js';
import { tableOffset } from './refcount.js';
import type { Qcow2Image } from './image.js';

const { EFBIG, EINVAL, ENOENT } = osConstants.errno;

const HI_COPIED = 0x80000000;
const HI_COMPRESSED = 0x40000000;
/** QEMU's limits: snapshots per image, bytes of the whole table, bytes of one entry's extra data. */
export const QCOW_MAX_SNAPSHOTS = 65536;
const QCOW_MAX_SNAPSHOTS_SIZE = 1024 * QCOW_MAX_SNAPSHOTS;
const QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024;
/** The extra data QEMU writes: vm_state_size_large, disk_size, icount. */
const EXTRA_SIZE = 24;
/** icount of a snapshot taken without record/replay (QEMU's -1ULL). */
export const NO_ICOUNT = 0xffffffffffffffffn;

/** One entry of the snapshot table. */
export interface Qcow2Snapshot {
  /** Host offset and entries of the snapshot's own L1 table. */
  l1Offset: number;
  l1Size: number;
  id: string;
  name: string;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: bigint;
  vmStateSize: number;
  /** Guest size when taken (extra data; the image size for entries without it). */
  diskSize: number;
  /** NO_ICOUNT when absent. */
  icount: bigint;
  /** Extra data beyond what QEMU knows, kept as is. */
  unknownExtra: Buffer;
}

/** The snapshot table of one open image. */
interface SnapshotTable {
  list: Qcow2Snapshot[];
  /** Bytes the table occupies at h.snapshotsOffset (freed when a new table is written). */
  size: number;
}

const tables = new WeakMap<Qcow2Image, SnapshotTable>();

/** The image's snapshots (empty before readSnapshots or without any). */
export function snapshotList(img: Qcow2Image): readonly Qcow2Snapshot[] {
  return tables.get(img)?.list ?? [];
}

/**
 * Reads the snapshot table at open (QEMU's qcow2_read_snapshots); throws Error with QEMU's message.
 * The table is read a cluster or more at a time as parsing goes: its size is only known by parsing.
 */
export async function readSnapshots(img: Qcow2Image): Promise<void> {
  const { h, file } = img;
  const table: SnapshotTable = { list: [], size: 0 };
  tables.set(img, table);
  if (h.nbSnapshots === 0) return;
  // QEMU's qcow2_validate_table() on the fixed entry headers.
  if (h.nbSnapshots > QCOW_MAX_SNAPSHOTS) throw new Error('Snapshot table too large');
  if (h.snapshotsOffset % img.cs !== 0) throw new Error('Snapshot table offset invalid');
  let buf = Buffer.alloc(0);
  const ensure = async (end: number) => {
    if (end <= buf.length) return;
    if (end > QCOW_MAX_SNAPSHOTS_SIZE) throw new Error('Snapshot table is too big');
    const grown = Buffer.alloc(Math.min(QCOW_MAX_SNAPSHOTS_SIZE, Math.max(end, buf.length * 2, img.cs)));
    buf.copy(grown);
    const from = buf.length;
    const avail = Math.min(grown.length, file.getLength() - h.snapshotsOffset) - from;
    if (avail > 0) await file.read(h.snapshotsOffset + from, grown.subarray(from, from + avail));
    buf = grown;
  };
  let off = 0;
  for (let i = 0; i < h.nbSnapshots; i++) {
    off = (off + 7) & ~7;
    await ensure(off + 40);
    const l1Offset = Number(buf.readBigUInt64BE(off));
    const l1Size = buf.readUInt32BE(off + 8);
    const idLen = buf.readUInt16BE(off + 12);
    const nameLen = buf.readUInt16BE(off + 14);
    const dateSec = buf.readUInt32BE(off + 16);
    const dateNsec = buf.readUInt32BE(off + 20);
    const vmClockNsec = buf.readBigUInt64BE(off + 24);
    let vmStateSize = buf.readUInt32BE(off + 32);
    const extraSize = buf.readUInt32BE(off + 36);
    off += 40;
    if (extraSize > QCOW_MAX_SNAPSHOT_EXTRA_DATA) throw new Error(`Too much extra metadata in snapshot table entry ${i}`);
    await ensure(off + extraSize + idLen + nameLen);
    const extra = buf.subarray(off, off + extraSize);
    if (extraSize >= 8) vmStateSize = Number(extra.readBigUInt64BE(0));
    const diskSize = extraSize >= 16 ? Number(extra.readBigUInt64BE(8)) : img.size;
    const icount = extraSize >= 24 ? extra.readBigUInt64BE(16) : NO_ICOUNT;
    const unknownExtra = Buffer.from(extra.subarray(Math.min(extraSize, EXTRA_SIZE)));
    off += extraSize;
    const id = buf.toString('utf8', off, off + idLen);
    off += idLen;
    const name = buf.toString('utf8', off, off + nameLen);
    off += nameLen;
    table.list.push({ l1Offset, l1Size, id, name, dateSec, dateNsec, vmClockNsec, vmStateSize, diskSize, icount, unknownExtra });
  }
  table.size = off;
}

/** QMP's SnapshotInfo for one snapshot (icount only when recorded). */
export function snapshotInfo(sn: Qcow2Snapshot): Record<string, unknown> {
  const info: Record<string, unknown> = {
    id: sn.id,
    name: sn.name,
    'vm-state-size': sn.vmStateSize,
    'date-sec': sn.dateSec,
    'date-nsec': sn.dateNsec,
    'vm-clock-sec': Number(sn.vmClockNsec / 1000000000n),
    'vm-clock-nsec': Number(sn.vmClockNsec % 1000000000n),
  };
  if (sn.icount !== NO_ICOUNT) info.icount = Number(BigInt.asIntN(64, sn.icount));
  return info;
}

/**
 * QEMU's find_snapshot_by_id_and_name(): both given, both must match; else the one given.
 * Returns the index or -1.
 */
export function findSnapshot(img: Qcow2Image, id: string | undefined, name: string | undefined): number {
  return snapshotList(img).findIndex((sn) =>
    (id === undefined || sn.id === id) && (name === undefined || sn.name === name) && (id !== undefined || name !== undefined));
}

/** Options of an image operation that frees clusters. */
export interface SnapshotOpOptions {
  /** pass-discard-snapshot (default on in QEMU): freed clusters are discarded in the file. */
  passDiscard: boolean;
}

/** Decrements a cluster's refcount; one that reaches zero leaves the caches (and the file, if asked). */
async function unref(img: Qcow2Image, cluster: number, opts: SnapshotOpOptions): Promise<number> {
  const v = await img.rc.add(cluster, -1);
  if (v === 0) {
    img.forgetCluster(cluster);
    if (opts.passDiscard) {
      const len = Math.min(img.cs, img.file.getLength() - cluster * img.cs);
      if (len > 0) await img.file.discard(cluster * img.cs, len).catch(() => undefined);
    }
  }
  return v;
}

/** Host clusters a compressed L2 entry's data occupies. */
function compressedRange(img: Qcow2Image, desc: bigint): [number, number] {
  const x = 62 - (img.clusterBits - 8);
  const host = Number(desc & ((1n << BigInt(x)) - 1n));
  const nsec = Number((desc >> BigInt(x)) & ((1n << BigInt(img.clusterBits - 8)) - 1n)) + 1;
  const end = host - (host % 512) + nsec * 512;
  return [Math.floor(host / img.cs), Math.floor((end - 1) / img.cs)];
}

/**
 * QEMU's qcow2_update_snapshot_refcount(): adds `addend` (+1, -1 or 0) to the refcount of every
 * L2 table and data cluster the L1 table `l1` references, and sets each L1/L2 entry's COPIED flag
 * to (refcount == 1). `active`: l1 is the image's in-memory L1, written back if it changed.
 * Runs under the metadata lock.
 */
async function updateSnapshotRefcount(img: Qcow2Image, l1: Buffer, active: boolean, addend: number,
  opts: SnapshotOpOptions): Promise<void> {
  const cs = img.cs;
  let l1Changed = false;
  for (let l1i = 0; l1i < l1.length / 8; l1i++) {
    const l2off = tableOffset(l1, l1i);
    if (l2off === 0) continue;
    const t = await img.l2Cache.get(l2off);
    let changed = false;
    for (let j = 0; j < img.l2Entries; j++) {
      const i = j * img.entryBytes;
      const hi = t.buf.readUInt32BE(i);
      if (hi & HI_COMPRESSED) {
        if (addend === 0) continue;
        const [a, b] = compressedRange(img, t.buf.readBigUInt64BE(i));
        for (let c = a; c <= b; c++) {
          if (addend < 0) await unref(img, c, opts);
          else await img.rc.add(c, addend);
        }
        continue;
      }
      const host = tableOffset(t.buf, i / 8);
      if (host === 0) continue;
      let v: number;
      if (addend < 0) v = await unref(img, host / cs, opts);
      else if (addend > 0) v = await img.rc.add(host / cs, addend);
      else v = await img.rc.get(host / cs);
      const nhi = (v === 1 ? hi | HI_COPIED : hi & ~HI_COPIED) >>> 0;
      if (nhi !== hi) {
        t.buf.writeUInt32BE(nhi, i);
        changed = true;
      }
    }
    if (changed) img.l2Cache.markDirty(t);
    let v: number;
    if (addend < 0) v = await unref(img, l2off / cs, opts);
    else if (addend > 0) v = await img.rc.add(l2off / cs, addend);
    else v = await img.rc.get(l2off / cs);
    const hi = l1.readUInt32BE(l1i * 8);
    const nhi = (v === 1 ? hi | HI_COPIED : hi & ~HI_COPIED) >>> 0;
    if (nhi !== hi) {
      l1.writeUInt32BE(nhi, l1i * 8);
      l1Changed = true;
    }
  }
  if (active && l1Changed) {
    // The L2 tables' refcounts and flags reach the file before the L1 entries that describe them.
    await img.flushLocked();
    await img.file.write(img.l1Offset, l1);
  }
}

/** Allocates `bytes` of clusters (none for 0 bytes: QEMU then records the next free offset). */
async function allocBytes(img: Qcow2Image, bytes: number): Promise<number> {
  if (bytes === 0) return (await img.rc.findFree(1)) * img.cs;
  return img.rc.alloc(Math.ceil(bytes / img.cs));
}

/** Frees the clusters of [offset, offset + bytes). */
async function freeBytes(img: Qcow2Image, offset: number, bytes: number, opts: SnapshotOpOptions): Promise<void> {
  if (bytes === 0) return;
  const first = Math.floor(offset / img.cs);
  const last = Math.floor((offset + bytes - 1) / img.cs);
  for (let c = first; c <= last; c++) await unref(img, c, opts);
}

/** Writes the table for `list` to new clusters, points the header at it, frees the old one (qcow2_write_snapshots). */
async function writeSnapshots(img: Qcow2Image, list: Qcow2Snapshot[], opts: SnapshotOpOptions): Promise<void> {
  const table = tables.get(img)!;
  let size = 0;
  for (const sn of list) {
    size = (size + 7) & ~7;
    size += 40 + EXTRA_SIZE + sn.unknownExtra.length + Buffer.byteLength(sn.id) + Buffer.byteLength(sn.name);
    if (size > QCOW_MAX_SNAPSHOTS_SIZE) throw new BlockIoError(EFBIG, 'snapshot table too large');
  }
  const buf = Buffer.alloc(size);
  let off = 0;
  for (const sn of list) {
    off = (off + 7) & ~7;
    buf.writeBigUInt64BE(BigInt(sn.l1Offset), off);
    buf.writeUInt32BE(sn.l1Size, off + 8);
    buf.writeUInt16BE(Buffer.byteLength(sn.id), off + 12);
    buf.writeUInt16BE(Buffer.byteLength(sn.name), off + 14);
    buf.writeUInt32BE(sn.dateSec >>> 0, off + 16);
    buf.writeUInt32BE(sn.dateNsec >>> 0, off + 20);
    buf.writeBigUInt64BE(sn.vmClockNsec, off + 24);
    // A VM state beyond 32 bits reads as a disk-only snapshot to older programs.
    buf.writeUInt32BE(sn.vmStateSize <= 0xffffffff ? sn.vmStateSize : 0, off + 32);
    buf.writeUInt32BE(EXTRA_SIZE + sn.unknownExtra.length, off + 36);
    off += 40;
    buf.writeBigUInt64BE(BigInt(sn.vmStateSize), off);
    buf.writeBigUInt64BE(BigInt(sn.diskSize), off + 8);
    buf.writeBigUInt64BE(sn.icount, off + 16);
    off += EXTRA_SIZE;
    off += sn.unknownExtra.copy(buf, off);
    off += buf.write(sn.id, off, 'utf8');
    off += buf.write(sn.name, off, 'utf8');
  }
  const newOffset = await allocBytes(img, size);
  // The new table's refcounts are stable before anything is written into it.
  await img.flushLocked();
  if (size > 0) await img.file.write(newOffset, buf);
  await img.file.flush();
  const hdr = Buffer.alloc(12);
  hdr.writeUInt32BE(list.length, 0);
  hdr.writeBigUInt64BE(BigInt(newOffset), 4);
  await img.file.write(60, hdr);
  await img.file.flush();
  const oldOffset = img.h.snapshotsOffset;
  const oldSize = table.size;
  img.h.nbSnapshots = list.length;
  img.h.snapshotsOffset = newOffset;
  table.list = list;
  table.size = size;
  await freeBytes(img, oldOffset, oldSize, opts);
}

/** What a new snapshot records besides its name (QMP fills in the clocks). */
export interface NewSnapshot {
  name: string;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: bigint;
}

/**
 * QEMU's qcow2_snapshot_create(): copies the active L1 table, takes a reference on everything it
 * points at (clearing COPIED), then appends the entry to a rewritten snapshot table. The caller
 * has drained the node. Returns the new snapshot (its id is max(numeric ids) + 1).
 */
export async function createSnapshot(img: Qcow2Image, sn: NewSnapshot, opts: SnapshotOpOptions): Promise<Qcow2Snapshot> {
  await img.quiesce();
  return img.meta.run(async () => {
    const list = snapshotList(img);
    if (list.length >= QCOW_MAX_SNAPSHOTS) throw new BlockIoError(EFBIG, 'too many snapshots');
    let maxId = 0;
    for (const s of list) {
      const n = parseInt(s.id, 10);
      if (Number.isFinite(n) && n > maxId) maxId = n;
    }
    const id = String(maxId + 1);
    // Everything the in-memory tables say is in the file before it gets shared.
    await img.flushLocked();
    const l1Size = img.l1.length / 8;
    const l1Offset = await allocBytes(img, l1Size * 8);
    if (l1Size > 0) await img.file.write(l1Offset, img.l1);
    await updateSnapshotRefcount(img, img.l1, true, 1, opts);
    await img.flushLocked();
    const snap: Qcow2Snapshot = {
      l1Offset, l1Size, id, name: sn.name, dateSec: sn.dateSec, dateNsec: sn.dateNsec, vmClockNsec: sn.vmClockNsec,
      vmStateSize: 0, diskSize: img.size, icount: NO_ICOUNT, unknownExtra: Buffer.alloc(0),
    };
    await writeSnapshots(img, [...list, snap], opts);
    await img.flushLocked();
    return snap;
  });
}

/**
 * QEMU's qcow2_snapshot_delete(): drops the entry from the table, releases the snapshot's
 * references and its L1 table, then recomputes COPIED on the active tables. Throws Error with
 * QEMU's message (without errno text) and `.errno` set.
 */
export async function deleteSnapshot(img: Qcow2Image, index: number, opts: SnapshotOpOptions): Promise<Qcow2Snapshot> {
  await img.quiesce();
  return img.meta.run(async () => {
    const list = snapshotList(img);
    const sn = list[index];
    if (sn === undefined) throw Object.assign(new Error("Can't find the snapshot"), { errno: ENOENT });
    if (sn.l1Size > 0x2000000 / 8) throw Object.assign(new Error('Snapshot L1 table too large'), { errno: EFBIG });
    if (sn.l1Offset % img.cs !== 0) throw Object.assign(new Error('Snapshot L1 table offset invalid'), { errno: EINVAL });
    const rest = list.filter((_s, i) => i !== index);
    if (img.file.readOnly) {
      // QEMU drops the entry from its in-memory list before the write fails: so do we.
      tables.get(img)!.list = rest;
      img.h.nbSnapshots = rest.length;
      throw Object.assign(new Error('Failed to remove snapshot from snapshot list'), { errno: osConstants.errno.EPERM });
    }
    try {
      await writeSnapshots(img, rest, opts);
    } catch (e) {
      throw Object.assign(new Error('Failed to remove snapshot from snapshot list'), { errno: (e as { errno?: number }).errno ?? osConstants.errno.EIO });
    }
    const l1 = Buffer.alloc(sn.l1Size * 8);
    const avail = Math.max(0, Math.min(l1.length, img.file.getLength() - sn.l1Offset));
    if (avail > 0) await img.file.read(sn.l1Offset, l1.subarray(0, avail));
    await updateSnapshotRefcount(img, l1, false, -1, opts);
    await freeBytes(img, sn.l1Offset, sn.l1Size * 8, opts);
    await updateSnapshotRefcount(img, img.l1, true, 0, opts);
    await img.flushLocked();
    return sn;
  });
}

/** Clusters the snapshots hold (table, L1 copies, their L2 tables and data), for refcount repair. */
export async function snapshotClusterRefs(img: Qcow2Image, ref: (cluster: number) => void): Promise<void> {
  const table = tables.get(img);
  if (table === undefined) return;
  const cs = img.cs;
  if (table.size > 0) {
    for (let c = Math.floor(img.h.snapshotsOffset / cs); c <= Math.floor((img.h.snapshotsOffset + table.size - 1) / cs); c++) ref(c);
  }
  for (const sn of table.list) {
    if (sn.l1Size === 0) continue;
    for (let c = Math.floor(sn.l1Offset / cs); c <= Math.floor((sn.l1Offset + sn.l1Size * 8 - 1) / cs); c++) ref(c);
    const l1 = Buffer.alloc(sn.l1Size * 8);
    const avail = Math.max(0, Math.min(l1.length, img.file.getLength() - sn.l1Offset));
    if (avail > 0) await img.file.read(sn.l1Offset, l1.subarray(0, avail));
    for (let l1i = 0; l1i < sn.l1Size; l1i++) {
      const l2 = tableOffset(l1, l1i);
      if (l2 === 0) continue;
      ref(l2 / cs);
      const t = await img.l2Cache.get(l2);
      for (let j = 0; j < img.l2Entries; j++) {
        const i = j * img.entryBytes;
        if (t.buf.readUInt32BE(i) & HI_COMPRESSED) {
          const [a, b] = compressedRange(img, t.buf.readBigUInt64BE(i));
          for (let c = a; c <= b; c++) ref(c);
        } else {
          const host = tableOffset(t.buf, i / 8);
          if (host !== 0) ref(host / cs);
        }
      }
    }
  }
}
