// Test-only file protocol node on synchronous node:fs calls, for driver tests that run a format
// (qcow2) over a real image file without the io_uring file driver underneath.
import * as fs from 'node:fs';
import type { BlockDriver } from '../../../src/block/driver.js';
import { BlockNode } from '../../../src/block/node.js';

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
