// QMP JSON dialect: streaming errors, recovery, limits and output format, checked against QEMU 7.2's daemon.
import assert from 'node:assert/strict';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import {
  QmpJsonStreamParser,
  formatDouble,
  formatQmpJson,
  parseQmpJson,
  qdictKeyOrder,
} from '../../../src/qmp/json.js';

const NOT_OBJECT = 'QMP input must be a JSON object';

/** Feeds bytes and returns what a QMP monitor would answer: one desc (or "V:<json>") per event. */
function events(input: Buffer | string, chunk = 0, limits = {}): string[] {
  const out: string[] = [];
  const p = new QmpJsonStreamParser(
    (v) => out.push(`V:${formatQmpJson(v)}`),
    (m) => out.push(m),
    limits,
  );
  const data = typeof input === 'string' ? Buffer.from(input, 'latin1') : input;
  if (chunk <= 0) p.feed(data);
  else for (let i = 0; i < data.length; i += chunk) p.feed(data.subarray(i, i + chunk));
  return out;
}

const E = (s: string): string => `JSON parse error, ${s}`;

// Input (latin1 bytes) → what QEMU 7.2's monitor reported, in order; "V:" = a value reached the
// dispatcher (QEMU answered with a command result or "QMP input must be a JSON object").
const STREAM_CASES: [string, string[]][] = [
  ['{', []],
  ['}', [E('expecting value')]],
  ['[1,2]', ['V:[1, 2]']],
  ['foo', []],
  ['foo ', [E("invalid keyword 'foo'")]],
  ['nul ', [E("invalid keyword 'nul'")]],
  ['tru', []],
  ['true ', ['V:true']],
  ['{"a":1,"a":2}', [E('duplicate key')]],
  ['{"a" 1}', [E('missing : in object pair')]],
  ['{"a":1 "b":2}', [E('expected separator in dict')]],
  ['[1 2]', [E('expected separator in list')]],
  ['{1:2}', [E('key is not a string in object')]],
  ['{"a":}', [E('expecting value')]],
  ['[1,]', [E('expecting value')]],
  ['{"a":1,}', [E('expecting value')]],
  ['"\\x"', [E('invalid escape sequence in string')]],
  ['"\\u12"', [E('\\u12" is not a valid Unicode character')]],
  ['{"id":"\\u00"}', [E('\\u00" is not a valid Unicode character')]],
  ['"\\ud800"', [E('\\ud800 is not a valid Unicode character')]],
  ['"\\ud800\\u0041"', [E('\\ud800 is not a valid Unicode character')]],
  ['"\\ufffe"', [E('\\ufffe is not a valid Unicode character')]],
  ['"\\ufdd0"', [E('\\ufdd0 is not a valid Unicode character')]],
  ['{"a": @, "b": 1}', [E("stray '@'"), E('expecting value'), 'V:"b"', E('expecting value'), 'V:1', E('expecting value')]],
  ['Foo', [E("stray 'F'")]],
  ['true\xc3', ['V:true', E("stray '\ufffd'")]],
  ['"abc\x01def"', [E("stray '\"abc\x01'")]],
  ['\x01', [E("stray '\x01'")]],
  ['\x00', [E("stray ''")]],
  ['\xff', [E("stray '\ufffd'")]],
  ['"\xc3\xa9\xff"', [E("stray '\"\u00e9\ufffd'")]],
  ['"\xc0\x80"', ['V:"\\u0000"']],
  ['"\\u0000"', ['V:"\\u0000"']],
  ['"\xc0\xaf"', [E('invalid UTF-8 sequence in string')]],
  ['"\x7f\x80"', [E('invalid UTF-8 sequence in string')]],
  ['"\xed\xa0\x80"', [E('invalid UTF-8 sequence in string')]],
  ['"\xf4\x90\x80\x80"', [E('invalid UTF-8 sequence in string')]],
  ['"\xef\xbf\xbe"', [E('invalid UTF-8 sequence in string')]],
  ['"\xe0\x80\xaf"', [E('invalid UTF-8 sequence in string')]],
  ['"\xf0\x9f\x98\x80\xc3\xa9"', ['V:"\\uD83D\\uDE00\\u00E9"']],
  ['01', [E("stray '01'")]],
  ['-', []],
  ['1.', []],
  ['1e', []],
  ['"\\', []],
  ['"\\\x01"', [E("stray '\"\\\x01'")]],
  ['1.5x', ['V:1.5']],
  ['1 2 ', ['V:1', 'V:2']],
  ['{"x":1}{"y":2}', ['V:{"x": 1}', 'V:{"y": 2}']],
  ['{"x":1} garbage', ['V:{"x": 1}']],
  ["{'execute':'nope','id':'it\\'s'}", ['V:{"execute": "nope", "id": "it\'s"}']],
  ['@abc\x01{"x":1}', [E("stray '@'"), E("stray '\x01'"), 'V:{"x": 1}']],
  ['@abc\xfe{"x":1}', [E("stray '@'"), E("stray '\ufffd'"), 'V:{"x": 1}']],
  ['@abc\n{"x":1}', [E("stray '@'"), 'V:{"x": 1}']],
  ['@abc\t{"x":1}', [E("stray '@'"), 'V:{"x": 1}']],
  ['@abc"x{"x":1}', [E("stray '@'"), 'V:{"x": 1}']],
  ['{"id":"x\x01y"}{"x":1}', [E("stray '\"x\x01'"), E('expecting value'), 'V:{"x": 1}']],
  ['['.repeat(1025) + ']]]', ['JSON nesting depth limit exceeded', E('expecting value'), E('expecting value'), E('expecting value')]],
];

