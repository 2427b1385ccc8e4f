// NBD client transmission phase: many requests in flight on one socket, replies matched by handle.
import type net from 'node:net';
import { constants as osConstants } from 'node:os';
import * as abi from '../../nbd/nbd-abi.js';
import { BlockIoError } from '../node.js';
import { closeSocket, type NbdExportInfo } from './handshake.js';

const { EIO, EPERM, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP } = osConstants.errno;
/** Linux's ESHUTDOWN (absent from Node's errno table). */
const ESHUTDOWN = 108;

/** Requests in flight per connection (QEMU's MAX_NBD_REQUESTS). */
export const MAX_NBD_REQUESTS = 16;
/** Longest non-data payload (error message, block status) we accept in one chunk. */
const MAX_CHUNK_PAYLOAD = 1 << 20;

/** NBD wire error → host errno (QEMU's nbd_errno_to_system_errno). */
function systemErrno(err: number): number {
  switch (err) {
    case abi.NBD_EPERM: return EPERM;
    case abi.NBD_EIO: return EIO;
    case abi.NBD_ENOMEM: return ENOMEM;
    case abi.NBD_ENOSPC: return ENOSPC;
    case abi.NBD_EOVERFLOW: return EOVERFLOW;
    case abi.NBD_ENOTSUP: return ENOTSUP;
    case abi.NBD_ESHUTDOWN: return ESHUTDOWN;
    case abi.NBD_EINVAL: return EINVAL;
    default: return EINVAL;
  }
}

/** An NBD_CMD_DISC request (no reply follows). */
export function discRequest(): Buffer {
  const h = Buffer.alloc(abi.NBD_REQUEST_SIZE);
  h.writeUInt32BE(abi.NBD_REQUEST_MAGIC, 0);
  h.writeUInt16BE(abi.NBD_CMD_DISC, 6);
  return h;
}

/** One extent of a block status reply (REQ_ONE: one per request). */
export interface NbdExtent {
  length: number;
  flags: number;
}

/** A request slot: its header buffer is allocated once and reused. */
class Slot {
  readonly hdr = Buffer.alloc(abi.NBD_REQUEST_SIZE);
  busy = false;
  cmd = 0;
  offset = 0;
  len = 0;
  /** READ destination. */
  buf: Buffer | undefined;
  /** First error chunk's errno (a structured reply goes on until DONE). */
  errno = 0;
  extent: NbdExtent | undefined;
  resolve: (v: NbdExtent | undefined) => void = () => undefined;
  reject: (e: Error) => void = () => undefined;

  constructor(index: number) {
    this.hdr.writeUInt32BE(abi.NBD_REQUEST_MAGIC, 0);
    // Handle (bytes 8..15): the slot index in the high word, so a reply finds its slot in O(1),
    // and a sequence number in the low word, so a stray reply for an earlier use is caught.
    this.hdr.writeUInt32BE(index, 8);
  }
}

type Phase = 'header' | 'chunk-header' | 'simple-data' | 'data-offset' | 'chunk-data' | 'chunk-payload' | 'dead';

/**
 * One connected NBD client in transmission phase. send() resolves when the request's reply is
 * complete; a broken connection fails every request in flight with EIO and calls onDead once.
 */
export class NbdClient {
  private readonly slots: Slot[] = [];
  private readonly freeSlots: Slot[] = [];
  private readonly waiters: Array<() => void> = [];
  private phase: Phase = 'header';
  /** Reply header bytes (simple 16, chunk 20) and small payloads. */
  private readonly hdr = Buffer.alloc(20);
  private hdrFill = 0;
  private scratch = Buffer.alloc(64);
  private need = 0;
  private fill = 0;
  private cur: Slot | undefined;
  private chunkFlags = 0;
  private chunkType = 0;
  private chunkLen = 0;
  /** OFFSET_DATA: where in cur.buf the data goes. */
  private dataPos = 0;
  private dead = false;

  constructor(
    private readonly sock: net.Socket,
    readonly info: NbdExportInfo,
    private readonly onDead: (why: string) => void,
    rest?: Buffer,
  ) {
    for (let i = 0; i < MAX_NBD_REQUESTS; i++) {
      const s = new Slot(i);
      this.slots.push(s);
      this.freeSlots.push(s);
    }
    sock.on('data', (chunk: Buffer) => this.onData(chunk));
    sock.on('error', () => this.kill('connection error'));
    sock.on('close', () => this.kill('connection closed'));
    sock.on('end', () => this.kill('server closed the connection'));
    if (rest) this.onData(rest);
  }

  get connected(): boolean {
    return !this.dead;
  }

  /** Waits until a slot is free (MAX_NBD_REQUESTS in flight) or the connection is gone. */
  private slotFreed(): Promise<void> {
    return new Promise<void>((resolve) => this.waiters.push(resolve));
  }

