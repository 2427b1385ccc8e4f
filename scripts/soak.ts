// Soak test (not in CI): fio verify on several FUSE exports while QMP churns nodes and exports.
// Usage: tsx scripts/soak.ts [--minutes N] [--exports N]. Prints errors, RSS and fd counts over time.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';

const { values } = parseArgs({ options: { minutes: { type: 'string', default: '2' }, exports: { type: 'string', default: '3' } } });
const minutes = Number(values.minutes);
const nExports = Number(values.exports);
const repo = resolve(import.meta.dirname, '..');
const qsd = process.env.QSD ?? join(repo, 'bin/qsd-ts');
const dir = mkdtempSync('/tmp/qsd-soak.');
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A minimal QMP client: one command at a time, events skipped. */
class Qmp {
  private buf = '';
  private waiters: Array<(v: any) => void> = [];
  constructor(private sock: Socket) {
    sock.on('data', (b) => {
      this.buf += b.toString();
      let i;
      while ((i = this.buf.indexOf('\n')) >= 0) {
        const line = this.buf.slice(0, i);
        this.buf = this.buf.slice(i + 1);
        const v = JSON.parse(line);
        if (!('event' in v)) this.waiters.shift()?.(v);
      }
    });
  }
  static async open(path: string): Promise<Qmp> {
    for (let i = 0; ; i++) {
      try {
        const s = await new Promise<Socket>((res, rej) => { const c = connect(path, () => res(c)); c.once('error', rej); });
        const q = new Qmp(s);
        await q.next(); // greeting
        await q.cmd('qmp_capabilities');
        return q;
      } catch (e) {
        if (i > 200) throw e;
        await sleep(50);
      }
    }
  }
  private next(): Promise<any> { return new Promise((r) => this.waiters.push(r)); }
  cmd(execute: string, args?: object): Promise<any> {
    const p = this.next();
    this.sock.write(JSON.stringify({ execute, arguments: args }) + '\n');
    return p;
  }
  close(): void { this.sock.destroy(); }
}

function fuseMounts(): string[] {
  return readFileSync('/proc/self/mounts', 'utf8').split('\n').map((l) => l.split(' '))
    .filter((f) => f[2]?.startsWith('fuse') && f[1].startsWith(dir)).map((f) => f[1]);
}

const children: ChildProcess[] = [];
let daemon: ChildProcess | undefined;
function cleanup(): void {
  for (const c of children) c.kill('SIGKILL');
  daemon?.kill('SIGKILL');
  for (const m of fuseMounts()) spawnSync('umount', ['-l', m]);
  rmSync(dir, { recursive: true, force: true });
}
process.on('exit', cleanup);
process.on('SIGINT', () => process.exit(130));

const args = ['--chardev', `socket,id=m,path=${dir}/qmp.sock,server=on,wait=off`, '--monitor', 'm',
  '--object', 'iothread,id=io0', '--object', 'iothread,id=io1'];
for (let i = 0; i < nExports; i++) {
  const fmt = i % 2 ? 'qcow2' : 'raw';
  const img = `${dir}/img${i}.${fmt}`;
  spawnSync('qemu-img', ['create', '-q', '-f', fmt, img, '256M']);
  writeFileSync(`${dir}/mp${i}`, '');
  const iothread = i % 3 === 2 ? ',iothread=io0' : '';
  args.push('--blockdev', `file,node-name=f${i},filename=${img}`, '--blockdev', `${fmt},node-name=d${i},file=f${i}`,
    '--export', `fuse,id=exp${i},node-name=d${i},mountpoint=${dir}/mp${i},writable=on,allow-other=off${iothread}`);
}
daemon = spawn(qsd, args, { stdio: ['ignore', 'inherit', 'inherit'] });
const qmp = await Qmp.open(`${dir}/qmp.sock`);
const pid = daemon.pid!;
const stat = () => ({
  rssMiB: Math.round(Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))![1]) / 1024),
  fds: readdirSync(`/proc/${pid}/fd`).length,
});

