// Native block I/O: sync helpers and the per-thread IoRing on real files under /tmp.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { spawnSync } from 'node:child_process';
import { Worker } from 'node:worker_threads';
import { native } from '../../../src/native/binding.js';

const { EBADF, ENXIO, EINVAL, ECANCELED } = os.constants.errno;
const c = native.ioConstants;
const addonPath = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../build/Release/qsd_native.node');

/** Deterministic, offset-dependent content so a misplaced block shows up. */
function pattern(size: number, seed: number): Buffer {
  const b = Buffer.alloc(size);
  for (let i = 0; i < size; i++) b[i] = (i * 31 + seed * 7 + (i >> 9)) & 0xff;
  return b;
}

/** Collects completions of one ring and lets a test await a set of tags. */
class Completions {
  readonly results = new Map<number, number>();
  calls = 0;
  private waiters: (() => void)[] = [];
  readonly onComplete = (count: number, tags: Int32Array, results: Int32Array): void => {
    this.calls++;
    for (let i = 0; i < count; i++) {
      assert.ok(!this.results.has(tags[i]), `tag ${tags[i]} completed twice`);
      this.results.set(tags[i], results[i]);
    }
    for (const w of this.waiters.splice(0)) w();
  };
  async waitFor(n: number): Promise<void> {
    while (this.results.size < n) await new Promise<void>((r) => this.waiters.push(r));
  }
}

