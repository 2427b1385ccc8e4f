// One open qcow2 image: L1/L2 mapping, reads, allocating writes, zeroing, discard, resize, flush.
import { constants as osConstants } from 'node:os';
import { inflateRawSync, constants as zlibConstants } from 'node:zlib';
import type { BlockStatus } from '../driver.js';
import { BlockIoError, type BlockNode } from '../node.js';
import {
  COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, INCOMPAT_EXTL2, OFF_INCOMPAT, OFF_L1_SIZE, OFF_SIZE,
  QCOW_MAX_L1_SIZE, type Qcow2Header,
} from './header.js';
import { bitmapClusters, type BitmapDirectory } from './bitmaps.js';
import { snapshotClusterRefs } from './snapshots.js';
import { Refcounts, setTableEntry, tableOffset } from './refcount.js';
import { Mutex, TableCache, type CachedTable } from './table-cache.js';

const { EIO, ENOTSUP, EFBIG } = osConstants.errno;

/** L1/L2 flag bits, in the high 32-bit word of an entry. */
const HI_COPIED = 0x80000000;
const HI_COMPRESSED = 0x40000000;
/** Zero flag, low word bit 0 (standard L2 entries of v3 images). */
const LO_ZERO = 1;
const ALL_ALLOC = 0xffffffff;

/** What a guest range maps to. */
export const enum Kind { Unalloc, Zero, Data, Compressed }

export interface Run {
  kind: Kind;
  /** Host offset of the first byte (Data), of the compressed cluster's entry (Compressed: L2 entry). */
  host: number;
  /** Bytes from the queried offset with this mapping. */
  pnum: number;
  /** Compressed: the raw 64-bit descriptor. */
  desc?: bigint;
}

/** A run of guest clusters an allocating write owns (marked busy). */
interface AllocPlan {
  c0: number;
  count: number;
  /** Bytes of the request this run covers. */
  bytes: number;
  busy: Busy;
}

/** Per guest cluster in-flight allocation (see index.ts): waiters get the promise. */
interface Busy {
  promise: Promise<void>;
  resolve: () => void;
}

export class Qcow2Image {
  readonly cs: number;
  readonly clusterBits: number;
  readonly ext: boolean;
  /** L2 entries per table. */
  readonly l2Entries: number;
  /** Bytes per L2 entry (8 or 16 with extended L2). */
  readonly entryBytes: number;
  readonly subcluster: number;
  size: number;
  l1: Buffer;
  l1Offset: number;
  readonly l2Cache: TableCache;
  readonly rc: Refcounts;
  readonly meta = new Mutex();
  readonly busy = new Map<number, Busy>();
  /** Host clusters to free once the L2 change that dropped them is in the file (index, punch). */
  private pendingFree: number[] = [];
  private pendingPunch: boolean[] = [];
  private readonly zeroBuf: Buffer;
  private lastCompressed = -1;
  private readonly lastCompressedBuf: Buffer;
  dirty: boolean;
  /** The stored persistent bitmaps (bitmaps.ts), when the image has a valid bitmaps extension. */
  bitmapDir: BitmapDirectory | undefined;
  /**
   * Direct I/O epochs: reads and in-place writes look a mapping up without the lock and then touch
   * the host cluster; a cluster freed meanwhile must not be reused before they finish. Each such
   * I/O counts itself in the current epoch; applying frees bumps the epoch and waits for older ones.
   */
  private epoch = 0;
  private readonly epochCount = new Map<number, number>();
  private epochWaiter: (() => void) | undefined;

  constructor(
    readonly file: BlockNode,
    /** Replaced when the graph moves this image onto another backing node (stream, commit, snapshot). */
    public backing: BlockNode | undefined,
    readonly h: Qcow2Header,
    l1: Buffer,
    refTable: Buffer,
    readonly passDiscard: boolean,
  ) {
    this.clusterBits = h.clusterBits;
    this.cs = 2 ** h.clusterBits;
    this.ext = (Number(h.incompatible & 0xffn) & INCOMPAT_EXTL2) !== 0;
    this.entryBytes = this.ext ? 16 : 8;
    this.l2Entries = this.cs / this.entryBytes;
    this.subcluster = this.ext ? this.cs / 32 : this.cs;
    this.size = h.size;
    this.l1 = l1;
    this.l1Offset = h.l1TableOffset;
    this.dirty = (Number(h.incompatible & 0xffn) & INCOMPAT_DIRTY) !== 0;
    // Enough L2 tables to map 32 GiB of guest data, at least 16 tables.
    const cap = Math.max(16, Math.ceil((32 * 2 ** 30) / (this.l2Entries * this.cs)));
    this.l2Cache = new TableCache(file, this.cs, Math.min(cap, Math.max(16, (64 << 20) / this.cs)));
    this.rc = new Refcounts(file, h.clusterBits, h.refcountOrder, h.refcountTableOffset, h.refcountTableClusters, refTable);
    if (this.dirty) {
      // Refcounts may be stale (lazy refcounts): never reuse space, only append.
      this.rc.appendOnly = true;
      this.rc.freeHint = Math.ceil(file.getLength() / this.cs);
    }
    this.zeroBuf = Buffer.alloc(this.cs);
    this.lastCompressedBuf = Buffer.alloc(this.cs);
  }

