// NBD server and export: real peers (qemu-img, qemu-io, qemu-nbd, nbdinfo) and QEMU's daemon as oracle.
import assert from 'node:assert/strict';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { BlockNode } from '../../../src/block/node.js';
import { fileDriver } from '../../../src/block/file.js';
import { nullCoDriver } from '../../../src/block/null.js';
import type { ExportCommon } from '../../../src/exports/export.js';
import { nbdExportDriver, nbdServerAddOptionsToExport, type NbdExport } from '../../../src/exports/nbd.js';
import { nbdServerAddress, nbdServerRunning, nbdServerStart, nbdServerStop } from '../../../src/nbd/server.js';
import * as abi from '../../../src/nbd/nbd-abi.js';

const run = promisify(execFile);
const MiB = 1024 * 1024;

async function openNode(nodeName: string, driver: typeof fileDriver | typeof nullCoDriver, options: Record<string, any>): Promise<BlockNode> {
  const node = new BlockNode({ nodeName, driver, readOnly: false, options });
  node.state = await driver.open(node, options);
  return node;
}

function common(id: string, node: BlockNode, writable: boolean): ExportCommon {
  return { id, nodeName: node.nodeName, node, writable, writethrough: false, contexts: [], multithread: false };
}

/** A tiny NBD client speaking raw bytes, for what real tools cannot send. */
class RawClient {
  readonly sock: net.Socket;
  private buf = Buffer.alloc(0);
  private waiter: (() => void) | undefined;
  closed = false;

  constructor(target: string | { port: number; host: string }) {
    this.sock = typeof target === 'string' ? net.connect(target) : net.connect(target.port, target.host);
    this.sock.on('data', (d) => {
      this.buf = Buffer.concat([this.buf, d]);
      this.waiter?.();
    });
    this.sock.on('error', () => undefined);
    this.sock.on('close', () => {
      this.closed = true;
      this.waiter?.();
    });
  }

