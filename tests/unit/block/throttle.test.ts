// throttle: requests through the filter wait so the group's limits hold; groups refuse bad limits.
import assert from 'node:assert/strict';
import { BlockGraph } from '../../../src/block/graph.js';
import { ThrottleGroup } from '../../../src/objects/throttle-group.js';

function group(id: string, props: Record<string, unknown>): ThrottleGroup {
  const g = new ThrottleGroup(id);
  for (const [k, v] of Object.entries(props)) g.initProperty(k, v as number);
  g.complete();
  return g;
}

describe('throttle', function () {
  let graph: BlockGraph;
  const groups: ThrottleGroup[] = [];
  beforeEach(() => {
    graph = new BlockGraph();
  });
  afterEach(async () => {
    await graph.closeAll();
    for (const g of groups.splice(0)) g.delete();
  });

  it('refuses a group that does not exist', async () => {
    await assert.rejects(graph.add({ driver: 'throttle', 'node-name': 't', file: { driver: 'null-co' }, 'throttle-group': 'none' }),
      { message: "Throttle group 'none' does not exist" });
  });

  it('holds a bps limit across reads and writes of the group', async () => {
    const g = group('tg-bps', { 'x-bps-total': 1 << 20 });
    groups.push(g);
    const t = await graph.add({ driver: 'throttle', 'node-name': 't', file: { driver: 'null-co' }, 'throttle-group': 'tg-bps' });
    assert.equal(g.inUse(), true);
    const buf = Buffer.alloc(256 << 10);
    const start = process.hrtime.bigint();
    // 1 MiB in 4 requests: the first 100 ms worth goes at once, the rest at 1 MiB/s.
    await Promise.all([t.read(0, buf), t.write(0, buf), t.read(0, buf), t.write(0, buf)]);
    const ms = Number(process.hrtime.bigint() - start) / 1e6;
    assert.ok(ms > 500 && ms < 1500, `took ${ms} ms`);
  });

  it('lets requests through at once when unlimited', async () => {
    groups.push(group('tg-free', {}));
    const t = await graph.add({ driver: 'throttle', 'node-name': 't', file: { driver: 'null-co' }, 'throttle-group': 'tg-free' });
    const start = Date.now();
    for (let i = 0; i < 100; i++) await t.read(0, Buffer.alloc(4096));
    assert.ok(Date.now() - start < 500);
  });

  it('keeps the old limits when new ones are invalid', () => {
    const g = group('tg-set', { 'x-iops-total': 50 });
    groups.push(g);
    assert.throws(() => g.setProperty('limits', { 'iops-read': 5 }),
      { message: 'bps/iops/max total values and read/write values cannot be used at the same time' });
    assert.equal((g.getProperty('limits') as Record<string, number>)['iops-total'], 50);
    assert.throws(() => g.setProperty('x-iops-total', 1), { message: 'Property cannot be set after initialization' });
    g.setProperty('limits', { 'iops-total': 0, 'bps-read': 10 });
    assert.deepEqual([g.getProperty('x-iops-total'), g.getProperty('x-bps-read')], [0, 10]);
  });
});
