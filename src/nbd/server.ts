// The process-wide NBD server (nbd-server-start / --nbd-server): listening socket and connections.
import * as net from 'node:net';
import { accessSync, fstatSync, unlinkSync } from 'node:fs';
import { dirname } from 'node:path';
import { lookup } from 'node:dns/promises';
import { genericError } from '../qapi/errors.js';
import { NbdConnection, type NbdConnectionHost } from './connection.js';
import { lookupTlsCreds, type TlsCreds } from '../objects/tls-creds.js';
import { tlsServerSession } from './tls.js';
import { resolvePort } from '../chardev/socket.js';

/** NbdServerOptions with the flat SocketAddress (the command-line form). */
export interface NbdServerConfig {
  addr:
    | { type: 'inet'; host: string; port: string; ipv4?: boolean; ipv6?: boolean; numeric?: boolean; to?: number }
    | { type: 'unix'; path: string; abstract?: boolean; tight?: boolean }
    | { type: 'fd'; str: string }
    | { type: 'vsock'; cid: string; port: string };
  /** Connections at once; 0 = unlimited (the default). Extra clients wait, as in a listen backlog. */
  'max-connections'?: number;
  /** Seconds a client may spend in the handshake; 0 = no limit. Default 10. */
  'handshake-max-seconds'?: number;
  'tls-creds'?: string;
  'tls-authz'?: string;
}

/** SocketAddressLegacy ({type, data}) as nbd-server-start takes it over QMP. */
export interface NbdServerLegacyArgs {
  addr: { type: string; data: Record<string, any> };
  'max-connections'?: number;
  'handshake-max-seconds'?: number;
  'tls-creds'?: string;
  'tls-authz'?: string;
}

/** QEMU's default handshake limit (NBD_DEFAULT_HANDSHAKE_MAX_SECS). */
const DEFAULT_HANDSHAKE_MAX_SECONDS = 10;
/** Clients accepted beyond max-connections wait here (a bounded stand-in for the backlog). */
const MAX_WAITING = 128;

const strerror: Record<string, string> = {
  ENOENT: 'No such file or directory',
  EACCES: 'Permission denied',
  EPERM: 'Operation not permitted',
  EADDRINUSE: 'Address already in use',
  EADDRNOTAVAIL: 'Cannot assign requested address',
  ENOTDIR: 'Not a directory',
  EROFS: 'Read-only file system',
  EINVAL: 'Invalid argument',
  EAFNOSUPPORT: 'Address family not supported by protocol',
  EBADF: 'Bad file descriptor',
  ENOTSOCK: 'Socket operation on non-socket',
};

function errText(e: unknown): string {
  const err = e as NodeJS.ErrnoException;
  return (err.code && strerror[err.code]) || err.message;
}

class NbdServer implements NbdConnectionHost {
  readonly handshakeMaxSeconds: number;
  readonly tls: NbdConnectionHost['tls'];
  readonly maxConnections: number;
  private readonly connections = new Set<NbdConnection>();
  private readonly waiting: net.Socket[] = [];
  private unixPath: string | undefined;
  private stopped = false;
  private allGone: (() => void) | undefined;

  constructor(private readonly listener: net.Server, config: NbdServerConfig, creds?: TlsCreds) {
    this.handshakeMaxSeconds = config['handshake-max-seconds'] ?? DEFAULT_HANDSHAKE_MAX_SECONDS;
    // The object stays in use even if object-del removes it from /objects (QEMU holds a reference).
    const authz = config['tls-authz'];
    this.tls = creds ? (raw) => tlsServerSession(raw, creds, authz) : undefined;
    this.maxConnections = config['max-connections'] ?? 0;
    listener.on('connection', (sock) => this.onConnection(sock));
    // Errors on an accepted-but-unhandled socket must never reach the process.
    listener.on('error', () => undefined);
  }

