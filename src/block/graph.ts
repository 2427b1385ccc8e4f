// The block node graph (main thread only): node names, parent/child edges, permissions, and
// opening/closing node trees for blockdev-add and blockdev-del.
import fs from 'node:fs';
import path from 'node:path';
import { BlockNode } from './node.js';
import { findBlockDriver } from './registry.js';
import { genericError, QmpError } from '../qapi/errors.js';
import { qcow2BackingInfo } from './qcow2/index.js';

/** QEMU's BLK_PERM_* as names (they appear in conflict messages). */
export type Permission = 'consistent read' | 'write' | 'write unchanged' | 'resize';
export const ALL_PERMS: readonly Permission[] = ['consistent read', 'write', 'write unchanged', 'resize'];

/** Someone using a node: a parent node through a child role, or a block backend (export, job). */
export interface NodeUser {
  /** For conflict messages: the parent's node name or the backend's description. */
  readonly name: string;
  /** 'file', 'backing', or 'root' for backends. */
  readonly role: string;
  readonly perms: ReadonlySet<Permission>;
  readonly shared: ReadonlySet<Permission>;
  /** A parent node edge (as opposed to an export or job). */
  readonly parent?: GraphEntry;
}

export interface GraphEntry {
  readonly node: BlockNode;
  /** Created by blockdev-add / --blockdev at top level (QEMU's monitor_list): deletable by name. */
  monitorOwned: boolean;
  readonly users: Set<NodeUser>;
  /**
   * When QEMU would have named the node (bdrv_assign_node_name): after its file child, before
   * its backing chain. Orders query-named-block-nodes.
   */
  readonly order: number;
}

/** Options that belong to every node and do not make its filename a json: one. */
const BASE_OPTIONS = new Set([
  'driver', 'node-name', 'discard', 'cache', 'read-only', 'auto-read-only', 'force-share', 'detect-zeroes',
]);

/**
 * QEMU's bdrv_inherited_options for a child defined inline: unless the child sets them itself,
 * it takes the parent's discard and cache modes (a node referenced by name keeps its own).
 */
function inheritOptions(child: Record<string, any>, parent?: Record<string, any>): Record<string, any> {
  if (!parent) return child;
  const out = { ...child };
  if (out.discard === undefined && parent.discard !== undefined) out.discard = parent.discard;
  if (parent.cache !== undefined) out.cache = { ...parent.cache, ...out.cache };
  return out;
}

/** Format of an image whose header names no backing format: qcow2 by its magic, else raw. */
function probeFormat(filename: string): string {
  try {
    const fd = fs.openSync(filename, 'r');
    try {
      const magic = Buffer.alloc(4);
      fs.readSync(fd, magic, 0, 4, 0);
      return magic.toString('latin1') === 'QFI\xfb' ? 'qcow2' : 'raw';
    } finally {
      fs.closeSync(fd);
    }
  } catch {
    return 'raw'; // Opening the backing file reports the real problem.
  }
}

/** How QEMU names a user in permission messages: a parent node, or an anonymous backend. */
function describeUser(user: NodeUser): string {
  return user.parent ? `node '${user.name}'` : 'an unnamed block device';
}

/** QEMU's id_wellformed(): a letter first, then letters, digits, '-', '.', '_'. */
export function idWellformed(id: string): boolean {
  return /^[A-Za-z][A-Za-z0-9._-]*$/.test(id);
}

function permsFor(readOnly: boolean, resize: boolean): Set<Permission> {
  const perms = new Set<Permission>(['consistent read']);
  if (!readOnly) perms.add('write');
  if (resize && !readOnly) perms.add('resize');
  return perms;
}

/** What a format parent lets others do to its file child (bdrv_default_perms_for_storage). */
const FORMAT_SHARED: ReadonlySet<Permission> = new Set(['consistent read', 'write unchanged']);
const SHARE_ALL: ReadonlySet<Permission> = new Set(ALL_PERMS);

export class BlockGraph {
  /** Every node with its name, newest first as QEMU lists them. */
  private readonly entries = new Map<string, GraphEntry>();
  private generatedIds = 0;
  private nextOrder = 0;

  /** Where a format names its own backing file (qcow2's header): read before the node opens. */
  private async backingResolver(node: { driver: string; file: BlockNode }): Promise<{ backingFile?: string; backingFormat?: string }> {
    return node.driver === 'qcow2' ? qcow2BackingInfo(node.file) : {};
  }

  lookup(nodeName: string): BlockNode | undefined {
    return this.entries.get(nodeName)?.node;
  }