  get version(): number {
    return this.h.version;
  }

  get corrupt(): boolean {
    return (Number(this.h.incompatible & 0xffn) & INCOMPAT_CORRUPT) !== 0;
  }

  get lazyRefcounts(): boolean {
    return (this.h.compatible & BigInt(COMPAT_LAZY_REFCOUNTS)) !== 0n;
  }

  private l2OffsetFor(l1i: number): number {
    return l1i < this.l1.length / 8 ? tableOffset(this.l1, l1i) : 0;
  }

  private enter(): number {
    const e = this.epoch;
    this.epochCount.set(e, (this.epochCount.get(e) ?? 0) + 1);
    return e;
  }

  private leave(e: number): void {
    const n = this.epochCount.get(e)! - 1;
    if (n > 0) {
      this.epochCount.set(e, n);
      return;
    }
    this.epochCount.delete(e);
    const w = this.epochWaiter;
    if (w !== undefined && e < this.epoch) {
      this.epochWaiter = undefined;
      w();
    }
  }

  /** Starts a new epoch and waits until every direct I/O of earlier epochs completed. */
  private async drainEpochs(): Promise<void> {
    const cur = ++this.epoch;
    for (;;) {
      let older = false;
      for (const e of this.epochCount.keys()) if (e < cur) older = true;
      if (!older) return;
      await new Promise<void>((r) => (this.epochWaiter = r));
    }
  }

  // ---------------------------------------------------------------- mapping

  /** The mapping of [offset, offset+max) up to the first change of kind (within one L2 table). */
  async lookup(offset: number, max: number): Promise<Run> {
    const cs = this.cs;
    const ci = Math.floor(offset / cs);
    const l1i = Math.floor(ci / this.l2Entries);
    const tableEnd = (l1i + 1) * this.l2Entries * cs;
    const limit = Math.min(offset + max, tableEnd);
    const l2off = this.l2OffsetFor(l1i);
    if (l2off === 0) return { kind: Kind.Unalloc, host: 0, pnum: limit - offset };
    const t = await this.l2Cache.get(l2off);
    return this.scan(t.buf, offset, limit);
  }

  /** unit()'s other results (scratch fields: unit() is synchronous, so no one else sees them). */
  private uHost = 0;
  private uEnd = 0;

  /** Classifies the (sub)cluster at `pos` of table `buf`; sets uHost (host of pos) and uEnd. */
  private unit(buf: Buffer, pos: number): Kind {
    const cs = this.cs;
    const ci = Math.floor(pos / cs);
    const i = (ci % this.l2Entries) * this.entryBytes;
    const hi = buf.readUInt32BE(i);
    const lo = buf.readUInt32BE(i + 4);
    const clusterStart = ci * cs;
    this.uHost = 0;
    this.uEnd = clusterStart + cs;
    if (hi & HI_COMPRESSED) return Kind.Compressed;
    const host = (hi & 0x00ffffff) * 4294967296 + ((lo & 0xfffffe00) >>> 0);
    if (this.ext) {
      const zeroBits = buf.readUInt32BE(i + 8);
      const allocBits = buf.readUInt32BE(i + 12);
      const sc = Math.floor((pos - clusterStart) / this.subcluster);
      this.uEnd = clusterStart + (sc + 1) * this.subcluster;
      if ((zeroBits >>> sc) & 1) return Kind.Zero;
      if ((allocBits >>> sc) & 1 && host !== 0) {
        this.uHost = host + (pos - clusterStart);
        return Kind.Data;
      }
      return Kind.Unalloc;
    }
    if (this.version >= 3 && lo & LO_ZERO) return Kind.Zero;
    if (host === 0) return Kind.Unalloc;
    this.uHost = host + (pos - clusterStart);
    return Kind.Data;
  }

  private scan(buf: Buffer, offset: number, limit: number): Run {
    const kind = this.unit(buf, offset);
    const host = this.uHost;
    if (kind === Kind.Compressed) {
      const ci = Math.floor(offset / this.cs);
      const desc = buf.readBigUInt64BE((ci % this.l2Entries) * this.entryBytes);
      return { kind, host: 0, pnum: Math.min(this.uEnd, limit) - offset, desc };
    }
    let end = this.uEnd;
    while (end < limit) {
      const k = this.unit(buf, end);
      if (k !== kind) break;
      if (kind === Kind.Data && this.uHost !== host + (end - offset)) break;
      end = this.uEnd;
    }
    return { kind, host, pnum: Math.min(end, limit) - offset };
  }

  // ---------------------------------------------------------------- reads

  /** Waits until no cluster of [offset, offset+bytes) is being allocated. */
  async waitBusy(offset: number, bytes: number): Promise<void> {
    const first = Math.floor(offset / this.cs);
    const last = Math.floor((offset + bytes - 1) / this.cs);
    for (;;) {
      let found: Busy | undefined;
      if (last - first < this.busy.size) {
        for (let c = first; c <= last && !found; c++) found = this.busy.get(c);
      } else {
        for (const [c, b] of this.busy) if (c >= first && c <= last) { found = b; break; }
      }
      if (!found) return;
      await found.promise;
    }
  }

