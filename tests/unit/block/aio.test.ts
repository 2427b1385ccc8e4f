// aio engines (threads, native, io_uring): data, EOF, errors and per-thread rings on real files.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import { fileIo, openUringFileIo, ThreadsFileIo, UringFileIo, type AioMode } from '../../../src/block/aio.js';
import { BlockIoError } from '../../../src/block/node.js';
import { native } from '../../../src/native/binding.js';

const { EBADF, EINVAL, EPERM } = os.constants.errno;
const c = native.ioConstants;
const aioUrl = new URL('../../../src/block/aio.ts', import.meta.url).href;
const tsxApi = new URL('../../../node_modules/tsx/dist/esm/api/index.mjs', import.meta.url).href;

function pattern(size: number, seed: number): Buffer {
  const b = Buffer.alloc(size);
  for (let i = 0; i < size; i++) b[i] = (i * 13 + seed * 101 + (i >> 11)) & 0xff;
  return b;
}

async function rejectsWith(p: Promise<unknown>, errno: number): Promise<void> {
  await assert.rejects(p, (e: any) => {
    assert.ok(e instanceof BlockIoError, `not a BlockIoError: ${e}`);
    assert.equal(e.errno, errno, e.message);
    return true;
  });
}

describe('aio engines', function () {
  let dir: string;
  const fds: number[] = [];
  const open = (name: string, flags: number | string = 'w+'): number => {
    const fd = fs.openSync(path.join(dir, name), flags, 0o600);
    fds.push(fd);
    return fd;
  };
  before(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qsd-aio-'));
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

  it('one engine per mode per thread; native shares the io_uring ring', () => {
    assert.equal(fileIo('threads'), fileIo('threads'));
    assert.ok(fileIo('threads') instanceof ThreadsFileIo);
    assert.equal(fileIo('io_uring'), fileIo('native'));
    assert.ok(fileIo('io_uring') instanceof UringFileIo); // io_uring works on this machine
  });

  for (const mode of ['threads', 'native', 'io_uring'] as AioMode[]) {
    describe(`aio=${mode}`, () => {
      it('concurrent writes then reads at scattered offsets, verified', async () => {
        const io = fileIo(mode);
        const fd = open(`data-${mode}`);
        // 600 requests at once: more than the io_uring slot table's initial 256, so it grows.
        const n = 600;
        const size = (i: number) => 512 + ((i * 977) % 7) * 1024;
        const off = (i: number) => ((i * 7919) % n) * 8192;
        const src = Array.from({ length: n }, (_, i) => pattern(size(i), i));
        const wrote = await Promise.all(src.map((b, i) => io.write(fd, b, off(i))));
        wrote.forEach((w, i) => assert.equal(w, size(i)));
        const dst = src.map((b) => Buffer.alloc(b.length));
        const read = await Promise.all(dst.map((b, i) => io.read(fd, b, off(i))));
        for (let i = 0; i < n; i++) {
          assert.equal(read[i], size(i));
          assert.ok(dst[i].equals(src[i]), `request ${i}`);
        }
        const check = Buffer.alloc(size(5));
        native.pread(fd, check, off(5));
        assert.ok(check.equals(src[5]));
      });

      it('reads are short only at EOF; zero-length requests complete', async () => {
        const io = fileIo(mode);
        const fd = open(`eof-${mode}`);
        await io.write(fd, pattern(10_000, 1), 0);
        const b = Buffer.alloc(4096, 0xee);
        assert.equal(await io.read(fd, b, 8192), 10_000 - 8192);
        assert.ok(b.subarray(0, 10_000 - 8192).equals(pattern(10_000, 1).subarray(8192)));
        assert.equal(await io.read(fd, b, 1 << 20), 0);
        assert.equal(await io.read(fd, Buffer.alloc(0), 0), 0);
        assert.equal(await io.write(fd, Buffer.alloc(0), 0), 0);
        assert.equal(fs.fstatSync(fd).size, 10_000);
      });

      it('fdatasync and fallocate (allocate, punch hole, zero range)', async () => {
        const io = fileIo(mode);
        const fd = open(`falloc-${mode}`);
        await io.fallocate(fd, 0, 0, 1 << 20);
        assert.equal(fs.fstatSync(fd).size, 1 << 20);
        await io.write(fd, pattern(1 << 20, 2), 0);
        await io.fdatasync(fd);
        await io.fallocate(fd, c.FALLOC_FL_PUNCH_HOLE | c.FALLOC_FL_KEEP_SIZE, 65536, 65536);
        await io.fallocate(fd, c.FALLOC_FL_ZERO_RANGE, 0, 4096);
        const b = Buffer.alloc(1 << 20);
        assert.equal(await io.read(fd, b, 0), 1 << 20);
        assert.ok(b.subarray(0, 4096).every((x) => x === 0));
        assert.ok(b.subarray(4096, 65536).equals(pattern(1 << 20, 2).subarray(4096, 65536)));
        assert.ok(b.subarray(65536, 131072).every((x) => x === 0));
        assert.equal(native.lseek(fd, 65536, c.SEEK_HOLE), 65536);
      });

      it('O_DIRECT with aligned buffers; misaligned is EINVAL', async () => {
        const io = fileIo(mode);
        const fd = open(`direct-${mode}`, fs.constants.O_RDWR | fs.constants.O_CREAT | c.O_DIRECT);
        const bufs = Array.from({ length: 32 }, (_, i) => {
          const b = native.allocAligned(4096, 4096);
          pattern(4096, 50 + i).copy(b);
          return b;
        });
        await Promise.all(bufs.map((b, i) => io.write(fd, b, i * 4096)));
        const back = bufs.map(() => native.allocAligned(4096, 4096));
        await Promise.all(back.map((b, i) => io.read(fd, b, i * 4096)));
        back.forEach((b, i) => assert.ok(b.equals(bufs[i]), `block ${i}`));
        await rejectsWith(io.read(fd, native.allocAligned(8192, 4096).subarray(1, 4097), 0), EINVAL);
      });

      it('errors reject with BlockIoError and the positive errno', async () => {
        const io = fileIo(mode);
        const closed = open(`closed-${mode}`);
        fs.closeSync(closed);
        await rejectsWith(io.read(closed, Buffer.alloc(512), 0), EBADF);
        await rejectsWith(io.write(closed, Buffer.alloc(512), 0), EBADF);
        await rejectsWith(io.fdatasync(closed), EBADF);
        await rejectsWith(io.fallocate(closed, 0, 0, 4096), EBADF);
        open(`ro-${mode}`);
        const ro = open(`ro-${mode}`, 'r');
        await rejectsWith(io.write(ro, Buffer.alloc(512, 1), 0), EBADF);
        await rejectsWith(io.fallocate(ro, 0, 0, 4096), EBADF);
        // The engine keeps serving after errors.
        const fd = open(`after-${mode}`);
        assert.equal(await io.write(fd, Buffer.from('still here'), 0), 10);
      });
    });
  }

  it('falls back to aio=threads, logging once, when the ring cannot be set up', async () => {
    const logged: string[] = [];
    const orig = console.error;
    console.error = (...args: unknown[]) => void logged.push(args.join(' '));
    let io;
    try {
      io = openUringFileIo(() => {
        throw Object.assign(new Error('EPERM: operation not permitted, io_uring_setup'), {
          errno: EPERM,
          syscall: 'io_uring_setup',
        });
      });
    } finally {
      console.error = orig;
    }
    assert.equal(io, fileIo('threads'));
    assert.equal(logged.length, 1);
    assert.match(logged[0], /io_uring is not available \(EPERM.*\); using aio=threads/);
    const fd = open('fallback');
    assert.equal(await io.write(fd, Buffer.from('abc'), 0), 3);
    assert.throws(() => openUringFileIo(() => { throw new TypeError('not an errno error'); }), TypeError);
  });

  it('each worker thread gets its own ring and completes its I/O there', async () => {
    const file = path.join(dir, 'workers');
    fs.writeFileSync(file, Buffer.alloc(2 * 65536));
    const code = `
      const { parentPort, workerData } = require('node:worker_threads');
      const fs = require('node:fs');
      (async () => {
        (await import(workerData.tsxApi)).register(); // the worker loads our .ts sources itself
        const { fileIo } = await import(workerData.aioUrl);
        const io = fileIo('io_uring');
        const fd = fs.openSync(workerData.file, 'r+');
        const src = Buffer.alloc(65536, workerData.fill);
        await io.write(fd, src, workerData.index * 65536);
        const back = Buffer.alloc(65536);
        const n = await io.read(fd, back, workerData.index * 65536);
        parentPort.postMessage({ n, same: back.equals(src), kind: io.constructor.name, pending: io.pending });
        fs.closeSync(fd);
      })().catch((e) => parentPort.postMessage({ error: String(e) }));
    `;
    const run = (index: number) =>
      new Promise<any>((resolve, reject) => {
        const w = new Worker(code, {
          eval: true,
          workerData: { aioUrl, tsxApi, file, index, fill: 0x41 + index },
        });
        let msg: any;
        w.on('message', (m) => (msg = m));
        w.on('error', reject);
        w.on('exit', (code) => resolve({ ...msg, code }));
      });
    const results = await Promise.all([run(0), run(1)]);
    for (const r of results) {
      assert.equal(r.error, undefined);
      assert.deepEqual(r, { n: 65536, same: true, kind: 'UringFileIo', pending: 0, code: 0 });
    }
    const all = fs.readFileSync(file);
    assert.ok(all.subarray(0, 65536).every((x) => x === 0x41));
    assert.ok(all.subarray(65536).every((x) => x === 0x42));
  });
});