describe('QMP JSON stream parser', function () {
  it('reports what QEMU 7.2 reports, whole or byte by byte', function () {
    for (const [input, expected] of STREAM_CASES) {
      assert.deepEqual(events(input), expected, JSON.stringify(input));
      assert.deepEqual(events(input, 1), expected, `byte by byte: ${JSON.stringify(input)}`);
      assert.deepEqual(events(input, 3), expected, `3-byte chunks: ${JSON.stringify(input)}`);
    }
  });

  it('accepts 1024 levels of nesting', function () {
    const ev = events('['.repeat(1024) + ']'.repeat(1024));
    assert.equal(ev.length, 1);
    assert.ok(ev[0]!.startsWith('V:[[['));
  });

  it('applies QEMU token count limit (2 Mi tokens per value)', function () {
    this.timeout(60000);
    const ok = '[' + '1,'.repeat(1048574) + '1]'; // 2097151 tokens
    const bad = '[' + '1,'.repeat(1048575) + '1]'; // 2097153 tokens
    const seen: unknown[] = [];
    const errs: string[] = [];
    const p = new QmpJsonStreamParser((v) => seen.push(v), (m) => errs.push(m));
    p.feed(ok);
    assert.equal(errs.length, 0);
    assert.equal((seen[0] as unknown[]).length, 1048575);
    p.feed(bad);
    assert.deepEqual(errs, ['JSON token count limit exceeded']);
    assert.equal(seen.length, 1);
  });

  it('makes the limits configurable so the daemon can bound memory', function () {
    assert.deepEqual(events('[[[]]] [[[[]]]]', 0, { maxNesting: 3 }), [
      'V:[[[]]]',
      'JSON nesting depth limit exceeded',
      E('expecting value'),
      E('expecting value'),
      E('expecting value'),
      E('expecting value'),
    ]);
    assert.deepEqual(events('[1,2] [1,2,3]', 0, { maxTokenCount: 5 }), ['V:[1, 2]', 'JSON token count limit exceeded', E('expecting value')]);
    // One token longer than the limit is cut off, and lexing resumes after it (QEMU's behaviour).
    assert.deepEqual(events('"aaaaaaaaaaaaaaaa" ', 0, { maxTokenSize: 10 }), ['JSON token size limit exceeded', E("invalid keyword 'aaaaaa'")]);
    // Token bytes are summed per value: 9 bytes + 1 > 9.
    assert.deepEqual(events('["abc","de"] ["abc"]', 0, { maxTokenSize: 9 }), ['JSON token size limit exceeded', E('expecting value'), 'V:["abc"]']);
  });

  it('forgets a partial value on reset(), also from inside a callback', function () {
    const out: string[] = [];
    const p = new QmpJsonStreamParser((v) => out.push(formatQmpJson(v)), (m) => out.push(m));
    p.feed('{"a": [1, 2');
    p.reset();
    p.feed('{"b": 1}');
    assert.deepEqual(out, ['{"b": 1}']);
    // reset() from a callback drops the rest of the chunk.
    const out2: unknown[] = [];
    const q: QmpJsonStreamParser = new QmpJsonStreamParser((v) => {
      out2.push(v);
      q.reset();
    }, () => assert.fail('no error expected'));
    q.feed('{"a":1}{"b":2}');
    q.feed('{"c":3}');
    assert.deepEqual(out2, [{ a: 1 }, { c: 3 }]);
  });

  it('parses numbers as QEMU represents them, bigint beyond 2^53', function () {
    const v = parseQmpJson(
      '[1, -0, -0.0, 1.5, 9007199254740991, 9007199254740993, 18446744073709551615, -9223372036854775808, 18446744073709551616, -9223372036854775809, 1E400]',
    ) as unknown[];
    assert.equal(v[0], 1);
    assert.ok(Object.is(v[1], 0));
    assert.ok(Object.is(v[2], -0));
    assert.equal(v[3], 1.5);
    assert.equal(v[4], 9007199254740991);
    assert.equal(v[5], 9007199254740993n);
    assert.equal(v[6], 18446744073709551615n);
    assert.equal(v[7], -9223372036854775808n);
    assert.equal(v[8], 18446744073709551616); // beyond uint64: a double, as in QEMU
    assert.equal(v[9], -9223372036854775809);
    assert.equal(v[10], Infinity);
    assert.equal(
      formatQmpJson(v),
      '[1, 0, -0, 1.5, 9007199254740991, 9007199254740993, 18446744073709551615, -9223372036854775808, 1.8446744073709552e+19, -9.2233720368547758e+18, inf]',
    );
  });

  it('builds plain objects safely, even for a "__proto__" key', function () {
    const v = parseQmpJson('{"__proto__": {"x": 1}, "a": [true, false, null]}') as Record<string, unknown>;
    assert.equal(Object.getPrototypeOf(v), Object.prototype);
    assert.deepEqual(Object.keys(v), ['__proto__', 'a']);
    assert.equal(({} as Record<string, unknown>).x, undefined);
    assert.deepEqual(v.a, [true, false, null]);
  });
});

