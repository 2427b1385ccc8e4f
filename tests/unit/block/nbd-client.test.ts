// nbd block driver against real servers: qemu-nbd serving a real file, and qsd-ts's own NBD export.
import assert from 'node:assert/strict';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { BlockIoError, BlockNode } from '../../../src/block/node.js';
import { nbdDriver, nbdFilename } from '../../../src/block/nbd-client/index.js';
import { QmpError } from '../../../src/qapi/errors.js';
import * as abi from '../../../src/nbd/nbd-abi.js';

const ROOT = path.resolve(import.meta.dirname, '../../..');
const MiB = 1024 * 1024;

async function openNbd(options: Record<string, any>, nodeName = 'n0'): Promise<BlockNode> {
  const node = new BlockNode({ nodeName, driver: nbdDriver, readOnly: options['read-only'] ?? false, options: { driver: 'nbd', ...options } });
  node.state = await nbdDriver.open(node, node.options);
  return node;
}

function pattern(len: number, seed: number): Buffer {
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i++) b[i] = (i * 31 + seed * 7 + (i >> 9)) & 0xff;
  return b;
}

function waitFor(file: string, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  return new Promise((resolve, reject) => {
    const tick = () => {
      if (fs.existsSync(file)) resolve();
      else if (Date.now() > end) reject(new Error(`${file} did not appear`));
      else setTimeout(tick, 20);
    };
    tick();
  });
}

/** qemu-nbd in the foreground (a child we can kill); resolves once its socket exists. */
async function qemuNbd(dir: string, img: string, extra: string[] = []): Promise<{ proc: ChildProcess; sock: string }> {
  const sock = path.join(dir, `q${Math.random().toString(36).slice(2, 8)}.sock`);
  const proc = spawn('qemu-nbd', ['-f', 'raw', '-x', 'foo', '-e', '20', '-t', '-k', sock, ...extra, img], { stdio: 'ignore' });
  await waitFor(sock);
  return { proc, sock };
}

function stop(proc: ChildProcess | undefined): Promise<void> {
  if (!proc || proc.exitCode !== null || proc.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    proc.once('exit', () => resolve());
    proc.kill('SIGKILL');
  });
}

