// QEMU's argument errors, verified against qemu-storage-daemon 7.2 (QMP and command line).
import assert from 'node:assert/strict';
import { validateCommandArgs, validateType, hasCommand, commandNames, qmpSchemaIntrospection, describeOptions } from '../../../src/qapi/schema.js';
import { QmpError } from '../../../src/qapi/errors.js';

/** [command, arguments, QEMU 7.2's desc] observed over QMP. */
const qmpCases: [string, unknown, string][] = [
  ['blockdev-add', {}, "Parameter 'driver' is missing"],
  ['blockdev-add', { driver: 'foo' }, "Parameter 'driver' does not accept value 'foo'"],
  ['blockdev-add', { driver: 5 }, "Invalid parameter type for 'driver', expected: string"],
  ['blockdev-add', { driver: 'file', bogus: 1 }, "Parameter 'filename' is missing"],
  ['blockdev-add', { driver: 'file', 'node-name': 'x', filename: 'f', bogus: 1 }, "Parameter 'bogus' is unexpected"],
  ['blockdev-add', { driver: 'file', 'node-name': 'x', filename: 'f', aio: 'bad' }, "Parameter 'aio' does not accept value 'bad'"],
  ['blockdev-add', { driver: 'file', 'node-name': 5, filename: 'f', bogus: 1 }, "Invalid parameter type for 'node-name', expected: string"],
  ['blockdev-add', { driver: 'file', 'node-name': 'x', filename: 'f', 'aio-max-batch': '3' }, "Invalid parameter type for 'aio-max-batch', expected: integer"],
  ['blockdev-add', { driver: 'file', 'node-name': 'x', filename: 'f', 'aio-max-batch': 1.5 }, "Invalid parameter type for 'aio-max-batch', expected: integer"],
  ['blockdev-add', { driver: 'file', 'node-name': 'x', filename: 'f', 'drop-cache': 'on' }, "Invalid parameter type for 'drop-cache', expected: boolean"],
  ['blockdev-add', { driver: 'file', 'node-name': 'x', filename: null }, "Invalid parameter type for 'filename', expected: string"],
  ['blockdev-add', { driver: 'file', 'node-name': 'x', filename: 'f', cache: 5 }, "Invalid parameter type for 'cache', expected: object"],
  ['blockdev-add', { driver: 'file', 'node-name': 'x', filename: 'f', cache: { bogus: true } }, "Parameter 'cache.bogus' is unexpected"],
  ['blockdev-add', { driver: 'raw', 'node-name': 'x' }, "Parameter 'file' is missing"],
  ['blockdev-add', { driver: 'raw', 'node-name': 'x', file: 5 }, "Invalid parameter type for 'file', expected: BlockdevRef"],
  ['blockdev-add', { driver: 'raw', 'node-name': 'x', file: null }, "Invalid parameter type for 'file', expected: BlockdevRef"],
  ['blockdev-add', { driver: 'raw', 'node-name': 'x', file: { driver: 'file' } }, "Parameter 'file.filename' is missing"],
  ['blockdev-add', { driver: 'raw', 'node-name': 'x', file: { driver: 'file', filename: 'f', bogus: 1 } }, "Parameter 'file.bogus' is unexpected"],
  ['blockdev-add', { driver: 'raw', 'node-name': 'x', file: { driver: 'file', filename: 'f', cache: { direct: 1 } } }, "Invalid parameter type for 'file.cache.direct', expected: boolean"],
  ['blockdev-add', { driver: 'raw', 'node-name': 'x', file: { driver: 'bad' } }, "Parameter 'driver' does not accept value 'bad'"],
  ['blockdev-add', { driver: 'qcow2', 'node-name': 'x', file: 'a', backing: 5 }, "Invalid parameter type for 'backing', expected: BlockdevRefOrNull"],
  ['blockdev-add', { driver: 'qcow2', 'node-name': 'x', file: 'a', 'overlap-check': 5 }, "Invalid parameter type for 'overlap-check', expected: Qcow2OverlapChecks"],
  ['blockdev-add', { driver: 'qcow2', 'node-name': 'x', file: 'a', 'overlap-check': 'bad' }, "Parameter 'overlap-check' does not accept value 'bad'"],
  ['blockdev-add', { driver: 'qcow2', 'node-name': 'x', file: 'a', 'overlap-check': { template: 'bad' } }, "Parameter 'template' does not accept value 'bad'"],
  ['blockdev-add', { driver: 'raw', 'node-name': 'x', file: { driver: 'qcow2', file: 'x', 'overlap-check': { 'main-header': 'bad' } } }, "Invalid parameter type for 'file.overlap-check.main-header', expected: boolean"],
  ['blockdev-add', { driver: 'qcow2', 'node-name': 'x', file: 'a', backing: null, x: 1 }, "Parameter 'x' is unexpected"],
  ['blockdev-add', { driver: 'qcow2', 'node-name': 'x', file: { driver: 'raw', file: { driver: 'file' } } }, "Parameter 'file.file.filename' is missing"],
  ['blockdev-add', { driver: 'blkdebug', 'node-name': 'x', image: 'a', 'inject-error': [{ event: 'read_aio', errno: 'x' }] }, "Invalid parameter type for 'inject-error[0].errno', expected: integer"],
  ['blockdev-add', { driver: 'blkdebug', 'node-name': 'x', image: 'a', 'inject-error': [{ event: 'bad' }] }, "Parameter 'event' does not accept value 'bad'"],
  ['blockdev-add', { driver: 'blkdebug', 'node-name': 'x', image: 'a', 'inject-error': [{}] }, "Parameter 'inject-error[0].event' is missing"],
  ['blockdev-add', { driver: 'blkdebug', 'node-name': 'x', image: 'a', 'inject-error': [5] }, "Invalid parameter type for 'inject-error[0]', expected: object"],
  ['blockdev-add', { driver: 'blkdebug', 'node-name': 'x', image: 'a', 'inject-error': {} }, "Invalid parameter type for 'inject-error', expected: array"],
  ['blockdev-add', { driver: 'blkdebug', 'node-name': 'x', image: 'a', 'inject-error': [{ event: 'read_aio', x: 1 }], 'set-state': 5 }, "Parameter 'inject-error[0].x' is unexpected"],
  ['blockdev-add', { driver: 'null-co', 'node-name': 'x', size: 18446744073709551615n }, "Invalid parameter type for 'size', expected: integer"],
  ['blockdev-add', { driver: 'null-co', 'node-name': 'x', size: 1e30 }, "Invalid parameter type for 'size', expected: integer"],
  ['blockdev-add', { driver: 'null-co', 'node-name': 'x', size: '1' }, "Invalid parameter type for 'size', expected: integer"],
  ['blockdev-add', { driver: 'null-co', 'node-name': 'x', 'latency-ns': 1.5 }, "Parameter 'latency-ns' expects uint64"],
  ['blockdev-add', { driver: 'null-co', 'node-name': 'x', 'latency-ns': 18446744073709551616n }, "Parameter 'latency-ns' expects uint64"],
  ['blockdev-add', { driver: 'null-co', 'node-name': 'x', cache: { direct: true, x: 1 }, 'read-only': 5 }, "Parameter 'cache.x' is unexpected"],
  ['blockdev-add', { driver: 'file', 'node-name': 'x', filename: 'f', discard: 'z', 'read-only': 'z' }, "Parameter 'discard' does not accept value 'z'"],
  ['blockdev-add', { driver: 'file', filename: 'f', 'read-only': 'z', aio: 'z' }, "Invalid parameter type for 'read-only', expected: boolean"],
  ['blockdev-add', { driver: 'raw', file: { driver: 'file', filename: 'f', aio: 'z' }, size: 'x' }, "Parameter 'aio' does not accept value 'z'"],
  ['block_resize', {}, "Parameter 'size' is missing"],
  ['block_resize', { 'node-name': 'x', size: '1' }, "Invalid parameter type for 'size', expected: integer"],
  ['block_resize', { 'node-name': 'x', size: 9223372036854775808n }, "Invalid parameter type for 'size', expected: integer"],
  ['block_resize', { size: 1, x: 2 }, "Parameter 'x' is unexpected"],
  ['nbd-server-start', {}, "Parameter 'addr' is missing"],
  ['nbd-server-start', { addr: {} }, "Parameter 'addr.type' is missing"],
  ['nbd-server-start', { addr: { type: 'inet' } }, "Parameter 'addr.data' is missing"],
  ['nbd-server-start', { addr: { type: 'inet', data: {} } }, "Parameter 'addr.data.host' is missing"],
  ['nbd-server-start', { addr: { type: 'inet', data: { host: 'x', port: 5 } } }, "Invalid parameter type for 'addr.data.port', expected: string"],
  ['nbd-server-start', { addr: { type: 'unix', data: { path: '/x' } }, 'max-connections': -1 }, "Parameter 'max-connections' expects uint32_t"],
  ['nbd-server-start', { addr: { type: 'unix', data: { path: '/x' } }, 'max-connections': 4294967296 }, "Parameter 'max-connections' expects uint32_t"],
  ['nbd-server-start', { addr: { type: 'unix', data: { path: '/x' } }, 'max-connections': '1' }, "Parameter 'max-connections' expects uint64"],
  ['nbd-server-start', { addr: { type: 'bad', data: { path: '/x' } } }, "Parameter 'type' does not accept value 'bad'"],
  ['object-add', {}, "Parameter 'qom-type' is missing"],
  ['object-add', { 'qom-type': 'iothread' }, "Parameter 'id' is missing"],
  ['object-add', { 'qom-type': 'bogus', id: 'x' }, "Parameter 'qom-type' does not accept value 'bogus'"],
  ['object-add', { 'qom-type': 'iothread', id: 'x', 'poll-max-ns': '1' }, "Invalid parameter type for 'poll-max-ns', expected: integer"],
  ['object-add', { 'qom-type': 'iothread', id: 'x', props: {} }, "Parameter 'props' is unexpected"],
  ['block-export-add', {}, "Parameter 'type' is missing"],
  ['block-export-add', { type: 'fuse' }, "Parameter 'id' is missing"],
  ['block-export-add', { type: 'fuse', id: 'e', 'node-name': 'n' }, "Parameter 'mountpoint' is missing"],
  ['block-export-add', { type: 'fuse', id: 'e', 'node-name': 'n', mountpoint: 'm', growable: 'on' }, "Invalid parameter type for 'growable', expected: boolean"],
  ['block-export-add', { type: 'fuse', id: 'e', 'node-name': 'n', mountpoint: 'm', 'allow-other': 'maybe' }, "Parameter 'allow-other' does not accept value 'maybe'"],
  ['block-export-add', { type: 'fuse', id: 'e', mountpoint: 'm', x: 1 }, "Parameter 'node-name' is missing"],
  ['block-export-add', { type: 'nbd', id: 'e', 'node-name': 'n', bitmaps: [5] }, "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"],
  ['block-export-del', { id: 'e', mode: 'x' }, "Parameter 'mode' does not accept value 'x'"],
  ['blockdev-create', { 'job-id': 'j', options: { driver: 'file', filename: 'f' } }, "Parameter 'options.size' is missing"],
  ['blockdev-create', { 'job-id': 'j', options: { driver: 'file', filename: 'f', size: 'x' } }, "Parameter 'options.size' expects uint64"],
  ['blockdev-create', { 'job-id': 'j', options: { driver: 'qcow2', file: 'f', size: 1, version: 'v4' } }, "Parameter 'version' does not accept value 'v4'"],
  ['blockdev-create', { 'job-id': 'j', options: { driver: 'raw', file: 'f', size: 1 } }, "Parameter 'options.size' is unexpected"],
  ['blockdev-create', { 'job-id': 'j', options: { driver: 'qcow2', file: { driver: 'file', x: 1 }, size: 1 } }, "Parameter 'options.file.filename' is missing"],
  ['blockdev-create', { 'job-id': 'j', options: { driver: 'qcow2', file: 5, size: 1 } }, "Invalid parameter type for 'file', expected: BlockdevRef"],
  ['blockdev-reopen', { options: [{ driver: 'file' }] }, "Parameter 'options[0].filename' is missing"],
  ['blockdev-reopen', { options: {} }, "Invalid parameter type for 'options', expected: array"],
  ['query-named-block-nodes', { flat: 1 }, "Invalid parameter type for 'flat', expected: boolean"],
  ['qmp_capabilities', { enable: ['x'] }, "Parameter 'null' does not accept value 'x'"],
  ['query-version', { x: 1 }, "Parameter 'x' is unexpected"],
  ['query-version', { a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7, h: 8, i: 9, j: 10 }, "Parameter 'b' is unexpected"],
  ['query-version', { zz: 1, bogus: 2, node: 3 }, "Parameter 'bogus' is unexpected"],
  ['blockdev-add', { driver: 'null-co', x: 1, y: 2 }, "Parameter 'y' is unexpected"],
  ['blockdev-add', { driver: 'null-co', y: 1, x: 2 }, "Parameter 'y' is unexpected"],
  ['job-dismiss', {}, "Parameter 'id' is missing"],
];

