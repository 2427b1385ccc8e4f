// Snapshots and chain-editing commands (blockdev-snapshot(-sync), block-stream, block-commit,
// transaction) and the block-job-* commands, with QEMU 7.2's checks in QEMU's order.
//
// Exports in iothreads serve replicas of their node's stack, which cannot be re-opened on another
// node from here: a snapshot or an active commit under such an export is refused (see
// assertMovable); main-thread exports follow the graph change (BlockGraph.replaceNode).
import fs from 'node:fs';
import type { CommandContext, CommandHandler } from './types.js';
import { genericError, QmpError } from '../../qapi/errors.js';
import { BlockNode } from '../../block/node.js';
import { nodeFilename } from '../../block/graph.js';
import { findBlockDriver } from '../../block/registry.js';
import { qcow2Create } from '../../block/qcow2/index.js';
import { formatQmpJson } from '../json.js';
import { strerror } from '../../util/errno.js';
import { BlockJob } from '../../jobs/block-job.js';
import { setupCommit } from '../../jobs/commit.js';
import { setupStream } from '../../jobs/stream.js';
import { abandonBackup, setupBackup, type BackupSync, type BitmapSyncMode } from '../../jobs/backup.js';
import { setupMirror, type MirrorParams, type MirrorSync } from '../../jobs/mirror.js';
import { JobFilter } from '../../jobs/job-filter.js';
import type { BlockJobHooks } from '../../jobs/block-job.js';
import { findDirtyBitmap, type DirtyBitmap } from '../../block/dirty-bitmap.js';
import { blockDirtyBitmapCommands, checkBitmap, lookupBitmap, BITMAP_CHECK_ALLOW_RO, BITMAP_CHECK_DEFAULT } from './block-dirty-bitmap.js';
import type { Daemon } from '../../daemon.js';

const jsonFilename = (value: unknown) => formatQmpJson(value);

// ---------------------------------------------------------------- helpers

/** QEMU's bdrv_lookup_bs(device, node_name): qsd has no named devices, so only node names match. */
function lookupBs(daemon: Daemon, device: string | undefined, nodeName: string | undefined): BlockNode {
  const node = nodeName !== undefined ? daemon.graph.lookup(nodeName) : undefined;
  if (!node) throw genericError(`Cannot find device='${device ?? ''}' nor node-name='${nodeName ?? ''}'`);
  return node;
}

/** QEMU's bdrv_chain_contains(top, node). */
function chainContains(top: BlockNode, node: BlockNode): boolean {
  for (let n: BlockNode | undefined = top; n; n = n.backing) if (n === node) return true;
  return false;
}

/** QEMU's bdrv_find_backing_image(): a node below `bs` by the filename its parent names it by. */
function findBackingImage(bs: BlockNode, filename: string): BlockNode | undefined {
  const real = (p: string) => { try { return fs.realpathSync(p); } catch { return undefined; } };
  const wanted = real(filename);
  for (let n = bs.backing; n; n = n.backing) {
    const name = nodeFilename(n, jsonFilename);
    if (name === filename || (wanted !== undefined && real(name) === wanted)) return n;
  }
  return undefined;
}

/** Exports in iothreads hold replicas that cannot follow a node replacement: refuse. */
function assertMovable(daemon: Daemon, node: BlockNode): void {
  for (const e of daemon.exports.usersOf(daemon.graph.ancestors(node))) {
    const ctx = e.exp.common.contexts.find((c) => c.iothreadId !== undefined);
    if (ctx) {
      throw genericError(`Cannot change the graph under export '${e.exp.common.id}': it runs in iothread ` +
        `'${ctx.iothreadId}' (qsd-ts cannot move an iothread export to another node)`);
    }
  }
}

/** Job options common to stream and commit. */
function jobOptions(args: { speed?: number; 'auto-finalize'?: boolean; 'auto-dismiss'?: boolean }) {
  return { speed: 0, autoFinalize: args['auto-finalize'] ?? true, autoDismiss: args['auto-dismiss'] ?? true };
}

/** QEMU's block_job_create(): the id (a missing one is the node's device name: '' here), then the speed. */
function createBlockJob(daemon: Daemon, jobId: string | undefined, type: string, args: Parameters<typeof jobOptions>[0]): BlockJob {
  const job = daemon.jobs.register(jobId ?? '', (id) => new BlockJob(id, type, daemon.jobs, jobOptions(args)));
  try {
    job.setSpeed(args.speed ?? 0);
  } catch (err) {
    job.earlyFail();
    throw err;
  }
  return job;
}

// ---------------------------------------------------------------- transaction actions

/** One transaction action: QEMU's BlkActionOps (prepare, then commit all or abort all). */
export interface TransactionActionImpl {
  prepare(): Promise<void>;
  commit?(): Promise<void>;
  abort?(): Promise<void>;
  clean?(): Promise<void>;
}

