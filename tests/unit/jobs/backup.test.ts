// Backup's copy bitmap: cluster counts clamped to the length, and seeding from a dirty bitmap of
// another granularity (QEMU's block-copy copy_bitmap merged from the sync bitmap).
import assert from 'node:assert/strict';
import { CopyBitmap } from '../../../src/jobs/backup.js';
import { DirtyBitmap } from '../../../src/block/dirty-bitmap.js';
import { BlockNode } from '../../../src/block/node.js';
import { nullCoDriver } from '../../../src/block/null.js';

describe('backup copy bitmap', () => {
  it('counts dirty clusters, the last one clamped to the length', () => {
    const c = new CopyBitmap(65536, 3 * 65536 + 512);
    assert.equal(c.clusters, 4);
    assert.equal(c.count(), 0);
    c.setAll();
    assert.equal(c.count(), 3 * 65536 + 512);
    c.set(1, false);
    assert.equal(c.get(1), false);
    assert.equal(c.count(), 2 * 65536 + 512);
  });

  it('takes the clusters a finer dirty bitmap touches', () => {
    const node = new BlockNode({ nodeName: 'n0', driver: nullCoDriver, readOnly: false, options: {} });
    const b = new DirtyBitmap(node, 'b', 4096, 1 << 20);
    b.setRange(70000, 10);
    b.setRange(300 * 1024, 8192);
    const c = new CopyBitmap(65536, 1 << 20);
    c.setFrom(b);
    assert.deepEqual([...Array(16).keys()].filter((i) => c.get(i)), [1, 4]);
    assert.equal(c.count(), 2 * 65536);
    b.release();
  });
});
