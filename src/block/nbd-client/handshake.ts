// NBD client: connecting to a server and the fixed-newstyle handshake up to transmission.
import net from 'node:net';
import * as abi from '../../nbd/nbd-abi.js';
import type { TlsCreds } from '../../objects/tls-creds.js';
import { tlsClientSession } from '../../nbd/tls.js';
import { strerror } from '../../util/errno.js';

/** The server address, as the schema's SocketAddress (flat form). */
export type NbdServerAddress =
  | { type: 'unix'; path: string; abstract?: boolean; tight?: boolean }
  | { type: 'inet'; host: string; port: string; ipv4?: boolean; ipv6?: boolean; to?: number; 'keep-alive'?: boolean }
  | { type: 'vsock'; cid: string; port: string }
  | { type: 'fd'; str: string };

/** What the handshake asks for. */
export interface NbdHandshakeRequest {
  /** Export name ('' when the option is absent). */
  exportName: string;
  /** The meta context to ask for: 'base:allocation' or x-dirty-bitmap's. */
  metaContext: string;
  /** tls-creds (a client endpoint) and the name to check the server's certificate against. */
  tls?: { creds: TlsCreds; hostname?: string };
}

/** What the server told us about the export. */
export interface NbdExportInfo {
  size: number;
  /** Transmission flags (NBD_FLAG_*). */
  flags: number;
  structuredReply: boolean;
  /** The meta context id for block status, or -1 if the server did not select it. */
  metaContextId: number;
  minBlock: number;
  optBlock: number;
  maxBlock: number;
}

/** An error during connect or handshake; `message` is QEMU's text, errno for "Could not open image". */
export class NbdConnectError extends Error {
  /** QEMU's hints (printed on the command line, not over QMP), e.g. "server reported: ...". */
  hint?: string;

  constructor(message: string, readonly errno?: string) {
    super(message);
    this.name = 'NbdConnectError';
  }
}

/** Messages for getaddrinfo failures (gai_strerror). */
const GAI_MESSAGES: Record<string, string> = {
  ENOTFOUND: 'Name or service not known',
  EAI_AGAIN: 'Temporary failure in name resolution',
  EAI_FAIL: 'Non-recoverable failure in name resolution',
  EAI_NODATA: 'No address associated with hostname',
};

/** QEMU's "Failed to connect to '...'" part: how it names the address. */
function describeAddress(addr: NbdServerAddress): string {
  switch (addr.type) {
    case 'unix': return addr.path;
    case 'inet': return `${addr.host}:${addr.port}`;
    case 'vsock': return `${addr.cid}:${addr.port}`;
    case 'fd': return addr.str;
  }
}

/** Opens the stream socket (QEMU's socket_connect) with QEMU's error messages. */
export function connectSocket(addr: NbdServerAddress): Promise<net.Socket> {
  if (addr.type === 'fd') return Promise.reject(new NbdConnectError('only QEMU supports file descriptor passing'));
  // Node has no AF_VSOCK sockets; the kernel has no vsock transport here either.
  if (addr.type === 'vsock') return Promise.reject(new NbdConnectError(`Failed to connect to '${describeAddress(addr)}': No such device`));
  return new Promise((resolve, reject) => {
    let sock: net.Socket;
    if (addr.type === 'unix') {
      const path = addr.abstract ? `\0${addr.path}` : addr.path;
      sock = net.connect({ path });
    } else {
      const family = addr.ipv4 && !addr.ipv6 ? 4 : addr.ipv6 && !addr.ipv4 ? 6 : 0;
      sock = net.connect({ host: addr.host, port: Number(addr.port), family, keepAlive: addr['keep-alive'] ?? false });
      sock.setNoDelay(true);
    }
    const onError = (err: NodeJS.ErrnoException) => {
      sock.destroy();
      if (addr.type === 'inet' && err.syscall === 'getaddrinfo') {
        reject(new NbdConnectError(`address resolution failed for ${addr.host}:${addr.port}: ${GAI_MESSAGES[err.code ?? ''] ?? err.message}`));
        return;
      }
      reject(new NbdConnectError(`Failed to connect to '${describeAddress(addr)}': ${strerror(err)}`, err.code));
    };
    sock.once('error', onError);
    sock.once('connect', () => {
      sock.off('error', onError);
      resolve(sock);
    });
  });
}