/** Builds an action from its 'data' and the transaction's completion mode. */
export type TransactionActionFactory = (data: any, ctx: CommandContext, completionMode: string) => TransactionActionImpl;

/** Action table of 'transaction', by TransactionActionKind; other modules add theirs with registerTransactionAction. */
export const transactionActions = new Map<string, TransactionActionFactory>();

export function registerTransactionAction(kind: string, factory: TransactionActionFactory): void {
  transactionActions.set(kind, factory);
}

/** QEMU's action_check_completion_mode(): these actions only support 'individual'. */
function checkCompletionMode(kind: string, mode: string): void {
  if (mode !== 'individual') {
    throw genericError(`Action '${kind}' does not support Transaction property completion-mode = ${mode}`);
  }
}

/** QEMU's external_snapshot_prepare/commit/abort for blockdev-snapshot and blockdev-snapshot-sync. */
function externalSnapshot(kind: 'blockdev-snapshot' | 'blockdev-snapshot-sync', data: any, { daemon }: CommandContext, mode: string): TransactionActionImpl {
  const { graph } = daemon;
  let oldName: string | undefined;
  let overlayName: string | undefined;
  let created = false;
  let appended = false;
  return {
    async prepare() {
      checkCompletionMode(kind, mode);
      const old = kind === 'blockdev-snapshot' ? lookupBs(daemon, data.node, data.node) : lookupBs(daemon, data.device, data['node-name']);
      oldName = old.nodeName;
      graph.checkOp(old, 'external-snapshot');
      if (!old.readOnly) await old.flush().catch(() => { throw genericError('Input/output error'); });
      let overlay: BlockNode;
      if (kind === 'blockdev-snapshot-sync') {
        const format: string = data.format ?? 'qcow2';
        const snapName: string | undefined = data['snapshot-node-name'];
        if (data['node-name'] !== undefined && snapName === undefined) throw genericError('New overlay node-name missing');
        if (snapName !== undefined && graph.lookup(snapName)) throw genericError('New overlay node-name already in use');
        const filename: string = data['snapshot-file'];
        if ((data.mode ?? 'absolute-paths') !== 'existing') {
          await createImage(filename, format, old.getLength(), { file: nodeFilename(old, jsonFilename), fmt: old.driver.name });
        }
        const options: Record<string, any> = { driver: format, file: { driver: 'file', filename }, backing: null };
        if (snapName !== undefined) options['node-name'] = snapName;
        overlay = await graph.openOverlay(options);
        created = true;
      } else {
        overlay = lookupBs(daemon, data.overlay, data.overlay);
      }
      overlayName = overlay.nodeName;
      if (graph.usersOf(overlay).some((u) => u.perms.has('consistent read'))) throw genericError('The overlay is already in use');
      if (overlay.backing) throw genericError('The overlay already has a backing image');
      if (overlay.driver.name !== 'qcow2') throw genericError('The overlay does not support backing images');
      if (graph.reaches(old, overlay)) {
        throw genericError(`Making '${old.nodeName}' a backing child of '${overlay.nodeName}' would create a cycle`);
      }
      assertMovable(daemon, old);
      // QEMU's bdrv_append(): the overlay backs onto old, and old's parents move to the overlay.
      await daemon.exports.drained(old, async () => {
        await graph.setBacking(overlay, old);
        graph.replaceNode(old, overlay);
      });
      appended = true;
    },
    async commit() {
      // The old active layer is read-only from now on.
      const old = oldName !== undefined ? graph.lookup(oldName) : undefined;
      if (old) await graph.setReadOnly(old, true);
      // QEMU holds a snapshot-sync overlay only through old's parents: with none, it is dropped again.
      const overlay = overlayName !== undefined ? graph.lookup(overlayName) : undefined;
      if (created && overlay && graph.usersOf(overlay).length === 0) await graph.closeUnused(overlay);
    },
    async abort() {
      const old = oldName !== undefined ? graph.lookup(oldName) : undefined;
      const overlay = overlayName !== undefined ? graph.lookup(overlayName) : undefined;
      if (appended && old && overlay) {
        await daemon.exports.drained(overlay, async () => {
          graph.replaceNode(overlay, old);
          await graph.setBacking(graph.lookup(overlayName!)!, undefined);
        });
      }
      if (created && overlay) await graph.closeUnused(graph.lookup(overlayName!) ?? overlay);
    },
  };
}

registerTransactionAction('blockdev-snapshot', (data, ctx, mode) => externalSnapshot('blockdev-snapshot', data, ctx, mode));
registerTransactionAction('blockdev-snapshot-sync', (data, ctx, mode) => externalSnapshot('blockdev-snapshot-sync', data, ctx, mode));
// QEMU 7.2's abort action refuses under any completion mode (it never checks 'grouped').
registerTransactionAction('abort', () => ({
  async prepare() {
    throw genericError('Transaction aborted using Abort action');
  },
}));

// ---------------------------------------------------------------- backup

