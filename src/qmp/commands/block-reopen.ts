// blockdev-reopen, x-blockdev-set-iothread and change-backing-file: changing open nodes in place.
import fs from 'node:fs';
import type { CommandHandler } from './types.js';
import type { Daemon } from '../../daemon.js';
import { genericError, QmpError } from '../../qapi/errors.js';
import type { BlockGraph, NodeUser, Permission } from '../../block/graph.js';
import type { BlockNode } from '../../block/node.js';
import { fileReopenCommit, fileReopenPrepare } from '../../block/file.js';
import { IoThread } from '../../iothread/iothread.js';
import { setNodeIothread } from '../../iothread/node-iothread.js';
import { qdictKeyOrder } from '../json.js';

/** Options every driver lets a reopen change (QEMU's bdrv_reopen_prepare consumes them). */
const GENERIC_MUTABLE = new Set(['node-name', 'driver', 'read-only', 'auto-read-only', 'discard', 'detect-zeroes', 'cache']);

/** Driver options a reopen may change, per driver (what each driver's reopen_prepare consumes). */
const DRIVER_MUTABLE: Record<string, readonly string[]> = {
  file: ['drop-cache', 'x-check-cache-dropped'],
  host_device: ['drop-cache', 'x-check-cache-dropped'],
  raw: ['offset', 'size'],
  qcow2: [
    'lazy-refcounts', 'pass-discard-request', 'pass-discard-snapshot', 'pass-discard-other', 'overlap-check',
    'cache-size', 'l2-cache-size', 'l2-cache-entry-size', 'refcount-cache-size', 'cache-clean-interval',
  ],
};

/** Options any node's reopen may leave out (QEMU's bdrv_reset_options_allowed common list). */
const RESETTABLE_COMMON = new Set(['node-name', 'discard', 'cache.direct', 'cache.no-flush', 'read-only', 'auto-read-only', 'detect-zeroes']);

/** Driver options a reopen may leave out, back to their default (QEMU's per-driver mutable_opts). */
const DRIVER_RESETTABLE: Record<string, readonly string[]> = {
  file: ['x-check-cache-dropped'],
  host_device: ['x-check-cache-dropped'],
  raw: ['offset', 'size'],
  throttle: ['throttle-group'],
  qcow2: DRIVER_MUTABLE.qcow2!,
};

/** Drivers QEMU 7.2 cannot reopen (no bdrv_reopen_prepare). */
const NO_REOPEN = new Set(['copy-on-read']);

/** Option keys as QEMU's flat QDict holds them, in its order: cache.* flattened, child objects left out. */
function flatKeys(options: Record<string, any>): string[] {
  const keys: string[] = [];
  for (const [key, value] of Object.entries(options)) {
    if (key === 'cache' && value && typeof value === 'object') keys.push(...Object.keys(value).map((k) => `cache.${k}`));
    else if (value === null || typeof value !== 'object') keys.push(key);
  }
  return qdictKeyOrder(keys);
}

/**
 * QEMU's bdrv_reopen_prepare before the driver's own: detect-zeroes=unmap needs discard=unmap (an
 * omitted discard keeps the node's), an option left out must be one that may go back to its default,
 * and the driver must support reopening at all.
 */
function checkResetAndSupport(node: BlockNode, options: Record<string, any>): void {
  const discard = options.discard ?? node.options.discard ?? 'ignore';
  if (options['detect-zeroes'] === 'unmap' && discard !== 'unmap') {
    throw genericError('setting detect-zeroes to unmap is not allowed without setting discard operation to unmap');
  }
  if (NO_REOPEN.has(node.driver.name)) {
    throw genericError(`Block format '${node.driver.name}' used by node '${node.nodeName}' does not support reopening files`);
  }
  const given = new Set(flatKeys(options));
  const resettable = DRIVER_RESETTABLE[node.driver.name] ?? [];
  for (const key of flatKeys(node.options)) {
    if (given.has(key) || RESETTABLE_COMMON.has(key) || resettable.includes(key)) continue;
    if (key === 'backing' || key === childOption(node) || node.children.has(key)) continue;
    throw genericError(`Option '${key}' cannot be reset to its default value`);
  }
}

/** Drivers whose 'file' child a reopen may replace (their state follows the new child). */
const FILE_CHANGE_DRIVERS = new Set(['raw', 'qcow2']);

/** Drivers with a backing child (QEMU's supports_backing). */
const BACKING_DRIVERS = new Set(['qcow2']);