// fio verify on every export for the whole run.
const seconds = Math.round(minutes * 60);
const fioResults: Array<{ exp: number; status: number | null; errors: string }> = [];
const fioDone = Array.from({ length: nExports }, (_, i) => new Promise<void>((res) => {
  const c = spawn('fio', ['--name=soak', `--filename=${dir}/mp${i}`, '--rw=randwrite', '--bs=4k-64k', '--size=64M',
    '--verify=crc32c', '--verify_backlog=256', '--direct=1', '--ioengine=psync', '--numjobs=1',
    `--runtime=${seconds}`, '--time_based', '--output-format=json'], { stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(c);
  let out = '';
  let err = '';
  c.stdout!.on('data', (b) => { out += b; });
  c.stderr!.on('data', (b) => { err += b; });
  c.on('close', (status) => {
    let errors = err.trim();
    try { const j = JSON.parse(out).jobs[0]; errors += ` total_err=${j.error} written=${Math.round(j.write.io_bytes / 1048576)}MiB`; } catch { errors += ' (no json)'; }
    fioResults.push({ exp: i, status, errors });
    res();
  });
}));

// QMP churn: add/del a node and a FUSE export on it, alternating main loop and iothread.
let churn = 0;
let churnFailures = 0;
let running = true;
const churnLoop = (async () => {
  writeFileSync(`${dir}/churn.mp`, '');
  spawnSync('qemu-img', ['create', '-q', '-f', 'raw', `${dir}/churn.raw`, '16M']);
  while (running) {
    const ok = (r: any) => r && 'return' in r;
    let good = ok(await qmp.cmd('blockdev-add', { driver: 'raw', 'node-name': 'c', file: { driver: 'file', filename: `${dir}/churn.raw` } }));
    const exp: any = { type: 'fuse', id: 'cexp', 'node-name': 'c', mountpoint: `${dir}/churn.mp`, writable: true, 'allow-other': 'off' };
    if (churn % 2) exp.iothread = 'io1';
    good = ok(await qmp.cmd('block-export-add', exp)) && good;
    good = spawnSync('dd', [`if=${dir}/churn.mp`, 'of=/dev/null', 'bs=64k', 'count=4', 'iflag=direct']).status === 0 && good;
    good = ok(await qmp.cmd('block-export-del', { id: 'cexp' })) && good;
    for (let i = 0; i < 100 && ok(await qmp.cmd('query-block-exports')) && (await qmp.cmd('query-block-exports')).return.some((e: any) => e.id === 'cexp'); i++) await sleep(10);
    good = ok(await qmp.cmd('blockdev-del', { 'node-name': 'c' })) && good;
    if (!good) churnFailures++;
    churn++;
  }
})();

const start = Date.now();
console.log('t(s)  rss(MiB)  fds  churn-cycles  churn-failures');
const sample = () => {
  const s = stat();
  console.log(`${String(Math.round((Date.now() - start) / 1000)).padStart(4)}  ${String(s.rssMiB).padStart(8)}  ${String(s.fds).padStart(3)}  ${String(churn).padStart(12)}  ${String(churnFailures).padStart(14)}`);
};
sample();
const timer = setInterval(sample, 10000);
await Promise.all(fioDone);
running = false;
await churnLoop;
clearInterval(timer);
sample();
for (const r of fioResults.sort((a, b) => a.exp - b.exp)) console.log(`fio exp${r.exp}: exit ${r.status}${r.errors ? ` ${r.errors}` : ''}`);
const q = await qmp.cmd('quit');
console.log(`quit: ${'return' in q ? 'ok' : JSON.stringify(q)}`);
qmp.close();
await new Promise((r) => daemon!.once('exit', r));
console.log(`daemon exit: ${daemon.exitCode ?? daemon.signalCode}; mounts left: ${fuseMounts().length}`);
daemon = undefined;