describe('nbd block driver', function () {
  this.timeout(30000);
  let dir: string;
  let img: string;
  const procs: ChildProcess[] = [];
  const nodes: BlockNode[] = [];

  before(function () {
    try {
      execFileSync('qemu-nbd', ['--version'], { stdio: 'ignore' });
    } catch {
      this.skip();
    }
  });
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(tmpdir(), 'nbd-client-'));
    img = path.join(dir, 'a.img');
    const fd = fs.openSync(img, 'w');
    fs.ftruncateSync(fd, 8 * MiB);
    fs.writeSync(fd, pattern(64 * 1024, 1), 0, 64 * 1024, 0);
    fs.closeSync(fd);
  });
  afterEach(async () => {
    for (const n of nodes.splice(0)) await nbdDriver.close(n.state);
    for (const p of procs.splice(0)) await stop(p);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  async function serve(extra: string[] = []): Promise<string> {
    const { proc, sock } = await qemuNbd(dir, img, extra);
    procs.push(proc);
    return sock;
  }
  async function node(options: Record<string, any>): Promise<BlockNode> {
    const n = await openNbd(options);
    nodes.push(n);
    return n;
  }

  it('reads, writes, zeroes, discards and flushes the file qemu-nbd serves', async () => {
    const sock = await serve(['--discard=unmap']);
    const n = await node({ server: { type: 'unix', path: sock }, export: 'foo', discard: 'unmap' });
    assert.equal(n.getLength(), 8 * MiB);
    const buf = Buffer.alloc(64 * 1024);
    await n.read(0, buf);
    assert.deepEqual(buf, pattern(64 * 1024, 1));
    await n.write(MiB + 123, pattern(5000, 2), { fua: true });
    await n.writeZeroes(100, 1000);
    await n.writeZeroes(4 * MiB, MiB, { mayUnmap: true });
    await n.discard(6 * MiB, MiB);
    await n.flush();
    const file = fs.readFileSync(img);
    assert.deepEqual(file.subarray(MiB + 123, MiB + 5123), pattern(5000, 2));
    assert.ok(file.subarray(100, 1100).every((b) => b === 0));
    assert.deepEqual(file.subarray(0, 100), pattern(64 * 1024, 1).subarray(0, 100));
    // Block status from base:allocation: the pattern is data, the unwritten tail is a zero hole.
    const st0 = await n.blockStatus(0, 8 * MiB);
    assert.equal(st0.data, true);
    assert.ok(st0.pnum >= 4096 && st0.pnum <= 64 * 1024, `pnum ${st0.pnum}`);
    const st1 = await n.blockStatus(7 * MiB, MiB);
    assert.deepEqual([st1.data, st1.zero, st1.pnum], [false, true, MiB]);
  });

  it('keeps many requests in flight on one connection and splits large ones', async () => {
    const sock = await serve();
    const n = await node({ server: { type: 'unix', path: sock }, export: 'foo' });
    const writes = [];
    for (let i = 0; i < 64; i++) writes.push(n.write(i * 65536, pattern(65536, i + 10)));
    await Promise.all(writes);
    const reads = [];
    const bufs = Array.from({ length: 64 }, () => Buffer.alloc(65536));
    for (let i = 63; i >= 0; i--) reads.push(n.read(i * 65536, bufs[i]!));
    await Promise.all(reads);
    for (let i = 0; i < 64; i++) assert.deepEqual(bufs[i], pattern(65536, i + 10), `chunk ${i}`);
    // Beyond NBD_MAX_BUFFER_SIZE a request is split (qemu-nbd refuses bigger payloads).
    fs.truncateSync(img, 40 * MiB);
    await nbdDriver.close(n.state);
    nodes.length = 0;
    for (const p of procs.splice(0)) await stop(p);
    const sock2 = await serve();
    const big = await node({ server: { type: 'unix', path: sock2 }, export: 'foo' });
    const data = pattern(36 * MiB, 3);
    await big.write(2 * MiB, data);
    const back = Buffer.alloc(36 * MiB);
    await big.read(2 * MiB, back);
    assert.ok(back.equals(data));
  });

  it('refuses as QEMU 7.2 does', async () => {
    const sock = await serve(['-r']);
    const err = async (opts: Record<string, any>) => {
      try {
        await node(opts);
      } catch (e) {
        assert.ok(e instanceof QmpError);
        return e.message;
      }
      return 'opened';
    };
    const unix = { type: 'unix', path: sock };
    assert.equal(await err({ server: unix, export: 'bar' }), 'Requested export not available');
    assert.equal(await err({ server: { type: 'unix', path: path.join(dir, 'no.sock') } }),
      `Failed to connect to '${path.join(dir, 'no.sock')}': No such file or directory`);
    assert.equal(await err({ server: { type: 'inet', host: '127.0.0.1', port: '1' } }), "Failed to connect to '127.0.0.1:1': Connection refused");
    assert.equal(await err({ server: unix, export: 'foo', 'tls-creds': 't' }), "No TLS credentials with id 't'");
    assert.equal(await err({ server: unix, export: 'foo' }), 'Could not open image: Permission denied');
    assert.equal(await err({ server: unix, export: 'foo', 'x-dirty-bitmap': 'qemu:dirty-bitmap:x', 'read-only': true }),
      'Could not open image: Invalid argument');
    const ro = await node({ server: unix, export: 'foo', 'auto-read-only': true });
    assert.equal(ro.readOnly, true);
    await assert.rejects(ro.write(0, Buffer.alloc(512)), (e: unknown) => e instanceof BlockIoError && e.errno === 1);
  });

  it('fails requests with EIO when the server dies mid-request, and reconnects later', async () => {
    const sock = await serve();
    const n = await node({ server: { type: 'unix', path: sock }, export: 'foo' });
    const other = await node({ server: { type: 'unix', path: sock }, export: 'foo' });
    // A SIGSTOPped server holds the requests; SIGKILL then drops the connection under them.
    const proc = procs[0]!;
    proc.kill('SIGSTOP');
    const inflight = Array.from({ length: 8 }, (_, i) => n.read(i * 4096, Buffer.alloc(4096)).then(() => 'ok', (e) => e));
    await new Promise((r) => setTimeout(r, 100));
    await stop(proc);
    procs.length = 0;
    for (const r of await Promise.all(inflight)) assert.ok(r instanceof BlockIoError && r.errno === 5, String(r));
    await assert.rejects(n.read(0, Buffer.alloc(512)), (e: unknown) => e instanceof BlockIoError && e.errno === 5);
    // A new server on the same socket: the node connects again on a later request.
    fs.rmSync(sock, { force: true });
    const again = spawn('qemu-nbd', ['-f', 'raw', '-x', 'foo', '-e', '20', '-t', '-k', sock, img], { stdio: 'ignore' });
    procs.push(again);
    await waitFor(sock);
    let ok = false;
    for (let i = 0; i < 50 && !ok; i++) {
      ok = await n.read(0, Buffer.alloc(512)).then(() => true, () => false);
      if (!ok) await new Promise((r) => setTimeout(r, 50));
    }
    assert.ok(ok, 'reconnected');
    assert.ok(other.getLength() > 0);
  });

  it('serves from qsd-ts\'s own NBD export (structured replies, holes, block status)', async function () {
    if (!fs.existsSync(path.join(ROOT, 'dist/main.js'))) this.skip();
    const sock = path.join(dir, 'qsd.sock');
    const proc = spawn(path.join(ROOT, 'bin/qsd-ts'), [
      '--blockdev', `file,node-name=f0,filename=${img}`, '--blockdev', 'raw,node-name=r0,file=f0',
      '--nbd-server', `addr.type=unix,addr.path=${sock}`, '--export', 'nbd,id=e0,node-name=r0,name=r0,writable=on',
    ], { stdio: 'ignore' });
    procs.push(proc);
    await waitFor(sock);
    const n = await node({ server: { type: 'unix', path: sock }, export: 'r0' });
    const buf = Buffer.alloc(128 * 1024, 0xee);
    await n.read(0, buf);
    assert.deepEqual(buf.subarray(0, 65536), pattern(65536, 1));
    assert.ok(buf.subarray(65536).every((b) => b === 0), 'the hole after the pattern reads as zeroes');
    await n.write(3 * MiB, pattern(10000, 4));
    const back = Buffer.alloc(10000);
    await n.read(3 * MiB, back);
    assert.deepEqual(back, pattern(10000, 4));
    const st = await n.blockStatus(5 * MiB, MiB);
    assert.deepEqual([st.data, st.zero], [false, true]);
  });

  /**
   * A minimal fixed-newstyle server without structured replies (no such server is installed
   * here): with `minBlock` it knows NBD_OPT_GO and refuses unaligned requests with EINVAL, as the
   * protocol allows; without, it knows only NBD_OPT_EXPORT_NAME.
   */
  async function simpleServer(disk: Buffer, minBlock?: number): Promise<{ sock: string; close: () => Promise<void>; unaligned: () => number }> {
    const sock = path.join(dir, 'simple.sock');
    let unaligned = 0;
    const flags = abi.NBD_FLAG_HAS_FLAGS | abi.NBD_FLAG_SEND_FLUSH;
    const optReply = (opt: number, type: number, data = Buffer.alloc(0)) => {
      const r = Buffer.alloc(20);
      r.writeBigUInt64BE(abi.NBD_REP_MAGIC, 0);
      r.writeUInt32BE(opt, 8);
      r.writeUInt32BE(type, 12);
      r.writeUInt32BE(data.length, 16);
      return Buffer.concat([r, data]);
    };
    const server = net.createServer((c) => {
      let buf = Buffer.alloc(0);
      let phase: 'flags' | 'opts' | 'io' = 'flags';
      const hello = Buffer.alloc(18);
      hello.writeBigUInt64BE(abi.NBD_INIT_MAGIC, 0);
      hello.writeBigUInt64BE(abi.NBD_OPTS_MAGIC, 8);
      hello.writeUInt16BE(abi.NBD_FLAG_FIXED_NEWSTYLE | abi.NBD_FLAG_NO_ZEROES, 16);
      c.write(hello);
      c.on('data', (d) => {
        buf = Buffer.concat([buf, d]);
        for (;;) {
          if (phase === 'flags') {
            if (buf.length < 4) return;
            buf = buf.subarray(4);
            phase = 'opts';
          } else if (phase === 'opts') {
            if (buf.length < 16) return;
            const opt = buf.readUInt32BE(8);
            const len = buf.readUInt32BE(12);
            if (buf.length < 16 + len) return;
            buf = buf.subarray(16 + len);
            if (opt === abi.NBD_OPT_EXPORT_NAME) {
              const r = Buffer.alloc(10);
              r.writeBigUInt64BE(BigInt(disk.length), 0);
              r.writeUInt16BE(flags, 8);
              c.write(r);
              phase = 'io';
            } else if (opt === abi.NBD_OPT_GO && minBlock) {
              const exp = Buffer.alloc(12);
              exp.writeUInt16BE(abi.NBD_INFO_EXPORT, 0);
              exp.writeBigUInt64BE(BigInt(disk.length), 2);
              exp.writeUInt16BE(flags, 10);
              const bs = Buffer.alloc(14);
              bs.writeUInt16BE(abi.NBD_INFO_BLOCK_SIZE, 0);
              bs.writeUInt32BE(minBlock, 2);
              bs.writeUInt32BE(4096, 6);
              bs.writeUInt32BE(65536, 10);
              c.write(Buffer.concat([optReply(opt, abi.NBD_REP_INFO, exp), optReply(opt, abi.NBD_REP_INFO, bs), optReply(opt, abi.NBD_REP_ACK)]));
              phase = 'io';
            } else {
              c.write(optReply(opt, abi.NBD_REP_ERR_UNSUP));
            }
          } else {
            if (buf.length < 28) return;
            const type = buf.readUInt16BE(6);
            const off = Number(buf.readBigUInt64BE(16));
            const len = buf.readUInt32BE(24);
            const payload = type === abi.NBD_CMD_WRITE ? len : 0;
            if (buf.length < 28 + payload) return;
            const reply = Buffer.alloc(16);
            reply.writeUInt32BE(abi.NBD_SIMPLE_REPLY_MAGIC, 0);
            buf.copy(reply, 8, 8, 16);
            if (type === abi.NBD_CMD_DISC) return void c.end();
            const bad = minBlock && (type === abi.NBD_CMD_READ || type === abi.NBD_CMD_WRITE) && (off % minBlock || len % minBlock);
            if (bad) {
              unaligned++;
              reply.writeUInt32BE(abi.NBD_EINVAL, 4);
              c.write(reply);
            } else {
              if (type === abi.NBD_CMD_WRITE) buf.copy(disk, off, 28, 28 + len);
              c.write(type === abi.NBD_CMD_READ ? Buffer.concat([reply, disk.subarray(off, off + len)]) : reply);
            }
            buf = buf.subarray(28 + payload);
          }
        }
      });
    });
    await new Promise<void>((r) => server.listen(sock, r));
    return { sock, unaligned: () => unaligned, close: () => new Promise((r) => server.close(() => r())) };
  }

  it('falls back to NBD_OPT_EXPORT_NAME and simple replies with a server that lacks them', async () => {
    const disk = pattern(1 << 20, 9);
    const srv = await simpleServer(disk);
    try {
      const n = await node({ server: { type: 'unix', path: srv.sock } });
      assert.equal(n.getLength(), 1 << 20);
      const b = Buffer.alloc(4096);
      await Promise.all([n.read(4096, b), n.write(8192, Buffer.alloc(512, 0x55))]);
      assert.deepEqual(b, disk.subarray(4096, 8192));
      assert.ok(disk.subarray(8192, 8704).every((x) => x === 0x55));
      // No block status context: everything is data; no WRITE_ZEROES: the zero-buffer fallback.
      const st = await n.blockStatus(0, 1 << 20);
      assert.deepEqual([st.data, st.pnum], [true, 1 << 20]);
      await n.writeZeroes(8192, 512);
      assert.ok(disk.subarray(8192, 8704).every((x) => x === 0));
      await assert.rejects(n.writeZeroes(0, 512, { noFallback: true }), (e: unknown) => e instanceof BlockIoError && e.errno === 95);
      await nbdDriver.close(n.state);
      nodes.length = 0;
    } finally {
      await srv.close();
    }
  });

  it('honours the server\'s minimum block size (NBD_INFO_BLOCK_SIZE) with read-modify-write', async () => {
    const disk = pattern(1 << 20, 11);
    const expect = Buffer.from(disk);
    const srv = await simpleServer(disk, 512);
    try {
      const n = await node({ server: { type: 'unix', path: srv.sock } });
      assert.equal(n.requestAlignment(), 512);
      const b = Buffer.alloc(1000);
      await n.read(100, b);
      assert.deepEqual(b, expect.subarray(100, 1100));
      // Overlapping unaligned writes in flight at once must not lose each other's bytes.
      const w1 = pattern(700, 1);
      const w2 = pattern(300, 2);
      await Promise.all([n.write(1000, w1), n.write(1300, w2), n.write(70000, pattern(200000, 3))]);
      w1.copy(expect, 1000);
      w2.copy(expect, 1300);
      pattern(200000, 3).copy(expect, 70000);
      assert.ok(disk.equals(expect));
      assert.equal(srv.unaligned(), 0);
      await nbdDriver.close(n.state);
      nodes.length = 0;
    } finally {
      await srv.close();
    }
  });

  it('names the node as QEMU does', () => {
    const j = (v: unknown) => JSON.stringify(v);
    assert.equal(nbdFilename({ server: { type: 'unix', path: '/s' }, export: 'e' }, j), 'nbd+unix:///e?socket=/s');
    assert.equal(nbdFilename({ server: { type: 'unix', path: '/s' } }, j), 'nbd+unix://?socket=/s');
    assert.equal(nbdFilename({ server: { type: 'inet', host: 'h', port: '1' }, export: '' }, j), 'nbd://h:1/');
    assert.equal(nbdFilename({ server: { type: 'inet', host: 'h', port: '1' } }, j), 'nbd://h:1');
    assert.equal(nbdFilename({ server: { type: 'inet', host: 'h', port: '1', ipv4: true }, export: 'e' }, j),
      'json:{"driver":"nbd","server.type":"inet","server.host":"h","server.port":"1","server.ipv4":true,"export":"e"}');
  });
});
