// The daemon's state: graph, exports, iothreads, chardevs and monitors, and the orderly shutdown.
import { BlockGraph } from './block/graph.js';
import { ExportManager } from './exports/manager.js';
import { IoThread } from './iothread/iothread.js';
import type { Chardev } from './chardev/chardev.js';
import type { Monitor } from './qmp/connection.js';
import { makeEvent } from './qmp/events.js';
import type { CommandHandler } from './qmp/commands/types.js';
import { allCommands } from './qmp/commands/index.js';
import { log } from './log.js';
import { JobManager } from './jobs/job.js';
import { BlockJob } from './jobs/block-job.js';
import { PACKAGE_VERSION, QEMU_VERSION } from './version.js';
import { PROGRAM_NAME } from './util/report.js';

export class Daemon {
  /** error_report()'s prefix (the basename of argv[0]). */
  readonly programName = PROGRAM_NAME;
  readonly graph = new BlockGraph();
  readonly exports: ExportManager;
  /** User-creatable objects by id, in creation order (qom-list /objects). */
  readonly objects = new Map<string, IoThread>();
  /** QEMU creates /objects with the first user-creatable object; it stays afterwards. */
  objectsContainer = false;
  readonly chardevs = new Map<string, Chardev>();
  /** Chardevs still opening (a server with wait=on waiting for its client): shutdown closes them too. */
  readonly openingChardevs = new Set<Chardev>();
  readonly monitors = new Set<Monitor>();
  readonly jobs = new JobManager((name, data) => this.emitEvent(name, data));
  readonly commands: Record<string, CommandHandler> = allCommands;
  /** True once the command line is processed (main.ts); monitors run commands only then. */
  started = false;
  private markStarted!: () => void;
  /** Resolves when the command line is processed (or startup failed and the daemon exits). */
  readonly startup = new Promise<void>((resolve) => {
    this.markStarted = resolve;
  });
  /** Set by quit and signals; the main loop winds down once the current command answered. */
  exitRequested = false;
  private shuttingDown?: Promise<void>;
  /** Called once everything is closed (main.ts removes the pidfile and exits). */
  onExit: (code: number) => void = (code) => process.exit(code);

  /** QEMU's daemon runs until quit or a signal, whatever else the loop has (or lacks) to do. */
  private readonly keepAlive = setInterval(() => undefined, 1 << 30);

  /** The command line is done: monitors start running the commands they received. */
  startupDone(): void {
    this.started = true;
    this.markStarted();
  }

  constructor() {
    this.exports = new ExportManager({
      graph: this.graph,
      iothread: (id) => this.objects.get(id),
      emitEvent: (name, data) => this.emitEvent(name, data),
    });
  }

  version() {
    return { qemu: QEMU_VERSION, package: `qsd-ts ${PACKAGE_VERSION}` };
  }

  emitEvent(name: string, data?: Record<string, unknown>): void {
    const ev = makeEvent(name, data);
    for (const monitor of this.monitors) monitor.sendEvent(ev);
  }

  /** quit / SIGTERM: close exports first (their events go out before quit's reply), then exit. */
  async closeExports(): Promise<void> {
    this.exitRequested = true;
    await this.exports.closeAll();
    await this.cancelJobs();
  }

  /** QEMU cancels the jobs that are left (job_cancel_sync_all) before it closes the graph. */
  private async cancelJobs(): Promise<void> {
    for (const job of this.jobs.all()) if (job instanceof BlockJob) await job.cancelForExit();
  }

  /** Finish shutting down; idempotent. */
  requestExit(): Promise<void> {
    this.exitRequested = true;
    this.shuttingDown ??= this.shutdown();
    return this.shuttingDown;
  }

  private async shutdown(): Promise<void> {
    try {
      await this.exports.closeAll();
      await this.cancelJobs();
      await this.graph.closeAll();
      for (const iothread of this.objects.values()) await iothread.stop();
      for (const chardev of [...this.openingChardevs, ...this.chardevs.values()]) await chardev.close();
    } catch (err) {
      log.error({ err }, 'error during shutdown');
    }
    clearInterval(this.keepAlive);
    this.onExit(0);
  }
}
