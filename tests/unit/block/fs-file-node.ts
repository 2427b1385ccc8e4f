// Test-only nodes for driver tests: a file protocol node on synchronous node:fs calls, and qcow2
// over it, to run the format on real images without the io_uring file driver underneath.
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import type { BlockDriver } from '../../../src/block/driver.js';
import { BlockNode } from '../../../src/block/node.js';
import { qcow2Driver } from '../../../src/block/qcow2/index.js';

/** Test-only file protocol driver on synchronous node:fs calls (the real one lives elsewhere). */
export interface FsState { fd: number; size: number }
export const fsDriver: BlockDriver<FsState> = {
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

export async function fileNode(filename: string, readOnly = false): Promise<BlockNode> {
  const n = new BlockNode({ nodeName: 'file-' + filename, driver: fsDriver, readOnly, options: { filename } });
  n.state = await fsDriver.open(n, { filename });
  return n;
}

export async function qcow2Node(filename: string, opts: { readOnly?: boolean; backing?: BlockNode; options?: Record<string, unknown>; nodeName?: string } = {}): Promise<BlockNode> {
  const file = await fileNode(filename, opts.readOnly ?? false);
  const children = new Map<string, BlockNode>([['file', file]]);
  if (opts.backing) children.set('backing', opts.backing);
  const options = { driver: 'qcow2', file: 'f', ...(opts.options ?? {}) };
  const n = new BlockNode({ nodeName: opts.nodeName ?? 'q', driver: qcow2Driver, readOnly: opts.readOnly ?? false, options, children });
  n.state = await qcow2Driver.open(n, options);
  return n;
}

export async function closeNode(n: BlockNode): Promise<void> {
  await n.driver.close(n.state);
  const f = n.children.get('file');
  if (f) await f.driver.close(f.state);
}

export function sh(cmd: string, args: string[]): string {
  return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}