  async read(offset: number, buf: Buffer): Promise<void> {
    if (this.busy.size > 0) await this.waitBusy(offset, buf.length);
    await this.readRaw(offset, buf);
  }

  /** Reads guest data through the current mapping without waiting for in-flight allocations. */
  async readRaw(offset: number, buf: Buffer): Promise<void> {
    const e = this.enter();
    try {
      await this.readMapped(offset, buf);
    } finally {
      this.leave(e);
    }
  }

  private async readMapped(offset: number, buf: Buffer): Promise<void> {
    let pos = 0;
    while (pos < buf.length) {
      const r = await this.lookup(offset + pos, buf.length - pos);
      const dst = buf.subarray(pos, pos + r.pnum);
      switch (r.kind) {
        case Kind.Data: await this.readFile(r.host, dst); break;
        case Kind.Zero: dst.fill(0); break;
        case Kind.Unalloc: await this.readBacking(offset + pos, dst); break;
        case Kind.Compressed: {
          await this.decompress(r.desc!);
          const inCl = (offset + pos) % this.cs;
          this.lastCompressedBuf.copy(dst, 0, inCl, inCl + dst.length);
          break;
        }
      }
      pos += r.pnum;
    }
  }

  /** Reads the file child; bytes past its end (preallocated metadata only) read as zeroes. */
  private async readFile(host: number, dst: Buffer): Promise<void> {
    const avail = Math.min(dst.length, this.file.getLength() - host);
    if (avail > 0) await this.file.read(host, avail === dst.length ? dst : dst.subarray(0, avail));
    if (avail < dst.length) dst.fill(0, Math.max(0, avail));
  }

  /** Unallocated ranges: the backing node's data, zeroes where it has none or ends early. */
  private async readBacking(offset: number, dst: Buffer): Promise<void> {
    const b = this.backing;
    if (b === undefined) {
      dst.fill(0);
      return;
    }
    const avail = Math.min(dst.length, b.getLength() - offset);
    if (avail > 0) await b.read(offset, avail === dst.length ? dst : dst.subarray(0, avail));
    if (avail < dst.length) dst.fill(0, Math.max(0, avail));
  }

  /** Decompresses the cluster described by `desc` into lastCompressedBuf (a one-entry cache). */
  private async decompress(desc: bigint): Promise<void> {
    const x = 62 - (this.clusterBits - 8);
    const host = Number(desc & ((1n << BigInt(x)) - 1n));
    if (host === this.lastCompressed) return;
    if (this.h.compressionType !== 0) throw new BlockIoError(EIO, 'zstd-compressed clusters are not supported');
    const nsec = Number((desc >> BigInt(x)) & ((1n << BigInt(this.clusterBits - 8)) - 1n)) + 1;
    const len = Math.min(nsec * 512 - (host % 512), this.file.getLength() - host);
    if (len <= 0) throw new BlockIoError(EIO, 'compressed cluster beyond end of file');
    const src = Buffer.allocUnsafe(len);
    await this.file.read(host, src);
    let out: Buffer;
    try {
      out = inflateRawSync(src, { finishFlush: zlibConstants.Z_SYNC_FLUSH });
    } catch {
      throw new BlockIoError(EIO, 'corrupt compressed cluster');
    }
    if (out.length < this.cs) throw new BlockIoError(EIO, 'corrupt compressed cluster');
    out.copy(this.lastCompressedBuf, 0, 0, this.cs);
    this.lastCompressed = host;
  }

  /** Host clusters a compressed descriptor occupies (each holds one reference per descriptor). */
  private compressedClusters(desc: bigint): [number, number] {
    const x = 62 - (this.clusterBits - 8);
    const host = Number(desc & ((1n << BigInt(x)) - 1n));
    const nsec = Number((desc >> BigInt(x)) & ((1n << BigInt(this.clusterBits - 8)) - 1n)) + 1;
    const end = host - (host % 512) + nsec * 512;
    return [Math.floor(host / this.cs), Math.floor((end - 1) / this.cs)];
  }

  // ---------------------------------------------------------------- dirty-image repair

