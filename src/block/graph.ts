// The block node graph (main thread only): node names, parent/child edges, permissions, and
// opening/closing node trees for blockdev-add and blockdev-del.
import fs from 'node:fs';
import path from 'node:path';
import { BlockNode } from './node.js';
import type { BlockDriver } from './driver.js';
import { findBlockDriver } from './registry.js';
import { genericError, QmpError } from '../qapi/errors.js';
import { qcow2BackingInfo, qcow2ChangeBackingFile, qcow2SetBackingNode } from './qcow2/index.js';

/** QEMU's BLK_PERM_* as names (they appear in conflict messages). */
export type Permission = 'consistent read' | 'write' | 'write unchanged' | 'resize';
export const ALL_PERMS: readonly Permission[] = ['consistent read', 'write', 'write unchanged', 'resize'];

/** Someone using a node: a parent node through a child role, or a block backend (export, job). */
export interface NodeUser {
  /** For conflict messages: the parent's node name or the backend's description. */
  readonly name: string;
  /**
   * 'file', 'backing', 'root' for block backends (exports, a job's BlockBackends), or 'job' for a
   * block job holding the node (QEMU's child_job: the node is then no root node).
   */
  readonly role: string;
  readonly perms: ReadonlySet<Permission>;
  readonly shared: ReadonlySet<Permission>;
  /** A parent node edge (as opposed to an export or job). */
  readonly parent?: GraphEntry;
  /**
   * A block job's own hold on the node (QEMU's block_job_add_bdrv): x-debug-query-block-graph
   * shows it as an edge named `edge` from a 'block-job' node; `seq` orders a job's edges.
   */
  readonly job?: { readonly id: string; readonly edge: string; readonly seq: number };
}

/**
 * Nodes whose backing edge a job's filter took over (the filter sits between them and their
 * backing node): queries show the filter as their backing child, as QEMU's graph has it. I/O and
 * the jobs keep using node.backing.
 */
const backingViews = new WeakMap<BlockNode, BlockNode>();
/** Job filters created without a filter-node-name (QEMU's implicit nodes: filenames skip them). */
const implicitFilters = new WeakSet<BlockNode>();

/** The backing child as queries show it: a job's filter in between, else node.backing. */
export function viewBacking(node: BlockNode): BlockNode | undefined {
  return backingViews.get(node) ?? node.backing;
}

/** A job's implicit filter node (QEMU's commit_top, mirror_top, copy-before-write). */
export interface FilterSpec {
  driver: BlockDriver;
  /** The job's filter-node-name; absent: an implicit #blockNNN name. */
  nodeName?: string;
  /** The node the filter sits above: its parents (not the job's holds) become the filter's. */
  child: BlockNode;
  role: 'backing' | 'file';
  readOnly: boolean;
  perms: Permission[];
  shared: readonly Permission[];
  /** A second child (copy-before-write's 'target'). */
  target?: { node: BlockNode; perms: Permission[]; shared: readonly Permission[] };
}

export interface GraphEntry {
  /** The node under this name (replaceNode() moves identities between objects). */
  node: BlockNode;
  /** Created by blockdev-add / --blockdev at top level (QEMU's monitor_list): deletable by name. */
  monitorOwned: boolean;
  readonly users: Set<NodeUser>;
  /**
   * When QEMU would have named the node (bdrv_assign_node_name): after its file child, before
   * its backing chain. Orders query-named-block-nodes.
   */
  readonly order: number;
}

/** Operations a blocker can forbid (QEMU's BlockOpType, the ones qsd-ts checks). */
export type BlockOp = 'drive-del' | 'external-snapshot' | 'commit-source' | 'commit-target' | 'stream' | 'change';

