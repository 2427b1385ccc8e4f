// qcow2 refcounts: the refcount table and blocks, cluster allocation and freeing.
// Every method here runs under the image's metadata mutex (the caller holds it).
import { constants as osConstants } from 'node:os';
import type { BlockNode } from '../node.js';
import { BlockIoError } from '../node.js';
import { OFF_REFTABLE, QCOW_MAX_REFTABLE_SIZE } from './header.js';
import { TableCache } from './table-cache.js';

const { EFBIG } = osConstants.errno;

/** Reads the 64-bit table entry at `i` as an offset (bits 9..55; the reserved bits are ignored). */
export function tableOffset(buf: Buffer, i: number): number {
  const hi = buf.readUInt32BE(i * 8);
  const lo = buf.readUInt32BE(i * 8 + 4);
  return (hi & 0x00ffffff) * 4294967296 + ((lo & 0xfffffe00) >>> 0);
}

/** Writes a 64-bit entry: offset plus the high flag bits `hiFlags` and low flag bits `loFlags`. */
export function setTableEntry(buf: Buffer, i: number, offset: number, hiFlags = 0, loFlags = 0): void {
  buf.writeUInt32BE((Math.floor(offset / 4294967296) | hiFlags) >>> 0, i * 8);
  buf.writeUInt32BE(((offset % 4294967296) | loFlags) >>> 0, i * 8 + 4);
}

export class Refcounts {
  readonly cache: TableCache;
  /** log2 of refcount entries per block. */
  private readonly blockBits: number;
  private readonly perBlock: number;
  private readonly bits: number;
  private readonly maxRefcount: number;
  /** In-memory copy of the refcount table (always written through). */
  table: Buffer;
  tableOffset: number;
  tableClusters: number;
  /** Next cluster index the free-cluster search starts at. */
  freeHint = 0;
  /** Dirty images (lazy refcounts left unrepaired) only allocate past everything seen so far. */
  appendOnly = false;

  constructor(
    private readonly file: BlockNode,
    private readonly clusterBits: number,
    refcountOrder: number,
    tableOffset: number,
    tableClusters: number,
    table: Buffer,
  ) {
    this.bits = 1 << refcountOrder;
    this.blockBits = clusterBits + 3 - refcountOrder;
    this.perBlock = 2 ** this.blockBits;
    this.maxRefcount = this.bits === 64 ? Number.MAX_SAFE_INTEGER : 2 ** this.bits - 1;
    this.table = table;
    this.tableOffset = tableOffset;
    this.tableClusters = tableClusters;
    const cs = 2 ** clusterBits;
    this.cache = new TableCache(file, cs, Math.max(8, Math.floor((4 << 20) / cs)));
  }

  private get cs(): number {
    return 2 ** this.clusterBits;
  }

  get tableEntries(): number {
    return this.table.length / 8;
  }

  private readEntry(buf: Buffer, i: number): number {
    switch (this.bits) {
      case 1: case 2: case 4: {
        const perByte = 8 / this.bits;
        return (buf[Math.floor(i / perByte)]! >> ((i % perByte) * this.bits)) & ((1 << this.bits) - 1);
      }
      case 8: return buf[i]!;
      case 16: return buf.readUInt16BE(i * 2);
      case 32: return buf.readUInt32BE(i * 4);
      default: return Number(buf.readBigUInt64BE(i * 8));
    }
  }

  private writeEntry(buf: Buffer, i: number, v: number): void {
    switch (this.bits) {
      case 1: case 2: case 4: {
        const perByte = 8 / this.bits;
        const shift = (i % perByte) * this.bits;
        const mask = ((1 << this.bits) - 1) << shift;
        const b = Math.floor(i / perByte);
        buf[b] = (buf[b]! & ~mask) | (v << shift);
        return;
      }
      case 8: buf[i] = v; return;
      case 16: buf.writeUInt16BE(v, i * 2); return;
      case 32: buf.writeUInt32BE(v, i * 4); return;
      default: buf.writeBigUInt64BE(BigInt(v), i * 8);
    }
  }

  private blockOffset(idx: number): number {
    return idx < this.tableEntries ? tableOffset(this.table, idx) : 0;
  }

  /** True if the refcount block covering `cluster` exists (setting it allocates nothing). */
  hasBlock(cluster: number): boolean {
    return this.blockOffset(Math.floor(cluster / this.perBlock)) !== 0;
  }

  async get(cluster: number): Promise<number> {
    const bo = this.blockOffset(Math.floor(cluster / this.perBlock));
    if (bo === 0) return 0;
    const t = await this.cache.get(bo);
    return this.readEntry(t.buf, cluster % this.perBlock);
  }

  /** Sets a refcount (the block is created if missing). */
  async set(cluster: number, value: number): Promise<void> {
    if (value > this.maxRefcount || value < 0) {
      throw new BlockIoError(osConstants.errno.ERANGE, 'refcount overflow');
    }
    const t = await this.ensureBlock(Math.floor(cluster / this.perBlock));
    this.writeEntry(t.buf, cluster % this.perBlock, value);
    this.cache.markDirty(t);
  }

  async add(cluster: number, delta: number): Promise<number> {
    const v = (await this.get(cluster)) + delta;
    await this.set(cluster, v);
    if (v === 0 && cluster < this.freeHint && !this.appendOnly) this.freeHint = cluster;
    return v;
  }