  /**
   * What QEMU does when a dirty (lazy-refcounts) image is opened read-write: recount every
   * cluster the metadata references, correct the stored refcounts (too low after a crash, or
   * leaked), then clear the dirty bit. Snapshots' trees count too (snapshots.ts).
   * Runs before the image serves any request.
   */
  async repairRefcounts(): Promise<void> {
    if (!this.dirty) return;
    const cs = this.cs;
    const fileClusters = Math.ceil(this.file.getLength() / cs);
    const refs = new Map<number, number>();
    const ref = (c: number, n = 1) => refs.set(c, (refs.get(c) ?? 0) + n);
    const refRange = (off: number, bytes: number) => {
      for (let c = Math.floor(off / cs); c <= Math.floor((off + bytes - 1) / cs); c++) ref(c);
    };
    refRange(0, cs); // header and extensions
    if (this.l1.length > 0) refRange(this.l1Offset, this.l1.length);
    refRange(this.rc.tableOffset, this.rc.tableClusters * cs);
    for (const c of await bitmapClusters(this)) ref(c);
    await snapshotClusterRefs(this, (c) => ref(c));
    for (let i = 0; i < this.rc.tableClusters * cs / 8; i++) {
      const rb = tableOffset(this.rc.table, i);
      if (rb !== 0) ref(rb / cs);
    }
    for (let l1i = 0; l1i < this.l1.length / 8; l1i++) {
      const l2 = tableOffset(this.l1, l1i);
      if (l2 === 0) continue;
      ref(l2 / cs);
      const t = await this.l2Cache.get(l2);
      for (let i = 0; i < cs; i += this.entryBytes) {
        if (t.buf.readUInt32BE(i) & HI_COMPRESSED) {
          const [a, b] = this.compressedClusters(t.buf.readBigUInt64BE(i));
          for (let c = a; c <= b; c++) ref(c);
        } else {
          const host = tableOffset(t.buf, i / 8);
          if (host !== 0) ref(host / cs);
        }
      }
    }
    // New refcount blocks go past everything that exists, so nothing referenced gets reused.
    let end = fileClusters;
    for (const c of refs.keys()) if (c >= end) end = c + 1;
    this.rc.freeHint = end;
    const missing: number[] = [];
    for (let c = 0; c < end; c++) {
      const want = refs.get(c) ?? 0;
      if (!this.rc.hasBlock(c)) {
        if (want > 0) missing.push(c);
        continue;
      }
      if ((await this.rc.get(c)) !== want) await this.rc.set(c, want);
    }
    for (const c of missing) await this.rc.set(c, refs.get(c)!);
    await this.rc.cache.writeBack();
    await this.file.flush();
    this.h.incompatible &= ~BigInt(INCOMPAT_DIRTY);
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(this.h.incompatible);
    await this.file.write(OFF_INCOMPAT, b);
    await this.file.flush();
    this.dirty = false;
    this.rc.appendOnly = false;
    this.rc.freeHint = 0;
  }

  // ---------------------------------------------------------------- block status

  async blockStatus(offset: number, bytes: number): Promise<BlockStatus> {
    if (this.busy.size > 0) await this.waitBusy(offset, Math.min(bytes, this.cs));
    const r = await this.lookup(offset, bytes);
    switch (r.kind) {
      case Kind.Data: return { pnum: r.pnum, data: true, zero: false, allocated: true, depth: 1, offset: r.host };
      case Kind.Compressed: return { pnum: r.pnum, data: true, zero: false, allocated: true, depth: 1 };
      case Kind.Zero: return { pnum: r.pnum, data: false, zero: true, allocated: true, depth: 1 };
      default: break;
    }
    const b = this.backing;
    if (b === undefined) return { pnum: r.pnum, data: false, zero: true, allocated: false, depth: 0 };
    const bl = b.getLength();
    if (offset >= bl) return { pnum: r.pnum, data: false, zero: true, allocated: false, depth: 0 };
    const st = await b.blockStatus(offset, Math.min(r.pnum, bl - offset));
    const depth = st.allocated ? (st.depth ?? 1) + 1 : 0;
    return { pnum: st.pnum, data: st.data, zero: st.zero, allocated: false, depth, offset: st.offset };
  }

  // ---------------------------------------------------------------- writes

  /** True when the cluster entry at `i` can take data in place (allocated, exclusively owned, all data). */
  private inPlace(buf: Buffer, i: number): boolean {
    const hi = buf.readUInt32BE(i);
    if (!(hi & HI_COPIED) || hi & HI_COMPRESSED) return false;
    const lo = buf.readUInt32BE(i + 4);
    if ((hi & 0x00ffffff) === 0 && (lo & 0xfffffe00) === 0) return false;
    if (this.ext) return buf.readUInt32BE(i + 12) === ALL_ALLOC && buf.readUInt32BE(i + 8) === 0;
    return !(this.version >= 3 && lo & LO_ZERO);
  }

  private markBusy(first: number, n: number): Busy {
    let resolve!: () => void;
    const promise = new Promise<void>((r) => (resolve = r));
    const b: Busy = { promise, resolve };
    for (let c = first; c < first + n; c++) this.busy.set(c, b);
    return b;
  }

  private clearBusy(first: number, n: number, b: Busy): void {
    for (let c = first; c < first + n; c++) this.busy.delete(c);
    b.resolve();
  }

