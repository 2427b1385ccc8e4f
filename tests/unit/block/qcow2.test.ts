// qcow2 driver against real qemu-img/qemu-io images: open, read, write, create, concurrency.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { BlockDriver } from '../../../src/block/driver.js';
import { BlockNode } from '../../../src/block/node.js';
import { QmpError } from '../../../src/qapi/errors.js';
import { qcow2BackingInfo, qcow2Create, qcow2Driver } from '../../../src/block/qcow2/index.js';

/** Test-only file protocol driver on synchronous node:fs calls (the real one lives elsewhere). */
interface FsState { fd: number; size: number }
const fsDriver: BlockDriver<FsState> = {
  name: 'file',
  isProtocol: true,
  async open(node, options) {
    const fd = fs.openSync(options.filename, node.readOnly ? 'r' : 'r+');
    return { fd, size: fs.fstatSync(fd).size };
  },
  async close(s) { fs.closeSync(s.fd); },
  getLength(s) { return s.size; },
  async read(s, off, buf) {
    let done = 0;
    while (done < buf.length) {
      const n = fs.readSync(s.fd, buf, done, buf.length - done, off + done);
      if (n === 0) { buf.fill(0, done); break; }
      done += n;
    }
  },
  async write(s, off, buf) {
    let done = 0;
    while (done < buf.length) done += fs.writeSync(s.fd, buf, done, buf.length - done, off + done);
    if (off + buf.length > s.size) s.size = off + buf.length;
  },
  async flush(s) { fs.fdatasyncSync(s.fd); },
  async truncate(s, size) { fs.ftruncateSync(s.fd, size); s.size = size; },
  async discard() { /* advisory */ },
};

async function fileNode(filename: string, readOnly = false): Promise<BlockNode> {
  const n = new BlockNode({ nodeName: 'file-' + filename, driver: fsDriver, readOnly, options: { filename } });
  n.state = await fsDriver.open(n, { filename });
  return n;
}

async function qcow2Node(filename: string, opts: { readOnly?: boolean; backing?: BlockNode; options?: Record<string, unknown> } = {}): Promise<BlockNode> {
  const file = await fileNode(filename, opts.readOnly ?? false);
  const children = new Map<string, BlockNode>([['file', file]]);
  if (opts.backing) children.set('backing', opts.backing);
  const options = { driver: 'qcow2', file: 'f', ...(opts.options ?? {}) };
  const n = new BlockNode({ nodeName: 'q', driver: qcow2Driver, readOnly: opts.readOnly ?? false, options, children });
  n.state = await qcow2Driver.open(n, options);
  return n;
}

async function closeNode(n: BlockNode): Promise<void> {
  await n.driver.close(n.state);
  const f = n.children.get('file');
  if (f) await f.driver.close(f.state);
}

