// file and host_device: nodes backed by a regular file or block device (QEMU's file-posix).
import fs from 'node:fs';
import { constants as osConstants } from 'node:os';
import type { BlockDriver, BlockStatus, DriverImageInfo, PreallocMode } from './driver.js';
import { BlockIoError } from './node.js';
import { genericError } from '../qapi/errors.js';
import { fileIo, type AioMode, type FileIo } from './aio.js';
import { native } from '../native/binding.js';
import { errnoOf, strerror } from '../util/errno.js';
import { claimFor, createBlockLocks, withBlockLocks } from './block-locks.js';

const { EINVAL, ENOTSUP, EOPNOTSUPP } = osConstants.errno;
const FALLOC_FL_KEEP_SIZE = 0x01;
const FALLOC_FL_PUNCH_HOLE = 0x02;
const FALLOC_FL_ZERO_RANGE = 0x10;
const SEEK_DATA = 3;
const SEEK_HOLE = 4;
/** Buffer alignment for O_DIRECT I/O: a page satisfies every logical block size. */
const BUFFER_ALIGNMENT = 4096;

interface FileDescription {
  fd: number;
  filename: string;
  direct: boolean;
  aio: AioMode;
  isBlockDevice: boolean;
  /** Float64Array[0] over this buffer: the current length, shared by every context. */
  lengthCell: SharedArrayBuffer;
  /** O_DIRECT request alignment probed at open (QEMU's raw_probe_alignment); 1 without O_DIRECT. */
  alignment: number;
  /**
   * Block lock words shared by every context using this fd (see block-locks.ts): with O_DIRECT,
   * a read-modify-write of a partial block excludes every other write touching that block.
   */
  blockLocks: SharedArrayBuffer;
}

interface FileState extends FileDescription {
  length: Float64Array;
  lock: Int32Array;
  io: FileIo;
  isReplica: boolean;
  /** fallocate modes that returned EOPNOTSUPP: don't ask again (like QEMU's has_write_zeroes). */
  noZeroRange: boolean;
  noPunchHole: boolean;
  /** The file system refused RWF_NOWAIT reads (tmpfs does): no inline reads. */
  nowaitReadRefused: boolean;
  /** The file system refused RWF_NOWAIT buffered writes (ext4 does): inline writes are plain pwrites. */
  nowaitWriteRefused: boolean;
  /** performance.now() before which inline plain pwrites are off (they kept blocking). */
  inlineWritesOffUntil: number;
  /** Slow inline writes since slowWindowStart. */
  slowWrites: number;
  slowWindowStart: number;
}

function makeState(desc: FileDescription, isReplica: boolean): FileState {
  return {
    ...desc,
    length: new Float64Array(desc.lengthCell),
    lock: new Int32Array(desc.blockLocks),
    io: fileIo(desc.aio),
    isReplica,
    noZeroRange: false,
    noPunchHole: false,
    nowaitReadRefused: false,
    nowaitWriteRefused: false,
    inlineWritesOffUntil: 0,
    slowWrites: 0,
    slowWindowStart: 0,
  };
}

function currentSize(fd: number, isBlockDevice: boolean): number {
  return isBlockDevice ? native.blockDeviceSize(fd) : fs.fstatSync(fd).size;
}

/**
 * The O_DIRECT request alignment, found as QEMU's raw_probe_alignment does: try reads of 1, 512,
 * 1024, 2048 and 4096 bytes at offset 0 and take the first the kernel does not refuse with
 * EINVAL. A 1-byte read that succeeds (as at EOF of an empty file) proves nothing, so QEMU then
 * falls back to the safe 4096.
 */
function probeAlignment(fd: number): number {
  const buf = native.allocAligned(BUFFER_ALIGNMENT, BUFFER_ALIGNMENT);
  for (const size of [1, 512, 1024, 2048, 4096]) {
    try {
      native.pread(fd, buf.subarray(0, size), 0);
    } catch (err) {
      if (errnoOf(err) === osConstants.errno.EINVAL) continue;
    }
    return size === 1 ? BUFFER_ALIGNMENT : size;
  }
  return BUFFER_ALIGNMENT;
}

