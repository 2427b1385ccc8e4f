// Which iothread a node belongs to (x-blockdev-set-iothread; QEMU's AioContext of a node).
import type { BlockNode } from '../block/node.js';

/** Nodes moved into an iothread; absent = the main loop. */
const nodeIothreads = new WeakMap<BlockNode, string>();

/** The iothread x-blockdev-set-iothread put this node in: an export without `iothread` runs there. */
export function nodeIothread(node: BlockNode): string | undefined {
  return nodeIothreads.get(node);
}

/** Moves the nodes into the iothread `id` (null: back to the main loop). */
export function setNodeIothread(nodes: Iterable<BlockNode>, id: string | null): void {
  for (const node of nodes) {
    if (id === null) nodeIothreads.delete(node);
    else nodeIothreads.set(node, id);
  }
}
