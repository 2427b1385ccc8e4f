// nbd: a protocol node whose data lives on an NBD server (QEMU's block/nbd.c, the client).
import { constants as osConstants } from 'node:os';
import type { BlockDriver, BlockStatus, WriteFlags, ZeroFlags } from '../driver.js';
import { BlockIoError } from '../node.js';
import { genericError } from '../../qapi/errors.js';
import * as abi from '../../nbd/nbd-abi.js';
import { strerror } from '../../util/errno.js';
import { lookupTlsCreds } from '../../objects/tls-creds.js';
import { discRequest, NbdClient, type NbdExtent } from './client.js';
import { closeSocket, nbdHandshake, NbdConnectError, type NbdExportInfo, type NbdHandshakeRequest, type NbdServerAddress } from './handshake.js';

const { EIO, ENOTSUP, EACCES, EINVAL } = osConstants.errno;
/** QEMU's INT_MAX-based discard/status limits. */
const INT_MAX = 0x7fffffff;
/** Pause between reconnect attempts while requests wait (reconnect-delay). */
const RECONNECT_RETRY_MS = 1000;

interface NbdState {
  addr: NbdServerAddress;
  req: NbdHandshakeRequest;
  /** Seconds requests wait for a lost connection to come back (reconnect-delay). */
  reconnectDelay: number;
  /** The export as the first connection saw it; reconnects must agree on its size. */
  info: NbdExportInfo;
  client: NbdClient | undefined;
  /** Requests wait for a reconnect until this time (ms); after it they fail at once. */
  waitDeadline: number;
  /** The running reconnect attempt(s), if any. */
  reconnecting: Promise<void> | undefined;
  closed: boolean;
  /** Request alignment: the server's minimum block, else QEMU's guess. */
  align: number;
  /** Largest READ/WRITE/WRITE_ZEROES payload in one request. */
  maxTransfer: number;
  /** Serializes read-modify-write of partial blocks when align > 1. */
  rmw: Promise<void>;
}

