// BlockJob: QEMU's state sequence and events for success, cancel, manual finalize/dismiss, pause,
// ready/complete; RateLimit's delays.
import assert from 'node:assert/strict';
import { BlockJob, RateLimit } from '../../../src/jobs/block-job.js';
import { JobManager } from '../../../src/jobs/job.js';

function setup(opts: { autoFinalize?: boolean; autoDismiss?: boolean } = {}) {
  const events: string[] = [];
  const jobs = new JobManager((name, data) => events.push(name === 'JOB_STATUS_CHANGE' ? String(data.status) : name));
  const job = jobs.register('j', (id) => new BlockJob(id, 'commit', jobs, {
    speed: 0, autoFinalize: opts.autoFinalize ?? true, autoDismiss: opts.autoDismiss ?? true,
  }));
  return { events, jobs, job };
}

const tick = () => new Promise((r) => setTimeout(r, 5));

describe('BlockJob', () => {
  it('runs created, running, waiting, pending, COMPLETED, concluded, null', async () => {
    const { events, jobs, job } = setup();
    const order: string[] = [];
    await job.start({ async run() { order.push('run'); }, async prepare() { order.push('prepare'); }, async clean() { order.push('clean'); } });
    assert.deepEqual(events, ['created', 'running', 'waiting', 'pending', 'BLOCK_JOB_COMPLETED', 'concluded', 'null']);
    assert.deepEqual(order, ['run', 'prepare', 'clean']);
    assert.equal(jobs.list().length, 0);
  });

  it('a cancelled job aborts: aborting, CANCELLED, concluded; it keeps "Operation canceled" until dismissed', async () => {
    const { events, jobs, job } = setup({ autoDismiss: false });
    let prepared = false;
    const done = job.start({ async run(j) { for (;;) { await j.sleep(1e9); if (j.isCancelled) return; } }, async prepare() { prepared = true; } });
    await tick();
    assert.equal(job.busy, false);
    job.cancel(true);
    await done;
    assert.equal(prepared, false);
    assert.deepEqual(events, ['created', 'running', 'aborting', 'BLOCK_JOB_CANCELLED', 'concluded']);
    assert.equal(job.info().error, 'Operation canceled');
    jobs.dismiss('j');
    assert.equal(events.at(-1), 'null');
  });

  it('a failing run reports its error in BLOCK_JOB_COMPLETED', async () => {
    const { events, job } = setup({ autoDismiss: false });
    await job.start({ async run() { throw new Error('boom'); } });
    assert.deepEqual(events, ['created', 'running', 'aborting', 'BLOCK_JOB_COMPLETED', 'concluded']);
    assert.equal(job.blockInfo().error, 'boom');
  });

  it('waits in pending for finalize when auto-finalize is off', async () => {
    const { events, job } = setup({ autoFinalize: false });
    assert.throws(() => job.finalize(), /cannot accept command verb 'finalize'/);
    const done = job.start({ async run() {} });
    await tick();
    assert.equal(job.status, 'pending');
    assert.ok(events.includes('BLOCK_JOB_PENDING'));
    job.finalize();
    await done;
    assert.deepEqual(events.slice(-3), ['BLOCK_JOB_COMPLETED', 'concluded', 'null']);
  });

  it('pauses at its next pause point and resumes where it was', async () => {
    const { events, job } = setup();
    let steps = 0;
    const done = job.start({ async run(j) { while (steps < 3) { await j.sleep(steps === 0 ? 1e9 : 0); steps++; } } });
    await tick();
    job.pause();
    await tick();
    assert.equal(job.status, 'paused');
    assert.equal(job.blockInfo().paused, true);
    assert.throws(() => job.pause(), /Job is already paused/);
    job.resume();
    await done;
    assert.deepEqual(events.slice(0, 4), ['created', 'running', 'paused', 'running']);
    assert.equal(steps, 3);
  });

  it('ready: complete is refused before, accepted after; a soft cancel completes without failing', async () => {
    const { events, job } = setup();
    assert.throws(() => job.complete(), /cannot accept command verb 'complete'/);
    const done = job.start({ async run(j) { j.transitionToReady(); await j.waitReady(); } });
    await tick();
    assert.equal(job.blockInfo().ready, true);
    job.cancel(false);
    await done;
    assert.equal(job.softCancelled, true);
    assert.deepEqual(events, ['created', 'running', 'ready', 'BLOCK_JOB_READY', 'waiting', 'pending', 'BLOCK_JOB_COMPLETED', 'concluded', 'null']);
  });

  it('refuses a negative speed; a new job with one fails early (created, null)', () => {
    const { events, job } = setup();
    assert.throws(() => job.setSpeed(-1), /Parameter 'speed' expects a non-negative value/);
    job.earlyFail();
    assert.deepEqual(events, ['created', 'null']);
  });
});

describe('RateLimit', () => {
  it('lets a slice quota through, then delays in proportion', () => {
    const rl = new RateLimit();
    assert.equal(rl.delay(1 << 20), 0, 'no speed: no delay');
    rl.setSpeed(1 << 20); // 1 MiB/s: 104857.6 bytes per 100 ms slice
    assert.equal(rl.delay(65536), 0);
    const d = rl.delay(1 << 20);
    assert.ok(d > 0.9e9 && d < 1.2e9, `delay ${d}`);
  });
});
