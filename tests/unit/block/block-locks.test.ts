// Block claims and the shared/exclusive lock words behind O_DIRECT read-modify-write.
import assert from 'node:assert/strict';
import { claimFor, createBlockLocks, withBlockLocks } from '../../../src/block/block-locks.js';

describe('block locks', () => {
  it('claims the partial end blocks of a bounced write exclusively, the rest shared', () => {
    const claim = claimFor(100, 1000, 512, true); // blocks 0..2; 0 and 2 are partial
    assert.deepEqual(claim.stripes, [0, 1, 2]);
    assert.deepEqual(claim.exclusive, [true, false, true]);
  });

  it('claims an aligned write shared only', () => {
    const claim = claimFor(4096, 8192, 512, false);
    assert.deepEqual(claim.exclusive, [false, false, false, false, false, false, false, false, false, false, false, false, false, false, false, false]);
  });

  it('keeps a write out of a block while a bounce holds it, and lets it in afterwards', async () => {
    const words = new Int32Array(createBlockLocks());
    const order: string[] = [];
    let releaseBounce!: () => void;
    const bounce = withBlockLocks(words, claimFor(10, 20, 512, true), async () => {
      order.push('bounce start');
      await new Promise<void>((r) => (releaseBounce = r));
      order.push('bounce end');
    });
    await new Promise((r) => setImmediate(r));
    const write = withBlockLocks(words, claimFor(0, 512, 512, false), async () => {
      order.push('write');
    });
    await new Promise((r) => setImmediate(r));
    assert.deepEqual(order, ['bounce start']);
    releaseBounce();
    await Promise.all([bounce, write]);
    assert.deepEqual(order, ['bounce start', 'bounce end', 'write']);
    assert.ok(words.every((w) => w === 0), 'every lock word released');
  });

  it('lets shared holders run together', async () => {
    const words = new Int32Array(createBlockLocks());
    let inside = 0;
    let most = 0;
    await Promise.all([0, 1, 2].map(() => withBlockLocks(words, claimFor(0, 4096, 512, false), async () => {
      inside++;
      most = Math.max(most, inside);
      await new Promise((r) => setImmediate(r));
      inside--;
    })));
    assert.equal(most, 3);
  });
});