  async read(n: number): Promise<Buffer> {
    while (this.buf.length < n) {
      if (this.closed) throw new Error('connection closed');
      await new Promise<void>((r) => { this.waiter = r; });
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }

  waitClosed(ms: number): Promise<boolean> {
    if (this.closed) return Promise.resolve(true);
    return new Promise((resolve) => {
      const t = setTimeout(() => resolve(false), ms);
      this.sock.once('close', () => { clearTimeout(t); resolve(true); });
    });
  }

  write(b: Buffer): void {
    this.sock.write(b);
  }

  option(opt: number, data: Buffer = Buffer.alloc(0)): void {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(abi.NBD_OPTS_MAGIC, 0);
    h.writeUInt32BE(opt, 8);
    h.writeUInt32BE(data.length, 12);
    this.write(Buffer.concat([h, data]));
  }

  async optReply(): Promise<{ opt: number; type: number; data: Buffer }> {
    const h = await this.read(20);
    assert.equal(h.readBigUInt64BE(0), abi.NBD_REP_MAGIC);
    const len = h.readUInt32BE(16);
    return { opt: h.readUInt32BE(8), type: h.readUInt32BE(12), data: await this.read(len) };
  }

  /** Greeting, client flags, optional structured replies, NBD_OPT_GO. Returns size and flags. */
  async handshake(name: string, structured = false): Promise<{ size: bigint; flags: number }> {
    const g = await this.read(18);
    assert.equal(g.readBigUInt64BE(0), abi.NBD_INIT_MAGIC);
    assert.equal(g.readBigUInt64BE(8), abi.NBD_OPTS_MAGIC);
    assert.equal(g.readUInt16BE(16), abi.NBD_FLAG_FIXED_NEWSTYLE | abi.NBD_FLAG_NO_ZEROES);
    const f = Buffer.alloc(4);
    f.writeUInt32BE(abi.NBD_FLAG_C_FIXED_NEWSTYLE | abi.NBD_FLAG_C_NO_ZEROES);
    this.write(f);
    if (structured) {
      this.option(abi.NBD_OPT_STRUCTURED_REPLY);
      assert.equal((await this.optReply()).type, abi.NBD_REP_ACK);
    }
    const n = Buffer.from(name);
    const d = Buffer.alloc(4 + n.length + 2);
    d.writeUInt32BE(n.length, 0);
    n.copy(d, 4);
    this.option(abi.NBD_OPT_GO, d);
    let size = 0n;
    let flags = 0;
    for (;;) {
      const r = await this.optReply();
      if (r.type === abi.NBD_REP_ACK) break;
      assert.equal(r.type, abi.NBD_REP_INFO, `unexpected reply ${r.type.toString(16)}: ${r.data}`);
      if (r.data.readUInt16BE(0) === abi.NBD_INFO_EXPORT) {
        size = r.data.readBigUInt64BE(2);
        flags = r.data.readUInt16BE(10);
      }
    }
    return { size, flags };
  }

  request(type: number, handle: number, offset: number, len: number, flags = 0, payload?: Buffer): void {
    const h = Buffer.alloc(28);
    h.writeUInt32BE(abi.NBD_REQUEST_MAGIC, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(BigInt(handle), 8);
    h.writeBigUInt64BE(BigInt(offset), 16);
    h.writeUInt32BE(len, 24);
    this.write(payload ? Buffer.concat([h, payload]) : h);
  }

  /** Simple reply: [error, handle, data]. */
  async simpleReply(dataLen: number): Promise<{ error: number; handle: number; data: Buffer }> {
    const h = await this.read(16);
    assert.equal(h.readUInt32BE(0), abi.NBD_SIMPLE_REPLY_MAGIC);
    const error = h.readUInt32BE(4);
    return { error, handle: Number(h.readBigUInt64BE(8)), data: error ? Buffer.alloc(0) : await this.read(dataLen) };
  }

  async chunk(): Promise<{ flags: number; type: number; handle: number; payload: Buffer }> {
    const h = await this.read(20);
    assert.equal(h.readUInt32BE(0), abi.NBD_STRUCTURED_REPLY_MAGIC);
    return {
      flags: h.readUInt16BE(4), type: h.readUInt16BE(6), handle: Number(h.readBigUInt64BE(8)),
      payload: await this.read(h.readUInt32BE(16)),
    };
  }

  destroy(): void {
    this.sock.destroy();
  }
}

/** Option and request error replies, as text, for comparing with QEMU's daemon. */
async function transcript(sock: string): Promise<string[]> {
  const out: string[] = [];
  const c = new RawClient(sock);
  await c.read(18);
  c.write(Buffer.from([0, 0, 0, 3]));
  const rep = async () => {
    const r = await c.optReply();
    return `${r.type.toString(16)} ${JSON.stringify(r.data.toString('latin1'))}`;
  };
  const str = (x: string) => { const b = Buffer.alloc(4); b.writeUInt32BE(Buffer.byteLength(x)); return Buffer.concat([b, Buffer.from(x)]); };
  const meta = (...q: string[]) => { const n = Buffer.alloc(4); n.writeUInt32BE(q.length); return Buffer.concat([str('disk'), n, ...q.map(str)]); };
  for (const o of [abi.NBD_OPT_EXTENDED_HEADERS, abi.NBD_OPT_PEEK_EXPORT, 99]) { c.option(o); out.push(`opt ${o}: ${await rep()}`); }
  for (const o of [abi.NBD_OPT_STARTTLS, abi.NBD_OPT_LIST, abi.NBD_OPT_STRUCTURED_REPLY]) { c.option(o, Buffer.from('x')); out.push(`opt ${o}+x: ${await rep()}`); }
  c.option(abi.NBD_OPT_INFO, Buffer.from([0, 0, 0, 9, 1])); out.push(`short info: ${await rep()}`);
  c.option(abi.NBD_OPT_GO, Buffer.concat([str('nope'), Buffer.alloc(2)])); out.push(`go unknown: ${await rep()}`);
  c.option(abi.NBD_OPT_SET_META_CONTEXT, meta('base:allocation')); out.push(`set meta: ${await rep()}`);
  c.option(abi.NBD_OPT_STRUCTURED_REPLY); out.push(`sr: ${await rep()}`);
  c.option(abi.NBD_OPT_STRUCTURED_REPLY); out.push(`sr again: ${await rep()}`);
  for (const q of [[], ['qemu:', 'base:'], ['qemu:allocation-depth', 'base:allocation', 'x:y']]) {
    for (const o of [abi.NBD_OPT_LIST_META_CONTEXT, abi.NBD_OPT_SET_META_CONTEXT]) {
      c.option(o, meta(...q));
      let r;
      do out.push(`meta ${o} ${q}: ${r = await rep()}`); while (r.startsWith('4 '));
    }
  }
  c.option(abi.NBD_OPT_GO, Buffer.concat([str('disk'), Buffer.from([0, 3, 0, 1, 0, 2, 0, 3])]));
  let r;
  do out.push(`go: ${r = await rep()}`); while (r.startsWith('3 '));
  const cases: [number, number, bigint, number, Buffer?][] = [
    [0, 0, 16n << 20n, 1], [1, 0, (16n << 20n) - 1n, 2, Buffer.alloc(2)], [6, 0, 16n << 20n, 1], [4, 0, 16n << 20n, 1],
    [5, 0, 16n << 20n, 1], [7, 0, 16n << 20n, 1], [7, 0, 0n, 0], [3, 8, 0n, 0], [0, 2, 0n, 512], [42, 0, 0n, 0],
    [0, 0, 0n, 33 << 20], [0, 0, 1n << 62n, 1], [0, 0, 0n, 0], [8, 0, 0n, 0], [7, 8, 0n, 4096],
    [1, 1, 8n << 20n, 4, Buffer.from('abcd')], [0, 0, 8n << 20n, 4], [3, 0, 0n, 0], [5, 0, 0n, 4096], [4, 0, 12n << 20n, 4096],
    [6, 2, 12n << 20n, 4096], [6, 16, 12n << 20n, 4096], [6, 18, 13n << 20n, 4096], [0, 4, 12n << 20n, 16], [0, 1, 8n << 20n, 16]];
  // (No sparse read after zeroing: hole punching is the file driver's business, not the server's.)
  for (const [t, f, o, l, payload] of cases) {
    // A raw header, so that offsets beyond 2^53 go out exactly.
    const h = Buffer.alloc(28);
    h.writeUInt32BE(abi.NBD_REQUEST_MAGIC, 0);
    h.writeUInt16BE(f, 4);
    h.writeUInt16BE(t, 6);
    h.writeBigUInt64BE(2n, 8);
    h.writeBigUInt64BE(o, 16);
    h.writeUInt32BE(l, 24);
    c.write(payload ? Buffer.concat([h, payload]) : h);
    let k;
    do {
      const magic = await c.read(4);
      if (magic.readUInt32BE(0) === abi.NBD_SIMPLE_REPLY_MAGIC) {
        const h = await c.read(12);
        out.push(`cmd ${t} flags ${f} @${o}+${l} simple error ${h.readUInt32BE(0)} h${h.readBigUInt64BE(4)}`);
        break;
      }
      const h = await c.read(16);
      k = { flags: h.readUInt16BE(0), type: h.readUInt16BE(2), handle: Number(h.readBigUInt64BE(4)), payload: await c.read(h.readUInt32BE(12)) };
      const text = k.type & 0x8000
        ? `ERR ${k.payload.readUInt32BE(0)} ${k.payload.toString('utf8', 6)}`
        : `type ${k.type} flags ${k.flags} ${k.payload.toString('hex')}`;
      out.push(`cmd ${t} flags ${f} @${o}+${l} h${k.handle}: ${text}`);
    } while (!(k.flags & abi.NBD_REPLY_FLAG_DONE));
  }
  c.destroy();
  return out;
}

describe('NBD server and export', function () {
  this.timeout(60000);
  let dir: string;
  let sockPath: string;
  let img: string;
  let fileNode: BlockNode;
  let nullNode: BlockNode;
  let exports: NbdExport[] = [];
  const children: ChildProcess[] = [];

  async function addExport(id: string, node: BlockNode, writable: boolean, options: Record<string, any> = {}): Promise<NbdExport> {
    const exp = await nbdExportDriver.create(common(id, node, writable), { type: 'nbd', id, 'node-name': node.nodeName, ...options });
    exports.push(exp);
    return exp;
  }

  async function removeExports(): Promise<void> {
    for (const e of exports) {
      nbdExportDriver.requestShutdown(e);
      await nbdExportDriver.delete(e);
    }
    exports = [];
  }

  /** 16 MiB, data (0x5a) at 1 MiB..1.5 MiB, the rest sparse; same inode each time. */
  function resetImage(): void {
    fs.writeFileSync(img, Buffer.alloc(0));
    fs.truncateSync(img, 16 * MiB);
    const fd = fs.openSync(img, 'r+');
    fs.writeSync(fd, Buffer.alloc(512 * 1024, 0x5a), 0, 512 * 1024, MiB);
    fs.closeSync(fd);
  }

  before(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qsd-nbd-'));
    sockPath = path.join(dir, 'nbd.sock');
    img = path.join(dir, 'disk.img');
    resetImage();
    fileNode = await openNode('file0', fileDriver, { driver: 'file', filename: img });
    nullNode = await openNode('null0', nullCoDriver, { driver: 'null-co', size: 64 * MiB, 'read-zeroes': true });
  });

  afterEach(async () => {
    await removeExports();
    if (nbdServerRunning()) await nbdServerStop();
  });

  after(async () => {
    for (const c of children) c.kill('SIGKILL');
    await fileDriver.close(fileNode.state);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  describe('nbd-server-start / stop', () => {
    it('refuses a second server, TLS, bad paths and busy ports with QEMU\'s words', async () => {
      await assert.rejects(nbdServerStop(), { message: 'NBD server not running' });
      await nbdServerStart({ addr: { type: 'unix', path: sockPath } });
      assert.ok(fs.statSync(sockPath).isSocket());
      await assert.rejects(nbdServerStart({ addr: { type: 'unix', path: sockPath } }), { message: 'NBD server already running' });
      await nbdServerStop();
      assert.equal(fs.existsSync(sockPath), false, 'socket removed at stop');
      await assert.rejects(nbdServerStart({ addr: { type: 'unix', path: '/nonexist/x.sock' } }),
        { message: 'Failed to bind socket to /nonexist/x.sock: No such file or directory' });
      assert.equal(nbdServerRunning(), false);
      await assert.rejects(nbdServerStart({ addr: { type: 'unix', path: sockPath }, 'tls-creds': 'nope' }),
        { message: "No TLS credentials with id 'nope'" });
      const busy = net.createServer();
      await new Promise<void>((r) => busy.listen(0, '127.0.0.1', () => r()));
      const port = (busy.address() as net.AddressInfo).port;
      await assert.rejects(nbdServerStart({ addr: { type: 'inet', host: '127.0.0.1', port: String(port) } }),
        { message: 'Failed to find an available port: Address already in use' });
      busy.close();
      await assert.rejects(nbdServerStart({ addr: { type: 'inet', host: '127.0.0.1', port: 'abc' } }),
        { message: 'address resolution failed for 127.0.0.1:abc: Servname not supported for ai_socktype' });
      await assert.rejects(nbdServerStart({ addr: { type: 'fd', str: 'foo' } }), { message: 'Unable to parse FD number foo' });
      const long = path.join(dir, 'a'.repeat(120));
      await assert.rejects(nbdServerStart({ addr: { type: 'unix', path: long } }), { message: `UNIX socket path '${long}' is too long` });
      // A stale file at the path is replaced, as QEMU does.
      fs.writeFileSync(sockPath, 'stale');
      await nbdServerStart({ addr: { type: 'unix', path: sockPath } });
      assert.ok(fs.statSync(sockPath).isSocket());
    });

    it('export creation checks: server running, name length, duplicates, bitmaps', async () => {
      await assert.rejects(addExport('e0', fileNode, false), { message: 'NBD server not running' });
      await nbdServerStart({ addr: { type: 'unix', path: sockPath } });
      const long = 'a'.repeat(4097);
      await assert.rejects(addExport('e0', fileNode, false, { name: long }), { message: `export name '${long}' too long` });
      await assert.rejects(addExport('e0', fileNode, false, { description: long }), { message: `description '${long}' too long` });
      await addExport('e0', fileNode, false);
      await assert.rejects(addExport('e1', fileNode, false), { message: "NBD server already has export named 'file0'" });
      await assert.rejects(addExport('e2', fileNode, false, { name: 'x', bitmaps: ['b'] }), { message: "Bitmap 'b' is not found" });
      assert.deepEqual(nbdServerAddOptionsToExport({ device: 'file0' }),
        { type: 'nbd', id: 'file0', 'node-name': 'file0', name: 'file0', writable: false });
      assert.deepEqual(nbdServerAddOptionsToExport({ device: 'd', name: 'n', writable: true, description: 'x', bitmap: 'b' }),
        { type: 'nbd', id: 'n', 'node-name': 'd', name: 'n', writable: true, description: 'x', bitmaps: ['b'] });
    });
  });

  describe('real clients', () => {
    beforeEach(async () => {
      await nbdServerStart({ addr: { type: 'unix', path: sockPath } });
    });

    it('qemu-img info / map and nbdinfo see size, flags and allocation', async () => {
      resetImage();
      await addExport('e0', fileNode, true, { name: 'disk', description: 'the disk', 'allocation-depth': true });
      const uri = `nbd+unix:///disk?socket=${sockPath}`;
      const info = JSON.parse((await run('qemu-img', ['info', '--output=json', uri])).stdout);
      assert.equal(info['virtual-size'], 16 * MiB);
      const map = JSON.parse((await run('qemu-img', ['map', '--output=json', '-f', 'raw', uri])).stdout);
      const data = map.filter((e: any) => e.data).map((e: any) => [e.start, e.length]);
      assert.deepEqual(data, [[MiB, 512 * 1024]]);
      const ni = JSON.parse((await run('nbdinfo', ['--json', uri])).stdout).exports[0];
      assert.equal(ni['export-name'], 'disk');
      assert.equal(ni.description, 'the disk');
      assert.deepEqual(ni.contexts, ['base:allocation', 'qemu:allocation-depth']);
      assert.equal(ni.is_read_only, false);
      assert.equal(ni.can_multi_conn, true);
      assert.equal(ni.can_fast_zero, true);
      assert.equal(ni.block_size_maximum, 32 * MiB);
      const m = (await run('nbdinfo', ['--map', uri])).stdout.trim().split('\n').map((l) => l.trim().split(/\s+/));
      assert.deepEqual(m, [['0', '1048576', '3', 'hole,zero'], ['1048576', '524288', '0', 'data'], ['1572864', '15204352', '3', 'hole,zero']]);
      const depth = (await run('nbdinfo', ['--map=qemu:allocation-depth', uri])).stdout.trim().split(/\s+/);
      assert.deepEqual(depth, ['0', '16777216', '1', 'local']);
    });

    it('qemu-io writes, reads, zeroes and discards land in the file', async () => {
      await addExport('e0', fileNode, true, { name: 'disk' });
      const uri = `nbd+unix:///disk?socket=${sockPath}`;
      const io = async (...cmds: string[]) => {
        const args = ['-f', 'raw', '-d', 'unmap'];
        for (const c of cmds) args.push('-c', c);
        args.push(uri);
        const { stdout } = await run('qemu-io', args).catch((e) => assert.fail(`${e.stdout}${e.stderr}`));
        assert.doesNotMatch(stdout, /failed|error|Pattern verification/i, stdout);
        return stdout;
      };
      await io('write -P 0xaa 0 64k', 'read -P 0xaa 0 64k', 'write -P 0x11 4096 100', 'write -f -P 0x22 8192 512');
      const f = fs.readFileSync(img);
      assert.equal(f[0], 0xaa);
      assert.equal(f[4096], 0x11);
      assert.equal(f[4195], 0x11);
      assert.equal(f[8192 + 511], 0x22);
      // TRIM is advisory, so check that it reaches the node rather than what the file reads back.
      const trims: number[][] = [];
      const discard = fileNode.discard;
      fileNode.discard = async (o, b) => { trims.push([o, b]); return discard.call(fileNode, o, b); };
      try {
        await io('write -z 0 4096', 'read -P 0 0 4096', 'discard 8192 4096', 'read -P 0x5a 1M 512k');
      } finally {
        fileNode.discard = discard;
      }
      assert.deepEqual(trims, [[8192, 4096]]);
      await io('write -z -u 2M 1M', 'read -P 0 2M 1M', 'flush');
      const g = fs.readFileSync(img);
      assert.equal(g[100], 0);
      assert.equal(g[65535], 0xaa);
      // Reads past the end fail cleanly, the connection survives for the next command.
      const { stdout } = await run('qemu-io', ['-f', 'raw', '-c', 'read 16M 4096', '-c', 'read -P 0x5a 1M 4096', uri]).catch((e) => e);
      assert.match(stdout, /read failed/);
      assert.match(stdout, /read 4096\/4096 bytes at offset 1048576/);
    });

    it('read-only exports refuse writes with EPERM', async () => {
      await addExport('e0', fileNode, false, { name: 'ro' });
      const r = await run('qemu-io', ['-f', 'raw', '-c', 'write 0 512', `nbd+unix:///ro?socket=${sockPath}`]).catch((e) => e);
      assert.match(String(r.stdout) + String(r.stderr), /read-only|Operation not permitted|Permission denied/i);
      const c = new RawClient(sockPath);
      const { flags } = await c.handshake('ro');
      assert.equal(flags & abi.NBD_FLAG_READ_ONLY, abi.NBD_FLAG_READ_ONLY);
      c.request(abi.NBD_CMD_WRITE, 7, 0, 512, 0, Buffer.alloc(512));
      const rep = await c.simpleReply(0);
      assert.deepEqual([rep.error, rep.handle], [abi.NBD_EPERM, 7]);
      c.destroy();
    });

    it('qemu-img convert and compare round-trip through the export', async () => {
      await addExport('e0', fileNode, false, { name: 'disk' });
      const out = path.join(dir, 'copy.img');
      await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', `nbd+unix:///disk?socket=${sockPath}`, out]);
      await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', img, out]);
      await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', `nbd+unix:///disk?socket=${sockPath}`, out]);
    });

    it('nbdinfo --list and qemu-nbd -L list names and descriptions', async () => {
      await addExport('e0', fileNode, false, { name: 'disk', description: 'first' });
      await addExport('e1', nullNode, true, { name: 'null' });
      const list = JSON.parse((await run('nbdinfo', ['--list', '--json', `nbd+unix:///?socket=${sockPath}`])).stdout);
      assert.deepEqual(list.exports.map((e: any) => [e['export-name'], e.description, e['export-size']]),
        [['disk', 'first', 16 * MiB], ['null', undefined, 64 * MiB]]);
      const { stdout } = await run('qemu-nbd', ['-L', '-k', sockPath]);
      assert.match(stdout, /exports available: 2/);
      assert.match(stdout, /export: 'disk'\n  description: first/);
      assert.match(stdout, /flags: 0x58f \( readonly flush fua df multi cache \)/);
      assert.match(stdout, /flags: 0xded \( flush fua trim zeroes df multi cache fast-zero \)/);
    });

    it('serves over TCP on an ephemeral port', async () => {
      await nbdServerStop();
      await nbdServerStart({ addr: { type: 'inet', host: '127.0.0.1', port: '0' } });
      const { port } = nbdServerAddress() as net.AddressInfo;
      await addExport('e0', nullNode, false, { name: 'n' });
      const info = JSON.parse((await run('qemu-img', ['info', '--output=json', `nbd://127.0.0.1:${port}/n`])).stdout);
      assert.equal(info['virtual-size'], 64 * MiB);
    });
  });

  describe('protocol details and hostile clients', () => {
    beforeEach(async () => {
      await nbdServerStart({ addr: { type: 'unix', path: sockPath }, 'handshake-max-seconds': 1 });
    });

    it('option errors: unknown export, unsupported options, STARTTLS, meta context without structured replies', async () => {
      await addExport('e0', nullNode, true, { name: 'n', 'allocation-depth': true });
      const c = new RawClient(sockPath);
      await c.read(18);
      c.write(Buffer.from([0, 0, 0, 3]));
      c.option(abi.NBD_OPT_EXTENDED_HEADERS);
      let r = await c.optReply();
      assert.equal(r.type, abi.NBD_REP_ERR_UNSUP);
      c.option(0x1234, Buffer.alloc(100000)); // unknown and larger than we buffer: skipped
      r = await c.optReply();
      assert.deepEqual([r.opt, r.type], [0x1234, abi.NBD_REP_ERR_UNSUP]);
      c.option(abi.NBD_OPT_STARTTLS);
      r = await c.optReply();
      assert.deepEqual([r.type, r.data.toString()], [abi.NBD_REP_ERR_POLICY, 'TLS not configured']);
      const q = (name: string, ...queries: string[]) => {
        const parts = [Buffer.alloc(4), Buffer.from(name), Buffer.alloc(4)];
        parts[0].writeUInt32BE(Buffer.byteLength(name));
        parts[2].writeUInt32BE(queries.length);
        for (const s of queries) {
          const l = Buffer.alloc(4);
          l.writeUInt32BE(Buffer.byteLength(s));
          parts.push(l, Buffer.from(s));
        }
        return Buffer.concat(parts);
      };
      c.option(abi.NBD_OPT_SET_META_CONTEXT, q('n', 'base:allocation'));
      r = await c.optReply();
      assert.equal(r.type, abi.NBD_REP_ERR_INVALID);
      c.option(abi.NBD_OPT_LIST_META_CONTEXT, q('n'));
      const names: string[] = [];
      while ((r = await c.optReply()).type === abi.NBD_REP_META_CONTEXT) names.push(r.data.toString('utf8', 4));
      assert.deepEqual(names, ['base:allocation', 'qemu:allocation-depth']);
      c.option(abi.NBD_OPT_INFO, Buffer.from([0, 0, 0, 3, 0x78, 0x78, 0x78, 0, 0]));
      r = await c.optReply();
      assert.deepEqual([r.type, r.data.toString()], [abi.NBD_REP_ERR_UNKNOWN, "export 'xxx' not present"]);
      c.option(abi.NBD_OPT_ABORT);
      r = await c.optReply();
      assert.equal(r.type, abi.NBD_REP_ACK);
      assert.ok(await c.waitClosed(2000));
    });

    it('structured replies: holes, data, block status, errors with messages', async () => {
      resetImage();
      await addExport('e0', fileNode, true, { name: 'disk', 'allocation-depth': true });
      const c = new RawClient(sockPath);
      await c.read(18);
      c.write(Buffer.from([0, 0, 0, 3]));
      c.option(abi.NBD_OPT_STRUCTURED_REPLY);
      assert.equal((await c.optReply()).type, abi.NBD_REP_ACK);
      const set = Buffer.concat([Buffer.from([0, 0, 0, 4]), Buffer.from('disk'), Buffer.from([0, 0, 0, 2, 0, 0, 0, 15]),
        Buffer.from('base:allocation'), Buffer.from([0, 0, 0, 21]), Buffer.from('qemu:allocation-depth')]);
      c.option(abi.NBD_OPT_SET_META_CONTEXT, set);
      const ids: Record<string, number> = {};
      let r;
      while ((r = await c.optReply()).type === abi.NBD_REP_META_CONTEXT) ids[r.data.toString('utf8', 4)] = r.data.readUInt32BE(0);
      assert.deepEqual(Object.keys(ids), ['base:allocation', 'qemu:allocation-depth']);
      c.option(abi.NBD_OPT_GO, Buffer.from([0, 0, 0, 4, ...Buffer.from('disk'), 0, 0]));
      let flags = 0;
      while ((r = await c.optReply()).type !== abi.NBD_REP_ACK) {
        if (r.data.readUInt16BE(0) === abi.NBD_INFO_EXPORT) flags = r.data.readUInt16BE(10);
      }
      assert.ok(flags & abi.NBD_FLAG_SEND_DF);
      // Sparse read across hole → data → hole.
      c.request(abi.NBD_CMD_READ, 1, MiB - 4096, 512 * 1024 + 8192);
      const chunks = [];
      do chunks.push(await c.chunk()); while (!(chunks[chunks.length - 1].flags & abi.NBD_REPLY_FLAG_DONE));
      assert.deepEqual(chunks.map((k) => k.type), [abi.NBD_REPLY_TYPE_OFFSET_HOLE, abi.NBD_REPLY_TYPE_OFFSET_DATA, abi.NBD_REPLY_TYPE_OFFSET_HOLE]);
      assert.equal(chunks[0].payload.readUInt32BE(8), 4096);
      assert.equal(chunks[1].payload.length, 8 + 512 * 1024);
      assert.ok(chunks[1].payload.subarray(8).every((b) => b === 0x5a));
      // DF: one data chunk.
      c.request(abi.NBD_CMD_READ, 2, 0, 8192, abi.NBD_CMD_FLAG_DF);
      const df = await c.chunk();
      assert.deepEqual([df.type, df.flags, df.payload.length], [abi.NBD_REPLY_TYPE_OFFSET_DATA, abi.NBD_REPLY_FLAG_DONE, 8200]);
      // Block status over both contexts.
      c.request(abi.NBD_CMD_BLOCK_STATUS, 3, 0, 2 * MiB);
      const bs1 = await c.chunk();
      const bs2 = await c.chunk();
      assert.equal(bs2.flags & abi.NBD_REPLY_FLAG_DONE, abi.NBD_REPLY_FLAG_DONE);
      const ext = (p: Buffer) => {
        const out = [];
        for (let i = 4; i < p.length; i += 8) out.push([p.readUInt32BE(i), p.readUInt32BE(i + 4)]);
        return [p.readUInt32BE(0), out];
      };
      assert.deepEqual(ext(bs1.payload), [ids['base:allocation'], [[MiB, 3], [512 * 1024, 0], [512 * 1024, 3]]]);
      assert.deepEqual(ext(bs2.payload), [ids['qemu:allocation-depth'], [[2 * MiB, 1]]]);
      c.request(abi.NBD_CMD_BLOCK_STATUS, 4, 0, 2 * MiB, abi.NBD_CMD_FLAG_REQ_ONE);
      assert.deepEqual(ext((await c.chunk()).payload), [0, [[MiB, 3]]]);
      await c.chunk();
      // Errors (EINVAL, as QEMU 7.2): past EOF, bad flags, unknown command.
      c.request(abi.NBD_CMD_READ, 5, 16 * MiB, 1);
      let e = await c.chunk();
      assert.deepEqual([e.type, e.handle, e.payload.readUInt32BE(0)], [abi.NBD_REPLY_TYPE_ERROR, 5, abi.NBD_EINVAL]);
      assert.match(e.payload.toString('utf8', 6), /operation past EOF/);
      c.request(abi.NBD_CMD_WRITE_ZEROES, 6, 16 * MiB - 1, 2);
      e = await c.chunk();
      assert.equal(e.payload.readUInt32BE(0), abi.NBD_EINVAL);
      c.request(abi.NBD_CMD_FLUSH, 7, 0, 0, abi.NBD_CMD_FLAG_REQ_ONE);
      e = await c.chunk();
      assert.equal(e.payload.readUInt32BE(0), abi.NBD_EINVAL);
      c.request(42, 8, 0, 0);
      e = await c.chunk();
      assert.equal(e.payload.readUInt32BE(0), abi.NBD_EINVAL);
      c.request(abi.NBD_CMD_READ, 9, 0, 33 * MiB);
      e = await c.chunk();
      assert.equal(e.payload.readUInt32BE(0), abi.NBD_EINVAL);
      // Still alive: a write with FUA and a read-back.
      c.request(abi.NBD_CMD_WRITE, 10, 3 * MiB, 4, abi.NBD_CMD_FLAG_FUA, Buffer.from([1, 2, 3, 4]));
      let sr = await c.simpleReply(0); // QEMU answers data-less successes with simple replies
      assert.deepEqual([sr.error, sr.handle], [0, 10]);
      c.request(abi.NBD_CMD_READ, 11, 3 * MiB, 4);
      e = await c.chunk();
      assert.deepEqual([...e.payload.subarray(8)], [1, 2, 3, 4]);
      c.request(abi.NBD_CMD_WRITE_ZEROES, 12, 3 * MiB, 4096, abi.NBD_CMD_FLAG_FAST_ZERO);
      sr = await c.simpleReply(0);
      assert.deepEqual([sr.error, sr.handle], [0, 12]);
      c.request(abi.NBD_CMD_DISC, 13, 0, 0);
      assert.ok(await c.waitClosed(2000));
    });

    it('hostile clients are dropped; a well-behaved one keeps working', async () => {
      await addExport('e0', nullNode, true, { name: 'n' });
      const good = new RawClient(sockPath);
      await good.handshake('n');
      // Garbage instead of client flags.
      const g1 = new RawClient(sockPath);
      g1.write(Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'));
      // Wrong option magic.
      const g2 = new RawClient(sockPath);
      g2.write(Buffer.concat([Buffer.from([0, 0, 0, 3]), Buffer.alloc(16, 0xee)]));
      // A 4 GiB option length.
      const g3 = new RawClient(sockPath);
      const h = Buffer.alloc(20);
      h.writeUInt32BE(3, 0);
      h.writeBigUInt64BE(abi.NBD_OPTS_MAGIC, 4);
      h.writeUInt32BE(abi.NBD_OPT_GO, 12);
      h.writeUInt32BE(0xffffffff, 16);
      g3.write(h);
      // A 4 GiB write after a proper handshake.
      const g4 = new RawClient(sockPath);
      await g4.handshake('n');
      g4.request(abi.NBD_CMD_WRITE, 99, 0, 0xffffffff, 0, Buffer.alloc(1000, 1));
      // Bad request magic.
      const g5 = new RawClient(sockPath);
      await g5.handshake('n');
      g5.write(Buffer.alloc(28, 0xff));
      // Slow loris: connects and says nothing (handshake-max-seconds=1).
      const g6 = new RawClient(sockPath);
      for (const g of [g1, g2, g3, g5]) assert.ok(await g.waitClosed(3000), 'hostile client dropped');
      const rep = await g4.simpleReply(0);
      assert.deepEqual([rep.error, rep.handle], [abi.NBD_EINVAL, 99]);
      assert.ok(await g4.waitClosed(3000));
      assert.ok(await g6.waitClosed(3000), 'slow handshake dropped');
      good.request(abi.NBD_CMD_READ, 1, 4096, 4096);
      const r = await good.simpleReply(4096);
      assert.deepEqual([r.error, r.handle, r.data.length], [0, 1, 4096]);
      good.destroy();
    });

    it('a client vanishing mid-payload or mid-request does not keep the export busy', async () => {
      await addExport('e0', nullNode, true, { name: 'n' });
      const exp = exports[0];
      const a = new RawClient(sockPath);
      await a.handshake('n');
      a.request(abi.NBD_CMD_WRITE, 1, 0, MiB, 0, Buffer.alloc(1000)); // payload cut short
      const b = new RawClient(sockPath);
      await b.handshake('n');
      b.request(abi.NBD_CMD_READ, 2, 0, 4096);
      await b.simpleReply(4096);
      assert.equal(exp.clientCount(), 2);
      a.destroy();
      b.destroy();
      const t0 = Date.now();
      nbdExportDriver.requestShutdown(exp);
      await nbdExportDriver.delete(exp);
      exports = [];
      assert.equal(exp.clientCount(), 0);
      assert.ok(Date.now() - t0 < 2000);
    });

    it('32 connections with many requests in flight each', async () => {
      await addExport('e0', fileNode, true, { name: 'disk' });
      const clients = await Promise.all(Array.from({ length: 32 }, async (_, i) => {
        const c = new RawClient(sockPath);
        await c.handshake('disk');
        return { c, i };
      }));
      await Promise.all(clients.map(async ({ c, i }) => {
        const base = 4 * MiB + i * 64 * 1024;
        for (let k = 0; k < 16; k++) c.request(abi.NBD_CMD_WRITE, k, base + k * 4096, 4096, 0, Buffer.alloc(4096, (i * 16 + k) & 0xff));
        const seen = new Set<number>();
        for (let k = 0; k < 16; k++) {
          const r = await c.simpleReply(0);
          assert.equal(r.error, 0);
          seen.add(r.handle);
        }
        assert.equal(seen.size, 16);
        for (let k = 0; k < 16; k++) c.request(abi.NBD_CMD_READ, 100 + k, base + k * 4096, 4096);
        for (let k = 0; k < 16; k++) {
          const r = await c.simpleReply(4096);
          assert.equal(r.error, 0);
          assert.ok(r.data.every((b) => b === ((i * 16 + r.handle - 100) & 0xff)));
        }
        c.destroy();
      }));
    });

    it('pipelined 16 MiB writes beyond the in-flight byte budget all complete; drain holds requests', async () => {
      await addExport('e0', nullNode, true, { name: 'n' });
      const c = new RawClient(sockPath);
      await c.handshake('n');
      const big = Buffer.alloc(16 * MiB, 7);
      for (let k = 0; k < 8; k++) c.request(abi.NBD_CMD_WRITE, k, k * 4 * MiB, big.length, 0, big);
      const handles = new Set<number>();
      for (let k = 0; k < 8; k++) {
        const r = await c.simpleReply(0);
        assert.equal(r.error, 0);
        handles.add(r.handle);
      }
      assert.equal(handles.size, 8);
      // A drained export takes no new request until drainEnd.
      const exp = exports[0];
      await nbdExportDriver.drainBegin!(exp);
      c.request(abi.NBD_CMD_FLUSH, 50, 0, 0);
      const early = await Promise.race([c.simpleReply(0).then(() => 'answered'), new Promise((r) => setTimeout(() => r('held'), 200))]);
      assert.equal(early, 'held');
      await nbdExportDriver.drainEnd!(exp);
      await new Promise((r) => setTimeout(r, 100));
      c.request(abi.NBD_CMD_FLUSH, 51, 0, 0);
      const r = await c.simpleReply(0);
      assert.equal(r.error, 0);
      c.destroy();
    });

    it('max-connections makes extra clients wait; stop disconnects everyone', async () => {
      await nbdServerStop();
      await nbdServerStart({ addr: { type: 'unix', path: sockPath }, 'max-connections': 1 });
      await addExport('e0', nullNode, false, { name: 'n' });
      const a = new RawClient(sockPath);
      await a.handshake('n');
      const b = new RawClient(sockPath);
      const early = await Promise.race([b.read(18).then(() => 'greeted'), new Promise((r) => setTimeout(() => r('waiting'), 300))]);
      assert.equal(early, 'waiting');
      a.destroy();
      await b.handshake('n');
      const exp = exports[0];
      assert.equal(exp.clientCount(), 1);
      nbdExportDriver.requestShutdown(exp);
      await nbdExportDriver.delete(exp);
      exports = [];
      assert.ok(await b.waitClosed(2000));
      await nbdServerStop();
      assert.equal(fs.existsSync(sockPath), false);
    });
  });

  describe('oracle: qemu-storage-daemon 7.2', () => {
    it('nbdinfo --json matches for the same image and options', async function () {
      resetImage();
      const qsock = path.join(dir, 'qsd.sock');
      const qsd = spawn('qemu-storage-daemon', [
        '--blockdev', `file,filename=${img},node-name=file0,locking=off`,
        '--nbd-server', `addr.type=unix,addr.path=${qsock}`,
        '--export', 'type=nbd,id=e0,node-name=file0,name=disk,description=the disk,writable=on,allocation-depth=on',
        '--export', 'type=nbd,id=e1,node-name=file0,name=ro',
      ], { stdio: 'ignore' });
      children.push(qsd);
      for (let i = 0; i < 50 && !fs.existsSync(qsock); i++) await new Promise((r) => setTimeout(r, 100));
      await nbdServerStart({ addr: { type: 'unix', path: sockPath } });
      await addExport('e0', fileNode, true, { name: 'disk', description: 'the disk', 'allocation-depth': true });
      await addExport('e1', fileNode, false, { name: 'ro' });
      const norm = (s: string, sock: string) => s.split(sock).join('SOCK');
      for (const args of [['--json', '--list'], ['--json'], ['--map'], ['--map=qemu:allocation-depth']]) {
        const ours = (await run('nbdinfo', [...args, `nbd+unix:///disk?socket=${sockPath}`])).stdout;
        const theirs = (await run('nbdinfo', [...args, `nbd+unix:///disk?socket=${qsock}`])).stdout;
        assert.equal(norm(ours, sockPath), norm(theirs, qsock), `nbdinfo ${args.join(' ')}`);
      }
      const ours = (await run('qemu-nbd', ['-L', '-k', sockPath])).stdout;
      const theirs = (await run('qemu-nbd', ['-L', '-k', qsock])).stdout;
      assert.equal(ours, theirs);
      const ourLog = await transcript(sockPath);
      assert.ok(ourLog.length > 30);
      assert.deepEqual(ourLog, await transcript(qsock));
      qsd.kill('SIGTERM');
      await new Promise((r) => qsd.once('exit', r));
      fs.rmSync(qsock, { force: true });
    });
  });
});
