// blkdebug: rules activate on their parent's debug events, match offsets and I/O types, once, set-state, align.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { BlockGraph } from '../../../src/block/graph.js';
import { BlockIoError, type BlockNode } from '../../../src/block/node.js';
import { blkdebugDriver } from '../../../src/block/blkdebug.js';

const { EIO, ENOSPC, EROFS } = os.constants.errno;

async function rejectsWith(p: Promise<unknown>, errno: number): Promise<void> {
  await assert.rejects(p, (e: any) => {
    assert.ok(e instanceof BlockIoError, `not a BlockIoError: ${e}`);
    assert.equal(e.errno, errno, e.message);
    return true;
  });
}

describe('blkdebug', function () {
  let dir: string;
  let img: string;
  let graph: BlockGraph;
  before(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qsd-blkdebug-'));
  });
  after(() => fs.rmSync(dir, { recursive: true, force: true }));
  beforeEach(() => {
    img = path.join(dir, 'img');
    fs.writeFileSync(img, Buffer.alloc(1 << 20, 0x5a));
    graph = new BlockGraph();
  });
  afterEach(() => graph.closeAll());

  /** raw (which raises read_aio/write_aio) over blkdebug over a file. */
  async function stack(extra: Record<string, unknown>): Promise<{ raw: BlockNode; dbg: BlockNode }> {
    const dbg = await graph.add({
      driver: 'blkdebug', 'node-name': 'dbg', image: { driver: 'file', filename: img }, ...extra,
    });
    const raw = await graph.add({ driver: 'raw', 'node-name': 'raw', file: 'dbg' });
    return { raw, dbg };
  }

  it('opens its image as the file child and passes data through', async () => {
    const { raw, dbg } = await stack({});
    assert.equal(dbg.file?.driver.name, 'file');
    assert.equal(raw.getLength(), 1 << 20);
    const buf = Buffer.alloc(4096);
    await raw.read(0, buf);
    assert.ok(buf.every((b) => b === 0x5a));
    await raw.write(0, Buffer.alloc(512, 1));
    await raw.flush();
    assert.equal(fs.readFileSync(img)[0], 1);
  });

  it('fails only requests covering the rule sector, after the event fired', async () => {
    const { raw, dbg } = await stack({ 'inject-error': [{ event: 'read_aio', sector: 8, errno: ENOSPC }] });
    const buf = Buffer.alloc(4096);
    // Directly on blkdebug, nothing raised read_aio yet: QEMU passes the request.
    await dbg.read(4096, buf);
    await raw.read(0, buf);
    await rejectsWith(raw.read(4096, buf), ENOSPC);
    await rejectsWith(raw.read(2048, buf), ENOSPC);
    await raw.read(8192, buf);
    // The active rule has no iotype: writes covering sector 8 fail too, as in QEMU.
    await rejectsWith(raw.write(4096, Buffer.alloc(512)), ENOSPC);
  });

  it('honours iotype, once and the default errno', async () => {
    const { raw } = await stack({ 'inject-error': [{ event: 'write_aio', iotype: 'write', once: true }] });
    const buf = Buffer.alloc(512);
    await rejectsWith(raw.write(0, buf), EIO);
    await raw.write(0, buf);
    await raw.read(0, buf);
  });

  it('flush fails on flush_to_disk only after a write', async () => {
    const { raw } = await stack({ 'inject-error': [{ event: 'flush_to_disk', errno: EROFS }] });
    await raw.flush();
    await raw.write(0, Buffer.alloc(512));
    await rejectsWith(raw.flush(), EROFS);
  });

  it('set-state gates rules by state', async () => {
    const { raw } = await stack({
      'inject-error': [{ event: 'read_aio', state: 2 }],
      'set-state': [{ event: 'write_aio', state: 1, new_state: 2 }],
    });
    const buf = Buffer.alloc(512);
    await raw.read(0, buf);
    await raw.write(0, buf);
    await rejectsWith(raw.read(0, buf), EIO);
  });

  it('align widens requests and checks its constraints', async () => {
    const { raw, dbg } = await stack({ align: 4096, 'inject-error': [{ event: 'read_aio', sector: 7 }] });
    assert.equal(dbg.requestAlignment(), 4096);
    // Byte 0..511 widens to 0..4095, which covers sector 7.
    await rejectsWith(raw.read(0, Buffer.alloc(512)), EIO);
    await assert.rejects(
      graph.add({ driver: 'blkdebug', 'node-name': 'bad', image: { driver: 'file', filename: img }, align: 3 }),
      /Cannot meet constraints with align 3/,
    );
  });

  it('unaligned writes are read-modify-written', async () => {
    const { raw } = await stack({ align: 4096 });
    await raw.write(100, Buffer.alloc(10, 7));
    const data = fs.readFileSync(img);
    assert.equal(data[99], 0x5a);
    assert.equal(data[100], 7);
    assert.equal(data[110], 0x5a);
  });

  it('replicas start from the same rules (once is per thread)', async () => {
    const { dbg } = await stack({ 'inject-error': [{ event: 'read_aio', once: true }] });
    const desc = structuredClone(blkdebugDriver.describe!(dbg.state));
    const replica = blkdebugDriver.openReplica!(dbg, desc);
    blkdebugDriver.debugEvent!(replica, 'read_aio');
    await rejectsWith(blkdebugDriver.read(replica, 0, Buffer.alloc(512)), EIO);
    await blkdebugDriver.read(replica, 0, Buffer.alloc(512));
  });
});