function isAligned(state: FileState, offset: number, length: number): boolean {
  return offset % state.alignment === 0 && length % state.alignment === 0;
}

/** O_DIRECT also needs the buffer's address aligned (QEMU's bdrv_qiov_is_aligned). */
function isBufferAligned(state: FileState, buf: Buffer): boolean {
  return native.isBufferAligned(buf, state.alignment);
}

/** Aligned bounce for O_DIRECT requests whose offset or length is not block aligned. */
/** The block-aligned range around [offset, offset+length), with a bounce buffer for it. */
function alignedBounce(state: FileState, offset: number, length: number): { start: number; end: number; bounce: Buffer } {
  const start = offset - (offset % state.alignment);
  const end = Math.ceil((offset + length) / state.alignment) * state.alignment;
  return { start, end, bounce: native.allocAligned(end - start, BUFFER_ALIGNMENT) };
}

async function bouncedRead(state: FileState, offset: number, buf: Buffer): Promise<void> {
  const { start, bounce } = alignedBounce(state, offset, buf.length);
  const n = await state.io.read(state.fd, bounce, start);
  bounce.fill(0, Math.max(0, n));
  bounce.copy(buf, 0, offset - start, offset - start + buf.length);
}

async function bouncedWrite(state: FileState, offset: number, buf: Buffer): Promise<void> {
  const { start, end, bounce } = alignedBounce(state, offset, buf.length);
  // Read-modify-write of the partial blocks at both ends; the caller holds them exclusively.
  const n = await state.io.read(state.fd, bounce, start);
  bounce.fill(0, Math.max(0, n));
  buf.copy(bounce, offset - start);
  await state.io.write(state.fd, bounce, start);
  // The bounce may have extended the file past the request's end: restore the true length.
  const wanted = Math.max(state.length[0], offset + buf.length);
  if (!state.isBlockDevice && end > wanted) fs.ftruncateSync(state.fd, wanted);
}

/**
 * An O_DIRECT write under its block claim: a bounce holds its partial end blocks exclusively,
 * every write holds its blocks shared, so no write lands between a bounce's read and its write.
 */
function directWrite(state: FileState, offset: number, buf: Buffer): Promise<unknown> {
  const bounced = !isAligned(state, offset, buf.length);
  const claim = claimFor(offset, buf.length, state.alignment, bounced);
  return withBlockLocks<unknown>(state.lock, claim, () => {
    if (bounced) return bouncedWrite(state, offset, buf);
    if (isBufferAligned(state, buf)) return state.io.write(state.fd, buf, offset);
    // Whole blocks from a misaligned buffer (qcow2 metadata, NBD payloads): copy, no read needed.
    const copy = native.allocAligned(buf.length, BUFFER_ALIGNMENT);
    buf.copy(copy);
    return state.io.write(state.fd, copy, offset);
  });
}

async function readInto(state: FileState, offset: number, buf: Buffer): Promise<void> {
  if (state.direct && !(isAligned(state, offset, buf.length) && isBufferAligned(state, buf))) {
    return bouncedRead(state, offset, buf);
  }
  let done = 0;
  while (done < buf.length) {
    const n = await state.io.read(state.fd, done ? buf.subarray(done) : buf, offset + done);
    if (n <= 0) {
      buf.fill(0, done); // Past the end of a file that shrank underneath us: zeroes, as QEMU.
      return;
    }
    done += n;
  }
}

const RWF_NOWAIT = native.ioConstants.RWF_NOWAIT!;
const PAGE_SIZE = 4096;
/**
 * Inline plain pwrites give way to the ring when they block for long in the kernel (dirty-page
 * throttling sleeps 10-200 ms a time, again and again), as the loop serves nothing else meanwhile.
 * A single slow write proves little (preemption, a journal commit: ~0.2 % of writes here take a few
 * ms, through the ring too), so only INLINE_SLOW_LIMIT writes over INLINE_SLOW_MS within
 * INLINE_SLOW_WINDOW_MS turn them off, for INLINE_BACKOFF_MS.
 */
const INLINE_SLOW_MS = 2;
const INLINE_SLOW_LIMIT = 3;
const INLINE_SLOW_WINDOW_MS = 100;
const INLINE_BACKOFF_MS = 1000;

