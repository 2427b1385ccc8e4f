// FUSE export: presents one block node as one regular file mounted over an existing regular file.
//
// The export mounts /dev/fuse over the mountpoint, clones one fd per context (QEMU's multi-queue
// design: the kernel hands requests to the fds round-robin) and starts one queue per context
// (src/exports/fuse-queue.ts); each queue then runs entirely in its context's thread.
import { closeSync, readFileSync } from 'node:fs';
import { realpath, stat } from 'node:fs/promises';
import { spawnSync } from 'node:child_process';
import { genericError, QmpError } from '../qapi/errors.js';
import { native } from '../native/binding.js';
import { strerror } from '../util/errno.js';
import type { QueueHandle } from '../iothread/context.js';
import type { BlockExport, BlockExportDriver, ExportCommon } from './export.js';
import { S_IFREG, S_IRUSR, S_IWUSR } from './fuse-abi.js';
import { createFuseSharedState, FUSE_MAX_READ_BYTES, FUSE_STATE_INIT, type FuseQueueParams } from './fuse-queue.js';
import { FUSE_URING_DEFAULT_ENTRIES } from './fuse-uring-queue.js';

/** BlockExportOptionsFuse members (the base members are in ExportCommon). */
export interface FuseExportOptions {
  mountpoint: string;
  growable?: boolean;
  'allow-other'?: 'off' | 'on' | 'auto';
  'io-uring'?: boolean;
}

export interface FuseExport extends BlockExport {
  readonly mountpoint: string;
  /** Whether the mount has allow_other ('auto' records which attempt worked). */
  readonly allowOther: boolean;
  /** fds[0] is the mounted fd, fds[i] (i > 0) its clones; closed by delete(). */
  readonly fds: number[];
  /**
   * One queue per common.contexts[i], reading fds[i]; with io-uring, then the FUSE-over-io_uring
   * queues (one per context that got some of the kernel's per-CPU ring queues).
   */
  readonly queues: QueueHandle[];
  /** Option 'io-uring': requests travel over io_uring ring entries. */
  readonly ioUring: boolean;
  /** Export-wide mode/uid/gid/halted (see createFuseSharedState). */
  readonly shared: SharedArrayBuffer;
  mounted: boolean;
  deleted: boolean;
}

/** Mountpoints with an export on them (QEMU's process-wide table); freed at requestShutdown. */
const exportedMountpoints = new Set<string>();
/** Exports whose mount may still be up, for unmountAllFuseExports(). */
const mountedExports = new Set<FuseExport>();

// libfuse mounts with this source and type when no fsname/subtype is given, as QEMU's export does.
const MOUNT_SOURCE = '/dev/fuse';
const MOUNT_FSTYPE = 'fuse';
// Kernel pseudo file systems: mounting over their files would hide kernel interfaces (QEMU 7.2 does it).
const FORBIDDEN_ROOTS = ['/proc', '/sys', '/dev'];
// tmpfs under /dev holds ordinary user files (test images), not kernel interfaces.
const ALLOWED_UNDER_FORBIDDEN = ['/dev/shm'];

function isUnder(p: string, root: string): boolean {
  return p === root || p.startsWith(root + '/');
}

async function checkMountpointLocation(mountpoint: string): Promise<void> {
  let real: string;
  try {
    real = await realpath(mountpoint);
  } catch (err) {
    throw genericError(`Failed to stat '${mountpoint}': ${strerror(err)}`);
  }
  if (ALLOWED_UNDER_FORBIDDEN.some((r) => isUnder(real, r))) return;
  const root = FORBIDDEN_ROOTS.find((r) => isUnder(real, r));
  if (root) {
    throw genericError(`Refusing to export over '${mountpoint}': '${real}' is in the kernel's ${root} file system`);
  }
}

function isRoot(): boolean {
  return process.getuid?.() === 0;
}

/** Mount a FUSE file system over `mountpoint`; returns the /dev/fuse fd. Throws the native error. */
function mountFuse(mountpoint: string, writable: boolean, allowOther: boolean): number {
  const opts = `max_read=${FUSE_MAX_READ_BYTES},default_permissions${allowOther ? ',allow_other' : ''}`;
  if (!isRoot()) {
    // fusermount3 turns rw/ro,nosuid,nodev,noatime into MS_* flags and adds fd/rootmode/user_id/group_id.
    return native.fusermountMount(mountpoint, `${writable ? 'rw' : 'ro'},nosuid,nodev,noatime,${opts}`);
  }
  const c = native.constants;
  // A read-only mount makes the VFS refuse writes and chmod +w with EROFS before they reach us.
  const flags = c.MS_NOSUID! | c.MS_NODEV! | c.MS_NOATIME! | (writable ? 0 : c.MS_RDONLY!);
  const fd = native.fuseOpen();
  const uid = process.getuid!();
  const gid = process.getgid!();
  try {
    native.mount(MOUNT_SOURCE, mountpoint, MOUNT_FSTYPE, flags,
      `fd=${fd},rootmode=${S_IFREG.toString(8)},user_id=${uid},group_id=${gid},${opts}`);
  } catch (err) {
    closeSync(fd);
    throw err;
  }
  return fd;
}

