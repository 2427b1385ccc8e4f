// Dirty bitmaps: QEMU's HBitmap bytes (sha256 values taken from qemu-storage-daemon 7.2), write
// tracking through BlockNode, replicas in a worker thread, the write threshold and resizes.
import assert from 'node:assert/strict';
import { Worker } from 'node:worker_threads';
import { BlockNode } from '../../../src/block/node.js';
import { findBlockDriver } from '../../../src/block/registry.js';
import {
  DirtyBitmap, describeTracking, findDirtyBitmap, nodeTracking, setWriteThresholdListener,
} from '../../../src/block/dirty-bitmap.js';

const tsxApi = new URL('../../../node_modules/tsx/dist/esm/api/index.mjs', import.meta.url).href;
const nodeUrl = new URL('../../../src/block/node.ts', import.meta.url).href;
const registryUrl = new URL('../../../src/block/registry.ts', import.meta.url).href;

let seq = 0;
async function nullNode(size: number, discard = 'unmap'): Promise<BlockNode> {
  const driver = findBlockDriver('null-co')!;
  const options = { driver: 'null-co', 'node-name': `n${seq}`, size, discard };
  const node = new BlockNode({ nodeName: `n${seq++}`, driver, readOnly: false, options });
  node.state = await driver.open(node, options);
  return node;
}

