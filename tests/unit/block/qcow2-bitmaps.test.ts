// qcow2 persistent dirty bitmaps (bitmaps.ts) against real qemu-img/qemu-io images: store at close,
// load at open (same bits as QEMU), in_use and inconsistent, read-only, dirty-image repair, limits.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BlockNode } from '../../../src/block/node.js';
import { closeNode, qcow2Node, sh } from './fs-file-node.js';
import { DirtyBitmap, findDirtyBitmap, nodeBitmaps } from '../../../src/block/dirty-bitmap.js';
import { qcow2CheckCanStoreBitmap, qcow2RemoveStoredBitmap, type Qcow2State } from '../../../src/block/qcow2/index.js';

let dir = '';
const p = (name: string) => join(dir, name);
let seq = 0;
const open = (f: string, readOnly = false) => qcow2Node(f, { readOnly, nodeName: `q${seq++}` });

interface ImgBitmap { name: string; granularity: number; flags: string[] }
function imgBitmaps(f: string): ImgBitmap[] | undefined {
  const info = JSON.parse(sh('qemu-img', ['info', '-U', '--output=json', f]));
  return info['format-specific']?.data?.bitmaps;
}
function checkStatus(f: string): number {
  return spawnSync('qemu-img', ['check', f], { stdio: 'ignore' }).status ?? -1;
}

