// QMP monitors on chardevs (--monitor chardev=…): one Monitor per stream the chardev opens.
import { Monitor } from './connection.js';
import type { Daemon } from '../daemon.js';
import type { Chardev } from '../chardev/chardev.js';

export type { Chardev } from '../chardev/chardev.js';

/**
 * Make `chardev` a QMP monitor: each stream it opens (every client of a socket, or stdio, a file,
 * a pipe) gets its own Monitor, which greets, negotiates and answers on that stream.
 */
export function attachMonitor(daemon: Daemon, chardev: Chardev, pretty: boolean): void {
  chardev.attachFrontend({
    connect(stream) {
      const monitor = new Monitor(daemon, stream, pretty);
      return {
        feed: (chunk) => monitor.feed(chunk),
        inputEnded: () => monitor.inputEnded(),
        closed: () => monitor.close(),
      };
    },
  });
}
