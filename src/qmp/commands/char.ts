// Commands of QEMU's char.json for the chardevs qsd-ts has (socket servers and stdio, from --chardev).
import type { CommandHandler } from './types.js';
import type { Chardev } from '../server.js';
import { chardevAddress, chardevConnected, chardevOrder } from './qom.js';

/** The filename QEMU shows for a chardev (qemu_chr_compute_filename / SocketAddress_to_str). */
function chardevFilename(chardev: Chardev): string {
  const opts = chardev.options;
  if (opts.backend === 'stdio') return 'stdio';
  const socket = chardevConnected(chardev) ? chardev['sockets'].values().next().value : undefined;
  if (socket && opts.path !== undefined) return `unix:${opts.path},server=on`;
  if (socket) {
    const wrap = (a?: string) => (a?.includes(':') ? `[${a}]` : a ?? '');
    return `tcp:${wrap(socket.localAddress)}:${socket.localPort},server=on <-> ${wrap(socket.remoteAddress)}:${socket.remotePort}`;
  }
  const addr = chardevAddress(chardev)!;
  const where = addr.type === 'unix' ? `unix:${addr.path}` : addr.type === 'fd' ? `fd:${addr.str}` : `tcp:${addr.host}:${addr.port}`;
  return `disconnected:${where},server=on`;
}

/** Whether a frontend (a monitor) has the chardev open. */
function frontendOpen(chardev: Chardev): boolean {
  if (chardev.options.backend === 'socket') return chardev.monitorConfig !== undefined;
  // A stdio monitor is attached by listening on stdin; nothing else in the daemon reads it.
  return process.stdin.listenerCount('data') > 0;
}

export const charCommands: Record<string, CommandHandler> = {
  // QEMU walks the chardev container (GHashTable order) and prepends: the list comes out reversed.
  'query-chardev': (_args, { daemon }) =>
    chardevOrder(daemon).reverse().map((c) => ({ label: c.id, filename: chardevFilename(c), 'frontend-open': frontendOpen(c) })),
  // QEMU 7.2 lists its backends in registration order; these are the two qsd-ts has, in that order.
  'query-chardev-backends': () => [{ name: 'stdio' }, { name: 'socket' }],
};
