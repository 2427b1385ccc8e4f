// throttle: the filter driver that makes requests wait so its throttle group's limits hold.
import type { BlockDriver, BlockStatus, DriverImageInfo } from './driver.js';
import type { BlockNode } from './node.js';
import { genericError } from '../qapi/errors.js';
import { findThrottleGroup, type ThrottleGroup } from '../objects/throttle-group.js';

interface ThrottleState {
  file: BlockNode;
  group: ThrottleGroup;
}

/** QEMU's bdrv_get_info() on a filter asks its child: the child's dirty flag and cluster size. */
export function filterImageInfo(file: BlockNode): DriverImageInfo {
  const info = file.driver.imageInfo?.(file.state) ?? {};
  const out: DriverImageInfo = {};
  if (info['dirty-flag'] !== undefined) out['dirty-flag'] = info['dirty-flag'];
  if (info['cluster-size'] !== undefined) out['cluster-size'] = info['cluster-size'];
  return out;
}

/** Requests are served in the main loop only (no openReplica): the group's buckets live there. */
export const throttleDriver: BlockDriver<ThrottleState> = {
  name: 'throttle',
  isFilter: true,
  isProtocol: false,
  async open(node, options) {
    const name = options['throttle-group'] as string;
    const group = findThrottleGroup(name);
    if (!group) throw genericError(`Throttle group '${name}' does not exist`);
    group.members++;
    return { file: node.file!, group };
  },
  async close(state) {
    state.group.members--;
  },
  getLength: (state) => state.file.getLength(),
  getAllocatedFileSize: (state) => state.file.getAllocatedFileSize(),
  requestAlignment: (state) => state.file.requestAlignment(),
  async read(state, offset, buf) {
    await state.group.intercept(false, buf.length);
    return state.file.read(offset, buf);
  },
  async write(state, offset, buf, flags) {
    await state.group.intercept(true, buf.length);
    return state.file.write(offset, buf, flags);
  },
  async writeZeroes(state, offset, bytes, flags) {
    await state.group.intercept(true, bytes);
    return state.file.writeZeroes(offset, bytes, flags);
  },
  async discard(state, offset, bytes) {
    await state.group.intercept(true, bytes);
    return state.file.discard(offset, bytes);
  },
  flush: (state) => state.file.flush(),
  blockStatus: (state, offset, bytes): Promise<BlockStatus> => state.file.blockStatus(offset, bytes),
  imageInfo: (state) => filterImageInfo(state.file),
};