  entry(nodeName: string): GraphEntry | undefined {
    return this.entries.get(nodeName);
  }

  /** Nodes newest first (query-named-block-nodes order). */
  list(): GraphEntry[] {
    return [...this.entries.values()].sort((a, b) => b.order - a.order);
  }

  /** QEMU's bdrv_lookup_bs(NULL, name) message. */
  require(nodeName: string): BlockNode {
    const node = this.lookup(nodeName);
    if (!node) throw genericError(`Cannot find device='' nor node-name='${nodeName}'`);
    return node;
  }

  /** QEMU's id_generate(ID_BLOCK): "#block" + counter + two random digits. */
  private generateNodeName(): string {
    for (;;) {
      const name = `#block${this.generatedIds++}${String(Math.floor(Math.random() * 100)).padStart(2, '0')}`;
      if (!this.entries.has(name)) return name;
    }
  }

  /** blockdev-add: open a tree of nodes from validated BlockdevOptions. */
  async add(options: Record<string, any>): Promise<BlockNode> {
    if (options['node-name'] === undefined) throw genericError("'node-name' must be specified for the root node");
    const entry = await this.openTree(options, { readOnly: false });
    entry.monitorOwned = true;
    return entry.node;
  }

  private async openTree(
    options: Record<string, any>,
    inherited: { readOnly: boolean; baseDir?: string },
  ): Promise<GraphEntry> {
    const driver = findBlockDriver(options.driver);
    if (!driver) throw genericError(`Unknown driver '${options.driver}'`);
    let nodeName: string | undefined = options['node-name'];
    if (nodeName !== undefined) {
      if (!idWellformed(nodeName)) throw genericError(`Invalid node-name: '${nodeName}'`);
      if (this.entries.has(nodeName)) throw genericError(`Duplicate nodes with node-name='${nodeName}'`);
      // QEMU keeps node names in a 32-byte array.
      if (Buffer.byteLength(nodeName) >= 32) throw genericError('Node name too long');
    }
    const readOnly = options['read-only'] ?? inherited.readOnly;
    const children = new Map<string, BlockNode>();
    const opened: GraphEntry[] = [];
    const edges: Array<{ role: string; entry: GraphEntry }> = [];
    let order: number | undefined;
    try {
      if (!driver.isProtocol) {
        // blkdebug names its child 'image'; it is still the node's 'file' (primary) child.
        const fileRef = options[driver.childOption ?? 'file'];
        if (fileRef === undefined) throw genericError('A block device must be specified for "file"');
        const file = await this.resolveRef(fileRef, { readOnly, parentOptions: options }, opened);
        edges.push({ role: 'file', entry: file });
        children.set('file', file.node);
        // QEMU names a format node once its file is open and only then opens its backing chain,
        // so the node lists after its backing nodes and before its file.
        order = this.nextOrder++;
        await this.openBacking(options, file, readOnly, children, edges, opened);
      }
      if (nodeName === undefined) nodeName = this.generateNodeName();
      // Children are named before their parent: QEMU lists the parent first (newest first).
      if (this.entries.has(nodeName)) throw genericError(`Duplicate nodes with node-name='${nodeName}'`);
      const node = new BlockNode({ nodeName, driver, readOnly, options, children });
      for (const { role, entry } of edges) this.checkNewUser(entry, this.parentUser(node, role, readOnly));
      node.state = await driver.open(node, options);
      const entry: GraphEntry = { node, monitorOwned: false, users: new Set(), order: order ?? this.nextOrder++ };
      for (const { role, entry: child } of edges) child.users.add(this.parentUser(node, role, node.readOnly, entry));
      this.entries.set(nodeName, entry);
      return entry;
    } catch (err) {
      // Undo implicitly created children (newest first), leave referenced nodes alone.
      for (const child of opened.reverse()) await this.closeEntry(child);
      throw err;
    }
  }

  private parentUser(node: BlockNode, role: string, readOnly: boolean, parent?: GraphEntry): NodeUser {
    // As QEMU: a child holding metadata (qcow2's file) is always read consistently and written by a
    // writable parent, and nobody else may write or resize it. A data-only child (raw's file, a
    // backing file) gets only what the parent's own users ask for, which we do not propagate.
    if (role === 'file' && node.driver.metadataChild) {
      return { name: node.nodeName, role, perms: permsFor(readOnly, true), shared: FORMAT_SHARED, parent };
    }
    // A backing file is read consistently; raw's file gets what raw's own users ask (not propagated).
    const perms = new Set<Permission>(role === 'backing' ? ['consistent read'] : []);
    return { name: node.nodeName, role, perms, shared: SHARE_ALL, parent };
  }

