// -T/--trace: QEMU 7.2's listing, option help, warnings, events files and log-file errors.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { traceOption } from '../../../src/cli/trace.js';
import { TRACE_EVENT_NAMES } from '../../../src/cli/trace-events.js';

const P = 'qemu-storage-daemon';
const run = (arg: string) => traceOption(arg, P, `-T ${arg}`);

describe('cli/trace', () => {
  let dir: string;
  before(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qsd-trace-'));
  });
  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  it('lists the event names for help, ? and enable=help, exit 0', () => {
    for (const arg of ['help', '?', 'enable=help', 'enable=help,file=/dev/null']) {
      const r = run(arg);
      assert.deepEqual(r.exit, { code: 0, stdout: TRACE_EVENT_NAMES.map((n) => `${n}\n`).join('') }, arg);
      assert.equal(r.stderr, '');
    }
    assert.equal(TRACE_EVENT_NAMES.length, 605);
    assert.equal(TRACE_EVENT_NAMES[0], 'breakpoint_insert');
  });

  it('prints the option list for a help flag, exit 1', () => {
    for (const arg of ['foo,help', 'enable=x,?', 'file=/dev/null,help', 'foo,help,bogus=1']) {
      assert.deepEqual(run(arg).exit, { code: 1, stdout: 'trace options:\n  enable=<str>\n  events=<str>\n  file=<str>\n' }, arg);
    }
  });

  it('reports option errors at the option, after the warnings', () => {
    assert.deepEqual(run('bogus=1'), { stderr: `${P}: -T bogus=1: Invalid parameter 'bogus'\n`, exit: { code: 1 } });
    assert.deepEqual(run('help=on').stderr, `${P}: -T help=on: Invalid parameter 'help'\n`);
    assert.equal(run('enable=help,bogus').stderr,
      `${P}: -T enable=help,bogus: warning: short-form boolean option 'bogus' deprecated\nPlease use bogus=on instead\n` +
      `${P}: -T enable=help,bogus: Invalid parameter 'bogus'\n`);
  });

  it("warns about names that match no event; '*' patterns never warn; the last enable counts", () => {
    const warn = (arg: string, name: string) => `${P}: -T ${arg}: warning: trace event '${name}' does not exist\n`;
    assert.deepEqual(run('nope'), { stderr: warn('nope', 'nope') });
    assert.deepEqual(run('-nope'), { stderr: warn('-nope', 'nope') });
    assert.deepEqual(run('nope?'), { stderr: warn('nope?', 'nope?') });
    assert.deepEqual(run('enable='), { stderr: warn('enable=', '') });
    assert.deepEqual(run('enable=a,,b'), { stderr: warn('enable=a,,b', 'a,b') });
    assert.deepEqual(run('enable=nope,enable=qmp_job_pause'), { stderr: '' });
    assert.deepEqual(run('enable=qmp_job_pause,enable=x'), { stderr: warn('enable=qmp_job_pause,enable=x', 'x') });
    for (const ok of ['qmp_job_pause', '-qmp_job_pause', 'qmp_job_paus?', 'nope*', '', 'id=x,enable=qmp_job_*']) {
      assert.deepEqual(run(ok), { stderr: '' }, ok);
    }
  });

  it('reads events files as fgets lines, warning with file and line', () => {
    const ev = path.join(dir, 'ev');
    fs.writeFileSync(ev, 'foo\n#c\n\n-qmp_job_pause\nqmp_job_*\nbar baz\nx\nnope');
    assert.deepEqual(traceOption(`events=${ev}`, P, `-T events=${ev}`), {
      stderr: `${P}:${ev}:1: warning: trace event 'foo' does not exist\n` +
        `${P}:${ev}:6: warning: trace event 'bar baz' does not exist\n` +
        `${P}:${ev}:7: warning: trace event 'x' does not exist\n` +
        `${P}:${ev}:8: warning: trace event 'nop' does not exist\n`,
    });
    const missing = path.join(dir, 'missing');
    assert.deepEqual(traceOption(`events=${missing},enable=x`, P, 'L'), {
      stderr: `${P}: L: warning: trace event 'x' does not exist\n${P}:${missing}: No such file or directory\n`,
      exit: { code: 1 },
    });
    assert.deepEqual(traceOption('events=', P, 'L'), { stderr: `${P}:: No such file or directory\n`, exit: { code: 1 } });
  });

  it('creates the log file without truncating it, and reports one it cannot open', () => {
    const log = path.join(dir, 'log');
    fs.writeFileSync(log, 'kept\n');
    assert.deepEqual(traceOption(`file=${log}`, P, 'L'), { stderr: '' });
    assert.equal(fs.readFileSync(log, 'utf8'), 'kept\n');
    const fresh = path.join(dir, 'fresh');
    traceOption(`file=${fresh}`, P, 'L');
    assert.equal(fs.statSync(fresh).size, 0);
    assert.deepEqual(traceOption(`file=${dir}/no/x`, P, 'L'), {
      stderr: `${P}: L: Error opening logfile ${dir}/no/x: No such file or directory\n`,
      exit: { code: 1 },
    });
  });

  it('lists the same events as QEMU 7.2 (when its daemon is installed)', function () {
    let out: string;
    try {
      out = execFileSync('/usr/bin/qemu-storage-daemon', ['-T', 'help'], { encoding: 'utf8', timeout: 5000 });
    } catch {
      this.skip();
    }
    assert.equal(run('help').exit?.stdout, out);
  });
});
