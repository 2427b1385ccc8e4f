// QemuOpts parser for --chardev: flags, ids, typed values and QEMU 7.2's exact messages and warnings.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import {
  CHARDEV_OPTS,
  QemuOptsError,
  checkChardevOpts,
  formatQemuOptsHelp,
  parseQemuOpts,
  parseQemuOptNumber,
  parseQemuOptSize,
} from '../../../src/cli/qemu-opts.js';

const BASE = 'socket,id=c,path=/tmp/x.sock';
const ID_HINT = "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.\n";
const SIZE_HINT = 'Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.\n';
const SIZE_MSG = "Parameter 'size' expects a non-negative number below 2^64";

// Suffix after BASE → [message, hint, warnings printed before it], as QSD 7.2 printed them.
const ERRORS: [string, string, string | undefined, string[]][] = [
  ['bogus=1', "Invalid parameter 'bogus'", undefined, []],
  ['=x', "Invalid parameter ''", undefined, []],
  ['x,', "Invalid parameter 'x'", undefined, ["short-form boolean option 'x' deprecated"]],
  ['nohelp', "Invalid parameter 'help'", undefined, ["short-form boolean option 'nohelp' deprecated"]],
  ['help=on', "Invalid parameter 'help'", undefined, []],
  ['server,bogus=2', "Invalid parameter 'bogus'", undefined, ["short-form boolean option 'server' deprecated"]],
  ['wait=1', "Parameter 'wait' expects 'on' or 'off'", undefined, []],
  ['server=maybe,bogus', "Parameter 'server' expects 'on' or 'off'", undefined, []],
  ['wait=off,,', "Parameter 'wait' expects 'on' or 'off'", undefined, []],
  ['reconnect=', "Parameter 'reconnect' expects a number", undefined, []],
  ['reconnect=5x', "Parameter 'reconnect' expects a number", undefined, []],
  ['reconnect=99999999999999999999', "Value '99999999999999999999' is too large for parameter 'reconnect'", undefined, []],
  ['size=-1', SIZE_MSG, SIZE_HINT, []],
  ['size=', SIZE_MSG, SIZE_HINT, []],
  ['size=1.5', SIZE_MSG, SIZE_HINT, []],
  ['size=0x1.5', SIZE_MSG, SIZE_HINT, []],
  ['size=1KiB', SIZE_MSG, SIZE_HINT, []],
  ['size=99999E', "Value '99999E' is out of range for parameter 'size'", undefined, []],
];

function parse(text: string): ReturnType<typeof parseQemuOpts> {
  return parseQemuOpts(text, 'backend');
}

