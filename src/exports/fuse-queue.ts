// One FUSE queue: reads requests from one /dev/fuse fd, serves them through a BlockNode, replies on that fd.
//
// It runs entirely in the thread that calls startFuseQueue() (the main loop or an iothread): the fd is
// polled by that thread's loop, requests are parsed and dispatched in JS there, and the block I/O they
// cause is issued there. Semantics follow QEMU's multi-threaded FUSE export (v3/v4 series); the few
// places where we deliberately differ say so.
import { constants as osConstants } from 'node:os';
import { BDRV_REQUEST_MAX_BYTES, BlockIoError, type BlockNode } from '../block/node.js';
import type { WriteFlags } from '../block/driver.js';
import type { LocalQueue, QueueStats } from '../iothread/context.js';
import { native, type FuseChannel } from '../native/binding.js';
import { strerror } from '../util/errno.js';
import * as abi from './fuse-abi.js';

const { EACCES, EINVAL, EIO, ENOENT, ENOSYS, ENOTSUP, ENXIO, EOPNOTSUPP, EPERM, EROFS, ENODEV } = osConstants.errno;

/**
 * Largest WRITE we accept (INIT max_write). 128 KiB is the kernel's default request size (32 pages),
 * twice QEMU's 64 KiB. Every request slot must hold max_write + 80 bytes (or the kernel's read()
 * fails with EINVAL), so slots x max_write is this queue's buffer memory: 64 slots x 132 KiB ≈ 8.5 MiB.
 * Larger requests would only save kernel-side splitting, which costs little next to a round trip.
 */
export const FUSE_MAX_WRITE_BYTES = 128 * 1024;
/** INIT max_pages: reads and writes are split by the kernel into at most this many pages. */
export const FUSE_MAX_PAGES = FUSE_MAX_WRITE_BYTES / 4096;
/** QEMU's FUSE_MAX_READ_BYTES: the mount's max_read; a READ asking for more gets EINVAL. */
export const FUSE_MAX_READ_BYTES = 1024 * 1024;
/** Default number of request slots per queue (requests in flight before the queue stops reading). */
export const FUSE_DEFAULT_QUEUE_SLOTS = 64;

// Slot layout: one aligned allocation per slot. The request is read at ALIGN - 80 so a WRITE payload
// starts at ALIGN; a READ reply's header sits at ALIGN - 16 so its data starts at ALIGN. Both are
// 4096-aligned for O_DIRECT backing files. A request is fully parsed before its reply is written.
const ALIGN = 4096;
const DATA_CAPACITY = FUSE_MAX_WRITE_BYTES;
// Headroom for extension headers the kernel may append (security context, supplementary groups).
const SLACK = 4096;
const SLOT_BYTES = ALIGN + DATA_CAPACITY + SLACK;
const REQ_START = ALIGN - abi.WRITE_DATA_OFFSET;
const REPLY_START = ALIGN - abi.OUT_HEADER_SIZE;
/** Largest READ we can answer from one slot (the kernel never asks for more than max_pages). */
const READ_CAPACITY = DATA_CAPACITY;
/** How many requests one wake-up reads at most before yielding to the loop. */
const READ_BATCH = 16;
/** dispatch() result for requests that get no reply (FORGET, BATCH_FORGET). */
const NO_REPLY = 0x7fffffff;

// ---- Export-wide state shared by all queues of one export (any thread) ----
/** Int32 indices into the shared state. */
export const FUSE_STATE_MODE = 0;
export const FUSE_STATE_UID = 1;
export const FUSE_STATE_GID = 2;
/** 1 once a protocol violation halted the export: no queue reads requests any more. */
export const FUSE_STATE_HALTED = 3;
/**
 * INIT outcome, for FUSE-over-io_uring setup (Atomics.notify'd): 0 not answered yet, 1 answered
 * without FUSE_OVER_IO_URING, 2 answered with it, -1 refused (version mismatch).
 */
export const FUSE_STATE_INIT = 4;
const FUSE_STATE_INTS = 16; // one 64-byte cache line

/** The SharedArrayBuffer for FuseQueueParams.shared: st_mode (S_IFREG|perm), uid, gid, halted. */
export function createFuseSharedState(mode: number, uid: number, gid: number): SharedArrayBuffer {
  const sab = new SharedArrayBuffer(FUSE_STATE_INTS * 4);
  const s = new Int32Array(sab);
  s[FUSE_STATE_MODE] = mode;
  s[FUSE_STATE_UID] = uid | 0;
  s[FUSE_STATE_GID] = gid | 0;
  return sab;
}

