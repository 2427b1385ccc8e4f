// One QMP monitor session: greeting, capabilities negotiation, framing and ordered replies.
// Each client of a socket gets its own Monitor (its own negotiation state).
import { QmpJsonStreamParser, formatQmpJson } from './json.js';
import { dispatch, type QmpResponse } from './dispatch.js';
import type { QmpEvent } from './events.js';
import type { Daemon } from '../daemon.js';
import type { CommandHandler } from './commands/types.js';

/** Requests buffered before we stop reading (QEMU allows 8 in flight with OOB, 1 without). */
const MAX_QUEUED_REQUESTS = 8;
/** Output a client has not read before we stop reading its input (it must read to go on). */
const MAX_QUEUED_OUTPUT = 16 << 20;
/** The longest JSON token we accept from a client (QEMU's is 64 MiB; keep memory bounded). */
export const MAX_TOKEN_SIZE = 16 << 20;

/** Where a monitor reads and writes (a socket connection or stdio). */
export interface MonitorTransport {
  write(text: string): void;
  /** Bytes written but not yet taken by the peer. */
  readonly pendingOutput: number;
  pauseInput(): void;
  resumeInput(): void;
  close(): void;
}

export class Monitor {
  negotiating = true;
  oobEnabled = false;
  private readonly parser: QmpJsonStreamParser;
  private readonly queue: Array<{ request?: unknown; parseError?: string }> = [];
  private busy = false;
  private closed = false;
  private inputPaused = false;
  private inputEnd = false;

  constructor(
    readonly daemon: Daemon,
    private readonly transport: MonitorTransport,
    private readonly pretty: boolean,
  ) {
    this.parser = new QmpJsonStreamParser(
      (request) => this.enqueue({ request }),
      (parseError) => this.enqueue({ parseError }),
      { maxTokenSize: MAX_TOKEN_SIZE },
    );
    daemon.monitors.add(this);
    this.send({ QMP: { version: daemon.version(), capabilities: ['oob'] } });
  }

  /** Raw input from the transport. */
  feed(chunk: Buffer): void {
    if (!this.closed) this.parser.feed(chunk);
  }

  /**
   * The client sent EOF (e.g. `printf … | socat`): as QEMU does, run what was already received
   * and send its replies, then close our side. A partial message left over is dropped, as QEMU
   * drops its parser's state on disconnect.
   */
  inputEnded(): void {
    this.inputEnd = true;
    if (!this.busy && this.queue.length === 0) this.finishAfterInputEnd();
  }

  private finishAfterInputEnd(): void {
    this.close();
    this.transport.close();
  }

  /** The transport closed. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.daemon.monitors.delete(this);
  }

  private send(value: unknown): void {
    if (this.closed) return;
    // formatQmpJson prints members in QEMU's QDict order and, when pretty, ends lines in CRLF
    // as QEMU's monitor does; every message ends in CRLF.
    this.transport.write(formatQmpJson(value, this.pretty) + '\r\n');
    if (this.transport.pendingOutput > MAX_QUEUED_OUTPUT) this.pauseInput();
  }

  sendEvent(ev: QmpEvent): void {
    if (!this.negotiating) this.send(ev);
  }

  private pauseInput(): void {
    if (!this.inputPaused) {
      this.inputPaused = true;
      this.transport.pauseInput();
    }
  }

  private maybeResumeInput(): void {
    if (this.inputPaused && this.queue.length < MAX_QUEUED_REQUESTS && this.transport.pendingOutput <= MAX_QUEUED_OUTPUT) {
      this.inputPaused = false;
      this.transport.resumeInput();
    }
  }

  private enqueue(item: { request?: unknown; parseError?: string }): void {
    this.queue.push(item);
    if (this.queue.length >= MAX_QUEUED_REQUESTS) this.pauseInput();
    void this.drainQueue();
  }

  /** Commands run one at a time, in order, as on QEMU's monitor without OOB. */
  private async drainQueue(): Promise<void> {
    if (this.busy) return;
    this.busy = true;
    try {
      // Like QEMU, whose main loop first runs once every command-line option is done: a piped
      // stdio monitor must not run commands before the --blockdev/--export after it exist.
      if (!this.daemon.started) await this.daemon.startup;
      while (this.queue.length > 0 && !this.closed) {
        const item = this.queue.shift()!;
        let rsp: QmpResponse;
        if (item.parseError !== undefined) {
          rsp = { error: { class: 'GenericError', desc: item.parseError } };
        } else {
          rsp = await dispatch(item.request, { daemon: this.daemon, monitor: this }, {
            commands: this.negotiating ? this.negotiationCommands : this.daemon.commands,
            oobEnabled: this.oobEnabled,
            negotiating: this.negotiating,
          });
        }
        this.send(rsp);
        this.maybeResumeInput();
        if (this.daemon.exitRequested) this.daemon.requestExit();
        // QEMU's monitor dispatches from the main loop, so jobs and I/O get a turn between two
        // queued commands (a job started by one has run on before the next is looked at).
        if (this.queue.length > 0) await new Promise((resolve) => setImmediate(resolve));
      }
    } finally {
      this.busy = false;
      if (this.inputEnd && this.queue.length === 0) this.finishAfterInputEnd();
    }
  }

  private get negotiationCommands(): Record<string, CommandHandler> {
    const qmpCapabilities = this.daemon.commands.qmp_capabilities;
    return { qmp_capabilities: qmpCapabilities };
  }
}