function hasFlag(st: NbdState, flag: number): boolean {
  return (st.info.flags & flag) !== 0;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** The first connection: retried for open-timeout seconds (QEMU's nbd_open with open-timeout). */
async function firstConnect(addr: NbdServerAddress, req: NbdHandshakeRequest, openTimeout: number) {
  const deadline = Date.now() + openTimeout * 1000;
  for (;;) {
    try {
      return await nbdHandshake(addr, req);
    } catch (err) {
      if (!(err instanceof NbdConnectError) || Date.now() >= deadline) throw err;
      await sleep(Math.min(RECONNECT_RETRY_MS, Math.max(0, deadline - Date.now())));
    }
  }
}

function attach(st: NbdState, sock: Awaited<ReturnType<typeof nbdHandshake>>): void {
  st.client = new NbdClient(sock.sock, sock.info, () => onConnectionLost(st), sock.rest);
}

/** The connection broke: requests wait reconnect-delay seconds for a new one (QEMU's CONNECTING_WAIT). */
function onConnectionLost(st: NbdState): void {
  st.client = undefined;
  if (st.closed) return;
  st.waitDeadline = Date.now() + st.reconnectDelay * 1000;
  if (st.reconnectDelay > 0) startReconnect(st);
}

/** Reconnect in the background: retried while requests may still wait, else a single attempt. */
function startReconnect(st: NbdState): Promise<void> {
  st.reconnecting ??= (async () => {
    try {
      for (;;) {
        try {
          const conn = await nbdHandshake(st.addr, st.req);
          if (st.closed || conn.info.size !== st.info.size) {
            // A server whose export changed size is not the one we were talking to.
            conn.sock.destroy();
            return;
          }
          st.info = conn.info;
          attach(st, conn);
          return;
        } catch {
          if (st.closed || Date.now() + RECONNECT_RETRY_MS > st.waitDeadline) return;
          await sleep(RECONNECT_RETRY_MS);
        }
      }
    } finally {
      st.reconnecting = undefined;
    }
  })();
  return st.reconnecting;
}

/** The live connection, or EIO once waiting for a reconnect is no longer allowed. */
async function connection(st: NbdState): Promise<NbdClient> {
  const c = st.client;
  if (c !== undefined && c.connected) return c;
  if (st.closed) throw new BlockIoError(EIO, 'NBD node is closed');
  const pending = startReconnect(st);
  const wait = st.waitDeadline - Date.now();
  if (wait > 0) {
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([pending, new Promise<void>((resolve) => (timer = setTimeout(resolve, wait)))]);
    clearTimeout(timer);
    if (st.client?.connected) return st.client;
  }
  throw new BlockIoError(EIO, 'NBD server not connected');
}

function send(st: NbdState, cmd: number, flags: number, offset: number, len: number, buf?: Buffer): Promise<NbdExtent | undefined> {
  // Hot path: a live connection takes the request without another promise in between.
  const c = st.client;
  if (c !== undefined && c.connected) return c.send(cmd, flags, offset, len, buf);
  return connection(st).then((conn) => conn.send(cmd, flags, offset, len, buf));
}

/** READ of an aligned range within the export, split at maxTransfer. */
async function readAligned(st: NbdState, offset: number, buf: Buffer): Promise<void> {
  // The block layer rounds the size up to sectors: the part past the export's end reads as zeroes.
  const size = st.info.size;
  if (offset >= size) {
    buf.fill(0);
    return;
  }
  if (offset + buf.length > size) {
    buf.fill(0, size - offset);
    buf = buf.subarray(0, size - offset);
  }
  if (buf.length <= st.maxTransfer) {
    await send(st, abi.NBD_CMD_READ, 0, offset, buf.length, buf);
    return;
  }
  const parts: Array<Promise<unknown>> = [];
  for (let done = 0; done < buf.length; done += st.maxTransfer) {
    const piece = buf.subarray(done, Math.min(buf.length, done + st.maxTransfer));
    parts.push(send(st, abi.NBD_CMD_READ, 0, offset + done, piece.length, piece));
  }
  await Promise.all(parts);
}

async function writeAligned(st: NbdState, offset: number, buf: Buffer, flags: WriteFlags): Promise<void> {
  const fua = flags.fua && hasFlag(st, abi.NBD_FLAG_SEND_FUA) ? abi.NBD_CMD_FLAG_FUA : 0;
  if (buf.length <= st.maxTransfer) {
    await send(st, abi.NBD_CMD_WRITE, fua, offset, buf.length, buf);
  } else {
    const parts: Array<Promise<unknown>> = [];
    for (let done = 0; done < buf.length; done += st.maxTransfer) {
      const piece = buf.subarray(done, Math.min(buf.length, done + st.maxTransfer));
      parts.push(send(st, abi.NBD_CMD_WRITE, fua, offset + done, piece.length, piece));
    }
    await Promise.all(parts);
  }
  // Without the server's FUA the block layer emulates it with a flush.
  if (flags.fua && !fua) await flush(st);
}

async function flush(st: NbdState): Promise<void> {
  if (!hasFlag(st, abi.NBD_FLAG_SEND_FLUSH)) return;
  await send(st, abi.NBD_CMD_FLUSH, 0, 0, 0);
}

/** Runs fn with partial blocks held exclusively (a server minimum block size above 1). */
function serialized<T>(st: NbdState, fn: () => Promise<T>): Promise<T> {
  const run = st.rmw.then(fn);
  st.rmw = run.then(() => undefined, () => undefined);
  return run;
}

function alignedRange(st: NbdState, offset: number, len: number): { start: number; end: number } {
  const start = offset - (offset % st.align);
  return { start, end: Math.ceil((offset + len) / st.align) * st.align };
}

/** Protocol limits as QEMU's nbd_refresh_limits() derives them. */
function limits(info: NbdExportInfo): { align: number; maxTransfer: number } {
  const align = info.minBlock || (info.size % 512 !== 0 || info.metaContextId >= 0 ? 1 : 512);
  const maxTransfer = Math.min(abi.NBD_MAX_BUFFER_SIZE, info.maxBlock || abi.NBD_MAX_BUFFER_SIZE);
  return { align, maxTransfer: maxTransfer - (maxTransfer % align) };
}

/**
 * QEMU's nbd_refresh_filename(): an nbd:// or nbd+unix:// URI when the address can be written as
 * one, otherwise json: with the driver's strong options (server.*, export, tls-creds, tls-hostname).
 */
export function nbdFilename(options: Record<string, any>, toJson: (value: unknown) => string): string {
  const server = options.server as NbdServerAddress;
  const exp: string | undefined = options.export;
  let uri: string | undefined;
  if (server.type === 'unix') {
    uri = exp !== undefined ? `nbd+unix:///${exp}?socket=${server.path}` : `nbd+unix://?socket=${server.path}`;
  } else if (server.type === 'inet' && server.ipv4 === undefined && server.ipv6 === undefined && server.to === undefined) {
    uri = exp !== undefined ? `nbd://${server.host}:${server.port}/${exp}` : `nbd://${server.host}:${server.port}`;
  }
  // QEMU keeps the filename in a PATH_MAX buffer; a longer URI falls back to json:.
  if (uri !== undefined && Buffer.byteLength(uri) < 4096) return uri;
  const flat: Record<string, unknown> = { driver: 'nbd' };
  for (const [k, v] of Object.entries(server)) flat[`server.${k}`] = v;
  for (const k of ['export', 'tls-creds', 'tls-hostname']) if (options[k] !== undefined) flat[k] = options[k];
  return `json:${toJson(flat)}`;
}

export const nbdDriver: BlockDriver<NbdState> = {
  name: 'nbd',
  isProtocol: true,

  async open(node, options) {
    const {
      server, export: exportName, 'tls-creds': tlsCreds, 'x-dirty-bitmap': dirtyBitmap,
      'reconnect-delay': reconnectDelay = 0, 'open-timeout': openTimeout = 0,
    } = options;
    const req: NbdHandshakeRequest = { exportName: exportName ?? '', metaContext: dirtyBitmap ?? 'base:allocation' };
    if (tlsCreds !== undefined) {
      // QEMU checks the server's certificate against tls-hostname, else an inet address's host.
      const hostname = options['tls-hostname'] ?? (server.type === 'inet' ? server.host : undefined);
      req.tls = { creds: lookupTlsCreds(tlsCreds, 'client'), hostname };
    }
    let conn;
    try {
      conn = await firstConnect(server, req, Number(openTimeout));
    } catch (err) {
      if (err instanceof NbdConnectError) throw genericError(err.message, err.hint);
      throw err;
    }
    const { info } = conn;
    // QEMU 7.2 reports these through the generic "Could not open image" with only the errno.
    const refuse = (errno: number): never => {
      closeSocket(conn.sock, discRequest());
      throw genericError(`Could not open image: ${strerror(errno)}`);
    };
    if (dirtyBitmap !== undefined && info.metaContextId < 0) refuse(EINVAL);
    if (info.flags & abi.NBD_FLAG_READ_ONLY && !node.readOnly) {
      if (!node.options['auto-read-only']) refuse(EACCES);
      node.readOnly = true;
    }
    const st: NbdState = {
      addr: server, req, reconnectDelay: Number(reconnectDelay), info, client: undefined,
      waitDeadline: 0, reconnecting: undefined, closed: false, ...limits(info), rmw: Promise.resolve(),
    };
    attach(st, conn);
    return st;
  },

  async close(st) {
    st.closed = true;
    st.client?.disconnect();
    st.client = undefined;
  },

  getLength: (st) => st.info.size,
  // NBD cannot tell how much the export occupies on the server.
  getAllocatedFileSize: async () => NaN,
  requestAlignment: (st) => st.align,
  optimalTransfer: (st) => (st.info.optBlock > st.align ? st.info.optBlock : 0),

  async read(st, offset, buf) {
    if (st.align === 1 || (offset % st.align === 0 && buf.length % st.align === 0)) return readAligned(st, offset, buf);
    const { start, end } = alignedRange(st, offset, buf.length);
    const bounce = Buffer.allocUnsafe(end - start);
    await readAligned(st, start, bounce);
    bounce.copy(buf, 0, offset - start, offset - start + buf.length);
  },

  async write(st, offset, buf, flags) {
    if (st.align === 1 || (offset % st.align === 0 && buf.length % st.align === 0)) return writeAligned(st, offset, buf, flags);
    return serialized(st, async () => {
      const { start, end } = alignedRange(st, offset, buf.length);
      const bounce = Buffer.allocUnsafe(end - start);
      await readAligned(st, start, bounce);
      buf.copy(bounce, offset - start);
      await writeAligned(st, start, bounce, flags);
    });
  },

  async writeZeroes(st, offset, bytes, flags: ZeroFlags) {
    if (!hasFlag(st, abi.NBD_FLAG_SEND_WRITE_ZEROES) || (flags.noFallback && !hasFlag(st, abi.NBD_FLAG_SEND_FAST_ZERO))) {
      if (flags.noFallback) throw new BlockIoError(ENOTSUP, 'write zeroes not supported by the NBD server');
      // The block layer's fallback: write zero buffers.
      const chunk = Buffer.alloc(Math.min(bytes, 1 << 20));
      for (let done = 0; done < bytes; done += chunk.length) {
        const n = Math.min(chunk.length, bytes - done);
        await nbdDriver.write!(st, offset + done, chunk.subarray(0, n), { fua: flags.fua });
      }
      return;
    }
    let cmdFlags = 0;
    if (flags.fua && hasFlag(st, abi.NBD_FLAG_SEND_FUA)) cmdFlags |= abi.NBD_CMD_FLAG_FUA;
    if (!flags.mayUnmap) cmdFlags |= abi.NBD_CMD_FLAG_NO_HOLE;
    if (flags.noFallback) cmdFlags |= abi.NBD_CMD_FLAG_FAST_ZERO;
    const max = st.maxTransfer;
    for (let done = 0; done < bytes; done += max) {
      await send(st, abi.NBD_CMD_WRITE_ZEROES, cmdFlags, offset + done, Math.min(max, bytes - done));
    }
    if (flags.fua && !(cmdFlags & abi.NBD_CMD_FLAG_FUA)) await flush(st);
  },

  async discard(st, offset, bytes) {
    if (!hasFlag(st, abi.NBD_FLAG_SEND_TRIM)) return;
    const max = INT_MAX - (INT_MAX % st.align);
    for (let done = 0; done < bytes; done += max) {
      await send(st, abi.NBD_CMD_TRIM, 0, offset + done, Math.min(max, bytes - done));
    }
  },

  flush,

  async blockStatus(st, offset, bytes): Promise<BlockStatus> {
    if (st.info.metaContextId < 0) return { pnum: bytes, data: true, zero: false, allocated: true, depth: 1, offset };
    // Past the export's end (the sector-rounded tail) reads as zeroes.
    if (offset >= st.info.size) return { pnum: bytes, data: false, zero: true, allocated: true, depth: 1, offset };
    const len = Math.min(bytes, st.info.size - offset, INT_MAX - (INT_MAX % st.align));
    const ext = (await send(st, abi.NBD_CMD_BLOCK_STATUS, abi.NBD_CMD_FLAG_REQ_ONE, offset, len))!;
    const data = (ext.flags & abi.NBD_STATE_HOLE) === 0;
    const zero = (ext.flags & abi.NBD_STATE_ZERO) !== 0;
    return { pnum: ext.length, data, zero, allocated: data || zero, depth: data || zero ? 1 : 0, offset };
  },

  filename: (node, toJson) => nbdFilename(node.options, toJson),
};