describe('native block I/O', function () {
  let dir: string;
  const fds: number[] = [];
  const open = (name: string, flags: number | string = 'w+'): number => {
    const fd = fs.openSync(path.join(dir, name), flags, 0o600);
    fds.push(fd);
    return fd;
  };

  before(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qsd-block-io-'));
  });
  after(() => {
    for (const fd of fds) {
      try {
        fs.closeSync(fd);
      } catch {
        /* closed by the test */
      }
    }
    fs.rmSync(dir, { recursive: true, force: true });
  });

  describe('sync helpers', () => {
    it('pwrite/pread round trip; pread is short only at EOF', () => {
      const fd = open('rw');
      const data = pattern(100_000, 1);
      assert.equal(native.pwrite(fd, data, 12345), data.length);
      const back = Buffer.alloc(data.length);
      assert.equal(native.pread(fd, back, 12345), data.length);
      assert.deepEqual(back, data);
      const tail = Buffer.alloc(4096);
      assert.equal(native.pread(fd, tail, 12345 + data.length - 100), 100);
      assert.deepEqual(tail.subarray(0, 100), data.subarray(data.length - 100));
      assert.equal(native.pread(fd, tail, 1 << 30), 0);
    });

    it('throws Error with positive errno and syscall', () => {
      const fd = open('closed');
      fs.closeSync(fd);
      for (const [fn, syscall] of [
        [() => native.pread(fd, Buffer.alloc(8), 0), 'pread'],
        [() => native.pwrite(fd, Buffer.alloc(8), 0), 'pwrite'],
        [() => native.fdatasync(fd), 'fdatasync'],
        [() => native.fallocate(fd, 0, 0, 4096), 'fallocate'],
      ] as const) {
        assert.throws(fn, (e: any) => e.errno === EBADF && e.syscall === syscall && e.code === 'EBADF');
      }
      assert.equal(native.lseek(fd, 0, c.SEEK_SET), -EBADF);
      const ro = open('ro-src');
      const rofd = fs.openSync(path.join(dir, 'ro-src'), 'r');
      fds.push(rofd, ro);
      assert.throws(() => native.pwrite(rofd, Buffer.alloc(8), 0), (e: any) => e.errno === EBADF);
      assert.throws(() => native.blockDeviceSize(ro), (e: any) => e.errno === os.constants.errno.ENOTTY);
      assert.throws(() => native.pread(ro, 'x' as any, 0), TypeError);
    });

    it('fallocate punch hole, then lseek SEEK_DATA/SEEK_HOLE see it', () => {
      const fd = open('holes');
      const MiB = 1 << 20;
      native.pwrite(fd, pattern(4 * MiB, 2), 0);
      native.fdatasync(fd);
      native.fallocate(fd, c.FALLOC_FL_PUNCH_HOLE | c.FALLOC_FL_KEEP_SIZE, MiB, MiB);
      assert.equal(fs.fstatSync(fd).size, 4 * MiB);
      assert.equal(native.lseek(fd, 0, c.SEEK_HOLE), MiB);
      assert.equal(native.lseek(fd, MiB, c.SEEK_DATA), 2 * MiB);
      assert.equal(native.lseek(fd, 2 * MiB, c.SEEK_HOLE), 4 * MiB); // EOF is a hole
      assert.equal(native.lseek(fd, 4 * MiB, c.SEEK_DATA), -ENXIO);
      const zeros = Buffer.alloc(MiB, 0xaa);
      native.pread(fd, zeros, MiB);
      assert.ok(zeros.every((b) => b === 0));
      native.fallocate(fd, 0, 0, 6 * MiB); // plain allocation grows the file
      assert.equal(fs.fstatSync(fd).size, 6 * MiB);
      native.fallocate(fd, c.FALLOC_FL_ZERO_RANGE, 0, 4096);
      const z = Buffer.alloc(4096, 1);
      native.pread(fd, z, 0);
      assert.ok(z.every((b) => b === 0));
    });

    it('fallocateAsync reports 0 or the errno on this thread', async () => {
      const fd = open('falloc-async');
      assert.equal(await new Promise((r) => native.fallocateAsync(fd, 0, 0, 1 << 20, r)), 0);
      assert.equal(fs.fstatSync(fd).size, 1 << 20);
      assert.equal(await new Promise((r) => native.fallocateAsync(-1, 0, 0, 4096, r)), EBADF);
    });

    it('allocAligned: zero-filled, aligned enough for O_DIRECT, bad alignment refused', () => {
      const b = native.allocAligned(1 << 16, 4096);
      assert.equal(b.length, 1 << 16);
      assert.ok(b.every((x) => x === 0));
      assert.equal(native.allocAligned(0, 4096).length, 0);
      assert.throws(() => native.allocAligned(4096, 3000), (e: any) => e.errno === EINVAL);
      // The kernel checks the address: O_DIRECT accepts the aligned buffer, refuses it off by one.
      const fd = open('direct-align', fs.constants.O_RDWR | fs.constants.O_CREAT | c.O_DIRECT);
      for (let i = 0; i < 16; i++) {
        const a = native.allocAligned(4096, 4096);
        a.fill(i + 1);
        assert.equal(native.pwrite(fd, a, i * 4096), 4096);
      }
      const off = native.allocAligned(8192, 4096).subarray(1, 4097);
      assert.throws(() => native.pread(fd, off, 0), (e: any) => e.errno === EINVAL);
    });

    it('ioConstants has the Linux values', () => {
      assert.equal(c.FALLOC_FL_KEEP_SIZE, 1);
      assert.equal(c.FALLOC_FL_PUNCH_HOLE, 2);
      assert.equal(c.FALLOC_FL_ZERO_RANGE, 0x10);
      assert.equal(c.SEEK_DATA, 3);
      assert.equal(c.SEEK_HOLE, 4);
      assert.equal(c.O_DIRECT, fs.constants.O_DIRECT);
    });
  });

  describe('IoRing', () => {
    it('a batch of 64 writes then 64 reads, verified byte by byte, in few wake-ups', async () => {
      const fd = open('batch');
      const done = new Completions();
      const ring = new native.IoRing(128, done.onComplete);
      try {
        const bs = 8192;
        const src = Array.from({ length: 64 }, (_, i) => pattern(bs, i));
        for (let i = 0; i < 64; i++) assert.equal(ring.write(fd, src[i], (63 - i) * bs, i), 0);
        assert.equal(ring.pending, 64);
        await done.waitFor(64);
        for (let i = 0; i < 64; i++) assert.equal(done.results.get(i), bs, `write ${i}`);
        assert.equal(ring.pending, 0);

        const dst = Array.from({ length: 64 }, () => Buffer.alloc(bs));
        for (let i = 0; i < 64; i++) assert.equal(ring.read(fd, dst[i], (63 - i) * bs, 1000 + i), 0);
        await done.waitFor(128);
        for (let i = 0; i < 64; i++) {
          assert.equal(done.results.get(1000 + i), bs, `read ${i}`);
          assert.ok(dst[i].equals(src[i]), `read ${i} content`);
        }
        // Cross-check with the sync path.
        const whole = Buffer.alloc(64 * bs);
        native.pread(fd, whole, 0);
        for (let i = 0; i < 64; i++) assert.ok(whole.subarray((63 - i) * bs, (64 - i) * bs).equals(src[i]));
        assert.ok(done.calls < 128, `one callback per wake-up, not per CQE (${done.calls})`);
      } finally {
        ring.close();
      }
    });

    it('O_DIRECT with aligned buffers; a misaligned buffer completes with -EINVAL', async () => {
      const fd = open('direct', fs.constants.O_RDWR | fs.constants.O_CREAT | c.O_DIRECT);
      const done = new Completions();
      const ring = new native.IoRing(32, done.onComplete);
      try {
        const bufs = Array.from({ length: 16 }, (_, i) => {
          const b = native.allocAligned(4096, 4096);
          pattern(4096, 100 + i).copy(b);
          return b;
        });
        bufs.forEach((b, i) => ring.write(fd, b, i * 4096, i));
        await done.waitFor(16);
        const back = Array.from({ length: 16 }, () => native.allocAligned(4096, 4096));
        back.forEach((b, i) => ring.read(fd, b, i * 4096, 100 + i));
        await done.waitFor(32);
        for (let i = 0; i < 16; i++) {
          assert.equal(done.results.get(i), 4096);
          assert.equal(done.results.get(100 + i), 4096);
          assert.ok(back[i].equals(bufs[i]));
        }
        const off = native.allocAligned(8192, 4096).subarray(1, 4097);
        ring.read(fd, off, 0, 500);
        await done.waitFor(33);
        assert.equal(done.results.get(500), -EINVAL);
      } finally {
        ring.close();
      }
    });

    it('a tiny ring: full SQ is submitted and retried, CQ overflow is reaped', async () => {
      const fd = open('tiny');
      native.pwrite(fd, pattern(256 * 512, 5), 0);
      const done = new Completions();
      const ring = new native.IoRing(2, done.onComplete); // SQ 2, CQ 4
      try {
        const bufs = Array.from({ length: 256 }, () => Buffer.alloc(512));
        // All queued in one tick: the SQ fills every 2 requests and the CQ overflows.
        for (let i = 0; i < 256; i++) assert.equal(ring.read(fd, bufs[i], i * 512, i), 0);
        await done.waitFor(256);
        const whole = pattern(256 * 512, 5);
        for (let i = 0; i < 256; i++) {
          assert.equal(done.results.get(i), 512);
          assert.ok(bufs[i].equals(whole.subarray(i * 512, (i + 1) * 512)), `read ${i}`);
        }
        assert.equal(ring.pending, 0);
      } finally {
        ring.close();
      }
    });

    it('fsync, fallocate and errors come back as -errno results', async () => {
      const fd = open('ops');
      const done = new Completions();
      const ring = new native.IoRing(8, done.onComplete);
      try {
        ring.write(fd, pattern(4096, 9), 0, 1);
        await done.waitFor(1);
        ring.fsync(fd, true, 2);
        ring.fsync(fd, false, 3);
        ring.fallocate(fd, c.FALLOC_FL_PUNCH_HOLE | c.FALLOC_FL_KEEP_SIZE, 0, 4096, 4);
        ring.read(-1, Buffer.alloc(16), 0, 5);
        assert.equal(ring.submit(), 4);
        await done.waitFor(5);
        assert.equal(done.results.get(2), 0);
        assert.equal(done.results.get(3), 0);
        assert.equal(done.results.get(4), 0);
        assert.equal(done.results.get(5), -EBADF);
        assert.equal(native.lseek(fd, 0, c.SEEK_DATA), -ENXIO);
        assert.equal(ring.read(fd, Buffer.alloc(1), -1, 6), -EINVAL);
        assert.throws(() => ring.read(fd, 'nope' as any, 0, 7), TypeError);
      } finally {
        ring.close();
      }
    });

    it('close() completes what is still queued, then refuses requests; idempotent', async () => {
      const fd = open('close');
      const done = new Completions();
      const ring = new native.IoRing(8, done.onComplete);
      native.pwrite(fd, pattern(4096, 3), 0);
      ring.read(fd, Buffer.alloc(4096), 0, 1);
      ring.read(fd, Buffer.alloc(4096), 0, 2);
      ring.close();
      assert.equal(done.results.size, 2);
      for (const t of [1, 2]) assert.ok([4096, -ECANCELED].includes(done.results.get(t)!));
      assert.equal(ring.pending, 0);
      assert.equal(ring.read(fd, Buffer.alloc(1), 0, 3), -EBADF);
      ring.close();
      assert.throws(() => new native.IoRing(1 << 20, () => {}), (e: any) => e.errno === EINVAL && e.syscall === 'io_uring_setup');
    });

    it('close() from inside onComplete delivers the rest on fresh arrays', async () => {
      const fd = open('close-inside');
      native.pwrite(fd, pattern(65536, 4), 0);
      const seen: number[] = [];
      let ring: any;
      let outer: Int32Array | undefined;
      let nested = false;
      await new Promise<void>((resolve) => {
        ring = new native.IoRing(64, (count, tags) => {
          if (!outer) {
            outer = tags;
            const first = tags[0];
            for (let t = 100; t < 108; t++) ring.read(fd, Buffer.alloc(4096), 0, t);
            ring.close(); // the 8 just queued complete inside this call
            assert.equal(tags[0], first, 'outer arrays untouched by the nested delivery');
            for (let i = 0; i < count; i++) seen.push(tags[i]);
            resolve();
          } else {
            nested = tags !== outer;
            for (let i = 0; i < count; i++) seen.push(tags[i]);
          }
        });
        ring.read(fd, Buffer.alloc(4096), 0, 1);
      });
      assert.ok(nested);
      assert.deepEqual(seen.sort((a, b) => a - b), [1, 100, 101, 102, 103, 104, 105, 106, 107]);
      assert.equal(ring.pending, 0);
    });

    it('an exception thrown by onComplete is an uncaught exception, like any callback', () => {
      const child = spawnSync(
        process.execPath,
        ['-e', `const n = require(${JSON.stringify(addonPath)}); const fs = require('fs');
          const fd = fs.openSync(process.execPath, 'r');
          const r = new n.IoRing(8, () => { throw new Error('boom from onComplete'); });
          r.read(fd, Buffer.alloc(16), 0, 1);`],
        { encoding: 'utf8', timeout: 10_000 },
      );
      assert.equal(child.status, 1);
      assert.match(child.stderr, /boom from onComplete/);
    });

    it('completes in a worker_thread, on that thread, and the worker exits with a ring open', async () => {
      const file = path.join(dir, 'worker');
      fs.writeFileSync(file, pattern(65536, 7));
      const code = `
        const { parentPort, workerData, threadId } = require('node:worker_threads');
        const fs = require('node:fs');
        const n = require(workerData.addon);
        const fd = fs.openSync(workerData.file, 'r+');
        const bufs = [];
        let got = 0;
        const ring = new n.IoRing(16, (count, tags, results) => {
          got += count;
          if (got !== 16) return; // once: the extra read below completes later
          const sums = bufs.map((b) => b.reduce((a, x) => a + x, 0));
          // Leave the ring open with one read still queued: the env cleanup hook must close it.
          ring.read(fd, Buffer.alloc(4096), 0, 99);
          parentPort.postMessage({ threadId, sums, pending: ring.pending });
        });
        for (let i = 0; i < 16; i++) { bufs.push(Buffer.alloc(4096)); ring.read(fd, bufs[i], i * 4096, i); }
        globalThis.keep = ring;
      `;
      const worker = new Worker(code, { eval: true, workerData: { addon: addonPath, file } });
      const msg: any = await new Promise((resolve, reject) => {
        worker.once('message', resolve);
        worker.once('error', reject);
      });
      const expected = pattern(65536, 7);
      assert.equal(msg.threadId, worker.threadId);
      assert.equal(msg.pending, 1);
      for (let i = 0; i < 16; i++) {
        assert.equal(msg.sums[i], expected.subarray(i * 4096, (i + 1) * 4096).reduce((a, x) => a + x, 0));
      }
      const exitCode = await new Promise((resolve) => worker.once('exit', resolve));
      assert.equal(exitCode, 0);
    });

    it('a worker terminated with I/O in flight, and a process exiting with a ring open, end cleanly', async () => {
      const file = path.join(dir, 'term');
      fs.writeFileSync(file, pattern(1 << 20, 8));
      const code = `
        const { parentPort, workerData } = require('node:worker_threads');
        const n = require(workerData.addon);
        const fd = require('node:fs').openSync(workerData.file, 'r');
        const ring = new n.IoRing(64, () => {});
        for (let i = 0; i < 64; i++) ring.read(fd, Buffer.alloc(16384), i * 16384, i);
        ring.submit();
        parentPort.postMessage(ring.pending);
        setInterval(() => {}, 1000);
      `;
      const worker = new Worker(code, { eval: true, workerData: { addon: addonPath, file } });
      assert.equal(await new Promise((r) => worker.once('message', r)), 64);
      assert.equal(await worker.terminate(), 1);

      const child = spawnSync(
        process.execPath,
        ['-e', `const n = require(${JSON.stringify(addonPath)}); const r = new n.IoRing(8, () => {}); ` +
          `r.read(require('fs').openSync(${JSON.stringify(file)}, 'r'), Buffer.alloc(4096), 0, 1); process.exitCode = 3;`],
        { encoding: 'utf8', timeout: 10_000 },
      );
      assert.equal(child.stderr, '');
      assert.equal(child.status, 3);
    });
  });
});
