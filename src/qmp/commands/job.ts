// Commands of QEMU's job.json and blockdev-create (a job); block jobs and block-job-* are in block-jobs.ts.
import fs from 'node:fs';
import type { CommandHandler } from './types.js';
import { genericError } from '../../qapi/errors.js';
import { strerror } from '../../util/errno.js';
import { qcow2Create } from '../../block/qcow2/create.js';
import { luksCreate } from '../../block/luks/create.js';
import type { NodeUser, Permission } from '../../block/graph.js';

const WRITE_RESIZE: Permission[] = ['write', 'resize'];
/** Numbers the qcow2 node a create job opens over its file (only ever named in errors). */
let createdNodes = 0;

/**
 * blockdev-create for the file protocol: create (or empty) the file, then size it. Asynchronous
 * throughout, so a long preallocation does not stall QMP (job-dismiss must see 'running').
 */
async function createFile(opts: { filename: string; size: number; preallocation?: string }): Promise<void> {
  let fh: fs.promises.FileHandle;
  try {
    fh = await fs.promises.open(opts.filename, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o644);
  } catch (err) {
    throw genericError(`Could not create '${opts.filename}': ${strerror(err)}`);
  }
  try {
    await fh.truncate(0);
    await fh.truncate(Number(opts.size));
    if (opts.preallocation === 'full') {
      const zero = Buffer.alloc(1 << 20);
      for (let off = 0; off < opts.size; off += zero.length) {
        await fh.write(zero, 0, Math.min(zero.length, opts.size - off), off);
      }
    }
  } catch (err) {
    throw genericError(`Could not resize file: ${strerror(err)}`);
  } finally {
    await fh.close();
  }
}

export const jobCommands: Record<string, CommandHandler> = {
  'blockdev-create'(args: { 'job-id': string; options: Record<string, any> }, { daemon }) {
    const { 'job-id': jobId, options } = args;
    let body: () => Promise<void>;
    if (options.driver === 'file') {
      body = () => createFile(options as any);
    } else if (options.driver === 'qcow2' || options.driver === 'luks') {
      const ref = options.file;
      const format: string = options.driver;
      body = async () => {
        if (typeof ref !== 'string') throw genericError(`${format} creation needs an existing node for "file"`);
        const file = daemon.graph.lookup(ref);
        // QEMU resolves a BlockdevRef as both a device and a node name.
        if (!file) throw genericError(`Cannot find device='${ref}' nor node-name='${ref}'`);
        const { driver: _driver, file: _file, ...formatOptions } = options;
        // QEMU's create job first writes and resizes the node as an unnamed block device, then
        // opens it as a new qcow2 node (which shares neither write nor resize of its file). Either
        // step refuses, in QEMU 7.2's words, if a current user of the node does not allow it.
        const users = () => [...(daemon.graph.entry(ref)?.users ?? [])];
        const desc = (u: NodeUser) => (u.parent ? `node '${u.name}'` : 'an unnamed block device');
        const conflict = (perms: string[], requiredBy: string, requiredRole: string, unsharedBy: string, unsharedRole: string) =>
          genericError(`Permission conflict on node '${ref}': permissions '${perms.join(', ')}' are both required by ` +
            `${requiredBy} (uses node '${ref}' as '${requiredRole}' child) and unshared by ${unsharedBy} ` +
            `(uses node '${ref}' as '${unsharedRole}' child).`);
        const checkPerms = (step: 'write' | 'open') => {
          for (const user of users()) {
            if (step === 'write') {
              const unshared = WRITE_RESIZE.filter((p) => !user.shared.has(p));
              if (unshared.length) throw conflict(unshared, 'an unnamed block device', 'root', desc(user), user.role);
            } else {
              const used = WRITE_RESIZE.filter((p) => user.perms.has(p));
              if (used.length) throw conflict(used, desc(user), user.role, `node '#block${createdNodes++}'`, 'file');
            }
          }
        };
        // luks only writes and resizes its file (QEMU opens no luks node afterwards).
        if (format === 'luks') await luksCreate(file, formatOptions as any, () => checkPerms('write'));
        else await qcow2Create(file, formatOptions as any, checkPerms);
      };
    } else {
      throw genericError('Driver does not support blockdev-create');
    }
    const job = daemon.jobs.create(jobId, 'create');
    void job.run(body);
    return {};
  },
  'query-jobs': (_args, { daemon }) => daemon.jobs.list().map((job) => job.info()),
  'job-dismiss'(args: { id: string }, { daemon }) {
    daemon.jobs.dismiss(args.id);
    return {};
  },
  'job-pause'(args: { id: string }, { daemon }) {
    daemon.jobs.find(args.id).pause();
    return {};
  },
  'job-resume'(args: { id: string }, { daemon }) {
    daemon.jobs.find(args.id).resume();
    return {};
  },
  'job-cancel'(args: { id: string }, { daemon }) {
    daemon.jobs.find(args.id).cancel();
    return {};
  },
  'job-finalize'(args: { id: string }, { daemon }) {
    daemon.jobs.find(args.id).finalize();
    return {};
  },
  'job-complete'(args: { id: string }, { daemon }) {
    daemon.jobs.find(args.id).complete();
    return {};
  },
};