/** Reads exact byte counts from a socket during the handshake. */
class HandshakeReader {
  private readonly chunks: Buffer[] = [];
  private have = 0;
  private waiter: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void; what: string } | undefined;
  private failure: string | undefined;
  private readonly onData = (chunk: Buffer) => {
    this.chunks.push(chunk);
    this.have += chunk.length;
    this.pump();
  };
  private readonly onEnd = () => this.fail('Unexpected end-of-file before all data were read');
  private readonly onError = (err: NodeJS.ErrnoException) => this.fail(`Unable to read from socket: ${strerror(err)}`);

  constructor(private readonly sock: net.Socket) {
    sock.on('data', this.onData);
    sock.on('end', this.onEnd);
    sock.on('error', this.onError);
  }

  private fail(why: string): void {
    this.failure ??= why;
    this.pump();
  }

  private take(n: number): Buffer {
    const out = Buffer.allocUnsafe(n);
    let off = 0;
    while (off < n) {
      const c = this.chunks[0]!;
      const k = Math.min(c.length, n - off);
      c.copy(out, off, 0, k);
      off += k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    this.have -= n;
    return out;
  }

  private pump(): void {
    const w = this.waiter;
    if (!w) return;
    if (this.have >= w.n) {
      this.waiter = undefined;
      w.resolve(this.take(w.n));
    } else if (this.failure !== undefined) {
      this.waiter = undefined;
      w.reject(new NbdConnectError(`Failed to read ${w.what}: ${this.failure}`, 'EIO'));
    }
  }

  /** `what` names the field in QEMU's "Failed to read <what>: ..." message. */
  read(n: number, what: string): Promise<Buffer> {
    return new Promise((resolve, reject) => {
      this.waiter = { n, resolve, reject, what };
      this.pump();
    });
  }

  /** Stop listening; bytes read ahead (none in a well-behaved handshake) are returned. */
  detach(): Buffer | undefined {
    this.sock.off('data', this.onData);
    this.sock.off('end', this.onEnd);
    this.sock.off('error', this.onError);
    return this.have ? this.take(this.have) : undefined;
  }
}

function sendOption(sock: net.Socket, opt: number, data: Buffer): void {
  const hdr = Buffer.alloc(abi.NBD_OPT_HEADER_SIZE);
  hdr.writeBigUInt64BE(abi.NBD_OPTS_MAGIC, 0);
  hdr.writeUInt32BE(opt, 8);
  hdr.writeUInt32BE(data.length, 12);
  sock.write(data.length ? Buffer.concat([hdr, data]) : hdr);
}

interface OptionReply {
  opt: number;
  type: number;
  data: Buffer;
}

async function readOptionReply(r: HandshakeReader, opt: number): Promise<OptionReply> {
  const hdr = await r.read(20, 'option reply');
  if (hdr.readBigUInt64BE(0) !== abi.NBD_REP_MAGIC) throw new NbdConnectError('Unexpected option reply magic', 'EINVAL');
  const replyOpt = hdr.readUInt32BE(8);
  if (replyOpt !== opt) {
    throw new NbdConnectError(`Unexpected option type ${replyOpt} (${abi.nbdOptName(replyOpt)}), expected ${opt} (${abi.nbdOptName(opt)})`, 'EINVAL');
  }
  const type = hdr.readUInt32BE(12);
  const len = hdr.readUInt32BE(16);
  if (len > abi.NBD_MAX_BUFFER_SIZE) throw new NbdConnectError('server\'s reply length is too long', 'EINVAL');
  const data = len ? await r.read(len, 'option reply payload') : Buffer.alloc(0);
  return { opt, type, data };
}