describe('QemuOpts (--chardev)', function () {
  it("throws QEMU 7.2's messages, hints and preceding warnings", function () {
    for (const [suffix, msg, hint, warnings] of ERRORS) {
      assert.throws(() => parse(`${BASE},${suffix}`), (e: unknown) => {
        assert.ok(e instanceof QemuOptsError, String(e));
        assert.equal(e.message, msg, suffix);
        assert.equal(e.hint, hint, suffix);
        assert.equal(e.errorClass, 'GenericError');
        assert.deepEqual(e.warnings.map((w) => w.message), warnings, suffix);
        return true;
      });
    }
  });

  it('checks the first id before anything else', function () {
    for (const t of ['socket,id=1,bogus=2', 'socket,id=1c,path=x', 'socket,id=,path=x']) {
      assert.throws(() => parse(t), { message: "Parameter 'id' expects an identifier", hint: ID_HINT });
    }
    assert.equal(parse(`${BASE},id=1`).id, 'c'); // later ids are ignored
    assert.equal(parse('socket,noid').id, 'off');
    assert.equal(parse('socket,path=x').id, undefined);
  });

  it('parses the usual forms', function () {
    const r = parse('socket,id=c,path=/tmp/q,,x.sock,server=on,wait=off');
    assert.deepEqual(r, {
      id: 'c',
      options: { backend: 'socket', path: '/tmp/q,x.sock', server: true, wait: false },
      order: ['backend', 'path', 'server', 'wait'],
      warnings: [],
      help: false,
    });
    assert.deepEqual(parse('stdio,id=m').options, { backend: 'stdio' });
    assert.deepEqual(parse('backend=socket,id=c,path=p').options, { backend: 'socket', path: 'p' });
    assert.deepEqual(parse('a,,b=c,id=x').options, { backend: 'a,b=c' }); // ",," escapes in the implied value too
    assert.deepEqual(parse(`${BASE},server=on,server=off`).options.server, false); // last wins
    for (const [v, b] of [['yes', true], ['true', true], ['y', true], ['no', false], ['n', false], ['false', false]] as const) {
      assert.equal(parse(`${BASE},server=${v}`).options.server, b, v);
    }
    assert.deepEqual(parse('').options, {});
  });

  it('turns bare words into flags with deprecation warnings', function () {
    const r = parse(`${BASE},server,nowait`);
    assert.deepEqual(r.options, { backend: 'socket', path: '/tmp/x.sock', server: true, wait: false });
    assert.deepEqual(r.warnings, [
      { message: "short-form boolean option 'server' deprecated", hint: 'Please use server=on instead\n' },
      { message: "short-form boolean option 'nowait' deprecated", hint: 'Please use wait=off instead\n' },
    ]);
    assert.deepEqual(parse(`${BASE},noserver`).warnings[0], {
      message: "short-form boolean option 'noserver' deprecated",
      hint: 'Please use server=off instead\n',
    });
  });

  it('does not take JSON', function () {
    assert.throws(() => parse('{"backend":"socket","id":"c"}'), (e: unknown) => {
      assert.ok(e instanceof QemuOptsError);
      assert.equal(e.message, 'Invalid parameter \'"id":"c"}\'');
      assert.deepEqual(e.warnings, [
        { message: 'short-form boolean option \'"id":"c"}\' deprecated', hint: 'Please use "id":"c"}=on instead\n' },
      ]);
      return true;
    });
  });

  it('reports help and prints the option list as QEMU does', function () {
    assert.equal(parse(`${BASE},help`).help, true);
    assert.equal(parse(`${BASE},?`).help, true);
    assert.equal(parse(`${BASE},help`).warnings.length, 0);
    const help = formatQemuOptsHelp(CHARDEV_OPTS);
    assert.ok(help.startsWith('chardev options:\n  abstract=<bool (on/off)>\n  append=<bool (on/off)>\n  backend=<str>\n'));
    assert.ok(help.includes('  reconnect=<num>\n') && help.includes('  size=<size>\n') && help.endsWith('  width=<num>\n'));
  });

  it('converts numbers and sizes as QEMU 7.2 does', function () {
    assert.equal(parseQemuOptNumber('n', '0x10'), 16n);
    assert.equal(parseQemuOptNumber('n', '010'), 8n);
    assert.equal(parseQemuOptNumber('n', ' 5'), 5n);
    assert.equal(parseQemuOptNumber('n', '-1'), 18446744073709551615n);
    assert.equal(parseQemuOptSize('s', '1k'), 1024n);
    assert.equal(parseQemuOptSize('s', '1.5M'), 1572864n);
    assert.equal(parseQemuOptSize('s', '0x10'), 16n);
    assert.equal(parseQemuOptSize('s', '1e'), 1n << 60n);
    assert.equal(parseQemuOptSize('s', ' 1'), 1n);
    assert.equal(parseQemuOptSize('s', '1b'), 1n);
    assert.equal(parseQemuOptSize('s', '1.k'), 1024n);
    assert.equal(parseQemuOptSize('s', '15E'), 15n << 60n);
    assert.throws(() => parseQemuOptSize('s', '16E'), { message: "Value '16E' is out of range for parameter 's'" });
  });

  it('checks id and backend as the chardev layer does', function () {
    assert.throws(() => checkChardevOpts(parse('socket,path=x')), { message: 'chardev: no id specified' });
    assert.throws(() => checkChardevOpts(parse('')), { message: 'chardev: no id specified' });
    assert.throws(() => checkChardevOpts(parse('id=c')), { message: 'chardev: "c" missing backend' });
    assert.equal(checkChardevOpts(parse('help,id=x')), 'help');
    assert.deepEqual(checkChardevOpts(parse(BASE)), { id: 'c', backend: 'socket' });
  });

  it('agrees with qemu-storage-daemon --chardev', function () {
    this.timeout(60000);
    try {
      execFileSync('qemu-storage-daemon', ['--version'], { stdio: 'ignore' });
    } catch {
      this.skip();
    }
    const run = (arg: string): string => {
      try {
        execFileSync('qemu-storage-daemon', ['--chardev', arg], { stdio: 'pipe', timeout: 5000, killSignal: 'SIGKILL' });
        return '';
      } catch (e) {
        return String((e as { stderr: Buffer }).stderr);
      }
    };
    // Errors that QEMU reports before creating anything (so the daemon exits at once).
    for (const [suffix, msg, hint, warnings] of ERRORS) {
      const arg = `${BASE},${suffix}`;
      const p = `qemu-storage-daemon: --chardev ${arg}: `;
      const w = warnings.map((m) => {
        const flag = /'(.*)'/.exec(m)![1]!;
        const name = flag.startsWith('no') ? flag.slice(2) : flag;
        return `${p}warning: ${m}\nPlease use ${name}=${flag.startsWith('no') ? 'off' : 'on'} instead\n`;
      });
      assert.equal(run(arg), `${w.join('')}${p}${msg}\n${hint ?? ''}`, arg);
    }
    assert.equal(run('socket,id=1,bogus=2'), `qemu-storage-daemon: --chardev socket,id=1,bogus=2: Parameter 'id' expects an identifier\n${ID_HINT}`);
    assert.equal(run('socket,path=x'), 'qemu-storage-daemon: --chardev socket,path=x: chardev: no id specified\n');
    assert.equal(run('id=c'), 'qemu-storage-daemon: --chardev id=c: chardev: "c" missing backend\n');
    let helpOut = '';
    try {
      execFileSync('qemu-storage-daemon', ['--chardev', 'socket,id=c,help'], { stdio: 'pipe', timeout: 5000 });
    } catch (e) {
      helpOut = String((e as { stdout: Buffer }).stdout);
    }
    assert.equal(helpOut, formatQemuOptsHelp(CHARDEV_OPTS));
  });
});