/**
 * readNow: a buffered read served from the page cache before returning. Anything but a complete
 * read (not cached, short, EOF, an error) leaves it to the ring, which reads it again in full.
 */
function readInline(state: FileState, offset: number, buf: Buffer): boolean {
  if (!inlineIo(state) || state.nowaitReadRefused) return false;
  const r = native.preadNow(state.fd, buf, offset, RWF_NOWAIT);
  if (r === buf.length) return true;
  if (r === -EOPNOTSUPP) state.nowaitReadRefused = true;
  return false;
}

/** O_DIRECT must wait for the disk and aio=threads asks for the thread pool: no inline I/O. */
function inlineIo(state: FileState): boolean {
  return !state.direct && state.aio !== 'threads';
}

/** Completes a write that pwritev2 left short; it may wait, but nothing may stay half done. */
function finishWrite(state: FileState, offset: number, buf: Buffer, done: number): true {
  if (done < buf.length) native.pwrite(state.fd, buf.subarray(done), offset + done);
  growLength(state, offset + buf.length);
  return true;
}

/**
 * writeNow: a buffered write done before returning, saving the ring's round trip through its
 * worker threads. Where the file system offers RWF_NOWAIT buffered writes (XFS, btrfs) it does
 * exactly what needs no wait. ext4 refuses them (EOPNOTSUPP), and io_uring then hands every
 * buffered write to an io-wq worker: there a plain pwrite of whole pages (no page to read first)
 * is done inline, as it costs the same few microseconds the hand-off would, and ext4 serializes
 * buffered writes to one file anyway. Writes that keep blocking turn inline writes off for a while.
 */
function writeInline(state: FileState, offset: number, buf: Buffer): boolean {
  if (!inlineIo(state)) return false;
  if (!state.nowaitWriteRefused) {
    const r = native.pwriteNow(state.fd, buf, offset, RWF_NOWAIT);
    if (r > 0) return finishWrite(state, offset, buf, r);
    if (r !== -EOPNOTSUPP) return false; // EAGAIN (would block) or an error the ring reports
    state.nowaitWriteRefused = true;
  }
  if (offset % PAGE_SIZE !== 0 || buf.length % PAGE_SIZE !== 0) return false;
  const start = performance.now();
  if (start < state.inlineWritesOffUntil) return false;
  const r = native.pwriteNow(state.fd, buf, offset, 0);
  if (r < 0) throw new BlockIoError(-r, `${strerror(-r)}: write failed`);
  finishWrite(state, offset, buf, r);
  const end = performance.now();
  if (end - start > INLINE_SLOW_MS) noteSlowInlineWrite(state, end);
  return true;
}

function noteSlowInlineWrite(state: FileState, now: number): void {
  if (now - state.slowWindowStart > INLINE_SLOW_WINDOW_MS) {
    state.slowWindowStart = now;
    state.slowWrites = 0;
  }
  if (++state.slowWrites >= INLINE_SLOW_LIMIT) state.inlineWritesOffUntil = now + INLINE_BACKOFF_MS;
}

function growLength(state: FileState, end: number): void {
  if (end > state.length[0]) state.length[0] = end;
}