/** Start parameters of one queue; structured-cloneable (sent to iothreads as is). */
export interface FuseQueueParams {
  /** The /dev/fuse fd this queue reads (queue 0: the mounted fd, others: FUSE_DEV_IOC_CLONE). */
  fd: number;
  /** stop() closes fd. false when the export closes its fds itself after stopping every queue. */
  ownsFd: boolean;
  /** Export id, for log messages. */
  exportId: string;
  /** Clients may write (export option 'writable'). */
  writable: boolean;
  /** Writes past EOF grow the node (option 'growable'). */
  growable: boolean;
  /** Mounted with allow_other: chmod may set group/other bits, chown is allowed. */
  allowOther: boolean;
  /** Every write is FUA (option 'writethrough'). */
  writethrough: boolean;
  /** createFuseSharedState(): mode, uid, gid and the halted flag, shared by the export's queues. */
  shared: SharedArrayBuffer;
  /** Request slots (max requests in flight on this queue); default FUSE_DEFAULT_QUEUE_SLOTS. */
  slots?: number;
  /** Export option 'io-uring': INIT answers with FUSE_OVER_IO_URING when the kernel offers it. */
  ioUring?: boolean;
  /**
   * Present: this queue serves FUSE-over-io_uring ring queues (src/exports/fuse-uring-queue.ts)
   * instead of reading fd; fd is then only the connection the ring commands name.
   */
  uring?: { qids: number[]; entriesPerQueue: number };
}

/**
 * One request's buffers as the shared dispatch sees them, whatever the transport. Views only; the
 * memory is allocated once per slot. WRITE data and READ reply data may share memory: a request is
 * fully parsed before its reply is written.
 */
export interface FuseSlot {
  readonly index: number;
  /** fuse_in_header at 0. */
  readonly in: Buffer;
  /** The opcode's own header (fuse_read_in, …) at 0. */
  readonly op: Buffer;
  /** WRITE payload at 0. */
  readonly data: Buffer;
  /** fuse_out_header at 0 (written by finish()). */
  readonly outHeader: Buffer;
  /** Reply payload (out args, READ data) at 0. */
  readonly out: Buffer;
  uniqueLo: number;
  uniqueHi: number;
  /** outView(): the last out.subarray(0, outViewLength), reused while the size repeats. */
  outView: Buffer | undefined;
  outViewLength: number;
  /** dataView(): the same for data. */
  dataView: Buffer | undefined;
  dataViewLength: number;
}

/** A new slot's view caches (both transports build slots). */
export const NO_SLOT_VIEWS = { outView: undefined, outViewLength: -1, dataView: undefined, dataViewLength: -1 } as const;

/** slot.out[0, n) without a new Buffer per request when the size repeats (4k random I/O). */
function outView(slot: FuseSlot, n: number): Buffer {
  if (slot.outViewLength !== n) {
    slot.outView = slot.out.subarray(0, n);
    slot.outViewLength = n;
  }
  return slot.outView!;
}

/** slot.data[0, n), cached like outView(). */
function dataView(slot: FuseSlot, n: number): Buffer {
  if (slot.dataViewLength !== n) {
    slot.dataView = slot.data.subarray(0, n);
    slot.dataViewLength = n;
  }
  return slot.dataView!;
}

const WRITE_PLAIN: WriteFlags = {};
const WRITE_FUA: WriteFlags = { fua: true };
const ZERO_UNMAP = { mayUnmap: true, noFallback: true };
const ZERO_PLAIN = {};

function u64(buf: Buffer, off: number): number {
  // Exact up to 2^53; larger values are beyond any node length anyway.
  return buf.readUInt32LE(off) + buf.readUInt32LE(off + 4) * 0x100000000;
}

function putU64(buf: Buffer, off: number, v: number): void {
  buf.writeUInt32LE(v % 0x100000000, off);
  buf.writeUInt32LE(Math.floor(v / 0x100000000), off + 4);
}

let logModule: Promise<typeof import('../log.js')> | undefined;

/**
 * Queues run in iothreads too: pino is loaded there only when logging is on (QSD_TS_LOG), so an
 * iothread does not pay its memory for a log that is silent by default.
 */
function logIoError(record: Record<string, unknown>): void {
  const level = process.env.QSD_TS_LOG;
  if (!level || level === 'silent') return;
  logModule ??= import('../log.js');
  void logModule.then(({ log }) => log.warn(record, 'I/O error on an export request'));
}

/** A positive errno for a failed block request: BlockIoError's (and native errors') errno, else EIO. */
function errnoOf(err: unknown): number {
  const e = (err as { errno?: unknown } | null)?.errno;
  if ((err instanceof BlockIoError || err instanceof Error) && typeof e === 'number' && Number.isInteger(e) && e > 0) {
    return e;
  }
  return EIO;
}

/**
 * What every FUSE queue shares, whatever carries its requests (/dev/fuse reads or io_uring ring
 * entries): request dispatch and the handlers (the one place FUSE semantics live), the reply
 * header, in-flight accounting and drain/stop. A transport subclass delivers requests to serve()
 * and sends what finish() prepared through transmit().
 */
export abstract class FuseServer implements LocalQueue {
  protected readonly state: Int32Array;
  protected readonly writeFlags: WriteFlags;
  protected inFlight = 0;
  protected served = 0;
  protected drained = false;
  protected stopped = false;
  /** Requests can no longer be taken (fd unusable, export halted, ring failed). */
  protected dead = false;
  /** Whether every request needs an answer (ring entries are re-armed only by committing one). */
  protected replyAlways = false;
  private drainWaiters: Array<() => void> = [];
  private growChain: Promise<void> = Promise.resolve();
  private stopPromise: Promise<void> | undefined;

  constructor(
    protected readonly node: BlockNode,
    protected readonly params: FuseQueueParams,
  ) {
    this.state = new Int32Array(params.shared);
    this.writeFlags = params.writethrough ? WRITE_FUA : WRITE_PLAIN;
  }

