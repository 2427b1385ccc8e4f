// block-commit: copy the data of `top` (and the layers down to `base`) into `base`, then drop
// them from the chain (QEMU's block/commit.c), or, when top is the active layer, QEMU's active
// commit (block/mirror.c): copy, report ready, and on job-complete make `base` the active layer.
import { nodeFilename } from '../block/graph.js';
import type { BlockNode } from '../block/node.js';
import { formatQmpJson } from '../qmp/json.js';
import { genericError } from '../qapi/errors.js';
import type { BlockJob, BlockJobHooks } from './block-job.js';
import { allocatedAbove, copyRange, NodeHolds, type JobContext } from './job-context.js';
import { JobFilter } from './job-filter.js';
import type { Permission } from '../block/graph.js';

/** What QEMU's commit and mirror jobs let others do with the nodes they hold. */
const SHARE_WRITES: readonly Permission[] = ['write unchanged', 'write'];
const SHARE_NO_RESIZE: readonly Permission[] = ['consistent read', 'write', 'write unchanged'];

/** QEMU's COMMIT_BUFFER_SIZE: one step of the commit loop. */
const COMMIT_BUFFER_SIZE = 512 * 1024;
const jsonFilename = (value: unknown) => formatQmpJson(value);

export interface CommitParams {
  /** The root node the command named ('device'). */
  bs: BlockNode;
  top: BlockNode;
  base: BlockNode;
  /** 'backing-file': the name written into the overlay's header instead of base's filename. */
  backingFile?: string;
  /** 'filter-node-name': the name of the job's commit_top/mirror_top node. */
  filterNodeName?: string;
}

/** The nodes between top (inclusive) and base (exclusive). */
function intermediates(top: BlockNode, base: BlockNode): BlockNode[] {
  const out: BlockNode[] = [];
  for (let n: BlockNode | undefined = top; n && n !== base; n = n.backing) out.push(n);
  return out;
}

/** Makes base writable for the job; returns whether it was read-only. */
async function openBaseWritable(ctx: JobContext, base: BlockNode): Promise<boolean> {
  const wasReadOnly = base.readOnly;
  if (wasReadOnly) await ctx.graph.setReadOnly(base, false);
  return wasReadOnly;
}

/** Grows base to top's length, as QEMU does before copying. */
async function growBase(base: BlockNode, len: number): Promise<void> {
  if (base.getLength() < len) await base.truncate(len, false, 'off');
}

