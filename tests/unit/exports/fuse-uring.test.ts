// FUSE-over-io_uring: the native ring (argument checks, kernel refusals) and real io-uring exports.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { fuseExportDriver, unmountAllFuseExports, type FuseExport } from '../../../src/exports/fuse.js';
import { FUSE_URING_PAYLOAD_BYTES } from '../../../src/exports/fuse-uring-queue.js';
import type { ExportCommon } from '../../../src/exports/export.js';
import { native } from '../../../src/native/binding.js';
import { QmpError } from '../../../src/qapi/errors.js';
import { mainContext } from '../../../src/iothread/main-context.js';
import { FuseFixture, openTestNode, python, run, staleMounts } from './fuse-harness.js';

const ENABLE_URING = '/sys/module/fuse/parameters/enable_uring';
const EOPNOTSUPP = 95;

function fdCount(): number {
  return fs.readdirSync('/proc/self/fd').length;
}

/** Wait until the ring reported `n` completions (or 2 s passed). */
function completions(): { seen: Array<[number, number]>; wait(n: number): Promise<void> } {
  const seen: Array<[number, number]> = [];
  return {
    seen,
    async wait(n: number) {
      for (let i = 0; i < 200 && seen.length < n; i++) await new Promise((r) => setTimeout(r, 10));
    },
  };
}