  // ---- transport hooks ----

  /** Send the reply finish() put in slot.outHeader (and slot.out); len = header + payload bytes. */
  protected abstract transmit(slot: FuseSlot, len: number): void;
  /** The slot is done with (answered or dropped): make it available for the next request. */
  protected abstract recycle(slot: FuseSlot): void;
  /** Drain state changed: start or stop taking requests. */
  protected abstract updateIntake(): void;
  /** Release the transport after the queue drained (close fds, rings). */
  protected abstract shutdown(): void | Promise<void>;

  // ---- LocalQueue ----

  drainBegin(): Promise<void> {
    this.drained = true;
    this.updateIntake();
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.drainWaiters.push(resolve));
  }

  drainEnd(): void {
    if (this.stopped) return;
    this.drained = false;
    this.updateIntake();
  }

  stop(): Promise<void> {
    this.stopPromise ??= this.drainBegin().then(() => {
      this.stopped = true;
      return this.shutdown();
    });
    return this.stopPromise;
  }

  stats(): QueueStats {
    return { served: this.served, inFlight: this.inFlight };
  }

  // ---- serving ----

  /** A protocol violation: the kernel and we disagree, so no later request can be trusted. */
  protected halt(message: string): void {
    this.dead = true;
    if (Atomics.compareExchange(this.state, FUSE_STATE_HALTED, 0, 1) === 0) {
      console.error(`Export '${this.params.exportId}': ${message}; cannot trust subsequent requests, halting the export`);
    }
  }

  /**
   * Serve one request whose header the transport has checked: slot.in holds fuse_in_header and
   * len is its total length. The slot counts as in flight until finish() recycles it.
   */
  protected serve(slot: FuseSlot, len: number): void {
    const req = slot.in;
    slot.uniqueLo = req.readUInt32LE(abi.IN_UNIQUE);
    slot.uniqueHi = req.readUInt32LE(abi.IN_UNIQUE + 4);
    let r: number | Promise<number>;
    try {
      r = this.dispatch(slot, req.readUInt32LE(abi.IN_OPCODE), len);
    } catch (err) {
      r = this.ioError(err);
    }
    if (typeof r === 'number') this.finish(slot, r);
    else this.finishAsync(slot, r);
  }

  private async finishAsync(slot: FuseSlot, p: Promise<number>): Promise<void> {
    let r: number;
    try {
      r = await p;
    } catch (err) {
      r = this.ioError(err);
    }
    this.finish(slot, r);
  }

  private lastIoErrorLog = 0;

  /**
   * A request failed in the block layer: the client gets the errno, and a BLOCK_IO_ERROR-style
   * record goes to the debug log (QEMU's daemon emits no event for exports), at most once a second
   * per queue, as QEMU rate-limits its I/O error events.
   */
  private ioError(err: unknown): number {
    const errno = errnoOf(err);
    const now = Date.now();
    if (now - this.lastIoErrorLog >= 1000) {
      this.lastIoErrorLog = now;
      logIoError({ event: 'BLOCK_IO_ERROR', export: this.params.exportId, node: this.node.nodeName, errno, reason: strerror(errno) });
    }
    return -errno;
  }

  /** The one place that builds replies: r = payload bytes already in slot.out, or -errno. */
  protected finish(slot: FuseSlot, r: number): void {
    if (r === NO_REPLY && this.replyAlways) r = -ENOSYS;
    if (r !== NO_REPLY && !this.stopped) {
      const hdr = slot.outHeader;
      let error = 0;
      let len = abi.OUT_HEADER_SIZE;
      if (r < 0) error = r > -512 ? r : -EIO; // the kernel only accepts errors in (-512, 0]
      else len += r;
      hdr.writeUInt32LE(len, abi.OUT_LEN);
      hdr.writeInt32LE(error, abi.OUT_ERROR);
      hdr.writeUInt32LE(slot.uniqueLo, abi.OUT_UNIQUE);
      hdr.writeUInt32LE(slot.uniqueHi, abi.OUT_UNIQUE + 4);
      this.transmit(slot, len);
    }
    this.served++;
    this.release(slot);
  }

  /** Drop a request without answering (a malformed one, after halt()). */
  protected release(slot: FuseSlot): void {
    this.inFlight--;
    this.recycle(slot);
    if (this.inFlight === 0 && this.drainWaiters.length > 0) {
      const waiters = this.drainWaiters;
      this.drainWaiters = [];
      for (const w of waiters) w();
    }
  }

  // ---- dispatch: each handler returns the reply payload length (payload in slot.out) or -errno ----

  private dispatch(slot: FuseSlot, opcode: number, len: number): number | Promise<number> {
    let opHeader: number;
    switch (opcode) {
      case abi.FUSE_INIT: opHeader = abi.INIT_IN_COMPAT_SIZE; break;
      case abi.FUSE_OPEN: opHeader = abi.OPEN_IN_SIZE; break;
      case abi.FUSE_SETATTR: opHeader = abi.SETATTR_IN_SIZE; break;
      case abi.FUSE_READ: opHeader = abi.READ_IN_SIZE; break;
      case abi.FUSE_WRITE: opHeader = abi.WRITE_IN_SIZE; break;
      case abi.FUSE_FALLOCATE: opHeader = abi.FALLOCATE_IN_SIZE; break;
      case abi.FUSE_LSEEK: opHeader = abi.LSEEK_IN_SIZE; break;
      case abi.FUSE_DESTROY:
      case abi.FUSE_STATFS:
      case abi.FUSE_RELEASE:
      case abi.FUSE_LOOKUP:
      case abi.FUSE_FORGET:
      case abi.FUSE_BATCH_FORGET:
      case abi.FUSE_GETATTR:
      case abi.FUSE_FSYNC:
      case abi.FUSE_FLUSH:
        opHeader = 0;
        break;
      default:
        return -ENOSYS;
    }
    if (len < abi.IN_HEADER_SIZE + opHeader) {
      console.error(`FUSE request truncated, expected ${abi.IN_HEADER_SIZE + opHeader} bytes, read ${len} bytes`);
      return -EINVAL;
    }
    const req = slot.op;
    switch (opcode) {
      case abi.FUSE_INIT:
        return this.fuseInit(slot, len);
      case abi.FUSE_OPEN:
        return this.fuseOpen(slot);
      case abi.FUSE_RELEASE:
      case abi.FUSE_DESTROY:
        return 0;
      case abi.FUSE_LOOKUP:
        return -ENOENT; // There is no node but the root node.
      case abi.FUSE_FORGET:
      case abi.FUSE_BATCH_FORGET:
        return NO_REPLY;
      case abi.FUSE_GETATTR:
        return this.fuseGetattr(slot);
      case abi.FUSE_SETATTR:
        return this.fuseSetattr(
          slot,
          req.readUInt32LE(abi.SETATTR_VALID),
          req.readUInt32LE(abi.SETATTR_MODE),
          req.readUInt32LE(abi.SETATTR_UID),
          req.readUInt32LE(abi.SETATTR_GID),
          u64(req, abi.SETATTR_SIZE),
        );
      case abi.FUSE_READ:
        return this.fuseRead(slot, u64(req, abi.RW_IN_OFFSET), req.readUInt32LE(abi.RW_IN_SIZE));
      case abi.FUSE_WRITE: {
        const size = req.readUInt32LE(abi.RW_IN_SIZE);
        if (len < abi.WRITE_DATA_OFFSET + size) {
          console.error(`FUSE request truncated, expected ${abi.WRITE_DATA_OFFSET + size} bytes, read ${len} bytes`);
          return -EINVAL;
        }
        return this.fuseWrite(slot, req.readUInt32LE(abi.RW_IN_OFFSET), req.readUInt32LE(abi.RW_IN_OFFSET + 4), size);
      }
      case abi.FUSE_FALLOCATE:
        return this.fuseFallocate(
          u64(req, abi.FALLOCATE_OFFSET),
          u64(req, abi.FALLOCATE_LENGTH),
          req.readUInt32LE(abi.FALLOCATE_MODE),
        );
      case abi.FUSE_FSYNC:
      case abi.FUSE_FLUSH:
        return this.fuseFsync();
      case abi.FUSE_LSEEK:
        return this.fuseLseek(slot, u64(req, abi.LSEEK_IN_OFFSET), req.readUInt32LE(abi.LSEEK_IN_WHENCE));
      case abi.FUSE_STATFS:
        return this.fuseStatfs(slot);
      default:
        return -ENOSYS;
    }
  }

  private fuseInit(slot: FuseSlot, len: number): number {
    const req = slot.op;
    const major = req.readUInt32LE(abi.INIT_IN_MAJOR);
    const minor = req.readUInt32LE(abi.INIT_IN_MINOR);
    if (major !== abi.FUSE_KERNEL_VERSION) {
      console.error(`FUSE major version mismatch: We have ${abi.FUSE_KERNEL_VERSION}, but kernel has ${major}`);
      this.initDone(-1);
      return -EINVAL;
    }
    if (minor < abi.FUSE_MIN_MINOR_VERSION) {
      console.error(`FUSE minor version too old: We have ${abi.FUSE_KERNEL_MINOR_VERSION}, but kernel has ${minor}`);
      this.initDone(-1);
      return -EINVAL;
    }
    const offered = req.readUInt32LE(abi.INIT_IN_FLAGS);
    // flags2 exists only in the full fuse_init_in, flagged by FUSE_INIT_EXT.
    const offered2 =
      offered & abi.FUSE_INIT_EXT && len >= abi.IN_HEADER_SIZE + abi.INIT_IN_FLAGS2 + 4
        ? req.readUInt32LE(abi.INIT_IN_FLAGS2)
        : 0;
    // FUSE-over-io_uring (export option 'io-uring'): the kernel then blocks requests until every
    // per-CPU ring queue is registered (src/exports/fuse-uring-queue.ts); the export waits for
    // FUSE_STATE_INIT and refuses itself when the kernel did not offer the flag.
    const uring = this.params.ioUring === true && (offered2 & abi.FUSE2_OVER_IO_URING) !== 0;
    // QEMU's ASYNC_READ|ASYNC_DIO; MAX_PAGES for max_pages below; ATOMIC_O_TRUNC so that open(O_TRUNC)
    // reaches us as an open flag we ignore instead of a SETATTR that would truncate the image. That
    // is what QEMU 7.2 does (observed); QEMU's newer series truncates, e.g. on a plain `dd of=export`.
    const flags =
      offered & (abi.FUSE_ASYNC_READ | abi.FUSE_ASYNC_DIO | abi.FUSE_MAX_PAGES | abi.FUSE_ATOMIC_O_TRUNC);
    const outMinor = Math.min(abi.FUSE_KERNEL_MINOR_VERSION, minor);
    const o = slot.out;
    o.fill(0, 0, abi.INIT_OUT_SIZE);
    o.writeUInt32LE(abi.FUSE_KERNEL_VERSION, abi.INIT_OUT_MAJOR);
    o.writeUInt32LE(outMinor, abi.INIT_OUT_MINOR);
    o.writeUInt32LE(req.readUInt32LE(abi.INIT_IN_MAX_READAHEAD), abi.INIT_OUT_MAX_READAHEAD);
    o.writeUInt32LE(flags >>> 0, abi.INIT_OUT_FLAGS);
    // Effectively unlimited async requests: the kernel caps them (max_user_bgreq) for non-root.
    o.writeUInt16LE(0xffff, abi.INIT_OUT_MAX_BACKGROUND);
    o.writeUInt16LE(Math.floor((0xffff * 3) / 4), abi.INIT_OUT_CONGESTION_THRESHOLD);
    o.writeUInt32LE(FUSE_MAX_WRITE_BYTES, abi.INIT_OUT_MAX_WRITE);
    o.writeUInt32LE(1, abi.INIT_OUT_TIME_GRAN);
    o.writeUInt16LE(FUSE_MAX_PAGES, abi.INIT_OUT_MAX_PAGES);
    // direct_io (fuseOpen) would make the kernel refuse mmap(MAP_SHARED) of the export with ENODEV;
    // DIRECT_IO_ALLOW_MMAP (Linux >= 6.6) lets it map through the page cache again, which QEMU 7.2
    // (no direct_io at all) allows and qemu-io/fio users rely on.
    const flags2 = (offered2 & abi.FUSE2_DIRECT_IO_ALLOW_MMAP) | (uring ? abi.FUSE2_OVER_IO_URING : 0);
    if (flags2 !== 0) {
      o.writeUInt32LE((flags | abi.FUSE_INIT_EXT) >>> 0, abi.INIT_OUT_FLAGS);
      o.writeUInt32LE(flags2 >>> 0, abi.INIT_OUT_FLAGS2);
    }
    // The kernel applies the reply while we write it, before the export hears of the outcome.
    queueMicrotask(() => this.initDone(uring ? 2 : 1));
    return outMinor < 23 ? abi.FUSE_COMPAT_22_INIT_OUT_SIZE : abi.INIT_OUT_SIZE;
  }

  private initDone(outcome: number): void {
    Atomics.store(this.state, FUSE_STATE_INIT, outcome);
    Atomics.notify(this.state, FUSE_STATE_INIT);
  }

  private fuseOpen(slot: FuseSlot): number {
    const o = slot.out;
    o.fill(0, 0, abi.OPEN_OUT_SIZE);
    // direct_io: the export shows the node as it is, no page cache in between (QEMU's choice).
    o.writeUInt32LE(abi.FOPEN_DIRECT_IO | abi.FOPEN_PARALLEL_DIRECT_WRITES, abi.OPEN_OUT_OPEN_FLAGS);
    return abi.OPEN_OUT_SIZE;
  }

  private async fuseGetattr(slot: FuseSlot): Promise<number> {
    const node = this.node;
    const length = node.getLength();
    const allocated = await node.getAllocatedFileSize();
    const blocks = Math.ceil((allocated !== undefined && allocated > 0 ? allocated : length) / 512);
    const now = Date.now();
    const sec = Math.floor(now / 1000);
    const nsec = (now % 1000) * 1000000;
    const o = slot.out;
    const a = abi.ATTR_OUT_ATTR;
    o.fill(0, 0, abi.ATTR_OUT_SIZE);
    putU64(o, abi.ATTR_OUT_ATTR_VALID, 1);
    putU64(o, a + abi.ATTR_INO, abi.FUSE_ROOT_ID);
    putU64(o, a + abi.ATTR_SIZE, length);
    putU64(o, a + abi.ATTR_BLOCKS, blocks);
    putU64(o, a + abi.ATTR_ATIME, sec);
    putU64(o, a + abi.ATTR_MTIME, sec);
    putU64(o, a + abi.ATTR_CTIME, sec);
    o.writeUInt32LE(nsec, a + abi.ATTR_ATIMENSEC);
    o.writeUInt32LE(nsec, a + abi.ATTR_MTIMENSEC);
    o.writeUInt32LE(nsec, a + abi.ATTR_CTIMENSEC);
    o.writeUInt32LE(Atomics.load(this.state, FUSE_STATE_MODE) >>> 0, a + abi.ATTR_MODE);
    o.writeUInt32LE(1, a + abi.ATTR_NLINK);
    o.writeUInt32LE(Atomics.load(this.state, FUSE_STATE_UID) >>> 0, a + abi.ATTR_UID);
    o.writeUInt32LE(Atomics.load(this.state, FUSE_STATE_GID) >>> 0, a + abi.ATTR_GID);
    o.writeUInt32LE(node.requestAlignment(), a + abi.ATTR_BLKSIZE);
    return abi.ATTR_OUT_SIZE;
  }

  private async fuseSetattr(slot: FuseSlot, valid: number, mode: number, uid: number, gid: number, size: number): Promise<number> {
    const { writable, allowOther } = this.params;
    // FH, LOCKOWNER and KILL_SUIDGID come with ftruncate()/writes and can be ignored safely.
    let supported = abi.FATTR_SIZE | abi.FATTR_MODE | abi.FATTR_FH | abi.FATTR_LOCKOWNER | abi.FATTR_KILL_SUIDGID;
    if (allowOther) supported |= abi.FATTR_UID | abi.FATTR_GID;
    if (valid & ~supported) return -ENOTSUP;
    if (valid & abi.FATTR_MODE) {
      // Without allow_other nobody but the owner can access the export: group/other bits would lie.
      if (!allowOther && mode & (abi.S_IRWXG | abi.S_IRWXO)) return -EPERM;
      if (!writable && mode & (abi.S_IWUSR | abi.S_IWGRP | abi.S_IWOTH)) return -EROFS;
    }
    if (valid & abi.FATTR_SIZE) {
      if (!writable) return -EACCES;
      if (!zeroWriteTruncate(this.node)) return -ENOTSUP;
      await this.node.truncate(size, true, 'off');
    }
    if (valid & abi.FATTR_MODE) Atomics.store(this.state, FUSE_STATE_MODE, (mode & 0o7777) | abi.S_IFREG);
    if (valid & abi.FATTR_UID) Atomics.store(this.state, FUSE_STATE_UID, uid | 0);
    if (valid & abi.FATTR_GID) Atomics.store(this.state, FUSE_STATE_GID, gid | 0);
    return this.fuseGetattr(slot);
  }

  private fuseRead(slot: FuseSlot, offset: number, size: number): number | Promise<number> {
    if (size > FUSE_MAX_READ_BYTES || size > READ_CAPACITY) return -EINVAL;
    const length = this.node.getLength();
    if (offset >= length) return 0;
    // The kernel expects short reads at EOF: clamp, don't fail.
    const n = Math.min(size, length - offset);
    const buf = outView(slot, n);
    // Answered before returning when the node can (null, page cache): no promise per request.
    if (this.node.tryRead(offset, buf)) return n;
    return this.node.read(offset, buf).then(() => n);
  }

  private fuseWrite(slot: FuseSlot, offLo: number, offHi: number, size: number): number | Promise<number> {
    if (size > FUSE_MAX_WRITE_BYTES) return -EINVAL;
    if (!this.params.writable) return -EACCES;
    // offset + size must not overflow 64 bits.
    if (offHi === 0xffffffff && offLo + size > 0xffffffff) return -EINVAL;
    const offset = offLo + offHi * 0x100000000;
    if (size > 0 && offset + size <= this.node.getLength()) {
      // Inside the node: done before returning when the node can (null, inline buffered writes).
      if (this.node.tryWrite(offset, dataView(slot, size), this.writeFlags)) return this.writeReply(slot, size);
    }
    return this.fuseWriteAsync(slot, offset, size);
  }

  private writeReply(slot: FuseSlot, size: number): number {
    const o = slot.out;
    o.writeUInt32LE(size, abi.WRITE_OUT_SIZE_FIELD);
    o.writeUInt32LE(0, 4);
    return abi.WRITE_OUT_SIZE;
  }

  private async fuseWriteAsync(slot: FuseSlot, offset: number, size: number): Promise<number> {
    const length = this.node.getLength();
    if (offset + size > length) {
      if (this.params.growable) {
        await this.grow(offset + size);
      } else if (offset >= length) {
        size = 0; // reaches the writer as ENOSPC
      } else {
        size = length - offset;
      }
    }
    if (size > 0) {
      const data = dataView(slot, size);
      await this.node.write(offset, data, this.writeFlags);
    }
    return this.writeReply(slot, size);
  }

  /** Grow the node to at least `end`; growths on this queue run one at a time so none shrinks another's. */
  private grow(end: number): Promise<void> {
    const p = this.growChain.then(async () => {
      if (this.node.getLength() < end) {
        if (!zeroWriteTruncate(this.node)) throw new BlockIoError(ENOTSUP, 'Block driver does not support requested flags');
        await this.node.truncate(end, true, 'off');
      }
    });
    this.growChain = p.catch(() => undefined);
    return p;
  }

  private async fuseFallocate(offset: number, length: number, mode: number): Promise<number> {
    if (!this.params.writable) return -EACCES;
    const node = this.node;
    const blkLen = node.getLength();
    if (mode & abi.FALLOC_FL_KEEP_SIZE) length = Math.min(length, blkLen - offset);
    if (mode === 0) {
      // We can only allocate at EOF, by growing.
      if (offset < blkLen) return -EOPNOTSUPP;
      if (!zeroWriteTruncate(node)) return -ENOTSUP;
      if (offset > blkLen) await node.truncate(offset, true, 'off');
      await node.truncate(offset + length, true, 'falloc');
      return 0;
    }
    if (mode & abi.FALLOC_FL_PUNCH_HOLE) {
      if (!(mode & abi.FALLOC_FL_KEEP_SIZE)) return -EINVAL;
      // Beyond EOF the clamped length is <= 0: nothing to punch (QEMU would fail with EIO here).
      try {
        for (; length > 0; ) {
          const n = Math.min(length, BDRV_REQUEST_MAX_BYTES);
          await node.writeZeroes(offset, n, ZERO_UNMAP);
          offset += n;
          length -= n;
        }
      } catch (err) {
        // fallocate(2) reports unsupported modes as EOPNOTSUPP.
        const e = errnoOf(err);
        return e === ENOTSUP ? -EOPNOTSUPP : -e;
      }
      return 0;
    }
    if (mode & abi.FALLOC_FL_ZERO_RANGE) {
      if (!(mode & abi.FALLOC_FL_KEEP_SIZE) && offset + length > blkLen) {
        // QEMU 7.2 fails this growth of a block device with ENOTSUP too (observed).
        if (!zeroWriteTruncate(node)) return -ENOTSUP;
        // The grown part reads as zeroes already; the zeroing below covers the rest.
        await node.truncate(offset + length, false, 'off');
      }
      for (; length > 0; ) {
        const n = Math.min(length, BDRV_REQUEST_MAX_BYTES);
        await node.writeZeroes(offset, n, ZERO_PLAIN);
        offset += n;
        length -= n;
      }
      return 0;
    }
    return -EOPNOTSUPP;
  }

  private async fuseFsync(): Promise<number> {
    await this.node.flush();
    return 0;
  }

  private async fuseLseek(slot: FuseSlot, offset: number, whence: number): Promise<number> {
    if (whence !== abi.SEEK_DATA && whence !== abi.SEEK_HOLE) return -EINVAL;
    const node = this.node;
    for (;;) {
      const st = await node.blockStatus(offset, Number.MAX_SAFE_INTEGER);
      if (st.pnum === 0) {
        const blkLen = node.getLength();
        if (offset < blkLen) return -ENXIO; // no progress before EOF: don't loop forever
        // At EOF: SEEK_HOLE finds the implicit hole at EOF itself; past EOF nothing is found.
        if (offset > blkLen || whence === abi.SEEK_DATA) return -ENXIO;
        break;
      }
      if (st.data ? whence === abi.SEEK_DATA : whence === abi.SEEK_HOLE) break;
      offset += st.pnum;
    }
    putU64(slot.out, 0, offset);
    return abi.LSEEK_OUT_SIZE;
  }

  private fuseStatfs(slot: FuseSlot): number {
    const o = slot.out;
    o.fill(0, 0, abi.STATFS_OUT_SIZE);
    const bsize = Math.max(512, this.node.optimalTransfer() || this.node.requestAlignment());
    o.writeUInt32LE(bsize, abi.KSTATFS_BSIZE);
    o.writeUInt32LE(255, abi.KSTATFS_NAMELEN);
    return abi.STATFS_OUT_SIZE;
  }
}

