// Export benchmark: fio against QEMU's qemu-storage-daemon and qsd-ts over FUSE (1/2/4 queues, a C ceiling) and NBD, one table each.
//
// Usage: npm run bench -- [--quick] [--runtime S] [--repeat N] [--filter REGEX]
//                         [--targets qemu,qsd-1q,qsd-2q,qsd-4q,qsd-ur,ceiling] [--file-cache warm|warm-seq|direct]
//                         [--json FILE] [--dir DIR]
// See docs/BENCHMARK.md for what each column means and how to read the numbers.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const QEMU_BIN = '/usr/bin/qemu-storage-daemon';
const QSD_BIN = path.join(repo, 'bin', 'qsd-ts');
const NULL_SIZE = 1 << 30;
/** Size of the raw images and virtual size of the qcow2 images. */
const FILE_SIZE = 256 << 20;
const BS = 4096;
/** Discarded warm-up at the start of each fio run (fio --ramp_time), so a cold start counts for nobody. */
const RAMP_SECONDS = 0.5;
/** Export name on the NBD server, and the node name in every daemon. */
const NBD_NAME = 'n0';

type Transport = 'fuse' | 'nbd';
type NodeKind = 'null-co' | 'file' | 'qcow2';
type FuseTarget = 'qemu' | 'qsd-1q' | 'qsd-2q' | 'qsd-4q' | 'qsd-ur' | 'ceiling';
/** `qsd-ts`: the NBD column (qsd-ts serves NBD from its main loop, so queue counts do not apply). */
type TargetName = FuseTarget | 'qsd-ts';
const ALL_TARGETS: readonly FuseTarget[] = ['qemu', 'qsd-1q', 'qsd-2q', 'qsd-4q', 'qsd-ur', 'ceiling'];
/** The kernel switch for FUSE-over-io_uring, which the qsd-ur target needs. */
const ENABLE_URING = '/sys/module/fuse/parameters/enable_uring';
/**
 * How the file and qcow2 nodes use the host page cache. warm: cache.direct=off on both daemons and
 * the image brought into the page cache one 4 KiB page at a time before every fio run (a guest's
 * random I/O leaves its disk cached that way), so the cells measure the daemons and not the disk;
 * warm-seq: the same, but read sequentially, which on ext4 (Linux >= 6.16) caches it in large folios
 * that make every 4 KiB buffered write walk up to 512 buffer heads in the kernel
 * (scripts/page-warm.c); direct: cache.direct=on, every request reaches the disk.
 */
type FileCache = 'warm' | 'warm-seq' | 'direct';
const FILE_CACHE_MODES: readonly FileCache[] = ['warm', 'warm-seq', 'direct'];

interface Cell {
  /** Row label, also what --filter matches: "null-co randread libaio qd16 j1", "nbd file randwrite qd1". */
  readonly name: string;
  readonly transport: Transport;
  readonly node: NodeKind;
  /** fio --rw value. */
  readonly rw: 'read' | 'write' | 'randread' | 'randwrite';
  /** fio --ioengine: libaio/psync on the FUSE-mounted file, nbd (libnbd) on the NBD socket. */
  readonly engine: 'libaio' | 'psync' | 'nbd';
  readonly iodepth: number;
  readonly numjobs: number;
}

interface Options {
  quick: boolean;
  runtime: number;
  repeat: number;
  filter: RegExp | null;
  targets: FuseTarget[];
  json: string | null;
  dir: string;
  fileCache: FileCache;
}

/** A daemon serving one node over one transport, started once per (repeat, transport, node kind, target). */
interface Running {
  readonly target: TargetName;
  readonly transport: Transport;
  readonly child: ChildProcess;
  /** FUSE: the mounted regular file; NBD: the server's unix socket. */
  readonly endpoint: string;
  /** The image behind a file or qcow2 node ('' for null-co), warmed before each run in warm mode. */
  readonly image: string;
  /** Everything the daemon wrote to stderr/stdout, for error reports. */
  output: string;
  exited: boolean;
}

function usage(code: number): never {
  (code ? console.error : console.log)(
    'usage: npm run bench -- [--quick] [--runtime S] [--repeat N] [--filter REGEX]\n' +
      `                        [--targets ${ALL_TARGETS.join(',')}] [--file-cache warm|warm-seq|direct]\n` +
      '                        [--json FILE] [--dir DIR]\n' +
      '  --quick     smoke run: 5 FUSE and 8 NBD cells, 2 repeats of 2 s\n' +
      '  --runtime   seconds per fio run (default 3)\n' +
      '  --repeat    repeats per cell and target; the table shows medians (default 3)\n' +
      '  --filter    only cells whose name matches REGEX, e.g. "null-co rand.*libaio" or "^nbd"\n' +
      '  --targets   subset of targets, comma-separated (any qsd-* also runs the NBD qsd-ts column);\n' +
      '              qsd-ur switches FUSE-over-io_uring on in the kernel for the run and restores it after\n' +
      '  --file-cache warm (default): file/qcow2 images in the page cache in 4 KiB pages, cache.direct=off;\n' +
      '              warm-seq: in the page cache as a sequential read leaves it (large folios on ext4);\n' +
      '              direct: cache.direct=on, every request reaches the disk\n' +
      '  --json      also write the raw samples to FILE\n' +
      '  --dir       where the file and qcow2 images go (default /var/tmp; must not be tmpfs)',
  );
  process.exit(code);
}