/** [type, keyval value (as the keyval parser nests it), QEMU 7.2's message after "<option> <arg>: "]. */
const keyvalCases: [string, Record<string, unknown>, string][] = [
  ['BlockdevOptions', { driver: 'file', 'node-name': 'x', filename: 'f', aio: 'bad' }, "Parameter 'aio' does not accept value 'bad'"],
  ['BlockdevOptions', { driver: 'file', 'node-name': 'x', filename: 'f', 'aio-max-batch': 'abc' }, "Parameter 'aio-max-batch' expects integer"],
  ['BlockdevOptions', { driver: 'file', 'node-name': 'x', filename: 'f', 'aio-max-batch': '1k' }, "Parameter 'aio-max-batch' expects integer"],
  ['BlockdevOptions', { driver: 'file', 'node-name': 'x', filename: 'f', 'drop-cache': 'maybe' }, "Parameter 'drop-cache' expects 'on' or 'off'"],
  ['BlockdevOptions', { driver: 'file', 'node-name': 'x', filename: 'f', bogus: '1' }, "Parameter 'bogus' is unexpected"],
  ['BlockdevOptions', { driver: 'file', 'node-name': 'x' }, "Parameter 'filename' is missing"],
  ['BlockdevOptions', { driver: 'null-co', 'node-name': 'x', size: '1G', 'read-only': 'maybe' }, "Parameter 'read-only' expects 'on' or 'off'"],
  ['BlockdevOptions', { driver: 'null-co', 'node-name': 'x', size: '1G' }, "Parameter 'size' expects integer"],
  ['BlockdevOptions', { driver: 'null-co', 'node-name': 'x', size: '08' }, "Parameter 'size' expects integer"],
  ['BlockdevOptions', { driver: 'null-co', 'node-name': 'x', size: '' }, "Parameter 'size' expects integer"],
  ['BlockdevOptions', { driver: 'null-co', 'node-name': 'x', size: '9223372036854775808' }, "Parameter 'size' expects integer"],
  ['BlockdevOptions', { driver: 'null-co', 'node-name': 'x', size: ' 5', bogus: '1' }, "Parameter 'bogus' is unexpected"],
  ['BlockdevOptions', { driver: 'null-co', 'node-name': 'x', 'latency-ns': '1k' }, "Parameter 'latency-ns' expects integer"],
  ['BlockdevOptions', { driver: 'null-co', 'node-name': 'x', 'latency-ns': '18446744073709551616' }, "Parameter 'latency-ns' expects integer"],
  ['BlockdevOptions', { driver: 'null-co', 'node-name': 'x', 'read-only': 'ON' }, "Parameter 'read-only' expects 'on' or 'off'"],
  ['BlockdevOptions', { driver: 'null-co', 'node-name': 'x', cache: { direct: 'x' } }, "Parameter 'cache.direct' expects 'on' or 'off'"],
  ['BlockdevOptions', { driver: 'null-co', 'node-name': 'x', cache: { bogus: 'x' } }, "Parameter 'cache.bogus' is unexpected"],
  ['BlockdevOptions', { driver: 'null-co', 'node-name': 'x', cache: 'foo' }, "Invalid parameter type for 'cache', expected: object"],
  ['BlockdevOptions', { driver: 'null-co', 'node-name': 'x', cache: { direct: { x: '1' } } }, "Parameters 'cache.direct.*' are unexpected"],
  ['BlockdevOptions', { driver: 'raw', 'node-name': 'x', file: { driver: 'file' } }, "Parameter 'file.filename' is missing"],
  ['BlockdevOptions', { driver: 'raw', 'node-name': 'x', file: { driver: 'file', filename: 'f', aio: 'z' } }, "Parameter 'aio' does not accept value 'z'"],
  ['BlockdevOptions', { driver: 'raw', 'node-name': 'y', file: 'x', offset: '5', size: '1k' }, "Parameter 'size' expects integer"],
  ['BlockdevOptions', { driver: 'qcow2', 'node-name': 'x', file: 'a', 'overlap-check': 'bad' }, "Parameter 'overlap-check' does not accept value 'bad'"],
  ['BlockdevOptions', { driver: 'qcow2', 'node-name': 'x', file: 'a', 'overlap-check': { template: 'bad' } }, "Parameter 'template' does not accept value 'bad'"],
  ['BlockdevOptions', { driver: 'blkdebug', 'node-name': 'x', image: 'a', 'inject-error': [{ event: 'bad' }] }, "Parameter 'event' does not accept value 'bad'"],
  ['BlockdevOptions', { driver: 'blkdebug', 'node-name': 'x', image: 'a', 'inject-error': [{ errno: 'x', event: 'read_aio' }] }, "Parameter 'inject-error.0.errno' expects integer"],
  ['BlockdevOptions', { driver: 'blkdebug', 'node-name': 'x', image: 'a', 'inject-error': [{ x: '1', event: 'read_aio' }] }, "Parameter 'inject-error.0.x' is unexpected"],
  ['BlockdevOptions', { driver: 'blkdebug', 'node-name': 'x', image: 'a', 'inject-error': 'foo' }, "Invalid parameter type for 'inject-error', expected: array"],
  ['BlockdevOptions', { driver: 'null-co', 'node-name': 'y', 'read-only': 'false', 'detect-zeroes': 'z' }, "Parameter 'detect-zeroes' does not accept value 'z'"],
  ['BlockExportOptions', { type: 'fuse', id: 'e', 'node-name': 'n', mountpoint: 'm', growable: 'maybe' }, "Parameter 'growable' expects 'on' or 'off'"],
  ['BlockExportOptions', { type: 'fuse', id: 'e' }, "Parameter 'node-name' is missing"],
  ['BlockExportOptions', { type: 'fuse', id: 'e', 'node-name': 'n', mountpoint: 'm', bogus: '1' }, "Parameter 'bogus' is unexpected"],
  ['BlockExportOptions', { type: 'bogus', id: 'e' }, "Parameter 'type' does not accept value 'bogus'"],
  ['BlockExportOptions', { type: 'fuse', id: 'e', 'node-name': 'n', mountpoint: 'm', iothread: 'a', 'fixed-iothread': 'x' }, "Parameter 'fixed-iothread' expects 'on' or 'off'"],
  ['ObjectOptions', { 'qom-type': 'iothread', id: 'io0', 'poll-max-ns': 'abc' }, "Parameter 'poll-max-ns' expects integer"],
  ['ObjectOptions', { 'qom-type': 'iothread' }, "Parameter 'id' is missing"],
  ['ObjectOptions', { 'qom-type': 'bogus', id: 'x' }, "Parameter 'qom-type' does not accept value 'bogus'"],
  ['NbdServerOptions', { addr: { type: 'inet', host: 'x' } }, "Parameter 'addr.port' is missing"],
  ['NbdServerOptions', { addr: { type: 'inet', host: 'h', port: '1' }, 'max-connections': 'abc' }, "Parameter 'max-connections' expects integer"],
  ['NbdServerOptions', { addr: { type: 'inet', host: 'h', port: '1' }, 'max-connections': '5000000000' }, "Parameter 'max-connections' expects uint32_t"],
  ['NbdServerOptions', { addr: { type: 'inet', host: 'h', port: '1' }, 'max-connections': '-1' }, "Parameter 'max-connections' expects uint32_t"],
  ['NbdServerOptions', { addr: { type: 'unix' } }, "Parameter 'addr.path' is missing"],
  ['NbdServerOptions', { addr: { type: 'bad' } }, "Parameter 'type' does not accept value 'bad'"],
  ['NbdServerOptions', { addr: { type: 'inet', host: 'h', port: '1', ipv4: 'x' } }, "Parameter 'addr.ipv4' expects 'on' or 'off'"],
  ['MonitorOptions', { chardev: 'x', mode: 'bad' }, "Parameter 'mode' does not accept value 'bad'"],
  ['MonitorOptions', { chardev: 'x', pretty: 'bad' }, "Parameter 'pretty' expects 'on' or 'off'"],
  ['MonitorOptions', { mode: 'control' }, "Parameter 'chardev' is missing"],
];