  private releaseSlot(s: Slot): void {
    s.busy = false;
    s.buf = undefined;
    s.extent = undefined;
    s.errno = 0;
    this.freeSlots.push(s);
    this.waiters.shift()?.();
  }

  /**
   * Sends one command. READ fills `buf` (its length is the request length); WRITE sends `buf`.
   * Resolves with the extent for BLOCK_STATUS, else undefined; rejects with BlockIoError.
   */
  send(cmd: number, flags: number, offset: number, len: number, buf?: Buffer): Promise<NbdExtent | undefined> {
    if (this.dead) return Promise.reject(new BlockIoError(EIO, 'NBD connection lost'));
    if (this.freeSlots.length === 0) return this.slotFreed().then(() => this.send(cmd, flags, offset, len, buf));
    const s = this.freeSlots.pop()!;
    s.busy = true;
    s.cmd = cmd;
    s.offset = offset;
    s.len = len;
    s.buf = cmd === abi.NBD_CMD_READ ? buf : undefined;
    const h = s.hdr;
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(cmd, 6);
    h.writeUInt32BE((h.readUInt32BE(12) + 1) >>> 0, 12);
    h.writeUInt32BE(Math.floor(offset / 0x100000000), 16);
    h.writeUInt32BE(offset >>> 0, 20);
    h.writeUInt32BE(len, 24);
    const p = new Promise<NbdExtent | undefined>((resolve, reject) => {
      s.resolve = resolve;
      s.reject = reject;
    });
    if (cmd === abi.NBD_CMD_WRITE && buf) {
      this.sock.cork();
      this.sock.write(h);
      this.sock.write(buf);
      this.sock.uncork();
    } else {
      this.sock.write(h);
    }
    return p;
  }

  /** NBD_CMD_DISC and a graceful close; requests in flight are failed first. */
  disconnect(): void {
    if (this.dead) return;
    this.kill('disconnected');
    closeSocket(this.sock, discRequest());
  }

  /** Drop the connection: every request in flight (and every waiter) fails with EIO. */
  kill(why: string): void {
    if (this.dead) return;
    this.dead = true;
    this.phase = 'dead';
    for (const s of this.slots) {
      if (!s.busy) continue;
      const reject = s.reject;
      this.releaseSlot(s);
      reject(new BlockIoError(EIO, `NBD ${why}`));
    }
    for (const w of this.waiters.splice(0)) w();
    if (why !== 'disconnected') this.sock.destroy();
    this.onDead(why);
  }

  private protocolError(why: string): void {
    this.kill(`protocol error: ${why}`);
  }

  private onData(chunk: Buffer): void {
    let pos = 0;
    while (pos < chunk.length && !this.dead) {
      switch (this.phase) {
        case 'header':
        case 'chunk-header': {
          const want = this.phase === 'header' ? 16 : 20;
          const k = Math.min(want - this.hdrFill, chunk.length - pos);
          chunk.copy(this.hdr, this.hdrFill, pos, pos + k);
          this.hdrFill += k;
          pos += k;
          if (this.hdrFill === want) this.onHeader();
          break;
        }
        case 'simple-data':
        case 'chunk-data': {
          const k = Math.min(this.need - this.fill, chunk.length - pos);
          chunk.copy(this.cur!.buf!, this.dataPos + this.fill, pos, pos + k);
          this.fill += k;
          pos += k;
          if (this.fill === this.need) this.phase === 'simple-data' ? this.finish(this.cur!) : this.chunkDone();
          break;
        }
        case 'data-offset':
        case 'chunk-payload': {
          const k = Math.min(this.need - this.fill, chunk.length - pos);
          chunk.copy(this.scratch, this.fill, pos, pos + k);
          this.fill += k;
          pos += k;
          if (this.fill === this.need) this.phase === 'data-offset' ? this.onDataOffset() : this.onChunkPayload();
          break;
        }
        case 'dead':
          return;
      }
    }
  }

  /** The busy slot a reply header's handle names, if its sequence number matches. */
  private slotOf(): Slot | undefined {
    const s = this.slots[this.hdr.readUInt32BE(8)];
    return s?.busy && s.hdr.readUInt32BE(12) === this.hdr.readUInt32BE(12) ? s : undefined;
  }

