// FUSE queue at the protocol level: the test plays the kernel over a SOCK_SEQPACKET pair, so it can send
// what a real kernel never does (truncated requests, length mismatches, old versions) and see each reply.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import { fileURLToPath } from 'node:url';
import type { BlockNode } from '../../../src/block/node.js';
import type { LocalQueue } from '../../../src/iothread/context.js';
import * as abi from '../../../src/exports/fuse-abi.js';
import {
  createFuseSharedState,
  FUSE_MAX_WRITE_BYTES,
  FUSE_STATE_HALTED,
  FUSE_STATE_MODE,
  startFuseQueue,
  type FuseQueueParams,
} from '../../../src/exports/fuse-queue.js';
import { native } from '../../../src/native/binding.js';
import { openTestNode, testFileDriver } from './fuse-harness.js';

const { EACCES, EINVAL, ENOSYS, ENOTSUP, EPERM, EROFS, EOPNOTSUPP } = os.constants.errno;
const MiB = 1024 * 1024;

/** The kernel's side of one queue. */
class FakeKernel {
  private unique = 100;
  private readonly rbuf = Buffer.alloc(2 * MiB);
  constructor(readonly fd: number) {}

  /** Send a request: header + op struct (+ payload); len overrides the header's length field. */
  send(opcode: number, op: Buffer = Buffer.alloc(0), opts: { len?: number; nodeid?: number } = {}): number {
    const unique = this.unique++;
    const h = Buffer.alloc(abi.IN_HEADER_SIZE);
    const total = abi.IN_HEADER_SIZE + op.length;
    h.writeUInt32LE(opts.len ?? total, abi.IN_LEN);
    h.writeUInt32LE(opcode, abi.IN_OPCODE);
    h.writeBigUInt64LE(BigInt(unique), abi.IN_UNIQUE);
    h.writeBigUInt64LE(BigInt(opts.nodeid ?? 1), abi.IN_NODEID);
    fs.writeSync(this.fd, Buffer.concat([h, op]));
    return unique;
  }

  sendRaw(buf: Buffer): void {
    fs.writeSync(this.fd, buf);
  }

  /** Wait for one reply; null if none comes within timeoutMs. */
  async recv(timeoutMs = 2000): Promise<{ error: number; unique: number; payload: Buffer } | null> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        const n = fs.readSync(this.fd, this.rbuf, 0, this.rbuf.length, null);
        assert.equal(this.rbuf.readUInt32LE(abi.OUT_LEN), n, 'out header length matches the message');
        return {
          error: this.rbuf.readInt32LE(abi.OUT_ERROR),
          unique: Number(this.rbuf.readBigUInt64LE(abi.OUT_UNIQUE)),
          payload: Buffer.from(this.rbuf.subarray(abi.OUT_HEADER_SIZE, n)),
        };
      } catch (err) {
        if ((err as { code?: string }).code !== 'EAGAIN') throw err;
      }
      if (Date.now() > deadline) return null;
      await new Promise((r) => setTimeout(r, 2));
    }
  }

  /** Send and expect the reply to this request. */
  async call(opcode: number, op?: Buffer, opts?: { len?: number }) {
    const unique = this.send(opcode, op, opts);
    const r = await this.recv();
    assert.ok(r, `a reply to opcode ${opcode}`);
    assert.equal(r.unique, unique);
    return r;
  }
}

function initIn(major: number, minor: number, flags: number): Buffer {
  const b = Buffer.alloc(64);
  b.writeUInt32LE(major, abi.INIT_IN_MAJOR);
  b.writeUInt32LE(minor, abi.INIT_IN_MINOR);
  b.writeUInt32LE(128 * 1024, abi.INIT_IN_MAX_READAHEAD);
  b.writeUInt32LE(flags >>> 0, abi.INIT_IN_FLAGS);
  return b;
}

function rwIn(offset: bigint, size: number): Buffer {
  const b = Buffer.alloc(abi.READ_IN_SIZE);
  b.writeBigUInt64LE(offset, abi.RW_IN_OFFSET);
  b.writeUInt32LE(size, abi.RW_IN_SIZE);
  return b;
}

