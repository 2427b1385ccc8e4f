// Backup jobs (QEMU's block/backup.c on block-copy): copy a point-in-time image of a node into a
// target, cluster by cluster, with copy-before-write of guest writes and the sync bitmap's modes.
import { DirtyBitmap, nodeTracking } from '../block/dirty-bitmap.js';
import type { BlockNode } from '../block/node.js';
import type { BlockJob, BlockJobHooks } from './block-job.js';
import { CopyLock, layerAllocated, NodeHolds, type JobContext } from './job-context.js';
import { JobFilter } from './job-filter.js';

/** QEMU's BLOCK_COPY_CLUSTER_SIZE_DEFAULT. */
const CLUSTER_DEFAULT = 65536;
/** QEMU's BLOCK_COPY_MAX_BUFFER: the largest copy task. */
const MAX_CHUNK = 1024 * 1024;

export type BackupSync = 'full' | 'top' | 'none' | 'bitmap';
export type BitmapSyncMode = 'on-success' | 'never' | 'always';

export interface BackupParams {
  source: BlockNode;
  target: BlockNode;
  /** 'incremental' already became 'bitmap' with mode 'on-success'. */
  sync: BackupSync;
  bitmap?: DirtyBitmap;
  bitmapMode?: BitmapSyncMode;
  /** 'filter-node-name': the name of the job's copy-before-write node. */
  filterNodeName?: string;
}

/** QEMU's block_copy_calculate_cluster_size: at least 64 KiB, else the target's cluster size. */
export function backupClusterSize(target: BlockNode): number {
  const cluster = target.driver.imageInfo?.(target.state)['cluster-size'] as number | undefined;
  return Math.max(CLUSTER_DEFAULT, cluster ?? 0);
}

/** The clusters still to copy (QEMU's block-copy copy_bitmap): job-private, one bit per cluster. */
export class CopyBitmap {
  private readonly bits: Uint8Array;
  readonly clusters: number;

  constructor(readonly cluster: number, readonly length: number) {
    this.clusters = Math.ceil(length / cluster);
    this.bits = new Uint8Array(Math.ceil(this.clusters / 8));
  }

  get(c: number): boolean {
    return (this.bits[c >> 3]! & (1 << (c & 7))) !== 0;
  }

  set(c: number, v: boolean): void {
    if (v) this.bits[c >> 3]! |= 1 << (c & 7);
    else this.bits[c >> 3]! &= ~(1 << (c & 7));
  }

  setAll(): void {
    for (let c = 0; c < this.clusters; c++) this.set(c, true);
  }

  /** Dirty clusters times the cluster size (QEMU's bdrv_get_dirty_count), clamped to the length. */
  count(): number {
    let n = 0;
    for (let c = 0; c < this.clusters; c++) if (this.get(c)) n += Math.min(this.cluster, this.length - c * this.cluster);
    return n;
  }

  /** Marks every cluster `b` has a dirty bit in (any granularity). */
  setFrom(b: DirtyBitmap): void {
    const end = Math.min(this.length, b.size);
    for (let off = 0; off < end;) {
      const run = b.runEnd(off, end);
      if (run.dirty) {
        for (let c = Math.floor(off / this.cluster); c * this.cluster < run.end; c++) this.set(c, true);
      }
      off = run.end;
    }
  }
}

/**
 * Holds the target as QEMU's backup_job_create() does and returns the job's hooks. The source
 * is not op-blocked (QEMU blocks its copy-before-write filter, not the source itself).
 */
