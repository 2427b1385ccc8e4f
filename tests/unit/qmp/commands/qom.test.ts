// GHashTable order replay and the job pause/resume checks, against orders and messages seen on QSD 7.2.
import assert from 'node:assert/strict';
import { GHashOrder } from '../../../../src/qmp/commands/qom.js';
import { JobManager } from '../../../../src/jobs/job.js';
import { QmpError } from '../../../../src/qapi/errors.js';

describe('GHashOrder', () => {
  it('iterates like GLib for orders observed on qemu-storage-daemon 7.2', () => {
    // query-chardev returned these reversed; qom-list /objects likewise.
    assert.deepEqual(new GHashOrder(['t1', 't2', 't3', 't4', 'u2', 'qmp_mon']).order(), ['t3', 'u2', 't2', 't4', 't1', 'qmp_mon']);
    assert.deepEqual(new GHashOrder(['c1', 'c2', 'qmp_mon']).order(), ['c1', 'c2', 'qmp_mon']);
    assert.deepEqual(new GHashOrder(['objects', 'chardevs']).order(), ['chardevs', 'objects']);
    assert.deepEqual(new GHashOrder(['chardevs', 'objects']).order(), ['chardevs', 'objects']);
  });

  it('replays removals (tombstones) as GLib does', () => {
    const t = new GHashOrder(['a1', 'a2', 'a3']);
    t.remove('a2');
    t.insert('a4');
    assert.deepEqual(t.order(), ['a4', 'a1', 'a3']);
    // iotest 021: io0, a1..a5, then a2 and io0 deleted, a6 added.
    const u = new GHashOrder(['io0', 'a1', 'a2', 'a3', 'a4', 'a5']);
    u.remove('a2');
    u.remove('io0');
    u.insert('a6');
    assert.deepEqual(u.order().reverse(), ['a5', 'a3', 'a1', 'a6', 'a4']);
  });

  it('keeps every key through growth and shrinking', () => {
    const keys = Array.from({ length: 200 }, (_, i) => `k${i}`);
    const t = new GHashOrder(keys);
    assert.deepEqual([...t.order()].sort(), [...keys].sort());
    for (const k of keys.slice(0, 190)) t.remove(k);
    assert.deepEqual([...t.order()].sort(), keys.slice(190).sort());
    t.insert('k0');
    t.insert('k0');
    assert.equal(t.order().length, 11);
  });
});

describe('job-pause / job-resume', () => {
  const message = (fn: () => void) => {
    try {
      fn();
    } catch (err) {
      assert.ok(err instanceof QmpError);
      return err.message;
    }
    return 'no error';
  };

  it('follows QEMU: verb check, then the user pause flag', () => {
    const events: string[] = [];
    const jobs = new JobManager((_name, data) => events.push(String(data.status)));
    const job = jobs.create('job0', 'create');
    job.transition('running');
    assert.equal(message(() => job.resume()), "Can't resume a job that was not paused");
    job.pause();
    assert.equal(job.status, 'running', 'a create job has no pause point');
    assert.equal(message(() => job.pause()), 'Job is already paused');
    job.resume();
    job.pause();
    job.transition('concluded');
    assert.equal(message(() => job.resume()), "Job 'job0' in state 'concluded' cannot accept command verb 'resume'");
    assert.equal(message(() => job.pause()), "Job 'job0' in state 'concluded' cannot accept command verb 'pause'");
    assert.equal(message(() => jobs.find('nope')), 'Job not found');
    assert.deepEqual(events, ['created', 'running', 'concluded']);
  });
});
