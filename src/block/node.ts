// A block node at run time: one driver state plus the generic checks QEMU's block layer does.
// The same class serves the main thread (the graph's nodes) and replicas in iothreads.
import { constants as osConstants } from 'node:os';
import type { BlockDriver, BlockStatus, PreallocMode, WriteFlags, ZeroFlags } from './driver.js';
import { attachTracking, type NodeTracking, type TrackingDescription } from './dirty-bitmap.js';

const { EACCES, EIO, EPERM, EINVAL, ENOTSUP } = osConstants.errno;

/** An I/O error with a positive errno, as FUSE and NBD need it. Never thrown for QMP misuse. */
export class BlockIoError extends Error {
  constructor(readonly errno: number, message?: string) {
    super(message ?? `I/O error (errno ${errno})`);
    this.name = 'BlockIoError';
  }
}

/** Compared against in detect-zeroes checks (memcmp in native code beats a JS loop). */
const ZERO_CHUNK = Buffer.alloc(64 * 1024);

/** QEMU's qemu_iovec_is_zero for one buffer. */
function isAllZero(buf: Buffer): boolean {
  for (let at = 0; at < buf.length; at += ZERO_CHUNK.length) {
    const n = Math.min(ZERO_CHUNK.length, buf.length - at);
    if (ZERO_CHUNK.compare(buf, at, at + n, 0, n) !== 0) return false;
  }
  return true;
}

/** QEMU's BDRV_REQUEST_MAX_BYTES: the largest single request (INT_MAX rounded down to 512). */
export const BDRV_REQUEST_MAX_BYTES = 0x7ffffe00;

export interface BlockNodeInit {
  nodeName: string;
  driver: BlockDriver;
  readOnly: boolean;
  /** Validated blockdev options this node was opened with. */
  options: Record<string, any>;
  children?: Map<string, BlockNode>;
  isReplica?: boolean;
  /** A replica: the main node's dirty-bitmap/write-threshold tracking (shared memory). */
  tracking?: TrackingDescription;
}

export class BlockNode {
  readonly nodeName: string;
  readonly driver: BlockDriver;
  readonly options: Record<string, any>;
  readonly children: Map<string, BlockNode>;
  readonly isReplica: boolean;
  readOnly: boolean;
  /** The driver's per-node state; set once open()/openReplica() returned. */
  state: any = undefined;
  /**
   * Dirty bitmaps and write threshold (src/block/dirty-bitmap.ts), shared by every context;
   * null until the node first needs it. Writes check it once: null or idle = nothing to do.
   */
  tracking: NodeTracking | null = null;
  /**
   * Main thread only: awaited before a tracked write, zero write or discard reaches the driver
   * (a backup job's copy-before-write). Whoever installs one also raises the node's tracking
   * active count, so writes take the tracked path. Throwing fails the write.
   */
  writeInterceptors: Array<(offset: number, bytes: number) => Promise<void>> | null = null;

  constructor(init: BlockNodeInit) {
    this.nodeName = init.nodeName;
    this.driver = init.driver;
    this.readOnly = init.readOnly;
    this.options = init.options;
    this.children = init.children ?? new Map();
    this.isReplica = init.isReplica ?? false;
    if (init.tracking) this.tracking = attachTracking(init.nodeName, init.tracking);
  }

  /** Writes since this node's last successful flush (QEMU's write_gen/flushed_gen), per context. */
  private writeGen = 0;
  private flushedGen = 0;

  /** The 'file' child of a format node. */
  get file(): BlockNode | undefined {
    return this.children.get('file');
  }

  get backing(): BlockNode | undefined {
    return this.children.get('backing');
  }

  /** Raise a debug event on this node (BLKDBG_EVENT on a child): only blkdebug reacts. */
  debugEvent(event: string): void {
    this.driver.debugEvent?.(this.state, event);
  }

  /** The length in bytes, rounded up to whole 512-byte sectors as QEMU's block layer keeps it. */
  getLength(): number {
    const length = this.driver.getLength(this.state);
    return length % 512 === 0 ? length : length + 512 - (length % 512);
  }

  requestAlignment(): number {
    return this.driver.requestAlignment?.(this.state) ?? 1;
  }

  optimalTransfer(): number {
    return this.driver.optimalTransfer?.(this.state) ?? 0;
  }

  async getAllocatedFileSize(): Promise<number | undefined> {
    return this.driver.getAllocatedFileSize?.(this.state);
  }

