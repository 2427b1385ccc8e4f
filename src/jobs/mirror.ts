// Mirror jobs (QEMU's block/mirror.c): copy a node into a target while an unnamed dirty bitmap on
// the source records new writes, iterate until clean, report ready, keep mirroring, and on
// job-complete make the target take the source's place. In write-blocking copy mode every write to
// the source also reaches the target before it completes.
import { DirtyBitmap } from '../block/dirty-bitmap.js';
import type { BlockNode } from '../block/node.js';
import type { WriteFlags, ZeroFlags } from '../block/driver.js';
import type { BlockJob, BlockJobHooks } from './block-job.js';
import { allocatedAbove, CopyLock, layerAllocated, NodeHolds, type JobContext } from './job-context.js';
import { JobFilter } from './job-filter.js';
import type { Permission } from '../block/graph.js';

const SHARE_NO_RESIZE: readonly Permission[] = ['consistent read', 'write', 'write unchanged'];

/** QEMU's DEFAULT_MIRROR_BUF_SIZE: the most one iteration copies. */
export const DEFAULT_MIRROR_BUF_SIZE = 16 * 1024 * 1024;
/** The largest single read/write the job issues (QEMU splits by the target's max transfer). */
const MAX_IO = 1024 * 1024;
/** QEMU's BLOCK_JOB_SLICE_TIME: how often a clean job looks for new dirty data. */
const IDLE_SLICE_NS = 100_000_000;

export type MirrorSync = 'full' | 'top' | 'none';

export interface MirrorParams {
  source: BlockNode;
  target: BlockNode;
  sync: MirrorSync;
  /** Dirty bitmap granularity (a power of 2, already checked); 0: the target's default. */
  granularity: number;
  /** Bytes one iteration may copy (0: the default). */
  bufSize: number;
  /** The node the target takes the place of on completion (default: the source). */
  replaces?: BlockNode;
  /**
   * QEMU's zero_target: the target may hold other data where the source reads zeroes (a
   * blockdev-mirror sync=full, or a drive-mirror sync=full onto an existing or non-zeroed image).
   */
  zeroTarget: boolean;
  /**
   * drive-mirror with a new image (QEMU's MIRROR_SOURCE_BACKING_CHAIN): on completion the
   * target's backing becomes the source's backing (top) or the source itself (none).
   */
  sourceBackingChain?: boolean;
  /** 'filter-node-name': the name of the job's mirror_top node. */
  filterNodeName?: string;
  /** 'copy-mode': 'write-blocking' copies each write to the target synchronously. */
  copyMode?: 'background' | 'write-blocking';
}

/** QEMU's bdrv_get_default_bitmap_granularity(): the cluster size within [4 KiB, 64 KiB], else 64 KiB. */
export function mirrorGranularity(target: BlockNode): number {
  const cluster = target.driver.imageInfo?.(target.state)['cluster-size'] as number | undefined;
  if (!cluster) return 65536;
  return Math.min(65536, Math.max(4096, cluster));
}

/**
 * QEMU's mirror_start_job(): the job's bitmap starts recording the source's writes at once and
 * the nodes are held; returns the hooks for BlockJob.start().
 */
