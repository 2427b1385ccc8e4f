// Backing-file I/O engines for the file driver: one io_uring per thread, or the libuv threadpool.
// Each thread (main loop or iothread worker) has its own module instance, hence its own engines.
import fs from 'node:fs';
import { constants as osConstants } from 'node:os';
import { getSystemErrorName } from 'node:util';
import { native, type IoRing } from '../native/binding.js';
import { BlockIoError } from './node.js';

/** QEMU's BlockdevAioOptions names (the file driver's `aio` option). */
export type AioMode = 'threads' | 'native' | 'io_uring';

/** Positioned I/O on a process-wide fd; every call completes in the calling thread. */
export interface FileIo {
  /** Read buf.length bytes at offset into buf. Resolves to the bytes read: fewer only at EOF. */
  read(fd: number, buf: Buffer, offset: number): Promise<number>;
  /** Write all of buf at offset (short writes are continued). Resolves to buf.length or rejects. */
  write(fd: number, buf: Buffer, offset: number): Promise<number>;
  /** fdatasync(2). */
  fdatasync(fd: number): Promise<void>;
  /** fallocate(2) with FALLOC_FL_* mode bits (see native.ioConstants). */
  fallocate(fd: number, mode: number, offset: number, length: number): Promise<void>;
}

const { EBUSY, EINTR, EAGAIN, ENOSPC, EIO } = osConstants.errno;

/** Submission queue size of each thread's ring (the CQ is twice that). */
const RING_ENTRIES = 256;
/** Initial request slots; the table doubles when all are in use. */
const INITIAL_SLOTS = 256;

function errnoName(errno: number): string {
  try {
    return getSystemErrorName(-errno);
  } catch {
    return `errno ${errno}`;
  }
}

function ioError(errno: number, syscall: string): BlockIoError {
  return new BlockIoError(errno, `${errnoName(errno)}: ${syscall} failed`);
}

/** A Node fs error (negative .errno, string .code) as a BlockIoError with the positive errno. */
function fsError(err: NodeJS.ErrnoException, syscall: string): BlockIoError {
  const errno = (err.code && (osConstants.errno as Record<string, number>)[err.code]) || -(err.errno ?? -EIO);
  return new BlockIoError(errno, `${errnoName(errno)}: ${syscall} failed`);
}

const OP_READ = 0;
const OP_WRITE = 1;
const OP_FSYNC = 2;
const OP_FALLOCATE = 3;
const SYSCALL = ['read', 'write', 'fdatasync', 'fallocate'];

type Resolve = (value: number) => void;
type Reject = (err: Error) => void;

/**
 * aio=io_uring: requests go to this thread's IoRing and complete in this thread's loop. Request
 * state lives in a slot table indexed by the ring tag, so issuing a request allocates nothing but
 * its promise.
 */
export class UringFileIo implements FileIo {
  private readonly ring: IoRing;
  private capacity = 0;
  private resolves: (Resolve | undefined)[] = [];
  private rejects: (Reject | undefined)[] = [];
  /** The caller's buffer: referenced until completion, because the kernel writes into it. */
  private bufs: (Buffer | undefined)[] = [];
  private ops = new Uint8Array(0);
  private fds = new Int32Array(0);
  private offsets = new Float64Array(0);
  /** READ/WRITE: bytes done so far; FALLOCATE: the length. */
  private done = new Float64Array(0);
  private modes = new Int32Array(0);
  private free = new Int32Array(0);
  private freeTop = 0;
  /** Slots the ring refused with -EBUSY; retried when completions make room. */
  private readonly backlog: number[] = [];
  private newSlot = 0;
  /** One executor for every promise: it stores the resolvers of the slot being issued. */
  private readonly executor = (resolve: Resolve, reject: Reject): void => {
    this.resolves[this.newSlot] = resolve;
    this.rejects[this.newSlot] = reject;
  };

  /** makeRing builds the ring for this thread; it throws (errno) when io_uring is unavailable. */
  constructor(makeRing: (onComplete: (count: number, tags: Int32Array, results: Int32Array) => void) => IoRing) {
    this.grow(INITIAL_SLOTS);
    this.ring = makeRing((count, tags, results) => this.onComplete(count, tags, results));
  }

  read(fd: number, buf: Buffer, offset: number): Promise<number> {
    if (buf.length === 0) return Promise.resolve(0);
    return this.request(OP_READ, fd, buf, offset, 0, 0);
  }

