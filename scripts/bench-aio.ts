// Micro-benchmark of the aio engines: 4 KiB random O_DIRECT reads at qd1/qd16, ops/s per mode.
// Usage: tsx scripts/bench-aio.ts [seconds-per-run=3] [dir=/tmp]  (dir must support O_DIRECT: not tmpfs)
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileIo, type AioMode } from '../src/block/aio.js';
import { native } from '../src/native/binding.js';

const seconds = Number(process.argv[2] ?? 3);
const dir = fs.mkdtempSync(path.join(process.argv[3] ?? os.tmpdir(), 'qsd-bench-aio-'));
const FILE_SIZE = 64 << 20;
const BS = 4096;
const BLOCKS = FILE_SIZE / BS;

async function run(mode: AioMode, fd: number, qd: number, secs: number): Promise<number> {
  const io = fileIo(mode);
  let ops = 0;
  const deadline = performance.now() + secs * 1000;
  const worker = async (): Promise<void> => {
    const buf = native.allocAligned(BS, BS);
    while (performance.now() < deadline) {
      const n = await io.read(fd, buf, Math.floor(Math.random() * BLOCKS) * BS);
      if (n !== BS) throw new Error(`short read: ${n}`);
      ops++;
    }
  };
  await Promise.all(Array.from({ length: qd }, worker));
  return ops / secs;
}

async function main(): Promise<void> {
  const file = path.join(dir, 'disk.img');
  try {
    // Real data, not a sparse file: reads of holes would not reach the disk.
    const wfd = fs.openSync(file, 'w');
    const chunk = Buffer.alloc(1 << 20);
    for (let off = 0; off < FILE_SIZE; off += chunk.length) {
      chunk.fill(off >> 20);
      native.pwrite(wfd, chunk, off);
    }
    native.fdatasync(wfd);
    fs.closeSync(wfd);
    const fd = fs.openSync(file, fs.constants.O_RDONLY | native.ioConstants.O_DIRECT);

    console.log(`4 KiB random reads, O_DIRECT, 64 MiB file in ${dir}, ${seconds} s per run, ${os.cpus().length} vCPU`);
    console.log('mode       qd   ops/s      us/op');
    for (const qd of [1, 16]) {
      for (const mode of ['threads', 'io_uring'] as AioMode[]) {
        await run(mode, fd, qd, 0.3); // warm-up: thread pool spawned, ring created
        const rate = await run(mode, fd, qd, seconds);
        console.log(`${mode.padEnd(10)} ${String(qd).padStart(2)}  ${Math.round(rate).toString().padStart(8)}  ${(1e6 / rate).toFixed(1).padStart(8)}`);
      }
    }
    fs.closeSync(fd);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

await main();
