// Dirty bitmaps and the write threshold of a node, in shared memory every context's replica sees.
//
// Layout. One process-wide growable SharedArrayBuffer (the arena) holds, for every node that has
// a tracking header, a header, a slot table and the bitmaps' bits. The main thread owns the arena
// (allocates, grows, frees); replicas in iothreads get the arena and the header's index in their
// NodeDescription and only read the table and OR bits in. A bitmap's bits are exactly QEMU's
// HBitmap lowest level: ceil(bits / 64) little-endian 64-bit words, bit i of the bitmap covering
// bytes [i * granularity, (i + 1) * granularity). x-debug-block-dirty-bitmap-sha256 hashes them.
//
// Concurrency. A replica marks bits inside a reader section (READERS count up/down); a slot that
// the main thread frees is first unpublished (state FREE), then the main thread waits for the
// node's readers to leave before the bits' region can be reused, so a late reader never writes
// into another bitmap. Enabling/disabling only flips a slot's state.
import { createHash } from 'node:crypto';
import type { BlockNode } from './node.js';

/** QEMU's BDRV_BITMAP_MAX_NAME_SIZE. */
export const BITMAP_MAX_NAME_SIZE = 1023;

/** What a replica needs to join a node's tracking (structured-cloneable). */
export interface TrackingDescription {
  arena: SharedArrayBuffer;
  /** Word index of the node header in the arena. */
  hdr: number;
}

// Node header (int32 words from hdr; hdr is even so the 64-bit fields are 8-byte aligned).
const H_ACTIVE = 0; // enabled bitmaps + (threshold set ? 1 : 0): the one hot-path check
const H_READERS = 1; // replicas currently inside markDirty
const H_TABLE = 2; // word index of the slot table
const H_NSLOTS = 3; // slots in the table
const H_EVENT = 4; // 1 while a threshold event from another context waits for the main thread
const H_THRESHOLD64 = 8; // int64: write threshold, 0 = none
const H_EV_AMOUNT64 = 10; // int64: amount-exceeded of the pending event
const H_EV_THRESHOLD64 = 12; // int64: write-threshold of the pending event
const HDR_WORDS = 16;

// Slot: [state, granularity shift, first word of the bits, bit count low, bit count high, pad…]
const S_STATE = 0;
const S_SHIFT = 1;
const S_DATA = 2;
const S_BITS_LO = 3;
const S_BITS_HI = 4;
const SLOT_WORDS = 8;
const SLOT_FREE = 0;
const SLOT_ENABLED = 1;
const SLOT_DISABLED = 2;

const ARENA_MAX_BYTES = 1 << 30;
const ARENA_INITIAL_BYTES = 64 * 1024;

/** The main thread's arena: a growable SAB and a first-fit allocator of 8-byte-aligned extents. */
class Arena {
  readonly sab = new SharedArrayBuffer(ARENA_INITIAL_BYTES, { maxByteLength: ARENA_MAX_BYTES });
  readonly i32 = new Int32Array(this.sab);
  /** Free extents [start, words], sorted by start; the tail beyond `top` is free too. */
  private free: Array<[number, number]> = [];
  private top = 0;

  /** `words` zeroed int32 words at an even index; throws when the arena is full. */
  alloc(words: number): number {
    words += words & 1;
    for (let i = 0; i < this.free.length; i++) {
      const [start, len] = this.free[i];
      if (len < words) continue;
      if (len === words) this.free.splice(i, 1);
      else this.free[i] = [start + words, len - words];
      this.i32.fill(0, start, start + words);
      return start;
    }
    const start = this.top;
    const needBytes = (start + words) * 4;
    if (needBytes > this.sab.byteLength) {
      if (needBytes > ARENA_MAX_BYTES) throw new Error('Cannot allocate memory');
      this.sab.grow(Math.min(ARENA_MAX_BYTES, Math.max(needBytes, this.sab.byteLength * 2)));
    }
    this.top += words;
    this.i32.fill(0, start, start + words);
    return start;
  }

  release(start: number, words: number): void {
    words += words & 1;
    this.free.push([start, words]);
    this.free.sort((a, b) => a[0] - b[0]);
    const merged: Array<[number, number]> = [];
    for (const e of this.free) {
      const last = merged[merged.length - 1];
      if (last && last[0] + last[1] === e[0]) last[1] += e[1];
      else merged.push([e[0], e[1]]);
    }
    const last = merged[merged.length - 1];
    if (last && last[0] + last[1] === this.top) {
      this.top = last[0];
      merged.pop();
    }
    this.free = merged;
  }
}

