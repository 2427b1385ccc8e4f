// qcow2 internal snapshots (snapshots.ts) against real qemu-img/qemu-io images: reading the table,
// COW of shared clusters (also through the synchronous fast path), create/delete and interop with
// qemu-img snapshot -l/-a and qemu-img check, for several image layouts.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { BlockNode } from '../../../src/block/node.js';
import { closeNode, qcow2Node, sh } from './fs-file-node.js';
import { qcow2SnapshotCreate, qcow2SnapshotDelete, qcow2SnapshotFind, type Qcow2State } from '../../../src/block/qcow2/index.js';

let dir = '';
const p = (name: string) => join(dir, name);
const stamp = { dateSec: 1700000000, dateNsec: 123000, vmClockNsec: 5000000001n };

/** qemu-img check's status and output (0: clean). */
function check(f: string): { status: number; out: string } {
  const r = spawnSync('qemu-img', ['check', f], { encoding: 'utf8' });
  return { status: r.status ?? -1, out: r.stdout + r.stderr };
}
/** qemu-io -c read -P pattern checks: true if every read matched. */
function readsAs(f: string, ...checks: Array<[number, number, number]>): boolean {
  const args = checks.flatMap(([pat, off, len]) => ['-c', `read -P ${pat} ${off} ${len}`]);
  const r = spawnSync('qemu-io', ['-f', 'qcow2', ...args, f], { encoding: 'utf8' });
  return r.status === 0 && !/Pattern verification failed|error/i.test(r.stdout + r.stderr);
}
function snapshotsOf(f: string): Array<{ id: string; name: string; 'vm-clock-sec': number; 'vm-clock-nsec': number; 'date-sec': number }> {
  return JSON.parse(sh('qemu-img', ['info', '-U', '--output=json', f])).snapshots ?? [];
}
const state = (n: BlockNode) => n.state as Qcow2State;

