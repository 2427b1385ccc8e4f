// The chardevs without connections: null (discards), file (out/in/append) and pipe (DEVICE.in/.out or DEVICE).
import fs from 'node:fs';
import net from 'node:net';
import { Chardev, type ChardevData } from './chardev.js';
import { genericError } from '../qapi/errors.js';
import { strerror } from '../util/errno.js';

/** QEMU's error_setg_file_open(). */
function openOrFail(path: string, flags: number, mode?: number): number {
  try {
    return fs.openSync(path, flags, mode);
  } catch (err) {
    throw genericError(`Could not open '${path}': ${strerror(err)}`);
  }
}

function closeQuietly(fd: number | undefined): void {
  if (fd === undefined) return;
  try {
    fs.closeSync(fd);
  } catch {
    /* already closed */
  }
}

/** null: output is discarded, there is never input. */
export class NullChardev extends Chardev {
  readonly qomType = 'chardev-null';

  filename(): string {
    return 'null';
  }

  protected async openBackend(): Promise<void> {}

  protected async closeBackend(): Promise<void> {}

  protected startFrontend(): void {
    this.connectStream({ write: () => undefined, pendingOutput: 0, pauseInput() {}, resumeInput() {}, close() {} });
  }
}

/** file: output to `out` (truncated unless append), input from `in` if given. */
export class FileChardev extends Chardev {
  readonly qomType = 'chardev-file';
  private outFd?: number;
  private inFd?: number;
  private input?: fs.ReadStream;

  filename(): string {
    return 'file';
  }

  protected async openBackend(): Promise<void> {
    const opts = this.backend.data as ChardevData<'file'>;
    const { O_WRONLY, O_CREAT, O_APPEND, O_TRUNC, O_RDONLY } = fs.constants;
    // QEMU opens (and creates) the output first: a bad input path leaves the output file behind.
    this.outFd = openOrFail(opts.out, O_WRONLY | O_CREAT | (opts.append ? O_APPEND : O_TRUNC), 0o666);
    if (opts.in !== undefined) this.inFd = openOrFail(opts.in, O_RDONLY);
  }

  protected async closeBackend(): Promise<void> {
    if (this.input) {
      this.input.destroy(); // it owns inFd
      this.input = undefined;
      this.inFd = undefined;
    }
    closeQuietly(this.inFd);
    closeQuietly(this.outFd);
    this.inFd = this.outFd = undefined;
  }

  protected startFrontend(): void {
    const outFd = this.outFd;
    if (outFd === undefined) return;
    const handler = this.connectStream({
      // Regular files don't block: a synchronous write keeps the monitor's output in order.
      write: (text) => {
        try {
          fs.writeSync(outFd, text);
        } catch {
          /* QEMU drops output it cannot write */
        }
      },
      pendingOutput: 0,
      pauseInput: () => this.input?.pause(),
      resumeInput: () => this.input?.resume(),
      close: () => undefined,
    });
    if (!handler || this.inFd === undefined) return;
    this.input = fs.createReadStream('', { fd: this.inFd, autoClose: true });
    this.input.on('data', (chunk) => handler.feed(chunk as Buffer));
    this.input.on('end', () => handler.inputEnded());
    this.input.on('error', () => handler.inputEnded());
  }
}

/** pipe: DEVICE.in and DEVICE.out (both O_RDWR, as QEMU: a FIFO then never blocks), else DEVICE both ways. */
export class PipeChardev extends Chardev {
  readonly qomType = 'chardev-pipe';
  private inFd?: number;
  private outFd?: number;
  private sockets: net.Socket[] = [];

  filename(): string {
    return 'pipe';
  }

  protected async openBackend(): Promise<void> {
    const { device } = this.backend.data as ChardevData<'pipe'>;
    const tryOpen = (path: string) => {
      try {
        return fs.openSync(path, fs.constants.O_RDWR);
      } catch {
        return undefined;
      }
    };
    const inFd = tryOpen(`${device}.in`);
    const outFd = tryOpen(`${device}.out`);
    if (inFd !== undefined && outFd !== undefined) {
      this.inFd = inFd;
      this.outFd = outFd;
      return;
    }
    closeQuietly(inFd);
    closeQuietly(outFd);
    this.inFd = this.outFd = openOrFail(device, fs.constants.O_RDWR);
  }

  protected async closeBackend(): Promise<void> {
    if (this.sockets.length) {
      for (const s of this.sockets) s.destroy(); // they own the fds
    } else {
      closeQuietly(this.inFd);
      if (this.outFd !== this.inFd) closeQuietly(this.outFd);
    }
    this.sockets = [];
    this.inFd = this.outFd = undefined;
  }

  protected startFrontend(): void {
    if (this.inFd === undefined || this.outFd === undefined) return;
    const shared = this.inFd === this.outFd;
    // The fds as libuv pipes: polled, never a blocking read parked in the thread pool.
    let input: net.Socket;
    let output: net.Socket;
    try {
      input = new net.Socket({ fd: this.inFd, readable: true, writable: shared });
      output = shared ? input : new net.Socket({ fd: this.outFd, readable: false, writable: true });
    } catch {
      return; // not pollable (e.g. a regular file): the monitor gets no stream
    }
    this.sockets = shared ? [input] : [input, output];
    for (const s of this.sockets) s.on('error', () => undefined);
    const handler = this.connectStream({
      write: (text) => {
        if (!output.destroyed) output.write(text);
      },
      get pendingOutput() {
        return output.writableLength;
      },
      pauseInput: () => input.pause(),
      resumeInput: () => input.resume(),
      close: () => undefined,
    });
    input.on('data', (chunk: Buffer) => handler?.feed(chunk));
    input.on('end', () => handler?.inputEnded());
  }
}