function makeFileDriver(name: 'file' | 'host_device'): BlockDriver<FileState> {
  return {
    name,
    isProtocol: true,
    async open(node, options) {
      const filename: string = options.filename;
      const direct = options.cache?.direct ?? false;
      // QEMU defaults to aio=threads; we serve the default through this thread's io_uring (no thread
      // hop per request), falling back to the thread pool where io_uring is unavailable.
      const aio: AioMode = options.aio ?? 'io_uring';
      if (aio === 'native' && !direct) {
        throw genericError('aio=native was specified, but it requires cache.direct=on, which was not specified.');
      }
      let flags = (node.readOnly ? fs.constants.O_RDONLY : fs.constants.O_RDWR); // libuv opens with O_CLOEXEC itself
      if (direct) flags |= fs.constants.O_DIRECT;
      let fd: number;
      try {
        fd = fs.openSync(filename, flags);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        // auto-read-only: fall back to read-only when the file cannot be opened for writing.
        if (!node.readOnly && node.options['auto-read-only'] && (code === 'EACCES' || code === 'EROFS' || code === 'EPERM')) {
          node.readOnly = true;
          return this.open(node, options);
        }
        throw genericError(`Could not open '${filename}': ${strerror(err)}`);
      }
      const st = fs.fstatSync(fd);
      // QEMU's raw_open_common: file takes regular files only, host_device devices only (a
      // directory opened read-only gets here; read-write it already failed with EISDIR).
      if (name === 'file' ? !st.isFile() : !(st.isBlockDevice() || st.isCharacterDevice())) {
        fs.closeSync(fd);
        throw genericError(name === 'file'
          ? `'file' driver requires '${filename}' to be a regular file`
          : `'host_device' driver requires '${filename}' to be either a character or block device`);
      }
      const isBlockDevice = st.isBlockDevice();
      const lengthCell = new SharedArrayBuffer(8);
      new Float64Array(lengthCell)[0] = currentSize(fd, isBlockDevice);
      const alignment = direct ? probeAlignment(fd) : 1;
      const blockLocks = createBlockLocks();
      return makeState({ fd, filename, direct, aio, isBlockDevice, lengthCell, alignment, blockLocks }, false);
    },
    async close(state) {
      fs.closeSync(state.fd);
    },
    describe(state): FileDescription {
      const { fd, filename, direct, aio, isBlockDevice, lengthCell, alignment, blockLocks } = state;
      return { fd, filename, direct, aio, isBlockDevice, lengthCell, alignment, blockLocks };
    },
    openReplica: (_node, description) => makeState(description as FileDescription, true),
    closeReplica() {},
    getLength: (state) => state.length[0],
    refreshLength(state) {
      state.length[0] = currentSize(state.fd, state.isBlockDevice);
    },
    async getAllocatedFileSize(state) {
      if (state.isBlockDevice) return undefined;
      return fs.fstatSync(state.fd).blocks * 512;
    },
    requestAlignment: (state) => state.alignment,
    read: (state, offset, buf) => readInto(state, offset, buf),
    readNow: (state, offset, buf) => readInline(state, offset, buf),
    // FUA writes wait for the disk: they go to the ring.
    writeNow: (state, offset, buf, flags) => !flags.fua && writeInline(state, offset, buf),
    async write(state, offset, buf, flags) {
      if (state.direct) {
        await directWrite(state, offset, buf);
      } else {
        await state.io.write(state.fd, buf, offset);
      }
      growLength(state, offset + buf.length);
      if (flags.fua) await state.io.fdatasync(state.fd);
    },
    async writeZeroes(state, offset, bytes, flags) {
      if (flags.mayUnmap && !state.noPunchHole && !state.isBlockDevice) {
        try {
          if (offset + bytes > state.length[0]) {
            // PUNCH_HOLE needs KEEP_SIZE: extend first so the zeroes are inside the file.
            fs.ftruncateSync(state.fd, offset + bytes);
            growLength(state, offset + bytes);
          }
          await state.io.fallocate(state.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, bytes);
          return;
        } catch (err) {
          if (errnoOf(err) !== EOPNOTSUPP && errnoOf(err) !== ENOTSUP) throw err;
          state.noPunchHole = true;
        }
      }
      if (!state.noZeroRange && !state.isBlockDevice) {
        try {
          await state.io.fallocate(state.fd, FALLOC_FL_ZERO_RANGE, offset, bytes);
          growLength(state, offset + bytes);
          return;
        } catch (err) {
          if (errnoOf(err) !== EOPNOTSUPP && errnoOf(err) !== ENOTSUP) throw err;
          state.noZeroRange = true;
        }
      }
      if (flags.noFallback) throw new BlockIoError(ENOTSUP, 'write zeroes not supported');
      const chunk = native.allocAligned(Math.min(bytes, 1 << 20), BUFFER_ALIGNMENT);
      for (let done = 0; done < bytes; done += chunk.length) {
        const n = Math.min(chunk.length, bytes - done);
        await this.write!(state, offset + done, chunk.subarray(0, n), {});
      }
    },
    async discard(state, offset, bytes) {
      if (state.isBlockDevice || state.noPunchHole) return;
      try {
        await state.io.fallocate(state.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, bytes);
      } catch (err) {
        // Discard is advisory: a file system without hole punching just keeps the data.
        if (errnoOf(err) !== EOPNOTSUPP && errnoOf(err) !== ENOTSUP) throw err;
        state.noPunchHole = true;
      }
    },
    async flush(state) {
      await state.io.fdatasync(state.fd);
    },
    async truncate(state, size, _exact, prealloc: PreallocMode) {
      if (state.isBlockDevice) {
        if (size > state.length[0]) throw new BlockIoError(EINVAL, 'cannot grow a block device');
        return;
      }
      const old = state.length[0];
      try {
        fs.ftruncateSync(state.fd, size);
        if (size > old && (prealloc === 'falloc' || prealloc === 'full')) {
          await state.io.fallocate(state.fd, 0, old, size - old);
        }
      } catch (err) {
        throw new BlockIoError(errnoOf(err), `Failed to resize the file: ${strerror(err)}`);
      }
      state.length[0] = size;
    },
    async blockStatus(state, offset, bytes): Promise<BlockStatus> {
      // SEEK_DATA/SEEK_HOLE as QEMU's find_allocation: a hole reads as zeroes, the rest is data.
      const data = native.lseek(state.fd, offset, SEEK_DATA);
      if (data === offset) {
        const hole = native.lseek(state.fd, offset, SEEK_HOLE);
        const end = hole > offset ? Math.min(hole, offset + bytes) : offset + bytes;
        return { pnum: end - offset, data: true, zero: false, allocated: true, depth: 1, offset };
      }
      if (data > offset || data === -osConstants.errno.ENXIO) {
        // In a hole up to `data`, or up to EOF when there is no more data.
        const end = data > offset ? Math.min(data, offset + bytes) : offset + bytes;
        return { pnum: end - offset, data: false, zero: true, allocated: true, depth: 1, offset };
      }
      // lseek not supported here: everything is data.
      return { pnum: bytes, data: true, zero: false, allocated: true, depth: 1, offset };
    },
    imageInfo(): DriverImageInfo {
      return { 'dirty-flag': false };
    },
  };
}