function errorOf(fn: () => unknown): QmpError {
  try {
    fn();
  } catch (e) {
    assert.ok(e instanceof QmpError, `not a QmpError: ${String(e)}`);
    return e;
  }
  assert.fail('no error thrown');
}

describe('qapi schema: QMP argument errors match QEMU 7.2', () => {
  for (const [cmd, args, msg] of qmpCases) {
    it(`${cmd} ${JSON.stringify(args, (_k, v) => (typeof v === 'bigint' ? `${v}n` : v))}`, () => {
      const e = errorOf(() => validateCommandArgs(cmd, args));
      assert.equal(e.errorClass, 'GenericError');
      assert.equal(e.message, msg);
    });
  }
});

describe('qapi schema: command-line (keyval) errors match QEMU 7.2', () => {
  for (const [type, value, msg] of keyvalCases) {
    it(`${type} ${JSON.stringify(value)}`, () => {
      assert.equal(errorOf(() => validateType(type, value, { keyval: true })).message, msg);
    });
  }
});

describe('qapi schema: accepted values', () => {
  it('coerces keyval scalars (accepted by QEMU 7.2)', () => {
    const v = validateType('BlockdevOptions', { driver: 'null-co', 'node-name': 'x', 'read-only': 'yes', 'force-share': 'n', 'auto-read-only': 'true', size: '0x10', 'latency-ns': '-1' }, { keyval: true });
    assert.deepEqual(v, { driver: 'null-co', 'node-name': 'x', 'read-only': true, 'auto-read-only': true, 'force-share': false, size: 16, 'latency-ns': 18446744073709551615n });
  });
  it('takes a BlockExportIothreads list as the multi variant, both forms', () => {
    const base = { type: 'fuse', id: 'e', 'node-name': 'n', mountpoint: 'm' };
    assert.deepEqual(validateCommandArgs('block-export-add', { ...base, iothread: ['a', 'b'] }).iothread, ['a', 'b']);
    assert.deepEqual(validateType('BlockExportOptions', { ...base, iothread: ['a'] }, { keyval: true }).iothread, ['a']);
    assert.equal(validateCommandArgs('block-export-add', { ...base, iothread: 'a' }).iothread, 'a');
  });
  it('accepts BigInt integers within range and keeps QMP values', () => {
    const v = validateCommandArgs('block_resize', { 'node-name': 'x', size: 9223372036854775807n });
    assert.equal(v.size, 9223372036854775807n);
    assert.deepEqual(validateCommandArgs('blockdev-add', { driver: 'qcow2', 'node-name': 'q', file: { driver: 'file', filename: 'f' }, backing: null }),
      { driver: 'qcow2', 'node-name': 'q', file: { driver: 'file', filename: 'f' }, backing: null });
  });
  it('size type takes suffixes on the command line', () => {
    assert.equal(validateType('BlockdevCreateOptionsFile', { filename: 'f', size: '1.5G' }, { keyval: true }).size, 1610612736);
    assert.equal(errorOf(() => validateType('BlockdevCreateOptionsFile', { filename: 'f', size: '-1' }, { keyval: true })).message, "Parameter 'size' expects size");
  });
  it('implied key', () => {
    assert.deepEqual(validateType('MonitorOptions', 'mon0', { implied: 'chardev', keyval: true }), { chardev: 'mon0' });
  });
});

