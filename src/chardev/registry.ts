// The daemon's chardevs: creation from a ChardevBackend or --chardev options, removal, change, QOM order.
import type { ChardevBackend } from '../qapi/generated/types.js';
import { genericError, QmpError } from '../qapi/errors.js';
import type { ParsedQemuOpts } from '../cli/qemu-opts.js';
import { parseQemuOptSize } from '../cli/qemu-opts.js';
import { GHashOrder } from '../qmp/commands/qom.js';
import type { Daemon } from '../daemon.js';
import type { Chardev, ChardevHost } from './chardev.js';
import { NullChardev, FileChardev, PipeChardev } from './simple.js';
import { RingbufChardev } from './ringbuf.js';
import { SocketChardev, type ChardevOrigin } from './socket.js';
import { StdioChardev } from './stdio.js';

export { Chardev } from './chardev.js';
export { SocketChardev } from './socket.js';
export { RingbufChardev } from './ringbuf.js';

/** The backends qsd-ts has, in the order QEMU 7.2 registers them (query-chardev-backends). */
export const CHARDEV_BACKEND_NAMES = ['pipe', 'null', 'ringbuf', 'stdio', 'socket', 'file', 'memory'] as const;

/** An unopened chardev of the backend's class. */
export function createChardev(host: ChardevHost, id: string, backend: ChardevBackend, origin: ChardevOrigin): Chardev {
  switch (backend.type) {
    case 'socket': return new SocketChardev(host, id, backend, origin);
    case 'file': return new FileChardev(host, id, backend);
    case 'pipe': return new PipeChardev(host, id, backend);
    case 'null': return new NullChardev(host, id, backend);
    case 'stdio': return new StdioChardev(host, id, backend);
    case 'ringbuf':
    case 'memory': return new RingbufChardev(host, id, backend);
  }
}

/** /chardevs' children table per daemon, replaying adds and removes for QEMU's GHashTable order. */
const tables = new WeakMap<Daemon, GHashOrder>();
function table(daemon: Daemon): GHashOrder {
  let t = tables.get(daemon);
  if (!t) tables.set(daemon, (t = new GHashOrder(daemon.chardevs.keys())));
  return t;
}

/** The chardevs in the chardev container's iteration order (query-chardev lists them reversed). */
export function chardevOrder(daemon: Daemon): Chardev[] {
  return table(daemon).order().map((id) => daemon.chardevs.get(id)!);
}

function register(daemon: Daemon, chardev: Chardev): void {
  table(daemon).insert(chardev.id);
  daemon.chardevs.set(chardev.id, chardev);
}

/**
 * chardev-add and --chardev. QMP refuses a duplicate id first and prefixes open errors with
 * "Failed to add chardev 'id': "; the command line opens first and then fails to add the QOM child.
 */
export async function addChardev(daemon: Daemon, id: string, backend: ChardevBackend, origin: ChardevOrigin): Promise<Chardev> {
  if (origin === 'qmp' && daemon.chardevs.has(id)) throw genericError(`Chardev with id '${id}' already exists`);
  // A socket backend registers its yank instance ("chardev:<id>") before it opens, so a second
  // socket of the same id (--chardev) fails there, before the duplicate-child check below.
  if (backend.type === 'socket' && daemon.chardevs.get(id)?.backend.type === 'socket') throw genericError('duplicate yank instance');
  const chardev = createChardev(daemon, id, backend, origin);
  daemon.openingChardevs.add(chardev);
  try {
    await chardev.open();
  } catch (err) {
    if (origin === 'qmp' && err instanceof QmpError) throw new QmpError(err.errorClass, `Failed to add chardev '${id}': ${err.message}`, err.hint);
    throw err;
  } finally {
    daemon.openingChardevs.delete(chardev);
  }
  if (daemon.chardevs.has(id)) {
    await chardev.close();
    throw genericError(`attempt to add duplicate property '${id}' to object (type 'container')`);
  }
  register(daemon, chardev);
  return chardev;
}

function find(daemon: Daemon, id: string, message: string): Chardev {
  const chardev = daemon.chardevs.get(id);
  if (!chardev) throw genericError(message);
  return chardev;
}

async function unregister(daemon: Daemon, chardev: Chardev): Promise<void> {
  table(daemon).remove(chardev.id);
  daemon.chardevs.delete(chardev.id);
  await chardev.close();
}

/** chardev-remove: a chardev a monitor uses is busy. */
export async function removeChardev(daemon: Daemon, id: string): Promise<void> {
  const chardev = find(daemon, id, `Chardev '${id}' not found`);
  if (chardev.frontend) throw genericError(`Chardev '${id}' is busy`);
  await unregister(daemon, chardev);
}

/**
 * chardev-change. A monitor can't follow a hotswap; a chardev nobody uses is removed and added
 * again, as QEMU does: if the new backend fails to open, the old chardev is gone.
 */
