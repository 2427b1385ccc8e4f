// Block jobs (QEMU's blockjob.c on job.c): rate limit, pause points, ready/complete, manual
// finalize and dismiss, and the BLOCK_JOB_* events, in QEMU 7.2's order.
import { genericError } from '../qapi/errors.js';
import { Job, type JobManager, type JobStatus } from './job.js';

/** QEMU's BLOCK_JOB_SLICE_TIME: the rate limit accounts in 100 ms slices. */
const SLICE_NS = 100_000_000;

/** QEMU's RateLimit (include/qemu/ratelimit.h): delay after `n` bytes at `speed` bytes/s. */
export class RateLimit {
  private sliceQuota = 0;
  private sliceStart = 0;
  private sliceEnd = 0;
  private dispatched = 0;

  setSpeed(speed: number): void {
    this.sliceQuota = speed === 0 ? 0 : Math.max((speed * SLICE_NS) / 1e9, 1);
  }

  /** Nanoseconds to wait after processing `n` bytes (0: go on). */
  delay(n: number): number {
    if (!this.sliceQuota) return 0;
    const now = Number(process.hrtime.bigint());
    if (this.sliceEnd < now) {
      this.sliceStart = now;
      this.sliceEnd = now + SLICE_NS;
      this.dispatched = 0;
    }
    this.dispatched += n;
    if (this.dispatched < this.sliceQuota) return 0;
    this.sliceEnd = this.sliceStart + Math.floor((this.dispatched / this.sliceQuota) * SLICE_NS);
    return this.sliceEnd - now;
  }
}

export interface BlockJobOptions {
  speed: number;
  autoFinalize: boolean;
  autoDismiss: boolean;
}

/** What a block job does around its run: QEMU's JobDriver prepare/abort/clean callbacks. */
export interface BlockJobHooks {
  /** The main loop: copy data. Throw to fail the job. */
  run(job: BlockJob): Promise<void>;
  /** Finalize (after 'pending'): make the graph change. Throw to fail the job. */
  prepare?(job: BlockJob): Promise<void>;
  /** The job failed or was cancelled. */
  abort?(job: BlockJob): Promise<void>;
  /** Always, last: drop the job's hold on its nodes. */
  clean?(job: BlockJob): Promise<void>;
  /** QEMU starts the job inside the command's drained section (backup): paused and running before the reply. */
  startsDrained?: boolean;
}

export class BlockJob extends Job {
  speed = 0;
  readonly autoFinalize: boolean;
  readonly autoDismiss: boolean;
  /** Not sleeping and not paused (query-block-jobs 'busy'). */
  busy = false;
  readonly limit = new RateLimit();
  /** job-complete was accepted (active commit pivots). */
  shouldComplete = false;
  /** block-job-cancel of a ready job: finish without the graph change (QEMU's soft cancel). */
  softCancelled = false;
  private wake: (() => void) | undefined;
  private sleepTimer: NodeJS.Timeout | undefined;
  private resumeWaiter: (() => void) | undefined;
  private finalizeWaiter: (() => void) | undefined;
  /** Set for the failed-before-start case (QEMU's job_early_fail). */
  private started = false;
  private markFinished!: () => void;
  /** Resolves once start() has run the job to 'concluded' (and 'null' with auto-dismiss). */
  readonly finished = new Promise<void>((resolve) => (this.markFinished = resolve));

  constructor(id: string, type: string, manager: JobManager, opts: BlockJobOptions) {
    super(id, type, manager);
    this.autoFinalize = opts.autoFinalize;
    this.autoDismiss = opts.autoDismiss;
    this.totalProgress = 0;
  }

  /** QEMU's block_job_set_speed(); also checked at creation (a bad speed fails the new job). */
  setSpeed(speed: number): void {
    if (this.started) this.checkVerb('set-speed');
    if (speed < 0) throw genericError("Parameter 'speed' expects a non-negative value");
    const old = this.speed;
    this.speed = speed;
    this.limit.setSpeed(speed);
    if (speed && speed <= old) return;
    if (this.sleepTimer !== undefined) this.kick();
  }