function setattrIn(valid: number, fields: { mode?: number; size?: number } = {}): Buffer {
  const b = Buffer.alloc(abi.SETATTR_IN_SIZE);
  b.writeUInt32LE(valid, abi.SETATTR_VALID);
  b.writeBigUInt64LE(BigInt(fields.size ?? 0), abi.SETATTR_SIZE);
  b.writeUInt32LE(fields.mode ?? 0, abi.SETATTR_MODE);
  return b;
}

describe('FUSE queue protocol', function () {
  this.timeout(20000);
  let dir: string;
  let node: BlockNode;
  let kernel: FakeKernel;
  let queue: LocalQueue | undefined;
  let shared: SharedArrayBuffer;
  let peerFd: number;

  async function start(opts: Partial<FuseQueueParams> = {}): Promise<void> {
    const [ours, theirs] = native.seqpacketPair();
    peerFd = theirs;
    kernel = new FakeKernel(theirs);
    shared = createFuseSharedState(abi.S_IFREG | 0o600, 0, 0);
    queue = startFuseQueue(node, {
      fd: ours,
      ownsFd: true,
      exportId: 'exp0',
      writable: true,
      growable: false,
      allowOther: false,
      writethrough: false,
      shared,
      ...opts,
    });
  }

  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qsd-fuseq-'));
    const image = path.join(dir, 'img');
    fs.writeFileSync(image, Buffer.alloc(MiB, 0x11));
    node = await openTestNode(image);
  });

  afterEach(async () => {
    await queue?.stop();
    queue = undefined;
    fs.closeSync(peerFd);
    await testFileDriver.close(node.state);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('INIT: minor negotiation, our flags, limits; compat size below 7.23; version errors', async () => {
    await start();
    const offered = 0xffffffff;
    let r = await kernel.call(abi.FUSE_INIT, initIn(7, 45, offered));
    assert.equal(r.error, 0);
    assert.equal(r.payload.length, abi.INIT_OUT_SIZE);
    const p = r.payload;
    assert.equal(p.readUInt32LE(abi.INIT_OUT_MAJOR), 7);
    assert.equal(p.readUInt32LE(abi.INIT_OUT_MINOR), 45);
    assert.equal(p.readUInt32LE(abi.INIT_OUT_MAX_READAHEAD), 128 * 1024);
    assert.equal(
      p.readUInt32LE(abi.INIT_OUT_FLAGS),
      abi.FUSE_ASYNC_READ | abi.FUSE_ASYNC_DIO | abi.FUSE_MAX_PAGES | abi.FUSE_ATOMIC_O_TRUNC,
    );
    assert.equal(p.readUInt16LE(abi.INIT_OUT_MAX_BACKGROUND), 65535);
    assert.equal(p.readUInt16LE(abi.INIT_OUT_CONGESTION_THRESHOLD), 49151);
    assert.equal(p.readUInt32LE(abi.INIT_OUT_MAX_WRITE), FUSE_MAX_WRITE_BYTES);
    assert.equal(p.readUInt32LE(abi.INIT_OUT_TIME_GRAN), 1);
    assert.equal(p.readUInt16LE(abi.INIT_OUT_MAX_PAGES), FUSE_MAX_WRITE_BYTES / 4096);

    r = await kernel.call(abi.FUSE_INIT, initIn(7, 22, abi.FUSE_ASYNC_READ).subarray(0, 16));
    assert.equal(r.payload.length, abi.FUSE_COMPAT_22_INIT_OUT_SIZE);
    assert.equal(r.payload.readUInt32LE(abi.INIT_OUT_MINOR), 22);
    assert.equal(r.payload.readUInt32LE(abi.INIT_OUT_FLAGS), abi.FUSE_ASYNC_READ);

    assert.equal((await kernel.call(abi.FUSE_INIT, initIn(8, 0, 0))).error, -EINVAL);
    assert.equal((await kernel.call(abi.FUSE_INIT, initIn(7, 8, 0))).error, -EINVAL);
  });

  it('unknown opcodes get ENOSYS, LOOKUP ENOENT, FORGET no reply, truncated op headers EINVAL', async () => {
    await start();
    assert.equal((await kernel.call(abi.FUSE_MKDIR, Buffer.alloc(16))).error, -ENOSYS);
    assert.equal((await kernel.call(abi.FUSE_INTERRUPT, Buffer.alloc(8))).error, -ENOSYS);
    assert.equal((await kernel.call(abi.FUSE_LOOKUP, Buffer.from('x\0'))).error, -os.constants.errno.ENOENT);
    kernel.send(abi.FUSE_FORGET, Buffer.alloc(8));
    kernel.send(abi.FUSE_BATCH_FORGET, Buffer.alloc(8));
    const r = await kernel.call(abi.FUSE_DESTROY); // the next reply is DESTROY's: FORGETs got none
    assert.equal(r.error, 0);
    assert.equal(r.payload.length, 0);
    assert.equal((await kernel.call(abi.FUSE_READ, Buffer.alloc(10))).error, -EINVAL);
    assert.equal((await kernel.call(abi.FUSE_SETATTR, Buffer.alloc(40))).error, -EINVAL);
    // WRITE whose payload is shorter than write_in.size
    assert.equal((await kernel.call(abi.FUSE_WRITE, Buffer.concat([rwIn(0n, 4096), Buffer.alloc(100)]))).error, -EINVAL);
    assert.equal(queue!.stats().served, 9);
    assert.equal(queue!.stats().inFlight, 0);
  });

  it('READ: data, short at EOF, 0 bytes at/after EOF, EINVAL above 1 MiB', async () => {
    await start();
    let r = await kernel.call(abi.FUSE_READ, rwIn(4096n, 8192));
    assert.equal(r.error, 0);
    assert.deepEqual(r.payload, Buffer.alloc(8192, 0x11));
    r = await kernel.call(abi.FUSE_READ, rwIn(BigInt(MiB - 100), 4096));
    assert.equal(r.payload.length, 100);
    r = await kernel.call(abi.FUSE_READ, rwIn(BigInt(MiB), 4096));
    assert.equal(r.error, 0);
    assert.equal(r.payload.length, 0);
    r = await kernel.call(abi.FUSE_READ, rwIn(0xffffffffffff0000n, 4096));
    assert.equal(r.payload.length, 0);
    assert.equal((await kernel.call(abi.FUSE_READ, rwIn(0n, MiB + 1))).error, -EINVAL);
  });

  it('WRITE: data lands, clamped at EOF, 0 after EOF, EINVAL on 64-bit overflow, EACCES when read-only', async () => {
    await start();
    const payload = Buffer.alloc(8192, 0x77);
    let r = await kernel.call(abi.FUSE_WRITE, Buffer.concat([rwIn(4096n, 8192), payload]));
    assert.equal(r.error, 0);
    assert.equal(r.payload.readUInt32LE(0), 8192);
    const back = Buffer.alloc(8192);
    await node.read(4096, back);
    assert.deepEqual(back, payload);
    r = await kernel.call(abi.FUSE_WRITE, Buffer.concat([rwIn(BigInt(MiB - 4096), 8192), payload]));
    assert.equal(r.payload.readUInt32LE(0), 4096);
    r = await kernel.call(abi.FUSE_WRITE, Buffer.concat([rwIn(BigInt(MiB), 8192), payload]));
    assert.equal(r.error, 0);
    assert.equal(r.payload.readUInt32LE(0), 0);
    r = await kernel.call(abi.FUSE_WRITE, Buffer.concat([rwIn(0xfffffffffffff000n, 8192), payload]));
    assert.equal(r.error, -EINVAL);
    assert.equal(node.getLength(), MiB);
    await queue!.stop();
    fs.closeSync(peerFd);
    await start({ writable: false });
    r = await kernel.call(abi.FUSE_WRITE, Buffer.concat([rwIn(0n, 8192), payload]));
    assert.equal(r.error, -EACCES);
  });

  it('SETATTR: ENOTSUP for times, EPERM for group bits, EROFS for w on read-only, EACCES for size on read-only', async () => {
    await start({ writable: false });
    assert.equal((await kernel.call(abi.FUSE_SETATTR, setattrIn(abi.FATTR_ATIME | abi.FATTR_MTIME))).error, -ENOTSUP);
    assert.equal((await kernel.call(abi.FUSE_SETATTR, setattrIn(abi.FATTR_UID))).error, -ENOTSUP);
    assert.equal((await kernel.call(abi.FUSE_SETATTR, setattrIn(abi.FATTR_MODE, { mode: 0o640 }))).error, -EPERM);
    assert.equal((await kernel.call(abi.FUSE_SETATTR, setattrIn(abi.FATTR_MODE, { mode: 0o600 }))).error, -EROFS);
    assert.equal((await kernel.call(abi.FUSE_SETATTR, setattrIn(abi.FATTR_SIZE, { size: 4096 }))).error, -EACCES);
    const r = await kernel.call(abi.FUSE_SETATTR, setattrIn(abi.FATTR_MODE | abi.FATTR_FH, { mode: 0o500 }));
    assert.equal(r.error, 0);
    assert.equal(r.payload.length, abi.ATTR_OUT_SIZE);
    assert.equal(r.payload.readUInt32LE(abi.ATTR_OUT_ATTR + abi.ATTR_MODE), abi.S_IFREG | 0o500);
    assert.equal(new Int32Array(shared)[FUSE_STATE_MODE], abi.S_IFREG | 0o500);
  });

  it('FALLOCATE: PUNCH_HOLE without KEEP_SIZE is EINVAL, other modes EOPNOTSUPP; LSEEK whence SEEK_SET EINVAL', async () => {
    await start();
    const fa = (mode: number) => {
      const b = Buffer.alloc(abi.FALLOCATE_IN_SIZE);
      b.writeBigUInt64LE(0n, abi.FALLOCATE_OFFSET);
      b.writeBigUInt64LE(4096n, abi.FALLOCATE_LENGTH);
      b.writeUInt32LE(mode, abi.FALLOCATE_MODE);
      return b;
    };
    assert.equal((await kernel.call(abi.FUSE_FALLOCATE, fa(abi.FALLOC_FL_PUNCH_HOLE))).error, -EINVAL);
    assert.equal((await kernel.call(abi.FUSE_FALLOCATE, fa(abi.FALLOC_FL_COLLAPSE_RANGE))).error, -EOPNOTSUPP);
    assert.equal((await kernel.call(abi.FUSE_FALLOCATE, fa(abi.FALLOC_FL_PUNCH_HOLE | abi.FALLOC_FL_KEEP_SIZE))).error, 0);
    const ls = Buffer.alloc(abi.LSEEK_IN_SIZE);
    ls.writeUInt32LE(0, abi.LSEEK_IN_WHENCE);
    assert.equal((await kernel.call(abi.FUSE_LSEEK, ls)).error, -EINVAL);
  });

  it('a length mismatch halts the export: halted flag set, no reply, nothing read afterwards', async () => {
    await start();
    const stderr = captureStderr();
    try {
      kernel.send(abi.FUSE_GETATTR, Buffer.alloc(16), { len: 9999 });
      assert.equal(await kernel.recv(300), null);
      assert.equal(new Int32Array(shared)[FUSE_STATE_HALTED], 1);
      kernel.send(abi.FUSE_GETATTR, Buffer.alloc(16));
      assert.equal(await kernel.recv(300), null, 'no request is served after the halt');
      assert.equal(queue!.stats().inFlight, 0);
    } finally {
      stderr.restore();
    }
    assert.match(stderr.text, /does not match request size, expected 9999 bytes, read 56 bytes.*halting the export/);
    assert.equal(stderr.text.match(/halting/g)?.length, 1, 'logged once');
  });

  it('a request shorter than the in-header halts the export', async () => {
    await start();
    const stderr = captureStderr();
    try {
      kernel.sendRaw(Buffer.alloc(20));
      assert.equal(await kernel.recv(300), null);
    } finally {
      stderr.restore();
    }
    assert.equal(new Int32Array(shared)[FUSE_STATE_HALTED], 1);
    assert.match(stderr.text, /Incomplete read from FUSE device/);
  });

  it('drainBegin waits for in-flight requests and takes no new ones until drainEnd', async () => {
    await start();
    // Hold one request in flight: make the node's read wait for us.
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const origRead = node.read.bind(node);
    node.read = async (off: number, buf: Buffer) => {
      await gate;
      return origRead(off, buf);
    };
    const u1 = kernel.send(abi.FUSE_READ, rwIn(0n, 4096));
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(queue!.stats().inFlight, 1);
    let drained = false;
    const drain = queue!.drainBegin().then(() => (drained = true));
    const u2 = kernel.send(abi.FUSE_GETATTR, Buffer.alloc(16));
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(drained, false);
    release();
    await drain;
    const r1 = await kernel.recv();
    assert.equal(r1?.unique, u1);
    assert.equal(await kernel.recv(200), null, 'GETATTR waits while drained');
    queue!.drainEnd();
    const r2 = await kernel.recv();
    assert.equal(r2?.unique, u2);
    node.read = origRead;
  });

  it('a full slot pool pauses reading; freed slots resume it', async () => {
    await start({ slots: 2 });
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const origRead = node.read.bind(node);
    node.read = async (off: number, buf: Buffer) => {
      await gate;
      return origRead(off, buf);
    };
    const uniques = [0, 1, 2, 3].map(() => kernel.send(abi.FUSE_READ, rwIn(0n, 512)));
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(queue!.stats().inFlight, 2);
    release();
    const got = [];
    for (let i = 0; i < 4; i++) got.push((await kernel.recv())?.unique);
    assert.deepEqual(got.sort(), uniques.sort());
    node.read = origRead;
  });
});