let arena: Arena | undefined;
function mainArena(): Arena {
  return (arena ??= new Arena());
}

/** Receives BLOCK_WRITE_THRESHOLD (set by the QMP layer, main thread). */
export type ThresholdListener = (data: { 'node-name': string; 'amount-exceeded': number; 'write-threshold': number }) => void;
let thresholdListener: ThresholdListener | undefined;
export function setWriteThresholdListener(listener: ThresholdListener): void {
  thresholdListener = listener;
}

/**
 * One node's tracking header as seen by one context. The main-thread instance also owns the
 * node's DirtyBitmap objects; replicas only run beforeWrite/markDirty.
 */
export class NodeTracking {
  readonly i32: Int32Array;
  private readonly i64: BigInt64Array;
  /** Main thread: the node's bitmaps, newest first (QEMU's list order). */
  readonly bitmaps: DirtyBitmap[] = [];
  private waiting = false;

  constructor(
    readonly nodeName: string,
    readonly arenaSab: SharedArrayBuffer,
    readonly hdr: number,
    /** True for the main thread's instance (the only one that emits events and owns bitmaps). */
    readonly isMain: boolean,
  ) {
    this.i32 = new Int32Array(arenaSab);
    this.i64 = new BigInt64Array(arenaSab);
  }

  describe(): TrackingDescription {
    return { arena: this.arenaSab, hdr: this.hdr };
  }

  /** The hot-path check: nothing to do for writes on this node. */
  idle(): boolean {
    return Atomics.load(this.i32, this.hdr + H_ACTIVE) === 0;
  }

  /** QEMU's bdrv_write_threshold_check_write: one-shot, raced with compare-and-swap. */
  beforeWrite(offset: number, bytes: number): void {
    const idx = (this.hdr + H_THRESHOLD64) / 2;
    for (;;) {
      const wtr = Atomics.load(this.i64, idx);
      const end = offset + bytes;
      // The threshold is a uint64 kept in an int64 slot: compare unsigned.
      if (wtr === 0n || (wtr > 0n && Number(wtr) >= end) || wtr < 0n) return;
      if (Atomics.compareExchange(this.i64, idx, wtr, 0n) !== wtr) continue;
      Atomics.sub(this.i32, this.hdr + H_ACTIVE, 1);
      const threshold = Number(wtr);
      if (this.isMain) {
        thresholdListener?.({ 'node-name': this.nodeName, 'amount-exceeded': end - threshold, 'write-threshold': threshold });
      } else {
        Atomics.store(this.i64, (this.hdr + H_EV_AMOUNT64) / 2, BigInt(end - threshold));
        Atomics.store(this.i64, (this.hdr + H_EV_THRESHOLD64) / 2, wtr);
        Atomics.store(this.i32, this.hdr + H_EVENT, 1);
        Atomics.notify(this.i32, this.hdr + H_EVENT);
      }
      return;
    }
  }

  /** QEMU's bdrv_set_dirty: every enabled bitmap of the node records [offset, offset + bytes). */
  markDirty(offset: number, bytes: number): void {
    if (bytes <= 0) return;
    const i32 = this.i32;
    const hdr = this.hdr;
    Atomics.add(i32, hdr + H_READERS, 1);
    try {
      const table = Atomics.load(i32, hdr + H_TABLE);
      const n = Atomics.load(i32, hdr + H_NSLOTS);
      for (let s = table, end = table + n * SLOT_WORDS; s < end; s += SLOT_WORDS) {
        if (Atomics.load(i32, s + S_STATE) !== SLOT_ENABLED) continue;
        const gran = 2 ** i32[s + S_SHIFT];
        const nbits = (i32[s + S_BITS_LO] >>> 0) + (i32[s + S_BITS_HI] >>> 0) * 0x100000000;
        const first = Math.floor(offset / gran);
        const last = Math.min(Math.floor((offset + bytes - 1) / gran), nbits - 1);
        if (first <= last) setBits(i32, i32[s + S_DATA], first, last);
      }
    } finally {
      Atomics.sub(i32, hdr + H_READERS, 1);
    }
  }

