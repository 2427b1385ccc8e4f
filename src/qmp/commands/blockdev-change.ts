// x-blockdev-change: adding or removing a child of a node; no qsd-ts driver supports it (QEMU's quorum only).
import type { CommandHandler } from './types.js';
import type { BlockNode } from '../../block/node.js';
import { genericError } from '../../qapi/errors.js';

/** QEMU's child name for a role in our children map (blkdebug's primary child is 'image'). */
function childName(parent: BlockNode, role: string): string {
  return role === 'file' && parent.driver.childOption ? parent.driver.childOption : role;
}

export const blockdevChangeCommands: Record<string, CommandHandler> = {
  /** QEMU's checks in QEMU's order; every driver here then refuses as QEMU's non-quorum drivers do. */
  'x-blockdev-change'(args: { parent: string; child?: string; node?: string }, { daemon }) {
    const { parent, child, node } = args;
    const parentBs = daemon.graph.lookup(parent);
    if (!parentBs) throw genericError(`Cannot find device='${parent}' nor node-name='${parent}'`);
    if ((child === undefined) === (node === undefined)) {
      throw genericError(child !== undefined ? 'The parameters child and node are in conflict' : 'Either child or node must be specified');
    }
    if (child !== undefined) {
      if (![...parentBs.children.keys()].some((role) => childName(parentBs, role) === child)) {
        throw genericError(`Node '${parent}' does not have child '${child}'`);
      }
      throw genericError(`The node ${parentBs.nodeName} does not support removing a child`);
    }
    if (!daemon.graph.lookup(node!)) throw genericError(`Node '${node}' not found`);
    throw genericError(`The node ${parentBs.nodeName} does not support adding a child`);
  },
};