export function setupMirror(ctx: JobContext, job: BlockJob, p: MirrorParams): BlockJobHooks {
  const { source, target } = p;
  const granularity = p.granularity || mirrorGranularity(target);
  // QEMU rounds the buffer up to whole granules.
  const bufSize = Math.ceil((p.bufSize || DEFAULT_MIRROR_BUF_SIZE) / granularity) * granularity;
  // A sync=top mirror of a node without backing copies everything (QEMU turns it into full).
  const sync: MirrorSync = p.sync === 'top' && !source.backing ? 'full' : p.sync;
  // QEMU's mirror_start_job: the mirror_top filter above the source, the job's edges, then its
  // BlockBackend on the target (which lets others only write unchanged data).
  const filter = JobFilter.mirrorTop(ctx.graph, source, p.filterNodeName, false);
  const holds = new NodeHolds(ctx.graph, job.type, job.id, () => job.drainPause());
  try {
    holds.hold(filter.node, 'main node', SHARE_NO_RESIZE, ['consistent read']);
    holds.hold(source, 'source', SHARE_NO_RESIZE);
    holds.hold(target, 'target');
    holds.backend(target, ['write'], ['write unchanged']);
  } catch (err) {
    holds.release();
    filter.remove();
    throw err;
  }
  // Unnamed (QEMU's NULL name): query-named-block-nodes shows it without a name; QMP cannot reach it.
  let bitmap: DirtyBitmap | undefined = new DirtyBitmap(source, undefined as unknown as string, granularity, source.getLength());
  const buf = Buffer.allocUnsafe(MAX_IO);
  let cursor = 0;

  const releaseBitmap = (): void => {
    bitmap?.release();
    bitmap = undefined;
  };

  /**
   * QEMU's mirror_dirty_init(): what the first pass copies. A target to be zeroed that cannot
   * unmap (no discard=unmap) is simply copied whole; otherwise it is zeroed first (not counted as
   * progress) and what is allocated above the base is copied (the whole chain for full, the top
   * layer for top).
   */
  const dirtyInit = async (len: number): Promise<void> => {
    if (sync === 'none') return;
    if (p.zeroTarget) {
      if (target.options.discard !== 'unmap') {
        bitmap!.setRange(0, len);
        return;
      }
      for (let off = 0; off < len && !job.isCancelled; off += MAX_IO * 64) {
        await target.writeZeroes(off, Math.min(MAX_IO * 64, len - off), { mayUnmap: true });
      }
    }
    for (let off = 0, n = 0; off < len; off += n) {
      if (job.isCancelled) return;
      const r = sync === 'top' ? await layerAllocated(source, off, len - off) : await allocatedAbove(source, undefined, off, len - off);
      n = Math.max(1, r.pnum);
      if (r.allocated) bitmap!.setRange(off, n);
    }
  };

  const lock = new CopyLock();

  /**
   * Write-blocking (QEMU's mirror_top do_sync_target_write): the source's own write methods are
   * wrapped for the job's life, so a write through any export completes only once the target has
   * it too. The write marks the job's bitmap first; the granules it covers whole are clean again
   * once the target has them. Under the lock, a copy the job has in flight cannot overwrite it.
   */
  let unhook = (): void => {};
  if (p.copyMode === 'write-blocking') {
    const own = source as unknown as Record<string, unknown>;
    const proto = Object.getPrototypeOf(source) as BlockNode;
    const active = (): boolean => bitmap !== undefined && !job.isCancelled;
    const toTarget = (offset: number, bytes: number, io: () => Promise<void>): Promise<void> => lock.run(async () => {
      if (!active()) return;
      try {
        await io();
      } catch {
        return; // Still dirty: the job copies it again (and reports the target's error then).
      }
      const first = Math.ceil(offset / granularity) * granularity;
      const last = Math.floor((offset + bytes) / granularity) * granularity;
      if (last > first && bitmap) bitmap.resetRange(first, last - first);
      job.totalProgress += bytes;
      job.currentProgress += bytes;
    });
    own.write = async function (this: BlockNode, offset: number, buf: Buffer, flags?: WriteFlags) {
      await proto.write.call(this, offset, buf, flags);
      if (active()) await toTarget(offset, buf.length, () => target.write(offset, buf));
    };
    own.writeZeroes = async function (this: BlockNode, offset: number, bytes: number, flags?: ZeroFlags) {
      await proto.writeZeroes.call(this, offset, bytes, flags);
      if (active()) await toTarget(offset, bytes, () => target.writeZeroes(offset, bytes, { mayUnmap: flags?.mayUnmap }));
    };
    own.discard = async function (this: BlockNode, offset: number, bytes: number) {
      await proto.discard.call(this, offset, bytes);
      if (active() && source.unmapAllowed) await toTarget(offset, bytes, () => target.discard(offset, bytes));
    };
    unhook = () => {
      for (const key of ['write', 'writeZeroes', 'discard']) delete own[key];
      unhook = () => {};
    };
  }

  /** Copies [offset, offset + n) from source to target; zeroes stay zeroes. Returns data bytes. */
  const copy = (offset: number, n: number): Promise<number> => lock.run(() => copyUnlocked(offset, n));
  const copyUnlocked = async (offset: number, n: number): Promise<number> => {
    let data = 0;
    for (let done = 0; done < n;) {
      const k = Math.min(MAX_IO, n - done);
      const st = await source.blockStatus(offset + done, k);
      const m = st.pnum > 0 ? Math.min(k, st.pnum) : k;
      if (st.zero && !st.data) {
        await target.writeZeroes(offset + done, m, { mayUnmap: true });
      } else {
        const view = buf.subarray(0, m);
        await source.read(offset + done, view);
        await target.write(offset + done, view);
        data += m;
      }
      done += m;
    }
    return data;
  };

  /** The first dirty offset at or after `from`, wrapping to 0 (QEMU's dirty iterator); -1: clean. */
  const nextDirty = (b: DirtyBitmap, from: number, len: number): number => {
    for (const [lo, hi] of [[from, len], [0, from]]) {
      for (let off = lo; off < hi;) {
        const r = b.runEnd(off, hi);
        if (r.dirty) return off;
        off = r.end;
      }
    }
    return -1;
  };

  /**
   * QEMU's mirror_iteration(): the first dirty run from the cursor on, at most bufSize, is
   * cleared and copied; writes during the copy dirty it again. Returns the rate-limit delay.
   */
  const iteration = async (len: number): Promise<number> => {
    const b = bitmap!;
    const at = nextDirty(b, cursor, len);
    if (at < 0) return 0;
    const start = Math.floor(at / granularity) * granularity;
    const end = Math.min(b.runEnd(start, len).end, start + bufSize, len);
    const n = end - start;
    b.resetRange(start, n);
    const data = await copy(start, n);
    job.currentProgress += n;
    cursor = end >= len ? 0 : end;
    return job.limit.delay(data);
  };

  /** Copies whatever is dirty now (the final pass, in the drained section). */
  const syncAll = async (len: number): Promise<void> => {
    for (let guard = 0; bitmap!.count() > 0 && guard < 1 << 20; guard++) {
      job.totalProgress = job.currentProgress + bitmap!.count();
      await iteration(len);
    }
  };

  return {
    async run() {
      const len = source.getLength();
      if (target.getLength() !== len) {
        job.totalProgress = 0;
        throw new Error('Source and target image have different sizes');
      }
      await dirtyInit(len);
      let ready = false;
      for (;;) {
        if (job.isCancelled) return;
        const cnt = bitmap!.count();
        job.totalProgress = job.currentProgress + cnt;
        let delay = 0;
        if (cnt > 0) {
          delay = await iteration(len);
          if (job.isCancelled) return;
          if (bitmap!.count() > 0 || delay > 0) {
            await job.sleep(delay);
            continue;
          }
        }
        job.totalProgress = job.currentProgress;
        if (!ready) {
          await target.flush();
          if (job.isCancelled) return;
          ready = true;
          job.transitionToReady();
        }
        // QEMU's should_complete: job-complete, or a cancel without force once ready.
        if (job.shouldComplete || job.softCancelled) return;
        await job.sleep(IDLE_SLICE_NS);
      }
    },
    async prepare() {
      const len = source.getLength();
      const from = p.replaces ?? source;
      await ctx.exports.drained(from, async () => {
        // Writes that came after the last look: copy them with the exports stopped.
        await syncAll(len);
        await target.flush();
        unhook();
        releaseBitmap();
        filter.remove();
        holds.release();
        if (!job.shouldComplete) return;
        if (p.sourceBackingChain) {
          const backing = p.sync === 'none' ? source : source.backing;
          if (target.backing !== backing) await ctx.graph.setBacking(target, backing);
        }
        ctx.graph.replaceNode(from, target);
      });
    },
    async clean() {
      unhook();
      await lock.run(async () => undefined);
      releaseBitmap();
      filter.remove();
      holds.release();
    },
  };
}