  /**
   * After a tracked request: in the main thread, bitmaps follow a node that grew (QEMU's
   * bdrv_co_write_req_finish); then the range is marked.
   */
  afterWrite(node: BlockNode, offset: number, bytes: number): void {
    if (this.isMain && this.bitmaps.length > 0) {
      const length = node.getLength();
      for (const b of this.bitmaps) if (b.size < length) b.resize(length);
    }
    this.markDirty(offset, bytes);
  }

  /** Main thread, after a successful truncate: every bitmap takes the new length. */
  resized(length: number): void {
    for (const b of this.bitmaps) b.resize(length);
  }

  // ---- main thread only

  /** The configured threshold (query-named-block-nodes' write_threshold). */
  get writeThreshold(): number {
    return Number(Atomics.load(this.i64, (this.hdr + H_THRESHOLD64) / 2));
  }

  /**
   * QEMU's bdrv_write_threshold_set: 0 disables. A uint64; QEMU also takes negative numbers,
   * which wrap (query-named-block-nodes then shows them as the int64 they become).
   */
  setWriteThreshold(value: number): void {
    const idx = (this.hdr + H_THRESHOLD64) / 2;
    const v = value >= 2 ** 64 - 1 ? -1n : BigInt.asIntN(64, BigInt(Math.trunc(value)));
    const old = Atomics.exchange(this.i64, idx, v);
    if (old === 0n && v !== 0n) Atomics.add(this.i32, this.hdr + H_ACTIVE, 1);
    else if (old !== 0n && v === 0n) Atomics.sub(this.i32, this.hdr + H_ACTIVE, 1);
    if (v !== 0n) this.waitForReplicaEvents();
  }

  /** Replicas raise the event through shared memory; the main thread wakes up and emits it. */
  private waitForReplicaEvents(): void {
    if (this.waiting) return;
    this.waiting = true;
    const res = Atomics.waitAsync(this.i32, this.hdr + H_EVENT, 0);
    const handle = () => {
      this.waiting = false;
      if (Atomics.load(this.i32, this.hdr + H_EVENT) === 1) {
        const amount = Number(Atomics.load(this.i64, (this.hdr + H_EV_AMOUNT64) / 2));
        const threshold = Number(Atomics.load(this.i64, (this.hdr + H_EV_THRESHOLD64) / 2));
        Atomics.store(this.i32, this.hdr + H_EVENT, 0);
        thresholdListener?.({ 'node-name': this.nodeName, 'amount-exceeded': amount, 'write-threshold': threshold });
      }
      if (this.writeThreshold !== 0) this.waitForReplicaEvents();
    };
    if (res.async) void res.value.then(handle);
    else handle();
  }

  /** A slot for a new bitmap (grows the table when full). */
  allocSlot(): number {
    const i32 = this.i32;
    const table = i32[this.hdr + H_TABLE];
    const n = i32[this.hdr + H_NSLOTS];
    for (let s = 0; s < n; s++) {
      if (Atomics.load(i32, table + s * SLOT_WORDS + S_STATE) === SLOT_FREE && !this.bitmaps.some((b) => b.slot === table + s * SLOT_WORDS)) {
        return table + s * SLOT_WORDS;
      }
    }
    // Publish a bigger copy, then retire the old table once no replica reads it.
    const a = mainArena();
    const bigger = a.alloc(Math.max(4, n * 2) * SLOT_WORDS);
    i32.copyWithin(bigger, table, table + n * SLOT_WORDS);
    for (const b of this.bitmaps) b.slot = bigger + (b.slot - table);
    Atomics.store(i32, this.hdr + H_TABLE, bigger);
    Atomics.store(i32, this.hdr + H_NSLOTS, Math.max(4, n * 2));
    this.waitReaders();
    if (n > 0) a.release(table, n * SLOT_WORDS);
    return bigger + n * SLOT_WORDS;
  }

  /** Wait until no replica is inside markDirty (sections are a few microseconds, no awaits). */
  waitReaders(): void {
    while (Atomics.load(this.i32, this.hdr + H_READERS) !== 0) {
      Atomics.wait(this.i32, this.hdr + H_READERS, Atomics.load(this.i32, this.hdr + H_READERS), 1);
    }
  }