describe('parseQmpJson (one value, as for the command line)', function () {
  const cases: [string, string][] = [
    ['{', E('premature EOI')],
    ['{"x":1', E('premature EOI')],
    ['[1', E('premature EOI')],
    ['{"x":"a', E("stray '\"a'")],
    ['{"driver":"nu', E("stray '\"nu'")],
    ['{@}', E("stray '@'")],
    ['{"driver":"null-co",}', E('expecting value')],
    ['{"a":1,"a":2}', E('duplicate key')],
    ['{"x":"\\u12"}', E('\\u12" is not a valid Unicode character')],
    ['{} 1', 'Expecting at most one JSON value'],
    ['{}}', 'Expecting at most one JSON value'],
    ['{}]', 'Expecting at most one JSON value'],
    ['{},', 'Expecting at most one JSON value'],
    ['{}[', 'Expecting at most one JSON value'],
    ['{"driver":"null-co"} x', 'Expecting at most one JSON value'],
    ['', 'Expecting a JSON value'],
    ['   ', 'Expecting a JSON value'],
  ];
  it("throws QEMU's messages", function () {
    for (const [text, msg] of cases) assert.throws(() => parseQmpJson(text), { message: msg }, text);
  });
  it('returns the value, single quotes included', function () {
    assert.deepEqual(parseQmpJson("{'x':'a\\'b', \"y\": [1, 'q\"']}"), { x: "a'b", y: [1, 'q"'] });
    assert.deepEqual(parseQmpJson(' {} '), {});
    assert.equal(parseQmpJson('"\\u00e9\\ud83d\\ude00\\/\\b\\f\\n\\r\\t"'), '\u00e9\u{1f600}/\b\f\n\r\t');
  });
});