/** One node of a reopen: where it is going. */
interface ReopenEntry {
  node: BlockNode;
  /** The new options (QEMU's bs->options after commit); undefined for a child that only follows. */
  options?: Record<string, any>;
  readOnly: boolean;
  /** The new 'file' child, when the reopen replaces it. */
  file?: BlockNode;
  /** The new backing child: a node, null to detach, undefined to keep. */
  backing?: BlockNode | null;
  /** A file node's new descriptor (opened in prepare, swapped in at commit). */
  fd?: number;
  direct?: boolean;
}

const sameValue = (a: unknown, b: unknown) => JSON.stringify(a) === JSON.stringify(b);

function childOption(node: BlockNode): string {
  return node.driver.childOption ?? 'file';
}

/** A reference QEMU resolves while reopening: an existing node other than (a parent of) `parent`. */
function resolveChild(graph: BlockGraph, parent: BlockNode, ref: unknown, key: string, role: string): BlockNode {
  if (typeof ref !== 'string') {
    const first = ref && typeof ref === 'object' ? (Object.keys(ref).includes('driver') ? 'driver' : Object.keys(ref)[0]) : undefined;
    throw genericError(`Cannot change the option '${key}${first ? `.${first}` : ''}'`);
  }
  const child = graph.lookup(ref);
  if (!child) throw genericError(`Cannot find device='' nor node-name='${ref}'`);
  if (graph.reaches(child, parent)) throw genericError(`Making '${parent.nodeName}' a ${role} child of '${parent.nodeName}' would create a cycle`);
  return child;
}

/** QEMU's check of the options a reopen may not change: every given option must be unchanged. */
function checkImmutable(node: BlockNode, options: Record<string, any>): void {
  if (options.driver !== node.driver.name) throw genericError("Cannot change the option 'driver'");
  const mutable = DRIVER_MUTABLE[node.driver.name] ?? [];
  for (const [key, value] of Object.entries(options)) {
    // QEMU keeps force-share as it parsed it at open: restating it never compares equal.
    if (key === 'force-share') throw genericError("Cannot change the option 'force-share'");
    if (GENERIC_MUTABLE.has(key) || mutable.includes(key) || key === 'backing') continue;
    if (!node.driver.isProtocol && key === childOption(node)) continue;
    if (!(key in node.options) || !sameValue(node.options[key], value)) throw genericError(`Cannot change the option '${key}'`);
  }
}

/**
 * Does anyone need to write to `node` once the reopen is done? Writable backends (exports, jobs),
 * a writable format parent of its metadata child, or a data parent (raw, filters) someone writes to.
 */
function needsWrite(graph: BlockGraph, node: BlockNode, readOnlyAfter: (n: BlockNode) => boolean, seen = new Set<BlockNode>()): boolean {
  if (seen.has(node)) return false;
  seen.add(node);
  for (const user of graph.usersOf(node)) {
    const parent = user.parent?.node;
    if (!parent) {
      if (user.role !== 'job' && user.perms.has('write')) return true;
      continue;
    }
    if (user.role === 'backing' || parent.children.get(user.role) !== node) continue;
    if (parent.driver.metadataChild && user.role === 'file') {
      if (!readOnlyAfter(parent)) return true;
    } else if (needsWrite(graph, parent, readOnlyAfter, seen)) {
      return true;
    }
  }
  return false;
}

/** The user a parent node is of a new 'file' child (as the graph makes them at open). */
function fileUser(parent: BlockNode, readOnly: boolean): NodeUser {
  if (parent.driver.metadataChild) {
    const perms = new Set<Permission>(['consistent read']);
    if (!readOnly) perms.add('write').add('resize');
    return { name: parent.nodeName, role: 'file', perms, shared: new Set(['consistent read', 'write unchanged']) };
  }
  return { name: parent.nodeName, role: 'file', perms: new Set(), shared: new Set(['consistent read', 'write', 'write unchanged', 'resize']) };
}

/** Runs fn with every export on these nodes (or their parents) drained. */
async function drainedAll<T>(daemon: Daemon, nodes: BlockNode[], fn: () => Promise<T>): Promise<T> {
  if (nodes.length === 0) return fn();
  return daemon.exports.drained(nodes[0]!, () => drainedAll(daemon, nodes.slice(1), fn));
}

