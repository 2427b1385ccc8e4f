// FUSE-over-io_uring queue: serves some of the kernel's per-CPU FUSE ring queues from the calling thread.
//
// The kernel delivers each request into a registered ring entry (header + payload buffer) and takes
// the answer back with COMMIT_AND_FETCH on that entry, which re-arms it: no read(2)/write(2) per
// request, and a request is queued on the ring queue of the CPU that issued it. Request semantics
// are FuseServer's (src/exports/fuse-queue.ts), exactly as for /dev/fuse queues; only the buffers
// and the way answers travel differ. INIT, FORGET and INTERRUPT still travel over /dev/fuse, so an
// io-uring export keeps its /dev/fuse queues too.
import { constants as osConstants } from 'node:os';
import { isMainThread } from 'node:worker_threads';
import type { BlockNode } from '../block/node.js';
import type { LocalQueue } from '../iothread/context.js';
import { native, type FuseUring } from '../native/binding.js';
import { strerror } from '../util/errno.js';
import * as abi from './fuse-abi.js';
import { FUSE_MAX_WRITE_BYTES, FUSE_STATE_HALTED, FuseServer, NO_SLOT_VIEWS, type FuseQueueParams, type FuseSlot } from './fuse-queue.js';

const { ENOTCONN, ECANCELED, EINVAL } = osConstants.errno;

const { HEADER_SIZE, OP_IN_OFFSET, ENT_IN_OUT_OFFSET } = native.fuseUringConstants;
/** fuse_uring_ent_in_out.payload_sz. */
const PAYLOAD_SZ = ENT_IN_OUT_OFFSET + 16;
/**
 * Payload buffer per entry. The kernel refuses entries smaller than its max payload, which is
 * max(8 KiB, max_write, max_pages pages): 128 KiB with our INIT answer. Page-aligned for O_DIRECT.
 */
export const FUSE_URING_PAYLOAD_BYTES = FUSE_MAX_WRITE_BYTES;
/** Header buffers are spaced so each starts on its own cache lines. */
const HEADER_STRIDE = 512;
/** Ring entries per kernel queue unless the export says otherwise (libfuse's default is 8). */
export const FUSE_URING_DEFAULT_ENTRIES = 32;
/** How long stop() waits for the kernel to give the armed entries back before closing the ring. */
const STOP_GRACE_MS = 2000;

/**
 * CPU pinning of this thread while it serves ring queues. The kernel queues a request on the ring
 * of the CPU that issued it; an iothread that serves only some CPUs' rings is pinned to those CPUs,
 * so the answer is computed where the request was made and the wake-up stays on one CPU (7 µs
 * round trip here, against 80–120 µs across vCPUs). The thread may run where the union of its
 * queues' CPUs allows; with none left, its original affinity comes back. The main loop is never
 * pinned: QMP and every main-loop export share it.
 */
const pinned = new Map<object, number[]>();
let originalAffinity: number[] | null = null;

function applyPinning(): void {
  if (originalAffinity === null) return;
  const union = new Set<number>();
  for (const cpus of pinned.values()) for (const cpu of cpus) union.add(cpu);
  const wanted = pinned.size === 0 ? originalAffinity : originalAffinity.filter((cpu) => union.has(cpu));
  // None of the queues' CPUs is allowed to this thread (a cpuset): leave the affinity alone.
  if (wanted.length > 0) native.setThreadAffinity(wanted);
}

function pinToQueues(owner: object, qids: number[]): void {
  if (isMainThread || process.env.QSD_TS_NO_PIN) return;
  originalAffinity ??= native.threadAffinity();
  // Serving every CPU's queue: pinning would change nothing.
  if (originalAffinity.every((cpu) => qids.includes(cpu))) return;
  pinned.set(owner, qids);
  applyPinning();
}

function unpin(owner: object): void {
  if (pinned.delete(owner)) applyPinning();
}

class FuseUringQueue extends FuseServer {
  private readonly ring: FuseUring;
  private readonly slots: FuseSlot[] = [];
  private readonly headers: Buffer[] = [];
  /** Entries holding a request that arrived while drained: served at drainEnd. */
  private held: number[] = [];
  /** First error a ring command failed with (REGISTER refused, connection gone), as a positive errno. */
  firstError = 0;
  private commitErrorLogged = false;
  private idleWaiters: Array<() => void> = [];

  constructor(node: BlockNode, params: FuseQueueParams) {
    super(node, params);
    this.replyAlways = true;
    const { qids, entriesPerQueue } = params.uring!;
    const count = qids.length * entriesPerQueue;
    const headerMem = native.allocAligned(count * HEADER_STRIDE, 4096);
    for (let i = 0; i < count; i++) {
      const header = headerMem.subarray(i * HEADER_STRIDE, i * HEADER_STRIDE + HEADER_SIZE);
      const payload = native.allocAligned(FUSE_URING_PAYLOAD_BYTES, 4096);
      this.headers.push(header);
      this.slots.push({
        index: i,
        in: header.subarray(0, OP_IN_OFFSET),
        op: header.subarray(OP_IN_OFFSET, ENT_IN_OUT_OFFSET),
        data: payload,
        // The out header replaces the in header in the same area; it is written after parsing.
        outHeader: header.subarray(0, OP_IN_OFFSET),
        out: payload,
        uniqueLo: 0,
        uniqueHi: 0,
        ...NO_SLOT_VIEWS,
      });
    }
    this.ring = new native.FuseUring(params.fd, count, this.onComplete);
    for (let i = 0; i < count; i++) {
      const r = this.ring.register(i, qids[Math.floor(i / entriesPerQueue)]!, this.headers[i]!, this.slots[i]!.data);
      if (r < 0) {
        this.ring.close();
        throw Object.assign(new Error(`Failed to register FUSE ring entry: ${strerror(-r)}`), { errno: -r });
      }
    }
    const s = this.ring.submit();
    if (s < 0) {
      this.ring.close();
      throw Object.assign(new Error(`Failed to register FUSE ring entries: ${strerror(-s)}`), { errno: -s });
    }
    pinToQueues(this, qids);
  }