  /**
   * The synchronous fast path (BlockDriver.readNow): a read inside one (sub)cluster whose L2 table
   * is cached, answered from zeroes or by the file child's own fast path. false: use read().
   * Nothing is awaited, so no allocation or discard can change the mapping underneath it.
   */
  readNow(offset: number, buf: Buffer): boolean {
    const cs = this.cs;
    const ci = Math.floor(offset / cs);
    if (this.busy.size > 0 && this.busy.has(ci)) return false;
    const l2off = this.l2OffsetFor(Math.floor(ci / this.l2Entries));
    if (l2off === 0) {
      if (this.backing !== undefined || Math.floor((offset + buf.length - 1) / cs) !== ci) return false;
      buf.fill(0);
      return true;
    }
    const t = this.l2Cache.peek(l2off);
    if (t === undefined) return false;
    const kind = this.unit(t.buf, offset);
    if (offset + buf.length > this.uEnd) return false;
    switch (kind) {
      case Kind.Data:
        return this.uHost + buf.length <= this.file.getLength() && this.file.tryRead(this.uHost, buf);
      case Kind.Zero:
        buf.fill(0);
        return true;
      case Kind.Unalloc:
        if (this.backing !== undefined) return false;
        buf.fill(0);
        return true;
      default:
        return false;
    }
  }

  /**
   * The synchronous fast path (BlockDriver.writeNow): an in-place write inside one allocated
   * cluster whose L2 table is cached, through the file child's own fast path. false: use write().
   */
  writeNow(offset: number, data: Buffer): boolean {
    const cs = this.cs;
    const ci = Math.floor(offset / cs);
    if (Math.floor((offset + data.length - 1) / cs) !== ci) return false;
    if (this.busy.size > 0 && this.busy.has(ci)) return false;
    const l2off = this.l2OffsetFor(Math.floor(ci / this.l2Entries));
    if (l2off === 0) return false;
    const t = this.l2Cache.peek(l2off);
    if (t === undefined) return false;
    const i = (ci % this.l2Entries) * this.entryBytes;
    if (!this.inPlace(t.buf, i)) return false;
    return this.file.tryWrite(tableOffset(t.buf, i / 8) + (offset - ci * cs), data, {});
  }

  async write(offset: number, data: Buffer): Promise<void> {
    const cs = this.cs;
    let pos = 0;
    while (pos < data.length) {
      const off = offset + pos;
      const ci = Math.floor(off / cs);
      const waiting = this.busy.get(ci);
      if (waiting !== undefined) {
        await waiting.promise;
        continue;
      }
      const ep = this.enter();
      let plan: number | AllocPlan;
      try {
        plan = await this.planWrite(offset, data, pos);
      } finally {
        this.leave(ep);
      }
      if (typeof plan === 'number') {
        if (plan > 0) pos += plan;
        continue;
      }
      const { c0, count, bytes: n, busy: b } = plan;
      try {
        await this.allocWrite(off, data.subarray(pos, pos + n), c0, count);
      } finally {
        this.clearBusy(c0, count, b);
      }
      pos += n;
    }
  }

  /**
   * Plans the write at data[pos..]: writes the in-place part if the first cluster allows it and
   * returns the bytes written; -1 to retry (the mapping changed while the table loaded); else marks
   * the run of clusters needing allocation busy (synchronously after the table lookup, so no other
   * writer plans them too) and returns that plan.
   */
  private async planWrite(offset: number, data: Buffer, pos: number): Promise<number | AllocPlan> {
    const cs = this.cs;
    const off = offset + pos;
    const ci = Math.floor(off / cs);
    const l1i = Math.floor(ci / this.l2Entries);
    const limit = Math.min(offset + data.length, (l1i + 1) * this.l2Entries * cs);
    const l2off = this.l2OffsetFor(l1i);
    const t = l2off !== 0 ? await this.l2Cache.get(l2off) : undefined;
    if (this.busy.has(ci) || this.l2OffsetFor(l1i) !== (t?.offset ?? 0)) return -1;
    const lastCi = Math.floor((limit - 1) / cs);
    if (t === undefined || !this.inPlace(t.buf, (ci % this.l2Entries) * this.entryBytes)) {
      let c = ci + 1;
      while (c <= lastCi && !this.busy.has(c) && (t === undefined || !this.inPlace(t.buf, (c % this.l2Entries) * this.entryBytes))) c++;
      return { c0: ci, count: c - ci, bytes: Math.min(limit, c * cs) - off, busy: this.markBusy(ci, c - ci) };
    }
    const host0 = tableOffset(t.buf, ((ci % this.l2Entries) * this.entryBytes) / 8);
    let c = ci + 1;
    while (c <= lastCi && !this.busy.has(c)) {
      const i = (c % this.l2Entries) * this.entryBytes;
      if (!this.inPlace(t.buf, i) || tableOffset(t.buf, i / 8) !== host0 + (c - ci) * cs) break;
      c++;
    }
    const n = Math.min(limit, c * cs) - off;
    await this.file.write(host0 + (off - ci * cs), data.subarray(pos, pos + n));
    return n;
  }

  /** Writes `data` into `n` fresh clusters starting at guest cluster `c0`, COW-ing head and tail. */
  private async allocWrite(off: number, data: Buffer, c0: number, n: number): Promise<void> {
    const cs = this.cs;
    const first = c0 * cs;
    const host = await this.meta.run(() => this.rc.alloc(n));
    const headLen = off - first;
    const tailStart = off + data.length;
    const tailLen = (c0 + n) * cs - tailStart;
    const jobs: Promise<void>[] = [];
    if (headLen > 0) jobs.push(this.copyOld(first, headLen, host));
    jobs.push(this.file.write(host + headLen, data));
    if (tailLen > 0) jobs.push(this.copyOld(tailStart, tailLen, host + (tailStart - first)));
    await Promise.all(jobs);
    await this.meta.run(() => this.commitAlloc(c0, n, host));
  }