/** Unmount (lazily: clients with the file open keep it until they close it). Best effort, synchronous. */
function unmountFuse(mountpoint: string): void {
  try {
    if (isRoot()) {
      native.umount(mountpoint, native.constants.MNT_DETACH!);
    } else {
      spawnSync('fusermount3', ['-u', '-z', '--', mountpoint], { stdio: ['ignore', 'ignore', 'inherit'] });
    }
  } catch (err) {
    console.error(`Failed to unmount FUSE export on '${mountpoint}': ${strerror(err)}`);
  }
}

const ENABLE_URING = '/sys/module/fuse/parameters/enable_uring';

/** The kernel's FUSE ring has one queue per possible CPU (num_possible_cpus()), all to be registered. */
function possibleCpus(): number {
  try {
    let n = 0;
    for (const range of readFileSync('/sys/devices/system/cpu/possible', 'utf8').trim().split(',')) {
      const [a, b] = range.split('-').map(Number);
      n += (b ?? a!) - a! + 1;
    }
    if (n > 0) return n;
  } catch {
    // Fall through: without sysfs the online count is the best guess.
  }
  return Math.max(1, (globalThis as { navigator?: { hardwareConcurrency?: number } }).navigator?.hardwareConcurrency ?? 1);
}

/** Refuse 'io-uring' up front when the kernel will not offer FUSE_OVER_IO_URING. */
function checkUringEnabled(): void {
  let v: string;
  try {
    v = readFileSync(ENABLE_URING, 'utf8').trim();
  } catch {
    throw genericError('FUSE-over-io_uring is not supported by this kernel');
  }
  if (v !== 'Y' && v !== '1') {
    throw genericError(`FUSE-over-io_uring is disabled in the kernel (${ENABLE_URING} is ${v})`);
  }
}

/** Wait (without blocking the loop: a queue here may be the one answering INIT) for INIT's outcome. */
async function waitForInit(shared: SharedArrayBuffer, timeoutMs: number): Promise<number> {
  const s = new Int32Array(shared);
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = Atomics.load(s, FUSE_STATE_INIT);
    if (v !== 0) return v;
    const left = deadline - Date.now();
    if (left <= 0) return 0;
    await Atomics.waitAsync(s, FUSE_STATE_INIT, 0, left).value;
  }
}

function closeFds(fds: number[]): void {
  for (const fd of fds.splice(0)) {
    try {
      closeSync(fd);
    } catch {
      // Already closed: nothing left to release.
    }
  }
}

async function fuseExportCreate(common: ExportCommon, options: Record<string, any>): Promise<FuseExport> {
  const {
    mountpoint,
    growable = false,
    'allow-other': allowOtherOpt = 'auto',
    'io-uring': ioUring = false,
  } = options as FuseExportOptions;
  const { writable } = common;

  if (exportedMountpoints.has(mountpoint)) {
    throw genericError(`There already is a FUSE export on '${mountpoint}'`);
  }
  // Asynchronous on purpose: if the path leads into one of our own mounts (another spelling of an
  // exported mountpoint), a queue in this thread must stay free to answer the GETATTR.
  let isFile: boolean;
  try {
    isFile = (await stat(mountpoint)).isFile();
  } catch (err) {
    throw genericError(`Failed to stat '${mountpoint}': ${strerror(err)}`);
  }
  if (!isFile) throw genericError(`'${mountpoint}' is not a regular file`);
  await checkMountpointLocation(mountpoint);
  if (ioUring) checkUringEnabled();
  // Checked again: another create() may have taken it while we were waiting.
  if (exportedMountpoints.has(mountpoint)) {
    throw genericError(`There already is a FUSE export on '${mountpoint}'`);
  }
  exportedMountpoints.add(mountpoint);

  const fds: number[] = [];
  const queues: QueueHandle[] = [];
  let mounted = false;
  try {
    let allowOther = allowOtherOpt !== 'off';
    try {
      fds.push(mountFuse(mountpoint, writable, allowOther));
    } catch (err) {
      if (allowOtherOpt !== 'auto') throw err;
      allowOther = false;
      fds.push(mountFuse(mountpoint, writable, allowOther));
    }
    mounted = true;

    for (let i = 1; i < common.contexts.length; i++) {
      try {
        fds.push(native.fuseCloneFd(fds[0]!));
      } catch (err) {
        const e = err as { syscall?: string };
        throw genericError(`${e.syscall === 'open' ? 'Failed to open /dev/fuse' : 'Failed to clone FUSE FD'}: ${strerror(err)}`);
      }
    }

    const mode = S_IFREG | S_IRUSR | (writable ? S_IWUSR : 0);
    const shared = createFuseSharedState(mode, process.getuid?.() ?? 0, process.getgid?.() ?? 0);
    for (let i = 0; i < common.contexts.length; i++) {
      const params: FuseQueueParams = {
        fd: fds[i]!,
        ownsFd: false,
        exportId: common.id,
        writable,
        growable,
        allowOther,
        writethrough: common.writethrough,
        shared,
        ioUring,
      };
      queues.push(await common.contexts[i]!.startQueue('fuse', common.node, params));
    }
    if (ioUring) await startUringQueues(common, fds, queues, { exportId: common.id, writable, growable, allowOther, shared });

    const exp: FuseExport = {
      common,
      mountpoint,
      allowOther,
      fds,
      queues,
      ioUring,
      shared,
      mounted: true,
      deleted: false,
      async queryInfo() {
        const stats = await Promise.all(queues.map((q) => q.stats()));
        return {
          queues: stats.map((s, i) => ({
            iothread: queues[i]!.context.iothreadId ?? null,
            served: s.served,
            'in-flight': s.inFlight,
          })),
        };
      },
    };
    mountedExports.add(exp);
    return exp;
  } catch (err) {
    await Promise.allSettled(queues.map((q) => q.stop()));
    if (mounted) unmountFuse(mountpoint);
    closeFds(fds);
    exportedMountpoints.delete(mountpoint);
    if (err instanceof QmpError) throw err;
    if (!mounted) throw genericError('Failed to mount FUSE session to export');
    throw err;
  }
}

