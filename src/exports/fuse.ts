// FUSE export: presents one block node as one regular file mounted over an existing regular file.
//
// The export mounts /dev/fuse over the mountpoint, clones one fd per context (QEMU's multi-queue
// design: the kernel hands requests to the fds round-robin) and starts one queue per context
// (src/exports/fuse-queue.ts); each queue then runs entirely in its context's thread.
import { closeSync } from 'node:fs';
import { realpath, stat } from 'node:fs/promises';
import { spawnSync } from 'node:child_process';
import { genericError, QmpError } from '../qapi/errors.js';
import { native } from '../native/binding.js';
import { strerror } from '../util/errno.js';
import type { QueueHandle } from '../iothread/context.js';
import type { BlockExport, BlockExportDriver, ExportCommon } from './export.js';
import { S_IFREG, S_IRUSR, S_IWUSR } from './fuse-abi.js';
import { createFuseSharedState, FUSE_MAX_READ_BYTES, type FuseQueueParams } from './fuse-queue.js';

/** BlockExportOptionsFuse members (the base members are in ExportCommon). */
export interface FuseExportOptions {
  mountpoint: string;
  growable?: boolean;
  'allow-other'?: 'off' | 'on' | 'auto';
}

export interface FuseExport extends BlockExport {
  readonly mountpoint: string;
  /** Whether the mount has allow_other ('auto' records which attempt worked). */
  readonly allowOther: boolean;
  /** fds[0] is the mounted fd, fds[i] (i > 0) its clones; closed by delete(). */
  readonly fds: number[];
  /** One queue per common.contexts[i], reading fds[i]. */
  readonly queues: QueueHandle[];
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
  const { mountpoint, growable = false, 'allow-other': allowOtherOpt = 'auto' } = options as FuseExportOptions;
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
      };
      queues.push(await common.contexts[i]!.startQueue('fuse', common.node, params));
    }

    const exp: FuseExport = {
      common,
      mountpoint,
      allowOther,
      fds,
      queues,
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

