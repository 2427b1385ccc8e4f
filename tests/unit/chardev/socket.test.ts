// Socket chardevs with real sockets: a server's connected state and filename follow a peer, the
// socket file goes with close(); a client connects or fails with QEMU's message.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { createChardev, SocketChardev } from '../../../src/chardev/registry.js';
import type { ChardevBackend } from '../../../src/qapi/generated/types.js';

const host = { programName: 'qsd-ts' };
const until = async (pred: () => boolean) => {
  for (let i = 0; i < 200 && !pred(); i++) await new Promise((r) => setTimeout(r, 10));
  assert.ok(pred(), 'condition not reached');
};

describe('SocketChardev', () => {
  let dir: string;
  beforeEach(() => (dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qsd-chardev-'))));
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  const unixBackend = (p: string, extra: Record<string, unknown> = {}): ChardevBackend =>
    ({ type: 'socket', data: { addr: { type: 'unix', data: { path: p } }, ...extra } }) as ChardevBackend;

  it('serves a unix path: connected while a peer is there, file removed on close', async () => {
    const p = path.join(dir, 's.sock');
    const c = createChardev(host, 's', unixBackend(p), 'qmp') as SocketChardev;
    await c.open();
    assert.equal(c.filename(), `disconnected:unix:${p},server=on`);
    const peer = net.connect(p);
    await until(() => c.connected);
    assert.equal(c.filename(), `unix:${p},server=on`);
    peer.end();
    await until(() => !c.connected);
    await c.close();
    assert.equal(fs.existsSync(p), false);
  });

  it('connects as a client, and fails like QEMU when nobody listens', async () => {
    const p = path.join(dir, 'l.sock');
    const accepted: net.Socket[] = [];
    const srv = net.createServer((s) => accepted.push(s));
    await new Promise<void>((r) => srv.listen(p, () => r()));
    const c = createChardev(host, 'c', unixBackend(p, { server: false }), 'qmp') as SocketChardev;
    await c.open();
    assert.equal(c.connected, true);
    assert.equal(c.filename(), 'unix:');
    await until(() => accepted.length === 1);
    await c.close();
    await new Promise<void>((r) => srv.close(() => r()));
    const missing = createChardev(host, 'm', unixBackend(path.join(dir, 'none'), { server: false }), 'qmp');
    await assert.rejects(missing.open(), { message: `Failed to connect to '${path.join(dir, 'none')}': No such file or directory` });
  });

  it('binds a TCP port and reports the bound address', async () => {
    const c = createChardev(host, 't', { type: 'socket', data: { addr: { type: 'inet', data: { host: '127.0.0.1', port: '0' } } } }, 'qmp') as SocketChardev;
    await c.open();
    const addr = c.address() as { host: string; port: string; ipv4: boolean };
    assert.equal(addr.host, '127.0.0.1');
    assert.equal(addr.ipv4, true);
    assert.match(c.filename(), /^disconnected:tcp:127\.0\.0\.1:\d+,server=on$/);
    const peer = net.connect(Number(addr.port), '127.0.0.1');
    await until(() => c.connected);
    assert.match(c.filename(), /^tcp:127\.0\.0\.1:\d+,server=on <-> 127\.0\.0\.1:\d+$/);
    peer.destroy();
    await c.close();
    await assert.rejects(new Promise((res, rej) => net.connect(Number(addr.port), '127.0.0.1').once('connect', res).once('error', rej)));
  });
});
