// Character devices QMP monitors attach to (--chardev socket/stdio), and their listeners.
import net from 'node:net';
import fs from 'node:fs';
import { Monitor, type MonitorTransport } from './connection.js';
import type { Daemon } from '../daemon.js';
import { genericError } from '../qapi/errors.js';

export interface ChardevSocketOptions {
  backend: 'socket';
  id: string;
  path?: string;
  host?: string;
  port?: string;
  server: boolean;
  wait: boolean;
}

export interface ChardevStdioOptions {
  backend: 'stdio';
  id: string;
}

export type ChardevOptions = ChardevSocketOptions | ChardevStdioOptions;

/** A chardev with at most one monitor configuration attached (--monitor chardev=…). */
export class Chardev {
  monitorConfig?: { pretty: boolean };
  server?: net.Server;
  private readonly sockets = new Set<net.Socket>();
  private firstClient?: Promise<void>;

  constructor(readonly daemon: Daemon, readonly options: ChardevOptions) {}

  get id(): string {
    return this.options.id;
  }

  /** Start listening (socket) — connections are served once a monitor is attached. */
  async open(): Promise<void> {
    const opts = this.options;
    if (opts.backend !== 'socket') return;
    if (!opts.server) throw genericError(`chardev '${opts.id}': only server sockets are supported (server=on)`);
    // Half-open: a client that shuts down its sending side still gets the replies to what it sent.
    const server = net.createServer({ allowHalfOpen: true }, (socket) => this.accept(socket));
    this.server = server;
    let resolveFirst!: () => void;
    this.firstClient = new Promise((resolve) => (resolveFirst = resolve));
    server.once('connection', () => resolveFirst());
    await new Promise<void>((resolve, reject) => {
      server.once('error', (err: NodeJS.ErrnoException) => reject(genericError(`Failed to bind socket: ${err.message}`)));
      if (opts.path !== undefined) {
        // QEMU replaces a stale socket file at the path.
        try {
          if (fs.statSync(opts.path).isSocket()) fs.unlinkSync(opts.path);
        } catch {
          /* nothing there */
        }
        server.listen(opts.path, () => resolve());
      } else {
        server.listen(Number(opts.port), opts.host || undefined, () => resolve());
      }
    });
    // Only the daemon's owner may talk to it (QEMU leaves it to the umask).
    if (opts.path !== undefined) fs.chmodSync(opts.path, 0o600);
  }

  /** server=on,wait=on: QEMU waits for the first client before going on with the command line. */
  async waitForClientIfRequested(): Promise<void> {
    const opts = this.options;
    if (opts.backend === 'socket' && opts.server && opts.wait && this.firstClient) {
      const where = opts.path !== undefined ? `unix:${opts.path}` : `tcp:${opts.host ?? ''}:${opts.port}`;
      process.stderr.write(`${this.daemon.programName}: -chardev socket,id=${opts.id}: info: QEMU waiting for connection on: disconnected:${where},server=on\n`);
      await this.firstClient;
    }
  }

  private accept(socket: net.Socket): void {
    if (!this.monitorConfig) {
      socket.destroy();
      return;
    }
    this.sockets.add(socket);
    const transport: MonitorTransport = {
      write: (text) => {
        if (!socket.destroyed) socket.write(text);
      },
      get pendingOutput() {
        return socket.writableLength;
      },
      pauseInput: () => socket.pause(),
      resumeInput: () => socket.resume(),
      close: () => socket.end(),
    };
    const monitor = new Monitor(this.daemon, transport, this.monitorConfig.pretty);
    socket.on('data', (chunk) => monitor.feed(chunk));
    socket.on('end', () => monitor.inputEnded());
    socket.on('error', () => undefined);
    socket.on('close', () => {
      this.sockets.delete(socket);
      monitor.close();
    });
  }

  /** Attach the stdio monitor: input from stdin, output to stdout. */
  attachStdio(pretty: boolean): void {
    const out = process.stdout;
    const transport: MonitorTransport = {
      write: (text) => out.write(text),
      get pendingOutput() {
        return out.writableLength;
      },
      pauseInput: () => process.stdin.pause(),
      resumeInput: () => process.stdin.resume(),
      close: () => undefined,
    };
    const monitor = new Monitor(this.daemon, transport, pretty);
    process.stdin.on('data', (chunk: Buffer) => monitor.feed(chunk));
    // End of input: what was received still runs and is answered; the daemon keeps running.
    process.stdin.on('end', () => monitor.inputEnded());
    process.stdin.on('error', () => monitor.close());
  }

  async close(): Promise<void> {
    for (const socket of this.sockets) socket.end();
    if (this.server) {
      const server = this.server;
      await new Promise<void>((resolve) => server.close(() => resolve()));
      for (const socket of this.sockets) socket.destroy();
      if (this.options.backend === 'socket' && this.options.path !== undefined) {
        try {
          fs.unlinkSync(this.options.path);
        } catch {
          /* already gone */
        }
      }
    }
    if (this.options.backend === 'stdio') process.stdin.pause();
  }
}