  /** Enabled-bitmap count changes feed the hot-path check. */
  adjustActive(delta: number): void {
    Atomics.add(this.i32, this.hdr + H_ACTIVE, delta);
  }
}

/** Set bits [first, last] of the bitmap whose words start at `data` (32-bit little-endian halves). */
function setBits(i32: Int32Array, data: number, first: number, last: number): void {
  const w0 = Math.floor(first / 32);
  const w1 = Math.floor(last / 32);
  const b0 = first - w0 * 32;
  const b1 = last - w1 * 32;
  const tailMask = b1 === 31 ? -1 : (1 << (b1 + 1)) - 1;
  if (w0 === w1) {
    Atomics.or(i32, data + w0, tailMask & (-1 << b0));
    return;
  }
  Atomics.or(i32, data + w0, -1 << b0);
  if (w1 > w0 + 1) i32.fill(-1, data + w0 + 1, data + w1);
  Atomics.or(i32, data + w1, tailMask);
}

/** The tracking header of a node, created on first use (main thread). */
export function nodeTracking(node: BlockNode): NodeTracking {
  if (node.tracking) return node.tracking;
  if (node.isReplica) throw new Error('a replica cannot create tracking state');
  const a = mainArena();
  const hdr = a.alloc(HDR_WORDS);
  node.tracking = new NodeTracking(node.nodeName, a.sab, hdr, true);
  return node.tracking;
}

/** For describeNode(): the description a replica attaches to. */
export function describeTracking(node: BlockNode): TrackingDescription {
  return nodeTracking(node).describe();
}

/** In a replica: join the main thread's tracking of the node. */
export function attachTracking(nodeName: string, desc: TrackingDescription): NodeTracking {
  return new NodeTracking(nodeName, desc.arena, desc.hdr, false);
}

/** What bitmap users need from the graph (set by the QMP layer, which creates every bitmap). */
export interface BitmapGraphAccess {
  lookup(nodeName: string): BlockNode | undefined;
  /** bdrv_is_writable: some user of the node holds the write permission. */
  hasWriter(node: BlockNode): boolean;
}
let graphAccess: BitmapGraphAccess | undefined;
export function setBitmapGraphAccess(access: BitmapGraphAccess): void {
  graphAccess = access;
}

export function nodeHasWriter(node: BlockNode): boolean {
  return graphAccess?.hasWriter(node) ?? false;
}

/**
 * The graph's node of that name. Bitmaps are created only through QMP, whose handlers register
 * the lookup first; without it no node has bitmaps, so only `fallback` can be found.
 */
export function lookupBitmapNode(nodeName: string, fallback?: BlockNode): BlockNode | undefined {
  if (graphAccess) return graphAccess.lookup(nodeName);
  return fallback?.nodeName === nodeName ? fallback : undefined;
}

/** The node's bitmaps, newest first (empty when it never had any). */
export function nodeBitmaps(node: BlockNode): readonly DirtyBitmap[] {
  return node.tracking?.bitmaps ?? [];
}

/** QEMU's bdrv_find_dirty_bitmap. */
export function findDirtyBitmap(node: BlockNode, name: string): DirtyBitmap | undefined {
  return node.tracking?.bitmaps.find((b) => b.name === name);
}