/** QEMU's nbd_handle_reply_err(): the message for an error reply to option `opt`. */
function optionError(reply: OptionReply): NbdConnectError {
  const err = optionErrorMessage(reply);
  let hint = reply.type === abi.NBD_REP_ERR_TLS_REQD ? 'Did you forget a valid tls-creds?\n' : '';
  if (reply.data.length) hint += `server reported: ${reply.data.toString('utf8')}\n`;
  if (hint) err.hint = hint;
  return err;
}

function optionErrorMessage(reply: OptionReply): NbdConnectError {
  const o = `${reply.opt} (${abi.nbdOptName(reply.opt)})`;
  switch (reply.type) {
    case abi.NBD_REP_ERR_UNSUP: return new NbdConnectError(`Unsupported option ${o}`, 'ENOTSUP');
    case abi.NBD_REP_ERR_POLICY: return new NbdConnectError(`Denied by server for option ${o}`, 'EPERM');
    case abi.NBD_REP_ERR_INVALID: return new NbdConnectError(`Invalid parameters for option ${o}`, 'EINVAL');
    case abi.NBD_REP_ERR_PLATFORM: return new NbdConnectError(`Server lacks support for option ${o}`, 'ENOTSUP');
    case abi.NBD_REP_ERR_TLS_REQD: return new NbdConnectError(`TLS negotiation required before option ${o}`, 'EINVAL');
    case abi.NBD_REP_ERR_UNKNOWN: return new NbdConnectError('Requested export not available', 'ENOENT');
    case abi.NBD_REP_ERR_SHUTDOWN: return new NbdConnectError(`Server shutting down before option ${o}`, 'ESHUTDOWN');
    case abi.NBD_REP_ERR_BLOCK_SIZE_REQD: return new NbdConnectError(`Server requires INFO_BLOCK_SIZE for option ${o}`, 'EINVAL');
    default: return new NbdConnectError(`Unknown error code when asking for option ${o}`, 'EINVAL');
  }
}

function isError(type: number): boolean {
  return (type & abi.NBD_REP_FLAG_ERROR) !== 0;
}

function nameField(name: string): Buffer {
  const b = Buffer.from(name, 'utf8');
  const out = Buffer.alloc(4 + b.length);
  out.writeUInt32BE(b.length, 0);
  b.copy(out, 4);
  return out;
}

/** NBD_OPT_SET_META_CONTEXT for one context: its id, or -1 if the server selected none. */
async function setMetaContext(sock: net.Socket, r: HandshakeReader, req: NbdHandshakeRequest): Promise<number> {
  const count = Buffer.alloc(4);
  count.writeUInt32BE(1, 0);
  sendOption(sock, abi.NBD_OPT_SET_META_CONTEXT, Buffer.concat([nameField(req.exportName), count, nameField(req.metaContext)]));
  let id = -1;
  for (;;) {
    const reply = await readOptionReply(r, abi.NBD_OPT_SET_META_CONTEXT);
    if (reply.type === abi.NBD_REP_ACK) return id;
    if (isError(reply.type)) {
      // A server without meta contexts (ERR_UNSUP) simply gives no block status.
      if (reply.type === abi.NBD_REP_ERR_UNSUP) return -1;
      throw optionError(reply);
    }
    if (reply.type !== abi.NBD_REP_META_CONTEXT || reply.data.length < 4) {
      throw new NbdConnectError(`Unexpected reply type ${reply.type} for option ${abi.NBD_OPT_SET_META_CONTEXT}`, 'EINVAL');
    }
    const name = reply.data.toString('utf8', 4);
    if (name !== req.metaContext || id !== -1) {
      throw new NbdConnectError(`Unexpected context name from server`, 'EINVAL');
    }
    id = reply.data.readUInt32BE(0);
  }
}

