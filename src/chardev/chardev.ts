// The chardev base class: identity, the frontend (a QMP monitor) and the optional logfile.
import fs from 'node:fs';
import type { ChardevBackend, ChardevBackendKind, ChardevCommon } from '../qapi/generated/types.js';
import { genericError } from '../qapi/errors.js';
import { strerror } from '../util/errno.js';

/** One open byte stream of a chardev as its frontend sees it (a socket connection, stdio, a file). */
export interface ChardevStream {
  /** Output from the frontend (a monitor's replies); also copied to the logfile. */
  write(text: string): void;
  /** Bytes written but not yet taken by the peer. */
  readonly pendingOutput: number;
  pauseInput(): void;
  resumeInput(): void;
  /** The frontend is done with this stream (after input ended): close our side. */
  close(): void;
}

/** The frontend's side of one stream; the chardev calls these as input arrives. */
export interface ChardevStreamHandler {
  feed(chunk: Buffer): void;
  /** The peer sent EOF; output still works. */
  inputEnded(): void;
  /** The stream is gone. */
  closed(): void;
}

/** A frontend (QEMU's CharBackend): qsd-ts has one kind, the QMP monitor. */
export interface ChardevFrontend {
  /** Called for every stream that opens while the frontend is attached. */
  connect(stream: ChardevStream): ChardevStreamHandler;
}

/** Context a chardev needs from the daemon (kept narrow so chardevs don't import the daemon). */
export interface ChardevHost {
  /** "qsd-ts": the prefix of messages printed outside any monitor command. */
  readonly programName: string;
}

/** Options after the backend's wrapper is taken off: ChardevCommon plus the backend's members. */
export type ChardevData<T extends ChardevBackendKind> = Extract<ChardevBackend, { type: T }>['data'];

/**
 * A character device. Subclasses open their backend in open() (throwing QmpError with QEMU's
 * message, without the "Failed to add chardev" prefix QMP adds) and release it in close().
 */
export abstract class Chardev {
  /** The attached frontend; QEMU calls a chardev with one "busy". */
  frontend?: ChardevFrontend;
  private logFd?: number;

  constructor(
    readonly host: ChardevHost,
    readonly id: string,
    readonly backend: ChardevBackend,
  ) {}

  /** The QOM type ('chardev-socket'), as qom-list /chardevs shows it. */
  abstract readonly qomType: string;

  /** query-chardev's filename. */
  abstract filename(): string;

  /** Open the backend; the logfile is already open. */
  protected abstract openBackend(): Promise<void>;

  /** Release the backend (sockets, fds, files at socket paths). Idempotent. */
  protected abstract closeBackend(): Promise<void>;

  /** The frontend was just attached: connect it (connectStream) to each stream open now. */
  protected abstract startFrontend(): void;

  /** Whether the frontend has the chardev open (query-chardev's frontend-open). */
  get frontendOpen(): boolean {
    return this.frontend !== undefined;
  }

  /** Opens the logfile (QEMU does so first), then the backend; on failure nothing stays open. */
  async open(): Promise<void> {
    const common = this.backend.data as ChardevCommon;
    if (common.logfile !== undefined) {
      const flags = fs.constants.O_WRONLY | fs.constants.O_CREAT | (common.logappend ? fs.constants.O_APPEND : fs.constants.O_TRUNC);
      try {
        this.logFd = fs.openSync(common.logfile, flags, 0o666);
      } catch (err) {
        throw genericError(`Could not create '${common.logfile}': ${strerror(err)}`);
      }
    }
    try {
      await this.openBackend();
    } catch (err) {
      await this.close();
      throw err;
    }
  }

  async close(): Promise<void> {
    await this.closeBackend();
    if (this.logFd !== undefined) {
      fs.closeSync(this.logFd);
      this.logFd = undefined;
    }
  }

  /** Attach the frontend and connect it to the streams already open. */
  attachFrontend(frontend: ChardevFrontend): void {
    this.frontend = frontend;
    this.startFrontend();
  }

  /** chardev-send-break: only serial and socket-telnet chardevs act on it, and qsd-ts has neither. */
  sendBreak(): void {}

  /** Tell the frontend about a new stream; returns the handler, or undefined without a frontend. */
  protected connectStream(stream: ChardevStream): ChardevStreamHandler | undefined {
    if (!this.frontend) return undefined;
    const logged: ChardevStream = {
      write: (text) => {
        this.log(text);
        stream.write(text);
      },
      get pendingOutput() {
        return stream.pendingOutput;
      },
      pauseInput: () => stream.pauseInput(),
      resumeInput: () => stream.resumeInput(),
      close: () => stream.close(),
    };
    return this.frontend.connect(logged);
  }

  /** QEMU's qemu_chr_write_log: everything the frontend writes also goes to the logfile. */
  protected log(data: string | Uint8Array): void {
    if (this.logFd === undefined) return;
    try {
      fs.writeSync(this.logFd, typeof data === 'string' ? Buffer.from(data) : data);
    } catch {
      /* QEMU ignores logfile write errors too */
    }
  }
}
