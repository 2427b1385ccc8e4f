// Mirror job over real raw files: the copy, writes while ready mirrored through the unnamed dirty
// bitmap, complete (target takes the source's place), soft and hard cancel, sync=none, the default
// granularity, and DirtyBitmap.resetRange keeping neighbouring bits.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { BlockGraph } from '../../../src/block/graph.js';
import type { BlockNode } from '../../../src/block/node.js';
import { DirtyBitmap, nodeBitmaps } from '../../../src/block/dirty-bitmap.js';
import { ExportManager } from '../../../src/exports/manager.js';
import { BlockJob } from '../../../src/jobs/block-job.js';
import { JobManager } from '../../../src/jobs/job.js';
import { mirrorGranularity, setupMirror, type MirrorSync } from '../../../src/jobs/mirror.js';

const M = 1 << 20;
const tick = (ms = 5) => new Promise((r) => setTimeout(r, ms));

describe('mirror job', function () {
  this.timeout(20000);
  let dir: string;
  let graph: BlockGraph;
  let events: string[];
  let jobs: JobManager;
  let src: BlockNode;
  let tgt: BlockNode;

  before(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qsd-mirror-'));
  });
  after(() => fs.rmSync(dir, { recursive: true, force: true }));
  beforeEach(async () => {
    fs.writeFileSync(path.join(dir, 'src'), Buffer.alloc(4 * M, 0x11));
    fs.writeFileSync(path.join(dir, 'tgt'), Buffer.alloc(4 * M, 0));
    graph = new BlockGraph();
    src = await graph.add({ driver: 'raw', 'node-name': 'src', file: { driver: 'file', filename: path.join(dir, 'src') } });
    tgt = await graph.add({ driver: 'raw', 'node-name': 'tgt', file: { driver: 'file', filename: path.join(dir, 'tgt') } });
    events = [];
    jobs = new JobManager((name, data) => events.push(name === 'JOB_STATUS_CHANGE' ? String(data.status) : name));
  });
  afterEach(() => graph.closeAll());

  function start(sync: MirrorSync, opts: { granularity?: number; speed?: number } = {}) {
    const exports = new ExportManager({ graph, iothread: () => undefined, emitEvent: () => undefined });
    const job = jobs.register('m', (id) => new BlockJob(id, 'mirror', jobs, { speed: 0, autoFinalize: true, autoDismiss: true }));
    job.setSpeed(opts.speed ?? 0);
    const hooks = setupMirror({ graph, exports }, job, {
      source: src, target: tgt, sync, granularity: opts.granularity ?? 0, bufSize: 0, zeroTarget: sync === 'full',
    });
    return { job, done: job.start(hooks) };
  }

  async function untilReady(job: BlockJob): Promise<void> {
    for (let i = 0; i < 400 && job.status !== 'ready'; i++) await tick();
    assert.equal(job.status, 'ready');
  }

  const fileBytes = (name: string, off: number, n: number) => fs.readFileSync(path.join(dir, name)).subarray(off, off + n);

  it('copies, mirrors writes made while ready, and on complete the target takes the source name', async () => {
    const { job, done } = start('full');
    // The bitmap records from the start, unnamed and not busy (QEMU lists it so).
    const bm = nodeBitmaps(src);
    assert.equal(bm.length, 1);
    assert.equal(bm[0]!.name, undefined);
    await untilReady(job);
    assert.deepEqual(events, ['created', 'running', 'ready', 'BLOCK_JOB_READY']);
    assert.equal(job.totalProgress, 4 * M);
    assert.ok(fileBytes('tgt', 0, 4 * M).every((b) => b === 0x11));
    await src.write(M, Buffer.alloc(4096, 0x22));
    for (let i = 0; i < 100 && job.totalProgress === 4 * M; i++) await tick(10);
    assert.equal(job.totalProgress, 4 * M + 65536, 'one granule re-dirtied');
    await src.write(2 * M, Buffer.alloc(512, 0x33));
    job.complete();
    await done;
    assert.deepEqual(events.slice(4), ['waiting', 'pending', 'BLOCK_JOB_COMPLETED', 'concluded', 'null']);
    assert.ok(fileBytes('tgt', M, 4096).every((b) => b === 0x22));
    assert.ok(fileBytes('tgt', 2 * M, 512).every((b) => b === 0x33), 'the write just before complete is in the target');
    // replaceNode: the object the source's users held now carries the target.
    assert.equal(src.nodeName, 'tgt');
    assert.equal(nodeBitmaps(graph.lookup('src')!).length, 0, 'the job bitmap is released');
    assert.ok(graph.isRoot(graph.lookup('src')!));
  });

  it('a soft cancel once ready completes without the switch', async () => {
    const { job, done } = start('full');
    await untilReady(job);
    job.cancel(false);
    await done;
    assert.ok(events.includes('BLOCK_JOB_COMPLETED'));
    assert.ok(!events.includes('BLOCK_JOB_CANCELLED'));
    assert.equal(src.nodeName, 'src');
    assert.equal(nodeBitmaps(src).length, 0);
    assert.ok(graph.isRoot(src) && graph.isRoot(tgt));
  });

  it('a hard cancel before ready gives BLOCK_JOB_CANCELLED and leaves the source as it was', async () => {
    const { job, done } = start('full', { speed: 1 });
    await tick(50);
    assert.equal(job.status, 'running');
    job.cancel(true);
    await done;
    assert.deepEqual(events, ['created', 'running', 'aborting', 'BLOCK_JOB_CANCELLED', 'concluded', 'null']);
    assert.equal(src.nodeName, 'src');
    assert.equal(nodeBitmaps(src).length, 0);
  });

  it('sync=none copies only writes made after the start', async () => {
    const { job, done } = start('none', { granularity: 4096 });
    await untilReady(job);
    assert.equal(job.totalProgress, 0);
    await src.write(8192, Buffer.alloc(100, 0x44));
    for (let i = 0; i < 100 && job.currentProgress === 0; i++) await tick(10);
    assert.equal(job.currentProgress, 4096);
    job.cancel(false);
    await done;
    const t = fileBytes('tgt', 0, 3 * 4096);
    assert.ok(t.subarray(0, 8192).every((b) => b === 0));
    assert.ok(t.subarray(8192, 8292).every((b) => b === 0x44));
    assert.ok(t.subarray(8292).every((b) => b === 0x11));
  });

  it('uses 64 KiB granularity without clusters', () => {
    assert.equal(mirrorGranularity(tgt), 65536);
  });

  it('DirtyBitmap.resetRange clears whole granules only in range', () => {
    const b = new DirtyBitmap(src, 'x', 512, 64 * 1024);
    b.setRange(0, 64 * 1024);
    b.resetRange(512 * 3, 512 * 40);
    assert.equal(b.count(), (128 - 40) * 512);
    assert.ok(b.getBit(2) && !b.getBit(3) && !b.getBit(42) && b.getBit(43));
    b.resetRange(0, 64 * 1024);
    assert.equal(b.count(), 0);
    b.release();
  });
});
