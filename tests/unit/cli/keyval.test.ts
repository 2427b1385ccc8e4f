// keyval parser: trees, arrays, escapes and QEMU 7.2's exact error messages (checked against the real daemon).
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { isJsonArgument, parseKeyval, parseKeyvalWithHelp } from '../../../src/cli/keyval.js';

const long = (c: string, n: number): string => c.repeat(n);

// Argument to `--blockdev` (implied key "driver") → the message QEMU 7.2 printed after "--blockdev <arg>: ".
const ERRORS: [string, string][] = [
  ['null-co,,x', "Invalid parameter ''"],
  ['driver=null-co,=x', "Invalid parameter ''"],
  [',driver=null-co', "Invalid parameter ''"],
  ['=null-co', "Invalid parameter ''"],
  ['driver=null-co,foo', "Expected '=' after parameter 'foo'"],
  ['driver=null-co,foo.bar', "Expected '=' after parameter 'foo.bar'"],
  ['driver=null-co,helpx', "Expected '=' after parameter 'helpx'"],
  ['driver=null-co,node-name=n,x', "Expected '=' after parameter 'x'"],
  ['null-co,help', 'Help is not available for this option'],
  ['help', 'Help is not available for this option'],
  ['?', 'Help is not available for this option'],
  ['driver,help', 'Help is not available for this option'],
  ['driver=null-co,a..b=1', "Invalid parameter 'a..b'"],
  ['driver=null-co,a.=1', "Invalid parameter 'a.'"],
  ['driver=null-co,.a=1', "Invalid parameter '.a'"],
  ['driver=null-co,1=x', "Invalid parameter '1'"],
  ['driver=null-co,_x=1', "Invalid parameter '_x'"],
  ['driver=null-co,a b=1', "Invalid parameter 'a b'"],
  ['driver=null-co,a._=1', "Invalid parameter 'a._'"],
  ['driver=null-co,__com.x=1', "Invalid parameter '__com.x'"],
  ['driver=null-co,__com.x_=1', "Invalid parameter '__com.x_'"],
  ['driver=null-co,__proto__=1', "Invalid parameter '__proto__'"],
  ['driver=null-co,a.1=x', "Parameter 'a.0' missing"],
  ['driver=null-co,A.1=x', "Parameter 'A.0' missing"],
  ['driver=null-co,a.99999999999=x', "Parameter 'a.0' missing"],
  ['driver=null-co,a.0=x,a.2=y', "Parameter 'a.1' missing"],
  ['driver=null-co,a.2=x,a.3=y', "Parameter 'a.0' missing"],
  ['driver=null-co,a.1=x,a.2=y,a.3=z', "Parameter 'a.0' missing"],
  ['driver=null-co,a.b.1=x,a.c.1=y', "Parameter 'a.b.0' missing"],
  ['driver=null-co,z.1=x,a.1=y', "Parameter 'a.0' missing"],
  ['driver=null-co,q.1=x,p.1=y,zz.b.1=x,zz.a=1', "Parameter 'p.0' missing"],
  ['driver=null-co,a.0=x,a.b=y', "Parameters 'a.*' used inconsistently"],
  ['driver=null-co,a=1,a.b=2', "Parameters 'a.*' used inconsistently"],
  ['driver=null-co,a.b=2,a=1', "Parameters 'a.*' used inconsistently"],
  ['driver=null-co,a.b.c=2,a.b=1', "Parameters 'a.b.*' used inconsistently"],
  ['driver=null-co,a.0.b=1,a.1.c=2,a.1.d=4,a.0.b.x=1', "Parameters 'a.0.b.*' used inconsistently"],
  ['driver=null-co,x.y.1=a,x.y.0=b,x.z=1,x.y.x=1', "Parameters 'x.y.*' used inconsistently"],
  [`driver=null-co,${long('a', 128)}=1`, `Parameter '${long('a', 128)}' is too long`],
  [`driver=null-co,x.${long('a', 128)}=1`, `Parameter fragment '${long('a', 128)}' is too long`],
  [`driver=null-co,x.${long('1', 130)}=1`, `Parameter fragment '${long('1', 130)}' is too long`],
];

