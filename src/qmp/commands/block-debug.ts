// Debugging and statistics queries of QEMU's block-core.json: x-debug-query-block-graph and
// query-blockstats, built from the node graph (exports' anonymous BlockBackends are its roots).
import type { CommandHandler } from './types.js';
import type { Daemon } from '../../daemon.js';
import type { BlockNode } from '../../block/node.js';
import type { GraphEntry, NodeUser, Permission } from '../../block/graph.js';

/** BlockPermission enum order; QEMU prepends while walking it, so lists come out reversed. */
const PERMISSIONS: ReadonlyArray<[Permission, string]> = [
  ['consistent read', 'consistent-read'], ['write', 'write'], ['write unchanged', 'write-unchanged'], ['resize', 'resize'],
];
const permList = (perms: ReadonlySet<Permission>) => PERMISSIONS.filter(([p]) => perms.has(p)).map(([, name]) => name).reverse();

/** Nodes in creation order (QEMU's all_bdrv_states); the graph lists them newest first. */
const nodesOldestFirst = (daemon: Daemon): GraphEntry[] => daemon.graph.list().reverse();

/** Block backends (users without a parent node), in creation order: exports first, oldest first. */
async function backends(daemon: Daemon): Promise<Array<{ user: NodeUser; node: BlockNode }>> {
  const all: Array<{ user: NodeUser; node: BlockNode }> = [];
  for (const entry of nodesOldestFirst(daemon)) {
    for (const user of entry.users) if (!user.parent && !user.job) all.push({ user, node: entry.node });
  }
  const exportOrder = (await daemon.exports.query()).map((e) => `export '${e.id as string}'`).reverse();
  const rank = (b: { user: NodeUser }) => {
    const i = exportOrder.indexOf(b.user.name);
    return i < 0 ? exportOrder.length : i;
  };
  return all.sort((a, b) => rank(a) - rank(b));
}

async function blockGraph(daemon: Daemon): Promise<Record<string, unknown>> {
  const ids = new Map<object, number>();
  const nodes: Array<Record<string, unknown>> = [];
  const edges: Array<Record<string, unknown>> = [];
  const idOf = (key: object) => {
    let id = ids.get(key);
    if (id === undefined) ids.set(key, (id = ids.size + 1));
    return id;
  };
  const addEdge = (parent: object, child: BlockNode, user: NodeUser) => {
    // A primary child opened under another option (blkdebug's 'image') is named after it.
    const name = user.parent && user.role === 'file' ? (user.parent.node.driver.childOption ?? 'file') : user.role;
    edges.push({ parent: idOf(parent), child: idOf(child), name, perm: permList(user.perms), 'shared-perm': permList(user.shared) });
  };
  for (const { user, node } of await backends(daemon)) {
    nodes.push({ id: idOf(user), type: 'block-backend', name: '' });
    addEdge(user, node, user);
  }
  const entries = nodesOldestFirst(daemon);
  // Block jobs' holds (QEMU's job->nodes), by job in creation order, each job's edges newest first.
  const jobs = new Map<string, Array<{ user: NodeUser; node: BlockNode }>>();
  for (const job of daemon.jobs.list()) jobs.set(job.id, []);
  for (const entry of entries) {
    for (const user of entry.users) if (user.job) jobs.get(user.job.id)?.push({ user, node: entry.node });
  }
  for (const [id, held] of jobs) {
    if (held.length === 0) continue;
    const key = { job: id };
    nodes.push({ id: idOf(key), type: 'block-job', name: id });
    held.sort((a, b) => b.user.job!.seq - a.user.job!.seq);
    for (const { user, node } of held) {
      edges.push({ parent: idOf(key), child: idOf(node), name: user.job!.edge, perm: permList(user.perms), 'shared-perm': permList(user.shared) });
    }
  }
  // Each parent's child edges; QEMU keeps a node's children newest first.
  const childEdges = new Map<BlockNode, Array<{ user: NodeUser; child: BlockNode }>>();
  for (const entry of entries) {
    for (const user of entry.users) {
      if (!user.parent) continue;
      const list = childEdges.get(user.parent.node) ?? [];
      list.push({ user, child: entry.node });
      childEdges.set(user.parent.node, list);
    }
  }
  for (const { node } of entries) {
    nodes.push({ id: idOf(node), type: 'block-driver', name: node.nodeName });
    const roles = [...node.children.keys()].reverse();
    const list = (childEdges.get(node) ?? []).sort((a, b) => roles.indexOf(a.user.role) - roles.indexOf(b.user.role));
    for (const { user, child } of list) addEdge(node, child, user);
  }
  // QEMU prepends both lists.
  return { nodes: nodes.reverse(), edges: edges.reverse() };
}

/** BlockDeviceStats with every counter at zero: qsd-ts does not account I/O. */
function zeroStats(): Record<string, unknown> {
  const stats: Record<string, unknown> = {};
  for (const key of [
    'rd_bytes', 'wr_bytes', 'unmap_bytes', 'rd_operations', 'wr_operations', 'flush_operations', 'unmap_operations',
    'rd_total_time_ns', 'wr_total_time_ns', 'flush_total_time_ns', 'unmap_total_time_ns', 'wr_highest_offset',
    'rd_merged', 'wr_merged', 'unmap_merged', 'failed_rd_operations', 'failed_wr_operations', 'failed_flush_operations',
    'failed_unmap_operations', 'invalid_rd_operations', 'invalid_wr_operations', 'invalid_flush_operations',
    'invalid_unmap_operations',
  ]) stats[key] = 0;
  stats.account_invalid = false;
  stats.account_failed = false;
  stats.timed_stats = [];
  return stats;
}

/** One node's BlockStats as QEMU's node-level query: its primary child as parent, no backing. */
function nodeStats(node: BlockNode): Record<string, unknown> {
  const out: Record<string, unknown> = { 'node-name': node.nodeName, stats: zeroStats() };
  const driver = node.driver.name;
  if (driver === 'file' || driver === 'host_device') {
    out['driver-specific'] = { driver, 'discard-nb-ok': 0, 'discard-nb-failed': 0, 'discard-bytes-ok': 0 };
  }
  // The primary child: the file, or a filter's backing child (a job's mirror_top, commit_top).
  const primary = node.file ?? (node.driver.isFilter ? node.backing : undefined);
  if (primary) out.parent = nodeStats(primary);
  return out;
}

export const blockDebugCommands: Record<string, CommandHandler> = {
  'x-debug-query-block-graph': (_args, { daemon }) => blockGraph(daemon),
  // Without query-nodes QEMU lists named BlockBackends or ones with a device; the daemon has none.
  'query-blockstats': (args: { 'query-nodes'?: boolean }, { daemon }) =>
    args['query-nodes'] ? nodesOldestFirst(daemon).map((e) => nodeStats(e.node)) : [],
};
