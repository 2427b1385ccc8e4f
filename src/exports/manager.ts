// The generic half of every export (QEMU's blk_exp_add/del): ids, node lookup, writability,
// iothreads, permissions, reference counting and BLOCK_EXPORT_DELETED.
import type { BlockExport, BlockExportDriver, ExportCommon } from './export.js';
import { findExportDriver } from './registry.js';
import { genericError, QmpError } from '../qapi/errors.js';
import { ALL_PERMS, idWellformed, type BlockGraph, type NodeUser, type Permission } from '../block/graph.js';
import type { BlockNode } from '../block/node.js';
import type { IoContext } from '../iothread/context.js';
import { mainContext } from '../iothread/main-context.js';
import { nodeIothread } from '../iothread/node-iothread.js';

interface ExportEntry {
  exp: BlockExport;
  driver: BlockExportDriver<any>;
  type: string;
  /** The user still holds its reference (QEMU's user_owned); false once shutting down. */
  userOwned: boolean;
  backend: NodeUser;
  deleted: Promise<void>;
  resolveDeleted: () => void;
}

export interface ExportHost {
  graph: BlockGraph;
  iothread(id: string): IoContext | undefined;
  emitEvent(name: string, data: Record<string, unknown>): void;
}

export class ExportManager {
  /** Newest first, as query-block-exports lists them. */
  private readonly exports: ExportEntry[] = [];

  constructor(private readonly host: ExportHost) {}

  find(id: string): ExportEntry | undefined {
    return this.exports.find((e) => e.exp.common.id === id);
  }

  /** block-export-add / --export, with QEMU's checks in QEMU's order. */
  async add(options: Record<string, any>): Promise<BlockExport> {
    const { id, type, 'node-name': nodeName, iothread } = options;
    const multithread = Array.isArray(iothread);
    if (options['fixed-iothread'] && multithread) {
      throw genericError('Cannot use fixed-iothread for a multi-threaded export');
    }
    if (!idWellformed(id)) throw genericError('Invalid block export id');
    if (this.find(id)) throw genericError(`Block export id '${id}' is already in use`);
    const driver = findExportDriver(type);
    if (!driver) throw genericError('No driver found for the requested export type');
    const node = this.host.graph.lookup(nodeName);
    if (!node) throw genericError(`Cannot find device='' nor node-name='${nodeName}'`);
    const writable: boolean = options.writable ?? false;
    if (writable && node.readOnly) throw genericError('Cannot export read-only node as writable');

    let contexts: IoContext[] = [mainContext];
    // Without an iothread of its own, an export runs where x-blockdev-set-iothread put its node.
    const nodeContext = iothread === undefined ? nodeIothread(node) : undefined;
    const nodeCtx = nodeContext !== undefined ? this.host.iothread(nodeContext) : undefined;
    if (nodeCtx) contexts = [nodeCtx];
    if (typeof iothread === 'string') {
      const ctx = this.host.iothread(iothread);
      if (!ctx) throw genericError(`iothread "${iothread}" not found`);
      contexts = [ctx];
    } else if (multithread) {
      if (iothread.length === 0) throw genericError('The set of I/O threads must not be empty');
      contexts = iothread.map((name: string) => {
        const ctx = this.host.iothread(name);
        if (!ctx) throw genericError(`iothread "${name}" not found`);
        return ctx;
      });
      if (!driver.supportsMultithread) throw genericError(`${driver.displayName} export does not support multi-threading`);
    }

    const perms: Permission[] = ['consistent read'];
    if (writable) perms.push('write');
    if (type === 'fuse' && (writable || options.growable)) perms.push('resize');
    const shared = ALL_PERMS.filter((p) => !driver.unsharedPerms?.includes(p));
    const backend = this.host.graph.attachBackend(node, `export '${id}'`, perms, shared);
    const common: ExportCommon = {
      id, nodeName, node, writable, writethrough: options.writethrough ?? false, contexts, multithread,
    };
    let exp: BlockExport;
    try {
      exp = await driver.create(common, options);
    } catch (err) {
      this.host.graph.detachBackend(node, backend);
      throw err;
    }
    let resolveDeleted!: () => void;
    const deleted = new Promise<void>((resolve) => (resolveDeleted = resolve));
    this.exports.unshift({ exp, driver, type, userOwned: true, backend, deleted, resolveDeleted });
    return exp;
  }