function parseArgs(argv: string[]): Options {
  const o: Options = { quick: false, runtime: 3, repeat: 3, filter: null, targets: [...ALL_TARGETS], json: null, dir: '/var/tmp', fileCache: 'warm' };
  let runtimeSet = false;
  let repeatSet = false;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    const value = (): string => {
      const v = argv[++i];
      if (v === undefined) usage(2);
      return v;
    };
    switch (arg) {
      case '--quick': o.quick = true; break;
      case '--runtime': o.runtime = Number(value()); runtimeSet = true; break;
      case '--repeat': o.repeat = Math.trunc(Number(value())); repeatSet = true; break;
      case '--filter': o.filter = new RegExp(value()); break;
      case '--targets': {
        const names = value().split(',').filter(Boolean);
        for (const n of names) {
          if (!ALL_TARGETS.includes(n as FuseTarget)) {
            console.error(`unknown target '${n}'`);
            usage(2);
          }
        }
        o.targets = ALL_TARGETS.filter((t) => names.includes(t));
        break;
      }
      case '--json': o.json = value(); break;
      case '--file-cache': {
        const v = value();
        if (!FILE_CACHE_MODES.includes(v as FileCache)) usage(2);
        o.fileCache = v as FileCache;
        break;
      }
      case '--dir': o.dir = value(); break;
      case '-h': case '--help': usage(0); break;
      default: console.error(`unknown option '${arg}'`); usage(2);
    }
  }
  if (o.quick) {
    if (!runtimeSet) o.runtime = 2;
    if (!repeatSet) o.repeat = 2;
  }
  if (!(o.runtime > RAMP_SECONDS) || !(o.repeat >= 1)) usage(2);
  return o;
}

/** QEMU's multi-threading FUSE matrix plus qcow2 and NBD cells, or the --quick subset. */
function buildCells(o: Options): Cell[] {
  const cells: Cell[] = [];
  const fuse = (node: NodeKind, rw: Cell['rw'], engine: 'libaio' | 'psync', numjobs: number): void => {
    const iodepth = engine === 'libaio' ? 16 : 1;
    cells.push({ name: `${node} ${rw} ${engine} qd${iodepth} j${numjobs}`, transport: 'fuse', node, rw, engine, iodepth, numjobs });
  };
  const nbd = (node: NodeKind, rw: Cell['rw'], iodepth: number): void => {
    cells.push({ name: `nbd ${node} ${rw} qd${iodepth}`, transport: 'nbd', node, rw, engine: 'nbd', iodepth, numjobs: 1 });
  };
  if (o.quick) {
    fuse('null-co', 'randread', 'libaio', 1);
    fuse('null-co', 'randwrite', 'libaio', 1);
    fuse('file', 'randread', 'libaio', 1);
    fuse('qcow2', 'randread', 'libaio', 1);
    fuse('qcow2', 'randwrite', 'libaio', 1);
  } else {
    for (const node of ['null-co', 'file'] as const) {
      for (const rw of ['read', 'write', 'randread', 'randwrite'] as const) {
        for (const engine of ['libaio', 'psync'] as const) {
          for (const numjobs of [1, 4]) fuse(node, rw, engine, numjobs);
        }
      }
    }
    // qcow2 metadata lives in one context (no replicas yet), so extra jobs would only queue on it.
    for (const rw of ['randread', 'randwrite'] as const) {
      for (const engine of ['libaio', 'psync'] as const) fuse('qcow2', rw, engine, 1);
    }
  }
  // The NBD cells are few and cheap, so --quick runs all of them.
  for (const node of ['null-co', 'file'] as const) {
    for (const rw of ['randread', 'randwrite'] as const) {
      for (const iodepth of [16, 1]) nbd(node, rw, iodepth);
    }
  }
  return o.filter ? cells.filter((c) => o.filter!.test(c.name)) : cells;
}

/** Whether a FUSE target serves a node kind at all; '-' in the table otherwise. */
function fuseApplies(t: TargetName, node: NodeKind): boolean {
  if (t === 'ceiling') return node === 'null-co';
  // qcow2 is served from the main loop whatever the iothread list: 2 queues already show that.
  if (t === 'qsd-4q' || t === 'qsd-ur') return node !== 'qcow2';
  return true;
}

/** The NBD columns: QEMU if chosen, qsd-ts if any qsd-* target is. */
function nbdTargets(o: Options): TargetName[] {
  const ts: TargetName[] = [];
  if (o.targets.includes('qemu')) ts.push('qemu');
  if (o.targets.some((t) => t.startsWith('qsd-'))) ts.push('qsd-ts');
  return ts;
}

