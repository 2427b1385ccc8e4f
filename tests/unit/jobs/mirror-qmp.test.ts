// Mirror refusals: qsd-ts's own for a source under an export in an iothread (the export could not
// follow the target), QEMU's for a target a writable export uses. Runs the
// real daemon (bin/qsd-ts, built with tsc) over QMP; nothing is left behind after a refusal.
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

/** A line-based QMP client: send a command, await the next reply (events are skipped). */
class Qmp {
  private buf = '';
  private waiters: Array<(v: any) => void> = [];
  constructor(private readonly sock: net.Socket) {
    sock.setEncoding('utf8');
    sock.on('data', (chunk: string) => {
      this.buf += chunk;
      for (let i; (i = this.buf.indexOf('\n')) >= 0;) {
        const line = this.buf.slice(0, i);
        this.buf = this.buf.slice(i + 1);
        const v = JSON.parse(line);
        if (v.event === undefined && v.QMP === undefined) this.waiters.shift()?.(v);
      }
    });
  }

  cmd(execute: string, args?: Record<string, unknown>): Promise<any> {
    return new Promise((resolve) => {
      this.waiters.push(resolve);
      this.sock.write(JSON.stringify(args ? { execute, arguments: args } : { execute }) + '\n');
    });
  }
}

describe('mirror refusals (daemon)', function () {
  this.timeout(30000);
  let dir: string;
  let proc: ChildProcess;
  let qmp: Qmp;
  let sock: net.Socket;

  before(async function () {
    if (!fs.existsSync(path.join(ROOT, 'dist'))) this.skip();
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qsd-mirror-qmp-'));
    fs.writeFileSync(path.join(dir, 'src'), Buffer.alloc(1 << 20, 0x11));
    fs.writeFileSync(path.join(dir, 'tgt'), Buffer.alloc(1 << 20));
    const qmpPath = path.join(dir, 'qmp.sock');
    proc = spawn(path.join(ROOT, 'bin/qsd-ts'), [
      '--object', 'iothread,id=io0',
      '--blockdev', `raw,node-name=src,file.driver=file,file.filename=${path.join(dir, 'src')}`,
      '--blockdev', `raw,node-name=tgt,file.driver=file,file.filename=${path.join(dir, 'tgt')}`,
      '--nbd-server', `addr.type=unix,addr.path=${path.join(dir, 'nbd.sock')}`,
      '--export', 'nbd,id=e0,node-name=src,writable=on,iothread=io0',
      '--chardev', `socket,id=c0,path=${qmpPath},server=on,wait=off`, '--monitor', 'chardev=c0',
    ], { stdio: 'ignore' });
    for (let i = 0; i < 300 && !fs.existsSync(qmpPath); i++) await new Promise((r) => setTimeout(r, 20));
    sock = net.connect(qmpPath);
    qmp = new Qmp(sock);
    await qmp.cmd('qmp_capabilities');
  });

  after(async () => {
    sock?.destroy();
    if (proc && proc.exitCode === null) {
      proc.kill('SIGTERM');
      await new Promise((r) => proc.once('exit', r));
    }
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  it('refuses a source under an iothread export, before any job exists', async () => {
    const r = await qmp.cmd('blockdev-mirror', { 'job-id': 'm0', device: 'src', target: 'tgt', sync: 'full' });
    assert.equal(r.error?.class, 'GenericError');
    assert.match(r.error.desc, /^Cannot mirror node 'src' under export 'e0': it runs in iothread 'io0'/);
    assert.deepEqual((await qmp.cmd('query-jobs')).return, []);
    const bitmaps = (await qmp.cmd('query-named-block-nodes')).return.find((n: any) => n['node-name'] === 'src')['dirty-bitmaps'];
    assert.equal(bitmaps, undefined);
  });

  it("takes copy-mode 'write-blocking', but not onto a target a writable export uses (QEMU's conflict)", async () => {
    const r = await qmp.cmd('blockdev-mirror', { 'job-id': 'm1', device: 'tgt', target: 'src', sync: 'full', 'copy-mode': 'write-blocking' });
    assert.deepEqual(r.error, {
      class: 'GenericError',
      desc: "Permission conflict on node 'src': permissions 'consistent read, write' are both required by an unnamed block " +
        "device (uses node 'src' as 'root' child) and unshared by an unnamed block device (uses node 'src' as 'root' child).",
    });
    assert.deepEqual((await qmp.cmd('query-jobs')).return, []);
  });

  it('drive-mirror closes the image it opened when a later check fails', async () => {
    const target = path.join(dir, 'new.img');
    const before = (await qmp.cmd('query-named-block-nodes')).return.length;
    const r = await qmp.cmd('drive-mirror', { 'job-id': 'm2', device: 'tgt', target, sync: 'full', format: 'raw', granularity: 1000 });
    assert.equal(r.error?.desc, "Parameter 'granularity' expects a power of 2");
    assert.ok(fs.existsSync(target), 'created as QEMU does');
    assert.equal((await qmp.cmd('query-named-block-nodes')).return.length, before);
  });
});