interface BackupArgs {
  'job-id'?: string; device: string; target: string; sync: string; speed?: number; bitmap?: string;
  'bitmap-mode'?: BitmapSyncMode; compress?: boolean; 'auto-finalize'?: boolean; 'auto-dismiss'?: boolean;
  format?: string; mode?: string; 'filter-node-name'?: string;
  'x-perf'?: { 'use-copy-range'?: boolean; 'max-workers'?: number; 'max-chunk'?: number };
}

/** Exports in iothreads write through replicas that cannot copy before writing: refuse. */
function assertMainLoopWriters(daemon: Daemon, node: BlockNode): void {
  for (const e of daemon.exports.usersOf(daemon.graph.ancestors(node))) {
    const ctx = e.exp.common.contexts.find((c) => c.iothreadId !== undefined);
    if (ctx) {
      throw genericError(`Cannot back up node '${node.nodeName}' under export '${e.exp.common.id}': it runs in iothread ` +
        `'${ctx.iothreadId}' (qsd-ts copies before writes in the main loop only)`);
    }
  }
}

/** Creates a new image (QEMU's bdrv_img_create) for snapshot-sync, drive-backup and drive-mirror: raw or qcow2, with an optional backing file. */
async function createImage(filename: string, format: string, size: number, backing?: { file: string; fmt: string }): Promise<void> {
  const drv = findBlockDriver(format);
  if (!drv || drv.isProtocol) throw genericError(`Unknown file format '${format}'`);
  if (backing && format !== 'qcow2') throw genericError(`Backing file not supported for file format '${format}'`);
  if (format !== 'qcow2' && format !== 'raw') throw genericError(`Format driver '${format}' does not support image creation`);
  // bdrv_img_create is not quiet here: QEMU's daemon prints this on its stdout.
  const opts = format === 'raw'
    ? `size=${size}`
    : `cluster_size=65536 extended_l2=off compression_type=zlib size=${size}` +
      (backing ? ` backing_file=${backing.file} backing_fmt=${backing.fmt}` : '') + ' lazy_refcounts=off refcount_bits=16';
  process.stdout.write(`Formatting '${filename}', fmt=${format} ${opts}\n`);
  let fd: number;
  try {
    fd = fs.openSync(filename, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_TRUNC, 0o644);
  } catch (err) {
    throw genericError(`Could not create '${filename}': ${strerror(err)}`);
  }
  if (format === 'raw') {
    fs.ftruncateSync(fd, size);
    fs.closeSync(fd);
    return;
  }
  fs.closeSync(fd);
  const fileDriver = findBlockDriver('file')!;
  const options = { driver: 'file', filename };
  const file = new BlockNode({ nodeName: '', driver: fileDriver, readOnly: false, options });
  file.state = await fileDriver.open(file, options);
  try {
    await qcow2Create(file, backing ? { size, 'backing-file': backing.file, 'backing-fmt': backing.fmt } : { size });
  } catch (err) {
    throw err instanceof QmpError ? new QmpError(err.errorClass, `${filename}: ${err.message}`) : err;
  } finally {
    await fileDriver.close(file.state);
  }
}

/** drive-backup's target: create it unless mode is 'existing', then open it as an anonymous node. */
async function openDriveBackupTarget(daemon: Daemon, bs: BlockNode, args: BackupArgs): Promise<BlockNode> {
  const mode = args.mode ?? 'absolute-paths';
  let format = args.format ?? (mode === 'existing' ? undefined : bs.driver.name);
  daemon.graph.checkOp(bs, 'commit-target');
  let source: BlockNode | undefined;
  if (args.sync === 'top') source = bs.backing;
  if (args.sync === 'none') source = bs;
  if (mode !== 'existing') {
    await createImage(args.target, format!, bs.getLength(),
      source ? { file: nodeFilename(source, jsonFilename), fmt: source.driver.name } : undefined);
  }
  if (format === undefined) {
    let magic = Buffer.alloc(4);
    try {
      const fd = fs.openSync(args.target, 'r');
      fs.readSync(fd, magic, 0, 4, 0);
      fs.closeSync(fd);
    } catch (err) {
      throw genericError(`Could not open '${args.target}': ${strerror(err)}`);
    }
    format = magic.toString('latin1') === 'QFI\xfb' ? 'qcow2' : 'raw';
    magic = Buffer.alloc(0);
  }
  const options: Record<string, any> = { driver: format, file: { driver: 'file', filename: args.target }, discard: 'unmap' };
  if (format === 'qcow2') options.backing = null;
  return daemon.graph.openOverlay(options);
}

