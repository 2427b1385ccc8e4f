// One NBD client connection: fixed-newstyle handshake, then concurrent request serving.
import type { Socket } from 'node:net';
import type { TLSSocket } from 'node:tls';
import * as abi from './nbd-abi.js';
import { nbdFindExport, nbdListExports, type NbdServedExport } from './export-table.js';
import { errorReport } from '../util/report.js';
import { native } from '../native/binding.js';
import { errnoOf, strerror } from '../util/errno.js';

/** What the server provides to its connections. */
export interface NbdConnectionHost {
  /** Seconds the client may take until it is in transmission; 0 = no limit. */
  readonly handshakeMaxSeconds: number;
  /** The server's max-connections; 0 = unlimited. 1 takes NBD_FLAG_CAN_MULTI_CONN away. */
  readonly maxConnections: number;
  /** The socket is closed and no request is in flight any more. */
  connectionClosed(conn: NbdConnection): void;
  /**
   * Set when the server has tls-creds: clients must NBD_OPT_STARTTLS first. Wraps the socket
   * after the ACK; `ready` rejects with QEMU's message if the handshake or a check fails.
   */
  readonly tls?: (raw: Socket) => { socket: TLSSocket; ready: Promise<unknown> };
}

/** Requests served at once per connection; reading pauses beyond that. */
const MAX_IN_FLIGHT = 16;
/** Payload bytes in flight per connection before reading pauses (one request may always run). */
const IN_FLIGHT_BYTES = 64 * 1024 * 1024;
/** Longest option payload we buffer; larger known options get NBD_REP_ERR_TOO_BIG. */
const OPT_DATA_MAX = 64 * 1024;
/** Sparse READ replies use at most this many chunks; the rest goes out as one data chunk. */
const MAX_CHUNKS = 64;
/** Context ids: base:allocation 0, qemu:allocation-depth 1, then one per exported bitmap (QEMU 7.2). */
const NBD_META_ID_DIRTY_BITMAP = 2;
/** Extents per meta context in one NBD_CMD_BLOCK_STATUS reply. */
const MAX_EXTENTS = 8192;
/**
 * Reply headers (up to MAX_CHUNKS * 32 bytes) live in front of the data, so header + data leave in
 * one write. A whole page, so that payloads in page-aligned slot buffers can go to an O_DIRECT
 * file as they are, without a bounce copy.
 */
const DATA_OFF = 4096;
const PAGE = 4096;
/** Request buffers up to this size are kept for reuse; bigger ones are dropped after use. */
const KEEP_BUF = DATA_OFF + 2 * 1024 * 1024 + 8 * MAX_EXTENTS * 2 + 64;
const MIN_BUF = DATA_OFF + 64 * 1024;

/** One request in flight; buffers are allocated once and reused. */
class Slot {
  buf = native.allocAligned(MIN_BUF, PAGE);
  readonly handle = Buffer.alloc(8);
  type = 0;
  flags = 0;
  offset = 0;
  /** High 32 bits of the wire offset, to print offsets beyond 2^53 exactly. */
  offHi = 0;
  offLo = 0;
  len = 0;
  /** Admitted payload bytes (for the in-flight byte budget). */
  charged = 0;
  readonly chunkStart = new Float64Array(MAX_CHUNKS);
  readonly chunkLen = new Float64Array(MAX_CHUNKS);
  readonly chunkZero = new Uint8Array(MAX_CHUNKS);
  msg = '';
  /** On the free list. */
  free = false;
  /** Bound once: returns the slot when the socket is done with its buffer. */
  release: () => void = () => undefined;

  ensure(bytes: number): void {
    if (this.buf.length < bytes) this.buf = native.allocAligned(bytes, PAGE);
  }
}

type Phase = 'client-flags' | 'opt-header' | 'opt-data' | 'req-header' | 'write-payload' | 'stalled' | 'done';

export class NbdConnection {
  /** The export chosen by NBD_OPT_GO / NBD_OPT_EXPORT_NAME; undefined during the handshake. */
  exp: NbdServedExport | undefined;

  private phase: Phase = 'client-flags';
  private readonly hdr = Buffer.alloc(abi.NBD_REQUEST_SIZE);
  private target: Buffer = this.hdr;
  private targetOff = 0;
  private need = 4;
  private fill = 0;
  private skip = 0;
  private afterSkip: (() => void) | undefined;
  private pending: Buffer | null = null;
  private pendingPos = 0;
  private paused = false;

  private noZeroes = false;
  private structured = false;
  private metaExport: NbdServedExport | undefined;
  private metaBase = false;
  private metaDepth = false;
  /** Negotiated qemu:dirty-bitmap contexts: indices into metaExport.bitmaps (context id 2 + index). */
  private metaBitmaps: number[] = [];
  private option = 0;

  private readonly slots: Slot[] = [];
  private readonly freeSlots: Slot[] = [];
  private current: Slot | undefined;
  private inFlight = 0;
  private inFlightBytes = 0;
  private idleWaiters: (() => void)[] = [];

  private closing = false;
  private socketClosed = false;
  /** The client sent EOF: it is gone even if our side of the socket is not closed yet. */
  private peerEnded = false;
  private finished = false;
  private handshakeTimer: NodeJS.Timeout | undefined;
  /** NBD_OPT_STARTTLS succeeded: options (and everything after) go over TLS. */
  private tlsActive = false;
  private readonly onSocketData = (chunk: Buffer) => this.onData(chunk);
  /** The socket corked until the replies to the requests of the last data chunk are queued. */
  private batchCorked: Socket | null = null;
  private readonly uncorkBatch = () => {
    this.batchCorked?.uncork();
    this.batchCorked = null;
  };
  private readonly onSocketError = () => this.close();
  private readonly onSocketEnd = () => { this.peerEnded = true; };
  private readonly onSocketClose = () => {
    this.socketClosed = true;
    this.closing = true;
    this.clearHandshakeTimer();
    this.abandonCurrent();
    this.maybeFinish();
  };