function captureStderr(): { text: string; restore(): void } {
  const orig = console.error;
  const cap = {
    text: '',
    restore() {
      console.error = orig;
    },
  };
  console.error = (...args: unknown[]) => {
    cap.text += args.join(' ') + '\n';
  };
  return cap;
}

describe('FuseChannel in a worker thread', function () {
  this.timeout(20000);
  const addon = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../build/Release/qsd_native.node');

  it('polls in the worker, calls back on the worker thread, and a worker exiting with it open ends cleanly', async () => {
    const [ours, theirs] = native.seqpacketPair();
    const worker = new Worker(
      `const { parentPort, workerData, threadId } = require('node:worker_threads');
       const addon = require(workerData.addon);
       const buf = Buffer.alloc(4096);
       const ch = new addon.FuseChannel(workerData.fd, true, () => {
         const n = ch.read(buf);
         if (n > 0) parentPort.postMessage({ n, threadId, text: buf.toString('utf8', 0, n) });
       });
       parentPort.postMessage('ready');`,
      { eval: true, workerData: { fd: ours, addon } },
    );
    const messages: any[] = [];
    const exited = new Promise<number>((resolve) => worker.on('exit', resolve));
    await new Promise<void>((resolve) =>
      worker.on('message', (m) => {
        messages.push(m);
        if (m === 'ready') resolve();
      }),
    );
    fs.writeSync(theirs, 'hello');
    await new Promise((r) => setTimeout(r, 200));
    assert.deepEqual(messages[1], { n: 5, threadId: worker.threadId, text: 'hello' });
    // The channel is still open and polling: terminating must close it in the env cleanup hook.
    await worker.terminate();
    assert.equal(typeof (await exited), 'number');
    // The worker's channel owned `ours` and closed it: the peer sees EOF.
    assert.equal(fs.readSync(theirs, Buffer.alloc(8), 0, 8, null), 0);
    fs.closeSync(theirs);
  });
});