/** A file node opened read-only gets a read-write descriptor (same flags otherwise). */
function reopenFileReadWrite(node: BlockNode): void {
  const st = node.state as { fd: number; filename: string; direct?: boolean };
  let flags = '';
  try {
    flags = fs.readFileSync(`/proc/self/fdinfo/${st.fd}`, 'latin1');
  } catch {
    return;
  }
  const m = /^flags:\s*([0-7]+)/m.exec(flags);
  if (!m || (parseInt(m[1]!, 8) & 3) !== fs.constants.O_RDONLY) return;
  const fd = fs.openSync(st.filename, fs.constants.O_RDWR | (st.direct ? fs.constants.O_DIRECT : 0));
  const old = st.fd;
  st.fd = fd;
  fs.closeSync(old);
}

/** Options that belong to every node and do not make its filename a json: one. */
const BASE_OPTIONS = new Set([
  'driver', 'node-name', 'discard', 'cache', 'read-only', 'auto-read-only', 'force-share', 'detect-zeroes',
]);

/**
 * QEMU's strong runtime options per driver: only these change what a node presents, so only they
 * make its filename a json: one and only they appear in the json: body (with driver and filename),
 * under their flattened keys; a key ending in '.' is a prefix. Tuning options (aio, locking, the
 * qcow2 cache sizes, latency-ns...) do neither. A driver missing here shows all its options.
 */
const STRONG_OPTIONS: Record<string, readonly string[]> = {
  file: [], host_device: [], 'copy-on-read': [],
  raw: ['offset', 'size'],
  'null-co': ['size', 'read-zeroes'], 'null-aio': ['size', 'read-zeroes'],
  qcow2: ['encrypt.key-secret'],
  luks: ['key-secret'],
  throttle: ['throttle-group'],
  blkdebug: ['config', 'inject-error.', 'set-state.', 'align', 'max-transfer', 'opt-write-zero', 'max-write-zero',
    'opt-discard', 'max-discard'],
};

/** Options every driver copies into its json: body (QEMU's global options of bdrv_refresh_filename). */
const GLOBAL_OPTIONS = ['filename'];

/** The options of a node that QEMU's json: filename shows, flattened as QEMU keeps them (a.0.b). */
function strongOptions(node: BlockNode): Record<string, unknown> {
  const strong = STRONG_OPTIONS[node.driver.name];
  const out: Record<string, unknown> = {};
  if (!strong) {
    for (const [key, value] of Object.entries(node.options)) {
      if (!BASE_OPTIONS.has(key) && key !== 'file' && key !== 'backing') out[key] = value;
    }
    return out;
  }
  const isStrong = (key: string) => GLOBAL_OPTIONS.includes(key) ||
    strong.some((s) => (s.endsWith('.') ? key.startsWith(s) : key === s));
  const walk = (prefix: string, value: unknown): void => {
    if (value !== null && typeof value === 'object') {
      for (const [k, v] of Object.entries(value)) walk(`${prefix}.${k}`, v);
    } else if (isStrong(prefix)) {
      out[prefix] = value;
    }
  };
  for (const [key, value] of Object.entries(node.options)) {
    if (BASE_OPTIONS.has(key) || key === 'file' || key === 'backing') continue;
    if (isStrong(key)) out[key] = value;
    else if (value !== null && typeof value === 'object') walk(key, value);
  }
  return out;
}

/** The name of a node's primary child in QEMU (blkdebug calls it image). */
function fileChildName(node: BlockNode): string {
  return node.driver.name === 'blkdebug' ? 'image' : 'file';
}

/**
 * QEMU's bdrv_inherited_options for a child defined inline: unless the child sets them itself,
 * it takes the parent's discard and cache modes (a node referenced by name keeps its own).
 */
