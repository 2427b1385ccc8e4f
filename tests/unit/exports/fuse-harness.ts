// Test harness for FUSE export tests: a file-backed test driver, a main-thread IoContext, real tools.
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { BlockIoError, BlockNode } from '../../../src/block/node.js';
import type { BlockDriver, BlockStatus } from '../../../src/block/driver.js';
import { Worker } from 'node:worker_threads';
import { createRequire } from 'node:module';
import { pathToFileURL } from 'node:url';
import type { IoContext, QueueHandle, QueueStats } from '../../../src/iothread/context.js';
import type { ExportCommon } from '../../../src/exports/export.js';
import { fuseExportDriver, type FuseExport, type FuseExportOptions } from '../../../src/exports/fuse.js';
import { startFuseQueue } from '../../../src/exports/fuse-queue.js';
import { native } from '../../../src/native/binding.js';

const { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, SEEK_DATA, SEEK_HOLE } = native.ioConstants as Record<
  string,
  number
>;

interface TestFileState {
  fd: number;
  length: number;
}

function ioError(err: unknown): BlockIoError {
  const e = err as { errno?: number };
  return new BlockIoError(Math.abs(e.errno ?? 5) || 5, String(err));
}

/** A file-backed driver written for these tests with synchronous node:fs and native calls. */
export const testFileDriver: BlockDriver<TestFileState> = {
  name: 'test-file',
  isProtocol: true,
  async open(_node, options) {
    const fd = fs.openSync(options.filename, 'r+');
    return { fd, length: fs.fstatSync(fd).size };
  },
  async close(state) {
    fs.closeSync(state.fd);
  },
  getLength: (s) => s.length,
  async getAllocatedFileSize(s) {
    return fs.fstatSync(s.fd).blocks * 512;
  },
  requestAlignment: () => 1,
  async read(s, offset, buf) {
    try {
      let done = 0;
      while (done < buf.length) {
        const n = fs.readSync(s.fd, buf, done, buf.length - done, offset + done);
        if (n === 0) {
          buf.fill(0, done);
          break;
        }
        done += n;
      }
    } catch (err) {
      throw ioError(err);
    }
  },
  async write(s, offset, buf) {
    try {
      let done = 0;
      while (done < buf.length) done += fs.writeSync(s.fd, buf, done, buf.length - done, offset + done);
      if (offset + buf.length > s.length) s.length = offset + buf.length;
    } catch (err) {
      throw ioError(err);
    }
  },
  async writeZeroes(s, offset, bytes, flags) {
    try {
      const mode = flags.mayUnmap ? FALLOC_FL_PUNCH_HOLE! | FALLOC_FL_KEEP_SIZE! : FALLOC_FL_ZERO_RANGE!;
      native.fallocate(s.fd, mode, offset, bytes);
    } catch (err) {
      throw ioError(err);
    }
  },
  async flush(s) {
    fs.fdatasyncSync(s.fd);
  },
  async truncate(s, size, _exact, prealloc) {
    try {
      const old = s.length;
      fs.ftruncateSync(s.fd, size);
      if (prealloc === 'falloc' && size > old) native.fallocate(s.fd, 0, old, size - old);
      s.length = size;
    } catch (err) {
      throw ioError(err);
    }
  },
  async blockStatus(s, offset, bytes): Promise<BlockStatus> {
    const data = native.lseek(s.fd, offset, SEEK_DATA!);
    if (data === offset) {
      const hole = native.lseek(s.fd, offset, SEEK_HOLE!);
      const end = hole < 0 ? s.length : hole;
      return { pnum: Math.min(bytes, end - offset), data: true, zero: false, allocated: true };
    }
    const next = data < 0 ? s.length : data;
    return { pnum: Math.min(bytes, next - offset), data: false, zero: true, allocated: true };
  },
};

export async function openTestNode(filename: string, readOnly = false): Promise<BlockNode> {
  const node = new BlockNode({ nodeName: 'node0', driver: testFileDriver, readOnly, options: { filename, discard: 'unmap' } });
  node.state = await testFileDriver.open(node, { filename });
  return node;
}

/** The main loop as a context: startQueue runs startFuseQueue in this thread. */
export function mainTestContext(): IoContext {
  const ctx: IoContext = {
    name: 'main',
    iothreadId: undefined,
    async startQueue(kind: string, node: BlockNode, params: any): Promise<QueueHandle> {
      if (kind !== 'fuse') throw new Error(`unexpected queue kind ${kind}`);
      const q = startFuseQueue(node, params);
      return {
        context: ctx,
        drainBegin: () => q.drainBegin(),
        drainEnd: async () => q.drainEnd(),
        stop: () => q.stop(),
        stats: async () => q.stats(),
      };
    },
  };
  return ctx;
}

