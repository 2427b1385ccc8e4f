// The only file that loads the native addon; everything else imports these typed functions.
// Native calls throw an Error carrying .errno (positive) and .syscall on failure, unless a
// function says it returns -errno (the hot-path ones, where throwing would cost too much).
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(import.meta.url);

/** A non-blocking /dev/fuse queue fd polled by the calling thread's own libuv loop. */
export interface FuseChannel {
  /** Read one request into buf: its length, 0 when none is pending (EAGAIN), or -errno (ENODEV: unmounted). */
  read(buf: Buffer): number;
  /**
   * Read up to bufs.length requests, one per buffer, in one crossing. lengths[i] receives the
   * length of the request in bufs[i]. Returns how many were read (0: none pending), or -errno if
   * the first read failed.
   */
  readMany(bufs: Buffer[], lengths: Int32Array): number;
  /** Write one reply: buf[0, length). Returns bytes written or -errno. */
  write(buf: Buffer, length: number): number;
  /**
   * Write bufs[i][0, lengths[i]) for i < count, one reply per write(2), in one crossing.
   * lengths[i] becomes that write's result: bytes written or -errno.
   */
  writeMany(bufs: Buffer[], lengths: Int32Array, count: number): void;
  /** Write one reply gathered from several buffers (writev). Returns bytes written or -errno. */
  writev(bufs: Buffer[]): number;
  /** Stop polling (the loop no longer wakes for this fd) without closing it. */
  pause(): void;
  /** Poll again after pause(). */
  resume(): void;
  /** Stop polling and release the poll handle; closes the fd if the channel owns it. Idempotent. */
  close(): void;
}

export interface FuseChannelConstructor {
  /**
   * Start polling fd (made O_NONBLOCK) in the current thread's loop. onReadable runs in this
   * thread whenever the fd is readable; it should read until 0 or pause(). ownsFd: close() closes fd.
   */
  new (fd: number, ownsFd: boolean, onReadable: () => void): FuseChannel;
}

/** An io_uring owned by the calling thread; completions are reaped in that thread's loop. */
export interface IoRing {
  /**
   * Queue a read/write of buf at offset on fd; tag identifies it in completions. Submitted in one
   * batch just before the loop next blocks (or by submit()). Returns 0, or -EBUSY if the ring is full,
   * -EBADF once closed, -EINVAL for a negative offset. The caller keeps buf alive until completion.
   */
  read(fd: number, buf: Buffer, offset: number, tag: number): number;
  write(fd: number, buf: Buffer, offset: number, tag: number): number;
  /** Queue fsync (datasync: fdatasync semantics). */
  fsync(fd: number, datasync: boolean, tag: number): number;
  /** Queue fallocate(fd, mode, offset, len). */
  fallocate(fd: number, mode: number, offset: number, length: number, tag: number): number;
  /** Submit what is queued now. Returns the number submitted or -errno. */
  submit(): number;
  /** Requests queued or in flight. */
  readonly pending: number;
  /** Stop polling and destroy the ring; pending requests complete with -ECANCELED first. Idempotent. */
  close(): void;
}

export interface IoRingConstructor {
  /**
   * entries: ring size. onComplete(count) runs in this thread after completions were reaped:
   * tags[i] and results[i] (bytes or -errno) for i < count, valid until the callback returns.
   */
  new (entries: number, onComplete: (count: number, tags: Int32Array, results: Int32Array) => void): IoRing;
}

/**
 * FUSE-over-io_uring ring entries served by the calling thread (native/fuse_uring.cc). Each entry is
 * a header buffer (fuseUringConstants.HEADER_SIZE bytes: in_out at 0, op_in at OP_IN_OFFSET,
 * ent_in_out at ENT_IN_OUT_OFFSET) and a payload buffer, both kept referenced by the ring.
 * SQEs are submitted in one batch just before the loop next blocks.
 */
export interface FuseUring {
  /** Queue FUSE_IO_URING_CMD_REGISTER of entry `tag` (< entries) on queue qid. 0 or -errno. */
  register(tag: number, qid: number, header: Buffer, payload: Buffer): number;
  /**
   * Queue COMMIT_AND_FETCH of entry `tag`: the reply (fuse_out_header in in_out, payload_sz in
   * ent_in_out, out args in the payload) is already in its buffers. 0 or -errno.
   */
  commit(tag: number): number;
  /** Submit what is queued now. Returns the number submitted or -errno. */
  submit(): number;
  /** Commands queued or armed in the kernel (a completion is still to come). */
  readonly pending: number;
  /**
   * Destroy the ring (the kernel cancels armed entries). With pending > 0 the buffers stay
   * referenced for good, as the kernel might still write into them. Idempotent.
   */
  close(): void;
}

export interface FuseUringConstructor {
  /**
   * fd: any /dev/fuse fd of the connection. entries: the most entries this ring will hold.
   * onComplete(count) runs in this thread: tags[i] is the entry, results[i] 0 when a request was
   * delivered into it, else -errno (the entry is no longer armed).
   */
  new (fd: number, entries: number, onComplete: (count: number, tags: Int32Array, results: Int32Array) => void): FuseUring;
}