  /** COW: the old guest content of [from, from+len) (within the virtual size) to host `to`. */
  private async copyOld(from: number, len: number, to: number): Promise<void> {
    const buf = Buffer.alloc(len);
    const inside = Math.max(0, Math.min(len, this.size - from));
    if (inside > 0) await this.readRaw(from, buf.subarray(0, inside));
    await this.file.write(to, buf);
  }

  /** Points the L2 entries of `n` clusters from `c0` at host clusters from `host`; frees the old ones. */
  private async commitAlloc(c0: number, n: number, host: number): Promise<void> {
    const t = await this.l2ForWrite(Math.floor(c0 / this.l2Entries));
    for (let k = 0; k < n; k++) {
      const i = ((c0 + k) % this.l2Entries) * this.entryBytes;
      this.releaseEntry(t.buf, i, false);
      setTableEntry(t.buf, i / 8, host + k * this.cs, HI_COPIED, 0);
      if (this.ext) {
        t.buf.writeUInt32BE(0, i + 8);
        t.buf.writeUInt32BE(ALL_ALLOC, i + 12);
      }
    }
    this.l2Cache.markDirty(t);
    await this.maybeFlushLocked();
  }

  /** Queues the host clusters entry `i` holds for freeing once the new entry is in the file. */
  private releaseEntry(buf: Buffer, i: number, punch: boolean): void {
    const hi = buf.readUInt32BE(i);
    if (hi & HI_COMPRESSED) {
      const [a, b] = this.compressedClusters(buf.readBigUInt64BE(i));
      for (let c = a; c <= b; c++) this.queueFree(c, punch);
      return;
    }
    const host = tableOffset(buf, i / 8);
    if (host !== 0) this.queueFree(host / this.cs, punch);
  }

  private queueFree(cluster: number, punch: boolean): void {
    // A dirty image's refcounts are not trusted: leak rather than free (qemu-img check repairs).
    if (this.rc.appendOnly) return;
    this.pendingFree.push(cluster);
    this.pendingPunch.push(punch);
  }

  /** The L2 table for L1 index `l1i`, made writable: allocated if missing, copied if shared. */
  private async l2ForWrite(l1i: number): Promise<CachedTable> {
    if (l1i >= this.l1.length / 8) throw new BlockIoError(EIO, 'L1 index beyond the L1 table');
    const hi = this.l1.readUInt32BE(l1i * 8);
    const old = tableOffset(this.l1, l1i);
    if (old !== 0 && hi & HI_COPIED) return this.l2Cache.get(old);
    const off = await this.rc.alloc(1);
    const buf = Buffer.alloc(this.cs);
    if (old !== 0) (await this.l2Cache.get(old)).buf.copy(buf);
    await this.file.write(off, buf);
    const t: CachedTable = { offset: off, buf, dirty: false };
    this.l2Cache.insert(t);
    // The table's refcount and content reach the file before the L1 entry that points at them.
    await this.rc.cache.writeBack();
    await this.file.flush();
    setTableEntry(this.l1, l1i, off, HI_COPIED);
    await this.file.write(this.l1Offset + l1i * 8, this.l1.subarray(l1i * 8, l1i * 8 + 8));
    if (old !== 0) this.queueFree(old / this.cs, false);
    return t;
  }

  /** Bounds dirty metadata and the free queue when the guest never flushes. */
  private async maybeFlushLocked(): Promise<void> {
    if (this.pendingFree.length > 4096 || this.l2Cache.dirtyCount > 64 || this.rc.cache.dirtyCount > 64) {
      await this.flushLocked();
    }
  }

  /**
   * Write-back in dependency order: refcount blocks, then L2 tables (which may point at clusters
   * those refcounts cover), then refcount decrements for clusters the written L2 tables dropped.
   */
  async flushLocked(): Promise<void> {
    if (this.rc.cache.dirtyCount > 0) {
      await this.rc.cache.writeBack();
      await this.file.flush();
    }
    if (this.l2Cache.dirtyCount > 0) {
      await this.l2Cache.writeBack();
      await this.file.flush();
    }
    if (this.pendingFree.length > 0 && !this.rc.appendOnly) {
      const frees = this.pendingFree;
      const punch = this.pendingPunch;
      this.pendingFree = [];
      this.pendingPunch = [];
      await this.drainEpochs();
      const punches: number[] = [];
      for (let k = 0; k < frees.length; k++) {
        const c = frees[k]!;
        const v = await this.rc.add(c, -1);
        if (v === 0) {
          this.l2Cache.drop(c * this.cs);
          if (c * this.cs === this.lastCompressed) this.lastCompressed = -1;
          if (punch[k] && this.passDiscard) punches.push(c);
        }
      }
      await this.rc.cache.writeBack();
      for (const c of punches) {
        const len = Math.min(this.cs, this.file.getLength() - c * this.cs);
        if (len > 0) await this.file.discard(c * this.cs, len).catch(() => undefined);
      }
    }
    await this.file.flush();
  }

