// Internal snapshot commands (blockdev-snapshot-internal-sync, its transaction action, blockdev-snapshot-delete-internal-sync) and x-blockdev-amend.
import type { CommandContext, CommandHandler } from './types.js';
import { genericError } from '../../qapi/errors.js';
import type { BlockNode } from '../../block/node.js';
import { strerror } from '../../util/errno.js';
import { qcow2SnapshotCreate, qcow2SnapshotDelete, qcow2SnapshotFind, type Qcow2State } from '../../block/qcow2/index.js';
import { registerTransactionAction, type TransactionActionImpl } from './block-jobs.js';
import type { Daemon } from '../../daemon.js';

/** QEMU's qmp_get_root_bs(): a node by name, which must have no parent. */
function rootNode(daemon: Daemon, name: string): BlockNode {
  const node = daemon.graph.lookup(name);
  if (!node) throw genericError(`Cannot find device='${name}' nor node-name='${name}'`);
  if (!daemon.graph.isRoot(node)) throw genericError('Need a root block node');
  return node;
}

/**
 * The node whose driver holds the snapshots (QEMU's bdrv_snapshot_fallback): the node itself if it
 * is qcow2, else its primary child when that is its only data child; undefined if none.
 * `writable`: QEMU's bdrv_can_snapshot also wants each level writable.
 */
function snapshotNode(node: BlockNode, writable: boolean): BlockNode | undefined {
  for (let n: BlockNode | undefined = node; n; ) {
    if (writable && n.readOnly) return undefined;
    if (n.driver.name === 'qcow2') return n;
    const others: Array<[string, BlockNode]> = [...n.children.entries()].filter(([role]) => role !== 'backing');
    n = others.length === 1 ? others[0]![1] : undefined;
  }
  return undefined;
}

/** gettimeofday(): QEMU stamps a snapshot's date and (in the daemon, without a VM) its VM clock with it. */
function now(): { dateSec: number; dateNsec: number; vmClockNsec: bigint } {
  const us = Math.floor((performance.timeOrigin + performance.now()) * 1000);
  const dateSec = Math.floor(us / 1e6);
  const dateNsec = (us % 1e6) * 1000;
  return { dateSec, dateNsec, vmClockNsec: BigInt(dateSec) * 1000000000n + BigInt(dateNsec) };
}

/** QEMU's internal_snapshot_prepare/abort: the action of blockdev-snapshot-internal-sync. */
function internalSnapshot(data: { device: string; name: string }, { daemon }: CommandContext, mode: string): TransactionActionImpl {
  let created: { node: BlockNode; id: string; name: string } | undefined;
  return {
    async prepare() {
      const { device, name } = data;
      if (mode !== 'individual') {
        throw genericError(`Action 'blockdev-snapshot-internal-sync' does not support Transaction property completion-mode = ${mode}`);
      }
      const bs = rootNode(daemon, device);
      daemon.graph.checkOp(bs, 'external-snapshot');
      if (bs.readOnly) throw genericError(`Device '${device}' is read only`);
      const target = snapshotNode(bs, true);
      if (!target) {
        throw genericError(`Block format '${bs.driver.name}' used by device '${device}' does not support internal snapshots`);
      }
      if (name === '') throw genericError('Name is empty');
      const state = target.state as Qcow2State;
      if (qcow2SnapshotFind(state, undefined, name)) {
        throw genericError(`Snapshot with name '${name}' already exists on device '${device}'`);
      }
      let info: Record<string, unknown>;
      try {
        info = await daemon.exports.drained(bs, () => qcow2SnapshotCreate(state, { name, ...now() }));
      } catch (e) {
        throw genericError(`Failed to create snapshot '${name}' on device '${device}': ${strerror(e)}`);
      }
      created = { node: target, id: info.id as string, name };
    },
    async abort() {
      if (created === undefined) return;
      const { node, id, name } = created;
      try {
        await daemon.exports.drained(node, () => qcow2SnapshotDelete(node.state as Qcow2State, id, name));
      } catch (e) {
        process.stderr.write(`Failed to delete snapshot with id '${id}' and name '${name}' on device '${data.device}' in abort: ` +
          `${(e as Error).message}\n`);
      }
    },
  };
}

registerTransactionAction('blockdev-snapshot-internal-sync', (data, ctx, mode) => internalSnapshot(data, ctx, mode));

/** QEMU's bdrv_co_amend implementations: qcow2 (encryption only) and luks. */
const AMEND_DRIVERS = new Set(['qcow2', 'luks']);

export const blockSnapshotInternalCommands: Record<string, CommandHandler> = {
  async 'blockdev-snapshot-internal-sync'(args: { device: string; name: string }, ctx) {
    // QEMU runs it as a one-action transaction.
    const action = internalSnapshot(args, ctx, 'individual');
    try {
      await action.prepare();
    } catch (e) {
      await action.abort?.();
      throw e;
    }
    return {};
  },

  async 'blockdev-snapshot-delete-internal-sync'(args: { device: string; id?: string; name?: string }, { daemon }) {
    const { device, id, name } = args;
    const bs = rootNode(daemon, device);
    if (id === undefined && name === undefined) throw genericError('Name or id must be provided');
    daemon.graph.checkOp(bs, 'external-snapshot');
    const target = snapshotNode(bs, false);
    if (!target) throw genericError('Failed to get a snapshot list: Operation not supported');
    const state = target.state as Qcow2State;
    if (!qcow2SnapshotFind(state, id, name)) {
      throw genericError(`Snapshot with id '${id ?? 'null'}' and name '${name ?? 'null'}' does not exist on device '${device}'`);
    }
    try {
      return await daemon.exports.drained(bs, () => qcow2SnapshotDelete(state, id, name));
    } catch (e) {
      const errno = (e as { errno?: number }).errno;
      throw genericError(errno !== undefined ? `${(e as Error).message}: ${strerror(errno)}` : (e as Error).message);
    }
  },

  'x-blockdev-amend'(args: { 'job-id': string; 'node-name': string; options: Record<string, any>; force?: boolean }, { daemon }) {
    const { 'job-id': jobId, 'node-name': nodeName, options } = args;
    const bs = daemon.graph.lookup(nodeName);
    if (!bs) throw genericError(`Cannot find device='' nor node-name='${nodeName}'`);
    if (bs.driver.name !== options.driver) throw genericError("x-blockdev-amend doesn't support changing the block driver");
    if (!AMEND_DRIVERS.has(bs.driver.name)) throw genericError('Driver does not support x-blockdev-amend');
    const job = daemon.jobs.create(jobId, 'amend');
    void job.run(async () => {
      if (bs.driver.name === 'qcow2') {
        // qsd-ts opens no encrypted qcow2 image, and encryption is all 7.2 can amend in qcow2.
        if (options.encrypt !== undefined) throw genericError("image is not encrypted, can't amend");
        return;
      }
      throw genericError('Amending LUKS keyslots is not supported by qsd-ts');
    });
    return {};
  },
};