/** Holds the nodes as QEMU's commit_start() does; the returned holds are released in clean. */
export async function setupCommit(ctx: JobContext, job: BlockJob, p: CommitParams, active: boolean): Promise<BlockJobHooks> {
  const { bs, top, base } = p;
  if (active) {
    // The mirror job's filter on top unshares resize, which a writable FUSE export holds.
    const resizer = ctx.graph.usersOf(top).find((u) => !u.parent && u.perms.has('resize'));
    if (resizer) {
      const filter = p.filterNodeName ?? ctx.graph.anonymousNodeName();
      throw genericError(`Permission conflict on node '${filter}': permissions 'resize' are both required by an unnamed ` +
        `block device (uses node '${filter}' as 'root' child) and unshared by commit job '${job.id}' (uses node ` +
        `'${filter}' as 'main node' child).`);
    }
  }
  // QEMU's commit_start/mirror_start_job: the filter first (its name may be refused), then the
  // job's edges in QEMU's order, then its BlockBackends.
  const filter = active
    ? JobFilter.mirrorTop(ctx.graph, top, p.filterNodeName, true)
    : JobFilter.commitTop(ctx.graph, top, p.filterNodeName);
  const holds = new NodeHolds(ctx.graph, job.type, job.id, () => job.drainPause());
  try {
    if (active) {
      holds.hold(filter.node, 'main node', SHARE_NO_RESIZE, ['consistent read']);
      holds.hold(top, 'source', SHARE_NO_RESIZE);
      holds.hold(base, 'target');
      for (const n of intermediates(top, base)) if (n !== top) holds.hold(n, 'intermediate node', SHARE_WRITES);
      holds.backend(base, ['write'], SHARE_NO_RESIZE);
    } else {
      holds.hold(bs);
      for (const n of intermediates(top, base)) if (n !== bs) holds.hold(n, 'intermediate node', SHARE_WRITES);
      holds.hold(base, 'base');
      holds.backend(base, ['consistent read', 'write'], ['consistent read', 'write unchanged']);
      holds.backend(top);
    }
  } catch (err) {
    holds.release();
    filter.remove();
    throw err;
  }
  const baseWasReadOnly = await openBaseWritable(ctx, base);
  const baseOverlay = ctx.graph.overlayOf(top, base);
  const buf = Buffer.allocUnsafe(COMMIT_BUFFER_SIZE);

  /** One pass over [0, len): copy what is allocated above base, with progress and rate limit. */
  const pass = async (len: number, progress: boolean, limited: boolean): Promise<void> => {
    let delay = 0;
    for (let offset = 0, n = 0; offset < len; offset += n) {
      if (limited) {
        await job.sleep(delay);
        if (job.isCancelled) return;
      }
      const r = await allocatedAbove(top, baseOverlay, offset, Math.min(COMMIT_BUFFER_SIZE, len - offset));
      n = r.pnum;
      if (r.allocated) await copyRange(top, base, offset, n, buf);
      if (progress) job.currentProgress += n;
      delay = r.allocated ? job.limit.delay(n) : 0;
    }
  };

  const clean = async (): Promise<void> => {
    filter.remove();
    holds.release();
    if (!active && baseWasReadOnly) await ctx.graph.setReadOnly(base, true).catch(() => undefined);
  };

  if (!active) {
    return {
      async run() {
        const len = top.getLength();
        job.totalProgress = len;
        await growBase(base, len);
        await pass(len, true, true);
      },
      async prepare() {
        // QEMU's bdrv_drop_intermediate(): top's overlay now backs onto base and names it.
        filter.remove();
        const overlay = ctx.graph.overlayOf(bs, top);
        if (!overlay) return;
        const name = p.backingFile ?? nodeFilename(base, jsonFilename);
        await ctx.exports.drained(bs, async () => {
          holds.release();
          await ctx.graph.setBacking(overlay, base);
          await ctx.graph.changeBackingFile(overlay, name, base.driver.name);
        });
      },
      clean,
    };
  }

  /**
   * Completion of an active commit: what changed since ready (granules, as QEMU's dirty bitmap
   * counts them) is copied and added to the progress, as QEMU's final mirror pass does.
   */
  const syncDirty = async (): Promise<void> => {
    const len = top.getLength();
    const granule = (base.driver.imageInfo?.(base.state)['cluster-size'] as number | undefined) ?? 65536;
    const old = Buffer.allocUnsafe(COMMIT_BUFFER_SIZE);
    let dirty = 0;
    for (let offset = 0, n = 0; offset < len; offset += n) {
      const r = await allocatedAbove(top, baseOverlay, offset, Math.min(COMMIT_BUFFER_SIZE, len - offset));
      n = r.pnum;
      if (!r.allocated) continue;
      await top.read(offset, buf.subarray(0, n));
      await base.read(offset, old.subarray(0, n));
      for (let pos = 0; pos < n;) {
        const end = Math.min(n, (Math.floor((offset + pos) / granule) + 1) * granule - offset);
        if (!buf.subarray(pos, end).equals(old.subarray(pos, end))) {
          await base.write(offset + pos, buf.subarray(pos, end));
          dirty += end - pos;
        }
        pos = end;
      }
    }
    job.totalProgress += dirty;
    job.currentProgress += dirty;
  };

  // Active commit: the amount to copy is what is allocated above base (the initial dirty bitmap).
  const dirtyBytes = async (len: number): Promise<number> => {
    let total = 0;
    for (let offset = 0, n = 0; offset < len; offset += n) {
      const r = await allocatedAbove(top, baseOverlay, offset, len - offset);
      n = r.pnum;
      if (r.allocated) total += n;
    }
    return total;
  };
  return {
    async run() {
      const len = top.getLength();
      await growBase(base, len);
      job.totalProgress = await dirtyBytes(len);
      let delay = 0;
      for (let offset = 0, n = 0; offset < len; offset += n) {
        // Like mirror's dirty-bitmap walk, clean stretches are skipped whole and without a pause:
        // an empty top reaches 'ready' at once, as on QEMU.
        const r = await allocatedAbove(top, baseOverlay, offset, len - offset);
        n = r.pnum;
        if (!r.allocated) continue;
        await job.sleep(delay);
        if (job.isCancelled) return;
        n = Math.min(n, COMMIT_BUFFER_SIZE);
        await copyRange(top, base, offset, n, buf);
        job.currentProgress += n;
        delay = job.limit.delay(n);
      }
      if (job.isCancelled) return;
      job.currentProgress = job.totalProgress;
      job.transitionToReady();
      await job.waitReady();
      if (job.shouldComplete && !job.isCancelled) {
        // QEMU 7.2's completion drains the job's nodes twice; each drain parks a ready job in standby.
        for (let i = 0; i < 2; i++) {
          job.transition('standby');
          job.transition('ready');
        }
      }
    },
    async prepare() {
      if (!job.shouldComplete) return;
      // Writes since ready went to top only: copy again with the exports stopped, then every
      // parent of top (exports) uses base.
      await ctx.exports.drained(bs, async () => {
        await syncDirty();
        await base.flush();
        filter.remove();
        holds.release();
        ctx.graph.replaceNode(top, base);
      });
    },
    clean,
  };
}
