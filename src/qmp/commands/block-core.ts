// Commands of QEMU's block-core.json: node management and queries.
import type { CommandHandler } from './types.js';
import { genericError, QmpError } from '../../qapi/errors.js';
import { nodeFilename, viewBacking } from '../../block/graph.js';
import type { BlockNode } from '../../block/node.js';
import { BlockIoError } from '../../block/node.js';
import { formatQmpJson } from '../json.js';
import { strerror } from '../../util/errno.js';
import { nodeBitmaps } from '../../block/dirty-bitmap.js';

const jsonFilename = (value: unknown) => formatQmpJson(value);

/** QEMU's bdrv_filter_or_cow_bs(): the backing node (a job's filter in between), or a filter's child. */
function filterOrCow(node: BlockNode): BlockNode | undefined {
  return viewBacking(node) ?? (node.driver.isFilter ? node.file : undefined);
}

/** ImageInfo for one node (and, unless flat, its backing chain as backing-image). */
async function imageInfo(node: BlockNode, flat: boolean): Promise<Record<string, unknown>> {
  const drv = node.driver.imageInfo?.(node.state) ?? {};
  const allocated = (await node.getAllocatedFileSize()) ?? (node.file ? await node.file.getAllocatedFileSize() : 0) ?? 0;
  const info: Record<string, unknown> = {
    filename: nodeFilename(node, jsonFilename),
    format: node.driver.name,
  };
  if (drv['dirty-flag'] !== undefined) info['dirty-flag'] = drv['dirty-flag'];
  if (!Number.isNaN(allocated)) info['actual-size'] = allocated;
  info['virtual-size'] = node.getLength();
  if (drv['cluster-size'] !== undefined) info['cluster-size'] = drv['cluster-size'];
  if (drv.encrypted) info.encrypted = true;
  if (drv['backing-filename'] !== undefined) info['backing-filename'] = drv['backing-filename'];
  if (drv['full-backing-filename'] !== undefined) info['full-backing-filename'] = drv['full-backing-filename'];
  if (drv['backing-filename-format'] !== undefined) info['backing-filename-format'] = drv['backing-filename-format'];
  if (drv.snapshots !== undefined) info.snapshots = drv.snapshots;
  const backing = filterOrCow(node);
  if (backing && !flat) info['backing-image'] = await imageInfo(backing, flat);
  if (drv['format-specific'] !== undefined) info['format-specific'] = drv['format-specific'];
  return info;
}

/** Backing chain length as QEMU counts it for BlockDeviceInfo (0 when queried flat). */
function backingDepth(node: BlockNode, flat: boolean): number {
  if (flat) return 0;
  let depth = 0;
  for (let n = filterOrCow(node); n; n = filterOrCow(n)) depth++;
  return depth;
}

async function blockDeviceInfo(node: BlockNode, flat: boolean): Promise<Record<string, unknown>> {
  const info: Record<string, unknown> = {
    file: nodeFilename(node, jsonFilename),
    'node-name': node.nodeName,
    ro: node.readOnly,
    drv: node.driver.name,
  };
  // QEMU names the backing node's own filename here, and only when a backing node is attached.
  // A filter over a backing child (a job's commit_top, mirror_top) names no backing file.
  if (node.backing && !node.driver.isFilter) info.backing_file = nodeFilename(node.backing, jsonFilename);
  Object.assign(info, {
    backing_file_depth: backingDepth(node, flat),
    encrypted: node.driver.imageInfo?.(node.state).encrypted ?? false,
    detect_zeroes: node.options['detect-zeroes'] ?? 'off',
    bps: 0, bps_rd: 0, bps_wr: 0, iops: 0, iops_rd: 0, iops_wr: 0,
    image: await imageInfo(node, flat),
    write_threshold: node.tracking?.writeThreshold ?? 0,
    cache: {
      writeback: true,
      direct: node.options.cache?.direct ?? false,
      'no-flush': node.options.cache?.['no-flush'] ?? false,
    },
  });
  // QEMU's bdrv_query_dirty_bitmaps: present only when the node has bitmaps, newest first.
  const bitmaps = nodeBitmaps(node);
  if (bitmaps.length > 0) {
    info['dirty-bitmaps'] = bitmaps.map((b) => ({
      name: b.name, count: b.count(), granularity: b.granularity, recording: b.recording, busy: b.busy, persistent: b.persistent,
      ...(b.inconsistent ? { inconsistent: true } : {}),
    }));
  }
  return info;
}

export const blockCoreCommands: Record<string, CommandHandler> = {
  async 'blockdev-add'(args, { daemon }) {
    await daemon.graph.add(args);
    return {};
  },
  async 'blockdev-del'(args: { 'node-name': string }, { daemon }) {
    await daemon.graph.del(args['node-name']);
    return {};
  },
  async 'query-named-block-nodes'(args: { flat?: boolean }, { daemon }) {
    const out = [];
    for (const entry of daemon.graph.list()) out.push(await blockDeviceInfo(entry.node, args.flat ?? false));
    return out;
  },
  // QSD has no named BlockBackends (exports' are anonymous): nothing to list.
  'query-block': () => [],
  async block_resize(args: { device?: string; 'node-name'?: string; size: number }, { daemon }) {
    const { device, 'node-name': nodeName, size } = args;
    const node = nodeName !== undefined ? daemon.graph.lookup(nodeName) : undefined;
    if (!node) throw genericError(`Cannot find device='${device ?? ''}' nor node-name='${nodeName ?? ''}'`);
    if (Number(size) < 0) throw genericError("Parameter 'size' expects a >0 size");
    // QEMU's BLOCK_OP_TYPE_RESIZE blockers (a block job, a backing link) name the device argument
    // (printf's "(null)" without one).
    const backing = daemon.graph.usersOf(node).some((u) => u.parent && u.role === 'backing');
    if (backing || daemon.graph.jobBlocked(node)) throw genericError(`Device '${device ?? '(null)'}' is in use`);
    if (node.readOnly) throw genericError('Image is read-only');
    const user = daemon.graph.attachBackend(node, 'block_resize', ['resize']);
    try {
      await daemon.exports.drained(node, async () => {
        try {
          await node.truncate(Number(size), false, 'off');
        } catch (err) {
          if (err instanceof BlockIoError) throw genericError(err.message);
          throw new QmpError('GenericError', `Could not resize file: ${strerror(err)}`);
        }
      });
    } finally {
      daemon.graph.detachBackend(node, user);
    }
    return {};
  },
};