  async flush(): Promise<void> {
    await this.meta.run(() => this.flushLocked());
  }

  /**
   * Waits until no allocation is in flight and every lock-free I/O started before has finished
   * (snapshots.ts: the caller drained the node, so nothing new starts meanwhile).
   */
  async quiesce(): Promise<void> {
    await this.waitBusy(0, Math.max(this.size, 1));
    await this.drainEpochs();
  }

  /** A host cluster was freed outside this file (snapshots.ts): forget what is cached about it. */
  forgetCluster(cluster: number): void {
    this.l2Cache.drop(cluster * this.cs);
    if (cluster * this.cs === this.lastCompressed) this.lastCompressed = -1;
  }

  // ---------------------------------------------------------------- zeroes and discard

  /**
   * Applies `fn` to the L2 entries of the whole clusters [c0, c1) under the metadata lock, one
   * table at a time, after in-flight allocations of those clusters finished.
   */
  private async editClusters(c0: number, c1: number, needTable: (l1i: number) => boolean,
    fn: (buf: Buffer, i: number) => void): Promise<void> {
    let c = c0;
    while (c < c1) {
      const l1i = Math.floor(c / this.l2Entries);
      const end = Math.min(c1, (l1i + 1) * this.l2Entries);
      await this.waitBusy(c * this.cs, (end - c) * this.cs);
      await this.meta.lock();
      try {
        let busy = false;
        for (let k = c; k < end && !busy; k++) busy = this.busy.has(k);
        if (busy) continue;
        if (this.l2OffsetFor(l1i) !== 0 || needTable(l1i)) {
          const t = await this.l2ForWrite(l1i);
          for (let k = c; k < end; k++) fn(t.buf, (k % this.l2Entries) * this.entryBytes);
          this.l2Cache.markDirty(t);
          await this.maybeFlushLocked();
        }
        c = end;
      } finally {
        this.meta.unlock();
      }
    }
  }

  async writeZeroes(offset: number, bytes: number, mayUnmap: boolean): Promise<void> {
    const cs = this.cs;
    const end = offset + bytes;
    const c0 = Math.ceil(offset / cs);
    // The last partial cluster at the end of the image counts as whole.
    const c1 = end === this.size ? Math.ceil(end / cs) : Math.floor(end / cs);
    // v2 has no zero flag: without a backing file an unallocated cluster reads as zeroes.
    if (c0 >= c1 || (this.version < 3 && this.backing !== undefined)) {
      await this.zeroSlow(offset, end);
      return;
    }
    if (offset < c0 * cs) await this.zeroSlow(offset, c0 * cs);
    if (this.version < 3) {
      await this.clearClusters(c0, c1);
      if (c1 * cs < end) await this.zeroSlow(c1 * cs, end);
      return;
    }
    await this.editClusters(c0, c1, () => this.backing !== undefined, (buf, i) => {
      const hi = buf.readUInt32BE(i);
      const keep = !mayUnmap && (hi & HI_COPIED) !== 0 && !(hi & HI_COMPRESSED) && tableOffset(buf, i / 8) !== 0;
      if (!keep) this.releaseEntry(buf, i, true);
      if (this.ext) {
        setTableEntry(buf, i / 8, keep ? tableOffset(buf, i / 8) : 0, keep ? HI_COPIED : 0, 0);
        buf.writeUInt32BE(ALL_ALLOC, i + 8);
        buf.writeUInt32BE(0, i + 12);
      } else {
        setTableEntry(buf, i / 8, keep ? tableOffset(buf, i / 8) : 0, keep ? HI_COPIED : 0, LO_ZERO);
      }
    });
    if (c1 * cs < end) await this.zeroSlow(c1 * cs, end);
  }

  /** Zeroes by writing zero buffers, skipping ranges that already read as zeroes. */
  private async zeroSlow(from: number, to: number): Promise<void> {
    let pos = from;
    while (pos < to) {
      const r = await this.lookup(pos, to - pos);
      const n = Math.min(r.pnum, to - pos);
      const zero = r.kind === Kind.Zero || (r.kind === Kind.Unalloc &&
        (this.backing === undefined || pos >= this.backing.getLength()));
      if (!zero) {
        for (let k = 0; k < n;) {
          const chunk = Math.min(this.cs - ((pos + k) % this.cs), n - k);
          await this.write(pos + k, this.zeroBuf.subarray(0, chunk));
          k += chunk;
        }
      }
      pos += n;
    }
  }

  async discard(offset: number, bytes: number): Promise<void> {
    const cs = this.cs;
    const end = offset + bytes;
    const c0 = Math.ceil(offset / cs);
    const c1 = end === this.size ? Math.ceil(end / cs) : Math.floor(end / cs);
    // v2 has no zero flag: discarding would expose the backing file's data, so QEMU doesn't.
    if (c0 >= c1 || (this.version < 3 && this.backing !== undefined)) return;
    await this.clearClusters(c0, c1);
  }