  private async openBacking(
    options: Record<string, any>,
    file: GraphEntry,
    _readOnly: boolean,
    children: Map<string, BlockNode>,
    edges: Array<{ role: string; entry: GraphEntry }>,
    opened: GraphEntry[],
  ): Promise<void> {
    const ref = options.backing;
    if (ref === null) return;
    let backing: GraphEntry | undefined;
    if (ref !== undefined) {
      backing = await this.resolveRef(ref, { readOnly: true }, opened);
    } else {
      const info = await this.backingResolver({ driver: options.driver, file: file.node });
      if (!info.backingFile) return;
      const resolved = pathCombine(file.node.options.filename ?? '', info.backingFile);
      const fmt = info.backingFormat ?? probeFormat(resolved);
      try {
        backing = await this.openTree(
          { driver: fmt, 'read-only': true, file: { driver: 'file', filename: resolved, 'read-only': true } },
          { readOnly: true },
        );
      } catch (err) {
        // QEMU's bdrv_open_backing_file() prepends this to whatever went wrong.
        if (err instanceof QmpError) throw new QmpError(err.errorClass, `Could not open backing file: ${err.message}`, err.hint);
        throw err;
      }
      opened.push(backing);
    }
    if (backing) {
      edges.push({ role: 'backing', entry: backing });
      children.set('backing', backing.node);
    }
  }

  /** A BlockdevRef: a node name to reference, or options for an implicitly created node. */
  private async resolveRef(
    ref: string | Record<string, any>,
    inherited: { readOnly: boolean; parentOptions?: Record<string, any> },
    opened: GraphEntry[],
  ): Promise<GraphEntry> {
    if (typeof ref === 'string') {
      const entry = this.entries.get(ref);
      if (!entry) throw genericError(`Cannot find device='${ref}' nor node-name='${ref}'`);
      return entry;
    }
    const child = await this.openTree(inheritOptions(ref, inherited.parentOptions), inherited);
    opened.push(child);
    return child;
  }

  /** Check a new user against the node's current users, with QEMU's conflict message. */
  checkNewUser(entry: GraphEntry, user: NodeUser): void {
    const conflict = (required: NodeUser, unsharing: NodeUser, perms: Permission[]) =>
      genericError(
        `Permission conflict on node '${entry.node.nodeName}': permissions '${perms.join(', ')}' are both required by ` +
          `${describeUser(required)} (uses node '${entry.node.nodeName}' as '${required.role}' child) and unshared by ` +
          `${describeUser(unsharing)} (uses node '${entry.node.nodeName}' as '${unsharing.role}' child).`,
      );
    for (const other of entry.users) {
      const theirs = ALL_PERMS.filter((p) => other.perms.has(p) && !user.shared.has(p));
      if (theirs.length) throw conflict(other, user, theirs);
      const ours = ALL_PERMS.filter((p) => user.perms.has(p) && !other.shared.has(p));
      if (ours.length) throw conflict(user, other, ours);
    }
  }

  /** Attach a block backend (export, job) to a node after checking permissions. */
  attachBackend(node: BlockNode, name: string, perms: Permission[], shared: readonly Permission[] = ALL_PERMS): NodeUser {
    const entry = this.entries.get(node.nodeName);
    if (!entry) throw genericError(`Cannot find device='' nor node-name='${node.nodeName}'`);
    const user: NodeUser = { name, role: 'root', perms: new Set(perms), shared: new Set(shared) };
    this.checkNewUser(entry, user);
    entry.users.add(user);
    return user;
  }

  detachBackend(node: BlockNode, user: NodeUser): void {
    this.entries.get(node.nodeName)?.users.delete(user);
  }

  /** Does a backend (export, job) use this node? */
  hasBackend(nodeName: string): boolean {
    const entry = this.entries.get(nodeName);
    return !!entry && [...entry.users].some((u) => !u.parent);
  }

  /** blockdev-del, with QEMU's checks in QEMU's order. */
  async del(nodeName: string): Promise<void> {
    const entry = this.entries.get(nodeName);
    if (!entry) throw genericError(`Failed to find node with node-name='${nodeName}'`);
    if (this.hasBackend(nodeName)) throw genericError(`Node ${nodeName} is in use`);
    if (!entry.monitorOwned) throw genericError(`Node ${nodeName} is not owned by the monitor`);
    if (entry.users.size > 0) throw genericError(`Block device ${nodeName} is in use`);
    await this.closeEntry(entry);
  }