/** The /dev/fuse transport: requests are read(2) from one (cloned) fd and answered with write(2) on it. */
class FuseQueue extends FuseServer {
  private readonly channel: FuseChannel;
  private readonly slots: FuseSlot[] = [];
  /** Indices of free slots (a stack). */
  private readonly free: number[] = [];
  private readonly readBufs: Buffer[] = [];
  private readonly lengths = new Int32Array(READ_BATCH);
  private readonly batch = new Int32Array(READ_BATCH);
  private polling = true;
  private writeErrorLogged = false;
  /**
   * Replies waiting for flushReplies(): they go out in one crossing (one write(2) each), after
   * the batch that made them or, for replies of asynchronous requests, in a microtask. Their
   * slots are recycled only once written, as the next request would be read over them.
   */
  private readonly replyBufs: Buffer[] = [];
  private readonly replyLens: Int32Array;
  private readonly replySlots: FuseSlot[] = [];
  private replyCount = 0;
  /** Per slot: 1 while its reply is queued; flushReplies() recycles it (finish() released it already). */
  private readonly replyQueued: Uint8Array;
  private inBatch = false;
  private flushScheduled = false;
  private readonly flushMicrotask = (): void => {
    this.flushScheduled = false;
    this.flushReplies();
  };

  constructor(node: BlockNode, params: FuseQueueParams) {
    super(node, params);
    const count = params.slots ?? FUSE_DEFAULT_QUEUE_SLOTS;
    this.replyLens = new Int32Array(count);
    this.replyQueued = new Uint8Array(count);
    for (let i = 0; i < count; i++) {
      const mem = native.allocAligned(SLOT_BYTES, ALIGN);
      this.slots.push({
        index: i,
        in: mem.subarray(REQ_START),
        op: mem.subarray(REQ_START + abi.IN_HEADER_SIZE),
        data: mem.subarray(ALIGN),
        outHeader: mem.subarray(REPLY_START),
        out: mem.subarray(ALIGN),
        uniqueLo: 0,
        uniqueHi: 0,
        ...NO_SLOT_VIEWS,
      });
      this.free.push(count - 1 - i);
    }
    this.channel = new native.FuseChannel(params.fd, params.ownsFd, this.onReadable);
  }