describe('qcow2 persistent bitmaps', function () {
  this.timeout(30000);
  beforeEach(() => { dir = fs.mkdtempSync(join(tmpdir(), 'qcow2-bitmaps-')); });
  afterEach(() => { fs.rmSync(dir, { recursive: true, force: true }); });

  it('stores bitmaps at close (multi-cluster tables, zero clusters unallocated) and loads the same bits', async () => {
    const f = p('a.qcow2');
    sh('qemu-img', ['create', '-f', 'qcow2', '-o', 'cluster_size=512', f, '4M']);
    let n = await open(f);
    const a = new DirtyBitmap(n, 'a', 512, n.getLength());
    a.persistent = true;
    // Only the second half of the 1024 serialized bytes is dirty: the first table entry stays 0.
    a.setRange(3 * 1024 * 1024, 5000);
    a.setRange(4 * 1024 * 1024 - 1, 1);
    const b = new DirtyBitmap(n, 'b', 65536, n.getLength());
    b.persistent = true;
    b.setEnabled(false);
    b.setRange(0, 1);
    const shaA = a.sha256();
    const shaB = b.sha256();
    await closeNode(n);
    assert.deepEqual(imgBitmaps(f), [
      { flags: [], name: 'b', granularity: 65536 },
      { flags: ['auto'], name: 'a', granularity: 512 },
    ]);
    assert.equal(checkStatus(f), 0);
    n = await open(f);
    const la = findDirtyBitmap(n, 'a')!;
    const lb = findDirtyBitmap(n, 'b')!;
    assert.equal(la.sha256(), shaA);
    assert.equal(la.count(), 5632);
    assert.equal(la.recording, true);
    assert.equal(lb.sha256(), shaB);
    assert.equal(lb.recording, false);
    assert.ok(la.persistent && !la.inconsistent && !la.readonly);
    // While open read-write the image marks them in use.
    assert.deepEqual(imgBitmaps(f)!.map((x) => x.flags), [['in-use'], ['in-use', 'auto']]);
    await closeNode(n);
    assert.deepEqual(imgBitmaps(f)!.map((x) => x.flags), [[], ['auto']]);
    assert.equal(checkStatus(f), 0);
  });

  it('loads bitmaps qemu-img made and qemu-io dirtied', async () => {
    const f = p('q.qcow2');
    sh('qemu-img', ['create', '-f', 'qcow2', '-o', 'cluster_size=4096', f, '1M']);
    sh('qemu-img', ['bitmap', '--add', '-g', '4096', f, 'x']);
    sh('qemu-io', ['-f', 'qcow2', '-c', 'write 4000 5000', '-c', 'write 1044480 4096', f]);
    const n = await open(f, true);
    const x = findDirtyBitmap(n, 'x')!;
    assert.equal(x.count(), 4 * 4096);
    assert.ok(x.getBit(0) && x.getBit(1) && x.getBit(2) && !x.getBit(3) && x.getBit(255));
    assert.equal(x.readonly, true);
    await closeNode(n);
  });

  it('a bitmap left in use loads inconsistent and keeps its stored state', async () => {
    const f = p('k.qcow2');
    sh('qemu-img', ['create', '-f', 'qcow2', f, '1M']);
    sh('qemu-img', ['bitmap', '--add', f, 'k']);
    const crashed = await open(f);
    // Only the file goes away: the image keeps in_use as after a kill -9.
    const cf = crashed.children.get('file')!;
    await cf.driver.close(cf.state);
    let n = await open(f);
    const k = findDirtyBitmap(n, 'k')!;
    assert.equal(k.inconsistent, true);
    assert.equal(k.recording, false);
    assert.equal(k.count(), 0);
    await closeNode(n);
    assert.deepEqual(imgBitmaps(f), [{ flags: ['in-use', 'auto'], name: 'k', granularity: 65536 }]);
    assert.equal(checkStatus(f), 0);
    n = await open(f);
    await qcow2RemoveStoredBitmap(n.state as Qcow2State, 'k');
    findDirtyBitmap(n, 'k')!.release();
    assert.equal(nodeBitmaps(n).length, 0);
    await closeNode(n);
    assert.equal(imgBitmaps(f), undefined);
    assert.equal(checkStatus(f), 0);
  });

  it('read-only nodes leave the image byte for byte unchanged', async () => {
    const f = p('r.qcow2');
    sh('qemu-img', ['create', '-f', 'qcow2', f, '1M']);
    sh('qemu-img', ['bitmap', '--add', f, 'r']);
    const before = fs.readFileSync(f);
    const n = await open(f, true);
    const extra = new DirtyBitmap(n, 'extra', 65536, n.getLength());
    extra.persistent = true;
    await closeNode(n);
    assert.ok(fs.readFileSync(f).equals(before));
  });

  it('repairing a dirty image keeps the bitmaps\' clusters referenced', async () => {
    const f = p('d.qcow2');
    sh('qemu-img', ['create', '-f', 'qcow2', '-o', 'lazy_refcounts=on,cluster_size=512', f, '4M']);
    sh('qemu-img', ['bitmap', '--add', '-g', '512', f, 'd']);
    sh('qemu-io', ['-f', 'qcow2', '-c', 'write 0 4M', f]);
    // Set the dirty bit (incompatible feature bit 0) as a crash under lazy refcounts would.
    const fd = fs.openSync(f, 'r+');
    fs.writeSync(fd, Buffer.from([1]), 0, 1, 79);
    fs.closeSync(fd);
    const n = await open(f);
    assert.equal(findDirtyBitmap(n, 'd')!.count(), 4 * 1024 * 1024);
    await closeNode(n);
    assert.equal(checkStatus(f), 0);
    assert.deepEqual(imgBitmaps(f), [{ flags: ['auto'], name: 'd', granularity: 512 }]);
  });

  it('refuses what QEMU refuses', async () => {
    const v2 = p('v2.qcow2');
    sh('qemu-img', ['create', '-f', 'qcow2', '-o', 'compat=0.10', v2, '1M']);
    let n = await open(v2);
    assert.throws(() => qcow2CheckCanStoreBitmap(n.state as Qcow2State, 'b', 65536), { message: 'Cannot store dirty bitmaps in qcow2 v2 files' });
    await closeNode(n);
    const big = p('big.qcow2');
    sh('qemu-img', ['create', '-f', 'qcow2', big, '4T']);
    n = await open(big);
    assert.throws(() => qcow2CheckCanStoreBitmap(n.state as Qcow2State, 'b', 512), { message: 'Too much space will be occupied by the bitmap. Use larger granularity' });
    assert.throws(() => qcow2CheckCanStoreBitmap(n.state as Qcow2State, 'x'.repeat(1024), 65536), { message: 'Name length exceeds maximum (1023 characters)' });
    qcow2CheckCanStoreBitmap(n.state as Qcow2State, 'x'.repeat(1023), 1024);
    await closeNode(n);
  });
});
