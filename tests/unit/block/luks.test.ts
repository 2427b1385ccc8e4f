// luks driver against images made by qemu-img: unlock, read/write both ways, ciphers, errors.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { BlockNode } from '../../../src/block/node.js';
import { luksCreate, luksDriver } from '../../../src/block/luks/index.js';
import { Daemon } from '../../../src/daemon.js';
import { objectAdd } from '../../../src/qmp/commands/qom.js';
import { closeNode, fileNode, sh } from './fs-file-node.js';

let dir = '';
const p = (name: string) => join(dir, name);
const SECRET = ['--object', 'secret,id=sec0,data=123456'];
const imageOpts = (img: string) => `driver=luks,file.filename=${img},key-secret=sec0`;

function create(img: string, size: string, opts = ''): void {
  // qemu-img's PBKDF2 benchmark fails now and then on a busy machine ("Unable to get accurate CPU usage").
  for (let attempt = 1; ; attempt++) {
    try {
      sh('qemu-img', ['create', '-f', 'luks', ...SECRET, '-o', `key-secret=sec0,iter-time=10${opts ? ',' + opts : ''}`, img, size]);
      return;
    } catch (e) {
      if (attempt === 5 || !/accurate CPU usage/.test(String((e as { stderr?: string }).stderr))) throw e;
    }
  }
}

function qemuIo(img: string, ...cmds: string[]): string {
  return sh('qemu-io', [...SECRET, '--image-opts', ...cmds.flatMap((c) => ['-c', c]), imageOpts(img)]);
}

async function luksNode(img: string, options: Record<string, unknown> = { 'key-secret': 'sec0' }, readOnly = false): Promise<BlockNode> {
  const file = await fileNode(img, readOnly);
  const opts = { driver: 'luks', file: 'f', ...options };
  const n = new BlockNode({ nodeName: 'l', driver: luksDriver, readOnly, options: opts, children: new Map([['file', file]]) });
  try {
    n.state = await luksDriver.open(n, opts);
  } catch (e) {
    await file.driver.close(file.state);
    throw e;
  }
  return n;
}