function targetsFor(transport: Transport, node: NodeKind, o: Options): TargetName[] {
  return transport === 'nbd' ? nbdTargets(o) : o.targets.filter((t) => fuseApplies(t, node));
}

// ---- process and mount housekeeping -------------------------------------------------------------

const running = new Set<Running>();
let currentFio: ChildProcess | null = null;
let interrupted = false;

function isMounted(mountpoint: string): boolean {
  const info = fs.readFileSync('/proc/self/mountinfo', 'utf8');
  return info.split('\n').some((line) => line.split(' ')[4] === mountpoint);
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** SIGTERM (which both daemons answer by unmounting), SIGKILL after 5 s, then a lazy unmount if one is left. */
async function stopDaemon(d: Running): Promise<void> {
  if (!d.exited) {
    d.child.kill('SIGTERM');
    for (let i = 0; i < 100 && !d.exited; i++) await sleep(50);
    if (!d.exited) {
      d.child.kill('SIGKILL');
      for (let i = 0; i < 40 && !d.exited; i++) await sleep(50);
    }
  }
  if (d.transport === 'fuse' && isMounted(d.endpoint)) spawnSync('umount', ['-l', d.endpoint]);
  // Both daemons leave their NBD socket behind; the next start of this target would fail on it.
  if (d.transport === 'nbd') fs.rmSync(d.endpoint, { force: true });
  running.delete(d);
}

async function stopAll(): Promise<void> {
  currentFio?.kill('SIGKILL');
  await Promise.all([...running].map(stopDaemon));
}

/** enable_uring's value before the run, when the bench changed it; null if it did not. */
let uringRestore: string | null = null;

/** Switch FUSE-over-io_uring on for the run; returns why it cannot be, or null. */
function enableFuseUring(): string | null {
  let value: string;
  try {
    value = fs.readFileSync(ENABLE_URING, 'utf8').trim();
  } catch {
    return `${ENABLE_URING} missing (kernel without FUSE-over-io_uring)`;
  }
  if (value === 'Y' || value === '1') return null;
  try {
    fs.writeFileSync(ENABLE_URING, '1');
  } catch (e) {
    return `cannot switch ${ENABLE_URING} on: ${(e as Error).message}`;
  }
  uringRestore = value;
  return null;
}

function restoreFuseUring(): void {
  if (uringRestore === null) return;
  try {
    // The parameter reads back as Y/N but is written as a boolean.
    fs.writeFileSync(ENABLE_URING, uringRestore === 'N' ? '0' : uringRestore);
    uringRestore = null;
  } catch (e) {
    console.error(`bench-fuse: could not restore ${ENABLE_URING}: ${(e as Error).message}`);
  }
}

/** Synchronous last resort for process exit paths where awaiting is impossible. */
function stopAllSync(): void {
  restoreFuseUring();
  currentFio?.kill('SIGKILL');
  for (const d of running) {
    if (!d.exited) d.child.kill('SIGKILL');
    if (d.transport === 'fuse') spawnSync('umount', ['-l', d.endpoint]);
  }
}

function onSignal(sig: NodeJS.Signals): void {
  if (interrupted) return;
  interrupted = true;
  console.error(`\n${sig}: stopping daemons and unmounting`);
  currentFio?.kill('SIGKILL');
}

// ---- targets ------------------------------------------------------------------------------------

interface Env {
  readonly fileCache: FileCache;
  readonly tmp: string;
  readonly imageDir: string;
  readonly ceilingBin: string | null;
  /** scripts/page-warm.c, compiled, in --file-cache warm mode (null: fall back to warm-seq). */
  readonly pageWarmBin: string | null;
}

function blockdevJson(target: TargetName, node: NodeKind, image: string, fileCache: FileCache): string {
  if (node === 'null-co') {
    return JSON.stringify({ driver: 'null-co', 'node-name': 'n0', size: NULL_SIZE, 'read-zeroes': true });
  }
  // QEMU's default aio=threads (what its users get); qsd-ts serves from each context's own io_uring.
  const aio = target === 'qemu' ? 'threads' : 'io_uring';
  return JSON.stringify({
    driver: node === 'qcow2' ? 'qcow2' : 'raw', 'node-name': 'n0',
    file: { driver: 'file', filename: image, cache: { direct: fileCache === 'direct' }, aio },
  });
}

function daemonArgv(target: TargetName, transport: Transport, node: NodeKind, endpoint: string, image: string, env: Env): [string, string[]] | string {
  const blockdev = ['--blockdev', blockdevJson(target, node, image, env.fileCache)];
  if (target === 'qemu' && !fs.existsSync(QEMU_BIN)) return `${QEMU_BIN} not installed`;
  if (target.startsWith('qsd-') && !fs.existsSync(path.join(repo, 'dist', 'main.js'))) return 'dist/main.js missing (npm run build)';
  if (transport === 'nbd') {
    // The same command line for both daemons: NBD served from the main loop, no iothread.
    const argv = [
      ...blockdev,
      '--nbd-server', `addr.type=unix,addr.path=${endpoint}`,
      '--export', `type=nbd,id=exp0,node-name=n0,name=${NBD_NAME},writable=on`,
    ];
    return [target === 'qemu' ? QEMU_BIN : QSD_BIN, argv];
  }
  const exportBase = { type: 'fuse', id: 'exp0', 'node-name': 'n0', mountpoint: endpoint, writable: true };
  switch (target) {
    case 'qemu':
      return [QEMU_BIN, [...blockdev, '--export', JSON.stringify(exportBase)]];
    case 'ceiling':
      if (!env.ceilingBin) return 'fuse-ceiling.c did not compile';
      return [env.ceilingBin, ['-q', '1', '-s', String(NULL_SIZE), endpoint]];
    case 'qsd-ur': {
      // The kernel's per-CPU ring queues, one iothread per CPU: each iothread serves (and is
      // pinned to) the CPU whose requests it answers.
      const ids = Array.from({ length: os.availableParallelism() }, (_, i) => `io${i}`);
      const argv = ids.flatMap((id) => ['--object', `iothread,id=${id}`]);
      argv.push(...blockdev, '--export', JSON.stringify({ ...exportBase, iothread: ids, 'io-uring': true }));
      return [QSD_BIN, argv];
    }
    default: {
      const queues = Number(target.slice(4, 5));
      const ids = Array.from({ length: queues }, (_, i) => `io${i}`);
      const argv = ids.flatMap((id) => ['--object', `iothread,id=${id}`]);
      // One queue is the single-iothread form (a string), as a user would write it.
      const iothread = queues === 1 ? ids[0] : ids;
      argv.push(...blockdev, '--export', JSON.stringify({ ...exportBase, iothread }));
      return [QSD_BIN, argv];
    }
  }
}

const nbdUri = (socket: string): string => `nbd+unix:///${NBD_NAME}?socket=${socket}`;

/** The export's size as an NBD client sees it (nbdinfo), or null while it does not answer yet. */
function nbdSize(socket: string): Promise<number | null> {
  return new Promise((resolve) => {
    const p = spawn('nbdinfo', ['--size', nbdUri(socket)], { stdio: ['ignore', 'pipe', 'ignore'] });
    let out = '';
    p.stdout.on('data', (b: Buffer) => { out += b.toString(); });
    p.on('error', () => resolve(null));
    p.on('close', (code) => resolve(code === 0 ? Number(out.trim()) : null));
  });
}

/** Start one daemon and wait until its export answers with the expected size; throws with its output otherwise. */
async function startDaemon(target: TargetName, transport: Transport, node: NodeKind, env: Env): Promise<Running> {
  const endpoint = path.join(env.tmp, `${target}-${node}.${transport === 'fuse' ? 'mnt' : 'sock'}`);
  if (transport === 'fuse') fs.writeFileSync(endpoint, '');
  const image = node === 'null-co' ? '' : ensureImage(env, target, node);
  const cmd = daemonArgv(target, transport, node, endpoint, image, env);
  if (typeof cmd === 'string') throw new Error(cmd);
  const child = spawn(cmd[0], cmd[1], { stdio: ['ignore', 'pipe', 'pipe'] });
  const d: Running = { target, transport, child, endpoint, image, output: '', exited: false };
  running.add(d);
  const collect = (b: Buffer): void => { if (d.output.length < 8192) d.output += b.toString(); };
  child.stdout!.on('data', collect);
  child.stderr!.on('data', collect);
  child.on('error', (e) => { d.output += String(e); d.exited = true; });
  // 'close', not 'exit': only then has all of its output (a crash report, say) arrived.
  child.on('close', () => { d.exited = true; });
  const want = node === 'null-co' ? NULL_SIZE : FILE_SIZE;
  const deadline = Date.now() + 15_000;
  while (Date.now() < deadline && !d.exited && !interrupted) {
    if (transport === 'nbd') {
      // The socket listens before the export exists (--nbd-server is handled first): ask for the export itself.
      if (fs.existsSync(endpoint) && (await nbdSize(endpoint)) === want) return d;
    } else if (isMounted(endpoint)) {
      // The first stat waits for FUSE_INIT; once it reports the node's size, the export serves.
      // ENOTCONN/ECONNABORTED: the daemon died behind its mount; the loop then sees it exit.
      try {
        if (fs.statSync(endpoint).size === want) return d;
      } catch {
        /* retried until the deadline or the daemon's exit */
      }
    }
    await sleep(50);
  }
  await stopDaemon(d);
  const why = d.exited ? 'exited during start-up' : `no ${transport === 'fuse' ? 'FUSE mount' : 'NBD export'} after 15 s`;
  throw new Error(`${why}: ${cmd[0]} ${cmd[1].map((a) => `'${a}'`).join(' ')}\n${gist(d.output)}`);
}

/** The telling part of a daemon's output: no stack frames or blank lines, at most 6 lines. */
function gist(output: string): string {
  return output.split('\n').filter((l) => l.trim() && !/^\s+at /.test(l)).slice(0, 6).join('\n');
}

/** Peak resident set (VmHWM, KiB) of a live process, or null once it is gone. */
function peakRssKiB(pid: number | undefined): number | null {
  if (pid === undefined) return null;
  try {
    const m = /^VmHWM:\s+(\d+) kB/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) : null;
  } catch {
    return null;
  }
}

