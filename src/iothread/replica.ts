// Describing a node's driver stack in the main thread and rebuilding it in another context.
import { BlockNode } from '../block/node.js';
import { findBlockDriver } from '../block/registry.js';
import { describeTracking, type TrackingDescription } from '../block/dirty-bitmap.js';

/** A structured-cloneable description of a node and its children, for another context. */
export interface NodeDescription {
  nodeName: string;
  driver: string;
  readOnly: boolean;
  options: Record<string, any>;
  /** driver.describe(state) */
  state: unknown;
  children: Array<[role: string, child: NodeDescription]>;
  /** Shared dirty-bitmap/write-threshold state, so writes in any context are tracked. */
  tracking: TrackingDescription;
}

/** Can every node of this stack be served from another thread? */
export function isReplicable(node: BlockNode): boolean {
  if (!node.driver.describe || !node.driver.openReplica) return false;
  for (const child of node.children.values()) if (!isReplicable(child)) return false;
  return true;
}

export function describeNode(node: BlockNode): NodeDescription {
  return {
    nodeName: node.nodeName,
    driver: node.driver.name,
    readOnly: node.readOnly,
    options: node.options,
    state: node.driver.describe!(node.state),
    children: [...node.children].map(([role, child]) => [role, describeNode(child)]),
    tracking: describeTracking(node),
  };
}

/** Replicas of one context, shared between the queues that serve the same nodes. */
export class ReplicaSet {
  private readonly nodes = new Map<string, { node: BlockNode; refs: number }>();

  acquire(desc: NodeDescription): BlockNode {
    const existing = this.nodes.get(desc.nodeName);
    if (existing) {
      existing.refs++;
      return existing.node;
    }
    const driver = findBlockDriver(desc.driver);
    if (!driver?.openReplica) throw new Error(`driver '${desc.driver}' cannot run in an iothread`);
    const children = new Map<string, BlockNode>();
    for (const [role, child] of desc.children) children.set(role, this.acquire(child));
    const node = new BlockNode({
      nodeName: desc.nodeName, driver, readOnly: desc.readOnly, options: desc.options, children, isReplica: true,
      tracking: desc.tracking,
    });
    node.state = driver.openReplica(node, desc.state);
    this.nodes.set(desc.nodeName, { node, refs: 1 });
    return node;
  }

  /**
   * A node changed in the main thread (blockdev-reopen): the replica of that name, if this context
   * has one, takes its read-only flag, options and a state rebuilt from the new description. The
   * queues serving it are drained meanwhile. Children keep their replicas (their own updates come
   * in the same batch).
   */
  update(desc: NodeDescription): void {
    const entry = this.nodes.get(desc.nodeName);
    if (!entry) return;
    const node = entry.node;
    node.readOnly = desc.readOnly;
    for (const key of Object.keys(node.options)) delete node.options[key];
    Object.assign(node.options, desc.options);
    node.driver.closeReplica?.(node.state);
    node.state = node.driver.openReplica!(node, desc.state);
  }

  release(node: BlockNode): void {
    const entry = this.nodes.get(node.nodeName);
    if (!entry || entry.node !== node) return;
    if (--entry.refs > 0) return;
    this.nodes.delete(node.nodeName);
    node.driver.closeReplica?.(node.state);
    for (const child of node.children.values()) this.release(child);
  }
}