describe('luks driver', function () {
  this.timeout(120_000);
  let daemon: Daemon;
  before(() => {
    dir = fs.mkdtempSync(join(tmpdir(), 'luks-test-'));
    daemon = new Daemon();
    daemon.onExit = () => undefined;
    objectAdd(daemon, { 'qom-type': 'secret', id: 'sec0', data: '123456' });
    objectAdd(daemon, { 'qom-type': 'secret', id: 'bad', data: 'nope' });
    objectAdd(daemon, { 'qom-type': 'iothread', id: 'io0' });
  });
  after(async () => {
    fs.rmSync(dir, { recursive: true, force: true });
    await daemon.requestExit();
  });

  for (const opts of ['', 'cipher-alg=aes-128,cipher-mode=xts', 'cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256',
    'cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=plain64', 'cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=plain,hash-alg=sha1']) {
    it(`reads what qemu-io wrote and qemu-io reads what it wrote (${opts || 'default'})`, async () => {
      const img = p(`img-${opts.replace(/[^a-z0-9]/g, '')}.luks`);
      create(img, '4M', opts);
      qemuIo(img, 'write -P 0x5a 0 64k', 'write -P 0xa5 1M 4k');
      const n = await luksNode(img);
      try {
        assert.equal(n.getLength(), 4 << 20);
        const buf = Buffer.alloc(1 << 20);
        await n.read(0, buf);
        assert.ok(buf.subarray(0, 65536).every((b) => b === 0x5a));
        const tail = Buffer.alloc(4096);
        await n.read(1 << 20, tail);
        assert.ok(tail.every((b) => b === 0xa5));
        // Aligned, unaligned and sector-crossing writes.
        await n.write(2 << 20, Buffer.alloc(8192, 0x11));
        // Never-written payload decrypts to noise, as in QEMU: zero the sectors first.
        await n.write(3 << 20, Buffer.alloc(4096));
        await n.write(3 << 20 | 100, Buffer.alloc(1000, 0x22));
        const odd = Buffer.alloc(7);
        await n.read(3 << 20 | 98, odd);
        assert.deepEqual([...odd], [0, 0, 0x22, 0x22, 0x22, 0x22, 0x22]);
      } finally {
        await closeNode(n);
      }
      qemuIo(img, 'read -P 0x11 2M 8k', 'read -P 0 3M 100', 'read -P 0x22 3145828 1000', 'read -P 0 3146828 2996', 'read -P 0x5a 0 64k');
      assert.doesNotMatch(qemuIo(img, 'read -P 0x11 2M 8k', 'read -P 0x22 3145828 1000'), /Pattern verification failed/);
    });
  }

  it('keeps random data equal to a raw copy (qemu-img compare)', async () => {
    const img = p('cmp.luks');
    const raw = p('cmp.raw');
    create(img, '1M');
    const data = randomBytes(1 << 20);
    fs.writeFileSync(raw, data);
    const n = await luksNode(img);
    try {
      // Uneven pieces cross sectors and run concurrently.
      const jobs = [];
      for (let off = 0; off < data.length; off += 70_001) jobs.push(n.write(off, data.subarray(off, Math.min(data.length, off + 70_001))));
      await Promise.all(jobs);
      const back = Buffer.alloc(data.length);
      await n.read(0, back);
      assert.ok(back.equals(data));
    } finally {
      await closeNode(n);
    }
    const out = sh('qemu-img', ['compare', ...SECRET, '--image-opts', imageOpts(img), `driver=raw,file.filename=${raw}`]);
    assert.match(out, /Images are identical/);
  });

  it("refuses with QEMU's messages", async () => {
    const img = p('err.luks');
    create(img, '1M');
    fs.writeFileSync(p('plain.img'), Buffer.alloc(1 << 20));
    await assert.rejects(luksNode(img, {}), { message: "Parameter 'key-secret' is required for cipher" });
    await assert.rejects(luksNode(img, { 'key-secret': 'nosuch' }), { message: "No secret with id 'nosuch'" });
    await assert.rejects(luksNode(img, { 'key-secret': 'io0' }), { message: "Object with id 'io0' is not a secret" });
    await assert.rejects(luksNode(img, { 'key-secret': 'bad' }), { message: 'Invalid password, cannot unlock any keyslot' });
    await assert.rejects(luksNode(p('plain.img')), { message: 'Volume is not in LUKS format' });
    const hdr = fs.readFileSync(img).subarray(0, 4096);
    const patched = (name: string, off: number, text: string) => {
      const b = Buffer.from(hdr);
      b.fill(0, off, off + 32);
      b.write(text, off, 'latin1');
      fs.writeFileSync(p(name), b);
      return p(name);
    };
    await assert.rejects(luksNode(patched('c1', 8, 'blowfish')), { message: "Algorithm 'blowfish' with key size 32 bytes not supported" });
    await assert.rejects(luksNode(patched('c2', 40, 'xts')), { message: "Unexpected cipher mode string format 'xts'" });
    await assert.rejects(luksNode(patched('c3', 40, 'foo-plain64')), { message: "Cipher mode 'foo' not supported" });
    await assert.rejects(luksNode(patched('c4', 40, 'xts-bar')), { message: "IV generator 'bar' not supported" });
    await assert.rejects(luksNode(patched('c5', 72, 'md9')), { message: "Hash algorithm 'md9' not supported" });
  });

  it('reports the header like QEMU (format-specific luks info)', async () => {
    const img = p('info.luks');
    create(img, '1M');
    const info = JSON.parse(sh('qemu-img', ['info', '--output=json', ...SECRET, '--image-opts', imageOpts(img)])) as Record<string, any>;
    const n = await luksNode(img);
    try {
      const ours = luksDriver.imageInfo!(n.state);
      assert.deepEqual(ours['format-specific'], info['format-specific']);
      assert.equal(n.getLength(), info['virtual-size']);
    } finally {
      await closeNode(n);
    }
  });
  for (const opts of [{}, { 'cipher-alg': 'aes-128', 'cipher-mode': 'cbc', 'ivgen-alg': 'essiv' }, { 'cipher-mode': 'ecb', 'hash-alg': 'sha512' }]) {
    it(`creates images qemu-img opens (${JSON.stringify(opts)})`, async () => {
      const img = p(`new-${Object.values(opts).join('-')}.luks`);
      fs.writeFileSync(img, '');
      const file = await fileNode(img);
      try {
        await luksCreate(file, { size: 1 << 20, 'key-secret': 'sec0', 'iter-time': 10, ...opts });
      } finally {
        await file.driver.close(file.state);
      }
      const info = JSON.parse(sh('qemu-img', ['info', '--output=json', ...SECRET, '--image-opts', imageOpts(img)])) as Record<string, any>;
      assert.equal(info['virtual-size'], 1 << 20);
      const data = info['format-specific'].data;
      assert.equal(data['cipher-alg'], (opts as any)['cipher-alg'] ?? 'aes-256');
      assert.equal(data['cipher-mode'], (opts as any)['cipher-mode'] ?? 'xts');
      qemuIo(img, 'write -P 0x77 4k 8k');
      const n = await luksNode(img);
      try {
        const buf = Buffer.alloc(8192);
        await n.read(4096, buf);
        assert.ok(buf.every((b) => b === 0x77));
        await n.write(65536, Buffer.alloc(512, 0x88));
      } finally {
        await closeNode(n);
      }
      assert.doesNotMatch(qemuIo(img, 'read -P 0x88 64k 512'), /Pattern verification failed/);
    });
  }
});