/** NBD_OPT_GO with NBD_INFO_BLOCK_SIZE; false if the server lacks NBD_OPT_GO. */
async function optGo(sock: net.Socket, r: HandshakeReader, req: NbdHandshakeRequest, info: NbdExportInfo): Promise<boolean> {
  const infos = Buffer.alloc(4);
  infos.writeUInt16BE(1, 0);
  infos.writeUInt16BE(abi.NBD_INFO_BLOCK_SIZE, 2);
  sendOption(sock, abi.NBD_OPT_GO, Buffer.concat([nameField(req.exportName), infos]));
  let haveExport = false;
  for (;;) {
    const reply = await readOptionReply(r, abi.NBD_OPT_GO);
    if (reply.type === abi.NBD_REP_ACK) {
      if (!haveExport) throw new NbdConnectError('broken server omitted NBD_INFO_EXPORT', 'EINVAL');
      return true;
    }
    if (isError(reply.type)) {
      if (reply.type === abi.NBD_REP_ERR_UNSUP) return false;
      throw optionError(reply);
    }
    if (reply.type !== abi.NBD_REP_INFO || reply.data.length < 2) continue;
    const infoType = reply.data.readUInt16BE(0);
    if (infoType === abi.NBD_INFO_EXPORT && reply.data.length === 12) {
      info.size = Number(reply.data.readBigUInt64BE(2));
      info.flags = reply.data.readUInt16BE(10);
      haveExport = true;
    } else if (infoType === abi.NBD_INFO_BLOCK_SIZE && reply.data.length === 14) {
      info.minBlock = reply.data.readUInt32BE(2);
      info.optBlock = reply.data.readUInt32BE(6);
      info.maxBlock = reply.data.readUInt32BE(10);
      const { minBlock: min, optBlock: opt, maxBlock: max } = info;
      if (min === 0 || (min & (min - 1)) !== 0 || min > 65536) throw new NbdConnectError(`server minimum block size ${min} is not a power of two`, 'EINVAL');
      if (opt < min || (opt & (opt - 1)) !== 0) throw new NbdConnectError(`server preferred block size ${opt} is not valid`, 'EINVAL');
      if (max < opt || max % min !== 0) throw new NbdConnectError(`server maximum block size ${max} is not valid`, 'EINVAL');
    }
    // Other information types (name, description) are of no use to a block node.
  }
}

/**
 * Connects and negotiates (QEMU's nbd_receive_negotiate): structured replies, one meta context,
 * NBD_OPT_GO (NBD_OPT_EXPORT_NAME only when the server lacks GO). Resolves in transmission
 * phase with the export's information; bytes read ahead are returned in `rest`.
 */
export async function nbdHandshake(addr: NbdServerAddress, req: NbdHandshakeRequest): Promise<{ sock: net.Socket; info: NbdExportInfo; rest?: Buffer }> {
  const conn = { sock: await connectSocket(addr), r: undefined as unknown as HandshakeReader };
  conn.r = new HandshakeReader(conn.sock);
  try {
    const info = await negotiate(conn, req);
    return { sock: conn.sock, info, rest: conn.r.detach() };
  } catch (err) {
    const { sock, r } = conn;
    r.detach();
    // As QEMU's client: say NBD_OPT_ABORT rather than just hanging up on the server.
    const abort = Buffer.alloc(abi.NBD_OPT_HEADER_SIZE);
    abort.writeBigUInt64BE(abi.NBD_OPTS_MAGIC, 0);
    abort.writeUInt32BE(abi.NBD_OPT_ABORT, 8);
    closeSocket(sock, abort);
    throw err;
  }
}

/** Sends `last` (if the socket is still writable), then closes; never waits for the peer. */
export function closeSocket(sock: net.Socket, last?: Buffer): void {
  sock.on('error', () => undefined);
  if (last && sock.writable) {
    sock.end(last);
    const timer = setTimeout(() => sock.destroy(), 1000);
    timer.unref();
    sock.once('close', () => clearTimeout(timer));
  } else {
    sock.destroy();
  }
}