  /** Close a node and every implicitly created child no one else uses. */
  private async closeEntry(entry: GraphEntry): Promise<void> {
    this.entries.delete(entry.node.nodeName);
    try {
      await entry.node.driver.close(entry.node.state);
    } finally {
      for (const child of entry.node.children.values()) {
        const childEntry = this.entries.get(child.nodeName);
        if (!childEntry) continue;
        for (const user of childEntry.users) if (user.parent === entry) childEntry.users.delete(user);
        if (!childEntry.monitorOwned && childEntry.users.size === 0) await this.closeEntry(childEntry);
      }
    }
  }

  /** Close everything at exit: parents before children. */
  async closeAll(): Promise<void> {
    for (const entry of this.list()) {
      if (!this.entries.has(entry.node.nodeName)) continue;
      const hasParent = [...entry.users].some((u) => u.parent);
      if (!hasParent) await this.closeEntry(entry).catch(() => undefined);
    }
    for (const entry of this.list()) await this.closeEntry(entry).catch(() => undefined);
  }

  /** The parents (transitively) of a node, the node included. */
  ancestors(node: BlockNode): Set<BlockNode> {
    const out = new Set<BlockNode>([node]);
    const visit = (n: BlockNode) => {
      const entry = this.entries.get(n.nodeName);
      if (!entry) return;
      for (const user of entry.users) {
        if (user.parent && !out.has(user.parent.node)) {
          out.add(user.parent.node);
          visit(user.parent.node);
        }
      }
    };
    visit(node);
    return out;
  }

  /**
   * QEMU's bdrv_refresh_filename, simplified: a plain name when options add nothing, else json:.
   * `backing` appears only when overridden: the backing node's options, or null for none.
   */
  static fullOptions(node: BlockNode, toJson?: (value: unknown) => string): Record<string, unknown> {
    const out: Record<string, unknown> = { driver: node.driver.name };
    for (const [key, value] of Object.entries(node.options)) {
      if (BASE_OPTIONS.has(key) || key === 'file' || key === 'backing') continue;
      out[key] = value;
    }
    const file = node.file;
    if (file) out.file = BlockGraph.fullOptions(file, toJson);
    if (toJson && backingOverridden(node, toJson)) {
      const backing = node.backing;
      out.backing = backing ? BlockGraph.fullOptions(backing, toJson) : null;
    }
    return out;
  }
}

/**
 * QEMU's path_combine(): a relative backing name is taken relative to the image's directory by
 * plain concatenation (no normalization: "dir/sub/../base.raw" stays as it is, as QEMU shows it).
 */
export function pathCombine(imageFilename: string, backing: string): string {
  if (path.isAbsolute(backing) || hasProtocol(backing)) return backing;
  const slash = imageFilename.lastIndexOf('/');
  return slash < 0 ? backing : imageFilename.slice(0, slash + 1) + backing;
}

/** QEMU's path_has_protocol(): a ':' before any '/'. */
function hasProtocol(name: string): boolean {
  const colon = name.indexOf(':');
  const slash = name.indexOf('/');
  return colon >= 0 && (slash < 0 || colon < slash);
}

/**
 * QEMU's bdrv_backing_overridden(): the backing child is not the one the image header names
 * (an explicit `backing` option that differs, or `backing: null` on an image that has one).
 * A backing file opened from the header is never overridden.
 */
function backingOverridden(node: BlockNode, toJson: (value: unknown) => string): boolean {
  const ref = node.options.backing;
  if (ref === undefined) return false;
  const headerName = node.driver.imageInfo?.(node.state)['backing-filename'];
  const backing = node.backing;
  if (!backing) return headerName !== undefined;
  return headerName !== nodeFilename(backing, toJson);
}

/** The `file`/`filename` string QEMU shows for a node. */
export function nodeFilename(node: BlockNode, toJson: (value: unknown) => string): string {
  const driver = node.driver.name;
  if (driver === 'file' || driver === 'host_device') return node.options.filename;
  const extra = Object.keys(node.options).filter(
    (k) => !BASE_OPTIONS.has(k) && k !== 'file' && k !== 'backing' && k !== 'latency-ns',
  );
  if (node.driver.isProtocol) {
    if (extra.length === 0) return `${driver}://`;
  } else if (extra.length === 0 && node.file && !backingOverridden(node, toJson)) {
    return nodeFilename(node.file, toJson);
  }
  return `json:${toJson(BlockGraph.fullOptions(node, toJson))}`;
}