const OK: [string, string | undefined, unknown][] = [
  ['null-co,node-name=a,,b', 'driver', { driver: 'null-co', 'node-name': 'a,b' }],
  ['driver=null-co,node-name=x,node-name=y,,z', 'driver', { driver: 'null-co', 'node-name': 'y,z' }],
  ['null-co,size=1,', 'driver', { driver: 'null-co', size: '1' }],
  ['null-co,size=1,,', 'driver', { driver: 'null-co', size: '1,' }],
  ['driver=null-co,size=1=2', 'driver', { driver: 'null-co', size: '1=2' }],
  ['null-co=x', 'driver', { 'null-co': 'x' }],
  ['driver', 'driver', { driver: 'driver' }],
  ['help=1', 'driver', { help: '1' }],
  ['', 'driver', {}],
  [`driver=null-co,${long('a', 127)}=1`, 'driver', { driver: 'null-co', [long('a', 127)]: '1' }],
  ['driver=null-co,__com.redhat_x=1', 'driver', { driver: 'null-co', '__com.redhat_x': '1' }],
  ['driver=null-co,a.__com.x_y=1,a.b-c_d9=2', 'driver', { driver: 'null-co', a: { '__com.x_y': '1', 'b-c_d9': '2' } }],
  ['driver=null-co,a.0=1,a.1=2,a.0=3', 'driver', { driver: 'null-co', a: ['3', '2'] }],
  [
    'fuse,id=e,node-name=n,mountpoint=/tmp/a,,b,iothread.0=io0,iothread.1=io1',
    'type',
    { type: 'fuse', id: 'e', 'node-name': 'n', mountpoint: '/tmp/a,b', iothread: ['io0', 'io1'] },
  ],
  [
    'addr.type=inet,addr.host=::1,addr.port=10809,max-connections=2',
    undefined,
    { addr: { type: 'inet', host: '::1', port: '10809' }, 'max-connections': '2' },
  ],
  ['a.0.b=1,a.0.c=2,a.1.b=3', undefined, { a: [{ b: '1', c: '2' }, { b: '3' }] }],
  ['c,pretty=on', 'chardev', { chardev: 'c', pretty: 'on' }],
  ['x=a=b,y=', undefined, { x: 'a=b', y: '' }],
];

describe('keyval', function () {
  it("throws QEMU 7.2's messages", function () {
    for (const [text, msg] of ERRORS) assert.throws(() => parseKeyval(text, 'driver'), { message: msg }, text);
  });

  it('builds trees and lists of strings', function () {
    for (const [text, implied, expected] of OK) assert.deepEqual(parseKeyval(text, implied), expected, text);
  });

  it('uses the implied key only for the first element, and only without "="', function () {
    assert.throws(() => parseKeyval('driver=null-co,x', 'driver'), { message: "Expected '=' after parameter 'x'" });
    assert.throws(() => parseKeyval('foo'), { message: "Expected '=' after parameter 'foo'" });
  });

  it('reports help when the caller offers it', function () {
    assert.deepEqual(parseKeyvalWithHelp('iothread,help', 'qom-type'), { dict: { 'qom-type': 'iothread' }, help: true });
    assert.deepEqual(parseKeyvalWithHelp('help', 'qom-type'), { dict: {}, help: true });
    assert.deepEqual(parseKeyvalWithHelp('?', 'qom-type'), { dict: {}, help: true });
    assert.deepEqual(parseKeyvalWithHelp('iothread,id=x', 'qom-type'), { dict: { 'qom-type': 'iothread', id: 'x' }, help: false });
  });

  it('treats an argument as JSON only when it starts with "{"', function () {
    assert.equal(isJsonArgument('{"driver":"null-co"}'), true);
    assert.equal(isJsonArgument(' {"driver":"null-co"}'), false);
    assert.equal(isJsonArgument('driver=null-co'), false);
  });

  it('agrees with qemu-storage-daemon --blockdev', function () {
    this.timeout(60000);
    try {
      execFileSync('qemu-storage-daemon', ['--version'], { stdio: 'ignore' });
    } catch {
      this.skip();
    }
    for (const [text, msg] of ERRORS) {
      let stderr = '';
      try {
        execFileSync('qemu-storage-daemon', ['--blockdev', text], { stdio: 'pipe', timeout: 5000 });
      } catch (e) {
        stderr = String((e as { stderr: Buffer }).stderr);
      }
      assert.equal(stderr, `qemu-storage-daemon: --blockdev ${text}: ${msg}\n`);
    }
  });
});