  private onHeader(): void {
    const magic = this.hdr.readUInt32BE(0);
    if (this.phase === 'header' && magic === abi.NBD_STRUCTURED_REPLY_MAGIC) {
      if (!this.info.structuredReply) return this.protocolError('unexpected structured reply');
      this.phase = 'chunk-header';
      return; // 4 more header bytes
    }
    this.hdrFill = 0;
    if (this.phase === 'header') {
      if (magic !== abi.NBD_SIMPLE_REPLY_MAGIC) return this.protocolError('invalid reply magic');
      const s = this.slotOf();
      if (!s) return this.protocolError('reply for an unknown handle');
      this.cur = s;
      const err = this.hdr.readUInt32BE(4);
      if (err !== 0) {
        s.errno = systemErrno(err);
        return this.finish(s);
      }
      if (s.cmd === abi.NBD_CMD_READ && s.len > 0) {
        if (this.info.structuredReply) return this.protocolError('simple reply to a read with structured replies');
        this.phase = 'simple-data';
        this.dataPos = 0;
        this.need = s.len;
        this.fill = 0;
        return;
      }
      return this.finish(s);
    }
    // Structured reply chunk header: magic, flags, type, handle (index at 12), length.
    const s = this.slotOf();
    if (!s) return this.protocolError('reply chunk for an unknown handle');
    this.cur = s;
    this.chunkFlags = this.hdr.readUInt16BE(4);
    this.chunkType = this.hdr.readUInt16BE(6);
    this.chunkLen = this.hdr.readUInt32BE(16);
    this.fill = 0;
    if (this.chunkType === abi.NBD_REPLY_TYPE_OFFSET_DATA) {
      if (s.cmd !== abi.NBD_CMD_READ || this.chunkLen <= 8) return this.protocolError('unexpected OFFSET_DATA chunk');
      this.phase = 'data-offset';
      this.need = 8;
      return;
    }
    if (this.chunkLen > MAX_CHUNK_PAYLOAD) return this.protocolError('chunk payload too large');
    if (this.chunkLen === 0) return this.onChunkPayload();
    if (this.scratch.length < this.chunkLen) this.scratch = Buffer.alloc(this.chunkLen);
    this.phase = 'chunk-payload';
    this.need = this.chunkLen;
  }

  private onDataOffset(): void {
    const s = this.cur!;
    const off = Number(this.scratch.readBigUInt64BE(0));
    const n = this.chunkLen - 8;
    if (off < s.offset || off + n > s.offset + s.len) return this.protocolError('OFFSET_DATA outside the request');
    this.phase = 'chunk-data';
    this.dataPos = off - s.offset;
    this.need = n;
    this.fill = 0;
  }

  private onChunkPayload(): void {
    const s = this.cur!;
    const p = this.scratch;
    const n = this.chunkLen;
    switch (this.chunkType) {
      case abi.NBD_REPLY_TYPE_NONE:
        if (n !== 0 || !(this.chunkFlags & abi.NBD_REPLY_FLAG_DONE)) return this.protocolError('bad NONE chunk');
        break;
      case abi.NBD_REPLY_TYPE_OFFSET_HOLE: {
        if (s.cmd !== abi.NBD_CMD_READ || n !== 12) return this.protocolError('bad OFFSET_HOLE chunk');
        const off = Number(p.readBigUInt64BE(0));
        const len = p.readUInt32BE(8);
        if (off < s.offset || off + len > s.offset + s.len) return this.protocolError('OFFSET_HOLE outside the request');
        s.buf!.fill(0, off - s.offset, off - s.offset + len);
        break;
      }
      case abi.NBD_REPLY_TYPE_BLOCK_STATUS: {
        if (s.cmd !== abi.NBD_CMD_BLOCK_STATUS || n < 12 || (n - 4) % 8 !== 0) return this.protocolError('bad BLOCK_STATUS chunk');
        if (p.readUInt32BE(0) !== this.info.metaContextId) return this.protocolError('block status for an unknown context');
        const length = p.readUInt32BE(4);
        if (length === 0) return this.protocolError('zero-length extent');
        s.extent = { length: Math.min(length, s.len), flags: p.readUInt32BE(8) };
        break;
      }
      default:
        if (this.chunkType & 0x8000) {
          // Error chunks: error (4), message length (2), message[, offset (8)].
          if (n < 6) return this.protocolError('bad error chunk');
          if (s.errno === 0) s.errno = systemErrno(p.readUInt32BE(0)) || EINVAL;
        } else {
          return this.protocolError(`unknown chunk type ${this.chunkType}`);
        }
    }
    this.chunkDone();
  }

  private chunkDone(): void {
    this.phase = 'header';
    if (this.chunkFlags & abi.NBD_REPLY_FLAG_DONE) this.finish(this.cur!);
  }

  private finish(s: Slot): void {
    this.phase = 'header';
    this.hdrFill = 0;
    this.cur = undefined;
    const { errno, extent, resolve, reject, cmd } = s;
    this.releaseSlot(s);
    if (errno !== 0) reject(new BlockIoError(errno, `NBD ${abi.nbdCmdName(cmd)} failed`));
    else if (cmd === abi.NBD_CMD_BLOCK_STATUS && !extent) reject(new BlockIoError(EIO, 'no block status extent'));
    else resolve(extent);
  }
}