describe('FUSE-over-io_uring', function () {
  this.timeout(60000);

  describe('native FuseUring', () => {
    it('exposes the 6.14 uapi header layout', () => {
      assert.deepEqual(native.fuseUringConstants, { HEADER_SIZE: 288, OP_IN_OFFSET: 128, ENT_IN_OUT_OFFSET: 256 });
    });

    it('checks its arguments and refuses use after close', () => {
      const fd = fs.openSync('/dev/null', 'r');
      const c = completions();
      const ring = new native.FuseUring(fd, 2, (n, tags, res) => {
        for (let i = 0; i < n; i++) c.seen.push([tags[i]!, res[i]!]);
      });
      try {
        const header = native.allocAligned(288, 64);
        const payload = native.allocAligned(4096, 4096);
        assert.equal(ring.register(2, 0, header, payload), -22, 'tag beyond the ring');
        assert.equal(ring.register(0, 0, header.subarray(0, 200), payload), -22, 'header too small');
        assert.equal(ring.register(0, 0x10000, header, payload), -22, 'qid beyond u16');
        assert.equal(ring.commit(1), -22, 'commit of an entry never registered');
        assert.throws(() => ring.register(0, 0, 'x' as unknown as Buffer, payload), TypeError);
        assert.throws(() => new native.FuseUring(fd, 0, () => undefined), TypeError);
      } finally {
        ring.close();
        ring.close();
        fs.closeSync(fd);
      }
      assert.equal(ring.commit(0), -9);
      assert.equal(ring.submit(), -9);
    });

    it('reports the kernel refusing REGISTER on a non-FUSE fd as a completion', async () => {
      // A regular file has no uring_cmd (unlike /dev/null, which accepts any command since 6.x).
      const tmp = fs.mkdtempSync('/tmp/qsd-uring-');
      const fd = fs.openSync(`${tmp}/f`, 'w+');
      const c = completions();
      const ring = new native.FuseUring(fd, 1, (n, tags, res) => {
        for (let i = 0; i < n; i++) c.seen.push([tags[i]!, res[i]!]);
      });
      try {
        assert.equal(ring.register(0, 0, native.allocAligned(288, 64), native.allocAligned(4096, 4096)), 0);
        assert.equal(ring.pending, 1);
        assert.ok(ring.submit() >= 0);
        await c.wait(1);
        // /dev/null has no uring_cmd: io_uring answers EOPNOTSUPP for the entry.
        assert.deepEqual(c.seen, [[0, -EOPNOTSUPP]]);
        assert.equal(ring.pending, 0);
      } finally {
        ring.close();
        fs.closeSync(fd);
        fs.rmSync(tmp, { recursive: true });
      }
    });
  });

  describe('io-uring exports', () => {
    let fx: FuseFixture;
    let saved: string | undefined;

    before(function () {
      if (!fs.existsSync(ENABLE_URING) || process.getuid?.() !== 0) this.skip();
      saved = fs.readFileSync(ENABLE_URING, 'utf8').trim();
    });

    after(() => {
      if (saved !== undefined) fs.writeFileSync(ENABLE_URING, saved === 'Y' ? '1' : '0');
    });

    beforeEach(() => {
      fx = new FuseFixture(4 << 20);
    });

    afterEach(async () => {
      try {
        await fx.cleanup();
      } finally {
        unmountAllFuseExports();
      }
      assert.deepEqual(staleMounts(), []);
    });

    async function create(queues: number): Promise<FuseExport> {
      fx.node ??= await openTestNode(fx.image);
      // The daemon's own main context: it awaits the queue factory, which the ring queue needs.
      const ctx = mainContext;
      const common: ExportCommon = {
        id: 'exp0',
        nodeName: 'node0',
        node: fx.node,
        writable: true,
        writethrough: false,
        contexts: Array.from({ length: queues }, () => ctx),
        multithread: queues > 1,
      };
      const exp = await fuseExportDriver.create(common, { mountpoint: fx.mountpoint, 'allow-other': 'off', 'io-uring': true });
      fx.exports.push(exp);
      return exp;
    }

    it('is refused with a GenericError while enable_uring is off, leaving nothing behind', async () => {
      fs.writeFileSync(ENABLE_URING, '0');
      fx.node = await openTestNode(fx.image);
      const fds = fdCount();
      await assert.rejects(create(1), (err: unknown) => {
        assert.ok(err instanceof QmpError);
        assert.equal(err.errorClass, 'GenericError');
        assert.match(err.message, /FUSE-over-io_uring is disabled in the kernel/);
        return true;
      });
      assert.equal(fdCount(), fds);
      assert.deepEqual(staleMounts(), []);
    });

    it('holds requests that arrive while drained and serves them at drain end', async () => {
      fs.writeFileSync(ENABLE_URING, '1');
      const exp = await create(1);
      fs.writeFileSync(fx.image, Buffer.alloc(4096, 0x7e), { flag: 'r+' });
      await fuseExportDriver.drainBegin!(exp);
      let finished = false;
      const reader = python(
        `import os,sys,mmap
fd=os.open(sys.argv[1],os.O_RDONLY|os.O_DIRECT)
b=mmap.mmap(-1,4096)
print(os.preadv(fd,[b],0), b[0])`,
        fx.mountpoint,
      ).then((r) => {
        finished = true;
        return r;
      });
      await new Promise((r) => setTimeout(r, 300));
      assert.equal(finished, false, 'a drained export must not answer');
      const inFlight = (await Promise.all(exp.queues.map((q) => q.stats()))).map((s) => s.inFlight);
      assert.deepEqual(inFlight, inFlight.map(() => 0), 'held requests are not in flight');
      await fuseExportDriver.drainEnd!(exp);
      const r = await reader;
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.stdout.trim(), `4096 ${0x7e}`);
    });

    for (const queues of [1, 2]) {
      it(`serves reads and writes over the ring (${queues} /dev/fuse queue(s)), then deletes cleanly`, async () => {
        fs.writeFileSync(ENABLE_URING, '1');
        fx.node = await openTestNode(fx.image);
        const fds = fdCount();
        const exp = await create(queues);
        // /dev/fuse queues first, then one ring queue per context that got per-CPU queues.
        assert.equal(exp.queues.length, queues + Math.min(queues, 2));
        const r = await python(
          `import os,sys
fd=os.open(sys.argv[1],os.O_RDWR|os.O_DIRECT)
import mmap
m=mmap.mmap(-1,${FUSE_URING_PAYLOAD_BYTES})
m.write(bytes([0x3c])*${FUSE_URING_PAYLOAD_BYTES})
print(os.pwritev(fd,[m],65536))
b=mmap.mmap(-1,${FUSE_URING_PAYLOAD_BYTES})
print(os.preadv(fd,[b],65536), b[:]==m[:])
print(os.preadv(fd,[b],(4<<20)-4096))`,
          fx.mountpoint,
        );
        assert.equal(r.code, 0, r.stderr);
        assert.deepEqual(r.stdout.trim().split('\n'), [String(FUSE_URING_PAYLOAD_BYTES), `${FUSE_URING_PAYLOAD_BYTES} True`, '4096']);
        const img = fs.readFileSync(fx.image);
        assert.ok(img.subarray(65536, 65536 + FUSE_URING_PAYLOAD_BYTES).every((b) => b === 0x3c));
        assert.ok(img.subarray(0, 65536).every((b) => b === 0));
        const stats = await Promise.all(exp.queues.map((q) => q.stats()));
        const ringServed = stats.slice(queues).reduce((a, s) => a + s.served, 0);
        const devServed = stats.slice(0, queues).reduce((a, s) => a + s.served, 0);
        assert.ok(ringServed >= 3, `ring queues served ${ringServed}`);
        assert.equal(devServed, 1, 'only INIT travels over /dev/fuse');
        fuseExportDriver.requestShutdown(exp);
        await fuseExportDriver.delete(exp);
        fx.exports.length = 0;
        assert.deepEqual(staleMounts(), []);
        // Child-process pipes of the clients above close asynchronously: give them a moment.
        for (let i = 0; i < 40 && fdCount() > fds; i++) await new Promise((r) => setTimeout(r, 50));
        assert.equal(fdCount(), fds, 'rings, eventfds and /dev/fuse fds are closed');
        assert.equal((await run('stat', ['-c', '%s', fx.mountpoint])).stdout.trim(), '0');
      });
    }
  });
});