function popcount32(v: number): number {
  v -= (v >>> 1) & 0x55555555;
  v = (v & 0x33333333) + ((v >>> 2) & 0x33333333);
  return (((v + (v >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
}

/** A named dirty bitmap (main thread). Its bits live in the arena, in its node's slot table. */
export class DirtyBitmap {
  /** Slot word index in the node's table (moves when the table grows). */
  slot: number;
  /** First int32 word of the bits. */
  private data: number;
  /** Bits, as QEMU counts them: ceil(length / granularity), at least 1. */
  bits: number;
  /** The node's length the bitmap covers (HBitmap's orig_size; merges need equal sizes). */
  size: number;
  /** int32 words of the bits (two per 64-bit HBitmap word). */
  private words: number;
  readonly granularity: number;
  private enabled = true;
  /** In use by an export or job: no changes through QMP. */
  busy = false;
  persistent = false;
  /** Loaded from an image where it was in use (not stored cleanly): its bits are unknown. */
  inconsistent = false;
  /** Loaded from a read-only image: no changes through QMP. */
  readonly = false;
  private released = false;

  /**
   * The tracking the bits live in, held directly: the graph's node replacement swaps BlockNode
   * objects' fields, and the bitmap must stay with its bits whichever object carries them.
   */
  private readonly trk: NodeTracking;

  constructor(readonly node: BlockNode, readonly name: string, granularity: number, length: number) {
    const tracking = nodeTracking(node);
    this.trk = tracking;
    this.granularity = granularity;
    this.size = length;
    this.bits = Math.max(1, Math.ceil(length / granularity));
    this.words = Math.ceil(this.bits / 64) * 2;
    this.data = mainArena().alloc(this.words);
    this.slot = tracking.allocSlot();
    const i32 = tracking.i32;
    i32[this.slot + S_SHIFT] = Math.log2(granularity);
    i32[this.slot + S_DATA] = this.data;
    i32[this.slot + S_BITS_LO] = this.bits % 0x100000000;
    i32[this.slot + S_BITS_HI] = Math.floor(this.bits / 0x100000000);
    Atomics.store(i32, this.slot + S_STATE, SLOT_ENABLED);
    tracking.adjustActive(1);
    tracking.bitmaps.unshift(this);
  }

  private get i32(): Int32Array {
    return this.trk.i32;
  }

  /** QEMU's bdrv_dirty_bitmap_recording: enabled (no successor in qsd-ts). */
  get recording(): boolean {
    return this.enabled;
  }

  setEnabled(enabled: boolean): void {
    if (enabled === this.enabled || this.released) return;
    this.enabled = enabled;
    const tracking = this.trk;
    Atomics.store(this.i32, this.slot + S_STATE, enabled ? SLOT_ENABLED : SLOT_DISABLED);
    tracking.adjustActive(enabled ? 1 : -1);
  }

  /** Detach from the node; the bits' region is reused only after replicas left it. */
  release(): void {
    if (this.released) return;
    const tracking = this.trk;
    if (this.enabled) tracking.adjustActive(-1);
    Atomics.store(this.i32, this.slot + S_STATE, SLOT_FREE);
    tracking.waitReaders();
    const i = tracking.bitmaps.indexOf(this);
    if (i >= 0) tracking.bitmaps.splice(i, 1);
    mainArena().release(this.data, this.words);
    this.released = true;
  }

  /**
   * QEMU's bdrv_dirty_bitmap_truncate (the node grew by a write past its end, or was resized):
   * new bits are clean, bits past a shrunk end are dropped. The slot is unpublished while its
   * fields change, so a replica never pairs the old region with the new size.
   */
  resize(length: number): void {
    if (length === this.size || this.released) return;
    const tracking = this.trk;
    const i32 = tracking.i32;
    const bits = Math.max(1, Math.ceil(length / this.granularity));
    const words = Math.ceil(bits / 64) * 2;
    const data = mainArena().alloc(words);
    Atomics.store(i32, this.slot + S_STATE, SLOT_FREE);
    tracking.waitReaders();
    i32.copyWithin(data, this.data, this.data + Math.min(words, this.words));
    if (bits < this.bits && bits % 32 !== 0) i32[data + Math.floor(bits / 32)] &= (1 << (bits % 32)) - 1;
    if (bits < this.bits) i32.fill(0, data + Math.ceil(bits / 32), data + words);
    mainArena().release(this.data, this.words);
    this.data = data;
    this.words = words;
    this.bits = bits;
    this.size = length;
    i32[this.slot + S_DATA] = data;
    i32[this.slot + S_BITS_LO] = bits % 0x100000000;
    i32[this.slot + S_BITS_HI] = Math.floor(bits / 0x100000000);
    Atomics.store(i32, this.slot + S_STATE, this.enabled ? SLOT_ENABLED : SLOT_DISABLED);
  }

  clear(): void {
    this.i32.fill(0, this.data, this.data + this.words);
  }

  /**
   * The bits as qcow2 stores them (QEMU's hbitmap serialization: little-endian, bit i of byte k
   * is bitmap bit 8k + i): ceil(bits / 8) bytes viewed in place. Loaders fill it, then trimTail().
   */
  serialized(): Uint8Array {
    return new Uint8Array(this.i32.buffer, this.data * 4, Math.ceil(this.bits / 8));
  }

  /** Clears bits past the end that a loaded image may have set (hbitmap_deserialize_finish). */
  trimTail(): void {
    const r = this.bits % 32;
    if (r !== 0) this.i32[this.data + Math.floor(this.bits / 32)] &= (1 << r) - 1;
    this.i32.fill(0, this.data + Math.ceil(this.bits / 32), this.data + this.words);
  }

  /** Mark [offset, offset + bytes) regardless of the enabled state (merges, tests). */
  setRange(offset: number, bytes: number): void {
    if (bytes <= 0) return;
    const first = Math.floor(offset / this.granularity);
    const last = Math.min(Math.floor((offset + bytes - 1) / this.granularity), this.bits - 1);
    if (first <= last) setBits(this.i32, this.data, first, last);
  }

  /**
   * QEMU's bdrv_reset_dirty_bitmap: clear the granules in [offset, offset + bytes). Atomic per
   * word, so marks that replicas make meanwhile in the same words are kept (the mirror job).
   */
  resetRange(offset: number, bytes: number): void {
    if (bytes <= 0) return;
    const first = Math.floor(offset / this.granularity);
    const last = Math.min(Math.floor((offset + bytes - 1) / this.granularity), this.bits - 1);
    for (let bit = first; bit <= last;) {
      const w = bit >> 5;
      const lo = bit & 31;
      const hi = Math.min(31, last - w * 32);
      const mask = hi - lo === 31 ? -1 : (((1 << (hi - lo + 1)) - 1) << lo);
      Atomics.and(this.i32, this.data + w, ~mask);
      bit = (w + 1) * 32;
    }
  }

  getBit(bit: number): boolean {
    const w = this.i32[this.data + Math.floor(bit / 32)];
    return ((w >>> (bit % 32)) & 1) !== 0;
  }

  /** QEMU's bdrv_get_dirty_count: dirty bits times the granularity. */
  count(): number {
    let n = 0;
    const i32 = this.i32;
    for (let w = this.data, end = this.data + this.words; w < end; w++) if (i32[w] !== 0) n += popcount32(i32[w]);
    return n * this.granularity;
  }

  /** hbitmap_sha256: SHA-256 of the lowest level as QEMU stores it (little-endian longs). */
  sha256(): string {
    const bytes = new Uint8Array(this.i32.buffer, this.data * 4, this.words * 4);
    return createHash('sha256').update(bytes).digest('hex');
  }

  /**
   * The end of the run of bits equal to the bit at `offset`, clamped to `end` (bytes). Used by
   * NBD block status: the range [offset, result) is all dirty or all clean.
   */
  runEnd(offset: number, end: number): { dirty: boolean; end: number } {
    const g = this.granularity;
    let bit = Math.floor(offset / g);
    const lastBit = Math.min(Math.floor((end - 1) / g), this.bits - 1);
    if (bit > lastBit) return { dirty: false, end };
    const dirty = this.getBit(bit);
    const i32 = this.i32;
    const skip = dirty ? -1 : 0;
    bit++;
    while (bit <= lastBit) {
      if (bit % 32 === 0 && bit + 31 <= lastBit && i32[this.data + bit / 32] === skip) {
        bit += 32;
        continue;
      }
      if (this.getBit(bit) !== dirty) break;
      bit++;
    }
    return { dirty, end: Math.min(end, bit * g) };
  }

  /** OR `src` into this bitmap (hbitmap_merge: any granularity, sizes already checked). */
  mergeFrom(src: DirtyBitmap): void {
    if (src.granularity === this.granularity) {
      const a = this.i32;
      const b = src.i32;
      const n = Math.min(this.words, src.words);
      for (let i = 0; i < n; i++) if (b[src.data + i] !== 0) Atomics.or(a, this.data + i, b[src.data + i]);
      return;
    }
    const end = src.bits * src.granularity;
    for (let off = 0; off < end;) {
      const run = src.runEnd(off, end);
      if (run.dirty) this.setRange(off, run.end - off);
      off = run.end;
    }
  }

  /** Copy of the bits (for the roll-back of failed operations). */
  snapshot(): Int32Array {
    return this.i32.slice(this.data, this.data + this.words);
  }

  restore(bits: Int32Array): void {
    this.i32.set(bits, this.data);
  }
}