  /**
   * Resolves once the kernel has had a loop turn to refuse the registrations (it does so inline,
   * while we submit): rejects with the kernel's errno if it did.
   */
  async started(): Promise<void> {
    await new Promise((resolve) => setImmediate(resolve));
    if (this.firstError !== 0) {
      const errno = this.firstError;
      await this.stop();
      throw Object.assign(new Error(`Failed to register FUSE ring entries: ${strerror(errno)}`), { errno });
    }
  }

  private readonly onComplete = (count: number, tags: Int32Array, results: Int32Array): void => {
    if (Atomics.load(this.state, FUSE_STATE_HALTED) !== 0) this.dead = true;
    for (let i = 0; i < count; i++) {
      const tag = tags[i]!;
      const res = results[i]!;
      if (res === 0) {
        if (this.drained || this.dead) this.held.push(tag);
        else this.take(tag);
      } else {
        // The entry is no longer armed. ENOTCONN/ECANCELED: the connection ended or the ring is
        // being torn down, which is how every entry leaves at export deletion.
        this.firstError ||= -res;
        if (res !== -ENOTCONN && res !== -ECANCELED && !this.stopped) {
          console.error(`Export '${this.params.exportId}': FUSE ring command failed: ${strerror(-res)}`);
        }
      }
    }
    if (this.ring.pending === 0 && this.idleWaiters.length > 0) {
      const waiters = this.idleWaiters;
      this.idleWaiters = [];
      for (const w of waiters) w();
    }
  };

  private take(tag: number): void {
    const slot = this.slots[tag]!;
    this.inFlight++;
    const len = slot.in.readUInt32LE(abi.IN_LEN);
    const payload = this.headers[tag]!.readUInt32LE(PAYLOAD_SZ);
    if (len < abi.IN_HEADER_SIZE || payload > FUSE_URING_PAYLOAD_BYTES) {
      this.halt(`Malformed FUSE ring request: length ${len}, payload ${payload} bytes`);
      // Answer anyway so the kernel gets its entry back.
      slot.uniqueLo = slot.in.readUInt32LE(abi.IN_UNIQUE);
      slot.uniqueHi = slot.in.readUInt32LE(abi.IN_UNIQUE + 4);
      this.finish(slot, -EINVAL);
      return;
    }
    this.serve(slot, len);
  }

  protected transmit(slot: FuseSlot, len: number): void {
    const header = this.headers[slot.index]!;
    header.writeUInt32LE(len - abi.OUT_HEADER_SIZE, PAYLOAD_SZ);
    const r = this.ring.commit(slot.index);
    if (r < 0 && !this.commitErrorLogged) {
      this.commitErrorLogged = true;
      console.error(`Export '${this.params.exportId}': Failed to commit FUSE ring entry: ${strerror(-r)}`);
    }
  }

  protected recycle(): void {
    // Committing re-armed the entry already.
  }

  protected updateIntake(): void {
    if (this.drained || this.held.length === 0) return;
    const held = this.held;
    this.held = [];
    for (const tag of held) this.take(tag);
  }

  protected async shutdown(): Promise<void> {
    // Requests that arrived while drained get ENOTCONN, as unread /dev/fuse requests do when the
    // export's fds close; committing hands the entries back to the kernel.
    const held = this.held;
    this.held = [];
    for (const tag of held) {
      const slot = this.slots[tag]!;
      slot.uniqueLo = slot.in.readUInt32LE(abi.IN_UNIQUE);
      slot.uniqueHi = slot.in.readUInt32LE(abi.IN_UNIQUE + 4);
      this.stopped = false; // finish() answers only while not stopped
      this.inFlight++;
      this.finish(slot, -ENOTCONN);
      this.stopped = true;
    }
    // The armed entries come back with ENOTCONN once the connection ends (unmount or fd close);
    // only then may their buffers be freed. If that takes too long, the ring closes anyway and
    // the kernel cancels them (the buffers then stay referenced: see FuseUring.close()).
    if (this.ring.pending > 0) {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, STOP_GRACE_MS);
        this.idleWaiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
    this.ring.close();
    unpin(this);
  }
}

/**
 * Start serving FUSE ring queues params.uring.qids in the calling thread: registers
 * entriesPerQueue entries per queue on params.fd. Rejects with the kernel's errno when it refuses
 * the registration (e.g. EOPNOTSUPP: enable_uring is off; EINVAL: a bad queue id).
 */
export async function startFuseUringQueue(node: BlockNode, params: FuseQueueParams): Promise<LocalQueue> {
  const q = new FuseUringQueue(node, params);
  await q.started();
  return q;
}
