// qcow2 driver against real qemu-img/qemu-io images: open, read, write, create, concurrency.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BlockNode } from '../../../src/block/node.js';
import { closeNode, fileNode, qcow2Node, sh } from './fs-file-node.js';
import { QmpError } from '../../../src/qapi/errors.js';
import { qcow2BackingInfo, qcow2Create } from '../../../src/block/qcow2/index.js';

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

  describe('writes', () => {
    /** Applies the same ops to the qcow2 node and a raw file, then compares with qemu-img. */
    async function randomWrites(img: string, n: BlockNode, raw: string, seed: number, count: number, concurrent: boolean): Promise<void> {
      let x = seed;
      const rnd = (m: number) => { x = (x * 1103515245 + 12345) % 2147483648; return x % m; };
      const rfd = fs.openSync(raw, 'r+');
      const size = n.getLength();
      const jobs: Array<() => Promise<void>> = [];
      for (let k = 0; k < count; k++) {
        const len = 1 + rnd(k % 3 === 0 ? 300_000 : 9000);
        const off = rnd(size - len);
        const buf = Buffer.alloc(len, 1 + rnd(250));
        buf.writeUInt32BE(k, 0);
        if (!concurrent) fs.writeSync(rfd, buf, 0, len, off);
        jobs.push(() => n.write(off, buf));
        if (concurrent) {
          // Overlapping concurrent writes have no defined order: keep them disjoint per batch.
          fs.writeSync(rfd, buf, 0, len, off);
        }
      }
      if (concurrent) {
        // Disjoint ranges: split the image into 64 slots, one write each, all at once.
        const slot = Math.floor(size / 64);
        const batch = Array.from({ length: 64 }, (_, i) => {
          const len = 1 + rnd(slot - 1);
          const off = i * slot + rnd(slot - len);
          const buf = Buffer.alloc(len, 1 + rnd(250));
          fs.writeSync(rfd, buf, 0, len, off);
          return n.write(off, buf);
        });
        await Promise.all(batch);
      } else {
        for (const j of jobs) await j();
      }
      fs.closeSync(rfd);
      await n.flush();
      void img;
    }

    const variants: Array<[string, string[]]> = [
      ['v2', ['-o', 'compat=0.10']],
      ['v3 64k', []],
      ['cluster 512, refcount 1', ['-o', 'cluster_size=512,refcount_bits=1']],
      ['cluster 2M, refcount 64', ['-o', 'cluster_size=2M,refcount_bits=64']],
      ['extended l2', ['-o', 'extended_l2=on']],
      ['lazy refcounts', ['-o', 'lazy_refcounts=on']],
    ];
    for (const [name, args] of variants) {
      it(`random and concurrent writes: ${name}`, async () => {
        const img = p(`w-${name.replace(/[ ,]/g, '_')}.qcow2`);
        const raw = img + '.ref';
        sh('qemu-img', ['create', '-f', 'qcow2', ...args, img, '24M']);
        sh('qemu-io', ['-c', 'write -P 0xab 0 64k', '-c', 'write -z 1M 128k', img]);
        fs.writeFileSync(raw, Buffer.alloc(24 << 20));
        const fd = fs.openSync(raw, 'r+');
        fs.writeSync(fd, Buffer.alloc(64 << 10, 0xab), 0, 64 << 10, 0);
        fs.closeSync(fd);
        const n = await qcow2Node(img);
        try {
          await randomWrites(img, n, raw, 7, 60, false);
          await randomWrites(img, n, raw, 99, 0, true);
          // Overlapping concurrent writes to the same unallocated cluster: both must land.
          const cs = n.driver.imageInfo!(n.state)['cluster-size']!;
          const base = 20 << 20;
          const a = Buffer.alloc(100, 0xa1);
          const b = Buffer.alloc(100, 0xb2);
          await Promise.all([n.write(base + 10, a), n.write(base + 300, b), n.write(base + cs + 5, a)]);
          const fd2 = fs.openSync(raw, 'r+');
          fs.writeSync(fd2, a, 0, 100, base + 10);
          fs.writeSync(fd2, b, 0, 100, base + 300);
          fs.writeSync(fd2, a, 0, 100, base + cs + 5);
          fs.closeSync(fd2);
          const got = await readAll(n);
          assert.deepEqual(got, fs.readFileSync(raw));
        } finally { await closeNode(n); }
        checkNoLeaks(img);
        sh('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', img, raw]);
      });
    }

    for (const [label, o] of [['v3', []], ['v2', ['-o', 'compat=0.10']], ['extended l2', ['-o', 'extended_l2=on']]] as const) {
    it(`COW from backing, compressed clusters, zeroes, discard and resize: ${label}`, async () => {
      // v2 has no zero flag: a discarded cluster shows the backing file again.
      const discarded = label === 'v2' ? 0x44 : 0;
      const base = p(`wb-base-${label}.qcow2`);
      sh('qemu-img', ['create', '-f', 'qcow2', base, '4M']);
      sh('qemu-io', ['-c', 'write -P 0x44 0 3M', base]);
      const src = p(`wb-src-${label}.qcow2`);
      sh('qemu-img', ['create', '-f', 'qcow2', src, '4M']);
      sh('qemu-io', ['-c', 'write -P 0x21 0 4M', src]);
      const comp = p(`wb-comp-${label}.qcow2`);
      sh('qemu-img', ['convert', '-c', '-O', 'qcow2', ...o, src, comp]);
      const top = p(`wb-top-${label}.qcow2`);
      sh('qemu-img', ['create', '-f', 'qcow2', ...o, '-b', base, '-F', 'qcow2', top, '4M']);
      const backing = await qcow2Node(base, { readOnly: true });
      const n = await qcow2Node(top, { backing, options: { discard: 'unmap' } });
      const c = await qcow2Node(comp, { options: { discard: 'unmap' } });
      try {
        await n.write(100_000, Buffer.alloc(5000, 0x99));
        await n.writeZeroes(2 << 20, 1 << 20, { mayUnmap: true });
        await n.writeZeroes(3 << 20, 100, {});
        await n.discard(1 << 20, 256 << 10);
        await c.write(70_000, Buffer.alloc(70_000, 0x77));
        await c.writeZeroes(1 << 20, 64 << 10, {});
        await c.discard(2 << 20, 1 << 20);
        await n.truncate(6 << 20);
        await c.truncate(3 << 20);
        await n.flush();
        await c.flush();
        const expTop = Buffer.alloc(6 << 20);
        expTop.fill(0x44, 0, 3 << 20);
        expTop.fill(0x99, 100_000, 105_000);
        expTop.fill(0, 2 << 20, 3 << 20);
        expTop.fill(discarded, 1 << 20, (1 << 20) + (256 << 10));
        assert.deepEqual(await readAll(n), expTop);
        const expC = Buffer.alloc(3 << 20, 0x21);
        expC.fill(0x77, 70_000, 140_000);
        expC.fill(0, 1 << 20, (1 << 20) + (64 << 10));
        expC.fill(0, 2 << 20);
        assert.deepEqual(await readAll(c), expC);
        const st = await c.blockStatus(2 << 20, 64 << 10);
        assert.equal(st.zero, true);
        assert.equal(st.data, false);
      } finally {
        await closeNode(n);
        await closeNode(c);
        await closeNode(backing);
      }
      checkNoLeaks(top);
      checkNoLeaks(comp);
      assert.deepEqual(rawOf(top).subarray(0, 3 << 20), (await (async () => {
        const b = Buffer.alloc(3 << 20, 0x44);
        b.fill(0x99, 100_000, 105_000);
        b.fill(0, 2 << 20, 3 << 20);
        b.fill(discarded, 1 << 20, (1 << 20) + (256 << 10));
        return b;
      })()));
      assert.equal(JSON.parse(sh('qemu-img', ['info', '--output=json', comp]))['virtual-size'], 3 << 20);
    });
    }
  });

  describe('open errors and image info', () => {
    function patch(img: string, off: number, bytes: number[]): void {
      const fd = fs.openSync(img, 'r+');
      fs.writeSync(fd, Buffer.from(bytes), 0, bytes.length, off);
      fs.closeSync(fd);
    }
    async function openError(img: string, readOnly = false): Promise<string> {
      try {
        const n = await qcow2Node(img, { readOnly });
        await closeNode(n);
      } catch (e) {
        assert.ok(e instanceof QmpError, String(e));
        return e.message;
      }
      return '';
    }
    it('refuses what QEMU refuses, with its messages', async () => {
      const a = p('e.qcow2');
      sh('qemu-img', ['create', '-f', 'qcow2', a, '1M']);
      const cases: Array<[number, number[], string]> = [
        [72, [0, 0, 1, 0, 0, 0, 0, 0], 'Unsupported qcow2 feature(s): Unknown incompatible feature: 10000000000'],
        [4, [0, 0, 0, 4], 'Unsupported qcow2 version 4'],
        [20, [0, 0, 0, 8], 'Unsupported cluster size: 2^8'],
        [96, [0, 0, 0, 7], 'Reference count entry width too large; may not exceed 64 bits'],
        [72, [0, 0, 0, 0, 0, 0, 0, 4], "'data-file' is required for this image"],
        [72, [0, 0, 0, 0, 0, 0, 0, 8], 'qcow2: Compression type incompatible feature bit must not be set'],
        [0, [0, 0, 0, 0], 'Image is not in qcow2 format'],
      ];
      for (const [off, bytes, msg] of cases) {
        const img = p('e2.qcow2');
        fs.copyFileSync(a, img);
        patch(img, off, bytes);
        assert.equal(await openError(img), msg);
        // Cross-check the message with qemu-img itself.
        let qemuMsg = '';
        try { sh('qemu-img', ['info', '-f', 'qcow2', img]); } catch (e) { qemuMsg = String((e as { stderr: string }).stderr); }
        if (off !== 72 || bytes[7] !== 4) assert.ok(qemuMsg.includes(msg), qemuMsg);
      }
      const c = p('corrupt.qcow2');
      fs.copyFileSync(a, c);
      patch(c, 72, [0, 0, 0, 0, 0, 0, 0, 2]);
      assert.equal(await openError(c), 'qcow2: Image is corrupt; cannot be opened read/write');
      assert.equal(await openError(c, true), '');
    });

    it('imageInfo matches qemu-storage-daemon 7.2', async () => {
      const v2 = p('i2.qcow2');
      const x = p('ix.qcow2');
      sh('qemu-img', ['create', '-f', 'qcow2', '-o', 'compat=0.10', v2, '1M']);
      sh('qemu-img', ['create', '-f', 'qcow2', '-o', 'extended_l2=on,lazy_refcounts=on,refcount_bits=1', x, '1M']);
      const n2 = await qcow2Node(v2, { readOnly: true });
      const nx = await qcow2Node(x, { readOnly: true });
      try {
        assert.deepEqual(n2.driver.imageInfo!(n2.state), {
          'cluster-size': 65536, 'dirty-flag': false,
          'format-specific': { type: 'qcow2', data: { compat: '0.10', 'compression-type': 'zlib', 'refcount-bits': 16 } },
        });
        assert.deepEqual(nx.driver.imageInfo!(nx.state)['format-specific'], {
          type: 'qcow2',
          data: { compat: '1.1', 'compression-type': 'zlib', 'lazy-refcounts': true, 'refcount-bits': 1, corrupt: false, 'extended-l2': true },
        });
        assert.deepEqual(Object.keys(nx.driver.imageInfo!(nx.state)['format-specific']!.data),
          ['compat', 'compression-type', 'lazy-refcounts', 'refcount-bits', 'corrupt', 'extended-l2']);
      } finally { await closeNode(n2); await closeNode(nx); }
    });
  });

  describe('qcow2Create', () => {
    async function create(name: string, opts: Parameters<typeof qcow2Create>[1]): Promise<string> {
      const img = p(name);
      fs.writeFileSync(img, '');
      const f = await fileNode(img);
      try { await qcow2Create(f, opts); } finally { await f.driver.close(f.state); }
      return img;
    }
    const qinfo = (img: string) => JSON.parse(sh('qemu-img', ['info', '--output=json', img])) as Record<string, any>;

    it('makes images qemu-img accepts and describes like its own', async () => {
      const cases: Array<[Parameters<typeof qcow2Create>[1], string]> = [
        [{ size: 1 << 20 }, ''],
        [{ size: 64 << 20, version: 'v2' }, 'compat=0.10'],
        [{ size: 100 << 20, 'cluster-size': 512, 'refcount-bits': 64 }, 'cluster_size=512,refcount_bits=64'],
        [{ size: 3 * 2 ** 30, 'cluster-size': 2 << 20, 'refcount-bits': 1, 'lazy-refcounts': true }, 'cluster_size=2M,refcount_bits=1,lazy_refcounts=on'],
        [{ size: 10 << 20, 'extended-l2': true }, 'extended_l2=on'],
        [{ size: 10 << 20, preallocation: 'metadata' }, 'preallocation=metadata'],
      ];
      let k = 0;
      for (const [opts, qopts] of cases) {
        const mine = await create(`cr${k}.qcow2`, opts);
        const theirs = p(`cq${k++}.qcow2`);
        sh('qemu-img', ['create', '-f', 'qcow2', ...(qopts ? ['-o', qopts] : []), theirs, String(opts.size)]);
        checkNoLeaks(mine);
        const a = qinfo(mine);
        const b = qinfo(theirs);
        for (const key of ['virtual-size', 'cluster-size', 'format-specific', 'dirty-flag', 'format']) {
          assert.deepEqual(a[key], b[key], `${key} for ${qopts}`);
        }
        assert.equal(fs.statSync(mine).size, fs.statSync(theirs).size, `file size for ${qopts}`);
        // Usable: qemu-io writes, our driver reads back.
        sh('qemu-io', ['-c', 'write -P 0x3c 4096 70000', mine]);
        const n = await qcow2Node(mine);
        try {
          const got = Buffer.alloc(70000);
          await n.read(4096, got);
          assert.deepEqual(got, Buffer.alloc(70000, 0x3c));
        } finally { await closeNode(n); }
      }
      const withBacking = await create('crb.qcow2', { size: 1 << 20, 'backing-file': 'cr0.qcow2', 'backing-fmt': 'qcow2' });
      const bi = qinfo(withBacking);
      assert.equal(bi['backing-filename'], 'cr0.qcow2');
      assert.equal(bi['backing-filename-format'], 'qcow2');
      checkNoLeaks(withBacking);
    });

    it('validates like blockdev-create (order checked on qemu-storage-daemon 7.2)', async () => {
      const cases: Array<[Parameters<typeof qcow2Create>[1], string]> = [
        [{ size: 1 << 20, 'cluster-size': 1000 }, 'Cluster size must be a power of two between 512 and 2048k'],
        [{ size: 1 << 20, 'cluster-size': 4 << 20 }, 'Cluster size must be a power of two between 512 and 2048k'],
        [{ size: 1 << 20, 'refcount-bits': 3 }, 'Refcount width must be a power of two and may not exceed 64 bits'],
        [{ size: 1 << 20, 'refcount-bits': 128 }, 'Refcount width must be a power of two and may not exceed 64 bits'],
        [{ size: 1 << 20, version: 'v2', 'lazy-refcounts': true }, 'Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)'],
        [{ size: 1 << 20, version: 'v2', 'refcount-bits': 1 }, 'Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)'],
        [{ size: 1 << 20, version: 'v2', 'extended-l2': true }, 'Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)'],
        [{ size: 1 << 20, 'extended-l2': true, 'cluster-size': 8192 }, 'Extended L2 entries are only supported with cluster sizes of at least 16384 bytes'],
        [{ size: 1 << 20, 'backing-fmt': 'raw' }, 'Backing format cannot be used without backing file'],
        [{ size: 1 << 20, 'backing-file': 'x', preallocation: 'metadata' }, 'Backing file and preallocation can only be used at the same time if extended_l2 is on'],
        [{ size: 2 ** 52 }, "Could not resize image: Failed to grow the L1 table: File too large"],
        [{ size: 1000 }, 'Image size must be a multiple of 512 bytes'],
        [{ size: 1000, 'cluster-size': 1000 }, 'Image size must be a multiple of 512 bytes'],
        [{ size: 1 << 20, 'cluster-size': 1000, version: 'v2', 'lazy-refcounts': true }, 'Cluster size must be a power of two between 512 and 2048k'],
        [{ size: 1 << 20, version: 'v2', 'lazy-refcounts': true, 'refcount-bits': 3 }, 'Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)'],
        [{ size: 1 << 20, 'refcount-bits': 3, 'backing-fmt': 'raw' }, 'Backing format cannot be used without backing file'],
        [{ size: 1 << 20, 'backing-file': 'x', preallocation: 'metadata', version: 'v2', 'lazy-refcounts': true }, 'Backing file and preallocation can only be used at the same time if extended_l2 is on'],
      ];
      for (const [opts, msg] of cases) {
        await assert.rejects(create('bad.qcow2', opts), (e: Error) => e instanceof QmpError && e.message === msg);
      }
    });
  });

  describe('block status and dirty images', () => {
    it('blockStatus walks like qemu-img map', async () => {
      const base = p('m.qcow2');
      const top = p('mt.qcow2');
      sh('qemu-img', ['create', '-f', 'qcow2', base, '4M']);
      sh('qemu-io', ['-c', 'write -P 1 0 128k', '-c', 'write -z 256k 64k', '-c', 'write -P 2 1M 64k', base]);
      sh('qemu-img', ['create', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
      sh('qemu-io', ['-c', 'write -P 3 64k 64k', top]);
      const b = await qcow2Node(base, { readOnly: true });
      const t = await qcow2Node(top, { readOnly: true, backing: b });
      try {
        for (const [n, img] of [[b, base], [t, top]] as const) {
          const mine: Array<Record<string, unknown>> = [];
          for (let off = 0; off < n.getLength();) {
            const st = await n.blockStatus(off, n.getLength() - off);
            const e: Record<string, unknown> = { start: off, length: st.pnum, present: st.allocated || (st.depth ?? 0) > 0, zero: st.zero, data: st.data };
            if (st.data && st.offset !== undefined) e['offset'] = st.offset;
            const last = mine[mine.length - 1];
            if (last && last['present'] === e['present'] && last['zero'] === e['zero'] && last['data'] === e['data'] &&
              (e['offset'] === undefined ? last['offset'] === undefined : last['offset'] === (e['offset'] as number) - (last['length'] as number))) {
              last['length'] = (last['length'] as number) + st.pnum;
            } else mine.push(e);
            off += st.pnum;
          }
          const theirs = (JSON.parse(sh('qemu-img', ['map', '--output=json', img])) as Array<Record<string, unknown>>)
            .map(({ depth: _d, ...rest }) => rest);
          assert.deepEqual(mine, theirs, img);
        }
      } finally { await closeNode(t); await closeNode(b); }
    });

    it('a dirty lazy-refcount image opens read-write and stays consistent', async () => {
      const img = p('dirty.qcow2');
      sh('qemu-img', ['create', '-f', 'qcow2', '-o', 'lazy_refcounts=on', img, '8M']);
      sh('qemu-io', ['-c', 'write -P 1 0 1M', img]);
      const fd = fs.openSync(img, 'r+');
      fs.writeSync(fd, Buffer.from([0, 0, 0, 0, 0, 0, 0, 1]), 0, 8, 72);
      fs.closeSync(fd);
      const n = await qcow2Node(img);
      try {
        // Repaired on a read-write open (refcounts recounted, dirty bit cleared), as QEMU does.
        assert.equal(n.driver.imageInfo!(n.state)['dirty-flag'], false);
        await n.write(3 << 20, Buffer.alloc(200_000, 9));
        await n.write(100, Buffer.alloc(100, 8));
      } finally { await closeNode(n); }
      const exp = Buffer.alloc(8 << 20);
      exp.fill(1, 0, 1 << 20);
      exp.fill(8, 100, 200);
      exp.fill(9, 3 << 20, (3 << 20) + 200_000);
      assert.deepEqual(rawOf(img), exp);
      sh('qemu-img', ['check', '-r', 'all', img]);
      checkNoLeaks(img);
    });
  });

  describe('snapshots and resize', () => {
    it('writes over an internal snapshot copy on write (L2 tables and data)', async () => {
      const img = p('snap.qcow2');
      sh('qemu-img', ['create', '-f', 'qcow2', img, '4M']);
      sh('qemu-io', ['-c', 'write -P 0x10 0 2M', img]);
      sh('qemu-img', ['snapshot', '-c', 's1', img]);
      const n = await qcow2Node(img);
      try {
        await n.write(1000, Buffer.alloc(70_000, 0x20));
        await n.write(3 << 20, Buffer.alloc(4096, 0x30));
        await assert.rejects(n.truncate(8 << 20), /Can't resize an image which has snapshots/);
      } finally { await closeNode(n); }
      checkNoLeaks(img);
      const now = Buffer.alloc(4 << 20);
      now.fill(0x10, 0, 2 << 20);
      now.fill(0x20, 1000, 71_000);
      now.fill(0x30, 3 << 20, (3 << 20) + 4096);
      assert.deepEqual(rawOf(img), now);
      sh('qemu-img', ['snapshot', '-a', 's1', img]);
      const then = Buffer.alloc(4 << 20);
      then.fill(0x10, 0, 2 << 20);
      assert.deepEqual(rawOf(img), then);
      checkNoLeaks(img);
    });

    it('refuses resizes as QEMU does; grows and shrinks otherwise', async () => {
      const img = p('rs.qcow2');
      sh('qemu-img', ['create', '-f', 'qcow2', img, '1M']);
      sh('qemu-io', ['-c', 'write -P 0x10 0 1M', img]);
      const n = await qcow2Node(img);
      try {
        await assert.rejects(n.truncate(1000), { message: 'The new size must be a multiple of 512' });
        await assert.rejects(n.truncate(2 ** 52), { message: 'Failed to grow the L1 table: File too large' });
        await n.truncate(1000 * 512);
        await n.truncate(10 * 2 ** 30);
        assert.equal(n.getLength(), 10 * 2 ** 30);
        const tail = Buffer.alloc(4096, 1);
        await n.read(1000 * 512, tail);
        assert.deepEqual(tail, Buffer.alloc(4096));
      } finally { await closeNode(n); }
      checkNoLeaks(img);
      assert.equal(JSON.parse(sh('qemu-img', ['info', '--output=json', img]))['virtual-size'], 10 * 2 ** 30);
    });
  });
});
