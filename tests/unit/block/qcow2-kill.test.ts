// qcow2 crash safety: a child writing through the driver is SIGKILLed; qemu-img check finds no corruption.
import assert from 'node:assert/strict';
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

const root = resolve(import.meta.dirname, '../../..');

/** The child: opens the image with a sync node:fs file driver and writes/zeroes/discards forever. */
const childSource = (img: string, seed: number) => `
import * as fs from 'node:fs';
import { BlockNode } from ${JSON.stringify(join(root, 'src/block/node.ts'))};
import { qcow2Driver } from ${JSON.stringify(join(root, 'src/block/qcow2/index.ts'))};
const fd = fs.openSync(${JSON.stringify(img)}, 'r+');
const st = { size: fs.fstatSync(fd).size };
const fileDrv = {
  name: 'file', isProtocol: true,
  async open() { return st; }, async close() {},
  getLength() { return st.size; },
  async read(_s, off, buf) { let d = 0; while (d < buf.length) { const n = fs.readSync(fd, buf, d, buf.length - d, off + d); if (!n) { buf.fill(0, d); break; } d += n; } },
  async write(_s, off, buf) { let d = 0; while (d < buf.length) d += fs.writeSync(fd, buf, d, buf.length - d, off + d); st.size = Math.max(st.size, off + buf.length); },
  async flush() {}, async truncate(_s, n) { fs.ftruncateSync(fd, n); st.size = n; }, async discard() {},
};
const file = new BlockNode({ nodeName: 'f', driver: fileDrv, readOnly: false, options: {} });
file.state = st;
const options = { driver: 'qcow2', discard: 'unmap' };
const q = new BlockNode({ nodeName: 'q', driver: qcow2Driver, readOnly: false, options, children: new Map([['file', file]]) });
q.state = await qcow2Driver.open(q, options);
let x = ${seed};
const rnd = (m) => { x = (x * 1103515245 + 12345) % 2147483648; return x % m; };
const size = q.getLength();
process.stdout.write('ready\\n');
for (let k = 0; ; k++) {
  const batch = [];
  for (let j = 0; j < 16; j++) {
    const len = 1 + rnd(200000);
    const off = rnd(size - len);
    const op = rnd(10);
    if (op < 7) batch.push(q.write(off, Buffer.alloc(len, 1 + rnd(250))));
    else if (op < 9) batch.push(q.writeZeroes(off, len, { mayUnmap: op === 8 }));
    else batch.push(q.discard(off, len));
  }
  await Promise.all(batch);
  if (k % 5 === 0) await q.flush();
}
`;

describe('qcow2 kill -9 safety', function () {
  this.timeout(120_000);
  let dir = '';
  before(() => { dir = fs.mkdtempSync(join(tmpdir(), 'qcow2-kill-')); });
  after(() => { fs.rmSync(dir, { recursive: true, force: true }); });

  for (const [name, opts] of [['v3 64k', 'cluster_size=65536'], ['v2 4k', 'compat=0.10,cluster_size=4096'], ['512 refcount 1', 'cluster_size=512,refcount_bits=1']] as const) {
    it(`leaves no corruption: ${name}`, async () => {
      const img = join(dir, `k-${name.replace(/ /g, '_')}.qcow2`);
      execFileSync('qemu-img', ['create', '-f', 'qcow2', '-o', opts, img, '16M'], { stdio: 'ignore' });
      const initial = fs.statSync(img).size;
      for (let round = 0; round < 5; round++) {
        const script = join(dir, `child-${round}.mts`);
        fs.writeFileSync(script, childSource(img, 17 + round * 31));
        const child = spawn(process.execPath, ['--import', 'tsx', script], { cwd: root, stdio: ['ignore', 'pipe', 'pipe'] });
        let err = '';
        child.stderr.on('data', (d: Buffer) => (err += d.toString()));
        const exited = new Promise<void>((r) => child.on('exit', () => r()));
        try {
          await new Promise<void>((res, rej) => {
            child.stdout.once('data', () => res());
            child.on('exit', () => rej(new Error('child exited early: ' + err)));
          });
          await new Promise((r) => setTimeout(r, 100 + Math.floor(Math.random() * 600)));
        } finally {
          child.kill('SIGKILL');
          await exited;
        }
        // Exit status 3 means leaks only (allowed); 2 would be corruption.
        const chk = spawnSync('qemu-img', ['check', '--output=json', img], { encoding: 'utf8' });
        const out = chk.stdout;
        assert.ok(chk.status === 0 || chk.status === 3, `round ${round}: status ${chk.status} ${out} ${chk.stderr}`);
        const r = JSON.parse(out) as Record<string, number>;
        assert.equal(r['corruptions'] ?? 0, 0, `round ${round}: ${out}`);
        assert.equal(r['check-errors'] ?? 0, 0, `round ${round}: ${out}`);
      }
      // The children really wrote: the image grew.
      assert.ok(fs.statSync(img).size > initial + (1 << 20));
    });
  }
});