/** Every iothread's replicas of these nodes take their new state. */
async function updateReplicas(daemon: Daemon, nodes: BlockNode[]): Promise<void> {
  for (const obj of daemon.objects.values()) if (obj instanceof IoThread) await obj.updateReplicas(nodes);
}

/** blockdev-reopen: QEMU's qmp_blockdev_reopen, all nodes prepared before any is changed. */
export async function blockdevReopen(daemon: Daemon, list: Array<Record<string, any>>): Promise<void> {
  const graph = daemon.graph;
  const queue = new Map<BlockNode, ReopenEntry>();
  for (const options of list) {
    const nodeName = options['node-name'];
    if (nodeName === undefined) throw genericError('node-name not specified');
    const node = graph.lookup(nodeName);
    if (!node) throw genericError(`Failed to find node with node-name='${nodeName}'`);
    queue.set(node, { node, options, readOnly: options['read-only'] ?? false });
  }

  /**
   * An implicitly opened file child follows an explicit read-only of its parent (QEMU's inherited
   * options), and its own file child follows it; a child with its own read-only keeps it.
   */
  const follow = (parent: ReopenEntry, child: BlockNode): void => {
    if (child !== parent.node.file || queue.has(child) || graph.entry(child.nodeName)?.monitorOwned) return;
    if ('read-only' in child.options) return;
    const follower: ReopenEntry = { node: child, readOnly: parent.readOnly };
    queue.set(child, follower);
    if (child.file) follow(follower, child.file);
  };

  // Prepare: every check before anything changes.
  for (const entry of [...queue.values()]) {
    const { node, options } = entry;
    checkResetAndSupport(node, options!);
    checkImmutable(node, options!);
    if (!node.driver.isProtocol) {
      const key = childOption(node);
      const file = resolveChild(graph, node, options![key], key, 'file');
      if (file !== node.file) {
        if (!FILE_CHANGE_DRIVERS.has(node.driver.name)) throw genericError(`Cannot change the option '${key}'`);
        graph.checkNewUser(graph.entry(file.nodeName)!, { ...fileUser(node, entry.readOnly), parent: graph.entry(node.nodeName) });
        entry.file = file;
      }
      if ('read-only' in options!) follow(entry, file);
    }
    if (BACKING_DRIVERS.has(node.driver.name)) {
      if (!('backing' in options!)) {
        const headerName = node.driver.imageInfo?.(node.state)['backing-filename'];
        if (node.backing || headerName !== undefined) throw genericError(`backing is missing for '${node.nodeName}'`);
      } else if (options!.backing === null) {
        if (node.backing) entry.backing = null;
      } else {
        const backing = resolveChild(graph, node, options!.backing, 'backing', 'backing');
        if (backing !== node.backing) entry.backing = backing;
      }
    }
  }
  if (queue.size === 0) return;

  // Permissions after the change (QEMU's bdrv_reopen_multiple refreshes them for the queue).
  const readOnlyAfter = (n: BlockNode) => queue.get(n)?.readOnly ?? n.readOnly;
  const checked = new Set<BlockNode>();
  for (const { node } of queue.values()) {
    for (const n of [node, ...node.children.values()]) {
      if (checked.has(n)) continue;
      checked.add(n);
      if (!readOnlyAfter(n) || !needsWrite(graph, n, readOnlyAfter)) continue;
      if (n.readOnly) throw genericError('Block node is read-only');
      throw genericError(`Read-only block node '${n.nodeName}' cannot support read-write users`);
    }
  }

  const nodes = [...queue.keys()];
  await drainedAll(daemon, nodes, async () => {
    // File descriptors with the new access mode are opened first: a failure changes nothing.
    const opened: ReopenEntry[] = [];
    try {
      for (const entry of queue.values()) {
        const { node } = entry;
        if (node.driver.name !== 'file' && node.driver.name !== 'host_device') continue;
        const opts = entry.options ?? node.options;
        entry.direct = opts.cache?.direct ?? false;
        const fd = fileReopenPrepare(node.state, entry.readOnly, entry.direct!, opts['auto-read-only'] ?? false);
        if (fd === undefined) continue;
        entry.fd = fd.fd;
        entry.readOnly = fd.readOnly;
        opened.push(entry);
      }
      // A node going read-only writes back what it caches first.
      for (const entry of queue.values()) if (entry.readOnly && !entry.node.readOnly) await entry.node.flush();
    } catch (err) {
      for (const entry of opened) fs.closeSync(entry.fd!);
      if (err instanceof QmpError) throw err;
      throw genericError(`Could not reopen: ${err instanceof Error ? err.message : String(err)}`);
    }

    // Commit: nothing below refuses.
    const oldFds: number[] = [];
    for (const entry of queue.values()) {
      const { node } = entry;
      if (entry.fd !== undefined) oldFds.push(fileReopenCommit(node.state, entry.fd, entry.direct!));
      node.readOnly = entry.readOnly;
    }
    for (const entry of queue.values()) {
      const { node, options } = entry;
      if (entry.file) await graph.replaceFileChild(node, entry.file, fileUser(node, node.readOnly));
      if (entry.backing !== undefined) await graph.setBacking(node, entry.backing ?? undefined);
      if (options) {
        // QEMU keeps the node's discard flag when a reopen leaves 'discard' out.
        const discard = 'discard' in options ? undefined : node.options.discard;
        for (const key of Object.keys(node.options)) delete node.options[key];
        Object.assign(node.options, options);
        if (discard !== undefined) node.options.discard = discard;
      }
      if (node.driver.name === 'raw') node.state = await node.driver.open(node, node.options);
      if (node.driver.name === 'qcow2') {
        node.state.unmap = node.options.discard === 'unmap';
        node.state.img.file = node.file;
      }
    }
    await updateReplicas(daemon, nodes);
    for (const fd of oldFds) fs.closeSync(fd);
  });
}