  /** block-export-del. Resolves once the export is gone and BLOCK_EXPORT_DELETED was emitted. */
  async del(id: string, mode: 'safe' | 'hard' = 'safe'): Promise<void> {
    const entry = this.find(id);
    if (!entry) throw genericError(`Export '${id}' is not found`);
    if (!entry.userOwned) throw genericError(`Export '${id}' is already shutting down`);
    if (mode === 'safe' && (entry.exp.clientCount?.() ?? 0) > 0) {
      throw new QmpError('GenericError', `export '${id}' still in use`, "Use mode='hard' to force client disconnect\n");
    }
    await this.shutdown(entry);
  }

  private async shutdown(entry: ExportEntry): Promise<void> {
    if (!entry.userOwned) return entry.deleted;
    entry.userOwned = false;
    entry.driver.requestShutdown(entry.exp);
    try {
      await entry.driver.delete(entry.exp);
    } finally {
      const index = this.exports.indexOf(entry);
      if (index >= 0) this.exports.splice(index, 1);
      this.host.graph.detachBackend(entry.exp.common.node, entry.backend);
      this.host.emitEvent('BLOCK_EXPORT_DELETED', { id: entry.exp.common.id });
      entry.resolveDeleted();
    }
  }

  /** query-block-exports: QEMU's members, plus per-queue figures for multi-queue FUSE exports. */
  async query(): Promise<Record<string, unknown>[]> {
    const out: Record<string, unknown>[] = [];
    const graph = this.host.graph.list();
    for (const entry of this.exports) {
      // The node the export's backend hangs on: a running job's filter (mirror_top,
      // copy-before-write, copy-on-read) takes it over, as QEMU's BlockBackend moves onto it.
      const holder = graph.find((g) => g.users.has(entry.backend))?.node;
      const info: Record<string, unknown> = {
        id: entry.exp.common.id,
        type: entry.type,
        // The node's current name: a snapshot or an active commit moves the export to another node.
        'node-name': (holder ?? entry.exp.common.node).nodeName,
        'shutting-down': !entry.userOwned,
      };
      if (entry.exp.common.multithread && entry.exp.queryInfo) Object.assign(info, await entry.exp.queryInfo());
      out.push(info);
    }
    return out;
  }

  /** Exports of one type (nbd-server-stop closes the NBD ones). */
  async closeAllOfType(type: string): Promise<void> {
    await Promise.all(this.exports.filter((e) => e.type === type).map((e) => this.shutdown(e)));
  }

  /** Exit: every export, one BLOCK_EXPORT_DELETED each, oldest first as QEMU's daemon emits them. */
  async closeAll(): Promise<void> {
    for (const entry of [...this.exports].reverse()) await this.shutdown(entry);
  }

  /** Exports on any of these nodes (for drained sections on graph changes). */
  usersOf(nodes: Set<BlockNode>): ExportEntry[] {
    return this.exports.filter((e) => nodes.has(e.exp.common.node));
  }

  /**
   * A drained section: every export queue on `node` or a parent of it stops taking requests and
   * has none in flight while fn runs; they resume afterwards, also when fn fails.
   */
  async drained<T>(node: BlockNode, fn: () => Promise<T>): Promise<T> {
    const affected = this.usersOf(this.host.graph.ancestors(node)).filter((e) => e.driver.drainBegin);
    await Promise.all(affected.map((e) => e.driver.drainBegin!(e.exp)));
    try {
      return await fn();
    } finally {
      await Promise.all(affected.map((e) => e.driver.drainEnd?.(e.exp)));
    }
  }

  get size(): number {
    return this.exports.length;
  }

  /** Iothreads some export runs in (they cannot be deleted). */
  usesIothread(id: string): boolean {
    return this.exports.some((e) => e.exp.common.contexts.some((c) => c.iothreadId === id));
  }
}