describe('formatQmpJson', function () {
  it("prints QEMU's compact form, keys in QDict order", function () {
    // QEMU 7.2 echoed this id as shown (keys reordered by hash bucket).
    const id = { return: 1, id: 2, error: 3, event: 4, timestamp: 5, data: 6, class: 7, desc: 8 };
    assert.equal(
      formatQmpJson(id),
      '{"timestamp": 5, "class": 7, "event": 4, "desc": 8, "return": 1, "id": 2, "error": 3, "data": 6}',
    );
    assert.equal(
      formatQmpJson({ return: { qemu: { major: 7, minor: 2, micro: 22 }, package: 'Debian 1:7.2+dfsg-7+deb12u18+b3' }, id: 0.1 }),
      '{"return": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "id": 0.10000000000000001}',
    );
    assert.equal(formatQmpJson({ return: {} }), '{"return": {}}');
    assert.equal(formatQmpJson({ a: {}, b: [], c: [1, { d: null, e: true, f: false }] }), '{"a": {}, "b": [], "c": [1, {"d": null, "e": true, "f": false}]}');
    assert.equal(formatQmpJson({ a: undefined, b: 1 }), '{"b": 1}');
  });

  it('escapes strings as QEMU does (ASCII out, uppercase \\u, surrogate pairs)', function () {
    assert.equal(
      formatQmpJson('a\0b\u00e9\u{1f600}/\b\f\n\r\t\u007f\u001f"\\'),
      '"a\\u0000b\\u00E9\\uD83D\\uDE00/\\b\\f\\n\\r\\t\\u007F\\u001F\\"\\\\"',
    );
    assert.equal(formatQmpJson('\ud800x\ufffe'), '"\\uFFFDx\\uFFFD"'); // not representable in QEMU's UTF-8
  });

  it('prints numbers with %.17g and bigints exactly', function () {
    const cases: [number, string][] = [
      [0.1, '0.10000000000000001'], [1.5, '1.5'], [1e20, '1e+20'], [1e17, '1e+17'], [1e16, '10000000000000000'],
      [0.0001, '0.0001'], [0.00001, '1.0000000000000001e-05'], [-0, '-0'], [0, '0'], [Infinity, 'inf'],
      [-Infinity, '-inf'], [123456, '123456'], [-9.2233720368547758e18, '-9.2233720368547758e+18'], [1e-300, '1e-300'], [5e-324, '4.9406564584124654e-324'], [1.7976931348623157e308, '1.7976931348623157e+308'], [123456789.123, '123456789.123'],
    ];
    for (const [n, s] of cases) assert.equal(formatDouble(n), s, String(n));
    assert.equal(formatQmpJson(18446744073709551615n), '18446744073709551615');
  });

  it("prints QEMU's pretty=on layout with CRLF line breaks", function () {
    // Byte for byte what QSD 7.2 sent for query-version with this id, `--monitor chardev=c,pretty=on`.
    const expected =
      '{\r\n    "return": {\r\n        "qemu": {\r\n            "micro": 22,\r\n            "minor": 2,\r\n            "major": 7\r\n        },\r\n        "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"\r\n    },\r\n    "id": {\r\n        "s": "x",\r\n        "a": {\r\n        },\r\n        "b": [\r\n        ],\r\n        "c": [\r\n            1,\r\n            {\r\n                "d": null,\r\n                "e": true,\r\n                "f": false\r\n            }\r\n        ]\r\n    }\r\n}';
    const value = {
      return: { qemu: { major: 7, minor: 2, micro: 22 }, package: 'Debian 1:7.2+dfsg-7+deb12u18+b3' },
      id: { a: {}, b: [], c: [1, { d: null, e: true, f: false }], s: 'x' },
    };
    assert.equal(formatQmpJson(value, true), expected);
    assert.equal(formatQmpJson({ error: { class: 'GenericError', desc: 'x' } }, true), '{\r\n    "error": {\r\n        "class": "GenericError",\r\n        "desc": "x"\r\n    }\r\n}');
  });

  it('orders colliding keys most-recent-first, as a QDict bucket does', function () {
    // "micro" and "minor" share bucket 225; QAPI inserts major, minor, micro.
    assert.deepEqual(qdictKeyOrder(['major', 'minor', 'micro']), ['micro', 'minor', 'major']);
  });
});