  /** `socket` becomes the TLS socket after STARTTLS; replies always go to the current one. */
  constructor(private socket: Socket, private readonly host: NbdConnectionHost) {
    socket.setNoDelay(true);
    socket.on('data', this.onSocketData);
    socket.on('error', this.onSocketError);
    socket.on('end', this.onSocketEnd);
    socket.on('close', this.onSocketClose);
  }

  /** Send the greeting and start the handshake clock. */
  start(): void {
    if (this.host.handshakeMaxSeconds > 0) {
      this.handshakeTimer = setTimeout(() => this.close(), this.host.handshakeMaxSeconds * 1000);
      this.handshakeTimer.unref();
    }
    const g = Buffer.alloc(18);
    g.writeBigUInt64BE(abi.NBD_INIT_MAGIC, 0);
    g.writeBigUInt64BE(abi.NBD_OPTS_MAGIC, 8);
    g.writeUInt16BE(abi.NBD_FLAG_FIXED_NEWSTYLE | abi.NBD_FLAG_NO_ZEROES, 16);
    this.socket.write(g);
  }

  /**
   * Whether this client still holds its export (block-export-del mode=safe refuses while one
   * does). QEMU drops the client's reference as soon as it has handled NBD_CMD_DISC or EOF and
   * no request is in flight, not when the socket is finally closed; so a client that has just
   * exited never makes the next block-export-del fail with 'still in use'.
   */
  get holdsExport(): boolean {
    return !(this.closing || this.peerEnded) || this.inFlight > 0;
  }

  /** Requests not yet answered. */
  get requestsInFlight(): number {
    return this.inFlight;
  }

  /** Disconnect now; requests in flight finish but their replies are dropped. */
  close(): void {
    this.closing = true;
    this.phase = 'done';
    this.clearHandshakeTimer();
    if (!this.socket.destroyed) this.socket.destroy();
  }