  protected updateIntake(): void {
    const want = !this.drained && !this.stopped && !this.dead && this.free.length > 0;
    if (want === this.polling) return;
    this.polling = want;
    if (want) this.channel.resume();
    else this.channel.pause();
  }

  protected shutdown(): void {
    this.flushReplies();
    this.polling = false;
    this.channel.close();
  }

  /** The fd is readable: take as many requests as are pending and slots allow. */
  private readonly onReadable = (): void => {
    if (Atomics.load(this.state, FUSE_STATE_HALTED) !== 0) this.dead = true;
    while (!this.drained && !this.stopped && !this.dead && this.free.length > 0) {
      const want = Math.min(this.free.length, READ_BATCH);
      const rb = this.readBufs;
      rb.length = want;
      for (let i = 0; i < want; i++) rb[i] = this.slots[this.free[this.free.length - 1 - i]!]!.in;
      const n = this.channel.readMany(rb, this.lengths);
      if (n <= 0) {
        if (n < 0) this.readFailed(-n);
        break;
      }
      // Take every slot first: a request finishing synchronously pushes its slot back.
      for (let i = 0; i < n; i++) this.batch[i] = this.free.pop()!;
      this.inFlight += n;
      this.inBatch = true;
      for (let i = 0; i < n; i++) this.process(this.slots[this.batch[i]!]!, this.lengths[i]!);
      this.inBatch = false;
      // The batch's replies go out before more requests are read into their slots.
      this.flushReplies();
      if (n < want) break;
    }
    this.updateIntake();
  };