  /** Hard cancellation requested (QEMU's job_is_cancelled). */
  get isCancelled(): boolean {
    return this.cancelled;
  }

  override cancel(force = true): void {
    this.checkVerb('cancel');
    if (!force && this.status === 'ready') {
      this.softCancelled = true;
    } else {
      this.cancelled = true;
    }
    if (this.userPaused) {
      this.userPaused = false;
      this.resumeWaiter?.();
    }
    this.finalizeWaiter?.();
    this.kick();
  }

  override pause(): void {
    super.pause();
    this.kick();
  }

  override resume(): void {
    super.resume();
    this.resumeWaiter?.();
  }

  override complete(): void {
    this.checkVerb('complete');
    // QEMU refuses only a job being cancelled; a paused (standby) job completes once resumed.
    if (this.cancelled) throw genericError(`The active block job '${this.id}' cannot be completed`);
    this.shouldComplete = true;
    this.kick();
  }

  override finalize(): void {
    this.checkVerb('finalize');
    this.finalizeWaiter?.();
  }

  private kick(): void {
    const w = this.wake;
    this.wake = undefined;
    w?.();
  }

  /** QEMU's job_sleep_ns(): sleep unless a pause is due (cancel, pause, speed changes wake it), then a pause point. */
  async sleep(ns: number): Promise<void> {
    // As QEMU's job_sleep_ns: a job cancelled while it was busy (no sleeper to wake) does not sleep.
    if (!this.userPaused && !this.cancelled) {
      this.busy = false;
      await new Promise<void>((resolve) => {
        this.wake = resolve;
        if (ns <= 0) this.sleepTimer = setTimeout(resolve, 0);
        else this.sleepTimer = setTimeout(resolve, Math.min(ns / 1e6, 2 ** 31 - 1));
      });
      clearTimeout(this.sleepTimer);
      this.sleepTimer = undefined;
      this.wake = undefined;
      this.busy = true;
    }
    await this.pausePoint();
  }

  /** QEMU's job_pause_point(): a user-paused job stops here until resumed or cancelled. */
  async pausePoint(): Promise<void> {
    if (!this.userPaused || this.cancelled) return;
    const was: JobStatus = this.status;
    this.busy = false;
    // QEMU's job_pause_point: a ready job parks in 'standby' (still ready), any other in 'paused'.
    this.transition(was === 'ready' ? 'standby' : 'paused');
    while (this.userPaused && !this.cancelled) await new Promise<void>((r) => (this.resumeWaiter = r));
    this.resumeWaiter = undefined;
    this.transition(was === 'ready' ? 'ready' : 'running');
    this.busy = true;
  }

  /**
   * A drained section quiesced one of the job's nodes (QEMU's child_job drained_begin/end): a
   * running job passes through 'paused', a ready one through 'standby'; others show nothing.
   * `wakes`: the pause ends a rate-limit sleep early (not backup's, which block-copy owns).
   */
  drainPause(wakes = true): void {
    if (!this.started || this.userPaused) return;
    if (!this.passThroughPause()) return;
    // Pausing entered the job: a rate-limit sleep ends early, as QEMU's job_pause does.
    if (wakes && this.sleepTimer !== undefined) this.kick();
  }

  /**
   * A pause that ends at once (a drain): running → paused → running, ready → standby → ready,
   * with their JOB_STATUS_CHANGE events. false when the job is in neither state.
   */
  private passThroughPause(): boolean {
    if (this.status === 'running') {
      this.transition('paused');
      this.transition('running');
    } else if (this.status === 'ready') {
      this.transition('standby');
      this.transition('ready');
    } else {
      return false;
    }
    return true;
  }

  /** QEMU's job_transition_to_ready(): 'ready' and BLOCK_JOB_READY. */
  transitionToReady(): void {
    this.transition('ready');
    this.manager.emit('BLOCK_JOB_READY', this.eventData());
  }