/** QEMU's do_backup_common() and backup_job_create(): checks in QEMU's order, then the job ('created'). */
function createBackup(daemon: Daemon, bs: BlockNode, target: BlockNode, args: BackupArgs): { job: BlockJob; hooks: BlockJobHooks } {
  let sync = args.sync;
  let mode = args['bitmap-mode'];
  if ((sync === 'bitmap' || sync === 'incremental') && args.bitmap === undefined) {
    throw genericError(`must provide a valid bitmap name for '${sync}' sync mode`);
  }
  if (sync === 'incremental') {
    if (mode !== undefined && mode !== 'on-success') {
      throw genericError(`Bitmap sync mode must be 'on-success' when using sync mode 'incremental'`);
    }
    sync = 'bitmap';
    mode = 'on-success';
  }
  let bitmap: DirtyBitmap | undefined;
  if (args.bitmap !== undefined) {
    bitmap = findDirtyBitmap(bs, args.bitmap);
    if (!bitmap) throw genericError(`Bitmap '${args.bitmap}' could not be found`);
    if (mode === undefined) throw genericError('Bitmap sync mode must be given when providing a bitmap');
    checkBitmap(bitmap, BITMAP_CHECK_ALLOW_RO);
    if (sync === 'none') throw genericError(`sync mode '${sync}' does not produce meaningful bitmap outputs`);
    if (mode === 'never' && sync !== 'bitmap') {
      throw genericError(`Bitmap sync mode '${mode}' has no meaningful effect when combined with sync mode '${sync}'`);
    }
  }
  if (args.bitmap === undefined && mode !== undefined) throw genericError('Cannot specify bitmap sync mode without a bitmap');
  if (bs === target) throw genericError('Source and target cannot be the same');
  // qsd-ts writes a qcow2 target uncompressed; formats without compressed writes refuse as QEMU does.
  if (args.compress && target.driver.name !== 'qcow2') throw genericError('Compression is not supported for this drive ');
  daemon.graph.checkOp(bs, 'commit-target');
  daemon.graph.checkOp(target, 'commit-target');
  // x-perf only tunes QEMU's copy workers; qsd-ts checks its bounds at QEMU's point and ignores it.
  const { 'max-workers': maxWorkers = 64, 'max-chunk': maxChunk = 0 } = args['x-perf'] ?? {};
  if (maxWorkers < 1 || maxWorkers > 2147483647) throw genericError('max-workers must be between 1 and 2147483647');
  if (maxChunk < 0) throw genericError('max-chunk must be zero (which means no limit) or positive');
  if (bitmap && mode !== 'never') checkBitmap(bitmap, BITMAP_CHECK_DEFAULT);
  if (bs.getLength() !== target.getLength()) throw genericError('Source and target image have different sizes');
  assertMainLoopWriters(daemon, bs);
  JobFilter.checkName(daemon.graph, args['filter-node-name'], true);
  const job = createBlockJob(daemon, args['job-id'], 'backup', args);
  let hooks: BlockJobHooks;
  try {
    hooks = setupBackup(daemon, job, {
      source: bs, target, sync: sync as BackupSync, bitmap, bitmapMode: mode, filterNodeName: args['filter-node-name'],
    });
  } catch (err) {
    job.earlyFail();
    throw err;
  }
  return { job, hooks };
}

/** QEMU's blockdev_backup_prepare/drive_backup_prepare: the job starts on commit, is dropped on abort. */
function backupAction(kind: 'blockdev-backup' | 'drive-backup', data: BackupArgs, { daemon }: CommandContext): TransactionActionImpl {
  let created: { job: BlockJob; hooks: BlockJobHooks } | undefined;
  let driveTarget: BlockNode | undefined;
  return {
    async prepare() {
      const bs = lookupBs(daemon, data.device, data.device);
      let target: BlockNode;
      if (kind === 'blockdev-backup') {
        target = lookupBs(daemon, data.target, data.target);
      } else {
        target = driveTarget = await openDriveBackupTarget(daemon, bs, data);
      }
      created = createBackup(daemon, bs, target, data);
    },
    async commit() {
      if (!created) return;
      const { job, hooks } = created;
      const t = driveTarget;
      void job.start(t ? { ...hooks, clean: async (j) => { await hooks.clean?.(j); await daemon.graph.closeUnused(t); } } : hooks);
    },
    async abort() {
      if (created) {
        const { job, hooks } = created;
        job.transition('aborting');
        await abandonBackup(hooks, job);
        job.transition('concluded');
        daemon.jobs.remove(job);
      }
      if (driveTarget) await daemon.graph.closeUnused(driveTarget);
    },
  };
}

registerTransactionAction('blockdev-backup', (data, ctx) => backupAction('blockdev-backup', data, ctx));
registerTransactionAction('drive-backup', (data, ctx) => backupAction('drive-backup', data, ctx));

// ---------------------------------------------------------------- dirty bitmap actions

