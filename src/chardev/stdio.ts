// The stdio chardev: a monitor reads stdin and writes stdout; only one may exist per process.
import { Chardev } from './chardev.js';
import { genericError } from '../qapi/errors.js';

/**
 * QEMU's stdio_in_use: set when a stdio chardev opens. QEMU 7.2 clears it when any stdio chardev
 * is finalized, even one that failed to open, so after a refused add the next one succeeds.
 */
let stdioInUse = false;

export class StdioChardev extends Chardev {
  readonly qomType = 'chardev-stdio';

  filename(): string {
    return 'stdio';
  }

  protected async openBackend(): Promise<void> {
    if (stdioInUse) throw genericError('cannot use stdio by multiple character devices');
    stdioInUse = true;
  }

  protected async closeBackend(): Promise<void> {
    stdioInUse = false;
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