function sh(cmd: string, args: string[]): string {
  return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

let dir = '';
const p = (name: string) => join(dir, name);

/** Reads the whole node through the driver. */
async function readAll(n: BlockNode): Promise<Buffer> {
  const buf = Buffer.alloc(n.getLength());
  // Odd chunking to cross cluster and table boundaries.
  for (let off = 0; off < buf.length;) {
    const len = Math.min(buf.length - off, 123_456);
    await n.read(off, buf.subarray(off, off + len));
    off += len;
  }
  return buf;
}

function rawOf(image: string): Buffer {
  const out = image + '.raw';
  sh('qemu-img', ['convert', '-O', 'raw', image, out]);
  return fs.readFileSync(out);
}

function check(image: string): void {
  const r = JSON.parse(execFileSync('qemu-img', ['check', '--output=json', image], { encoding: 'utf8' }).toString()) as Record<string, unknown>;
  assert.equal(r['corruptions'] ?? 0, 0, JSON.stringify(r));
  assert.equal(r['check-errors'] ?? 0, 0, JSON.stringify(r));
}

function checkNoLeaks(image: string): void {
  check(image);
  const r = JSON.parse(execFileSync('qemu-img', ['check', '--output=json', image], { encoding: 'utf8' }).toString()) as Record<string, unknown>;
  assert.equal(r['leaks'] ?? 0, 0, JSON.stringify(r));
}

describe('qcow2 driver', function () {
  this.timeout(120_000);
  before(() => { dir = fs.mkdtempSync(join(tmpdir(), 'qcow2-test-')); });
  after(() => { fs.rmSync(dir, { recursive: true, force: true }); });

  describe('reads images qemu made', () => {
    const variants: Array<[string, string[]]> = [
      ['v2', ['-o', 'compat=0.10']],
      ['v3', []],
      ['cluster 512', ['-o', 'cluster_size=512']],
      ['cluster 2M', ['-o', 'cluster_size=2M']],
      ['refcount 1', ['-o', 'refcount_bits=1']],
      ['refcount 64', ['-o', 'refcount_bits=64']],
      ['lazy', ['-o', 'lazy_refcounts=on']],
      ['extended l2', ['-o', 'extended_l2=on']],
    ];
    for (const [name, args] of variants) {
      it(name, async () => {
        const img = p(`r-${name.replace(/ /g, '_')}.qcow2`);
        sh('qemu-img', ['create', '-f', 'qcow2', ...args, img, '8M']);
        sh('qemu-io', ['-c', 'write -P 0xab 0 64k', '-c', 'write -P 0x11 100k 3k', '-c', 'write -P 0x22 5M 1M',
          '-c', 'write -z 5200k 64k', '-c', 'write -P 0x33 7M 4k', '-c', 'write -z 7M 512', img]);
        const n = await qcow2Node(img, { readOnly: true });
        try {
          assert.deepEqual(await readAll(n), rawOf(img));
          assert.equal(n.getLength(), 8 << 20);
        } finally { await closeNode(n); }
      });
    }

    it('compressed clusters (qemu-img convert -c)', async () => {
      const src = p('c-src.qcow2');
      const img = p('c.qcow2');
      sh('qemu-img', ['create', '-f', 'qcow2', src, '4M']);
      sh('qemu-io', ['-c', 'write -P 0x5a 0 1M', '-c', 'write -P 0x7 2M 300k', src]);
      sh('qemu-img', ['convert', '-c', '-O', 'qcow2', src, img]);
      const n = await qcow2Node(img, { readOnly: true });
      try {
        assert.deepEqual(await readAll(n), rawOf(src));
        const st = await n.blockStatus(0, 1 << 20);
        assert.equal(st.data, true);
        assert.equal(st.offset, undefined);
      } finally { await closeNode(n); }
    });

    it('backing chain (qcow2 and raw base), short backing', async () => {
      const base = p('base.qcow2');
      const rawBase = p('base.img');
      sh('qemu-img', ['create', '-f', 'qcow2', base, '2M']);
      sh('qemu-io', ['-c', 'write -P 0x44 0 2M', base]);
      sh('qemu-img', ['create', '-f', 'raw', rawBase, '2M']);
      sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x55 0 2M', rawBase]);
      for (const [b, fmt] of [[base, 'qcow2'], [rawBase, 'raw']] as const) {
        const top = p(`top-${fmt}.qcow2`);
        sh('qemu-img', ['create', '-f', 'qcow2', '-b', b, '-F', fmt, top, '4M']);
        sh('qemu-io', ['-c', 'write -P 0x66 70k 10k', '-c', 'write -z 1M 64k', top]);
        const info = await qcow2BackingInfo(await fileNode(top, true));
        assert.deepEqual(info, { backingFile: b, backingFormat: fmt });
        const backing = fmt === 'qcow2' ? await qcow2Node(b, { readOnly: true }) : await fileNode(b, true);
        const n = await qcow2Node(top, { readOnly: true, backing });
        try {
          assert.deepEqual(await readAll(n), rawOf(top));
          const st = await n.blockStatus(0, 64 << 10);
          assert.equal(st.allocated, false);
          assert.equal(st.data, true);
          const beyond = await n.blockStatus(3 << 20, 64 << 10);
          assert.equal(beyond.zero, true);
          const info2 = n.driver.imageInfo!(n.state);
          assert.equal(info2['backing-filename'], b);
          assert.equal(info2['backing-filename-format'], fmt);
        } finally {
          await closeNode(n);
          if (fmt === 'qcow2') await closeNode(backing); else await backing.driver.close(backing.state);
        }
      }
    });
  });
});