  private readFailed(errno: number): void {
    this.dead = true;
    // ENODEV: the file system was unmounted or the connection aborted; nothing to report.
    if (errno !== ENODEV) {
      console.error(`Export '${this.params.exportId}': Failed to read from FUSE device: ${strerror(errno)}`);
    }
  }

  private process(slot: FuseSlot, n: number): void {
    const req = slot.in;
    if (n < abi.IN_HEADER_SIZE) {
      this.halt(`Incomplete read from FUSE device, expected at least ${abi.IN_HEADER_SIZE} bytes, read ${n} bytes`);
      this.release(slot);
      return;
    }
    const len = req.readUInt32LE(abi.IN_LEN);
    if (len !== n) {
      this.halt(`Number of bytes read from FUSE device does not match request size, expected ${len} bytes, read ${n} bytes`);
      this.release(slot);
      return;
    }
    this.serve(slot, len);
  }

  protected transmit(slot: FuseSlot, len: number): void {
    const i = this.replyCount++;
    this.replyBufs[i] = slot.outHeader;
    this.replyLens[i] = len;
    this.replySlots[i] = slot;
    this.replyQueued[slot.index] = 1;
    if (!this.inBatch && !this.flushScheduled) {
      this.flushScheduled = true;
      queueMicrotask(this.flushMicrotask);
    }
  }

