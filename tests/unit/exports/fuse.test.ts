// FUSE export: real mounts over files in /tmp, exercised with stat, dd, truncate, fallocate, qemu-io, fio.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fuseExportDriver, unmountAllFuseExports } from '../../../src/exports/fuse.js';
import { FUSE_STATE_HALTED, FUSE_STATE_MODE } from '../../../src/exports/fuse-queue.js';
import { FuseFixture, python, run, staleMounts } from './fuse-harness.js';

const KiB = 1024;
const MiB = 1024 * 1024;

async function stat(file: string, format: string): Promise<string> {
  const r = await run('stat', ['-c', format, file]);
  assert.equal(r.code, 0, r.stderr);
  return r.stdout.trim();
}

async function dd(...args: string[]) {
  return run('dd', ['status=none', ...args]);
}

function fillImage(file: string, byte: number, size: number): void {
  fs.writeFileSync(file, Buffer.alloc(size, byte));
}

describe('FUSE export', function () {
  this.timeout(60000);
  let fx: FuseFixture;

  beforeEach(() => {
    fx = new FuseFixture();
  });

  afterEach(async () => {
    try {
      await fx.cleanup();
    } finally {
      unmountAllFuseExports();
    }
    assert.deepEqual(staleMounts(), []);
  });

  describe('create', () => {
    it('refuses a second export on the same mountpoint, with QEMU\'s message', async () => {
      await fx.export();
      await assert.rejects(fx.export(), {
        name: 'QmpError',
        errorClass: 'GenericError',
        message: `There already is a FUSE export on '${fx.mountpoint}'`,
      });
    });

    it('refuses a missing mountpoint and a directory, with QEMU\'s messages', async () => {
      const missing = path.join(fx.dir, 'nope');
      await assert.rejects(fx.export({ mountpoint: missing }), {
        message: `Failed to stat '${missing}': No such file or directory`,
      });
      await assert.rejects(fx.export({ mountpoint: fx.dir }), { message: `'${fx.dir}' is not a regular file` });
    });

    it('refuses files of /proc (also through a symlink), mounting nothing', async () => {
      const link = path.join(fx.dir, 'link');
      fs.symlinkSync('/proc/self/status', link);
      await assert.rejects(fx.export({ mountpoint: link }), /Refusing to export over/);
      await assert.rejects(fx.export({ mountpoint: '/proc/self/status' }), /kernel's \/proc file system/);
      assert.deepEqual(staleMounts(), []);
    });

    it('mounts rw,nosuid,nodev,noatime with default_permissions and max_read=1 MiB; ro when not writable', async () => {
      await fx.export({ writable: true });
      let r = await run('findmnt', ['-n', '-o', 'SOURCE,FSTYPE,OPTIONS', fx.mountpoint]);
      assert.match(r.stdout, /^\/dev\/fuse\s+fuse\s+rw,nosuid,nodev,noatime,user_id=0,group_id=0,default_permissions,max_read=1048576\n$/);
      await fx.cleanup();
      fx = new FuseFixture();
      await fx.export({ 'allow-other': 'auto' });
      r = await run('findmnt', ['-n', '-o', 'OPTIONS', fx.mountpoint]);
      assert.match(r.stdout, /^ro,nosuid,nodev,noatime,.*default_permissions,allow_other,max_read=1048576\n$/);
      assert.equal(fx.exports[0]!.allowOther, true);
    });

    it('delete unmounts, and the mountpoint can be exported again', async () => {
      const exp = await fx.export();
      fuseExportDriver.requestShutdown(exp);
      await fuseExportDriver.delete(exp);
      fx.exports.length = 0;
      assert.deepEqual(staleMounts(), []);
      assert.equal(fs.statSync(fx.mountpoint).size, 0, 'the mountpoint file is visible again');
      await fx.export();
      assert.equal(await stat(fx.mountpoint, '%s'), String(MiB));
    });
  });

  describe('attributes', () => {
    it('stat: mode 600 (writable) / 400, size, ino 1, nlink 1, owner, blksize = request alignment', async () => {
      await fx.export({ writable: true });
      assert.equal(await stat(fx.mountpoint, '%a %F %s %i %h %u %g %o'), `600 regular file ${MiB} 1 1 0 0 1`);
      await fx.cleanup();
      fx = new FuseFixture(3 * MiB + 5);
      await fx.export();
      // QEMU keeps node lengths in whole 512-byte sectors: QSD 7.2 shows 12800 for 12345 bytes.
      assert.equal(await stat(fx.mountpoint, '%a %s'), `400 ${3 * MiB + 512}`);
    });

    it('st_blocks follows the allocated size of the image', async () => {
      await fx.export({ writable: true });
      // Nothing allocated: QEMU reports the length instead (DIV_ROUND_UP(length, 512)).
      assert.equal(await stat(fx.mountpoint, '%b'), '2048');
      assert.equal((await dd('if=/dev/urandom', `of=${fx.mountpoint}`, 'bs=64k', 'count=1', 'conv=notrunc')).code, 0);
      await new Promise((r) => setTimeout(r, 1100)); // attr_valid is 1 s
      assert.equal(await stat(fx.mountpoint, '%b'), '128');
    });

    it('chmod: group/other bits EPERM without allow_other, owner bits ok; chown and utimes ENOTSUP', async () => {
      await fx.export({ writable: true });
      let r = await run('chmod', ['644', fx.mountpoint]);
      assert.match(r.stderr, /Operation not permitted/);
      r = await run('chmod', ['700', fx.mountpoint]);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(await stat(fx.mountpoint, '%a'), '700');
      r = await run('chown', ['1:1', fx.mountpoint]);
      assert.match(r.stderr, /Operation not supported/);
      r = await run('touch', [fx.mountpoint]);
      assert.match(r.stderr, /Operation not supported/);
    });

    it('with allow_other: chmod 644 and chown work, and all queues see the new mode', async () => {
      const exp = await fx.export({ writable: true, 'allow-other': 'on', queues: 2 });
      let r = await run('chmod', ['644', fx.mountpoint]);
      assert.equal(r.code, 0, r.stderr);
      r = await run('chown', ['12:34', fx.mountpoint]);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(await stat(fx.mountpoint, '%a %u %g'), '644 12 34');
      assert.equal(new Int32Array(exp.shared)[FUSE_STATE_MODE], 0o100644);
    });

    it('read-only export: chmod +w and writes are EROFS (ro mount)', async () => {
      await fx.export();
      let r = await run('chmod', ['600', fx.mountpoint]);
      assert.match(r.stderr, /Read-only file system/);
      r = await dd('if=/dev/zero', `of=${fx.mountpoint}`, 'bs=4k', 'count=1', 'conv=notrunc');
      assert.match(r.stderr, /Read-only file system/);
      r = await run('truncate', ['-s', '2M', fx.mountpoint]);
      assert.match(r.stderr, /Read-only file system/);
    });

    it('statfs: bsize 512, namelen 255', async () => {
      await fx.export();
      const r = await run('stat', ['-f', '-c', '%s %l', fx.mountpoint]);
      assert.equal(r.stdout.trim(), '512 255');
    });
  });

  describe('I/O', () => {
    it('reads the image; short at EOF, empty at and after EOF', async () => {
      const data = Buffer.alloc(MiB);
      for (let i = 0; i < data.length; i += 4) data.writeUInt32LE(i, i);
      fs.writeFileSync(fx.image, data);
      await fx.export();
      const r = await run('cmp', [fx.mountpoint, fx.image]);
      assert.equal(r.code, 0, r.stdout + r.stderr);
      const p = await python(
        'import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); ' +
          'print(len(os.pread(fd, 8192, 1048576-4096)), len(os.pread(fd, 4096, 1048576)), len(os.pread(fd, 4096, 5<<20)))',
        fx.mountpoint,
      );
      assert.equal(p.stdout.trim(), '4096 0 0', p.stderr);
    });

    it('writes (buffered and O_DIRECT) land in the image; open(O_TRUNC) does not truncate', async () => {
      await fx.export({ writable: true });
      fs.writeFileSync(path.join(fx.dir, 'src'), Buffer.alloc(256 * KiB, 0x5a));
      let r = await dd(`if=${path.join(fx.dir, 'src')}`, `of=${fx.mountpoint}`, 'bs=128k', 'seek=1', 'oflag=direct', 'conv=notrunc');
      assert.equal(r.code, 0, r.stderr);
      r = await dd('if=/dev/zero', `of=${fx.mountpoint}`, 'bs=1000', 'count=1'); // O_TRUNC, unaligned
      assert.equal(r.code, 0, r.stderr);
      const img = fs.readFileSync(fx.image);
      assert.equal(img.length, MiB, 'O_TRUNC must not truncate the export');
      assert.ok(img.subarray(128 * KiB, 384 * KiB).every((b) => b === 0x5a));
      assert.equal(img[384 * KiB], 0);
    });

    it('write past EOF of a non-growable export: clamped, then ENOSPC', async () => {
      fillImage(fx.image, 0, MiB);
      await fx.export({ writable: true });
      let r = await dd('if=/dev/zero', `of=${fx.mountpoint}`, 'bs=4k', 'seek=256', 'count=1', 'conv=notrunc');
      assert.match(r.stderr, /No space left on device/);
      r = await dd('if=/dev/urandom', `of=${fx.mountpoint}`, 'bs=4k', 'seek=255', 'count=2', 'conv=notrunc', 'oflag=direct');
      assert.match(r.stderr, /No space left on device/);
      assert.equal(fs.statSync(fx.image).size, MiB);
      assert.ok(fs.readFileSync(fx.image).subarray(MiB - 4096).some((b) => b !== 0), 'the part before EOF was written');
    });

    it('growable export: writes past EOF grow the node', async () => {
      await fx.export({ writable: true, growable: true });
      const r = await dd('if=/dev/zero', `of=${fx.mountpoint}`, 'bs=4k', 'seek=300', 'count=2', 'conv=notrunc');
      assert.equal(r.code, 0, r.stderr);
      assert.equal(fs.statSync(fx.image).size, 302 * 4096);
      assert.equal(await stat(fx.mountpoint, '%s'), String(302 * 4096));
    });

    it('truncate resizes the node', async () => {
      await fx.export({ writable: true });
      let r = await run('truncate', ['-s', '2M', fx.mountpoint]);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(fs.statSync(fx.image).size, 2 * MiB);
      r = await run('truncate', ['-s', '12345', fx.mountpoint]);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(fs.statSync(fx.image).size, 12345);
      assert.equal(await stat(fx.mountpoint, '%s'), '12800'); // whole sectors, as QSD 7.2 shows it
    });

    it('fallocate: punch hole, zero range, KEEP_SIZE clamp, mode 0 only at EOF', async () => {
      fillImage(fx.image, 0xaa, MiB);
      await fx.export({ writable: true });
      const mp = fx.mountpoint;
      let r = await run('fallocate', ['-p', '-o', '4096', '-l', '8192', mp]);
      assert.equal(r.code, 0, r.stderr);
      r = await run('fallocate', ['-z', '-o', '65536', '-l', '4096', mp]);
      assert.equal(r.code, 0, r.stderr);
      let img = fs.readFileSync(fx.image);
      assert.ok(img.subarray(4096, 12288).every((b) => b === 0));
      assert.ok(img.subarray(65536, 69632).every((b) => b === 0));
      assert.equal(img[12288], 0xaa);
      assert.equal(img[69632], 0xaa);
      const hole = await python('import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); print(os.lseek(fd, 0, os.SEEK_HOLE))', fx.image);
      assert.equal(hole.stdout.trim(), '4096', 'punch hole deallocated');

      r = await run('fallocate', ['-o', '0', '-l', '4096', mp]); // mode 0 inside the file
      assert.match(r.stderr, /Operation not supported/);
      r = await run('fallocate', ['-n', '-o', '0', '-l', '4096', mp]); // KEEP_SIZE alone
      assert.match(r.stderr, /keep size mode is unsupported/); // util-linux's words for EOPNOTSUPP here
      r = await run('fallocate', ['-z', '-n', '-o', String(MiB - 4096), '-l', '65536', mp]);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(fs.statSync(fx.image).size, MiB, 'KEEP_SIZE clamps to EOF');
      r = await run('fallocate', ['-p', '-o', String(2 * MiB), '-l', '4096', mp]); // beyond EOF: nothing to do
      assert.equal(r.code, 0, r.stderr);

      r = await run('fallocate', ['-o', String(MiB), '-l', '65536', mp]); // mode 0 at EOF grows
      assert.equal(r.code, 0, r.stderr);
      assert.equal(fs.statSync(fx.image).size, MiB + 65536);
      r = await run('fallocate', ['-o', String(2 * MiB), '-l', '4096', mp]); // beyond EOF: grows to offset + len
      assert.equal(r.code, 0, r.stderr);
      assert.equal(fs.statSync(fx.image).size, 2 * MiB + 4096);
      r = await run('fallocate', ['-z', '-o', String(2 * MiB), '-l', '65536', mp]); // zero range grows
      assert.equal(r.code, 0, r.stderr);
      assert.equal(fs.statSync(fx.image).size, 2 * MiB + 65536);
      img = fs.readFileSync(fx.image);
      assert.ok(img.subarray(MiB).every((b) => b === 0));
    });

    it('lseek SEEK_DATA/SEEK_HOLE as QEMU 7.2 answers (data at 64k-128k only)', async () => {
      const fd = fs.openSync(fx.image, 'r+');
      fs.writeSync(fd, Buffer.alloc(64 * KiB, 1), 0, 64 * KiB, 64 * KiB);
      fs.closeSync(fd);
      await fx.export();
      const script = `
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
out = []
for name, whence in (('D', os.SEEK_DATA), ('H', os.SEEK_HOLE)):
    for off in (0, 65536, 131072, 1048575, 1048576, 1048577):
        try:
            out.append('%s%d=%d' % (name, off, os.lseek(fd, off, whence)))
        except OSError as e:
            out.append('%s%d=%s' % (name, off, 'ENXIO' if e.errno == 6 else e.errno))
print(' '.join(out))`;
      const r = await python(script, fx.mountpoint);
      assert.equal(
        r.stdout.trim(),
        'D0=65536 D65536=65536 D131072=ENXIO D1048575=ENXIO D1048576=ENXIO D1048577=ENXIO ' +
          'H0=0 H65536=131072 H131072=131072 H1048575=1048575 H1048576=1048576 H1048577=ENXIO',
        r.stderr,
      );
    });

    it('fsync and qemu-io -f raw write/read with pattern verification', async () => {
      await fx.export({ writable: true });
      const r = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 4k 192k', '-c', 'flush', '-c', 'read -P 0x5a 4k 192k', '-c', 'read -P 0 196k 4k', fx.mountpoint]);
      assert.equal(r.code, 0, r.stdout + r.stderr);
      assert.doesNotMatch(r.stdout, /Pattern verification failed|error/i);
      assert.ok(fs.readFileSync(fx.image).subarray(4096, 4096 + 192 * KiB).every((b) => b === 0x5a));
      const s = await python('import os,sys; fd=os.open(sys.argv[1], os.O_RDWR); os.fsync(fd); os.fdatasync(fd); print("ok")', fx.mountpoint);
      assert.equal(s.stdout.trim(), 'ok', s.stderr);
    });

    it('fio randwrite iodepth 16 with crc32c verification over 2 queues', async () => {
      fx = (await fx.cleanup(), new FuseFixture(16 * MiB));
      const exp = await fx.export({ writable: true, queues: 2 });
      assert.equal(exp.fds.length, 2);
      const r = await run('fio', [
        '--name=verify', `--filename=${fx.mountpoint}`, '--rw=randwrite', '--bs=4k', '--iodepth=16',
        '--ioengine=libaio', '--direct=1', '--size=16M', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1',
        '--numjobs=1', '--output-format=terse',
      ]);
      assert.equal(r.code, 0, r.stdout + r.stderr);
      assert.doesNotMatch(r.stderr, /verify|bad/i);
      const info = (await exp.queryInfo!()) as { queues: Array<{ served: number; 'in-flight': number }> };
      assert.equal(info.queues.length, 2);
      for (const q of info.queues) {
        assert.ok(q.served > 100, `every queue served requests: ${JSON.stringify(info)}`);
        assert.equal(q['in-flight'], 0);
      }
    });

    it('queues in worker threads (one per cloned fd): fio verify, drain, and a clean stop', async () => {
      fx = (await fx.cleanup(), new FuseFixture(16 * MiB));
      const exp = await fx.export({ writable: true, queues: 2, workers: true });
      const r = await run('fio', [
        '--name=verify', `--filename=${fx.mountpoint}`, '--rw=randwrite', '--bs=4k', '--iodepth=16',
        '--ioengine=libaio', '--direct=1', '--size=16M', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1',
      ]);
      assert.equal(r.code, 0, r.stdout + r.stderr);
      const info = (await exp.queryInfo!()) as { queues: Array<{ iothread: string; served: number }> };
      assert.deepEqual(info.queues.map((q) => q.iothread), ['io0', 'io1']);
      for (const q of info.queues) assert.ok(q.served > 100, JSON.stringify(info));
      // A chmod through whichever queue is seen by the other (shared state).
      assert.equal((await run('chmod', ['700', fx.mountpoint])).code, 0);
      await new Promise((res) => setTimeout(res, 1100));
      assert.equal(await stat(fx.mountpoint, '%a'), '700');
      await fuseExportDriver.drainBegin!(exp);
      await fuseExportDriver.drainEnd!(exp);
      assert.equal(await stat(fx.mountpoint, '%s'), String(16 * MiB));
    });
  });

  describe('drain and shutdown', () => {
    it('drainBegin holds new requests until drainEnd', async () => {
      const exp = await fx.export();
      await run('stat', [fx.mountpoint]); // INIT done
      await fuseExportDriver.drainBegin!(exp);
      let done = false;
      const reader = dd(`if=${fx.mountpoint}`, 'of=/dev/null', 'bs=4k', 'count=1', 'iflag=direct').then((r) => {
        done = true;
        return r;
      });
      await new Promise((r) => setTimeout(r, 300));
      assert.equal(done, false, 'no request is served while drained');
      await fuseExportDriver.drainEnd!(exp);
      const r = await reader;
      assert.equal(r.code, 0, r.stderr);
    });

    it('delete while a client holds the file open: unmounted, no stale mount, client sees ENOTCONN', async () => {
      const exp = await fx.export({ writable: true });
      const child = spawn('python3', ['-c',
        'import os,sys\nfd=os.open(sys.argv[1], os.O_RDONLY)\nprint("open", flush=True)\nsys.stdin.readline()\n' +
          'try:\n  os.pread(fd, 4096, 0); print("read")\nexcept OSError as e: print("errno", e.errno)',
        fx.mountpoint], { stdio: ['pipe', 'pipe', 'inherit'] });
      let out = '';
      const opened = new Promise<void>((resolve) => child.stdout.on('data', (d) => { out += d; if (out.includes('open')) resolve(); }));
      const exited = new Promise((resolve) => child.on('exit', resolve));
      await opened;
      fuseExportDriver.requestShutdown(exp);
      await fuseExportDriver.delete(exp);
      fx.exports.length = 0;
      assert.deepEqual(staleMounts(), []);
      child.stdin.end('go\n');
      await exited;
      assert.equal(out, 'open\nerrno 107\n'); // ENOTCONN: the connection is gone
    });

    it('the halted flag stops every queue of the export', async () => {
      const exp = await fx.export({ queues: 2 });
      await run('stat', [fx.mountpoint]);
      Atomics.store(new Int32Array(exp.shared), FUSE_STATE_HALTED, 1);
      const r = await run('dd', [`if=${fx.mountpoint}`, 'of=/dev/null', 'bs=4k', 'count=1', 'iflag=direct'], 1500);
      assert.notEqual(r.code, 0, 'no request is answered after a halt');
    });
  });
});