/** The bitmap commands as transaction actions (QEMU's block_dirty_bitmap_*_prepare/abort). */
function bitmapAction(kind: string, data: any, ctx: CommandContext, completionMode: string): TransactionActionImpl {
  const { daemon } = ctx;
  let undo: (() => void) | undefined;
  let commit: (() => void) | undefined;
  return {
    async prepare() {
      checkCompletionMode(kind, completionMode);
      switch (kind) {
        case 'block-dirty-bitmap-add':
          await blockDirtyBitmapCommands['block-dirty-bitmap-add']!(data, ctx);
          undo = () => findDirtyBitmap(daemon.graph.lookup(data.node)!, data.name)?.release();
          break;
        case 'block-dirty-bitmap-remove': {
          // Removed on commit; until then it is busy and disabled (QEMU's remove_prepare).
          const b = lookupBitmap(daemon, data.node, data.name);
          checkBitmap(b, BITMAP_CHECK_DEFAULT);
          const was = b.recording;
          b.setEnabled(false);
          b.busy = true;
          undo = () => { b.busy = false; b.setEnabled(was); };
          commit = () => { b.busy = false; b.release(); };
          break;
        }
        case 'block-dirty-bitmap-clear': {
          const b = lookupBitmap(daemon, data.node, data.name);
          checkBitmap(b, BITMAP_CHECK_DEFAULT);
          const bits = b.snapshot();
          b.clear();
          undo = () => b.restore(bits);
          break;
        }
        case 'block-dirty-bitmap-enable':
        case 'block-dirty-bitmap-disable': {
          const b = lookupBitmap(daemon, data.node, data.name);
          checkBitmap(b, BITMAP_CHECK_ALLOW_RO);
          const was = b.recording;
          b.setEnabled(kind === 'block-dirty-bitmap-enable');
          undo = () => b.setEnabled(was);
          break;
        }
        case 'block-dirty-bitmap-merge': {
          const b = lookupBitmap(daemon, data.node, data.target);
          const bits = b.snapshot();
          await blockDirtyBitmapCommands['block-dirty-bitmap-merge']!(data, ctx);
          undo = () => b.restore(bits);
          break;
        }
      }
    },
    async commit() {
      commit?.();
    },
    async abort() {
      undo?.();
    },
  };
}

for (const kind of ['block-dirty-bitmap-add', 'block-dirty-bitmap-remove', 'block-dirty-bitmap-clear',
  'block-dirty-bitmap-enable', 'block-dirty-bitmap-disable', 'block-dirty-bitmap-merge']) {
  registerTransactionAction(kind, (data, ctx, mode) => bitmapAction(kind, data, ctx, mode));
}

/** QEMU's qmp_transaction(): prepare every action in order; commit all, or abort the prepared ones. */
async function runTransaction(actions: Array<{ type: string; data?: unknown }>, mode: string, ctx: CommandContext): Promise<void> {
  const prepared: TransactionActionImpl[] = [];
  try {
    for (const action of actions) {
      const factory = transactionActions.get(action.type);
      if (!factory) throw genericError(`Transaction action '${action.type}' is not supported`);
      const impl = factory(action.data ?? {}, ctx, mode);
      prepared.push(impl);
      await impl.prepare();
    }
  } catch (err) {
    for (const impl of [...prepared].reverse()) await impl.abort?.().catch(() => undefined);
    for (const impl of prepared) await impl.clean?.().catch(() => undefined);
    throw err;
  }
  for (const impl of prepared) await impl.commit?.();
  for (const impl of prepared) await impl.clean?.().catch(() => undefined);
}

// ---------------------------------------------------------------- mirror

interface MirrorArgs {
  'job-id'?: string; device: string; target: string; replaces?: string; sync: string; speed?: number;
  granularity?: number; 'buf-size'?: number; 'on-source-error'?: string; 'on-target-error'?: string;
  'filter-node-name'?: string; 'copy-mode'?: string; 'auto-finalize'?: boolean; 'auto-dismiss'?: boolean;
}

interface DriveMirrorArgs extends MirrorArgs {
  format?: string; 'node-name'?: string; mode?: string; unmap?: boolean;
}

/** QEMU's qmp_get_root_bs(): the node, which must be a root (no parent, no job). */
function lookupRootBs(daemon: Daemon, name: string): BlockNode {
  const bs = lookupBs(daemon, name, name);
  if (!daemon.graph.isRoot(bs)) throw genericError('Need a root block node');
  return bs;
}

/** Exports in iothreads cannot follow the target's taking the source's place: refuse. */
function assertMirrorMovable(daemon: Daemon, node: BlockNode): void {
  for (const e of daemon.exports.usersOf(daemon.graph.ancestors(node))) {
    const ctx = e.exp.common.contexts.find((c) => c.iothreadId !== undefined);
    if (ctx) {
      throw genericError(`Cannot mirror node '${node.nodeName}' under export '${e.exp.common.id}': it runs in iothread ` +
        `'${ctx.iothreadId}' (qsd-ts cannot move an iothread export to the mirror target)`);
    }
  }
}

/**
 * QEMU's blockdev_mirror_common(), mirror_start() and mirror_start_job(): the checks in QEMU's
 * order, then the job, started. `sourceBackingChain`: drive-mirror made a new image.
 */