  /** The refcount block for index `idx`, allocating it (and growing the table) when missing. */
  private async ensureBlock(idx: number) {
    if (idx >= this.tableEntries) await this.growTable(idx);
    const bo = this.blockOffset(idx);
    if (bo !== 0) return this.cache.get(bo);
    let f: number;
    let buf: Buffer;
    for (;;) {
      f = await this.findFree(1);
      const idx2 = Math.floor(f / this.perBlock);
      buf = Buffer.alloc(this.cs);
      if (idx2 === idx) {
        // The new block describes itself.
        this.writeEntry(buf, f % this.perBlock, 1);
        break;
      }
      if (this.blockOffset(idx2) !== 0 && idx2 < this.tableEntries) {
        await this.set(f, 1);
        break;
      }
      await this.ensureBlock(idx2);
    }
    await this.file.write(f * this.cs, buf);
    const t = { offset: f * this.cs, buf, dirty: false };
    this.cache.insert(t);
    // The block's own refcount must be in the file before the table points at the block.
    await this.cache.writeBack();
    await this.file.flush();
    setTableEntry(this.table, idx, f * this.cs);
    await this.file.write(this.tableOffset + idx * 8, this.table.subarray(idx * 8, idx * 8 + 8));
    if (this.freeHint <= f) this.freeHint = f + 1;
    return t;
  }

  /** Grows the refcount table so that index `idx` exists; new table and blocks go to free space. */
  private async growTable(idx: number): Promise<void> {
    const cs = this.cs;
    let tClusters = Math.max(Math.ceil(((idx + 1) * 8) / cs), Math.ceil((this.tableClusters * 3) / 2), 1);
    let a = 0;
    let needed: number[] = [];
    let nb = 0;
    for (;;) {
      a = await this.findFree(tClusters + nb, true);
      const end = a + tClusters + nb;
      needed = [];
      for (let j = Math.floor(a / this.perBlock); j <= Math.floor((end - 1) / this.perBlock); j++) {
        if (this.blockOffset(j) === 0) needed.push(j);
      }
      const maxIdx = Math.max(idx, ...needed);
      const tNeed = Math.ceil(((maxIdx + 1) * 8) / cs);
      if (needed.length <= nb && tNeed <= tClusters) break;
      nb = Math.max(nb, needed.length);
      tClusters = Math.max(tClusters, tNeed);
    }
    if (tClusters * cs > QCOW_MAX_REFTABLE_SIZE) throw new BlockIoError(EFBIG, 'refcount table too large');
    const used = tClusters + needed.length;
    const newBlocks = new Map<number, Buffer>();
    needed.forEach((j) => newBlocks.set(j, Buffer.alloc(cs)));
    for (let c = a; c < a + used; c++) {
      const j = Math.floor(c / this.perBlock);
      const nbuf = newBlocks.get(j);
      if (nbuf !== undefined) this.writeEntry(nbuf, c % this.perBlock, 1);
      else await this.set(c, 1);
    }
    const newTable = Buffer.alloc(tClusters * cs);
    this.table.copy(newTable);
    let k = 0;
    for (const [j, nbuf] of newBlocks) {
      const off = (a + tClusters + k++) * cs;
      setTableEntry(newTable, j, off);
      await this.file.write(off, nbuf);
      this.cache.insert({ offset: off, buf: nbuf, dirty: false });
    }
    await this.cache.writeBack();
    await this.file.write(a * cs, newTable);
    await this.file.flush();
    const hdr = Buffer.alloc(12);
    hdr.writeBigUInt64BE(BigInt(a * cs), 0);
    hdr.writeUInt32BE(tClusters, 8);
    await this.file.write(OFF_REFTABLE, hdr);
    await this.file.flush();
    const oldOff = this.tableOffset;
    const oldClusters = this.tableClusters;
    this.table = newTable;
    this.tableOffset = a * cs;
    this.tableClusters = tClusters;
    if (this.freeHint < a + used) this.freeHint = a + used;
    // Nothing points at the old table any more: free it right away.
    for (let c = 0; c < oldClusters; c++) await this.add(oldOff / cs + c, -1);
  }

  /**
   * First run of `n` clusters with refcount 0 from the hint. `atEnd` skips holes so that a run
   * which must be contiguous with fresh blocks is found quickly.
   */
  async findFree(n: number, atEnd = false): Promise<number> {
    let start = this.freeHint;
    if (atEnd) start = Math.max(start, Math.ceil(this.file.getLength() / this.cs));
    let run = 0;
    let c = start;
    for (;;) {
      const idx = Math.floor(c / this.perBlock);
      const blockEnd = (idx + 1) * this.perBlock;
      const bo = this.blockOffset(idx);
      if (bo === 0) {
        // A missing block: its whole range is free.
        if (run + (blockEnd - c) >= n) return c - run;
        run += blockEnd - c;
        c = blockEnd;
        continue;
      }
      const t = await this.cache.get(bo);
      // Scan the rest of this block synchronously.
      for (; c < blockEnd; c++) {
        if (this.readEntry(t.buf, c % this.perBlock) === 0) {
          if (++run >= n) return c - run + 1;
        } else {
          run = 0;
        }
      }
    }
  }

  /** Allocates `n` contiguous clusters with refcount 1; returns the host offset of the first. */
  async alloc(n: number): Promise<number> {
    for (;;) {
      const start = await this.findFree(n);
      let created = false;
      for (let j = Math.floor(start / this.perBlock); j <= Math.floor((start + n - 1) / this.perBlock); j++) {
        if (this.blockOffset(j) === 0) {
          await this.ensureBlock(j);
          created = true;
        }
      }
      if (created) {
        let free = true;
        for (let c = start; c < start + n && free; c++) free = (await this.get(c)) === 0;
        if (!free) continue;
      }
      for (let c = start; c < start + n; c++) await this.set(c, 1);
      this.freeHint = start + n;
      return start * this.cs;
    }
  }
}
