// The callback table each block driver fills in (QEMU's BlockDriver).
import type { BlockNode } from './node.js';

/** Flags of a write request. */
export interface WriteFlags {
  /** Force Unit Access: the data is durable when the request completes. */
  fua?: boolean;
}

/** Flags of a write-zeroes request (BDRV_REQ_*). */
export interface ZeroFlags {
  /** The driver may deallocate (punch a hole) instead of writing zeroes. */
  mayUnmap?: boolean;
  /** Fail with ENOTSUP rather than falling back to writing a zero buffer. */
  noFallback?: boolean;
  fua?: boolean;
}

/** Result of a block status query (bdrv_block_status). */
export interface BlockStatus {
  /** Bytes from the queried offset that share this status (> 0 unless at EOF). */
  pnum: number;
  /** BDRV_BLOCK_DATA: reads return data from this layer or below. */
  data: boolean;
  /** BDRV_BLOCK_ZERO: reads return zeroes. */
  zero: boolean;
  /** BDRV_BLOCK_ALLOCATED: this layer (not a backing file) decides the content. */
  allocated: boolean;
  /** Allocation depth for NBD's qemu:allocation-depth (1 = this node, 0 = unallocated). */
  depth?: number;
  /** Host offset in the file child, where meaningful (qemu-img map). */
  offset?: number;
}

export type PreallocMode = 'off' | 'metadata' | 'falloc' | 'full';

/** Image information for query-named-block-nodes' `image` (ImageInfo), driver part. */
export interface DriverImageInfo {
  'cluster-size'?: number;
  'dirty-flag'?: boolean;
  /** The image's data is encrypted (luks): BlockDeviceInfo and ImageInfo say so. */
  encrypted?: boolean;
  'backing-filename'?: string;
  'full-backing-filename'?: string;
  'backing-filename-format'?: string;
  'format-specific'?: { type: string; data: Record<string, unknown> };
  /** Internal snapshots (SnapshotInfo), present only when the image has any. */
  snapshots?: Array<Record<string, unknown>>;
}

/**
 * One block driver. Drivers are stateless tables; per-node state is the value open() returns.
 *
 * Contexts: the main thread opens every node (open()). A node served by an iothread gets a
 * replica in that thread: describe() turns the main state into a structured-cloneable value,
 * openReplica() builds a state from it there. fds are process-wide, so a replica uses the fd the
 * main state opened and never closes it.
 *
 * Every request method is called with a range the generic layer (BlockNode) has already checked
 * against getLength(): offset >= 0, offset + length <= length, unless the method says otherwise.
 */
export interface BlockDriver<S = any> {
  /** The schema's BlockdevDriver value, e.g. 'null-co'. */
  readonly name: string;
  /** Protocol drivers (file, null-co) have no 'file' child; format drivers (raw, qcow2) do. */
  readonly isProtocol: boolean;
  /** The 'file' child holds this format's metadata: nobody else may write or resize it. */
  readonly metadataChild?: boolean;
  /** Non-protocol drivers: the option naming the child opened as 'file' (default 'file'; blkdebug: 'image'). */
  readonly childOption?: string;
  /**
   * QEMU's is_filter: the node passes its 'file' child's data through (blkdebug, throttle,
   * copy-on-read), so queries follow that child as they follow a backing node.
   */
  readonly isFilter?: boolean;
  /** Format drivers: the driver probing a file child should use ('raw' never probes). */
  probe?(header: Buffer, filename: string): number;

  /**
   * Main thread. `options` are validated against the schema (defaults not filled in);
   * `node.children` already holds the opened children ('file', 'backing').
   * Throw QmpError to refuse.
   */
  open(node: BlockNode, options: Record<string, any>): Promise<S>;
  /** Main thread: release what open() acquired. */
  close(state: S): Promise<void>;

  /** A structured-cloneable description for openReplica() in another context. */
  describe?(state: S): unknown;
  /** In an iothread: a state that serves requests like the main one. Absent: main thread only. */
  openReplica?(node: BlockNode, description: unknown): S;
  /** In an iothread: release a replica (never closes shared fds). */
  closeReplica?(state: S): void;

  /** Current virtual size in bytes. */
  getLength(state: S): number;
  /**
   * Bytes the node occupies on its storage (st_blocks * 512 for files); undefined if unknown.
   * NaN: the storage cannot tell (QEMU's -ENOTSUP, e.g. nbd): ImageInfo then has no actual-size.
   */
  getAllocatedFileSize?(state: S): Promise<number | undefined>;
  /** Minimal request alignment in bytes (st_blksize in FUSE getattr): 1 unless O_DIRECT. */
  requestAlignment?(state: S): number;
  /** Optimal transfer size in bytes, or 0 if none. */
  optimalTransfer?(state: S): number;

  /** Read exactly buf.length bytes at offset into buf. */
  read(state: S, offset: number, buf: Buffer): Promise<void>;
  /**
   * Optional fast path: complete the read before returning when that needs no wait (null nodes,
   * data in the page cache) and return true; return false, having changed nothing the caller
   * relies on, to have the caller use read(). Throws BlockIoError to fail the request. It lets an
   * export answer without making a promise, which is a measurable part of a 4k request's cost.
   */
  readNow?(state: S, offset: number, buf: Buffer): boolean;
  /**
   * Optional fast path as readNow: write buf before returning and return true, or return false
   * without having written anything, and the caller uses write().
   */
  writeNow?(state: S, offset: number, buf: Buffer, flags: WriteFlags): boolean;
  /** Write buf at offset. Absent: the driver is read-only. */
  write?(state: S, offset: number, buf: Buffer, flags: WriteFlags): Promise<void>;
  /** Zero [offset, offset+bytes). Absent: the generic layer writes a zero buffer (unless noFallback). */
  writeZeroes?(state: S, offset: number, bytes: number, flags: ZeroFlags): Promise<void>;
  /** Discard (unmap) a range; advisory. Absent: discard is a no-op. */
  discard?(state: S, offset: number, bytes: number): Promise<void>;
  /** Make completed writes durable. Absent: nothing to do. */
  flush?(state: S): Promise<void>;
  /** Change the size. `exact` false allows rounding up; newly exposed bytes read as zero. */
  truncate?(state: S, size: number, exact: boolean, prealloc: PreallocMode): Promise<void>;
  /** Allocation status at offset (may be called at offset == length: return pnum 0). */
  blockStatus?(state: S, offset: number, bytes: number): Promise<BlockStatus>;
  /**
   * The filename QEMU shows for this node (its bdrv_refresh_filename), when the generic
   * "driver://" / json: rule does not apply (nbd's nbd:// URIs). `toJson` formats a json: body.
   */
  filename?(node: BlockNode, toJson: (value: unknown) => string): string;
  /** Driver part of ImageInfo. */
  imageInfo?(state: S): DriverImageInfo;
  /**
   * A debug event (QEMU's BlkdebugEvent name, e.g. 'read_aio') raised on this node by its parent
   * (bdrv_debug_event). Synchronous and cheap: it runs on the I/O path. Only blkdebug listens.
   */
  debugEvent?(state: S, event: string): void;
  /** Re-read the length from storage after another context changed it (e.g. grew the file). */
  refreshLength?(state: S): void;
}