  async listen(config: NbdServerConfig): Promise<void> {
    const { addr } = config;
    const l = this.listener;
    const listenOn = (opts: net.ListenOptions) =>
      new Promise<void>((resolve, reject) => {
        const onErr = (e: Error) => reject(e);
        l.once('error', onErr);
        l.listen(opts, () => {
          l.off('error', onErr);
          resolve();
        });
      });
    switch (addr.type) {
      case 'inet': {
        // getaddrinfo()'s service rules (numbers modulo 2^16, /etc/services names) and its wording.
        // QEMU's inet_ai_family_from_address(): ipv4=off or ipv6=on alone means IPv6 only, ipv6=off or
        // ipv4=on alone IPv4 only; a numeric host of the other family fails getaddrinfo() (EAI_ADDRFAMILY).
        if (addr.ipv4 === false && addr.ipv6 === false) throw genericError('Cannot disable IPv4 and IPv6 at same time');
        const family = addr.ipv4 === true && addr.ipv6 === true ? 0
          : addr.ipv6 === true || addr.ipv4 === false ? 6 : addr.ipv4 === true || addr.ipv6 === false ? 4 : 0;
        const port = resolvePort(addr.host, addr.port);
        const literal = net.isIP(addr.host);
        if (family !== 0 && literal !== 0 && literal !== family) {
          throw genericError(`address resolution failed for ${addr.host}:${addr.port}: Address family for hostname not supported`);
        }
        let host = addr.host === '' ? (family === 6 ? '::' : '0.0.0.0') : addr.host;
        if (family !== 0 && literal === 0 && host === addr.host) {
          try {
            host = (await lookup(addr.host, { family })).address;
          } catch {
            throw genericError(`address resolution failed for ${addr.host}:${addr.port}: Name or service not known`);
          }
        }
        try {
          await listenOn({ host, port, exclusive: true, ipv6Only: addr.ipv6 === true && addr.ipv4 === false });
        } catch (e) {
          const code = (e as NodeJS.ErrnoException).code;
          if (code === 'ENOTFOUND' || code === 'EAI_AGAIN' || code === 'EAI_NONAME') {
            throw genericError(`address resolution failed for ${addr.host}:${addr.port}: Name or service not known`);
          }
          throw genericError(`Failed to find an available port: ${errText(e)}`);
        }
        return;
      }
      case 'unix': {
        const path = addr.abstract ? `\0${addr.path}` : addr.path;
        if (Buffer.byteLength(addr.path) >= 108) {
          throw genericError(`UNIX socket path '${addr.path}' is too long`, 'Path must be less than 108 bytes\n');
        }
        if (!addr.abstract) {
          // Like QEMU, replace whatever is at the path.
          try { unlinkSync(addr.path); } catch { /* absent is fine */ }
        }
        try {
          await listenOn({ path, exclusive: true });
        } catch (e) {
          let cause = e;
          // libuv reports a missing directory as EACCES; find the real reason.
          if ((e as NodeJS.ErrnoException).code === 'EACCES' && !addr.abstract) {
            try { accessSync(dirname(addr.path)); } catch (e2) { cause = e2; }
          }
          throw genericError(`Failed to bind socket to ${addr.path}: ${errText(cause)}`);
        }
        if (!addr.abstract) this.unixPath = addr.path;
        return;
      }
      case 'fd': {
        if (!/^\d+$/.test(addr.str)) throw genericError(`Unable to parse FD number ${addr.str}`);
        let isSocket = false;
        try { isSocket = fstatSync(Number(addr.str)).isSocket(); } catch { /* bad fd */ }
        if (!isSocket) throw genericError(`File descriptor '${addr.str}' is not a socket`);
        try {
          await listenOn({ fd: Number(addr.str) } as net.ListenOptions);
        } catch (e) {
          throw genericError(`Failed to listen on fd socket: ${errText(e)}`);
        }
        return;
      }
      default:
        throw genericError('Unsupported socket address type for the NBD server');
    }
  }

  private onConnection(sock: net.Socket): void {
    if (this.stopped) {
      sock.destroy();
      return;
    }
    sock.on('error', () => undefined);
    if (this.maxConnections > 0 && this.connections.size >= this.maxConnections) {
      if (this.waiting.length >= MAX_WAITING) {
        sock.destroy();
        return;
      }
      sock.pause();
      this.waiting.push(sock);
      sock.once('close', () => {
        const i = this.waiting.indexOf(sock);
        if (i >= 0) this.waiting.splice(i, 1);
      });
      return;
    }
    this.serve(sock);
  }

  private serve(sock: net.Socket): void {
    const conn = new NbdConnection(sock, this);
    this.connections.add(conn);
    sock.resume();
    conn.start();
  }

  connectionClosed(conn: NbdConnection): void {
    this.connections.delete(conn);
    if (this.stopped) {
      if (this.connections.size === 0) this.allGone?.();
      return;
    }
    while (this.waiting.length && (this.maxConnections === 0 || this.connections.size < this.maxConnections)) {
      const s = this.waiting.shift()!;
      if (!s.destroyed) this.serve(s);
    }
  }

  async stop(): Promise<void> {
    this.stopped = true;
    for (const s of this.waiting.splice(0)) s.destroy();
    const closed = new Promise<void>((resolve) => this.listener.close(() => resolve()));
    if (this.unixPath !== undefined) {
      try { unlinkSync(this.unixPath); } catch { /* already gone */ }
    }
    const gone = this.connections.size === 0
      ? Promise.resolve()
      : new Promise<void>((resolve) => { this.allGone = resolve; });
    for (const c of this.connections) c.close();
    await Promise.all([closed, gone]);
  }

  /** Bound address, for tests using port 0. */
  address(): net.AddressInfo | string | null {
    return this.listener.address();
  }
}

let server: NbdServer | undefined;
let starting = false;

/** nbd-server-start / --nbd-server. */
export async function nbdServerStart(config: NbdServerConfig): Promise<void> {
  if (server || starting) throw genericError('NBD server already running');
  // tls-authz is looked up per connection, as QEMU does (and allowed without tls-creds in 7.2).
  const creds = config['tls-creds'] !== undefined ? lookupTlsCreds(config['tls-creds'], 'server') : undefined;
  starting = true;
  try {
    const s = new NbdServer(net.createServer({ pauseOnConnect: true }), config, creds);
    await s.listen(config);
    server = s;
  } finally {
    starting = false;
  }
}

/**
 * nbd-server-stop. QEMU first closes every NBD export (blk_exp_close_all_type) and then frees the
 * server; the command layer passes that first step as `closeAllNbdExports` (the generic export
 * registry owns the exports and emits BLOCK_EXPORT_DELETED).
 */
export async function nbdServerStop(closeAllNbdExports?: () => Promise<void>): Promise<void> {
  if (!server) throw genericError('NBD server not running');
  if (closeAllNbdExports) await closeAllNbdExports();
  const s = server;
  server = undefined;
  await s.stop();
}

export function nbdServerRunning(): boolean {
  return server !== undefined;
}

/** Where the server listens (tests with port 0 read the port here). */
export function nbdServerAddress(): net.AddressInfo | string | null {
  return server?.address() ?? null;
}

/** nbd-server-start's SocketAddressLegacy → the flat form. */
export function nbdServerConfigFromLegacy(args: NbdServerLegacyArgs): NbdServerConfig {
  const { addr, ...rest } = args;
  return { ...rest, addr: { type: addr.type, ...addr.data } as NbdServerConfig['addr'] };
}
