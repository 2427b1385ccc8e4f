// block-stream: copy what the backing chain down to `base` holds into the top node, then make
// `base` its backing node (QEMU's block/stream.c, copy-on-read done under a drained section).
import { nodeFilename } from '../block/graph.js';
import type { BlockNode } from '../block/node.js';
import { formatQmpJson } from '../qmp/json.js';
import { genericError } from '../qapi/errors.js';
import type { BlockJob, BlockJobHooks } from './block-job.js';
import { allocatedAbove, layerAllocated, NodeHolds, type JobContext } from './job-context.js';
import { JobFilter } from './job-filter.js';
import type { Permission } from '../block/graph.js';

const SHARE_NO_RESIZE: readonly Permission[] = ['consistent read', 'write', 'write unchanged'];

/** QEMU's STREAM_CHUNK: one step of the stream loop. */
const STREAM_CHUNK = 512 * 1024;
const jsonFilename = (value: unknown) => formatQmpJson(value);

export interface StreamParams {
  bs: BlockNode;
  /** The new backing node (undefined: stream the whole chain, no backing afterwards). */
  base?: BlockNode;
  /** The lowest node streamed ('bottom'; else the node above base, or the chain's end). */
  bottom?: BlockNode;
  backingFile?: string;
  /** 'filter-node-name': the name of the job's copy-on-read node. */
  filterNodeName?: string;
}

export async function setupStream(ctx: JobContext, job: BlockJob, p: StreamParams): Promise<BlockJobHooks> {
  const { bs, base } = p;
  // QEMU's copy-on-read filter above bs unshares resize, which a writable FUSE export holds.
  if (ctx.graph.usersOf(bs).some((u) => !u.parent && u.perms.has('resize'))) {
    const filter = p.filterNodeName ?? ctx.graph.anonymousNodeName();
    throw genericError(`Permission conflict on node '${filter}': permissions 'resize' are both required by an unnamed ` +
      `block device (uses node '${filter}' as 'root' child) and unshared by an unnamed block device (uses node ` +
      `'${filter}' as 'root' child).`);
  }
  let bottom = p.bottom;
  if (!bottom) {
    for (let n = bs.backing; n && n !== base; n = n.backing) bottom = n;
  }
  for (let n = bs.backing; n && n !== base; n = n.backing) {
    // The job takes each streamed node as an 'intermediate node' child that unshares write, so a
    // writable export of one of them (a root user that writes) conflicts, as on QEMU.
    if (ctx.graph.usersOf(n).some((u) => !u.parent && u.perms.has('write'))) {
      throw genericError(`Permission conflict on node '${n.nodeName}': permissions 'write' are both required by an ` +
        `unnamed block device (uses node '${n.nodeName}' as 'root' child) and unshared by stream job '${job.id}' ` +
        `(uses node '${n.nodeName}' as 'intermediate node' child).`);
    }
    if (n === bottom) break;
  }
  // QEMU's stream_start: the copy-on-read filter above bs, the job's edges (the filter, bs as
  // 'active node', the streamed nodes) and its BlockBackend on the filter.
  const filter = JobFilter.copyOnRead(ctx.graph, bs, p.filterNodeName);
  const holds = new NodeHolds(ctx.graph, job.type, job.id, () => job.drainPause());
  try {
    holds.hold(filter.node);
    holds.hold(bs, 'active node', SHARE_NO_RESIZE);
    for (let n = bs.backing; n && n !== base; n = n.backing) {
      holds.hold(n, 'intermediate node', ['consistent read', 'write unchanged']);
      if (n === bottom) break;
    }
    holds.backend(filter.node, ['consistent read'], SHARE_NO_RESIZE);
  } catch (err) {
    holds.release();
    filter.remove();
    throw err;
  }
  const wasReadOnly = bs.readOnly;
  if (wasReadOnly) await ctx.graph.setReadOnly(bs, false);
  const buf = Buffer.allocUnsafe(STREAM_CHUNK);

  /** Copy-on-read of [offset, offset+n) into bs, only where bs still has nothing of its own. */
  const populate = (offset: number, n: number) => ctx.exports.drained(bs, async () => {
    for (let pos = offset, k = 0; pos < offset + n; pos += k) {
      const r = await layerAllocated(bs, pos, offset + n - pos);
      k = r.pnum;
      if (r.allocated) continue;
      const view = buf.subarray(0, k);
      await bs.read(pos, view);
      await bs.write(pos, view);
    }
  });

  return {
    async run() {
      // QEMU's stream_run returns before it sets the length when there is nothing to stream.
      const backing = bs.backing;
      if (!backing || backing === base) return;
      const len = bs.getLength();
      job.totalProgress = len;
      let delay = 0;
      for (let offset = 0, n = 0; offset < len; offset += n) {
        await job.sleep(delay);
        if (job.isCancelled) return;
        let copy = false;
        const own = await layerAllocated(bs, offset, Math.min(STREAM_CHUNK, len - offset));
        n = own.pnum;
        if (!own.allocated) {
          const below = await allocatedAbove(backing, bottom, offset, n);
          n = below.pnum;
          copy = below.allocated;
        }
        if (copy) await populate(offset, n);
        job.currentProgress += n;
        delay = copy ? job.limit.delay(n) : 0;
      }
    },
    async prepare() {
      const name = base ? (p.backingFile ?? nodeFilename(base, jsonFilename)) : undefined;
      await ctx.exports.drained(bs, async () => {
        filter.remove();
        holds.release();
        await ctx.graph.setBacking(bs, base);
        await ctx.graph.changeBackingFile(bs, name, base?.driver.name);
      });
    },
    async clean() {
      filter.remove();
      holds.release();
      if (wasReadOnly) await ctx.graph.setReadOnly(bs, true).catch(() => undefined);
    },
  };
}
