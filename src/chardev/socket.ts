// The socket chardev: unix or inet, listening (server) or connecting (client, with reconnect).
import net from 'node:net';
import fs from 'node:fs';
import dns from 'node:dns/promises';
import { dirname } from 'node:path';
import { Chardev, type ChardevData, type ChardevHost, type ChardevStreamHandler } from './chardev.js';
import type { ChardevBackend } from '../qapi/generated/types.js';
import { genericError } from '../qapi/errors.js';
import { strerror } from '../util/errno.js';

/** The flat form of ChardevSocket's SocketAddressLegacy. */
type FlatAddress =
  | { type: 'unix'; path: string; abstract?: boolean; tight?: boolean }
  | { type: 'inet'; host: string; port: string; numeric?: boolean; to?: number; ipv4?: boolean; ipv6?: boolean;
      'keep-alive'?: boolean; mptcp?: boolean }
  | { type: 'vsock'; cid: string; port: string }
  | { type: 'fd'; str: string };

/**
 * Where the chardev was created: QMP, or the command line with the location QEMU prefixes to
 * its notices ("--chardev socket,id=w,path=…,server=on").
 */
export type ChardevOrigin = 'qmp' | { cli: string };

/** getaddrinfo's messages for the codes Node reports (gai_strerror). */
const GAI_MESSAGES: Record<string, string> = {
  ENOTFOUND: 'Name or service not known',
  EAI_AGAIN: 'Temporary failure in name resolution',
  EAI_FAIL: 'Non-recoverable failure in name resolution',
  ENODATA: 'No address associated with hostname',
  EAI_NODATA: 'No address associated with hostname',
  EAI_FAMILY: 'ai_family not supported',
  EAI_SERVICE: 'Servname not supported for ai_socktype',
};

/**
 * getaddrinfo's service lookup: glibc takes strtoul(port) when it consumes the whole string (so
 * " 7", "+5" and "-5" are numbers) into an int, where -1 means "not a number"; htons keeps the low
 * 16 bits (99999 listens on 34463). Anything else is an /etc/services TCP name.
 */
export function resolvePort(host: string, port: string): number {
  const m = /^[ \t\n\v\f\r]*([+-]?)(\d+)$/.exec(port);
  if (m) {
    const U64 = (1n << 64n) - 1n;
    let v = BigInt(m[2]!);
    if (v > U64) v = U64; // strtoul saturates
    if (m[1] === '-') v = (-v) & U64;
    if ((v & 0xffffffffn) !== 0xffffffffn) return Number(v & 0xffffn);
  }
  try {
    const services = fs.readFileSync('/etc/services', 'utf8');
    for (const line of services.split('\n')) {
      const [entry] = line.split('#');
      const fields = entry!.trim().split(/\s+/);
      if (fields.length < 2 || !fields[1]!.endsWith('/tcp')) continue;
      if (fields[0] === port || fields.slice(2).includes(port)) return Number.parseInt(fields[1]!, 10);
    }
  } catch {
    /* no services database */
  }
  throw genericError(`address resolution failed for ${host}:${port}: ${GAI_MESSAGES.EAI_SERVICE}`);
}

/** The addresses getaddrinfo gives for host (in its order), filtered by the ipv4/ipv6 flags. */
async function resolveHost(addr: Extract<FlatAddress, { type: 'inet' }>, passive: boolean): Promise<string[]> {
  const wantV4 = addr.ipv4 ?? !addr.ipv6;
  const wantV6 = addr.ipv6 ?? !addr.ipv4;
  if (addr.host === '' && passive) return [...(wantV4 ? ['0.0.0.0'] : []), ...(wantV6 ? ['::'] : [])];
  let found: Array<{ address: string; family: number }>;
  try {
    found = await dns.lookup(addr.host === '' ? 'localhost' : addr.host, { all: true, verbatim: true });
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? '';
    throw genericError(`address resolution failed for ${addr.host}:${addr.port}: ${GAI_MESSAGES[code] ?? strerror(err)}`);
  }
  const out = found.filter((a) => (a.family === 4 ? wantV4 : wantV6)).map((a) => a.address);
  if (out.length === 0) {
    throw genericError(`address resolution failed for ${addr.host}:${addr.port}: ${GAI_MESSAGES.EAI_FAMILY}`);
  }
  return out;
}