  /** QEMU's bdrv_check_request: sane numbers, not the node's length. */
  private checkRequest(offset: number, bytes: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(bytes) || offset < 0 || bytes < 0) {
      throw new BlockIoError(EIO, 'request out of range');
    }
    if (bytes > BDRV_REQUEST_MAX_BYTES) throw new BlockIoError(EIO, 'request too large');
  }

  /** checkRequest plus the node's length (discard). */
  private checkRange(offset: number, bytes: number): void {
    this.checkRequest(offset, bytes);
    if (offset + bytes > this.getLength()) throw new BlockIoError(EIO, 'request beyond end of node');
  }

  /** discard=unmap was given: discards and MAY_UNMAP zero writes may deallocate. */
  get unmapAllowed(): boolean {
    return this.options.discard === 'unmap';
  }

  /**
   * detect-zeroes on or unmap, for a driver that can write zeroes (QEMU's bdrv_aligned_pwritev
   * turns an all-zero write into a zero write only then). Read from the options each time:
   * blockdev-reopen may change it.
   */
  private get detectsZeroes(): boolean {
    const dz = this.options['detect-zeroes'];
    return dz !== undefined && dz !== 'off' && this.driver.writeZeroes !== undefined;
  }

  private checkWritable(): void {
    if (this.readOnly) throw new BlockIoError(EPERM, `node '${this.nodeName}' is read-only`);
  }

  /**
   * Read buf.length bytes at offset. As in QEMU's block layer (not its BlockBackend), the part of
   * a request beyond the end of the node reads as zeroes: format drivers rely on it for their
   * file child. Exports clamp to the length themselves.
   */
  async read(offset: number, buf: Buffer): Promise<void> {
    this.checkRequest(offset, buf.length);
    if (buf.length === 0) return;
    const length = this.getLength();
    if (offset + buf.length <= length) return this.driver.read(this.state, offset, buf);
    const inside = Math.max(0, length - offset);
    buf.fill(0, inside);
    if (inside > 0) await this.driver.read(this.state, offset, buf.subarray(0, inside));
  }

  /**
   * read()'s synchronous fast path: true when the driver completed the read before returning;
   * false means nothing happened and the caller must use read(). Only for requests inside the node.
   */
  tryRead(offset: number, buf: Buffer): boolean {
    const readNow = this.driver.readNow;
    if (readNow === undefined || offset + buf.length > this.getLength()) return false;
    this.checkRequest(offset, buf.length);
    return readNow(this.state, offset, buf);
  }

  /**
   * write()'s synchronous fast path, taken only while no dirty bitmap, write threshold or job
   * watches this node's writes (their hooks may wait). false: nothing was written, use write().
   */
  tryWrite(offset: number, buf: Buffer, flags: WriteFlags): boolean {
    const writeNow = this.driver.writeNow;
    if (writeNow === undefined || this.readOnly || this.detectsZeroes) return false;
    const t = this.tracking;
    if (t !== null && !t.idle()) return false;
    this.checkRequest(offset, buf.length);
    this.writeGen++; // before, as write() does: a flush racing with it must not be skipped
    return writeNow(this.state, offset, buf, flags);
  }

  /** Write buf at offset. Writes beyond the end grow protocol nodes (a format driver allocating). */
  async write(offset: number, buf: Buffer, flags: WriteFlags = {}): Promise<void> {
    this.checkWritable();
    this.checkRequest(offset, buf.length);
    if (!this.driver.write) throw new BlockIoError(EPERM, `driver '${this.driver.name}' is read-only`);
    if (buf.length === 0) return;
    if (this.detectsZeroes && isAllZero(buf)) {
      // detect-zeroes=unmap also lets the zero write deallocate (writeZeroes still requires
      // discard=unmap for that, which opening a node with detect-zeroes=unmap enforces).
      return this.writeZeroes(offset, buf.length, { fua: flags.fua, mayUnmap: this.options['detect-zeroes'] === 'unmap' });
    }
    this.writeGen++;
    const t = this.tracking;
    if (t === null || t.idle()) return this.driver.write(this.state, offset, buf, flags);
    t.beforeWrite(offset, buf.length);
    if (this.writeInterceptors !== null) for (const f of this.writeInterceptors) await f(offset, buf.length);
    try {
      return await this.driver.write(this.state, offset, buf, flags);
    } finally {
      // QEMU's bdrv_co_write_req_finish marks the range whether or not the write succeeded.
      t.afterWrite(this, offset, buf.length);
    }
  }

  async writeZeroes(offset: number, bytes: number, flags: ZeroFlags = {}): Promise<void> {
    this.checkWritable();
    this.checkRequest(offset, bytes);
    // QEMU drops MAY_UNMAP unless the node was opened with discard=unmap.
    if (flags.mayUnmap && !this.unmapAllowed) flags = { ...flags, mayUnmap: false };
    if (bytes === 0) return;
    this.writeGen++;
    const t = this.tracking;
    if (t === null || t.idle()) return this.doWriteZeroes(offset, bytes, flags);
    t.beforeWrite(offset, bytes);
    if (this.writeInterceptors !== null) for (const f of this.writeInterceptors) await f(offset, bytes);
    try {
      return await this.doWriteZeroes(offset, bytes, flags);
    } finally {
      t.afterWrite(this, offset, bytes);
    }
  }

  private async doWriteZeroes(offset: number, bytes: number, flags: ZeroFlags): Promise<void> {
    if (this.driver.writeZeroes) return this.driver.writeZeroes(this.state, offset, bytes, flags);
    if (flags.noFallback) throw new BlockIoError(ENOTSUP, 'write zeroes not supported');
    if (!this.driver.write) throw new BlockIoError(EPERM, `driver '${this.driver.name}' is read-only`);
    // Bounded bounce buffer: the fallback must not allocate the whole range at once.
    const chunk = Buffer.alloc(Math.min(bytes, 1 << 20));
    for (let done = 0; done < bytes; done += chunk.length) {
      const n = Math.min(chunk.length, bytes - done);
      await this.driver.write(this.state, offset + done, chunk.subarray(0, n), { fua: flags.fua });
    }
  }

  /** Advisory: ignored unless the node was opened with discard=unmap (QEMU's BDRV_O_UNMAP). */
  async discard(offset: number, bytes: number): Promise<void> {
    this.checkWritable();
    this.checkRange(offset, bytes);
    if (bytes === 0 || !this.unmapAllowed) return;
    const t = this.tracking;
    if (t !== null && !t.idle()) {
      // QEMU tracks a discard as a write even when the driver ignores it.
      t.beforeWrite(offset, bytes);
      if (this.writeInterceptors !== null) for (const f of this.writeInterceptors) await f(offset, bytes);
      try {
        if (this.driver.discard) {
          this.writeGen++;
          await this.driver.discard(this.state, offset, bytes);
        }
      } finally {
        t.markDirty(offset, bytes);
      }
      return;
    }
    if (!this.driver.discard) return;
    this.writeGen++;
    return this.driver.discard(this.state, offset, bytes);
  }

  async flush(): Promise<void> {
    // bdrv_co_flush raises these on the primary child (blkdebug's triggers); flush_to_disk only
    // when something was written since the last successful flush.
    const child = this.children.get('file');
    const gen = this.writeGen;
    if (child) {
      child.debugEvent('flush_to_os');
      if (gen !== this.flushedGen) child.debugEvent('flush_to_disk');
    }
    if (this.driver.flush) await this.driver.flush(this.state);
    this.flushedGen = gen;
  }

  async truncate(size: number, exact = true, prealloc: PreallocMode = 'off'): Promise<void> {
    // QEMU's bdrv_co_truncate words it so (block_resize shows it for a read-only file under raw).
    if (this.readOnly) throw new BlockIoError(EACCES, 'Image is read-only');
    if (!Number.isSafeInteger(size) || size < 0) throw new BlockIoError(EINVAL, 'invalid size');
    if (!this.driver.truncate) throw new BlockIoError(ENOTSUP, 'Image format driver does not support resize');
    await this.driver.truncate(this.state, size, exact, prealloc);
    this.tracking?.resized(this.getLength());
  }

  /**
   * bdrv_block_status for [offset, offset+bytes). At or beyond EOF: pnum 0.
   * Drivers without blockStatus report everything as allocated data.
   */
  async blockStatus(offset: number, bytes: number): Promise<BlockStatus> {
    const length = this.getLength();
    if (offset >= length) return { pnum: 0, data: false, zero: false, allocated: false };
    const n = Math.min(bytes, length - offset);
    if (!this.driver.blockStatus) return { pnum: n, data: true, zero: false, allocated: true, depth: 1 };
    const st = await this.driver.blockStatus(this.state, offset, n);
    if (st.pnum > n) st.pnum = n;
    return st;
  }
}