// The real daemon, if installed: the same bytes must give the same replies.
describe('QMP JSON against qemu-storage-daemon', function () {
  let qsd: ChildProcess | undefined;
  let dir = '';
  const sock = (): string => path.join(dir, 'qmp.sock');

  before(async function () {
    try {
      execFileSync('qemu-storage-daemon', ['--version'], { stdio: 'ignore' });
    } catch {
      this.skip();
    }
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qsd-json-'));
    qsd = spawn('qemu-storage-daemon', ['--chardev', `socket,id=c,path=${sock()},server=on,wait=off`, '--monitor', 'chardev=c'], { stdio: 'ignore' });
    for (let i = 0; i < 100 && !fs.existsSync(sock()); i++) await new Promise((r) => setTimeout(r, 50));
  });
  after(function () {
    qsd?.kill('SIGKILL');
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  async function ask(input: Buffer): Promise<string> {
    const c = net.createConnection(sock());
    let out = '';
    c.setEncoding('latin1');
    c.on('data', (d: string) => { out += d; });
    await new Promise((r) => c.on('connect', r));
    c.write('{"execute":"qmp_capabilities"}\n');
    for (let i = 0; i < 100 && !out.includes('"return": {}}\r\n'); i++) await new Promise((r) => setTimeout(r, 10));
    out = '';
    c.write(input);
    await new Promise((r) => setTimeout(r, 150));
    c.destroy();
    return out;
  }

  /** What our parser plus a minimal dispatcher would send. */
  function ours(input: Buffer): string {
    const out: string[] = [];
    const p = new QmpJsonStreamParser(
      (v) => {
        if (typeof v !== 'object' || v === null || Array.isArray(v)) {
          out.push(formatQmpJson({ error: { class: 'GenericError', desc: NOT_OBJECT } }));
        } else {
          const { id, execute } = v as Record<string, unknown>;
          out.push(formatQmpJson({ id, error: { class: 'CommandNotFound', desc: `The command ${String(execute)} has not been found` } }));
        }
      },
      (m) => out.push(formatQmpJson({ error: { class: 'GenericError', desc: m } })),
    );
    p.feed(input);
    return out.map((l) => `${l}\r\n`).join('');
  }

  it('gives byte-identical replies for broken and odd input', async function () {
    this.timeout(30000);
    const inputs = [
      '{"a": @, "b": 1}', '"abc\x01def"', '\xff', '"\xc3\xa9\xff"', 'true\xc3', '{"a":1,"a":2}', '"\\ud800\\u0041"',
      '{"execute":"nope","id":[1.5,1e20,18446744073709551615,18446744073709551616,-0,-0.0,0.00001,1E400]}',
      '{"execute":"nope","id":{"return":1,"id":2,"error":3,"event":4,"timestamp":5,"data":6,"class":7,"desc":8}}',
      '{"execute":"nope","id":"a\\u0000b\\u00e9\\ud83d\\ude00\\u007f\xc0\x80"}', '@abc\x01{"execute":"nope"}', '1 2 [1] ',
    ];
    for (const s of inputs) {
      const b = Buffer.from(s, 'latin1');
      assert.equal(ours(b), await ask(b), JSON.stringify(s));
    }
  });
});
