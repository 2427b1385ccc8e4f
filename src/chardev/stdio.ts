// The stdio chardev: a monitor reads stdin and writes stdout; only one may exist per process.
import { Chardev } from './chardev.js';
import { genericError } from '../qapi/errors.js';

/**
 * QEMU's stdio_in_use: set when a stdio chardev opens. QEMU 7.2 clears it when any stdio chardev
 * is finalized, even one that failed to open, so after a refused add the next one succeeds.
 */
let stdioInUse = false;

/**
 * QEMU closes fds 0 and 1 when a stdio chardev that did open is finalized (removed or changed
 * away); every stdio chardev opened afterwards fails on fd 0. We keep our fds (our own logging
 * needs them) and give QEMU's answer.
 */
let stdinClosed = false;

/** Set by main.ts in the background child of --daemonize (its stdio is /dev/null). */
const DAEMONIZED_ENV = 'QSD_TS_DAEMONIZED';

export class StdioChardev extends Chardev {
  readonly qomType = 'chardev-stdio';

  filename(): string {
    return 'stdio';
  }

  /** This one opened (a refused one closes no fd when finalized). */
  private opened = false;

  /** QEMU's checks in QEMU's order; the in-use flag is taken before the fd is touched. */
  protected async openBackend(): Promise<void> {
    if (process.env[DAEMONIZED_ENV] === '1') throw genericError('cannot use stdio with -daemonize');
    if (stdioInUse) throw genericError('cannot use stdio by multiple character devices');
    stdioInUse = true;
    if (stdinClosed) throw genericError('Failed to set FD nonblocking: Bad file descriptor');
    this.opened = true;
  }

  protected async closeBackend(): Promise<void> {
    stdioInUse = false;
    if (this.opened) stdinClosed = true;
    this.opened = false;
    if (this.frontend) process.stdin.pause();
  }

  protected startFrontend(): void {
    const out = process.stdout;
    const handler = this.connectStream({
      write: (text) => out.write(text),
      get pendingOutput() {
        return out.writableLength;
      },
      pauseInput: () => process.stdin.pause(),
      resumeInput: () => process.stdin.resume(),
      close: () => undefined,
    });
    if (!handler) return;
    process.stdin.on('data', (chunk: Buffer) => handler.feed(chunk));
    // End of input: what was received still runs and is answered; the daemon keeps running.
    process.stdin.on('end', () => handler.inputEnded());
    process.stdin.on('error', () => handler.closed());
  }
}