  /** Resolves when no request is in flight (drained sections). */
  waitIdle(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /** Take requests again after a drained section. */
  kick(): void {
    this.resumeReading();
  }

  // ---------------------------------------------------------------- input framing

  private onData(chunk: Buffer): void {
    if (this.closing) return;
    if (this.exp && !this.batchCorked) {
      // One chunk often carries many requests; their replies (sent at once, or in the promise
      // jobs that run before the loop's check phase) leave in one writev instead of one each.
      this.batchCorked = this.socket;
      this.socket.cork();
      setImmediate(this.uncorkBatch);
    }
    if (this.pending && this.pendingPos < this.pending.length) {
      // Only reachable if data arrived while we meant to be paused; keep order.
      this.pending = Buffer.concat([this.pending.subarray(this.pendingPos), chunk]);
    } else {
      this.pending = chunk;
    }
    this.pendingPos = 0;
    this.pump();
  }

  private blocked(): boolean {
    if (this.phase === 'stalled') return true;
    if (this.phase !== 'req-header' || this.fill !== 0) return false;
    return this.inFlight >= MAX_IN_FLIGHT || this.exp!.drained;
  }

  private pump(): void {
    while (!this.closing && this.pending !== null && this.pendingPos < this.pending.length) {
      if (this.blocked()) {
        if (!this.paused) {
          this.paused = true;
          this.socket.pause();
        }
        return;
      }
      const c = this.pending;
      const avail = c.length - this.pendingPos;
      if (this.skip > 0) {
        const n = Math.min(this.skip, avail);
        this.skip -= n;
        this.pendingPos += n;
        if (this.skip === 0) this.afterSkip!();
        continue;
      }
      const n = Math.min(this.need - this.fill, avail);
      c.copy(this.target, this.targetOff + this.fill, this.pendingPos, this.pendingPos + n);
      this.fill += n;
      this.pendingPos += n;
      if (this.fill === this.need) {
        this.fill = 0;
        this.onFilled();
      }
    }
    if (this.pending !== null && this.pendingPos >= this.pending.length) this.pending = null;
  }

  private resumeReading(): void {
    if (this.closing) return;
    if (this.pending !== null) this.pump();
    if (this.paused && !this.blocked() && !this.closing) {
      this.paused = false;
      this.socket.resume();
    }
  }

  private expect(phase: Phase, target: Buffer, off: number, n: number): void {
    this.phase = phase;
    this.target = target;
    this.targetOff = off;
    this.need = n;
    this.fill = 0;
    if (n === 0) this.onFilled();
  }

  private onFilled(): void {
    switch (this.phase) {
      case 'client-flags': return this.onClientFlags();
      case 'opt-header': return this.onOptionHeader();
      case 'opt-data': return this.onOption(this.option, this.target);
      case 'req-header': return this.onRequestHeader();
      case 'write-payload': return this.dispatch(this.current!);
      default:
    }
  }

  // ---------------------------------------------------------------- handshake

  private onClientFlags(): void {
    const flags = this.hdr.readUInt32BE(0);
    // Unknown client flags: the protocol says the server must disconnect.
    if (flags & ~(abi.NBD_FLAG_C_FIXED_NEWSTYLE | abi.NBD_FLAG_C_NO_ZEROES)) return this.close();
    this.noZeroes = (flags & abi.NBD_FLAG_C_NO_ZEROES) !== 0;
    this.expect('opt-header', this.hdr, 0, abi.NBD_OPT_HEADER_SIZE);
  }

  private onOptionHeader(): void {
    if (this.hdr.readBigUInt64BE(0) !== abi.NBD_OPTS_MAGIC) return this.close();
    const opt = this.hdr.readUInt32BE(8);
    const length = this.hdr.readUInt32BE(12);
    this.option = opt;
    if (length > abi.NBD_MAX_BUFFER_SIZE) return this.close();
    if (this.host.tls && !this.tlsActive) return this.optionBeforeTls(opt, length);
    const known = opt >= abi.NBD_OPT_EXPORT_NAME && opt <= abi.NBD_OPT_SET_META_CONTEXT && opt !== abi.NBD_OPT_PEEK_EXPORT;
    if (known && length <= OPT_DATA_MAX) {
      this.expect('opt-data', Buffer.allocUnsafe(length), 0, length);
      return;
    }
    if (opt === abi.NBD_OPT_EXPORT_NAME) return this.close(); // no error reply exists for it
    // Skip the payload without buffering it, then answer.
    this.phase = 'opt-data';
    this.afterSkip = () => {
      this.afterSkip = undefined;
      if (known) this.optError(opt, abi.NBD_REP_ERR_TOO_BIG, `option '${abi.nbdOptName(opt)}' is too long`);
      else this.optUnsupported(opt);
      if (!this.closing) this.expect('opt-header', this.hdr, 0, abi.NBD_OPT_HEADER_SIZE);
    };
    this.skip = length;
    if (length === 0) this.afterSkip();
  }

  private optReply(opt: number, type: number, data?: Buffer): void {
    const h = Buffer.alloc(20);
    h.writeBigUInt64BE(abi.NBD_REP_MAGIC, 0);
    h.writeUInt32BE(opt >>> 0, 8);
    h.writeUInt32BE(type >>> 0, 12);
    h.writeUInt32BE(data ? data.length : 0, 16);
    this.socket.write(data ? Buffer.concat([h, data]) : h);
  }

  private optError(opt: number, type: number, msg: string): void {
    this.optReply(opt, type, Buffer.from(msg, 'utf8'));
  }

  private optUnsupported(opt: number): void {
    this.optError(opt, abi.NBD_REP_ERR_UNSUP, `Unsupported option ${opt >>> 0} (${abi.nbdOptName(opt)})`);
  }

  private onOption(opt: number, data: Buffer): void {
    this.expect('opt-header', this.hdr, 0, abi.NBD_OPT_HEADER_SIZE);
    switch (opt) {
      case abi.NBD_OPT_EXPORT_NAME: return this.optExportName(data);
      case abi.NBD_OPT_ABORT:
        this.optReply(opt, abi.NBD_REP_ACK);
        return this.closeGracefully();
      case abi.NBD_OPT_LIST: return this.optList(data);
      case abi.NBD_OPT_STARTTLS:
        if (data.length) return this.optZeroLength(opt);
        if (this.host.tls) return this.optError(opt, abi.NBD_REP_ERR_INVALID, 'TLS already enabled');
        return this.optError(opt, abi.NBD_REP_ERR_POLICY, 'TLS not configured');
      case abi.NBD_OPT_INFO:
      case abi.NBD_OPT_GO: return this.optInfo(opt, data);
      case abi.NBD_OPT_STRUCTURED_REPLY:
        if (data.length) return this.optZeroLength(opt);
        if (this.structured) return this.optError(opt, abi.NBD_REP_ERR_INVALID, 'structured reply already negotiated');
        this.structured = true;
        return this.optReply(opt, abi.NBD_REP_ACK);
      case abi.NBD_OPT_LIST_META_CONTEXT:
      case abi.NBD_OPT_SET_META_CONTEXT: return this.optMetaContext(opt, data);
      default: return this.optUnsupported(opt);
    }
  }

  /** QEMU's rules until TLS is up: only STARTTLS is served; the payload of others is skipped. */
  private optionBeforeTls(opt: number, length: number): void {
    const refusal = `Option 0x${(opt >>> 0).toString(16)} not permitted before TLS`;
    if (opt === abi.NBD_OPT_EXPORT_NAME) {
      // No error reply exists for it: drop the connection.
      errorReport(`option negotiation failed: ${refusal}`);
      return this.close();
    }
    this.phase = 'opt-data';
    this.afterSkip = () => {
      this.afterSkip = undefined;
      if (opt === abi.NBD_OPT_STARTTLS) {
        if (length === 0) return this.startTls();
        const msg = `option '${abi.nbdOptName(opt)}' has unexpected length`;
        this.optError(opt, abi.NBD_REP_ERR_INVALID, msg);
        errorReport(`option negotiation failed: ${msg}`);
        return this.closeGracefully();
      }
      this.optError(opt, abi.NBD_REP_ERR_TLS_REQD, refusal);
      if (opt === abi.NBD_OPT_ABORT) return this.closeGracefully();
      if (!this.closing) this.expect('opt-header', this.hdr, 0, abi.NBD_OPT_HEADER_SIZE);
    };
    this.skip = length;
    if (length === 0) this.afterSkip();
  }

  /** ACK, then the TLS handshake on the same socket; option haggling goes on encrypted. */
  private startTls(): void {
    this.optReply(abi.NBD_OPT_STARTTLS, abi.NBD_REP_ACK);
    // A client must wait for the ACK before its ClientHello: anything read ahead is a violation.
    if (this.pending !== null && this.pendingPos < this.pending.length) return this.close();
    this.pending = null;
    this.phase = 'stalled';
    const raw = this.socket;
    raw.off('data', this.onSocketData);
    raw.off('end', this.onSocketEnd);
    raw.off('close', this.onSocketClose);
    const { socket, ready } = this.host.tls!(raw);
    this.socket = socket;
    socket.on('error', this.onSocketError);
    socket.on('end', this.onSocketEnd);
    socket.on('close', this.onSocketClose);
    ready.then(() => {
      if (this.closing) return;
      this.tlsActive = true;
      socket.on('data', this.onSocketData);
      this.expect('opt-header', this.hdr, 0, abi.NBD_OPT_HEADER_SIZE);
    }, (err: Error) => {
      if (!this.closing) errorReport(`option negotiation failed: ${err.message}`);
      this.close();
    });
  }

  private optZeroLength(opt: number): void {
    this.optError(opt, abi.NBD_REP_ERR_INVALID, `option '${abi.nbdOptName(opt)}' has unexpected length`);
  }

  private optList(data: Buffer): void {
    if (data.length) return this.optZeroLength(abi.NBD_OPT_LIST);
    for (const exp of nbdListExports()) {
      const name = Buffer.from(exp.name, 'utf8');
      const desc = Buffer.from(exp.description ?? '', 'utf8');
      const d = Buffer.alloc(4 + name.length + desc.length);
      d.writeUInt32BE(name.length, 0);
      name.copy(d, 4);
      desc.copy(d, 4 + name.length);
      this.optReply(abi.NBD_OPT_LIST, abi.NBD_REP_SERVER, d);
    }
    this.optReply(abi.NBD_OPT_LIST, abi.NBD_REP_ACK);
  }

  private transmissionFlags(exp: NbdServedExport): number {
    // QEMU advertises MULTI_CONN on every export (all connections share one backend, so a
    // flush on one covers writes completed on another) unless the server takes one client only.
    let f = abi.NBD_FLAG_HAS_FLAGS | abi.NBD_FLAG_SEND_FLUSH | abi.NBD_FLAG_SEND_FUA | abi.NBD_FLAG_SEND_CACHE;
    if (this.host.maxConnections !== 1) f |= abi.NBD_FLAG_CAN_MULTI_CONN;
    if (exp.writable) f |= abi.NBD_FLAG_SEND_TRIM | abi.NBD_FLAG_SEND_WRITE_ZEROES | abi.NBD_FLAG_SEND_FAST_ZERO;
    else f |= abi.NBD_FLAG_READ_ONLY;
    if (this.structured) f |= abi.NBD_FLAG_SEND_DF;
    return f;
  }

  private optExportName(data: Buffer): void {
    const exp = data.length <= abi.NBD_MAX_STRING_SIZE ? nbdFindExport(data.toString('utf8')) : undefined;
    if (!exp) return this.close(); // the protocol's only answer to an unknown name
    const r = Buffer.alloc(this.noZeroes ? 10 : 134);
    r.writeBigUInt64BE(BigInt(exp.node.getLength()), 0);
    r.writeUInt16BE(this.transmissionFlags(exp), 8);
    this.socket.write(r);
    this.enterTransmission(exp);
  }

  private optInfo(opt: number, data: Buffer): void {
    const invalid = () => this.optError(opt, abi.NBD_REP_ERR_INVALID, `Inconsistent lengths in option ${abi.nbdOptName(opt)}`);
    if (data.length < 6) return invalid();
    const nameLen = data.readUInt32BE(0);
    if (nameLen > data.length - 6) return invalid();
    if (nameLen > abi.NBD_MAX_STRING_SIZE) {
      return this.optError(opt, abi.NBD_REP_ERR_INVALID, 'export name too long');
    }
    const name = data.toString('utf8', 4, 4 + nameLen);
    const n = data.readUInt16BE(4 + nameLen);
    if (data.length !== 4 + nameLen + 2 + 2 * n) return invalid();
    let sendName = false;
    let sendDesc = false;
    let blockSize = false;
    for (let i = 0; i < n; i++) {
      switch (data.readUInt16BE(6 + nameLen + 2 * i)) {
        case abi.NBD_INFO_NAME: sendName = true; break;
        case abi.NBD_INFO_DESCRIPTION: sendDesc = true; break;
        case abi.NBD_INFO_BLOCK_SIZE: blockSize = true; break;
        default:
      }
    }
    const exp = nbdFindExport(name);
    if (!exp) return this.optError(opt, abi.NBD_REP_ERR_UNKNOWN, `export '${name}' not present`);
    const info = (type: number, payload: Buffer) => {
      const d = Buffer.alloc(2 + payload.length);
      d.writeUInt16BE(type, 0);
      payload.copy(d, 2);
      this.optReply(opt, abi.NBD_REP_INFO, d);
    };
    if (sendName) info(abi.NBD_INFO_NAME, Buffer.from(exp.name, 'utf8'));
    if (sendDesc && exp.description !== undefined) info(abi.NBD_INFO_DESCRIPTION, Buffer.from(exp.description, 'utf8'));
    // Block sizes go out even unrequested; the minimum is only raised for clients that asked
    // (or only look), since others may send unaligned requests.
    const align = Math.max(1, exp.node.requestAlignment());
    const min = opt === abi.NBD_OPT_INFO || blockSize ? align : 1;
    const sizes = Buffer.alloc(12);
    sizes.writeUInt32BE(min, 0);
    sizes.writeUInt32BE(Math.max(4096, min), 4);
    sizes.writeUInt32BE(abi.NBD_MAX_BUFFER_SIZE, 8);
    info(abi.NBD_INFO_BLOCK_SIZE, sizes);
    if (opt === abi.NBD_OPT_GO && align > 1 && !blockSize) {
      return this.optError(opt, abi.NBD_REP_ERR_BLOCK_SIZE_REQD, 'request NBD_INFO_BLOCK_SIZE to use this export');
    }
    const e = Buffer.alloc(10);
    e.writeBigUInt64BE(BigInt(exp.node.getLength()), 0);
    e.writeUInt16BE(this.transmissionFlags(exp), 8);
    info(abi.NBD_INFO_EXPORT, e);
    this.optReply(opt, abi.NBD_REP_ACK);
    if (opt === abi.NBD_OPT_GO) this.enterTransmission(exp);
  }

  private optMetaContext(opt: number, data: Buffer): void {
    const list = opt === abi.NBD_OPT_LIST_META_CONTEXT;
    if (!list && !this.structured) {
      return this.optError(opt, abi.NBD_REP_ERR_INVALID,
        `request option '${abi.nbdOptName(opt)}' when structured reply is not negotiated`);
    }
    const invalid = () => this.optError(opt, abi.NBD_REP_ERR_INVALID, `Inconsistent lengths in option ${abi.nbdOptName(opt)}`);
    if (data.length < 8) return invalid();
    const nameLen = data.readUInt32BE(0);
    if (nameLen > data.length - 8 || nameLen > abi.NBD_MAX_STRING_SIZE) return invalid();
    const name = data.toString('utf8', 4, 4 + nameLen);
    let pos = 4 + nameLen;
    const nq = data.readUInt32BE(pos);
    pos += 4;
    const queries: string[] = [];
    for (let i = 0; i < nq; i++) {
      if (pos + 4 > data.length) return invalid();
      const ql = data.readUInt32BE(pos);
      pos += 4;
      if (ql > data.length - pos) return invalid();
      queries.push(data.toString('utf8', pos, pos + ql));
      pos += ql;
    }
    if (pos !== data.length) return invalid();
    const exp = nbdFindExport(name);
    if (!exp) return this.optError(opt, abi.NBD_REP_ERR_UNKNOWN, `export '${name}' not present`);
    let base = false;
    let depth = false;
    const bitmaps = exp.bitmaps ?? [];
    const bitmapOn = new Array<boolean>(bitmaps.length).fill(false);
    if (list && nq === 0) {
      base = true;
      depth = exp.allocationDepth;
      bitmapOn.fill(true);
    }
    for (const q of queries) {
      if (q === 'base:allocation' || (list && q === 'base:')) base = true;
      if (exp.allocationDepth && (q === 'qemu:allocation-depth' || (list && q === 'qemu:'))) depth = true;
      // QEMU 7.2's nbd_meta_qemu_query: listing "qemu:" or "qemu:dirty-bitmap:" gives every bitmap.
      if (list && (q === 'qemu:' || q === 'qemu:dirty-bitmap:')) bitmapOn.fill(true);
      else if (q.startsWith('qemu:dirty-bitmap:')) {
        const i = bitmaps.findIndex((b) => b.name === q.slice(18));
        if (i >= 0) bitmapOn[i] = true;
      }
    }
    const send = (id: number, ctx: string) => {
      const s = Buffer.from(ctx, 'utf8');
      const d = Buffer.alloc(4 + s.length);
      d.writeUInt32BE(list ? 0 : id, 0);
      s.copy(d, 4);
      this.optReply(opt, abi.NBD_REP_META_CONTEXT, d);
    };
    if (base) send(abi.NBD_META_ID_BASE_ALLOCATION, 'base:allocation');
    if (depth) send(abi.NBD_META_ID_ALLOCATION_DEPTH, 'qemu:allocation-depth');
    for (let i = 0; i < bitmaps.length; i++) {
      if (bitmapOn[i]) send(NBD_META_ID_DIRTY_BITMAP + i, `qemu:dirty-bitmap:${bitmaps[i].name}`);
    }
    if (!list) {
      this.metaExport = exp;
      this.metaBase = base;
      this.metaDepth = depth;
      this.metaBitmaps = [];
      for (let i = 0; i < bitmaps.length; i++) if (bitmapOn[i]) this.metaBitmaps.push(i);
    }
    this.optReply(opt, abi.NBD_REP_ACK);
  }

  private enterTransmission(exp: NbdServedExport): void {
    if (this.metaExport !== exp) {
      this.metaBase = false;
      this.metaDepth = false;
      this.metaBitmaps = [];
    }
    this.clearHandshakeTimer();
    this.exp = exp;
    exp.connections.add(this);
    this.expect('req-header', this.hdr, 0, abi.NBD_REQUEST_SIZE);
  }

  private clearHandshakeTimer(): void {
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.handshakeTimer = undefined;
  }

  // ---------------------------------------------------------------- transmission

  private takeSlot(): Slot {
    const s = this.freeSlots.pop();
    if (s) {
      s.free = false;
      return s;
    }
    const n = new Slot();
    n.release = () => this.release(n);
    this.slots.push(n);
    return n;
  }

  private onRequestHeader(): void {
    const h = this.hdr;
    if (h.readUInt32BE(0) !== abi.NBD_REQUEST_MAGIC) return this.close();
    const type = h.readUInt16BE(6);
    if (type === abi.NBD_CMD_DISC) return this.closeGracefully();
    const s = this.takeSlot();
    s.flags = h.readUInt16BE(4);
    s.type = type;
    h.copy(s.handle, 0, 8, 16);
    const hi = h.readUInt32BE(16);
    // Offsets beyond 2^53 cannot be valid; keep them out of range without BigInt.
    s.offHi = hi;
    s.offLo = h.readUInt32BE(20);
    s.offset = hi >= 0x200000 ? Number.MAX_SAFE_INTEGER : hi * 0x100000000 + h.readUInt32BE(20);
    s.len = h.readUInt32BE(24);
    s.charged = 0;
    this.inFlight++;
    if ((type === abi.NBD_CMD_READ || type === abi.NBD_CMD_WRITE) && s.len > abi.NBD_MAX_BUFFER_SIZE) {
      // sic: QEMU prints a space before the parenthesis.
      s.msg = `len (${s.len} ) is larger than max len (${abi.NBD_MAX_BUFFER_SIZE})`;
      if (type === abi.NBD_CMD_WRITE) {
        // The payload cannot be skipped safely: answer, then hang up.
        this.closeGracefully();
        this.reply(s, abi.NBD_EINVAL, 0);
        return;
      }
      this.reply(s, abi.NBD_EINVAL, 0);
      this.expect('req-header', this.hdr, 0, abi.NBD_REQUEST_SIZE);
      return;
    }
    this.current = s;
    if (type === abi.NBD_CMD_READ || type === abi.NBD_CMD_WRITE) {
      if (this.inFlightBytes > 0 && this.inFlightBytes + s.len > IN_FLIGHT_BYTES) {
        this.phase = 'stalled'; // admitted by complete() once bytes are released
        return;
      }
    }
    this.admit(s);
  }

  private admit(s: Slot): void {
    if (s.type === abi.NBD_CMD_READ || s.type === abi.NBD_CMD_WRITE) {
      s.charged = s.len;
      this.inFlightBytes += s.len;
      s.ensure(DATA_OFF + s.len);
    }
    if (s.type === abi.NBD_CMD_WRITE) this.expect('write-payload', s.buf, DATA_OFF, s.len);
    else this.dispatch(s);
  }

  private dispatch(s: Slot): void {
    this.current = undefined;
    this.expect('req-header', this.hdr, 0, abi.NBD_REQUEST_SIZE);
    const err = this.validate(s);
    if (err) {
      this.reply(s, err, 0);
      return;
    }
    if (s.type === abi.NBD_CMD_WRITE && !(s.flags & abi.NBD_CMD_FLAG_FUA) && !this.exp!.writethrough) {
      // A write the node completes at once is answered without a promise.
      try {
        if (this.exp!.node.tryWrite(s.offset, s.buf.subarray(DATA_OFF, DATA_OFF + s.len), {})) {
          this.reply(s, 0, 0);
          return;
        }
      } catch (e) {
        this.replyFailed(s, e);
        return;
      }
    }
    this.serve(s).then(
      (dataLen) => { if (dataLen >= 0) this.reply(s, 0, dataLen); },
      (e: unknown) => this.replyFailed(s, e),
    );
  }

  /** A request the node failed: its errno as NBD's, its message for the log. */
  private replyFailed(s: Slot, e: unknown): void {
    const err = e as { errno?: number; message?: string } | undefined;
    s.msg = err?.message ?? 'I/O error';
    this.reply(s, abi.nbdErrno(err?.errno ?? 5), 0);
  }

  /** QEMU's request checks, in its order; sets s.msg on failure. */
  private validate(s: Slot): number {
    const exp = this.exp!;
    const t = s.type;
    if (t > abi.NBD_CMD_BLOCK_STATUS) {
      s.msg = `invalid request type (${t}) received`;
      return abi.NBD_EINVAL;
    }
    const writes = t === abi.NBD_CMD_WRITE || t === abi.NBD_CMD_WRITE_ZEROES || t === abi.NBD_CMD_TRIM;
    if (writes && !exp.writable) {
      s.msg = 'Export is read-only';
      return abi.NBD_EPERM;
    }
    const size = exp.node.getLength();
    if (s.offset > size || s.len > size - s.offset) {
      const from = s.offHi >= 0x200000 ? (BigInt(s.offHi) << 32n) + BigInt(s.offLo) : s.offset;
      s.msg = `operation past EOF; From: ${from}, Len: ${s.len}, Size: ${size}`;
      return abi.NBD_EINVAL; // QEMU 7.2 answers EINVAL for writes too (verified)
    }
    let valid = abi.NBD_CMD_FLAG_FUA;
    if (t === abi.NBD_CMD_READ && this.structured) valid |= abi.NBD_CMD_FLAG_DF;
    else if (t === abi.NBD_CMD_WRITE_ZEROES) valid |= abi.NBD_CMD_FLAG_NO_HOLE | abi.NBD_CMD_FLAG_FAST_ZERO;
    else if (t === abi.NBD_CMD_BLOCK_STATUS) valid |= abi.NBD_CMD_FLAG_REQ_ONE;
    if (s.flags & ~valid) {
      s.msg = `unsupported flags for command ${abi.nbdCmdName(t)} (got 0x${s.flags.toString(16)})`;
      return abi.NBD_EINVAL;
    }
    if (t === abi.NBD_CMD_BLOCK_STATUS) {
      if (s.len === 0) {
        s.msg = 'need non-zero length';
        return abi.NBD_EINVAL;
      }
      if (!this.structured || (!this.metaBase && !this.metaDepth && this.metaBitmaps.length === 0)) {
        s.msg = 'CMD_BLOCK_STATUS not negotiated';
        return abi.NBD_EINVAL;
      }
    }
    return 0;
  }

  /**
   * Run one request. Returns the byte count of a plain data reply (READ), 0 for "no data",
   * or -1 when the reply was already sent (structured multi-chunk replies).
   */
  private async serve(s: Slot): Promise<number> {
    const exp = this.exp!;
    const node = exp.node;
    const fua = (s.flags & abi.NBD_CMD_FLAG_FUA) !== 0 || exp.writethrough;
    switch (s.type) {
      case abi.NBD_CMD_READ:
        if (this.structured && !(s.flags & abi.NBD_CMD_FLAG_DF) && s.len > 0) return this.sparseRead(s);
      {
        // The node's synchronous fast path first (page cache, null): no ring round trip.
        const buf = s.buf.subarray(DATA_OFF, DATA_OFF + s.len);
        if (!node.tryRead(s.offset, buf)) await node.read(s.offset, buf);
        return s.len;
      }
      case abi.NBD_CMD_WRITE:
        // dispatch() already tried the synchronous path unless FUA was asked.
        await node.write(s.offset, s.buf.subarray(DATA_OFF, DATA_OFF + s.len));
        if (fua) await node.flush();
        return 0;
      case abi.NBD_CMD_WRITE_ZEROES:
        await node.writeZeroes(s.offset, s.len, {
          mayUnmap: !(s.flags & abi.NBD_CMD_FLAG_NO_HOLE),
          noFallback: (s.flags & abi.NBD_CMD_FLAG_FAST_ZERO) !== 0,
        });
        if (fua) await node.flush();
        return 0;
      case abi.NBD_CMD_TRIM:
        await node.discard(s.offset, s.len);
        if (fua) await node.flush();
        return 0;
      case abi.NBD_CMD_FLUSH:
        await node.flush();
        return 0;
      case abi.NBD_CMD_CACHE:
        return 0; // advisory; every read goes to the node anyway
      case abi.NBD_CMD_BLOCK_STATUS:
        return this.blockStatus(s);
      default:
        throw Object.assign(new Error('invalid request type'), { errno: 22 });
    }
  }

  private async sparseRead(s: Slot): Promise<number> {
    const node = this.exp!.node;
    let n = 0;
    let pos = 0;
    while (pos < s.len) {
      let p: number;
      let zero: boolean;
      if (n === MAX_CHUNKS - 1 && !(n > 0 && s.chunkZero[n - 1] === 0)) {
        p = s.len - pos; // last free chunk: send the rest as data
        zero = false;
      } else {
        let st;
        try {
          st = await node.blockStatus(s.offset + pos, s.len - pos);
        } catch (e) {
          // QEMU answers a failed status query with an error chunk, keeping the connection.
          throw Object.assign(new Error(`unable to check for holes: ${strerror(e)}`), { errno: errnoOf(e) });
        }
        p = st.pnum > 0 ? Math.min(st.pnum, s.len - pos) : s.len - pos;
        zero = st.zero;
        if (n === MAX_CHUNKS - 1 && zero) {
          p = s.len - pos;
          zero = false;
        }
      }
      if (n > 0 && (s.chunkZero[n - 1] === 1) === zero) {
        s.chunkLen[n - 1] += p;
      } else {
        s.chunkStart[n] = pos;
        s.chunkLen[n] = p;
        s.chunkZero[n] = zero ? 1 : 0;
        n++;
      }
      pos += p;
    }
    for (let i = 0; i < n; i++) {
      if (s.chunkZero[i]) continue;
      const at = DATA_OFF + s.chunkStart[i];
      try {
        const buf = s.buf.subarray(at, at + s.chunkLen[i]);
        if (!node.tryRead(s.offset + s.chunkStart[i], buf)) await node.read(s.offset + s.chunkStart[i], buf);
      } catch (e) {
        // QEMU cannot take back the chunks of a sparse read it started: it drops the client.
        errorReport(`Disconnect client, due to: Failed to send reply: reading from file failed: ${strerror(e)}`);
        this.close();
        this.complete(s, true);
        return -1;
      }
    }
    if (this.closing && this.socketClosed) {
      this.complete(s, true);
      return -1;
    }
    const sock = this.socket;
    sock.cork();
    for (let i = 0; i < n; i++) {
      const h = i * 32;
      const last = i === n - 1;
      const start = s.chunkStart[i];
      const len = s.chunkLen[i];
      const off = s.offset + start;
      if (s.chunkZero[i]) {
        this.chunkHeader(s, h, last ? abi.NBD_REPLY_FLAG_DONE : 0, abi.NBD_REPLY_TYPE_OFFSET_HOLE, 12);
        writeU64(s.buf, h + 20, off);
        s.buf.writeUInt32BE(len, h + 28);
        sock.write(s.buf.subarray(h, h + 32), last ? s.release : undefined);
      } else {
        this.chunkHeader(s, h, last ? abi.NBD_REPLY_FLAG_DONE : 0, abi.NBD_REPLY_TYPE_OFFSET_DATA, 8 + len);
        writeU64(s.buf, h + 20, off);
        sock.write(s.buf.subarray(h, h + 28));
        const at = DATA_OFF + start;
        sock.write(s.buf.subarray(at, at + len), last ? s.release : undefined);
      }
    }
    sock.uncork();
    this.complete(s, false);
    return -1;
  }

  private async blockStatus(s: Slot): Promise<number> {
    const node = this.exp!.node;
    const maxExtents = s.flags & abi.NBD_CMD_FLAG_REQ_ONE ? 1 : MAX_EXTENTS;
    const bitmaps = this.exp!.bitmaps ?? [];
    s.ensure(DATA_OFF + (2 + this.metaBitmaps.length) * (24 + 8 * MAX_EXTENTS));
    const parts: number[] = [];
    let at = DATA_OFF;
    for (let ctx = 0; ctx < 2 + this.metaBitmaps.length; ctx++) {
      if (ctx === 0 ? !this.metaBase : ctx === 1 ? !this.metaDepth : false) continue;
      const bitmap = ctx >= 2 ? bitmaps[this.metaBitmaps[ctx - 2]] : undefined;
      const start = at;
      s.buf.writeUInt32BE(
        ctx === 0 ? abi.NBD_META_ID_BASE_ALLOCATION
          : ctx === 1 ? abi.NBD_META_ID_ALLOCATION_DEPTH : NBD_META_ID_DIRTY_BITMAP + this.metaBitmaps[ctx - 2],
        start + 20,
      );
      let count = 0;
      let pos = 0;
      let prev = -1;
      let e = start + 24;
      while (pos < s.len) {
        let p: number;
        let v: number;
        if (bitmap) {
          // qemu:dirty-bitmap: flag 1 (NBD_STATE_DIRTY) for dirty runs, 0 for clean ones.
          const run = bitmap.runEnd(s.offset + pos, s.offset + s.len);
          p = run.end - (s.offset + pos);
          v = run.dirty ? 1 : 0;
        } else {
          const st = await node.blockStatus(s.offset + pos, s.len - pos);
          p = st.pnum > 0 ? Math.min(st.pnum, s.len - pos) : s.len - pos;
          v = ctx === 0
            ? (st.data ? 0 : abi.NBD_STATE_HOLE) | (st.zero ? abi.NBD_STATE_ZERO : 0)
            : st.depth ?? (st.allocated ? 1 : 0);
        }
        if (v === prev) {
          s.buf.writeUInt32BE(s.buf.readUInt32BE(e - 8) + p, e - 8);
        } else {
          if (count === maxExtents) break;
          s.buf.writeUInt32BE(p, e);
          s.buf.writeUInt32BE(v, e + 4);
          e += 8;
          count++;
          prev = v;
        }
        pos += p;
      }
      parts.push(start, e);
      at = e;
    }
    if (this.closing && this.socketClosed) {
      this.complete(s, true);
      return -1;
    }
    const sock = this.socket;
    sock.cork();
    for (let i = 0; i < parts.length; i += 2) {
      const last = i === parts.length - 2;
      const start = parts[i];
      const end = parts[i + 1];
      this.chunkHeader(s, start, last ? abi.NBD_REPLY_FLAG_DONE : 0, abi.NBD_REPLY_TYPE_BLOCK_STATUS, end - start - 20);
      sock.write(s.buf.subarray(start, end), last ? s.release : undefined);
    }
    sock.uncork();
    this.complete(s, false);
    return -1;
  }

  private chunkHeader(s: Slot, at: number, flags: number, type: number, length: number): void {
    const b = s.buf;
    b.writeUInt32BE(abi.NBD_STRUCTURED_REPLY_MAGIC, at);
    b.writeUInt16BE(flags, at + 4);
    b.writeUInt16BE(type, at + 6);
    s.handle.copy(b, at + 8);
    b.writeUInt32BE(length, at + 16);
  }

  /** Send the single reply of a request: data (READ), success or error. */
  private reply(s: Slot, err: number, dataLen: number): void {
    if (this.socketClosed) return this.complete(s, true);
    const b = s.buf;
    let from: number;
    let to = DATA_OFF;
    if (!this.structured) {
      from = DATA_OFF - abi.NBD_SIMPLE_REPLY_SIZE;
      b.writeUInt32BE(abi.NBD_SIMPLE_REPLY_MAGIC, from);
      b.writeUInt32BE(err, from + 4);
      s.handle.copy(b, from + 8);
      if (!err) to += dataLen;
    } else if (err) {
      // ERROR chunk: error, message length, message (in the header area; it is free here).
      const msg = s.msg.length > 1024 ? s.msg.slice(0, 1024) : s.msg;
      from = 0;
      const ml = b.write(msg, 26, 'utf8');
      this.chunkHeader(s, 0, abi.NBD_REPLY_FLAG_DONE, abi.NBD_REPLY_TYPE_ERROR, 6 + ml);
      b.writeUInt32BE(err, 20);
      b.writeUInt16BE(ml, 24);
      to = 26 + ml;
    } else if (s.type === abi.NBD_CMD_READ && dataLen > 0) {
      from = DATA_OFF - 28;
      this.chunkHeader(s, from, abi.NBD_REPLY_FLAG_DONE, abi.NBD_REPLY_TYPE_OFFSET_DATA, 8 + dataLen);
      writeU64(b, from + 20, s.offset);
      to += dataLen;
    } else if (s.type === abi.NBD_CMD_READ) {
      from = DATA_OFF - abi.NBD_CHUNK_HEADER_SIZE;
      this.chunkHeader(s, from, abi.NBD_REPLY_FLAG_DONE, abi.NBD_REPLY_TYPE_NONE, 0);
    } else {
      // Like QEMU 7.2, successes without data get a simple reply even after structured
      // replies were negotiated (the protocol allows it for everything but READ/BLOCK_STATUS).
      from = DATA_OFF - abi.NBD_SIMPLE_REPLY_SIZE;
      b.writeUInt32BE(abi.NBD_SIMPLE_REPLY_MAGIC, from);
      b.writeUInt32BE(0, from + 4);
      s.handle.copy(b, from + 8);
    }
    this.socket.write(b.subarray(from, to), s.release);
    this.complete(s, false);
  }

  /** The request's work is over (its reply is queued or dropped). */
  private complete(s: Slot, releaseNow: boolean): void {
    this.inFlight--;
    this.inFlightBytes -= s.charged;
    s.charged = 0;
    if (releaseNow || this.socketClosed) this.release(s);
    if (this.inFlight === 0 && this.idleWaiters.length) {
      const w = this.idleWaiters;
      this.idleWaiters = [];
      for (const f of w) f();
    }
    if (this.closing) {
      if (this.inFlight === 0 && !this.socketClosed) {
        this.socket.end();
      }
      this.maybeFinish();
      return;
    }
    if (this.phase === 'stalled' && (this.inFlightBytes === 0 || this.inFlightBytes + this.current!.len <= IN_FLIGHT_BYTES)) {
      this.admit(this.current!);
    }
    this.resumeReading();
  }

  private release(s: Slot): void {
    if (s.free) return;
    s.free = true;
    if (s.buf.length > KEEP_BUF) s.buf = Buffer.allocUnsafe(MIN_BUF);
    this.freeSlots.push(s);
  }

  /** Stop reading; finish requests in flight, send their replies, then close. */
  private closeGracefully(): void {
    this.closing = true;
    this.phase = 'done';
    this.clearHandshakeTimer();
    if (this.inFlight === 0) this.socket.end();
    this.socket.once('finish', () => this.socket.destroy());
  }

  /** A request still being received (payload, or waiting for the byte budget) will never run. */
  private abandonCurrent(): void {
    const s = this.current;
    if (!s) return;
    this.current = undefined;
    this.phase = 'done';
    this.inFlight--;
    this.inFlightBytes -= s.charged;
    s.charged = 0;
    this.release(s);
  }

  private maybeFinish(): void {
    if (this.finished || !this.socketClosed || this.inFlight > 0) return;
    this.finished = true;
    for (const f of this.idleWaiters) f();
    this.idleWaiters = [];
    const exp = this.exp;
    if (exp) {
      exp.connections.delete(this);
      exp.connectionGone(this);
    }
    this.host.connectionClosed(this);
  }
}

function writeU64(b: Buffer, at: number, v: number): void {
  b.writeUInt32BE(Math.floor(v / 0x100000000), at);
  b.writeUInt32BE(v >>> 0, at + 4);
}