  /** Waits, at the ready state, until job-complete or a cancel (with pause points). */
  async waitReady(): Promise<void> {
    while (!this.shouldComplete && !this.cancelled && !this.softCancelled) {
      this.busy = false;
      await new Promise<void>((resolve) => (this.wake = resolve));
      this.busy = true;
      await this.pausePoint();
    }
  }

  private eventData(error?: string): Record<string, unknown> {
    const data: Record<string, unknown> = {
      type: this.type, device: this.id, len: this.totalProgress, offset: this.currentProgress, speed: this.speed,
    };
    if (error !== undefined) data.error = error;
    return data;
  }

  /** The job failed before it started (bad speed, a node it cannot take): 'null' at once. */
  earlyFail(): void {
    this.manager.remove(this);
  }

  /** Runs the job through QEMU's states to 'concluded' (and 'null' with auto-dismiss). */
  async start(hooks: BlockJobHooks): Promise<void> {
    this.started = true;
    this.busy = true;
    this.transition('running');
    if (hooks.startsDrained) {
      this.transition('paused');
      this.transition('running');
    }
    let error: string | undefined;
    try {
      // QEMU enters the job's coroutine from the main loop: the command's reply goes out first.
      await new Promise((resolve) => setImmediate(resolve));
      await hooks.run(this);
    } catch (err) {
      error = (err as Error).message;
    }
    if (error === undefined && !this.cancelled) {
      this.busy = false;
      this.transition('waiting');
      this.transition('pending');
      if (!this.autoFinalize) {
        this.manager.emit('BLOCK_JOB_PENDING', { type: this.type, id: this.id });
        await new Promise<void>((resolve) => (this.finalizeWaiter = resolve));
        this.finalizeWaiter = undefined;
      }
      if (!this.cancelled) {
        try {
          await hooks.prepare?.(this);
        } catch (err) {
          error = (err as Error).message;
        }
      }
    }
    this.busy = false;
    if (error !== undefined || this.cancelled) {
      // query-jobs shows a cancelled job's error as QEMU words ECANCELED.
      this.error = error ?? 'Operation canceled';
      this.transition('aborting');
      await hooks.abort?.(this).catch(() => undefined);
    }
    await hooks.clean?.(this).catch(() => undefined);
    if (this.cancelled && error === undefined) this.manager.emit('BLOCK_JOB_CANCELLED', this.eventData());
    else this.manager.emit('BLOCK_JOB_COMPLETED', this.eventData(error));
    this.transition('concluded');
    if (this.autoDismiss) this.manager.remove(this);
    this.markFinished();
  }

  /**
   * The daemon exits (QEMU's bdrv_drain_all_begin + job_cancel_sync_all): a running or ready job
   * is paused by the drain and resumed by the cancel, then cancelled hard and awaited; a
   * concluded job is dismissed.
   */
  async cancelForExit(): Promise<void> {
    if (!this.started) return;
    if (this.status === 'concluded') {
      this.manager.remove(this);
      return;
    }
    this.passThroughPause();
    if (this.accepts('cancel')) this.cancel(true);
    await this.finished;
    // The await ran the job on: its status is whatever it reached, not what was checked above.
    if ((this.status as JobStatus) === 'concluded') this.manager.remove(this);
  }

  /** query-block-jobs' BlockJobInfo, members in QEMU's order. */
  blockInfo(): Record<string, unknown> {
    const out: Record<string, unknown> = {
      type: this.type,
      device: this.id,
      len: this.totalProgress,
      offset: this.currentProgress,
      busy: this.busy,
      paused: this.userPaused,
      speed: this.speed,
      'io-status': 'ok',
      ready: this.status === 'ready' || this.status === 'standby',
      status: this.status,
      'auto-finalize': this.autoFinalize,
      'auto-dismiss': this.autoDismiss,
    };
    if (this.error !== undefined) out.error = this.error;
    return out;
  }
}