function inheritOptions(child: Record<string, any>, parent?: Record<string, any>): Record<string, any> {
  // QEMU's bdrv_inherited_options: an implicitly opened child defaults to discard=unmap whatever
  // its parent says, because the parent applies its own discard policy before passing anything on
  // (so a qcow2 node's freed clusters are punched out of its file).
  const out = { ...child };
  if (out.discard === undefined) out.discard = 'unmap';
  if (parent?.cache !== undefined) out.cache = { ...parent.cache, ...out.cache };
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

/**
 * A node that passes its users' permissions through to its child, as QEMU's
 * bdrv_filter_default_perms does: filters, and raw without offset or size (which QEMU opens
 * with a FILTERED child).
 */
function passesThrough(node: BlockNode): boolean {
  if (node.driver.isFilter) return true;
  return node.driver.name === 'raw' && node.options.offset === undefined && node.options.size === undefined;
}

/**
 * What a user really shares of its node. A pass-through parent shares only what every one of its
 * own users shares (an NBD export over raw that unshares resize keeps raw's file from being
 * resized too; QEMU names raw as the one unsharing it).
 */
function effectiveShared(user: NodeUser, depth = 0): ReadonlySet<Permission> {
  const parent = user.parent;
  if (!parent || depth > 32 || user.role !== 'file' || !passesThrough(parent.node)) return user.shared;
  let shared: Set<Permission> | undefined;
  for (const u of parent.users) {
    const s = effectiveShared(u, depth + 1);
    // All of consistent read, write, write unchanged and resize pass through a filter.
    for (const p of ALL_PERMS) if (!s.has(p) && user.shared.has(p)) (shared ??= new Set(user.shared)).delete(p);
  }
  return shared ?? user.shared;
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
const SHARE_ALL_BUT_RESIZE: ReadonlySet<Permission> = new Set(ALL_PERMS.filter((p) => p !== 'resize'));

export class BlockGraph {
  /** Every node with its name, newest first as QEMU lists them. */
  private readonly entries = new Map<string, GraphEntry>();
  private generatedIds = 0;
  private nextOrder = 0;
  /** Block jobs' op blockers per node name, newest first (QEMU's op_blockers). */
  private readonly jobBlockers = new Map<string, string[]>();

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

  /** A name as QEMU gives an implicit node (a job's filter), for messages naming one. */
  anonymousNodeName(): string {
    return this.generateNodeName();
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
        // QEMU's generic open creates a 'file' child before naming the node; a child under another
        // option (blkdebug's 'image') is opened by the driver itself, after the node is named, so
        // it lists before its parent.
        if (driver.childOption !== undefined && driver.childOption !== 'file') order = this.nextOrder++;
        const file = await this.resolveRef(fileRef, { readOnly, parentOptions: options }, opened);
        edges.push({ role: 'file', entry: file });
        children.set('file', file.node);
        // QEMU names a format node once its file is open and only then opens its backing chain,
        // so the node lists after its backing nodes and before its file.
        order ??= this.nextOrder++;
        await this.openBacking(options, file, readOnly, children, edges, opened);
      }
      if (nodeName === undefined) nodeName = this.generateNodeName();
      // Children are named before their parent: QEMU lists the parent first (newest first).
      if (this.entries.has(nodeName)) throw genericError(`Duplicate nodes with node-name='${nodeName}'`);
      // QEMU's bdrv_open_common refuses this before it looks at anything else of the node.
      if (options['force-share'] === true && !readOnly) {
        throw genericError('force-share=on can only be used with read-only images');
      }
      // QEMU's bdrv_parse_detect_zeroes, checked once the node is named, before the driver opens.
      if (options['detect-zeroes'] === 'unmap' && options.discard !== 'unmap') {
        throw genericError('setting detect-zeroes to unmap is not allowed without setting discard operation to unmap');
      }
      // QEMU's qcow2 looks its data-file reference up before it checks that the image has one
      // (we open no external data files: the driver refuses the option past this point).
      const dataRef = options['data-file'];
      if (typeof dataRef === 'string' && !this.entries.has(dataRef)) {
        throw genericError(`Cannot find device='${dataRef}' nor node-name='${dataRef}'`);
      }
      const node = new BlockNode({ nodeName, driver, readOnly, options, children });
      for (const { role, entry } of edges) {
        const user = this.parentUser(node, role, readOnly);
        // A writable format over a read-only node it would write (its metadata): QEMU's permission update refuses.
        if (user.perms.has('write') && entry.node.readOnly) throw genericError('Block node is read-only');
        this.checkNewUser(entry, user);
      }
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
    // raw with an offset or a size holds its file as data (QEMU's storage perms): it may assume the
    // file's size, so nobody may resize it. Without them raw is a filter (see effectiveShared).
    if (role === 'file' && node.driver.name === 'raw' && !passesThrough(node)) {
      return { name: node.nodeName, role, perms, shared: SHARE_ALL_BUT_RESIZE, parent };
    }
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
      try {
        backing = await this.resolveRef(ref, { readOnly: true }, opened);
      } catch (err) {
        // QEMU's bdrv_open_backing_file() prepends this to whatever went wrong.
        if (err instanceof QmpError) throw new QmpError(err.errorClass, `Could not open backing file: ${err.message}`, err.hint);
        throw err;
      }
    } else {
      const info = await this.backingResolver({ driver: options.driver, file: file.node });
      if (!info.backingFile) return;
      const resolved = pathCombine(file.node.options.filename ?? '', info.backingFile);
      const fmt = info.backingFormat ?? probeFormat(resolved);
      try {
        backing = await this.openTree(
          inheritOptions({ driver: fmt, 'read-only': true, file: { driver: 'file', filename: resolved, 'read-only': true } }),
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
      const otherShared = effectiveShared(other);
      const ours = ALL_PERMS.filter((p) => user.perms.has(p) && !otherShared.has(p));
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
    // QEMU drains an export's node twice while it deletes the export (jobs above pause and resume).
    if (user.name.startsWith("export '")) for (let i = 0; i < 2; i++) this.notifyDrain(node);
    if (this.entries.get(node.nodeName)?.users.delete(user)) return;
    // A job's filter took the node's parents over meanwhile.
    for (const entry of this.entries.values()) if (entry.users.delete(user)) return;
  }

  /** Called for each drained section on a node (block jobs pause for it: QEMU's child_job drain). */
  private readonly drainListeners = new Set<(drained: Set<BlockNode>) => void>();

  onDrain(listener: (drained: Set<BlockNode>) => void): () => void {
    this.drainListeners.add(listener);
    return () => this.drainListeners.delete(listener);
  }

  /** A drained section on `node`: it and its parents (transitively) are quiesced. */
  notifyDrain(node: BlockNode): void {
    if (this.drainListeners.size === 0) return;
    const drained = this.ancestors(node);
    for (const listener of [...this.drainListeners]) listener(drained);
  }

  /**
   * A block job's filter node (QEMU's bdrv_new_open_driver + bdrv_replace_node): named and listed
   * like any node, with the child's parents (exports, parent nodes; not the job's own holds) moved
   * onto it. Data still flows to the child directly (the filters pass it through; jobs intercept
   * writes at the child), so only the graph's bookkeeping and the queries change.
   */
  insertFilter(spec: FilterSpec): BlockNode {
    const nodeName = spec.nodeName ?? this.generateNodeName();
    if (spec.nodeName !== undefined) this.checkNewNodeName(nodeName);
    const childEntry = this.entries.get(spec.child.nodeName)!;
    const children = new Map<string, BlockNode>([[spec.role, spec.child]]);
    if (spec.target) children.set('target', spec.target.node);
    const node = new BlockNode({ nodeName, driver: spec.driver, readOnly: spec.readOnly, options: {}, children });
    node.state = { node, child: spec.child };
    if (spec.nodeName === undefined) implicitFilters.add(node);
    const entry: GraphEntry = { node, monitorOwned: false, users: new Set(), order: this.nextOrder++ };
    for (const user of childEntry.users) {
      if (user.job || user.name.startsWith('block job (')) continue;
      childEntry.users.delete(user);
      entry.users.add(user);
      if (user.parent && user.role === 'backing') backingViews.set(user.parent.node, node);
    }
    childEntry.users.add({ name: nodeName, role: spec.role, perms: new Set(spec.perms), shared: new Set(spec.shared), parent: entry });
    if (spec.target) {
      const t = spec.target;
      this.entries.get(t.node.nodeName)!.users.add({ name: nodeName, role: 'target', perms: new Set(t.perms), shared: new Set(t.shared), parent: entry });
    }
    this.entries.set(nodeName, entry);
    return node;
  }

  /** QEMU's bdrv_assign_node_name() checks for a name given to a new node. */
  checkNewNodeName(nodeName: string): void {
    if (!idWellformed(nodeName)) throw genericError(`Invalid node-name: '${nodeName}'`);
    if (this.entries.has(nodeName)) throw genericError(`Duplicate nodes with node-name='${nodeName}'`);
    if (Buffer.byteLength(nodeName) >= 32) throw genericError('Node name too long');
  }

  /** Takes a job's filter out again: its parents go back to its child (QEMU's bdrv_drop_filter). */
  removeFilter(filter: BlockNode): void {
    const entry = this.entries.get(filter.nodeName);
    if (!entry || entry.node !== filter) return;
    const child = [...filter.children.values()][0]!;
    const childEntry = this.entries.get(child.nodeName);
    for (const c of filter.children.values()) {
      const e = this.entries.get(c.nodeName);
      for (const user of e?.users ?? []) if (user.parent === entry) e!.users.delete(user);
    }
    // The job's own holds and BlockBackends on its filter go with the filter.
    for (const user of entry.users) {
      if (user.parent && backingViews.get(user.parent.node) === filter) backingViews.delete(user.parent.node);
      if (!user.job && !user.name.startsWith('block job (')) childEntry?.users.add(user);
    }
    this.entries.delete(filter.nodeName);
  }

  /** Does a backend (export, job) use this node? */
  hasBackend(nodeName: string): boolean {
    const entry = this.entries.get(nodeName);
    return !!entry && [...entry.users].some((u) => !u.parent && u.role !== 'job');
  }

  /** blockdev-del, with QEMU's checks in QEMU's order. */
  async del(nodeName: string): Promise<void> {
    const entry = this.entries.get(nodeName);
    if (!entry) throw genericError(`Failed to find node with node-name='${nodeName}'`);
    if (this.hasBackend(nodeName)) throw genericError(`Node ${nodeName} is in use`);
    this.checkOp(entry.node, 'drive-del');
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
    // Rounds, because closing a parent is what frees its children (a snapshot's old top and its
    // file): a format node writes metadata back through its file child when it closes (qcow2
    // bitmaps, the dirty flag), so no child may close before every parent has.
    for (;;) {
      const open = this.list();
      if (open.length === 0) return;
      const parentless = open.filter((e) => ![...e.users].some((u) => u.parent && this.entries.has(u.parent.node.nodeName)));
      // A cycle cannot be built; should one exist anyway, close the rest rather than loop.
      for (const entry of parentless.length ? parentless : open) {
        if (this.entries.has(entry.node.nodeName)) await this.closeEntry(entry).catch(() => undefined);
      }
    }
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

  // ---------------------------------------------------------------- graph changes (jobs, snapshots)

  /**
   * QEMU's bdrv_op_is_blocked(): a block job blocks every operation on the nodes it holds
   * (newest first), a backing link blocks deleting, snapshotting and committing from its child.
   */
  checkOp(node: BlockNode, op: BlockOp): void {
    const jobs = this.jobBlockers.get(node.nodeName);
    if (jobs?.length) throw genericError(`Node '${node.nodeName}' is busy: ${jobs[0]}`);
    if (op === 'commit-target' || op === 'stream') return;
    const entry = this.entries.get(node.nodeName);
    for (const user of entry?.users ?? []) {
      if (user.parent && user.role === 'backing') {
        throw genericError(`Node '${node.nodeName}' is busy: node is used as backing hd of '${user.name}'`);
      }
    }
  }

  /** Whether a block job holds `node` (QEMU's op blockers, for commands that name no reason). */
  jobBlocked(node: BlockNode): boolean {
    return (this.jobBlockers.get(node.nodeName)?.length ?? 0) > 0;
  }

  /** A block job holds `node`: every operation on it reports `reason` until unblockAll(). */
  blockAll(node: BlockNode, reason: string): void {
    const list = this.jobBlockers.get(node.nodeName) ?? [];
    list.unshift(reason);
    this.jobBlockers.set(node.nodeName, list);
  }

  unblockAll(node: BlockNode, reason: string): void {
    const list = this.jobBlockers.get(node.nodeName);
    const i = list?.indexOf(reason) ?? -1;
    if (i >= 0) list!.splice(i, 1);
    if (list && list.length === 0) this.jobBlockers.delete(node.nodeName);
  }

  /** QEMU's bdrv_is_root_node(): no parent node and no block job holds it. */
  isRoot(node: BlockNode): boolean {
    return ![...(this.entries.get(node.nodeName)?.users ?? [])].some((u) => u.parent || u.role === 'job');
  }

  /** The node whose backing child is `node` within the chain from `top` (QEMU's bdrv_find_overlay). */
  overlayOf(top: BlockNode, node: BlockNode): BlockNode | undefined {
    for (let n: BlockNode | undefined = top; n; n = n.backing) if (n.backing === node) return n;
    return undefined;
  }

  /** Users (parents and backends) of a node. */
  usersOf(node: BlockNode): NodeUser[] {
    return [...(this.entries.get(node.nodeName)?.users ?? [])];
  }

  /**
   * Make `backing` the backing child of `node` (none if undefined): the child edge, the format
   * driver's link and the node's options (so its filename shows the override as QEMU does). An
   * implicitly opened backing node nobody uses any more is closed. The caller drains first.
   */
  async setBacking(node: BlockNode, backing: BlockNode | undefined): Promise<void> {
    const entry = this.entries.get(node.nodeName);
    if (!entry) throw genericError(`Cannot find device='' nor node-name='${node.nodeName}'`);
    const old = node.children.get('backing');
    if (backing) {
      const child = this.entries.get(backing.nodeName)!;
      child.users.add(this.parentUser(node, 'backing', node.readOnly, entry));
      node.children.set('backing', backing);
    } else {
      node.children.delete('backing');
    }
    if (node.driver.name === 'qcow2') qcow2SetBackingNode(node.state, backing);
    node.options.backing = backing ? backing.nodeName : null;
    if (old && old !== backing) {
      const oldEntry = this.entries.get(old.nodeName);
      if (oldEntry) {
        for (const user of oldEntry.users) if (user.parent === entry && user.role === 'backing') oldEntry.users.delete(user);
        if (!oldEntry.monitorOwned && oldEntry.users.size === 0) await this.closeEntry(oldEntry);
      }
    } else if (old && old === backing) {
      // Re-attached to the same node: keep one edge.
      const child = this.entries.get(backing.nodeName)!;
      const edges = [...child.users].filter((u) => u.parent === entry && u.role === 'backing');
      for (const extra of edges.slice(1)) child.users.delete(extra);
    }
  }

  /**
   * blockdev-reopen gives `node` another 'file' child (the caller checked `user` against the new
   * child's users and drains): the edges move, and an implicitly opened old child nobody uses any
   * more is closed, as QEMU drops its last reference. The driver's state is the caller's business.
   */
  async replaceFileChild(node: BlockNode, file: BlockNode, user: NodeUser): Promise<void> {
    const entry = this.entries.get(node.nodeName)!;
    const old = node.children.get('file');
    this.entries.get(file.nodeName)!.users.add({ ...user, parent: entry });
    node.children.set('file', file);
    const oldEntry = old && this.entries.get(old.nodeName);
    if (!oldEntry) return;
    for (const u of oldEntry.users) if (u.parent === entry && u.role === 'file') oldEntry.users.delete(u);
    if (!oldEntry.monitorOwned && oldEntry.users.size === 0) await this.closeEntry(oldEntry);
  }

  /** QEMU's bdrv_change_backing_file(): the image header names another backing file (qcow2). */
  async changeBackingFile(node: BlockNode, backingFile: string | undefined, backingFormat: string | undefined): Promise<void> {
    if (node.driver.name !== 'qcow2') return;
    const file = node.file;
    const wasReadOnly = file?.readOnly ?? false;
    if (file && wasReadOnly) await this.setReadOnly(file, false);
    try {
      await qcow2ChangeBackingFile(node.state, backingFile, backingFormat);
    } finally {
      if (file && wasReadOnly) await this.setReadOnly(file, true);
    }
  }

  /**
   * QEMU's bdrv_reopen_set_read_only() for a node and its implicitly opened file child. A file
   * opened read-only gets a read-write descriptor when it becomes writable.
   */
  async setReadOnly(node: BlockNode, readOnly: boolean): Promise<void> {
    if (node.readOnly === readOnly) return;
    if (readOnly) await node.flush();
    if (!readOnly && node.driver.name === 'file') reopenFileReadWrite(node);
    node.readOnly = readOnly;
    const file = node.file;
    const fileEntry = file && this.entries.get(file.nodeName);
    if (file && fileEntry && !fileEntry.monitorOwned) await this.setReadOnly(file, readOnly);
  }

  /**
   * QEMU's bdrv_replace_node(from, to): every parent of `from` (exports, parent nodes, jobs)
   * uses `to` from now on, except `to` itself when it is `from`'s parent (an overlay on top of it).
   *
   * Parents here hold BlockNode objects directly (export queues, NBD clients, parent drivers'
   * states), unlike QEMU's BdrvChild pointers. So the two objects trade identities: the object
   * everyone used now carries `to`'s name, driver and state, and the graph's own edges onto `to`
   * (and `to`'s edge onto `from`) are pointed at the right object again. Exports or other
   * backends on `to` itself cannot follow and are refused by the caller (snapshot: the overlay
   * must not be in use). The caller drains first; main-thread nodes only (no iothread replicas).
   */
  replaceNode(from: BlockNode, to: BlockNode): void {
    const eFrom = this.entries.get(from.nodeName)!;
    const eTo = this.entries.get(to.nodeName)!;
    const oFrom = from;
    const oTo = to;
    const stay = [...eFrom.users].filter((u) => u.parent === eTo);
    const movers = [...eFrom.users].filter((u) => u.parent !== eTo);
    const toParents = [...eTo.users].filter((u) => u.parent);
    // Swap every field (name, driver, options, children, state, counters).
    const a = oFrom as unknown as Record<string, unknown>;
    const b = oTo as unknown as Record<string, unknown>;
    for (const key of new Set([...Object.keys(a), ...Object.keys(b)])) {
      const t = a[key];
      a[key] = b[key];
      b[key] = t;
    }
    for (const [obj, other] of [[oFrom, oTo], [oTo, oFrom]] as const) {
      const st = obj.state as { node?: BlockNode } | undefined;
      if (st && typeof st === 'object' && st.node === other) st.node = obj;
    }
    eFrom.node = oTo;
    eTo.node = oFrom;
    // Parents of `to` kept their objects, which now carry `from`: point them at `to`'s object.
    for (const user of toParents) this.repoint(user.parent!.node, oTo, oFrom);
    // `to`'s own edge onto `from` now points at itself: point it at `from`'s object.
    for (const user of stay) this.repoint(user.parent!.node, oFrom, oTo);
    for (const user of movers) {
      eFrom.users.delete(user);
      eTo.users.add(user);
    }
  }

  /** One parent's child links (edges and driver state) from object `was` to object `now`. */
  private repoint(parent: BlockNode, was: BlockNode, now: BlockNode): void {
    for (const [role, child] of parent.children) {
      if (child !== was) continue;
      parent.children.set(role, now);
      if (role === 'backing' && parent.driver.name === 'qcow2') qcow2SetBackingNode(parent.state, now);
      else if (role !== 'backing') throw genericError(`Cannot move the '${role}' child of node '${parent.nodeName}'`);
    }
  }

  /** Is `node` reachable from `from` through child links (or the same node)? */
  reaches(from: BlockNode, node: BlockNode): boolean {
    if (from === node) return true;
    for (const child of from.children.values()) if (this.reaches(child, node)) return true;
    return false;
  }

  /** Registers an opened overlay's tree (blockdev-snapshot-sync opens it like blockdev-add). */
  async openOverlay(options: Record<string, any>): Promise<BlockNode> {
    const entry = await this.openTree(options, { readOnly: false });
    entry.monitorOwned = true;
    return entry.node;
  }

  /** Closes a node the monitor owns and nobody uses (a transaction undoing a snapshot-sync). */
  async closeUnused(node: BlockNode): Promise<void> {
    const entry = this.entries.get(node.nodeName);
    if (entry && entry.users.size === 0) await this.closeEntry(entry);
  }

  /**
   * QEMU's bdrv_refresh_filename, simplified: a plain name when options add nothing, else json:.
   * `backing` appears only when overridden: the backing node's options, or null for none.
   */
  static fullOptions(node: BlockNode, toJson?: (value: unknown) => string): Record<string, unknown> {
    const out: Record<string, unknown> = { driver: node.driver.name, ...strongOptions(node) };
    const file = node.file;
    if (file) out[fileChildName(node)] = BlockGraph.fullOptions(file, toJson);
    if (toJson && backingOverridden(node, toJson)) {
      let backing = viewBacking(node);
      if (backing && implicitFilters.has(backing)) backing = node.backing;
      out.backing = backing ? BlockGraph.fullOptions(backing, toJson) : null;
    } else if (node.driver.isFilter && !file && node.backing) {
      // A job's filter over a backing child (commit_top, mirror_top) names it.
      out.backing = BlockGraph.fullOptions(node.backing, toJson);
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
  if (node.driver.filename) return node.driver.filename(node, toJson);
  const extra = Object.keys(strongOptions(node)).filter((k) => k !== 'filename');
  if (driver === 'blkdebug' && node.file) {
    // QEMU's blkdebug_refresh_filename: "blkdebug:<config>:<image>" when nothing else is set.
    const image = nodeFilename(node.file, toJson);
    if (extra.every((k) => k === 'image' || k === 'config') && !image.startsWith('json:')) {
      return `blkdebug:${node.options.config ?? ''}:${image}`;
    }
  }
  if (node.driver.isProtocol) {
    if (extra.length === 0) return `${driver}://`;
  } else if (extra.length === 0 && node.file && !backingOverridden(node, toJson) && driver !== 'copy-on-read') {
    // (QEMU's copy-on-read never takes its child's name: it shows as json: with its child.)
    // Only a protocol child's exact name carries over: reopening it must rebuild the same tree.
    // (QEMU's blkdebug is a protocol driver: it opens its image itself.)
    const name = nodeFilename(node.file, toJson);
    if (!name.startsWith('json:') && (node.file.driver.isProtocol || node.file.driver.name === 'blkdebug' || STRONG_OPTIONS[driver] === undefined)) return name;
  } else if (extra.length === 0 && node.driver.isFilter && node.backing) {
    // A job's filter over a backing child (commit_top, mirror_top) shows its child's name.
    return nodeFilename(node.backing, toJson);
  }
  return `json:${toJson(BlockGraph.fullOptions(node, toJson))}`;
}