/** QEMU's nbd_receive_starttls: STARTTLS, then the handshake on the same socket; `conn` switches to TLS. */
async function startTls(conn: { sock: net.Socket; r: HandshakeReader }, tls: NonNullable<NbdHandshakeRequest['tls']>): Promise<void> {
  sendOption(conn.sock, abi.NBD_OPT_STARTTLS, Buffer.alloc(0));
  const reply = await readOptionReply(conn.r, abi.NBD_OPT_STARTTLS);
  if (isError(reply.type)) throw optionError(reply);
  if (reply.type !== abi.NBD_REP_ACK) throw new NbdConnectError(`Server rejected request to start TLS ${reply.type}`, 'EINVAL');
  if (reply.data.length !== 0) throw new NbdConnectError(`Start TLS response was not zero ${reply.data.length}`, 'EINVAL');
  if (conn.r.detach()) throw new NbdConnectError('Unexpected data from server before TLS', 'EINVAL');
  try {
    conn.sock = await tlsClientSession(conn.sock, tls.creds, tls.hostname);
  } catch (err) {
    throw new NbdConnectError((err as Error).message, 'EIO');
  } finally {
    conn.r = new HandshakeReader(conn.sock);
  }
}

async function negotiate(conn: { sock: net.Socket; r: HandshakeReader }, req: NbdHandshakeRequest): Promise<NbdExportInfo> {
  let { sock, r } = conn;
  const magic = await r.read(8, 'initial magic');
  if (magic.readBigUInt64BE(0) !== abi.NBD_INIT_MAGIC) throw new NbdConnectError('Bad initial magic received', 'EINVAL');
  const magic2 = await r.read(8, 'server magic');
  if (magic2.readBigUInt64BE(0) !== abi.NBD_OPTS_MAGIC) {
    // Oldstyle servers announce no export names and no options: not supported here.
    throw new NbdConnectError('Bad server magic received', 'EINVAL');
  }
  const serverFlags = (await r.read(2, 'server flags')).readUInt16BE(0);
  const fixed = (serverFlags & abi.NBD_FLAG_FIXED_NEWSTYLE) !== 0;
  const noZeroes = (serverFlags & abi.NBD_FLAG_NO_ZEROES) !== 0;
  const clientFlags = Buffer.alloc(4);
  clientFlags.writeUInt32BE((fixed ? abi.NBD_FLAG_C_FIXED_NEWSTYLE : 0) | (noZeroes ? abi.NBD_FLAG_C_NO_ZEROES : 0), 0);
  sock.write(clientFlags);
  if (req.tls) {
    if (!fixed) throw new NbdConnectError('Server does not support STARTTLS', 'EINVAL');
    await startTls(conn, req.tls);
    ({ sock, r } = conn);
  }
  const info: NbdExportInfo = { size: 0, flags: 0, structuredReply: false, metaContextId: -1, minBlock: 0, optBlock: 0, maxBlock: 0 };
  if (fixed) {
    // Only fixed newstyle servers may be sent options they might not know.
    sendOption(sock, abi.NBD_OPT_STRUCTURED_REPLY, Buffer.alloc(0));
    const sr = await readOptionReply(r, abi.NBD_OPT_STRUCTURED_REPLY);
    if (sr.type === abi.NBD_REP_ACK) info.structuredReply = true;
    else if (!isError(sr.type)) throw new NbdConnectError(`Unexpected reply type ${sr.type} for option ${abi.NBD_OPT_STRUCTURED_REPLY}`, 'EINVAL');
    if (info.structuredReply) info.metaContextId = await setMetaContext(sock, r, req);
    if (await optGo(sock, r, req, info)) return info;
  }
  // NBD_OPT_EXPORT_NAME: the server answers with size and flags, or drops the connection.
  const name = Buffer.from(req.exportName, 'utf8');
  sendOption(sock, abi.NBD_OPT_EXPORT_NAME, name);
  const reply = await r.read(10, 'export length');
  info.size = Number(reply.readBigUInt64BE(0));
  info.flags = reply.readUInt16BE(8);
  if (!noZeroes) await r.read(124, 'export name reply padding');
  return info;
}