export function setupBackup(ctx: JobContext, job: BlockJob, p: BackupParams): BlockJobHooks {
  const { source, target, sync, bitmap } = p;
  const mode = p.bitmapMode ?? 'on-success';
  // QEMU's backup_job_create: the copy-before-write filter above the source comes first (its
  // name may be refused); the job holds the filter and the target.
  const filter = JobFilter.copyBeforeWrite(ctx.graph, source, target, p.filterNodeName);
  const len = source.getLength();
  const cluster = backupClusterSize(target);
  const copy = new CopyBitmap(cluster, len);
  if (sync === 'bitmap') copy.setFrom(bitmap!);
  else copy.setAll();
  job.totalProgress = copy.count();

  /**
   * The unnamed bitmaps QEMU's query-named-block-nodes shows while a backup runs (disabled, one
   * bit per cluster): block-copy's copy bitmap on the source (what is left to copy), and on the
   * filter copy-before-write's done bitmap (clusters it copied before a write) and, newest, its
   * access bitmap (what the snapshot may read: everything to be copied).
   */
  const shown = (node: BlockNode): DirtyBitmap => {
    const b = new DirtyBitmap(node, undefined as unknown as string, cluster, len);
    b.setEnabled(false);
    return b;
  };
  const shownCopy = shown(source);
  const shownDone = shown(filter.node);
  const shownAccess = shown(filter.node);
  const showCopyBitmap = (): void => {
    for (let c = 0; c < copy.clusters;) {
      let e = c;
      const set = copy.get(c);
      while (e < copy.clusters && copy.get(e) === set) e++;
      if (set) shownCopy.setRange(c * cluster, Math.min(e * cluster, len) - c * cluster);
      else shownCopy.resetRange(c * cluster, Math.min(e * cluster, len) - c * cluster);
      c = e;
    }
  };
  showCopyBitmap();
  shownAccess.mergeFrom(shownCopy);

  const holds = new NodeHolds(ctx.graph, job.type, job.id, () => job.drainPause(false));
  holds.hold(filter.node);
  holds.hold(target, 'target');

  // QEMU freezes the sync bitmap and records new writes in a successor; here the bitmap itself
  // records the new writes while its content at the start is kept aside.
  let frozen: Int32Array | undefined;
  if (bitmap) {
    frozen = bitmap.snapshot();
    bitmap.clear();
    bitmap.busy = true;
  }

  const lock = new CopyLock();
  const buf = Buffer.allocUnsafe(MAX_CHUNK);
  const cbwBuf = Buffer.allocUnsafe(cluster);

  /** Copies clusters [c0, c1) (all dirty) from source to target. */
  const copyClusters = async (c0: number, c1: number, io: Buffer): Promise<number> => {
    const offset = c0 * cluster;
    const n = Math.min(c1 * cluster, len) - offset;
    for (let done = 0; done < n;) {
      const k = Math.min(io.length, n - done);
      const st = await source.blockStatus(offset + done, k);
      const m = st.pnum > 0 ? Math.min(k, st.pnum) : k;
      if (st.zero && !st.data) {
        await target.writeZeroes(offset + done, m);
      } else {
        const view = io.subarray(0, m);
        await source.read(offset + done, view);
        await target.write(offset + done, view);
      }
      done += m;
    }
    for (let c = c0; c < c1; c++) copy.set(c, false);
    shownCopy.resetRange(offset, n);
    job.currentProgress += n;
    return n;
  };

  /** Copy-before-write: the old data of clusters not yet copied reaches the target first. */
  const beforeWrite = (offset: number, bytes: number): Promise<void> => {
    if (bytes <= 0) return Promise.resolve();
    const first = Math.floor(offset / cluster);
    const last = Math.min(Math.floor((offset + bytes - 1) / cluster), copy.clusters - 1);
    let any = false;
    for (let c = first; c <= last && !any; c++) any = copy.get(c);
    if (!any) return Promise.resolve();
    return lock.run(async () => {
      for (let c = first; c <= last; c++) {
        if (!copy.get(c)) continue;
        await copyClusters(c, c + 1, cbwBuf);
        shownDone.setRange(c * cluster, Math.min(cluster, len - c * cluster));
      }
    });
  };
  const tracking = nodeTracking(source);
  source.writeInterceptors = [...(source.writeInterceptors ?? []), beforeWrite];
  tracking.adjustActive(1);
  let hooked = true;
  const unhook = (): void => {
    if (!hooked) return;
    hooked = false;
    const rest = (source.writeInterceptors ?? []).filter((f) => f !== beforeWrite);
    source.writeInterceptors = rest.length > 0 ? rest : null;
    tracking.adjustActive(-1);
  };

  /** QEMU's backup_cleanup_sync_bitmap(). */
  const syncBitmap = (ok: boolean): void => {
    if (!bitmap || !frozen) return;
    const synced = (ok || mode === 'always') && mode !== 'never';
    if (!synced || (!ok && mode === 'always')) {
      // Merge back what the bitmap held at the start (not synced), or what was not copied.
      const tmp = new DirtyBitmap(source, undefined as unknown as string, bitmap.granularity, bitmap.size);
      tmp.setEnabled(false);
      if (!synced) {
        tmp.restore(frozen);
      } else {
        for (let c = 0; c < copy.clusters; c++) if (copy.get(c)) tmp.setRange(c * cluster, cluster);
      }
      bitmap.mergeFrom(tmp);
      tmp.release();
    }
    frozen = undefined;
  };

  return {
    // QEMU starts the job inside the command's drained section: it pauses at once, then resumes.
    startsDrained: true,
    async run() {
      if (sync === 'none') {
        while (!job.isCancelled) await job.sleep(3600e9);
        return;
      }
      if (sync === 'top' && source.backing) {
        // QEMU's block_copy_reset_unallocated: what the top layer does not hold is not copied.
        for (let off = 0, n = 0; off < len; off += n) {
          const r = await layerAllocated(source, off, len - off);
          n = Math.max(r.pnum, 1);
          if (r.allocated) continue;
          const c0 = Math.ceil(off / cluster);
          const c1 = off + n >= len ? copy.clusters : Math.floor((off + n) / cluster);
          for (let c = c0; c < c1; c++) copy.set(c, false);
        }
        showCopyBitmap();
        job.totalProgress = copy.count() + job.currentProgress;
      }
      let delay = 0;
      for (let c = 0; c < copy.clusters;) {
        // A cancel during the last copy found no sleeper to wake: look before sleeping.
        if (job.isCancelled) return;
        await job.sleep(delay);
        if (job.isCancelled) return;
        delay = 0;
        if (!copy.get(c)) {
          c++;
          continue;
        }
        let end = c + 1;
        while (end < copy.clusters && (end - c) * cluster < MAX_CHUNK && copy.get(end)) end++;
        // One task never crosses a change between data and zeroes (QEMU's block-copy status).
        const st = await source.blockStatus(c * cluster, Math.min(end * cluster, len) - c * cluster);
        if (st.pnum > 0) end = Math.min(end, c + Math.max(1, Math.ceil(st.pnum / cluster)));
        const start = c;
        const n = await lock.run(async () => {
          // A guest write may have copied some of them meanwhile.
          let s = start;
          while (s < end && !copy.get(s)) s++;
          let e = s;
          while (e < end && copy.get(e)) e++;
          return s < e ? copyClusters(s, e, buf) : 0;
        });
        delay = job.limit.delay(n);
        c = end;
      }
      await target.flush();
    },
    async prepare() {
      syncBitmap(true);
    },
    async abort() {
      syncBitmap(false);
    },
    async clean() {
      unhook();
      await lock.run(async () => undefined);
      if (bitmap) bitmap.busy = false;
      for (const b of [shownAccess, shownDone, shownCopy]) b.release();
      filter.remove();
      holds.release();
    },
  };
}

/** Undoes setupBackup() for a job that never started (a transaction rolled back). */
export async function abandonBackup(hooks: BlockJobHooks, job: BlockJob): Promise<void> {
  await hooks.abort?.(job);
  await hooks.clean?.(job);
}