  write(fd: number, buf: Buffer, offset: number): Promise<number> {
    if (buf.length === 0) return Promise.resolve(0);
    return this.request(OP_WRITE, fd, buf, offset, 0, 0);
  }

  fdatasync(fd: number): Promise<void> {
    return this.request(OP_FSYNC, fd, undefined, 0, 0, 0) as Promise<unknown> as Promise<void>;
  }

  fallocate(fd: number, mode: number, offset: number, length: number): Promise<void> {
    return this.request(OP_FALLOCATE, fd, undefined, offset, mode, length) as Promise<unknown> as Promise<void>;
  }

  /** Requests queued or in flight in the ring. */
  get pending(): number {
    return this.ring.pending + this.backlog.length;
  }

  private request(op: number, fd: number, buf: Buffer | undefined, offset: number, mode: number, length: number): Promise<number> {
    if (this.freeTop === 0) this.grow(this.capacity * 2);
    const slot = this.free[--this.freeTop];
    this.ops[slot] = op;
    this.fds[slot] = fd;
    this.offsets[slot] = offset;
    this.done[slot] = length;
    this.modes[slot] = mode;
    this.bufs[slot] = buf;
    this.newSlot = slot;
    const promise = new Promise<number>(this.executor);
    this.issue(slot);
    return promise;
  }

  private grow(capacity: number): void {
    const old = this.capacity;
    const copy = <T extends Uint8Array | Int32Array | Float64Array>(a: T, make: new (n: number) => T): T => {
      const b = new make(capacity);
      b.set(a as any);
      return b;
    };
    this.ops = copy(this.ops, Uint8Array);
    this.fds = copy(this.fds, Int32Array);
    this.offsets = copy(this.offsets, Float64Array);
    this.done = copy(this.done, Float64Array);
    this.modes = copy(this.modes, Int32Array);
    this.free = copy(this.free, Int32Array);
    this.resolves.length = this.rejects.length = this.bufs.length = capacity;
    // All old slots are in use when we grow; push the new ones, lowest on top.
    for (let s = capacity - 1; s >= old; s--) this.free[this.freeTop++] = s;
    this.capacity = capacity;
  }

  /** Queue the slot's (remaining) operation; failures to queue complete the request. */
  private issue(slot: number): void {
    let r: number;
    try {
      r = this.queue(slot);
    } catch (err) {
      this.settle(slot, err as Error, 0); // a TypeError from the binding: bad fd/buffer/offset type
      return;
    }
    if (r === -EBUSY) {
      this.backlog.push(slot);
      // Normally completions of what is in flight retry the backlog; with nothing in flight, retry soon.
      if (this.ring.pending === 0) setImmediate(() => this.retryBacklog());
    } else if (r < 0) {
      this.settle(slot, ioError(-r, SYSCALL[this.ops[slot]]), 0);
    }
  }

  private queue(slot: number): number {
    const fd = this.fds[slot];
    switch (this.ops[slot]) {
      case OP_READ:
      case OP_WRITE: {
        const buf = this.bufs[slot]!;
        const done = this.done[slot];
        // A continuation (short transfer) is rare, so its view may allocate.
        const view = done === 0 ? buf : buf.subarray(done);
        const offset = this.offsets[slot] + done;
        return this.ops[slot] === OP_READ ? this.ring.read(fd, view, offset, slot) : this.ring.write(fd, view, offset, slot);
      }
      case OP_FSYNC:
        return this.ring.fsync(fd, true, slot);
      default:
        return this.ring.fallocate(fd, this.modes[slot], this.offsets[slot], this.done[slot], slot);
    }
  }

  private onComplete(count: number, tags: Int32Array, results: Int32Array): void {
    for (let i = 0; i < count; i++) {
      const slot = tags[i];
      const res = results[i];
      const op = this.ops[slot];
      if (res < 0) {
        if (res === -EINTR || res === -EAGAIN) this.issue(slot);
        else this.settle(slot, ioError(-res, SYSCALL[op]), 0);
        continue;
      }
      if (op === OP_READ || op === OP_WRITE) {
        const total = this.bufs[slot]!.length;
        const done = this.done[slot] + res;
        this.done[slot] = done;
        if (done < total) {
          if (res > 0) this.issue(slot); // short transfer: continue with the rest
          else if (op === OP_READ) this.settle(slot, undefined, done); // EOF: a short read is the answer
          else this.settle(slot, ioError(ENOSPC, 'write'), 0); // as QEMU reports a short write
          continue;
        }
        this.settle(slot, undefined, done);
      } else {
        this.settle(slot, undefined, 0);
      }
    }
    if (this.backlog.length > 0) this.retryBacklog();
  }