/** The nodes connected to `node` through child links either way (QEMU moves them together). */
function connectedNodes(graph: BlockGraph, node: BlockNode): Set<BlockNode> {
  const out = new Set<BlockNode>();
  const visit = (n: BlockNode) => {
    if (out.has(n)) return;
    out.add(n);
    for (const child of n.children.values()) visit(child);
    for (const user of graph.usersOf(n)) if (user.parent) visit(user.parent.node);
  };
  visit(node);
  return out;
}

export const blockReopenCommands: Record<string, CommandHandler> = {
  async 'blockdev-reopen'(args: { options: Array<Record<string, any>> }, { daemon }) {
    await blockdevReopen(daemon, args.options);
    return {};
  },

  'x-blockdev-set-iothread'(args: { 'node-name': string; iothread: string | null; force?: boolean }, { daemon }) {
    const { 'node-name': nodeName, iothread, force = false } = args;
    const node = daemon.graph.lookup(nodeName);
    if (!node) throw genericError(`Failed to find node with node-name='${nodeName}'`);
    if (!force && daemon.graph.hasBackend(nodeName)) {
      throw genericError(`Node ${nodeName} is associated with a BlockBackend and could be in use (use force=true to override this check)`);
    }
    if (iothread !== null && !(daemon.objects.get(iothread) instanceof IoThread)) throw genericError(`Cannot find iothread ${iothread}`);
    setNodeIothread(connectedNodes(daemon.graph, node), iothread);
    return {};
  },

  async 'change-backing-file'(args: { device: string; 'image-node-name': string; 'backing-file': string }, { daemon }) {
    const { device, 'image-node-name': imageName, 'backing-file': backingFile } = args;
    const graph = daemon.graph;
    const top = graph.lookup(device);
    if (!top) throw genericError(`Cannot find device='${device}' nor node-name='${device}'`);
    if (!graph.isRoot(top)) throw genericError('Need a root block node');
    const image = graph.lookup(imageName);
    if (!image) throw genericError(`Cannot find device='' nor node-name='${imageName}'`);
    const backing = image.backing;
    if (!backing) throw genericError('not allowing backing file change on an image without a backing file');
    graph.checkOp(top, 'change');
    let inChain = false;
    for (let n: BlockNode | undefined = top; n && !inChain; n = n.backing ?? (n.driver.isFilter ? n.file : undefined)) inChain = n === image;
    if (!inChain) throw genericError(`'${device}' and image file are not in the same chain`);
    if (image.driver.name !== 'qcow2') throw genericError(`Could not change backing file to '${backingFile}'`);
    const wasReadOnly = image.readOnly;
    if (wasReadOnly) await graph.setReadOnly(image, false);
    try {
      await graph.changeBackingFile(image, backingFile, backing.driver.name);
    } catch (err) {
      if (err instanceof QmpError) throw genericError(`Could not change backing file to '${backingFile}'`);
      throw err;
    } finally {
      if (wasReadOnly) await graph.setReadOnly(image, true);
    }
    return {};
  },
};