function startMirror(daemon: Daemon, bs: BlockNode, target: BlockNode, args: MirrorArgs, sourceBackingChain: boolean,
  zeroTarget: boolean, cleanup?: () => Promise<void>): void {
  const { graph } = daemon;
  graph.checkOp(bs, 'commit-target');
  graph.checkOp(target, 'commit-target');
  const granularity = args.granularity ?? 0;
  if (granularity !== 0 && (granularity < 512 || granularity > 64 * 1048576)) {
    throw genericError("Parameter 'granularity' expects a value in range [512B, 64MB]");
  }
  if (granularity & (granularity - 1)) throw genericError("Parameter 'granularity' expects a power of 2");
  let replaces: BlockNode | undefined;
  if (args.replaces !== undefined) {
    replaces = graph.lookup(args.replaces);
    if (!replaces) throw genericError(`Failed to find node with node-name='${args.replaces}'`);
    // QEMU lets a node be replaced only when it shows the source's data (the source itself here).
    if (replaces !== bs) {
      throw genericError(`Cannot replace '${args.replaces}' by a node mirrored from '${args.device}', because it cannot ` +
        'be guaranteed that doing so would not lead to an abrupt change of visible data');
    }
  }
  if (args.sync === 'incremental' || args.sync === 'bitmap') throw genericError(`Sync mode '${args.sync}' not supported`);
  const bufSize = args['buf-size'] ?? 0;
  if (bufSize < 0) throw genericError("Invalid parameter 'buf-size'");
  if (bs === target) throw genericError("Can't mirror node into itself");
  const filterName = args['filter-node-name'];
  JobFilter.checkName(graph, filterName, false);
  assertMirrorMovable(daemon, bs);
  const job = createBlockJob(daemon, args['job-id'], 'mirror', args);
  // The job's filter above the source unshares resize, which a writable FUSE export holds.
  const resizer = graph.usersOf(bs).find((u) => !u.parent && u.perms.has('resize'));
  if (resizer) {
    job.earlyFail();
    const filter = filterName ?? graph.anonymousNodeName();
    throw genericError(`Permission conflict on node '${filter}': permissions 'resize' are both required by an unnamed ` +
      `block device (uses node '${filter}' as 'root' child) and unshared by mirror job '${job.id}' (uses node ` +
      `'${filter}' as 'main node' child).`);
  }
  if (target.readOnly) {
    job.earlyFail();
    throw genericError('Block node is read-only');
  }
  let hooks: BlockJobHooks;
  try {
    hooks = setupMirror(daemon, job, {
      source: bs, target, sync: args.sync as MirrorSync, granularity, bufSize, replaces, sourceBackingChain, zeroTarget,
      filterNodeName: filterName, copyMode: args['copy-mode'] as MirrorParams['copyMode'],
    });
  } catch (err) {
    job.earlyFail();
    throw err;
  }
  void job.start(cleanup ? { ...hooks, clean: async (j) => { await hooks.clean?.(j); await cleanup(); } } : hooks);
}

/** QEMU's bdrv_has_zero_init(): a new image reads as zeroes (raw files, qcow2 without backing). */
function hasZeroInit(node: BlockNode): boolean {
  if (node.driver.name === 'qcow2') return !node.backing;
  return node.driver.name === 'raw' || node.driver.name === 'file';
}

/** drive-mirror's target: created unless mode is 'existing' (QEMU's bdrv_img_create), then opened. */
async function openDriveMirrorTarget(daemon: Daemon, bs: BlockNode, args: DriveMirrorArgs): Promise<BlockNode> {
  const mode = args.mode ?? 'absolute-paths';
  let format = args.format ?? (mode === 'existing' ? undefined : bs.driver.name);
  if (args.replaces !== undefined && args['node-name'] === undefined) {
    throw genericError('a node-name must be provided when replacing a named node of the graph');
  }
  let backing: BlockNode | undefined;
  if (args.sync === 'top') backing = bs.backing;
  if (args.sync === 'none') backing = bs;
  if (mode !== 'existing') {
    await createImage(args.target, format!, bs.getLength(),
      args.sync !== 'full' && backing ? { file: nodeFilename(backing, jsonFilename), fmt: backing.driver.name } : undefined);
  }
  if (format === undefined) {
    const magic = Buffer.alloc(4);
    try {
      const fd = fs.openSync(args.target, 'r');
      fs.readSync(fd, magic, 0, 4, 0);
      fs.closeSync(fd);
    } catch (err) {
      throw genericError(`Could not open '${args.target}': ${strerror(err)}`);
    }
    format = magic.toString('latin1') === 'QFI\xfb' ? 'qcow2' : 'raw';
  }
  const options: Record<string, any> = { driver: format, file: { driver: 'file', filename: args.target } };
  if (args['node-name'] !== undefined) options['node-name'] = args['node-name'];
  // A new image's backing is set on completion (QEMU's MIRROR_SOURCE_BACKING_CHAIN); an existing one keeps its own.
  if (format === 'qcow2' && (mode !== 'existing' || args.sync === 'full')) options.backing = null;
  return daemon.graph.openOverlay(options);
}

