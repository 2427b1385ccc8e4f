// Background jobs (QEMU's job.c): the state machine, JOB_STATUS_CHANGE events, query-jobs and the
// job-* verbs; blockdev-create jobs run here, block jobs (block-job.ts) build on it.
import { genericError } from '../qapi/errors.js';
import { idWellformed } from '../block/graph.js';

export type JobStatus =
  | 'undefined' | 'created' | 'running' | 'paused' | 'ready' | 'standby' | 'waiting'
  | 'pending' | 'aborting' | 'concluded' | 'null';

export type JobVerb = 'cancel' | 'pause' | 'resume' | 'set-speed' | 'complete' | 'finalize' | 'dismiss' | 'change';

/** Which verbs each state accepts (QEMU's JobVerbTable, for the verbs we implement). */
const VERBS: Record<JobVerb, JobStatus[]> = {
  cancel: ['created', 'running', 'paused', 'ready', 'standby', 'pending'],
  pause: ['created', 'running', 'paused', 'ready', 'standby'],
  resume: ['created', 'running', 'paused', 'ready', 'standby'],
  'set-speed': ['created', 'running', 'paused', 'ready', 'standby'],
  complete: ['ready', 'standby'],
  finalize: ['pending'],
  dismiss: ['concluded'],
  change: ['running', 'ready'],
};

export class Job {
  status: JobStatus = 'undefined';
  error?: string;
  currentProgress = 0;
  totalProgress = 1;
  protected cancelled = false;
  /**
   * Set by job-pause, cleared by job-resume. Our jobs have no pause points (as QEMU's create jobs
   * have none), so the status stays 'running' and the job still concludes, as on QEMU.
   */
  userPaused = false;

  constructor(
    readonly id: string,
    readonly type: string,
    protected readonly manager: JobManager,
  ) {}

  transition(status: JobStatus): void {
    this.status = status;
    this.manager.emit('JOB_STATUS_CHANGE', { id: this.id, status });
  }

  /** Whether the current state takes the verb (QEMU's JobVerbTable). */
  accepts(verb: JobVerb): boolean {
    return VERBS[verb].includes(this.status);
  }

  checkVerb(verb: JobVerb): void {
    if (!this.accepts(verb)) {
      throw genericError(`Job '${this.id}' in state '${this.status}' cannot accept command verb '${verb}'`);
    }
  }

  /** Run body to completion through QEMU's states (auto-finalize, manual dismiss). */
  async run(body: () => Promise<void>): Promise<void> {
    this.transition('running');
    let failed: unknown;
    try {
      await body();
    } catch (err) {
      failed = err;
    }
    // A create job counts its one step as done whether the driver succeeded or not (QEMU's
    // blockdev_create_run updates progress after bdrv_co_create returns either way).
    this.currentProgress = this.totalProgress;
    try {
      if (failed !== undefined) throw failed;
      if (this.cancelled) throw new Error('Job was cancelled');
      this.transition('waiting');
      this.transition('pending');
    } catch (err) {
      this.error = this.cancelled ? undefined : (err as Error).message;
      this.transition('aborting');
    }
    this.transition('concluded');
  }

  /** job-pause: QEMU checks the verb first, then that the user has not paused it already. */
  pause(): void {
    this.checkVerb('pause');
    if (this.userPaused) throw genericError('Job is already paused');
    this.userPaused = true;
  }

  /** job-resume: QEMU checks the user pause first, then the verb. */
  resume(): void {
    if (!this.userPaused) throw genericError("Can't resume a job that was not paused");
    this.checkVerb('resume');
    this.userPaused = false;
  }

  /** job-cancel (force) and block-job-cancel. */
  cancel(_force = true): void {
    this.checkVerb('cancel');
    this.cancelled = true;
  }

  /** job-complete: only jobs that reach 'ready' (block jobs) accept it. */
  complete(): void {
    this.checkVerb('complete');
  }

  /** job-finalize: only jobs with auto-finalize off wait in 'pending' (block jobs). */
  finalize(): void {
    this.checkVerb('finalize');
  }

  info(): Record<string, unknown> {
    const out: Record<string, unknown> = {
      id: this.id,
      type: this.type,
      status: this.status,
      'current-progress': this.currentProgress,
      'total-progress': this.totalProgress,
    };
    if (this.error !== undefined) out.error = this.error;
    return out;
  }
}

export class JobManager {
  private readonly jobs = new Map<string, Job>();

  constructor(readonly emit: (event: string, data: Record<string, unknown>) => void) {}

  create(id: string, type: string): Job {
    return this.register(id, (jobId) => new Job(jobId, type, this));
  }

  /** QEMU's job_create(): check the id, build the job, announce 'created'. */
  register<J extends Job>(id: string, build: (id: string) => J): J {
    if (!idWellformed(id)) throw genericError(`Invalid job ID '${id}'`);
    if (this.jobs.has(id)) throw genericError(`Job ID '${id}' already in use`);
    const job = build(id);
    this.jobs.set(id, job);
    job.transition('created');
    return job;
  }

  /** The job is gone (dismissed, or failed before it started): 'null' and out of the lists. */
  remove(job: Job): void {
    job.transition('null');
    this.jobs.delete(job.id);
  }

  find(id: string): Job {
    const job = this.jobs.get(id);
    if (!job) throw genericError('Job not found');
    return job;
  }

  dismiss(id: string): void {
    const job = this.find(id);
    job.checkVerb('dismiss');
    this.remove(job);
  }

  /** Every job, oldest first (shutdown cancels them in this order). */
  all(): Job[] {
    return [...this.jobs.values()];
  }

  /** Jobs newest first, as QEMU's query-jobs lists them. */
  list(): Job[] {
    return [...this.jobs.values()].reverse();
  }
}