// ---- fio ----------------------------------------------------------------------------------------

/** One time-based fio run against a FUSE-mounted file or an NBD socket; returns the summed read+write IOPS of all its jobs. */
function runFio(cell: Cell, endpoint: string, o: Options): Promise<number> {
  const args = [
    `--name=${cell.rw}`, `--rw=${cell.rw}`, `--bs=${BS}`,
    `--ioengine=${cell.engine}`, `--iodepth=${cell.iodepth}`, `--numjobs=${cell.numjobs}`,
    '--time_based', `--runtime=${Math.round((o.runtime - RAMP_SECONDS) * 1000)}ms`, `--ramp_time=${RAMP_SECONDS * 1000}ms`,
    '--randrepeat=0', '--output-format=json',
  ];
  if (cell.transport === 'nbd') {
    // fio's nbd engine (libnbd) takes the size from the server; one connection per job.
    args.push(`--uri=${nbdUri(endpoint)}`);
  } else {
    args.push(
      `--filename=${endpoint}`, '--direct=1',
      // Never lay out, extend or truncate the mounted file; it already has the node's size.
      '--fallocate=none', '--create_on_open=0', '--allow_file_create=0',
    );
  }
  return new Promise((resolve, reject) => {
    const fio = spawn('fio', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    currentFio = fio;
    let out = '';
    let err = '';
    fio.stdout.on('data', (b: Buffer) => { out += b.toString(); });
    fio.stderr.on('data', (b: Buffer) => { err += b.toString(); });
    fio.on('error', reject);
    fio.on('close', (code) => {
      currentFio = null;
      if (code !== 0) {
        // fio prints one line per failed I/O: the first two say what went wrong.
        const lines = (err.trim() || out.trim().slice(0, 500)).split('\n');
        const more = lines.length > 2 ? ` (+${lines.length - 2} more lines)` : '';
        reject(new Error(`fio exited with ${code}: ${lines.slice(0, 2).join('\n')}${more}`));
        return;
      }
      try {
        // fio may print warnings before the JSON document.
        const doc = JSON.parse(out.slice(out.indexOf('{'))) as { jobs: { read: { iops: number }; write: { iops: number } }[] };
        resolve(doc.jobs.reduce((sum, j) => sum + j.read.iops + j.write.iops, 0));
      } catch (e) {
        reject(new Error(`unreadable fio output: ${String(e)}`));
      }
    });
  });
}

// ---- set-up -------------------------------------------------------------------------------------

function compileCeiling(tmp: string, notes: string[]): string | null {
  const bin = path.join(tmp, 'fuse-ceiling');
  const r = spawnSync('cc', ['-O2', '-pthread', '-o', bin, path.join(repo, 'scripts', 'fuse-ceiling.c')], { encoding: 'utf8' });
  if (r.status !== 0) {
    notes.push(`ceiling: cc failed: ${(r.stderr || String(r.error)).trim()}`);
    return null;
  }
  return bin;
}

function compilePageWarm(tmp: string, notes: string[]): string | null {
  const bin = path.join(tmp, 'page-warm');
  const r = spawnSync('cc', ['-O2', '-o', bin, path.join(repo, 'scripts', 'page-warm.c')], { encoding: 'utf8' });
  if (r.status !== 0) {
    notes.push(`page-warm: cc failed, images warmed sequentially: ${(r.stderr || String(r.error)).trim()}`);
    return null;
  }
  return bin;
}

/** A preallocated image full of real data, so O_DIRECT reads reach the disk and not a hole. */
function makeImage(file: string): void {
  const fd = fs.openSync(file, 'w');
  try {
    const chunk = Buffer.alloc(1 << 20);
    for (let off = 0; off < FILE_SIZE; off += chunk.length) {
      chunk.fill((off >> 20) & 0xff);
      fs.writeSync(fd, chunk, 0, chunk.length, off);
    }
    fs.fdatasyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Read the whole image so every page is cached when fio starts. This VM's DAMON reclaim (kdamond)
 * evicts pages that go unused for a while, so each run warms its image again (~0.1 s when cached).
 */
function warmImage(env: Env, image: string, first: boolean): void {
  if (env.fileCache === 'direct') return;
  if (env.pageWarmBin) {
    // The first time, drop what making the image cached in large folios (a few seconds of disk reads).
    runTool(env.pageWarmBin, first ? ['--drop', image] : [image]);
    return;
  }
  const fd = fs.openSync(image, 'r');
  try {
    const chunk = Buffer.allocUnsafe(1 << 20);
    while (fs.readSync(fd, chunk, 0, chunk.length, null) > 0) { /* reading is the point */ }
  } finally {
    fs.closeSync(fd);
  }
}

function runTool(cmd: string, args: string[]): void {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${(r.stderr || String(r.error)).trim()}`);
}

/**
 * The image a target serves for a node kind, made on first use and kept for every repeat. One per
 * target, because QEMU takes a write lock on its image (the FUSE and NBD groups never run at once,
 * so they share it). qcow2: every cluster allocated up front (`convert -S 0` writes even zeroes),
 * so the cells measure steady-state I/O through the L2 tables, not cluster allocation.
 */
function ensureImage(env: Env, target: TargetName, node: 'file' | 'qcow2'): string {
  const image = path.join(env.imageDir, `${target}.${node === 'qcow2' ? 'qcow2' : 'img'}`);
  if (fs.existsSync(image)) return image;
  if (node === 'file') {
    makeImage(image);
  } else {
    const fill = path.join(env.imageDir, 'qcow2-fill.raw');
    if (!fs.existsSync(fill)) makeImage(fill);
    runTool('qemu-img', ['create', '-q', '-f', 'qcow2', image, String(FILE_SIZE)]);
    runTool('qemu-img', ['convert', '-q', '-n', '-S', '0', '-t', 'none', '-f', 'raw', '-O', 'qcow2', fill, image]);
  }
  return image;
}

// ---- results ------------------------------------------------------------------------------------

const median = (xs: number[]): number | null => {
  if (xs.length === 0) return null;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};

const kiops = (v: number | null | undefined): string => (v == null ? 'n/a' : `${(v / 1000).toFixed(1)}k`);
const ratio = (a: number | null | undefined, b: number | null | undefined): string => (a == null || b == null || b === 0 ? 'n/a' : (a / b).toFixed(2));

interface Results {
  /** samples[cell][target] = IOPS of each repeat that ran. */
  samples: Map<string, Map<TargetName, number[]>>;
  /** Peak of VmHWM over all samples, KiB, per "<transport> <target>". */
  rss: Map<string, number>;
  /** Target failures and other remarks, printed under the tables. */
  notes: string[];
  /** fio failures per "<target> <cell>": the first message and the repeats that failed, one note each. */
  fioFailures: Map<string, { message: string; repeats: number[] }>;
}

function printRows(header: string[], rows: string[][]): void {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i]!.length)));
  const fmt = (row: string[]): string => row.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join('  ');
  console.log(fmt(header));
  console.log(widths.map((w) => '-'.repeat(w)).join('  '));
  for (const row of rows) console.log(fmt(row));
  console.log('');
}

function printRss(transport: Transport, targets: TargetName[], r: Results): void {
  const parts = targets.map((t) => {
    const kib = r.rss.get(`${transport} ${t}`);
    return `${t} ${kib != null ? `${(kib / 1024).toFixed(1)} MiB` : 'n/a'}`;
  });
  console.log(`peak RSS (VmHWM): ${parts.join(' | ')}`);
}

const geomeanOf = (logs: number[]): number | null => (logs.length ? Math.exp(logs.reduce((a, b) => a + b, 0) / logs.length) : null);

/** The FUSE table, then the NBD table; returns the geometric means of qsd-ts over QEMU for each. */
function printTables(cells: Cell[], o: Options, r: Results): { fuse: number | null; nbd: number | null } {
  const med = (cell: Cell, t: TargetName): number | null => median(r.samples.get(cell.name)?.get(t) ?? []);
  let fuseGeomean: number | null = null;
  let nbdGeomean: number | null = null;

  const fuseCells = cells.filter((c) => c.transport === 'fuse');
  if (fuseCells.length) {
    console.log('FUSE');
    const qsdTargets = o.targets.filter((t) => t.startsWith('qsd-'));
    const logs: number[] = [];
    const rows = fuseCells.map((cell) => {
      const best = qsdTargets.filter((t) => fuseApplies(t, cell.node)).map((t) => med(cell, t)).filter((v): v is number => v != null);
      const qsdBest = best.length ? Math.max(...best) : null;
      const qemu = o.targets.includes('qemu') ? med(cell, 'qemu') : null;
      if (cell.rw.startsWith('rand') && qsdBest != null && qemu) logs.push(Math.log(qsdBest / qemu));
      return [
        cell.name,
        ...o.targets.map((t) => (fuseApplies(t, cell.node) ? kiops(med(cell, t)) : '-')),
        ratio(qsdBest, qemu),
        cell.node === 'null-co' ? ratio(med(cell, 'qsd-1q'), med(cell, 'ceiling')) : '-',
      ];
    });
    printRows(['cell', ...o.targets, 'qsd-best/qemu', 'qsd-1q/ceiling'], rows);
    printRss('fuse', o.targets, r);
    fuseGeomean = geomeanOf(logs);
    console.log(`geometric mean of qsd-best/qemu over random-I/O cells: ${fuseGeomean == null ? 'n/a' : fuseGeomean.toFixed(2)} (${logs.length} cells)`);
  }

  const nbdCells = cells.filter((c) => c.transport === 'nbd');
  if (nbdCells.length) {
    if (fuseCells.length) console.log('');
    console.log('NBD');
    const targets = nbdTargets(o);
    const logs: number[] = [];
    const rows = nbdCells.map((cell) => {
      const qsd = med(cell, 'qsd-ts');
      const qemu = med(cell, 'qemu');
      if (qsd != null && qemu) logs.push(Math.log(qsd / qemu));
      return [cell.name, ...targets.map((t) => kiops(med(cell, t))), ratio(qsd, qemu)];
    });
    printRows(['cell', ...targets, 'qsd-ts/qemu'], rows);
    printRss('nbd', targets, r);
    nbdGeomean = geomeanOf(logs);
    console.log(`geometric mean of qsd-ts/qemu over NBD cells: ${nbdGeomean == null ? 'n/a' : nbdGeomean.toFixed(2)} (${logs.length} cells)`);
  }
  return { fuse: fuseGeomean, nbd: nbdGeomean };
}

/** A one-line progress indicator on a terminal; nothing when the output goes to a file. */
function progress(text: string): void {
  if (process.stderr.isTTY) process.stderr.write(`\r\x1b[K${text}`);
}

// ---- main ---------------------------------------------------------------------------------------

async function main(): Promise<void> {
  const o = parseArgs(process.argv.slice(2));
  const cells = buildCells(o);
  if (cells.length === 0 || o.targets.length === 0) {
    console.error('nothing to run: --filter or --targets matched nothing');
    process.exit(2);
  }
  if (process.getuid?.() !== 0) {
    console.error('bench-fuse: must run as root (FUSE mounts)');
    process.exit(1);
  }
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(sig, onSignal);
  process.on('exit', stopAllSync);

  const results: Results = { samples: new Map(), rss: new Map(), notes: [], fioFailures: new Map() };
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'qsd-bench-fuse-'));
  let imageDir: string | null = null;
  try {
    // Groups of cells served by the same daemons: one (transport, node kind) each, in cell order.
    const groups: { transport: Transport; node: NodeKind }[] = [];
    for (const c of cells) {
      if (!groups.some((g) => g.transport === c.transport && g.node === c.node)) groups.push({ transport: c.transport, node: c.node });
    }
    const kinds = new Set(cells.map((c) => c.node));
    if (kinds.has('file') || kinds.has('qcow2')) {
      // The image must live on a disk file system: with O_DIRECT tmpfs would measure memcpy (or
      // fail), and warm reads from tmpfs through io_uring are punted to a kernel worker each.
      const fsType = spawnSync('stat', ['-f', '-c', '%T', o.dir], { encoding: 'utf8' }).stdout.trim();
      if (fsType === 'tmpfs' || fsType === 'ramfs') {
        console.error(`bench-fuse: ${o.dir} is ${fsType}; pass --dir on a disk-backed file system`);
        process.exit(1);
      }
      imageDir = fs.mkdtempSync(path.join(o.dir, 'qsd-bench-fuse-'));
      const aio = 'qemu aio=threads (its default), qsd-ts aio=io_uring';
      const cache =
        o.fileCache === 'direct' ? 'cache.direct=on'
        : o.fileCache === 'warm' ? 'cache.direct=off, image read into the page cache in 4 KiB pages before every run (scripts/page-warm.c)'
        : 'cache.direct=off, image read sequentially into the page cache before every run (large folios)';
      if (kinds.has('file')) {
        results.notes.push(`file node: raw over file, ${cache}, ${FILE_SIZE >> 20} MiB preallocated image per target in ${o.dir} (${fsType}); ${aio}`);
      }
      if (kinds.has('qcow2')) {
        results.notes.push(
          `qcow2 node: qcow2 over file, ${cache}, ${FILE_SIZE >> 20} MiB image per target, every cluster allocated before the run (qemu-img convert -n -S 0); ${aio}; ` +
            'qsd-ts serves qcow2 from its main loop whatever the iothread list, so qsd-2q shows the cost of the hop and qsd-4q is not run',
        );
      }
    }
    if (groups.some((g) => g.transport === 'nbd')) {
      results.notes.push('NBD: fio --ioengine=nbd (libnbd), one connection, over --nbd-server addr.type=unix; both daemons serve NBD from their main loop (no iothread)');
    }
    if (o.targets.includes('qsd-ur') && cells.some((c) => c.transport === 'fuse' && fuseApplies('qsd-ur', c.node))) {
      const why = enableFuseUring();
      if (why) {
        results.notes.push(`qsd-ur: not run: ${why}`);
        o.targets = o.targets.filter((t) => t !== 'qsd-ur');
      } else {
        results.notes.push(`qsd-ur: "io-uring": true with one iothread per CPU (${os.availableParallelism()}); ${ENABLE_URING} was switched on for the run${uringRestore === null ? ' (it already was)' : ' and is restored'}`);
      }
    }
    const env: Env = {
      fileCache: o.fileCache,
      tmp,
      imageDir: imageDir ?? tmp,
      ceilingBin: o.targets.includes('ceiling') && kinds.has('null-co') ? compileCeiling(tmp, results.notes) : null,
      pageWarmBin: o.fileCache === 'warm' && (kinds.has('file') || kinds.has('qcow2')) ? compilePageWarm(tmp, results.notes) : null,
    };

    const fuseCount = cells.filter((c) => c.transport === 'fuse').length;
    console.log(`${new Date().toISOString()}  ${os.cpus().length} vCPU  ${os.release()}  fio ${spawnSync('fio', ['--version'], { encoding: 'utf8' }).stdout.trim()}`);
    console.log(
      `${fuseCount} FUSE cells x up to ${o.targets.length} targets, ${cells.length - fuseCount} NBD cells x ${nbdTargets(o).length} targets, ` +
        `${o.repeat} repeats of ${o.runtime} s (first ${RAMP_SECONDS} s discarded), ${BS / 1024} KiB blocks`,
    );
    const failed = new Set<string>(); // "transport/target/node": start-up failed once; don't retry every repeat.
    const warmed = new Set<string>(); // images page-warm has dropped and re-read once

    for (let rep = 0; rep < o.repeat && !interrupted; rep++) {
      for (const { transport, node } of groups) {
        if (interrupted) break;
        const group = cells.filter((c) => c.transport === transport && c.node === node);
        const daemons = new Map<TargetName, Running>();
        try {
          for (const t of targetsFor(transport, node, o)) {
            if (interrupted) break;
            const key = `${transport}/${t}/${node}`;
            if (failed.has(key)) continue;
            progress(`[${rep + 1}/${o.repeat}] starting ${t} (${transport} ${node})`);
            try {
              daemons.set(t, await startDaemon(t, transport, node, env));
            } catch (e) {
              failed.add(key);
              results.notes.push(`${t} (${transport} ${node}): ${(e as Error).message}`);
            }
          }
          const order = [...daemons.keys()];
          for (const [ci, cell] of group.entries()) {
            // Rotate the order per repeat and per cell so no target always runs first or right after another.
            const shift = (rep + ci) % Math.max(order.length, 1);
            for (const t of [...order.slice(shift), ...order.slice(0, shift)]) {
              if (interrupted) break;
              const d = daemons.get(t)!;
              if (d.exited) continue;
              progress(`[${rep + 1}/${o.repeat}] ${cell.name} ${t}`);
              if (d.image) warmImage(env, d.image, !warmed.has(d.image));
              if (d.image) warmed.add(d.image);
              try {
                const iops = await runFio(cell, d.endpoint, o);
                const perCell = results.samples.get(cell.name) ?? new Map<TargetName, number[]>();
                results.samples.set(cell.name, perCell);
                perCell.set(t, [...(perCell.get(t) ?? []), iops]);
              } catch (e) {
                if (!interrupted) {
                  const key = `${t} ${cell.name}`;
                  const f = results.fioFailures.get(key) ?? { message: (e as Error).message, repeats: [] };
                  f.repeats.push(rep + 1);
                  results.fioFailures.set(key, f);
                }
              }
              const rss = peakRssKiB(d.child.pid);
              const rssKey = `${transport} ${t}`;
              if (rss != null) results.rss.set(rssKey, Math.max(results.rss.get(rssKey) ?? 0, rss));
              if (d.exited && !interrupted) results.notes.push(`${t} (${transport} ${node}) died during ${cell.name}: ${gist(d.output)}`);
            }
          }
        } finally {
          await Promise.all([...daemons.values()].map(stopDaemon));
        }
      }
    }
    progress('');
    if (interrupted) {
      console.log('interrupted: partial results');
    }
    console.log('');
    const geomeans = printTables(cells, o, results);
    for (const [key, f] of results.fioFailures) {
      results.notes.push(`${key} failed (repeat${f.repeats.length > 1 ? 's' : ''} ${f.repeats.join(', ')}): ${f.message}`);
    }
    if (results.notes.length) {
      console.log('\nnotes:');
      for (const n of results.notes) console.log(`- ${n.replace(/\n/g, '\n    ')}`);
    }
    if (o.json) {
      const doc = {
        date: new Date().toISOString(), cpus: os.cpus().length, kernel: os.release(),
        options: { quick: o.quick, runtime: o.runtime, repeat: o.repeat, filter: o.filter?.source ?? null, targets: o.targets, rampSeconds: RAMP_SECONDS, blockSize: BS },
        cells: cells.map((c) => ({
          ...c,
          iops: Object.fromEntries(targetsFor(c.transport, c.node, o).map((t) => {
            const xs = results.samples.get(c.name)?.get(t) ?? [];
            return [t, { samples: xs, median: median(xs) }];
          })),
        })),
        peakRssKiB: Object.fromEntries(results.rss),
        geomeanRandomQsdBestOverQemu: geomeans.fuse,
        geomeanNbdQsdOverQemu: geomeans.nbd,
        notes: results.notes,
      };
      fs.writeFileSync(o.json, `${JSON.stringify(doc, null, 2)}\n`);
    }
  } finally {
    await stopAll();
    restoreFuseUring();
    for (const dir of [tmp, imageDir]) {
      try {
        if (dir) fs.rmSync(dir, { recursive: true, force: true });
      } catch (e) {
        console.error(`bench-fuse: could not remove ${dir}: ${(e as Error).message}`);
      }
    }
  }
  if (interrupted) process.exit(130);
}

await main();
