// FUSE export benchmark: fio against QEMU's qemu-storage-daemon, qsd-ts (1/2/4 queues) and a C ceiling, one table.
//
// Usage: npm run bench -- [--quick] [--runtime S] [--repeat N] [--filter REGEX]
//                         [--targets qemu,qsd-1q,qsd-2q,qsd-4q,ceiling] [--json FILE] [--dir DIR]
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
const FILE_SIZE = 256 << 20;
const BS = 4096;
/** Discarded warm-up at the start of each fio run (fio --ramp_time), so a cold start counts for nobody. */
const RAMP_SECONDS = 0.5;

type NodeKind = 'null-co' | 'file';
type TargetName = 'qemu' | 'qsd-1q' | 'qsd-2q' | 'qsd-4q' | 'ceiling';
const ALL_TARGETS: readonly TargetName[] = ['qemu', 'qsd-1q', 'qsd-2q', 'qsd-4q', 'ceiling'];

interface Cell {
  /** Row label, also what --filter matches: "null-co randread libaio qd16 j1". */
  readonly name: string;
  readonly node: NodeKind;
  /** fio --rw value. */
  readonly rw: 'read' | 'write' | 'randread' | 'randwrite';
  readonly engine: 'libaio' | 'psync';
  readonly iodepth: number;
  readonly numjobs: number;
}

interface Options {
  quick: boolean;
  runtime: number;
  repeat: number;
  filter: RegExp | null;
  targets: TargetName[];
  json: string | null;
  dir: string;
}

/** A daemon serving one node over FUSE at `mountpoint`, started once per (target, node kind). */
interface Running {
  readonly target: TargetName;
  readonly child: ChildProcess;
  readonly mountpoint: string;
  /** Everything the daemon wrote to stderr/stdout, for error reports. */
  output: string;
  exited: boolean;
}

function usage(code: number): never {
  (code ? console.error : console.log)(
    'usage: npm run bench -- [--quick] [--runtime S] [--repeat N] [--filter REGEX]\n' +
      `                        [--targets ${ALL_TARGETS.join(',')}] [--json FILE] [--dir DIR]\n` +
      '  --quick     smoke run: 3 cells, 2 repeats of 2 s\n' +
      '  --runtime   seconds per fio run (default 3)\n' +
      '  --repeat    repeats per cell and target; the table shows medians (default 3)\n' +
      '  --filter    only cells whose name matches REGEX, e.g. "null-co rand.*libaio"\n' +
      '  --targets   subset of targets, comma-separated\n' +
      '  --json      also write the raw samples to FILE\n' +
      '  --dir       where the file-node images go (default /var/tmp; must not be tmpfs)',
  );
  process.exit(code);
}

function parseArgs(argv: string[]): Options {
  const o: Options = { quick: false, runtime: 3, repeat: 3, filter: null, targets: [...ALL_TARGETS], json: null, dir: '/var/tmp' };
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
          if (!ALL_TARGETS.includes(n as TargetName)) {
            console.error(`unknown target '${n}'`);
            usage(2);
          }
        }
        o.targets = ALL_TARGETS.filter((t) => names.includes(t));
        break;
      }
      case '--json': o.json = value(); break;
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

/** QEMU's multi-threading benchmark matrix, or the --quick subset. */
function buildCells(o: Options): Cell[] {
  const cells: Cell[] = [];
  const add = (node: NodeKind, rw: Cell['rw'], engine: Cell['engine'], numjobs: number): void => {
    const iodepth = engine === 'libaio' ? 16 : 1;
    cells.push({ name: `${node} ${rw} ${engine} qd${iodepth} j${numjobs}`, node, rw, engine, iodepth, numjobs });
  };
  if (o.quick) {
    add('null-co', 'randread', 'libaio', 1);
    add('null-co', 'randwrite', 'libaio', 1);
    add('file', 'randread', 'libaio', 1);
  } else {
    for (const node of ['null-co', 'file'] as const) {
      for (const rw of ['read', 'write', 'randread', 'randwrite'] as const) {
        for (const engine of ['libaio', 'psync'] as const) {
          for (const numjobs of [1, 4]) add(node, rw, engine, numjobs);
        }
      }
    }
  }
  return o.filter ? cells.filter((c) => o.filter!.test(c.name)) : cells;
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
  if (isMounted(d.mountpoint)) spawnSync('umount', ['-l', d.mountpoint]);
  running.delete(d);
}

async function stopAll(): Promise<void> {
  currentFio?.kill('SIGKILL');
  await Promise.all([...running].map(stopDaemon));
}