  /** Deallocates whole clusters so that they read as zeroes (zero flag, or unallocated without backing). */
  private async clearClusters(c0: number, c1: number): Promise<void> {
    await this.editClusters(c0, c1, () => false, (buf, i) => {
      const hi = buf.readUInt32BE(i);
      const allocated = (hi & HI_COMPRESSED) !== 0 || tableOffset(buf, i / 8) !== 0;
      if (!allocated && this.backing === undefined) return;
      this.releaseEntry(buf, i, true);
      if (this.ext) {
        setTableEntry(buf, i / 8, 0);
        buf.writeUInt32BE(ALL_ALLOC, i + 8);
        buf.writeUInt32BE(0, i + 12);
      } else {
        setTableEntry(buf, i / 8, 0, 0, this.version >= 3 ? LO_ZERO : 0);
      }
    });
  }

  // ---------------------------------------------------------------- resize

  async truncate(newSize: number): Promise<void> {
    // QEMU's qcow2 refusals, with its messages (block_resize shows them).
    if (this.h.nbSnapshots > 0) throw new BlockIoError(ENOTSUP, "Can't resize an image which has snapshots");
    if (newSize % 512 !== 0) throw new BlockIoError(osConstants.errno.EINVAL, 'The new size must be a multiple of 512');
    await this.waitBusy(0, Math.max(this.size, 1));
    const old = this.size;
    // Growing over a backing file longer than the image would let its data show through the new
    // space: QEMU zeroes that space (BDRV_REQ_ZERO_WRITE), which v2 images cannot do cheaply.
    const zeroNew = newSize > old && this.backing !== undefined && this.backing.getLength() > old;
    if (zeroNew && this.version < 3) {
      throw new BlockIoError(ENOTSUP, 'Failed to zero out new clusters: Operation not supported');
    }
    if (newSize < old) {
      const c0 = Math.ceil(newSize / this.cs);
      const c1 = Math.ceil(old / this.cs);
      if (c0 < c1) {
        await this.editClusters(c0, c1, () => false, (buf, i) => {
          this.releaseEntry(buf, i, true);
          buf.fill(0, i, i + this.entryBytes);
        });
      }
    }
    await this.meta.run(async () => {
      const l1Need = Math.ceil(newSize / (this.l2Entries * this.cs));
      if (l1Need > QCOW_MAX_L1_SIZE / 8) throw new BlockIoError(EFBIG, 'Failed to grow the L1 table: File too large');
      if (l1Need > this.l1.length / 8) await this.growL1(l1Need);
      // Make the size change durable after everything it depends on.
      await this.flushLocked();
      const b = Buffer.alloc(8);
      b.writeBigUInt64BE(BigInt(newSize));
      await this.file.write(OFF_SIZE, b);
      await this.file.flush();
      this.size = newSize;
    });
    // Bytes between the old end and its cluster end may hold stale data: expose zeroes.
    const alignedOld = Math.ceil(old / this.cs) * this.cs;
    if (newSize > old && old % this.cs !== 0) {
      await this.zeroSlow(old, Math.min(newSize, alignedOld));
    }
    // Zero flags (no data written) over the whole new clusters.
    if (zeroNew && newSize > alignedOld) await this.writeZeroes(alignedOld, newSize - alignedOld, false);
  }

  private async growL1(entries: number): Promise<void> {
    const cs = this.cs;
    const bytes = entries * 8;
    const clusters = Math.ceil(bytes / cs);
    const off = await this.rc.alloc(clusters);
    const nl1 = Buffer.alloc(entries * 8);
    this.l1.copy(nl1);
    await this.file.write(off, nl1);
    await this.rc.cache.writeBack();
    await this.file.flush();
    const hdr = Buffer.alloc(12);
    hdr.writeUInt32BE(entries, 0);
    hdr.writeBigUInt64BE(BigInt(off), 4);
    await this.file.write(OFF_L1_SIZE, hdr);
    await this.file.flush();
    const oldOff = this.l1Offset;
    const oldClusters = Math.ceil(this.l1.length / cs);
    this.l1 = nl1;
    this.l1Offset = off;
    if (oldOff !== 0) for (let c = 0; c < oldClusters; c++) await this.rc.add(oldOff / cs + c, -1);
  }

  /** Allocates every cluster of the image (preallocation=metadata). */
  async preallocateMetadata(): Promise<void> {
    const cs = this.cs;
    const total = Math.ceil(this.size / cs);
    for (let c = 0; c < total;) {
      const l1i = Math.floor(c / this.l2Entries);
      const end = Math.min(total, (l1i + 1) * this.l2Entries);
      await this.meta.run(async () => {
        const t = await this.l2ForWrite(l1i);
        const host = await this.rc.alloc(end - c);
        for (let k = c; k < end; k++) {
          const i = (k % this.l2Entries) * this.entryBytes;
          // Extended L2: offset with an empty bitmap, so a backing file still shows through.
          setTableEntry(t.buf, i / 8, host + (k - c) * cs, HI_COPIED, 0);
        }
        this.l2Cache.markDirty(t);
        await this.flushLocked();
      });
      c = end;
    }
  }

  notSupported(what: string): never {
    throw new BlockIoError(ENOTSUP, what);
  }
}