describe('dirty bitmaps', () => {
  it('hashes empty bitmaps as QEMU 7.2 does', async () => {
    const node = await nullNode(1 << 20);
    assert.equal(new DirtyBitmap(node, 'a', 65536, node.getLength()).sha256(), 'af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc');
    assert.equal(new DirtyBitmap(node, 'b', 4096, node.getLength()).sha256(), '66687aadf862bd776c8fc18b8e9f8e20089714856ee233b3902a591d0d5f2925');
    assert.equal(new DirtyBitmap(node, 'c', 512, node.getLength()).sha256(), '5341e6b2646979a70e57653007a1f310169421ec9bdd9f1a5648f75ade005af1');
    // Newest first, like QEMU's list.
    assert.deepEqual(nodeTracking(node).bitmaps.map((b) => b.name), ['c', 'b', 'a']);
  });

  it('records writes, zero writes and discards at each granularity (QEMU 7.2 sha256 and counts)', async () => {
    const node = await nullNode(4 << 20);
    const b64 = new DirtyBitmap(node, 'b64', 65536, node.getLength());
    const b512 = new DirtyBitmap(node, 'b512', 512, node.getLength());
    const off = new DirtyBitmap(node, 'off', 65536, node.getLength());
    off.setEnabled(false);
    await node.write(0, Buffer.alloc(1));
    await node.write(65536, Buffer.alloc(512));
    await node.write(1000000, Buffer.alloc(100000));
    await node.write(1048576, Buffer.alloc(4096));
    await node.writeZeroes(2 << 20, 192 << 10);
    await node.discard(3 << 20, 64 << 10);
    await node.write(4193792, Buffer.alloc(512));
    assert.equal(b512.count(), 364032);
    assert.equal(b64.count(), 589824);
    assert.equal(b512.sha256(), '54514a8412479b8d1b0241d3163ea4f4c35cf76933b314adc513d56c034644cd');
    assert.equal(b64.sha256(), '47a4ada35b00ea38092cc6477e915227e742814f12f013eb76ec8ce28ad10592');
    assert.equal(off.count(), 0);
    b64.clear();
    await node.write(131072, Buffer.alloc(1));
    assert.equal(b64.sha256(), 'f0a0278e4372459cca6159cd5e71cfee638302a7b9ca9b05c34181ac0a65ac5d');
  });

  it('discards are not tracked unless the node allows unmap', async () => {
    const node = await nullNode(1 << 20, 'ignore');
    const b = new DirtyBitmap(node, 'b', 65536, node.getLength());
    await node.discard(0, 65536);
    assert.equal(b.count(), 0);
  });

  it('finds runs for NBD block status and merges across granularities', async () => {
    const node = await nullNode(1 << 20);
    const fine = new DirtyBitmap(node, 'fine', 512, node.getLength());
    fine.setRange(1000, 10);
    fine.setRange(40 * 1024, 100 * 1024);
    assert.deepEqual(fine.runEnd(0, 1 << 20), { dirty: false, end: 512 });
    assert.deepEqual(fine.runEnd(512, 1 << 20), { dirty: true, end: 1024 });
    assert.deepEqual(fine.runEnd(41 * 1024, 100 * 1024), { dirty: true, end: 100 * 1024 });
    const coarse = new DirtyBitmap(node, 'coarse', 65536, node.getLength());
    coarse.mergeFrom(fine);
    assert.equal(coarse.count(), 3 * 65536);
    assert.ok(findDirtyBitmap(node, 'coarse') === coarse);
    coarse.release();
    assert.equal(findDirtyBitmap(node, 'coarse'), undefined);
  });

  it('follows the node when it is resized, dropping bits past a shrunk end', async () => {
    const node = await nullNode(1 << 20);
    const b = new DirtyBitmap(node, 'b', 4096, node.getLength());
    b.setRange(0, 1 << 20);
    b.resize(2 << 20);
    assert.equal(b.count(), 1 << 20);
    b.setRange(0, 2 << 20);
    b.resize(5000);
    assert.equal(b.bits, 2);
    assert.equal(b.count(), 8192);
    b.resize(1 << 20);
    assert.equal(b.count(), 8192);
  });

  it('fires the write threshold once, with the amount past it', async () => {
    const node = await nullNode(1 << 20);
    const seen: unknown[] = [];
    setWriteThresholdListener((d) => seen.push(d));
    nodeTracking(node).setWriteThreshold(4096);
    await node.write(0, Buffer.alloc(4096));
    assert.equal(seen.length, 0);
    await node.write(4000, Buffer.alloc(200));
    await node.write(8192, Buffer.alloc(200));
    assert.deepEqual(seen, [{ 'node-name': node.nodeName, 'amount-exceeded': 104, 'write-threshold': 4096 }]);
    assert.equal(nodeTracking(node).writeThreshold, 0);
    // With nothing to track, writes take the plain path again.
    assert.ok(nodeTracking(node).idle());
  });

  it('a replica in another thread marks the same bits and raises the threshold event', async () => {
    const node = await nullNode(1 << 20);
    const early = new DirtyBitmap(node, 'early', 65536, node.getLength());
    const tracking = describeTracking(node);
    const events: unknown[] = [];
    const gotEvent = new Promise<void>((resolve) => setWriteThresholdListener((d) => { events.push(d); resolve(); }));
    nodeTracking(node).setWriteThreshold(300000);
    const code = `
      const { parentPort, workerData } = require('node:worker_threads');
      (async () => {
        (await import(workerData.tsxApi)).register();
        const { BlockNode } = await import(workerData.nodeUrl);
        const { findBlockDriver } = await import(workerData.registryUrl);
        const driver = findBlockDriver('null-co');
        const options = { driver: 'null-co', size: 1 << 20 };
        const node = new BlockNode({ nodeName: workerData.name, driver, readOnly: false, options, isReplica: true, tracking: workerData.tracking });
        node.state = await driver.open(node, options);
        parentPort.once('message', async () => {
          await node.write(0, Buffer.alloc(1));
          await node.write(300000, Buffer.alloc(70000));
          parentPort.postMessage('done');
        });
        parentPort.postMessage('ready');
      })();`;
    const w = new Worker(code, { eval: true, workerData: { tsxApi, nodeUrl, registryUrl, tracking, name: node.nodeName } });
    try {
      await new Promise((resolve) => w.once('message', resolve));
      // Added after the replica exists: the replica still sees it.
      const late = new DirtyBitmap(node, 'late', 4096, node.getLength());
      w.postMessage('go');
      await new Promise((resolve) => w.once('message', resolve));
      assert.equal(early.count(), 65536 * 3);
      assert.equal(late.count(), 4096 * 19);
      await gotEvent;
      assert.deepEqual(events, [{ 'node-name': node.nodeName, 'amount-exceeded': 70000, 'write-threshold': 300000 }]);
    } finally {
      await w.terminate();
    }
  });
});