describe('qapi schema: commands, introspection and --help', () => {
  it('knows the commands and lists them newest-registered first like query-commands', () => {
    assert.ok(hasCommand('blockdev-add') && hasCommand('query-qmp-schema') && !hasCommand('bogus'));
    const names = commandNames();
    assert.ok(names.indexOf('object-add') < names.indexOf('query-block'));
    assert.equal(errorOf(() => validateCommandArgs('bogus', {})).errorClass, 'CommandNotFound');
  });
  it('introspection follows QEMU conventions', () => {
    const s = qmpSchemaIntrospection() as Record<string, any>[];
    const by = new Map(s.map((e) => [e.name, e]));
    assert.deepEqual(s[0], { 'arg-type': '0', 'ret-type': '[1]', name: 'query-block', 'meta-type': 'command' });
    assert.deepEqual(by.get('0'), { members: [], name: '0', 'meta-type': 'object' });
    assert.deepEqual(by.get('quit'), { 'arg-type': '0', 'ret-type': '0', name: 'quit', 'meta-type': 'command' });
    const add = by.get(by.get('blockdev-add')['arg-type']);
    assert.equal(add.tag, 'driver');
    assert.deepEqual(add.members[1], { name: 'node-name', type: 'str', default: null });
    const nbdAdd = by.get('nbd-server-add');
    assert.deepEqual(nbdAdd.features, ['deprecated']);
    for (const b of ['str', 'int', 'bool', 'null', 'any']) assert.equal(by.get(b)['meta-type'], 'builtin');
    assert.ok(!s.some((e) => (e.members ?? []).some((m: { type?: string }) => /^(u?int\d+|size|uint64)$/.test(m.type ?? ''))));
  });
  it('describes options for --help', () => {
    const text = describeOptions('BlockExportOptions', { option: '--export', implied: 'type' });
    assert.match(text, /^--export \[type=\]fuse,id=<id>.*,node-name=<node-name>.*,mountpoint=<mountpoint>\[,growable=on\|off\]/m);
  });
});