export class SocketChardev extends Chardev {
  readonly qomType = 'chardev-socket';
  readonly isServer: boolean;
  readonly addr: FlatAddress;
  /** Open connections (a server may have several: each monitor client gets its own). */
  readonly sockets = new Set<net.Socket>();
  private readonly handlers = new Map<net.Socket, ChardevStreamHandler | undefined>();
  private server?: net.Server;
  private reconnectTimer?: NodeJS.Timeout;
  private connectErrorReported = false;
  private closed = false;
  private firstClient?: () => void;

  constructor(host: ChardevHost, id: string, backend: ChardevBackend, private readonly origin: ChardevOrigin) {
    super(host, id, backend);
    const opts = this.opts;
    this.isServer = opts.server ?? true;
    this.addr = { type: opts.addr.type, ...opts.addr.data } as FlatAddress;
  }

  private get opts(): ChardevData<'socket'> {
    return this.backend.data as ChardevData<'socket'>;
  }

  private get reconnectSeconds(): number {
    return Number(this.opts.reconnect ?? 0);
  }

  // ---- query-chardev / QOM -------------------------------------------------------------------

  /** QEMU's SocketAddress_to_str for the configured (server: bound) address. */
  private addressString(): string {
    const a = this.addr;
    switch (a.type) {
      case 'unix':
        return `unix:${a.path}${a.abstract ? `,abstract=on${(a.tight ?? true) ? ',tight=on' : ''}` : ''}`;
      case 'inet': {
        const bound = this.server?.address();
        if (bound && typeof bound === 'object') return `tcp:${bound.address}:${bound.port}`;
        return `tcp:${a.host}:${a.port}`;
      }
      case 'vsock':
        return `vsock:${a.cid}:${a.port}`;
      case 'fd':
        return `fd:${a.str}`;
    }
  }

  filename(): string {
    const listen = this.isServer ? ',server=on' : '';
    const socket = this.sockets.values().next().value as net.Socket | undefined;
    if (!socket) return `disconnected:${this.addressString()}${listen}`;
    if (this.addr.type === 'unix') {
      // The local address's sun_path: the bound path for a server, unnamed for a client.
      return `unix:${this.isServer && !this.addr.abstract ? this.addr.path : ''}${listen}`;
    }
    const wrap = (a?: string) => (a?.includes(':') ? `[${a}]` : a ?? '');
    return `tcp:${wrap(socket.localAddress)}:${socket.localPort}${listen} <-> ${wrap(socket.remoteAddress)}:${socket.remotePort}`;
  }

  get connected(): boolean {
    return this.sockets.size > 0;
  }

  /** qom-get addr: the SocketAddress, for an inet server the one actually bound. */
  address(): Record<string, unknown> {
    const a = this.addr;
    if (a.type === 'unix') {
      return a.abstract !== undefined ? { type: 'unix', path: a.path, abstract: a.abstract, tight: a.tight ?? true } : { type: 'unix', path: a.path };
    }
    const bound = this.server?.address();
    if (a.type === 'inet' && bound && typeof bound === 'object') {
      return { type: 'inet', host: bound.address, port: String(bound.port), ...(bound.family === 'IPv6' ? { ipv6: true } : { ipv4: true }) };
    }
    return { ...a };
  }

  // ---- open / close --------------------------------------------------------------------------

  /** qmp_chardev_validate_socket and the option checks before it, in QEMU's order. */
  private validate(): void {
    const opts = this.opts;
    if (opts['tls-creds'] !== undefined) throw genericError(`No TLS credentials with id '${opts['tls-creds']}'`);
    if (this.addr.type === 'fd' && opts.reconnect !== undefined) {
      throw genericError("'reconnect' option is incompatible with 'fd' address type");
    }
    if (opts['tls-authz'] !== undefined) throw genericError("'tls_authz' option requires 'tls_creds' option");
    if (this.isServer) {
      if (opts.reconnect !== undefined) throw genericError("'reconnect' option is incompatible with socket in server listen mode");
    } else {
      if (opts.websocket) throw genericError('Websocket client is not implemented');
      if (opts.wait !== undefined) throw genericError("'wait' option is incompatible with socket in client connect mode");
    }
    for (const proto of ['telnet', 'tn3270', 'websocket'] as const) {
      if (opts[proto]) throw genericError(`qsd-ts does not support the ${proto} protocol on socket chardevs`);
    }
    if (this.addr.type === 'vsock') throw genericError('qsd-ts does not support vsock socket chardevs');
  }