// ---------------------------------------------------------------- block jobs

/** QEMU's find_block_job(). */
function findBlockJob(daemon: Daemon, id: string): BlockJob {
  const job = daemon.jobs.list().find((j) => j.id === id);
  if (!(job instanceof BlockJob)) throw new QmpError('DeviceNotActive', `Block job '${id}' not found`);
  return job;
}

interface CommitArgs {
  'job-id'?: string; device: string; 'base-node'?: string; base?: string; 'top-node'?: string; top?: string;
  'backing-file'?: string; speed?: number; 'on-error'?: string; 'filter-node-name'?: string;
  'auto-finalize'?: boolean; 'auto-dismiss'?: boolean;
}

interface StreamArgs {
  'job-id'?: string; device: string; base?: string; 'base-node'?: string; 'backing-file'?: string; bottom?: string;
  speed?: number; 'on-error'?: string; 'filter-node-name'?: string; 'auto-finalize'?: boolean; 'auto-dismiss'?: boolean;
}

export const blockJobCommands: Record<string, CommandHandler> = {
  async 'blockdev-snapshot'(args, ctx) {
    await runTransaction([{ type: 'blockdev-snapshot', data: args }], 'individual', ctx);
    return {};
  },
  async 'blockdev-snapshot-sync'(args, ctx) {
    await runTransaction([{ type: 'blockdev-snapshot-sync', data: args }], 'individual', ctx);
    return {};
  },
  async 'blockdev-backup'(args, ctx) {
    await runTransaction([{ type: 'blockdev-backup', data: args }], 'individual', ctx);
    return {};
  },
  async 'drive-backup'(args, ctx) {
    await runTransaction([{ type: 'drive-backup', data: args }], 'individual', ctx);
    return {};
  },
  async transaction(args: { actions: Array<{ type: string; data?: unknown }>; properties?: { 'completion-mode'?: string } }, ctx) {
    await runTransaction(args.actions, args.properties?.['completion-mode'] ?? 'individual', ctx);
    return {};
  },

  async 'block-commit'(args: CommitArgs, { daemon }) {
    const { graph } = daemon;
    const { device } = args;
    const bs = graph.lookup(device);
    if (!bs) throw new QmpError('DeviceNotFound', `Device '${device}' not found`);
    if (!graph.isRoot(bs)) throw genericError('Need a root block node');
    graph.checkOp(bs, 'commit-source');
    let top: BlockNode | undefined = bs;
    if (args['top-node'] !== undefined && args.top !== undefined) throw genericError("'top-node' and 'top' are mutually exclusive");
    if (args['top-node'] !== undefined) {
      top = lookupBs(daemon, undefined, args['top-node']);
      if (!chainContains(bs, top)) throw genericError(`'${args['top-node']}' is not in this backing file chain`);
    } else if (args.top !== undefined && nodeFilename(bs, jsonFilename) !== args.top) {
      top = findBackingImage(bs, args.top);
    }
    if (!top) throw genericError(`Top image file ${args.top ?? 'NULL'} not found`);
    let base: BlockNode | undefined;
    if (args['base-node'] !== undefined && args.base !== undefined) throw genericError("'base-node' and 'base' are mutually exclusive");
    if (args['base-node'] !== undefined) {
      base = lookupBs(daemon, undefined, args['base-node']);
      if (!chainContains(top, base)) throw genericError(`'${args['base-node']}' is not in this backing file chain`);
    } else if (args.base !== undefined) {
      base = findBackingImage(top, args.base);
      if (!base) throw genericError(`Can't find '${args.base}' in the backing chain`);
    } else {
      base = top;
      while (base.backing) base = base.backing;
    }
    for (let n: BlockNode | undefined = top; n; n = n.backing) {
      graph.checkOp(n, 'commit-target');
      if (n === base) break;
    }
    if (top === base) throw genericError('cannot commit an image into itself');
    const active = top === bs || graph.usersOf(top).some((u) => u.perms.has('write'));
    if (active) {
      if (args['backing-file'] !== undefined) {
        throw genericError(top === bs ? "'backing-file' specified, but 'top' is the active layer"
          : "'backing-file' specified, but 'top' has a writer on it");
      }
      assertMovable(daemon, top);
    } else {
      const overlay = graph.overlayOf(bs, top);
      if (overlay) graph.checkOp(overlay, 'commit-target');
    }
    if (active) JobFilter.checkName(graph, args['filter-node-name'], false);
    const job = createBlockJob(daemon, args['job-id'], 'commit', args);
    let hooks;
    try {
      hooks = await setupCommit(daemon, job, {
        bs, top, base, backingFile: args['backing-file'], filterNodeName: args['filter-node-name'],
      }, active);
    } catch (err) {
      job.earlyFail();
      throw err;
    }
    void job.start(hooks);
    return {};
  },

  async 'block-stream'(args: StreamArgs, { daemon }) {
    const { graph } = daemon;
    const { device, base: baseName, 'base-node': baseNode, bottom: bottomName } = args;
    if (baseName !== undefined && baseNode !== undefined) throw genericError("'base' and 'base-node' cannot be specified at the same time");
    if (baseName !== undefined && bottomName !== undefined) throw genericError("'base' and 'bottom' cannot be specified at the same time");
    if (bottomName !== undefined && baseNode !== undefined) throw genericError("'bottom' and 'base-node' cannot be specified at the same time");
    const bs = lookupBs(daemon, device, device);
    let base: BlockNode | undefined;
    if (baseName !== undefined) {
      base = findBackingImage(bs, baseName);
      if (!base) throw genericError(`Can't find '${baseName}' in the backing chain`);
    }
    if (baseNode !== undefined) {
      base = lookupBs(daemon, undefined, baseNode);
      if (bs === base || !chainContains(bs, base)) throw genericError(`Node '${baseNode}' is not a backing image of '${device}'`);
    }
    let bottom: BlockNode | undefined;
    if (bottomName !== undefined) {
      bottom = lookupBs(daemon, undefined, bottomName);
      if (!chainContains(bs, bottom)) throw genericError(`Node '${bottomName}' is not in a chain starting from '${device}'`);
      base = bottom.backing;
    }
    const end = bottom ? bottom.backing : base;
    for (let n: BlockNode | undefined = bs; n && n !== end; n = n.backing) graph.checkOp(n, 'stream');
    if (!base && args['backing-file'] !== undefined) throw genericError('backing file specified, but streaming the entire chain');
    JobFilter.checkName(graph, args['filter-node-name'], true);
    const job = createBlockJob(daemon, args['job-id'], 'stream', args);
    let hooks;
    try {
      hooks = await setupStream(daemon, job, {
        bs, base, bottom, backingFile: args['backing-file'], filterNodeName: args['filter-node-name'],
      });
    } catch (err) {
      job.earlyFail();
      throw err;
    }
    void job.start(hooks);
    return {};
  },

  async 'blockdev-mirror'(args: MirrorArgs, { daemon }) {
    const bs = lookupRootBs(daemon, args.device);
    const target = lookupBs(daemon, args.target, args.target);
    startMirror(daemon, bs, target, args, false, args.sync === 'full');
    return {};
  },
  async 'drive-mirror'(args: DriveMirrorArgs, { daemon }) {
    const bs = lookupRootBs(daemon, args.device);
    const target = await openDriveMirrorTarget(daemon, bs, args);
    // By name: on completion the objects trade identities (BlockGraph.replaceNode).
    const name = target.nodeName;
    const closeTarget = async (): Promise<void> => {
      const node = daemon.graph.lookup(name);
      if (node) await daemon.graph.closeUnused(node);
    };
    try {
      const mode = args.mode ?? 'absolute-paths';
      startMirror(daemon, bs, target, args, mode === 'absolute-paths',
        args.sync === 'full' && (mode === 'existing' || !hasZeroInit(target)), closeTarget);
    } catch (err) {
      await closeTarget();
      throw err;
    }
    return {};
  },

  'query-block-jobs': (_args, { daemon }) =>
    daemon.jobs.list().filter((j): j is BlockJob => j instanceof BlockJob).map((j) => j.blockInfo()),
  'block-job-set-speed'(args: { device: string; speed: number }, { daemon }) {
    findBlockJob(daemon, args.device).setSpeed(args.speed);
    return {};
  },
  'block-job-cancel'(args: { device: string; force?: boolean }, { daemon }) {
    findBlockJob(daemon, args.device).cancel(args.force ?? false);
    return {};
  },
  'block-job-pause'(args: { device: string }, { daemon }) {
    findBlockJob(daemon, args.device).pause();
    return {};
  },
  'block-job-resume'(args: { device: string }, { daemon }) {
    findBlockJob(daemon, args.device).resume();
    return {};
  },
  'block-job-complete'(args: { device: string }, { daemon }) {
    findBlockJob(daemon, args.device).complete();
    return {};
  },
  'block-job-finalize'(args: { id: string }, { daemon }) {
    findBlockJob(daemon, args.id).finalize();
    return {};
  },
  'block-job-dismiss'(args: { id: string }, { daemon }) {
    const job = findBlockJob(daemon, args.id);
    daemon.jobs.dismiss(job.id);
    return {};
  },
  'block-job-change'(args: { id: string; type: string }, { daemon }) {
    const job = findBlockJob(daemon, args.id);
    throw genericError(`Job type ${job.type} does not support changing options`);
  },
};