/** Synchronous last resort for process exit paths where awaiting is impossible. */
function stopAllSync(): void {
  currentFio?.kill('SIGKILL');
  for (const d of running) {
    if (!d.exited) d.child.kill('SIGKILL');
    spawnSync('umount', ['-l', d.mountpoint]);
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
  readonly tmp: string;
  readonly imageDir: string;
  readonly ceilingBin: string | null;
}

function blockdevJson(target: TargetName, node: NodeKind, image: string): string {
  if (node === 'null-co') {
    return JSON.stringify({ driver: 'null-co', 'node-name': 'n0', size: NULL_SIZE, 'read-zeroes': true });
  }
  // QEMU's default aio=threads (what its users get); qsd-ts serves from each queue's own io_uring.
  const aio = target === 'qemu' ? 'threads' : 'io_uring';
  return JSON.stringify({
    driver: 'raw', 'node-name': 'n0',
    file: { driver: 'file', filename: image, cache: { direct: true }, aio },
  });
}

function daemonArgv(target: TargetName, node: NodeKind, mountpoint: string, image: string, env: Env): [string, string[]] | string {
  const exportBase = { type: 'fuse', id: 'exp0', 'node-name': 'n0', mountpoint, writable: true };
  switch (target) {
    case 'qemu':
      if (!fs.existsSync(QEMU_BIN)) return `${QEMU_BIN} not installed`;
      return [QEMU_BIN, ['--blockdev', blockdevJson(target, node, image), '--export', JSON.stringify(exportBase)]];
    case 'ceiling':
      if (node !== 'null-co') return 'null cells only';
      if (!env.ceilingBin) return 'fuse-ceiling.c did not compile';
      return [env.ceilingBin, ['-q', '1', '-s', String(NULL_SIZE), mountpoint]];
    default: {
      if (!fs.existsSync(path.join(repo, 'dist', 'main.js'))) return 'dist/main.js missing (npm run build)';
      const queues = Number(target.slice(4, 5));
      const ids = Array.from({ length: queues }, (_, i) => `io${i}`);
      const argv = ids.flatMap((id) => ['--object', `iothread,id=${id}`]);
      // One queue is the single-iothread form (a string), as a user would write it.
      const iothread = queues === 1 ? ids[0] : ids;
      argv.push('--blockdev', blockdevJson(target, node, image), '--export', JSON.stringify({ ...exportBase, iothread }));
      return [QSD_BIN, argv];
    }
  }
}

/** Start one daemon and wait until its mount answers with the expected size; throws with its output otherwise. */
async function startDaemon(target: TargetName, node: NodeKind, env: Env): Promise<Running> {
  const mountpoint = path.join(env.tmp, `${target}-${node}.mnt`);
  fs.writeFileSync(mountpoint, '');
  const image = path.join(env.imageDir, `${target}.img`);
  const cmd = daemonArgv(target, node, mountpoint, image, env);
  if (typeof cmd === 'string') throw new Error(cmd);
  const child = spawn(cmd[0], cmd[1], { stdio: ['ignore', 'pipe', 'pipe'] });
  const d: Running = { target, child, mountpoint, output: '', exited: false };
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
    if (isMounted(mountpoint)) {
      // The first stat waits for FUSE_INIT; once it reports the node's size, the export serves.
      // ENOTCONN/ECONNABORTED: the daemon died behind its mount; the loop then sees it exit.
      try {
        if (fs.statSync(mountpoint).size === want) return d;
      } catch {
        /* retried until the deadline or the daemon's exit */
      }
    }
    await sleep(50);
  }
  await stopDaemon(d);
  const why = d.exited ? 'exited during start-up' : 'no FUSE mount after 15 s';
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

/** One time-based fio run; returns the summed read+write IOPS of all its jobs. */
function runFio(cell: Cell, filename: string, o: Options): Promise<number> {
  const args = [
    `--name=${cell.rw}`, `--filename=${filename}`, '--direct=1', `--rw=${cell.rw}`, `--bs=${BS}`,
    `--ioengine=${cell.engine}`, `--iodepth=${cell.iodepth}`, `--numjobs=${cell.numjobs}`,
    '--time_based', `--runtime=${Math.round((o.runtime - RAMP_SECONDS) * 1000)}ms`, `--ramp_time=${RAMP_SECONDS * 1000}ms`,
    // Never lay out, extend or truncate the mounted file; it already has the node's size.
    '--fallocate=none', '--create_on_open=0', '--allow_file_create=0',
    '--randrepeat=0', '--output-format=json',
  ];
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
        reject(new Error(`fio exited with ${code}: ${err.trim() || out.trim().slice(0, 500)}`));
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
  /** Peak of VmHWM over all samples, KiB. */
  rss: Map<TargetName, number>;
  /** Target failures and other remarks, printed under the table. */
  notes: string[];
}

function printTable(cells: Cell[], o: Options, r: Results): { geomean: number | null } {
  const qsdTargets = o.targets.filter((t) => t.startsWith('qsd-'));
  const header = ['cell', ...o.targets, 'qsd-best/qemu', 'qsd-1q/ceiling'];
  const rows: string[][] = [];
  const logs: number[] = [];
  for (const cell of cells) {
    const med = (t: TargetName): number | null => median(r.samples.get(cell.name)?.get(t) ?? []);
    const best = qsdTargets.map(med).filter((v): v is number => v != null);
    const qsdBest = best.length ? Math.max(...best) : null;
    const qemu = o.targets.includes('qemu') ? med('qemu') : null;
    if (cell.rw.startsWith('rand') && qsdBest != null && qemu) logs.push(Math.log(qsdBest / qemu));
    rows.push([
      cell.name,
      ...o.targets.map((t) => (t === 'ceiling' && cell.node !== 'null-co' ? '-' : kiops(med(t)))),
      ratio(qsdBest, qemu),
      cell.node === 'null-co' ? ratio(med('qsd-1q'), med('ceiling')) : '-',
    ]);
  }
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i]!.length)));
  const fmt = (row: string[]): string => row.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join('  ');
  console.log(fmt(header));
  console.log(widths.map((w) => '-'.repeat(w)).join('  '));
  for (const row of rows) console.log(fmt(row));
  console.log('');
  const rssParts = o.targets.map((t) => `${t} ${r.rss.has(t) ? `${(r.rss.get(t)! / 1024).toFixed(1)} MiB` : 'n/a'}`);
  console.log(`peak RSS (VmHWM): ${rssParts.join(' | ')}`);
  const geomean = logs.length ? Math.exp(logs.reduce((a, b) => a + b, 0) / logs.length) : null;
  console.log(`geometric mean of qsd-best/qemu over random-I/O cells: ${geomean == null ? 'n/a' : geomean.toFixed(2)} (${logs.length} cells)`);
  return { geomean };
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

  const results: Results = { samples: new Map(), rss: new Map(), notes: [] };
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'qsd-bench-fuse-'));
  let imageDir: string | null = null;
  try {
    const kinds = [...new Set(cells.map((c) => c.node))];
    if (kinds.includes('file')) {
      // O_DIRECT must reach a disk: tmpfs would make the file cells measure memcpy (or fail).
      const fsType = spawnSync('stat', ['-f', '-c', '%T', o.dir], { encoding: 'utf8' }).stdout.trim();
      if (fsType === 'tmpfs' || fsType === 'ramfs') {
        console.error(`bench-fuse: ${o.dir} is ${fsType}; pass --dir on a disk-backed file system`);
        process.exit(1);
      }
      imageDir = fs.mkdtempSync(path.join(o.dir, 'qsd-bench-fuse-'));
      results.notes.push(`file node: raw over file, cache.direct=on, ${FILE_SIZE >> 20} MiB preallocated image per target in ${o.dir} (${fsType}); qemu aio=threads (its default), qsd-ts aio=io_uring`);
    }
    const env: Env = {
      tmp,
      imageDir: imageDir ?? tmp,
      ceilingBin: o.targets.includes('ceiling') ? compileCeiling(tmp, results.notes) : null,
    };
    if (imageDir) for (const t of o.targets) if (t !== 'ceiling') makeImage(path.join(imageDir, `${t}.img`));

    console.log(`${new Date().toISOString()}  ${os.cpus().length} vCPU  ${os.release()}  fio ${spawnSync('fio', ['--version'], { encoding: 'utf8' }).stdout.trim()}`);
    console.log(`${cells.length} cells x ${o.targets.length} targets, ${o.repeat} repeats of ${o.runtime} s (first ${RAMP_SECONDS} s discarded), ${BS / 1024} KiB blocks, --direct=1`);
    const failed = new Set<string>(); // "target/node": start-up failed once; don't retry every repeat.

    for (let rep = 0; rep < o.repeat && !interrupted; rep++) {
      for (const node of kinds) {
        if (interrupted) break;
        const group = cells.filter((c) => c.node === node);
        const daemons = new Map<TargetName, Running>();
        try {
          for (const t of o.targets) {
            if (interrupted) break;
            if (t === 'ceiling' && node !== 'null-co') continue;
            if (failed.has(`${t}/${node}`)) continue;
            try {
              daemons.set(t, await startDaemon(t, node, env));
            } catch (e) {
              failed.add(`${t}/${node}`);
              results.notes.push(`${t} (${node}): ${(e as Error).message}`);
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
              try {
                const iops = await runFio(cell, d.mountpoint, o);
                const perCell = results.samples.get(cell.name) ?? new Map<TargetName, number[]>();
                results.samples.set(cell.name, perCell);
                perCell.set(t, [...(perCell.get(t) ?? []), iops]);
              } catch (e) {
                if (!interrupted) results.notes.push(`${t} ${cell.name} repeat ${rep + 1}: ${(e as Error).message}`);
              }
              const rss = peakRssKiB(d.child.pid);
              if (rss != null) results.rss.set(t, Math.max(results.rss.get(t) ?? 0, rss));
              if (d.exited && !interrupted) results.notes.push(`${t} (${node}) died during ${cell.name}: ${gist(d.output)}`);
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
    const { geomean } = printTable(cells, o, results);
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
          iops: Object.fromEntries(o.targets.map((t) => {
            const xs = results.samples.get(c.name)?.get(t) ?? [];
            return [t, { samples: xs, median: median(xs) }];
          })),
        })),
        peakRssKiB: Object.fromEntries(results.rss),
        geomeanRandomQsdBestOverQemu: geomean,
        notes: results.notes,
      };
      fs.writeFileSync(o.json, `${JSON.stringify(doc, null, 2)}\n`);
    }
  } finally {
    await stopAll();
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