export interface NativeAddon {
  // ---- FUSE device (native/fuse_device.cc) ----
  /** open("/dev/fuse", O_RDWR | O_CLOEXEC). */
  fuseOpen(): number;
  /** mount(2): source, target, filesystem type ("fuse"), MS_* flags, option string with fd=… */
  mount(source: string, target: string, fstype: string, flags: number, data: string): void;
  /** umount2(target, flags). */
  umount(target: string, flags: number): void;
  /**
   * Mount through the setuid fusermount3 (unprivileged users): runs
   * `fusermount3 -o <options> -- <mountpoint>` with _FUSE_COMMFD and receives the /dev/fuse fd.
   */
  fusermountMount(mountpoint: string, options: string): number;
  /** New queue fd: open("/dev/fuse", O_RDWR|O_CLOEXEC|O_NONBLOCK) + ioctl(FUSE_DEV_IOC_CLONE, srcFd). */
  fuseCloneFd(srcFd: number): number;
  FuseChannel: FuseChannelConstructor;
  /**
   * socketpair(AF_UNIX, SOCK_SEQPACKET|SOCK_NONBLOCK|SOCK_CLOEXEC): keeps message boundaries like
   * /dev/fuse, so tests can stand in for the kernel on a FuseChannel. Throws on error.
   */
  seqpacketPair(): [number, number];
  /** MS_* and MNT_* constants needed for mount()/umount(). */
  constants: Record<string, number>;

  // ---- FUSE-over-io_uring (native/fuse_uring.cc) ----
  FuseUring: FuseUringConstructor;
  /** HEADER_SIZE (sizeof fuse_uring_req_header), OP_IN_OFFSET, ENT_IN_OUT_OFFSET. */
  fuseUringConstants: Record<'HEADER_SIZE' | 'OP_IN_OFFSET' | 'ENT_IN_OUT_OFFSET', number>;

  // ---- block I/O (native/block_io.cc) ----
  IoRing: IoRingConstructor;
  /** pread(2) into buf; returns bytes read (short at EOF). Throws on error. */
  pread(fd: number, buf: Buffer, offset: number): number;
  /** pwrite(2) of buf; returns bytes written. Throws on error. */
  pwrite(fd: number, buf: Buffer, offset: number): number;
  /**
   * One preadv2(2) with RWF_* flags (ioConstants.RWF_NOWAIT: only from the page cache), for the
   * inline fast path: bytes read (short at EOF or when partly cached) or -errno (-EAGAIN: would block).
   */
  preadNow(fd: number, buf: Buffer, offset: number, flags: number): number;
  /** One pwritev2(2) with RWF_* flags: bytes written (possibly short) or -errno (-EAGAIN, -EOPNOTSUPP). */
  pwriteNow(fd: number, buf: Buffer, offset: number, flags: number): number;
  /** fallocate(2); throws on error (errno EOPNOTSUPP where the file system lacks the mode). */
  fallocate(fd: number, mode: number, offset: number, length: number): void;
  /**
   * fallocate(2) on the libuv threadpool (aio=threads: Node's fs has no fallocate and a large
   * preallocation must not stall the loop). callback(errno) runs in this thread, 0 on success.
   */
  fallocateAsync(fd: number, mode: number, offset: number, length: number, callback: (errno: number) => void): void;
  /** lseek(2) with SEEK_DATA/SEEK_HOLE etc.; returns the offset, or -errno (ENXIO past the data). */
  lseek(fd: number, offset: number, whence: number): number;
  /** fdatasync(2); throws on error. */
  fdatasync(fd: number): void;
  /** Whether buf's address is a multiple of alignment (O_DIRECT buffers must be). */
  isBufferAligned(buf: Buffer, alignment: number): boolean;
  /** lockf(fd, F_TLOCK, 0): lock the whole file or throw (errno EAGAIN/EACCES when held elsewhere). */
  tryLockFile(fd: number): void;
  /** Size of a block device (BLKGETSIZE64); throws on error. */
  blockDeviceSize(fd: number): number;
  /** A Buffer of size bytes whose address is a multiple of alignment (for O_DIRECT). Zero-filled. */
  allocAligned(size: number, alignment: number): Buffer;
  /** FALLOC_FL_*, SEEK_DATA/SEEK_HOLE, O_DIRECT. */
  ioConstants: Record<string, number>;
  /** The CPUs the calling thread may run on (sched_getaffinity of this thread), ascending. */
  threadAffinity(): number[];
  /** Restrict the calling thread to cpus (sched_setaffinity); 0, or a negative errno. */
  setThreadAffinity(cpus: number[]): number;
  /**
   * Busy-poll this thread's loop for up to maxNs before it blocks, adapting the window as QEMU's
   * iothreads do (grow/shrink factors, 0 = QEMU's defaults); maxNs 0 turns polling off.
   */
  setLoopPolling(maxNs: number, grow: number, shrink: number): number;
  /** This thread's current polling window in ns, or -1 if polling was never set up here. */
  loopPollingNs(): number;
}

function load(): NativeAddon {
  const candidates = [
    path.join(here, '../../build/Release/qsd_native.node'),
    path.join(here, '../../build/Debug/qsd_native.node'),
  ];
  let lastError: unknown;
  for (const file of candidates) {
    try {
      return require(file) as NativeAddon;
    } catch (err) {
      lastError = err;
    }
  }
  throw new Error(`qsd-ts: cannot load the native addon (run 'npm ci' or 'npm run build'): ${String(lastError)}`);
}

export const native: NativeAddon = load();