describe('qcow2 internal snapshots', function () {
  this.timeout(30000);
  beforeEach(() => { dir = fs.mkdtempSync(join(tmpdir(), 'qcow2-snap-')); });
  afterEach(() => { fs.rmSync(dir, { recursive: true, force: true }); });

  it('reads a table qemu-img wrote and shows SnapshotInfo as QEMU does', async () => {
    const f = p('a.qcow2');
    sh('qemu-img', ['create', '-f', 'qcow2', f, '1M']);
    sh('qemu-img', ['snapshot', '-c', 'first', f]);
    sh('qemu-img', ['snapshot', '-c', 'second', f]);
    const n = await qcow2Node(f, { readOnly: true });
    const info = n.driver.imageInfo!(n.state);
    const theirs = snapshotsOf(f);
    assert.deepEqual(info.snapshots!.map((s) => [s.id, s.name, s['vm-state-size'], s.icount, s['date-sec']]),
      theirs.map((s) => [s.id, s.name, 0, 0, s['date-sec']]));
    assert.equal(qcow2SnapshotFind(state(n), '2', 'first'), undefined);
    assert.equal(qcow2SnapshotFind(state(n), undefined, 'second')!.id, '2');
    await closeNode(n);
  });

  for (const layout of [
    { name: 'v3 64k', opts: 'cluster_size=65536' },
    { name: 'v2 (compat=0.10)', opts: 'compat=0.10' },
    { name: 'extended L2, 8-bit refcounts', opts: 'extended_l2=on,cluster_size=65536,refcount_bits=8' },
    { name: '4k clusters over several L2 tables', opts: 'cluster_size=4096' },
  ]) {
    it(`COW after a snapshot, delete, qemu-img snapshot -a: ${layout.name}`, async () => {
      const f = p('b.qcow2');
      sh('qemu-img', ['create', '-f', 'qcow2', '-o', layout.opts, f, '8M']);
      sh('qemu-io', ['-c', 'write -P 0x11 0 3M', f]);
      sh('qemu-io', ['-c', 'write -c -P 0x55 6M 64k', f]);
      let n = await qcow2Node(f);
      const snap = await qcow2SnapshotCreate(state(n), { name: 's1', ...stamp });
      assert.equal(snap.id, '1');
      assert.equal(snap['vm-clock-sec'], 5);
      assert.equal(snap['vm-clock-nsec'], 1);
      assert.equal(snap.icount, undefined);
      // Overwrite part of the shared data: must land in new clusters, the snapshot keeps 0x11.
      await n.write(512 * 1024, Buffer.alloc(1024 * 1024, 0x22));
      // The fast path (cached L2, one cluster) must not write in place either.
      const small = Buffer.alloc(512, 0x33);
      if (!n.driver.writeNow!(n.state, 2 * 1024 * 1024, small, {})) await n.write(2 * 1024 * 1024, small);
      await n.write(6 * 1024 * 1024, Buffer.alloc(4096, 0x66));
      await closeNode(n);
      assert.equal(check(f).status, 0, check(f).out);
      assert.deepEqual(snapshotsOf(f).map((s) => [s.id, s.name, s['date-sec'], s['vm-clock-sec'], s['vm-clock-nsec']]), [['1', 's1', 1700000000, 5, 1]]);
      const copy = p('copy.qcow2');
      fs.copyFileSync(f, copy);
      sh('qemu-img', ['snapshot', '-a', 's1', copy]);
      assert.ok(readsAs(copy, [0x11, 0, 3 * 1024 * 1024], [0x55, 6 * 1024 * 1024, 65536]));
      assert.ok(readsAs(f, [0x11, 0, 512 * 1024], [0x22, 512 * 1024, 1024 * 1024], [0x11, 1536 * 1024, 512 * 1024],
        [0x33, 2 * 1024 * 1024, 512], [0x66, 6 * 1024 * 1024, 4096], [0x55, 6 * 1024 * 1024 + 4096, 61440]));

      // A second snapshot by us, then delete the first: refcounts drop back, COPIED flags return.
      n = await qcow2Node(f);
      await qcow2SnapshotCreate(state(n), { name: 's2', ...stamp });
      const gone = await qcow2SnapshotDelete(state(n), '1', undefined);
      assert.equal(gone.name, 's1');
      await n.write(0, Buffer.alloc(4096, 0x77));
      await closeNode(n);
      assert.equal(check(f).status, 0, check(f).out);
      assert.deepEqual(snapshotsOf(f).map((s) => s.name), ['s2']);
      n = await qcow2Node(f);
      await qcow2SnapshotDelete(state(n), undefined, 's2');
      // Nothing is shared any more: an overwrite of the old data stays in place (no new cluster).
      const before = fs.statSync(f).size;
      await n.write(64 * 1024, Buffer.alloc(4096, 0x78));
      await closeNode(n);
      assert.equal(fs.statSync(f).size, before);
      const c = check(f);
      assert.equal(c.status, 0, c.out);
      assert.match(c.out, /No errors were found/);
      assert.deepEqual(snapshotsOf(f), []);
      assert.ok(readsAs(f, [0x77, 0, 4096], [0x11, 4096, 61440], [0x78, 65536, 4096]));
    });
  }

  it('deleting a snapshot qemu-img took frees its own clusters; qemu-img deletes ours cleanly', async () => {
    const f = p('c.qcow2');
    sh('qemu-img', ['create', '-f', 'qcow2', f, '4M']);
    sh('qemu-io', ['-c', 'write -P 1 0 1M', f]);
    sh('qemu-img', ['snapshot', '-c', 'old', f]);
    sh('qemu-io', ['-c', 'write -P 2 0 1M', f]);
    const n = await qcow2Node(f);
    await qcow2SnapshotCreate(state(n), { name: 'new', ...stamp });
    await qcow2SnapshotDelete(state(n), undefined, 'old');
    await closeNode(n);
    assert.equal(check(f).status, 0, check(f).out);
    sh('qemu-img', ['snapshot', '-d', 'new', f]);
    const c = check(f);
    assert.equal(c.status, 0, c.out);
    assert.match(c.out, /^16\/64 = 25\.00% allocated/m);
  });

  it('refuses a bad snapshot table at open with QEMU\'s messages', async () => {
    const f = p('e.qcow2');
    sh('qemu-img', ['create', '-f', 'qcow2', f, '1M']);
    sh('qemu-img', ['snapshot', '-c', 's', f]);
    const good = fs.readFileSync(f);
    const patched = (off: number, bytes: number[]) => {
      const b = Buffer.from(good);
      Buffer.from(bytes).copy(b, off);
      fs.writeFileSync(f, b);
    };
    patched(64, [0, 0, 0, 0, 0, 3, 0, 8]);
    await assert.rejects(qcow2Node(f, { readOnly: true }), { message: 'Snapshot table offset invalid' });
    patched(60, [0, 1, 0, 1]);
    await assert.rejects(qcow2Node(f, { readOnly: true }), { message: 'Snapshot table too large' });
  });

  it('repairs a dirty lazy-refcounts image that has snapshots', async () => {
    const f = p('d.qcow2');
    sh('qemu-img', ['create', '-f', 'qcow2', '-o', 'lazy_refcounts=on', f, '4M']);
    sh('qemu-io', ['-c', 'write -P 1 0 1M', f]);
    sh('qemu-img', ['snapshot', '-c', 's', f]);
    // Leave the image dirty: qemu-io aborts after writing with lazy refcounts.
    spawnSync('qemu-io', ['-c', 'write -P 2 1M 1M', '-c', 'abort', f], { stdio: 'ignore' });
    assert.notEqual(check(f).status, 0);
    const n = await qcow2Node(f);
    await closeNode(n);
    const c = check(f);
    assert.equal(c.status, 0, c.out);
    assert.ok(readsAs(f, [1, 0, 1024 * 1024], [2, 1024 * 1024, 1024 * 1024]));
  });
});