  private retryBacklog(): void {
    for (let n = this.backlog.length; n > 0; n--) {
      const slot = this.backlog.shift()!;
      this.issue(slot);
      if (this.backlog.length >= n) break; // still full: wait for more completions
    }
  }

  private settle(slot: number, err: Error | undefined, value: number): void {
    const resolve = this.resolves[slot]!;
    const reject = this.rejects[slot]!;
    this.resolves[slot] = this.rejects[slot] = undefined;
    this.bufs[slot] = undefined;
    this.free[this.freeTop++] = slot;
    if (err) reject(err);
    else resolve(value);
  }
}

/** aio=threads: Node's fs on the libuv threadpool, like QEMU's thread pool. */
export class ThreadsFileIo implements FileIo {
  read(fd: number, buf: Buffer, offset: number): Promise<number> {
    return new Promise((resolve, reject) => readFrom(fd, buf, offset, 0, resolve, reject));
  }

  write(fd: number, buf: Buffer, offset: number): Promise<number> {
    return new Promise((resolve, reject) => writeFrom(fd, buf, offset, 0, resolve, reject));
  }

  fdatasync(fd: number): Promise<void> {
    return new Promise((resolve, reject) =>
      fs.fdatasync(fd, (err) => (err ? reject(fsError(err, 'fdatasync')) : resolve())),
    );
  }

  fallocate(fd: number, mode: number, offset: number, length: number): Promise<void> {
    return new Promise((resolve, reject) =>
      native.fallocateAsync(fd, mode, offset, length, (errno) => (errno ? reject(ioError(errno, 'fallocate')) : resolve())),
    );
  }
}

function readFrom(fd: number, buf: Buffer, offset: number, done: number, resolve: Resolve, reject: Reject): void {
  if (done === buf.length) return resolve(done);
  fs.read(fd, buf, done, buf.length - done, offset + done, (err, n) => {
    if (err) reject(fsError(err, 'read'));
    else if (n === 0) resolve(done); // EOF
    else readFrom(fd, buf, offset, done + n, resolve, reject);
  });
}

function writeFrom(fd: number, buf: Buffer, offset: number, done: number, resolve: Resolve, reject: Reject): void {
  if (done === buf.length) return resolve(done);
  fs.write(fd, buf, done, buf.length - done, offset + done, (err, n) => {
    if (err) reject(fsError(err, 'write'));
    else if (n === 0) reject(ioError(ENOSPC, 'write'));
    else writeFrom(fd, buf, offset, done + n, resolve, reject);
  });
}

let threadsIo: FileIo | undefined;
let uringIo: FileIo | undefined;

/**
 * Build the io_uring engine, or fall back to the threadpool (logged once per thread) when the
 * kernel refuses io_uring (EPERM: io_uring_disabled or seccomp; ENOSYS: no io_uring; ENOMEM:
 * memlock limits on old kernels). makeRing is replaceable so the fallback can be tested.
 */
export function openUringFileIo(
  makeRing: (onComplete: (count: number, tags: Int32Array, results: Int32Array) => void) => IoRing = (cb) =>
    new native.IoRing(RING_ENTRIES, cb),
): FileIo {
  try {
    return new UringFileIo(makeRing);
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    if (typeof e.errno !== 'number') throw err;
    console.error(`qsd-ts: io_uring is not available (${e.message}); using aio=threads instead`);
    return (threadsIo ??= new ThreadsFileIo());
  }
}

/** This thread's engine for mode (created on first use; nothing is shared across threads). */
export function fileIo(mode: AioMode): FileIo {
  if (mode === 'threads') return (threadsIo ??= new ThreadsFileIo());
  // 'native' is QEMU's Linux AIO (io_submit). Node has no libaio binding and we add no
  // dependency for it; io_uring gives the same contract (async, O_DIRECT-friendly, completions
  // in this thread) with fewer syscalls, so both modes share this thread's ring.
  return (uringIo ??= openUringFileIo());
}