export async function changeChardev(daemon: Daemon, id: string, backend: ChardevBackend): Promise<void> {
  const chardev = find(daemon, id, `Chardev '${id}' does not exist`);
  if (chardev.frontend) throw genericError('Chardev user does not support chardev hotswap');
  await unregister(daemon, chardev);
  await addChardev(daemon, id, backend, 'qmp');
}

export function findChardev(daemon: Daemon, id: string, message: string): Chardev {
  return find(daemon, id, message);
}

// ---------------------------------------------------------------------------------------------
// --chardev: QemuOpts → ChardevBackend, as QEMU's per-backend parse functions do.

type Opts = Record<string, string | boolean>;

/** The options every backend takes (ChardevCommon). */
function common(o: Opts): { logfile?: string; logappend?: boolean } {
  return {
    ...(o.logfile !== undefined ? { logfile: String(o.logfile) } : {}),
    ...(o.logappend !== undefined ? { logappend: o.logappend === true } : {}),
  };
}

/** QEMU's qemu_chr_parse_socket(): server defaults off, wait defaults on (servers only). */
function socketBackend(o: Opts): ChardevBackend {
  const path = o.path as string | undefined;
  const host = o.host as string | undefined;
  const fd = o.fd as string | undefined;
  if ([path, host, fd].filter((v) => v !== undefined).length > 1) {
    throw genericError("None or one of 'path', 'fd' or 'host' option required.");
  }
  const server = o.server === true;
  let addr: Extract<ChardevBackend, { type: 'socket' }>['data']['addr'];
  if (path !== undefined) {
    addr = { type: 'unix', data: { path, ...(o.abstract !== undefined ? { abstract: o.abstract === true } : {}),
      ...(o.tight !== undefined ? { tight: o.tight === true } : {}) } };
  } else if (host !== undefined) {
    if (o.port === undefined) throw genericError('chardev: socket: no port given');
    addr = { type: 'inet', data: { host, port: String(o.port),
      ...(o.to !== undefined ? { to: Number(o.to) } : {}),
      ...(o.ipv4 !== undefined ? { ipv4: o.ipv4 === true } : {}),
      ...(o.ipv6 !== undefined ? { ipv6: o.ipv6 === true } : {}) } };
  } else {
    if (fd === undefined || !/^\d+$/.test(fd)) throw genericError(`Unable to parse FD number ${fd ?? ''}`);
    addr = { type: 'fd', data: { str: fd } };
  }
  return {
    type: 'socket',
    data: {
      ...common(o),
      addr,
      server,
      // QEMU records wait only when given, but a server waits unless told not to.
      ...(o.wait !== undefined ? { wait: o.wait === true } : server ? { wait: true } : {}),
      ...(o.nodelay !== undefined ? { nodelay: o.nodelay === true } : {}),
      ...(o.telnet !== undefined ? { telnet: o.telnet === true } : {}),
      ...(o.tn3270 !== undefined ? { tn3270: o.tn3270 === true } : {}),
      ...(o.websocket !== undefined ? { websocket: o.websocket === true } : {}),
      ...(o.reconnect !== undefined ? { reconnect: Number(o.reconnect) } : {}),
      ...(o['tls-creds'] !== undefined ? { 'tls-creds': String(o['tls-creds']) } : {}),
      ...(o['tls-authz'] !== undefined ? { 'tls-authz': String(o['tls-authz']) } : {}),
    },
  };
}

/** The ChardevBackend a parsed --chardev describes; throws QEMU's message for missing options. */
export function chardevBackendFromOpts(backend: string, parsed: ParsedQemuOpts): ChardevBackend {
  const o = parsed.options;
  switch (backend) {
    case 'null':
      return { type: 'null', data: common(o) };
    case 'stdio':
      return { type: 'stdio', data: { ...common(o), ...(o.signal !== undefined ? { signal: o.signal === true } : {}) } };
    case 'file':
      if (o.path === undefined) throw genericError('chardev: file: no filename given');
      return { type: 'file', data: { ...common(o), out: String(o.path), ...(o.append !== undefined ? { append: o.append === true } : {}) } };
    case 'pipe':
      if (o.path === undefined) throw genericError('chardev: pipe: no device path given');
      return { type: 'pipe', data: { ...common(o), device: String(o.path) } };
    case 'ringbuf':
    case 'memory': {
      const size = o.size !== undefined ? parseQemuOptSize('size', String(o.size)) : undefined;
      // The ring size is a size_t: anything that does not fit in an int64 is not a power of two we can hold.
      const data = { ...common(o), ...(size !== undefined ? { size: size < 2n ** 63n ? Number(size) : -1 } : {}) };
      return { type: backend, data };
    }
    case 'socket':
      return socketBackend(o);
    default:
      throw genericError(`'${backend}' is not a valid char driver name`);
  }
}