/**
 * A context per call: each queue runs in its own worker thread (fuse-worker.ts) on its own replica
 * of a test-file node over `image`, as an iothread would run it.
 */
export function workerTestContext(image: string, name: string): IoContext {
  const ctx: IoContext = {
    name,
    iothreadId: name,
    async startQueue(_kind: string, _node: BlockNode, params: any): Promise<QueueHandle> {
      // Node 20 workers do not inherit the TS loader: register tsx in the worker, then load the body.
      const worker = new Worker(
        `import(${JSON.stringify(pathToFileURL(createRequire(import.meta.url).resolve('tsx/esm/api').replace(/\.cjs$/, '.mjs')).href)}).then((m) => { m.register(); ` +
          `return import(${JSON.stringify(new URL('./fuse-worker.ts', import.meta.url).href)}); })`,
        { eval: true, workerData: { image, params } },
      );
      const waiters = new Map<number, (v: unknown) => void>();
      let nextId = 1;
      worker.on('message', (m: { id: number; result: unknown }) => waiters.get(m.id)?.(m.result));
      const exited = new Promise((resolve) => worker.once('exit', resolve));
      await new Promise<void>((resolve, reject) => {
        waiters.set(0, () => resolve());
        worker.once('error', reject);
      });
      const call = (op: string) =>
        new Promise<any>((resolve) => {
          const id = nextId++;
          waiters.set(id, resolve);
          worker.postMessage({ op, id });
        });
      return {
        context: ctx,
        drainBegin: () => call('drain-begin'),
        drainEnd: () => call('drain-end'),
        stop: async () => {
          await call('stop');
          await exited;
        },
        stats: () => call('stats') as Promise<QueueStats>,
      };
    },
  };
  return ctx;
}

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Run a tool without blocking the loop (our queues serve its requests in this thread). */
export function run(cmd: string, args: string[], timeoutMs = 30000): Promise<RunResult> {
  return new Promise((resolve) => {
    execFile(cmd, args, { timeout: timeoutMs, maxBuffer: 16 << 20 }, (err, stdout, stderr) => {
      const code = err ? ((err as { code?: unknown }).code as number) ?? 1 : 0;
      resolve({ code: typeof code === 'number' ? code : 1, stdout, stderr });
    });
  });
}

export const python = (code: string, ...args: string[]): Promise<RunResult> => run('python3', ['-c', code, ...args]);

/** One test's world: a temp dir with an image and a mountpoint file, and the exports made on them. */
export class FuseFixture {
  readonly dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qsd-fuse-'));
  readonly image = path.join(this.dir, 'img');
  readonly mountpoint = path.join(this.dir, 'mp');
  readonly exports: FuseExport[] = [];
  node: BlockNode | undefined;

  constructor(imageSize = 1 << 20) {
    fs.writeFileSync(this.mountpoint, '');
    fs.writeFileSync(this.image, '');
    fs.truncateSync(this.image, imageSize);
  }

  async export(
    opts: Partial<FuseExportOptions> & {
      writable?: boolean;
      queues?: number;
      writethrough?: boolean;
      readOnlyNode?: boolean;
      /** Serve each queue in its own worker thread instead of the main loop. */
      workers?: boolean;
    } = {},
  ): Promise<FuseExport> {
    this.node ??= await openTestNode(this.image, opts.readOnlyNode);
    const ctx = mainTestContext();
    const common: ExportCommon = {
      id: `exp${this.exports.length}`,
      nodeName: 'node0',
      node: this.node,
      writable: opts.writable ?? false,
      writethrough: opts.writethrough ?? false,
      contexts: Array.from({ length: opts.queues ?? 1 }, (_, i) => (opts.workers ? workerTestContext(this.image, `io${i}`) : ctx)),
      multithread: (opts.queues ?? 1) > 1,
    };
    const exp = await fuseExportDriver.create(common, {
      mountpoint: opts.mountpoint ?? this.mountpoint,
      growable: opts.growable,
      'allow-other': opts['allow-other'] ?? 'off',
    });
    this.exports.push(exp);
    return exp;
  }

  async cleanup(): Promise<void> {
    for (const exp of this.exports.splice(0)) {
      fuseExportDriver.requestShutdown(exp);
      await fuseExportDriver.delete(exp);
    }
    if (this.node) await testFileDriver.close(this.node.state);
    this.node = undefined;
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}

/** Our FUSE mounts still listed by the kernel (must be none after a test). */
export function staleMounts(): string[] {
  return fs
    .readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .filter((l) => l.includes(' - fuse ') && l.includes('/qsd-fuse-'));
}