  /** Write every queued reply in one crossing, then recycle the slots that were waiting for it. */
  private flushReplies(): void {
    const count = this.replyCount;
    if (count === 0) return;
    this.replyCount = 0;
    this.replyBufs.length = count;
    this.channel.writeMany(this.replyBufs, this.replyLens, count);
    for (let i = 0; i < count; i++) {
      const w = this.replyLens[i]!;
      // ENOENT: the request was interrupted and the kernel forgot it; that is not an error.
      if (w < 0 && w !== -ENOENT && w !== -ENODEV && !this.writeErrorLogged) {
        this.writeErrorLogged = true;
        console.error(`Export '${this.params.exportId}': Failed to write to FUSE device: ${strerror(-w)}`);
      }
      const slot = this.replySlots[i]!;
      this.replyQueued[slot.index] = 0;
      this.free.push(slot.index);
    }
    if (!this.polling) this.updateIntake();
  }

  protected recycle(slot: FuseSlot): void {
    if (this.replyQueued[slot.index]) return; // its reply is still to be written from it
    this.free.push(slot.index);
    if (!this.polling) this.updateIntake();
  }
}

/**
 * Whether a node can be truncated with QEMU's BDRV_REQ_ZERO_WRITE, which QEMU 7.2's FUSE export asks
 * for on SETATTR(size), fallocate mode 0 and growing writes: file-posix offers it only on regular
 * files, raw passes on its child's support, so a (raw over a) host_device export fails those with
 * ENOTSUP, even for the same size. Drivers without truncate fail with ENOTSUP anyway.
 */
function zeroWriteTruncate(node: BlockNode): boolean {
  let n: BlockNode | undefined = node;
  while (n?.driver.name === 'raw') n = n.file;
  return n?.driver.name !== 'host_device';
}

/**
 * Start serving one FUSE queue in the calling thread (main loop or an iothread; it does not care).
 * `node` is this context's node. Reading starts immediately; see LocalQueue for drain/stop.
 */
export function startFuseQueue(node: BlockNode, params: FuseQueueParams & { uring?: undefined }): LocalQueue;
export function startFuseQueue(node: BlockNode, params: FuseQueueParams): LocalQueue | Promise<LocalQueue>;
export function startFuseQueue(node: BlockNode, params: FuseQueueParams): LocalQueue | Promise<LocalQueue> {
  // The ring transport is loaded only where an export asks for it (and it imports this module).
  if (params.uring) return import('./fuse-uring-queue.js').then((m) => m.startFuseUringQueue(node, params));
  return new FuseQueue(node, params);
}