  protected async openBackend(): Promise<void> {
    this.validate();
    if (this.isServer) {
      await this.listen();
      if (this.opts.wait) await this.waitForFirstClient();
    } else if (this.reconnectSeconds > 0) {
      void this.connectInBackground();
    } else {
      this.adopt(await this.connect());
    }
  }

  /** server=on,wait=on: QEMU blocks until the first client connects. */
  private async waitForFirstClient(): Promise<void> {
    if (this.connected) return;
    const where = `disconnected:${this.addressString()},server=on`;
    const prefix = this.origin === 'qmp' ? '' : `${this.host.programName}: ${this.origin.cli}: `;
    process.stderr.write(`${prefix}info: QEMU waiting for connection on: ${where}\n`);
    await new Promise<void>((resolve) => (this.firstClient = resolve));
  }

  private async listen(): Promise<void> {
    const a = this.addr;
    const server = net.createServer({ allowHalfOpen: true }, (socket) => this.adopt(socket));
    const tryListen = (options: net.ListenOptions) =>
      new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(options, () => {
          server.off('error', reject);
          resolve();
        });
      });
    if (a.type === 'unix') {
      const path = a.abstract ? `\0${a.path}` : a.path;
      if (!a.abstract) {
        // QEMU unlinks whatever is at the path; we only replace a stale socket and never delete a file.
        let st: fs.Stats | undefined;
        try {
          st = fs.lstatSync(a.path);
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw genericError(`Failed to unlink socket ${a.path}: ${strerror(err)}`);
        }
        if (st?.isDirectory()) throw genericError(`Failed to unlink socket ${a.path}: ${strerror('EISDIR')}`);
        if (st?.isSocket()) {
          try {
            fs.unlinkSync(a.path);
          } catch (err) {
            throw genericError(`Failed to unlink socket ${a.path}: ${strerror(err)}`);
          }
        }
      }
      try {
        await tryListen({ path });
      } catch (err) {
        // libuv reports a missing directory as EACCES (for Windows' sake); bind(2) says ENOENT.
        const missingDir = (err as NodeJS.ErrnoException).code === 'EACCES' && !fs.existsSync(dirname(a.path));
        throw genericError(`Failed to bind socket to ${a.path}: ${strerror(missingDir ? 'ENOENT' : err)}`);
      }
      // Only the daemon's owner may talk to it (QEMU leaves it to the umask).
      if (!a.abstract) fs.chmodSync(a.path, 0o600);
    } else if (a.type === 'inet') {
      const port = resolvePort(a.host, a.port);
      const hosts = await resolveHost(a, true);
      let lastErr: unknown;
      for (const host of hosts) {
        try {
          await tryListen({ host, port, ipv6Only: host.includes(':') && a.ipv6 === true && a.ipv4 === false });
          lastErr = undefined;
          break;
        } catch (err) {
          lastErr = err;
        }
      }
      if (lastErr !== undefined) {
        if ((lastErr as NodeJS.ErrnoException).code === 'EADDRINUSE') {
          throw genericError(`Failed to find an available port: ${strerror(lastErr)}`);
        }
        throw genericError(`Failed to bind socket: ${strerror(lastErr)}`);
      }
    } else if (a.type === 'fd') {
      await tryListen({ fd: this.socketFd(a.str) } as net.ListenOptions);
    }
    this.server = server;
  }

  /**
   * A numeric fd inherited from the parent (command line). Over QMP QEMU looks the string up among
   * the monitor's passed fds, which a storage daemon doesn't have.
   */
  private socketFd(str: string): number {
    if (this.origin === 'qmp' || !/^\d+$/.test(str)) throw genericError('only QEMU supports file descriptor passing');
    const fd = Number(str);
    let isSocket = false;
    try {
      isSocket = fs.fstatSync(fd).isSocket();
    } catch {
      /* not open */
    }
    if (!isSocket) throw genericError(`File descriptor '${str}' is not a socket`);
    return fd;
  }

  /** One connection attempt; throws QEMU's "Failed to connect to …" message. */
  private async connect(): Promise<net.Socket> {
    const a = this.addr;
    const attempt = (options: net.NetConnectOpts) =>
      new Promise<net.Socket>((resolve, reject) => {
        const socket = net.connect({ ...options, allowHalfOpen: true });
        socket.once('error', reject);
        socket.once('connect', () => {
          socket.off('error', reject);
          resolve(socket);
        });
      });
    if (a.type === 'unix') {
      try {
        return await attempt({ path: a.abstract ? `\0${a.path}` : a.path });
      } catch (err) {
        throw genericError(`Failed to connect to '${a.path}': ${strerror(err)}`);
      }
    }
    if (a.type === 'fd') return new net.Socket({ fd: this.socketFd(a.str), readable: true, writable: true, allowHalfOpen: true });
    if (a.type !== 'inet') throw genericError('qsd-ts does not support vsock socket chardevs');
    const port = resolvePort(a.host, a.port);
    let lastErr: unknown;
    for (const host of await resolveHost(a, false)) {
      try {
        return await attempt({ host, port, autoSelectFamily: false });
      } catch (err) {
        lastErr = err;
      }
    }
    throw genericError(`Failed to connect to '${a.host}:${a.port}': ${strerror(lastErr)}`);
  }

  /** reconnect=N: connect without blocking the command; on failure report once, retry every N seconds. */
  private async connectInBackground(): Promise<void> {
    this.reconnectTimer = undefined;
    if (this.closed) return;
    try {
      const socket = await this.connect();
      if (this.closed) {
        socket.destroy();
        return;
      }
      this.connectErrorReported = false;
      this.adopt(socket);
    } catch (err) {
      if (this.closed) return;
      if (!this.connectErrorReported) {
        process.stderr.write(`${this.host.programName}: Unable to connect character device ${this.id}: ${(err as Error).message}\n`);
        this.connectErrorReported = true;
      }
      this.scheduleReconnect();
    }
  }

  private scheduleReconnect(): void {
    if (this.closed || this.reconnectSeconds <= 0 || this.reconnectTimer) return;
    this.reconnectTimer = setTimeout(() => void this.connectInBackground(), this.reconnectSeconds * 1000);
  }

  /** A connection is up (accepted or connected): hand it to the frontend, else drain it. */
  private adopt(socket: net.Socket): void {
    if (this.closed) {
      socket.destroy();
      return;
    }
    this.sockets.add(socket);
    if (this.opts.nodelay && this.addr.type === 'inet') socket.setNoDelay(true);
    socket.on('error', () => undefined);
    socket.on('data', (chunk: Buffer) => this.handlers.get(socket)?.feed(chunk));
    socket.on('end', () => {
      const handler = this.handlers.get(socket);
      if (handler) handler.inputEnded();
      // Without a frontend QEMU only watches for POLLHUP: a unix peer's close raises it, a TCP
      // peer's FIN does not, so a TCP chardev stays "connected" until removed, as in QEMU 7.2.
      else if (this.addr.type === 'unix') socket.end();
    });
    socket.on('close', () => {
      this.sockets.delete(socket);
      const handler = this.handlers.get(socket);
      this.handlers.delete(socket);
      handler?.closed();
      if (!this.isServer) this.scheduleReconnect();
    });
    this.handlers.set(socket, this.connectSocket(socket));
    this.firstClient?.();
    this.firstClient = undefined;
  }

  private connectSocket(socket: net.Socket): ChardevStreamHandler | undefined {
    return this.connectStream({
      write: (text) => {
        if (!socket.destroyed) socket.write(text);
      },
      get pendingOutput() {
        return socket.writableLength;
      },
      pauseInput: () => socket.pause(),
      resumeInput: () => socket.resume(),
      close: () => socket.end(),
    });
  }

  protected startFrontend(): void {
    for (const socket of this.sockets) if (!this.handlers.get(socket)) this.handlers.set(socket, this.connectSocket(socket));
  }

  protected async closeBackend(): Promise<void> {
    this.closed = true;
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = undefined;
    this.firstClient?.();
    this.firstClient = undefined;
    for (const socket of this.sockets) socket.end();
    const server = this.server;
    this.server = undefined;
    // Clients get what was written and our FIN; one that never closes its side is cut after a second.
    if (server || this.sockets.size > 0) {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, 1000);
        const done = () => {
          clearTimeout(timer);
          resolve();
        };
        if (server) server.close(done);
        else Promise.all([...this.sockets].map((s) => new Promise((r) => s.once('close', r)))).then(done, done);
      });
    }
    for (const socket of this.sockets) socket.destroy();
    if (server && this.addr.type === 'unix' && !this.addr.abstract) {
      try {
        fs.unlinkSync(this.addr.path);
      } catch {
        /* already gone */
      }
    }
  }
}