export const fileDriver = makeFileDriver('file');
export const hostDeviceDriver = makeFileDriver('host_device');

/**
 * blockdev-reopen, prepare half (QEMU's raw_reopen_prepare): a descriptor for the new access mode
 * and O_DIRECT setting, opened before anything changes so a failure leaves the node as it was.
 * With auto-read-only, a file that refuses writing is opened read-only instead (`readOnly` says
 * which one it got). Nothing to open (undefined) when the descriptor already fits.
 */
export function fileReopenPrepare(
  state: FileState, readOnly: boolean, direct: boolean, autoReadOnly: boolean,
): { fd: number; readOnly: boolean } | undefined {
  if (direct === state.direct && fdWritable(state.fd) === !readOnly) return undefined;
  const open = (ro: boolean) =>
    fs.openSync(state.filename, (ro ? fs.constants.O_RDONLY : fs.constants.O_RDWR) | (direct ? fs.constants.O_DIRECT : 0));
  try {
    return { fd: open(readOnly), readOnly };
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (!readOnly && autoReadOnly && (code === 'EACCES' || code === 'EROFS' || code === 'EPERM')) {
      return { fd: open(true), readOnly: true };
    }
    throw genericError(`Could not reopen file: ${strerror(err)}`);
  }
}

/** Was this descriptor opened for writing? (Its flags as /proc shows them; undefined if unknown.) */
function fdWritable(fd: number): boolean | undefined {
  try {
    const m = /^flags:\s*([0-7]+)/m.exec(fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'latin1'));
    return m ? (parseInt(m[1]!, 8) & 3) !== fs.constants.O_RDONLY : undefined;
  } catch {
    return undefined;
  }
}

/** blockdev-reopen, commit half: the new descriptor replaces the old one, which the caller closes. */
export function fileReopenCommit(state: FileState, fd: number, direct: boolean): number {
  const old = state.fd;
  state.fd = fd;
  state.direct = direct;
  state.alignment = direct ? probeAlignment(fd) : 1;
  return old;
}