/**
 * After INIT: check the kernel switched to FUSE-over-io_uring, then register its per-CPU ring
 * queues, spread round-robin over the export's contexts (as QEMU's series does), one ring per
 * context. The kernel holds every request until all of them are registered.
 */
async function startUringQueues(
  common: ExportCommon,
  fds: number[],
  queues: QueueHandle[],
  base: Omit<FuseQueueParams, 'fd' | 'ownsFd' | 'writethrough'>,
): Promise<void> {
  const init = await waitForInit(base.shared, 10000);
  if (init === 0) throw genericError('FUSE-over-io_uring: the kernel did not send INIT');
  if (init < 0) throw genericError('FUSE-over-io_uring: INIT failed');
  if (init !== 2) throw genericError('FUSE-over-io_uring is not supported by the kernel (INIT without FUSE_OVER_IO_URING)');
  const nQueues = possibleCpus();
  const contexts = common.contexts;
  for (let i = 0; i < contexts.length && i < nQueues; i++) {
    const qids: number[] = [];
    for (let q = i; q < nQueues; q += contexts.length) qids.push(q);
    const params: FuseQueueParams = {
      ...base,
      fd: fds[i]!,
      ownsFd: false,
      writethrough: common.writethrough,
      uring: { qids, entriesPerQueue: FUSE_URING_DEFAULT_ENTRIES },
    };
    try {
      queues.push(await contexts[i]!.startQueue('fuse', common.node, params));
    } catch (err) {
      throw genericError(`Failed to set up FUSE-over-io_uring: ${err instanceof Error ? err.message : String(err)}`);
    }
  }
}

export const fuseExportDriver: BlockExportDriver<FuseExport> = {
  type: 'fuse',
  supportsMultithread: true,
  displayName: 'FUSE',

  create: fuseExportCreate,

  requestShutdown(exp: FuseExport): void {
    exportedMountpoints.delete(exp.mountpoint);
    // Stop taking requests now; delete() waits for the ones in flight.
    for (const q of exp.queues) q.drainBegin().catch(() => undefined);
  },

  async delete(exp: FuseExport): Promise<void> {
    if (exp.deleted) return;
    exp.deleted = true;
    exportedMountpoints.delete(exp.mountpoint);
    if (exp.ioUring && exp.mounted) {
      // Ring entries come back from the kernel only when the connection ends, and a ring queue
      // frees its buffers only after that: so drain, unmount, then stop.
      await Promise.allSettled(exp.queues.map((q) => q.drainBegin()));
      unmountFuse(exp.mountpoint);
      exp.mounted = false;
    }
    await Promise.allSettled(exp.queues.map((q) => q.stop()));
    if (exp.mounted) {
      unmountFuse(exp.mountpoint);
      exp.mounted = false;
    }
    mountedExports.delete(exp);
    // Closing the last fd aborts the connection: requests nobody read fail with ENOTCONN.
    closeFds(exp.fds);
  },

  async drainBegin(exp: FuseExport): Promise<void> {
    await Promise.all(exp.queues.map((q) => q.drainBegin()));
  },

  async drainEnd(exp: FuseExport): Promise<void> {
    await Promise.all(exp.queues.map((q) => q.drainEnd()));
  },
};

/**
 * Unmount every FUSE export still mounted: for abnormal exits (signals, fatal errors), so that no
 * stale mount is left behind. Synchronous and best effort; the exports are unusable afterwards.
 */
export function unmountAllFuseExports(): void {
  for (const exp of mountedExports) {
    if (exp.mounted) unmountFuse(exp.mountpoint);
    exp.mounted = false;
  }
  mountedExports.clear();
}

