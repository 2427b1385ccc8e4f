// blockdev-reopen on a real graph: atomicity of a multi-node reopen, the file descriptor's access
// mode, and read-only switches reaching writes (messages as QSD 7.2 gives them, see iotest 050).
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Daemon } from '../../../../src/daemon.js';
import { blockdevReopen } from '../../../../src/qmp/commands/block-reopen.js';
import { BlockIoError } from '../../../../src/block/node.js';

describe('blockdev-reopen', () => {
  let dir: string;
  let daemon: Daemon;
  let img: string;

  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'reopen-'));
    img = path.join(dir, 't.raw');
    fs.writeFileSync(img, Buffer.alloc(65536, 0x5a));
    daemon = new Daemon();
    daemon.onExit = () => undefined;
    await daemon.graph.add({ driver: 'file', 'node-name': 'f0', filename: img });
    await daemon.graph.add({ driver: 'raw', 'node-name': 'r0', file: 'f0' });
  });

  afterEach(async () => {
    // requestExit() closes the graph and the daemon's keep-alive timer (mocha runs without --exit).
    await daemon.requestExit();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const fdWritable = (fd: number) => (parseInt(/^flags:\s*([0-7]+)/m.exec(fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'latin1'))![1]!, 8) & 3) !== 0;

  it('switches the file descriptor between O_RDONLY and O_RDWR', async () => {
    const f0 = daemon.graph.lookup('f0')!;
    assert.equal(fdWritable(f0.state.fd), true);
    await blockdevReopen(daemon, [{ driver: 'file', 'node-name': 'f0', filename: img, 'read-only': true }]);
    assert.equal(f0.readOnly, true);
    assert.equal(fdWritable(f0.state.fd), false);
    await assert.rejects(f0.write(0, Buffer.alloc(512)), (e: unknown) => e instanceof BlockIoError);
    await blockdevReopen(daemon, [{ driver: 'file', 'node-name': 'f0', filename: img }]);
    assert.equal(fdWritable(f0.state.fd), true);
    await f0.write(0, Buffer.alloc(512, 1));
    assert.equal(fs.readFileSync(img)[0], 1);
  });

  it('changes nothing when one node of the list is refused', async () => {
    const r0 = daemon.graph.lookup('r0')!;
    await assert.rejects(
      blockdevReopen(daemon, [
        { driver: 'raw', 'node-name': 'r0', file: 'f0', 'read-only': true, offset: 512 },
        { driver: 'file', 'node-name': 'f0', filename: img, locking: 'off' },
      ]),
      { message: "Cannot change the option 'locking'" },
    );
    assert.equal(r0.readOnly, false);
    assert.equal(r0.options.offset, undefined);
    assert.equal(r0.getLength(), 65536);
  });

  it('applies raw offsets and refuses a read-only node a writer needs', async () => {
    await blockdevReopen(daemon, [{ driver: 'raw', 'node-name': 'r0', file: 'f0', offset: 4096 }]);
    assert.equal(daemon.graph.lookup('r0')!.getLength(), 61440);
    const user = daemon.graph.attachBackend(daemon.graph.lookup('r0')!, "export 'e0'", ['consistent read', 'write']);
    await assert.rejects(
      blockdevReopen(daemon, [{ driver: 'raw', 'node-name': 'r0', file: 'f0', 'read-only': true }]),
      { message: "Read-only block node 'r0' cannot support read-write users" },
    );
    daemon.graph.detachBackend(daemon.graph.lookup('r0')!, user);
  });
});
