// Commands of QEMU's qom.json for the objects qsd-ts has: iothreads under /objects.
import type { CommandHandler, CommandContext } from './types.js';
import { genericError, QmpError } from '../../qapi/errors.js';
import { idWellformed } from '../../block/graph.js';
import { IoThread } from '../../iothread/iothread.js';
import type { Daemon } from '../../daemon.js';

const IOTHREAD_PROPERTIES = ['thread-pool-min', 'aio-max-batch', 'thread-pool-max', 'poll-max-ns', 'poll-grow', 'poll-shrink'];
/** QEMU's defaults (poll-max-ns 32768 on Linux hosts). */
const IOTHREAD_DEFAULTS: Record<string, number> = {
  'thread-pool-min': 0, 'aio-max-batch': 0, 'thread-pool-max': 64, 'poll-max-ns': 32768, 'poll-grow': 0, 'poll-shrink': 0,
};

export function objectAdd(daemon: Daemon, args: Record<string, any>): void {
  const { 'qom-type': type, id, ...props } = args;
  if (!idWellformed(id)) {
    throw genericError("Parameter 'id' expects an identifier", "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.\n");
  }
  if (daemon.objects.has(id)) {
    throw genericError(`attempt to add duplicate property '${id}' to object (type 'container')`);
  }
  if (type !== 'iothread') throw genericError(`Invalid parameter type for 'qom-type', expected: iothread`);
  daemon.objects.set(id, new IoThread(id, props));
  daemon.objectsContainer = true;
}

function resolve(daemon: Daemon, path: string): { kind: 'root' | 'objects' } | { kind: 'iothread'; obj: IoThread } {
  const clean = path.replace(/\/+$/, '') || '/';
  if (clean === '/') return { kind: 'root' };
  // QEMU creates the /objects container with the first object.
  if (clean === '/objects' && daemon.objectsContainer) return { kind: 'objects' };
  const m = /^\/objects\/([^/]+)$/.exec(clean);
  const obj = m ? daemon.objects.get(m[1]) : undefined;
  if (obj) return { kind: 'iothread', obj };
  throw new QmpError('DeviceNotFound', `Device '${path}' not found`);
}

export const qomCommands: Record<string, CommandHandler> = {
  'object-add'(args, { daemon }: CommandContext) {
    objectAdd(daemon, args);
    return {};
  },
  async 'object-del'(args: { id: string }, { daemon }) {
    const obj = daemon.objects.get(args.id);
    if (!obj) throw genericError(`object '${args.id}' not found`);
    if (daemon.exports.usesIothread(args.id) || obj.queueCount > 0) {
      throw genericError(`object '${args.id}' is in use, can not be deleted`);
    }
    daemon.objects.delete(args.id);
    await obj.stop();
    return {};
  },
  'qom-list'(args: { path: string }, { daemon }) {
    const target = resolve(daemon, args.path);
    if (target.kind === 'root') {
      return [{ name: 'type', type: 'string' }, { name: 'objects', type: 'child<container>' }];
    }
    if (target.kind === 'objects') {
      return [{ name: 'type', type: 'string' }, ...[...daemon.objects.keys()].map((id) => ({ name: id, type: 'child<iothread>' }))];
    }
    return [{ name: 'type', type: 'string' }, ...IOTHREAD_PROPERTIES.map((name) => ({ name, type: 'int' }))];
  },
  'qom-get'(args: { path: string; property: string }, { daemon }) {
    const target = resolve(daemon, args.path);
    if (args.property === 'type') return target.kind === 'iothread' ? 'iothread' : 'container';
    if (target.kind === 'iothread' && IOTHREAD_PROPERTIES.includes(args.property)) {
      const props = target.obj.properties as Record<string, number | undefined>;
      return props[args.property] ?? IOTHREAD_DEFAULTS[args.property];
    }
    throw genericError(`Property '${args.property}' not found`);
  },
};
