// The synchronous fast paths (BlockNode.tryRead/tryWrite, driver readNow/writeNow): same bytes as
// the asynchronous path, and declined wherever the asynchronous path must run (latency, O_DIRECT,
// FUA, unaligned writes on ext4, watched writes, out-of-range requests).
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { BlockNode } from '../../../src/block/node.js';
import { findBlockDriver } from '../../../src/block/registry.js';
import { DirtyBitmap } from '../../../src/block/dirty-bitmap.js';

let seq = 0;
async function openNode(driverName: string, options: Record<string, any>, file?: BlockNode): Promise<BlockNode> {
  const driver = findBlockDriver(driverName)!;
  const nodeName = `fp${seq++}`;
  const node = new BlockNode({ nodeName, driver, readOnly: false, options: { driver: driverName, 'node-name': nodeName, ...options } });
  if (file) node.children.set('file', file);
  node.state = await driver.open(node, options);
  return node;
}

async function closeNode(node: BlockNode): Promise<void> {
  await node.driver.close(node.state);
}

function pattern(len: number, seed: number): Buffer {
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i++) b[i] = (i * 31 + seed) & 0xff;
  return b;
}

describe('synchronous fast paths', () => {
  let dir: string;
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qsd-fastpath-'));
  });
  afterEach(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('null-co completes at once without latency-ns, and declines with it', async () => {
    const quick = await openNode('null-co', { size: 1 << 20, 'read-zeroes': true });
    const buf = Buffer.alloc(4096, 0xaa);
    assert.equal(quick.tryRead(0, buf), true);
    assert.ok(buf.every((b) => b === 0), 'read-zeroes fills the buffer');
    assert.equal(quick.tryWrite(4096, buf, {}), true);
    // Beyond the end: declined, the asynchronous path decides (zero fill / growth rules).
    assert.equal(quick.tryRead((1 << 20) - 512, buf), false);
    const slow = await openNode('null-co', { size: 1 << 20, 'latency-ns': 1000 });
    assert.equal(slow.tryRead(0, buf), false);
    assert.equal(slow.tryWrite(0, buf, {}), false);
  });

  it('file (buffered, io_uring): inline writes and reads see the same bytes as the ring path', async () => {
    const img = path.join(dir, 'img');
    fs.writeFileSync(img, pattern(1 << 20, 1));
    const file = await openNode('file', { filename: img });
    const raw = await openNode('raw', { offset: 65536 }, file);
    const data = pattern(8192, 7);
    // Page-aligned whole pages: done inline on any file system (RWF_NOWAIT, or a plain pwrite on ext4).
    assert.equal(raw.tryWrite(4096, data, {}), true);
    const back = Buffer.alloc(8192);
    await raw.read(4096, back);
    assert.deepEqual(back, data);
    assert.deepEqual(fs.readFileSync(img).subarray(65536 + 4096, 65536 + 4096 + 8192), data);
    // The page cache holds the file now: an inline read gets it (ext4 offers RWF_NOWAIT reads).
    const inline = Buffer.alloc(8192);
    if (raw.tryRead(4096, inline)) assert.deepEqual(inline, data);
    // FUA must reach the disk: declined, write() flushes.
    assert.equal(raw.tryWrite(0, data, { fua: true }), false);
    await closeNode(raw);
    await closeNode(file);
  });

  it('file on ext4 declines unaligned inline writes (a partial page may need a read first)', async function () {
    const img = path.join(dir, 'img');
    fs.writeFileSync(img, pattern(1 << 20, 2));
    const file = await openNode('file', { filename: img });
    const probe = Buffer.alloc(4096);
    const took = file.tryWrite(0, probe, {});
    assert.equal(took, true);
    // Whether the file system refused RWF_NOWAIT writes (ext4) decides what an unaligned write does.
    const refused = (file.state as { nowaitWriteRefused: boolean }).nowaitWriteRefused;
    const odd = pattern(1000, 3);
    const inlined = file.tryWrite(100, odd, {});
    if (refused) assert.equal(inlined, false);
    if (!inlined) await file.write(100, odd);
    assert.deepEqual(fs.readFileSync(img).subarray(100, 1100), odd);
    await closeNode(file);
  });

  it('file with cache.direct=on and aio=threads never takes the fast path', async () => {
    const img = path.join(dir, 'img');
    fs.writeFileSync(img, pattern(1 << 20, 4));
    const direct = await openNode('file', { filename: img, cache: { direct: true } });
    const buf = Buffer.alloc(4096);
    assert.equal(direct.tryRead(0, buf), false);
    assert.equal(direct.tryWrite(0, buf, {}), false);
    await closeNode(direct);
    const threads = await openNode('file', { filename: img, aio: 'threads' });
    assert.equal(threads.tryRead(0, buf), false);
    assert.equal(threads.tryWrite(0, buf, {}), false);
    await closeNode(threads);
  });

  it('writes watched by an enabled dirty bitmap go the asynchronous way and are recorded', async () => {
    const node = await openNode('null-co', { size: 1 << 20 });
    const bitmap = new DirtyBitmap(node, 'b', 65536, node.getLength());
    const buf = Buffer.alloc(4096);
    assert.equal(node.tryWrite(0, buf, {}), false);
    await node.write(0, buf);
    assert.equal(bitmap.count(), 65536);
    bitmap.setEnabled(false);
    assert.equal(node.tryWrite(65536, buf, {}), true);
    assert.equal(bitmap.count(), 65536);
  });

  it('qcow2: in-place writes and mapped reads inside one cluster, never allocations', async () => {
    const img = path.join(dir, 'img.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', img, '4M']);
    // Cluster 0 holds data, cluster 1 reads as zero (a zero cluster), the rest is unallocated.
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 64k', '-c', 'write -z 64k 64k', img]);
    const file = await openNode('file', { filename: img });
    const q = await openNode('qcow2', { backing: null }, file);
    const buf = Buffer.alloc(4096);
    await q.read(0, buf); // loads the L2 table into the cache
    buf.fill(0xee);
    assert.equal(q.tryRead(8192, buf), true);
    assert.ok(buf.every((b) => b === 0x11));
    buf.fill(0xee);
    assert.equal(q.tryRead(65536 + 4096, buf), true);
    assert.ok(buf.every((b) => b === 0));
    // A read across a cluster boundary and a write into an unallocated cluster go the async way.
    assert.equal(q.tryRead(65536 - 512, buf), false);
    assert.equal(q.tryWrite(3 << 20, buf, {}), false);
    const data = pattern(4096, 9);
    assert.equal(q.tryWrite(12288, data, {}), true);
    await q.flush();
    await closeNode(q);
    await closeNode(file);
    const out = execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0x11 0 12k', '-c', 'read -P 0x11 16k 48k', img], { encoding: 'utf8' });
    assert.doesNotMatch(out, /Pattern verification failed/);
    const raw = path.join(dir, 'out.raw');
    execFileSync('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, raw]);
    const back = fs.readFileSync(raw).subarray(12288, 12288 + 4096);
    assert.deepEqual(back, data);
  });

  it('an I/O error on the inline path is thrown like the ring reports it', async () => {
    const img = path.join(dir, 'img');
    fs.writeFileSync(img, pattern(1 << 20, 5));
    const file = await openNode('file', { filename: img });
    assert.equal(file.tryWrite(0, Buffer.alloc(4096), {}), true);
    // A read-only fd under the node: the inline pwrite fails with EBADF.
    const state = file.state as { fd: number; nowaitWriteRefused: boolean };
    const rw = state.fd;
    state.fd = fs.openSync(img, 'r');
    try {
      if (state.nowaitWriteRefused) {
        // ext4: a plain inline pwrite, whose error is the request's.
        assert.throws(() => file.tryWrite(0, Buffer.alloc(4096), {}), (err: any) => err.errno === os.constants.errno.EBADF);
      } else {
        // RWF_NOWAIT file systems: any failure is left to the ring, which reports it.
        assert.equal(file.tryWrite(0, Buffer.alloc(4096), {}), false);
      }
      await assert.rejects(file.write(0, Buffer.alloc(4096)), (err: any) => err.errno === os.constants.errno.EBADF);
    } finally {
      fs.closeSync(state.fd);
      state.fd = rw;
    }
    await closeNode(file);
  });
});
