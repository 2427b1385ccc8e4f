// The ring buffer and ringbuf-read/-write codecs, against byte sequences checked on QSD 7.2.
import assert from 'node:assert/strict';
import { RingbufChardev, decodeQemuBase64, decodeQemuString, encodeModifiedUtf8 } from '../../../src/chardev/ringbuf.js';
import { QmpError } from '../../../src/qapi/errors.js';

const host = { programName: 'qsd-ts' };
async function ring(size?: number): Promise<RingbufChardev> {
  const rb = new RingbufChardev(host, 'r', { type: 'ringbuf', data: size === undefined ? {} : { size } });
  await rb.open();
  return rb;
}

describe('RingbufChardev', () => {
  it('keeps the newest bytes when full and reads oldest first', async () => {
    const rb = await ring(8);
    rb.write(Buffer.from('abcdefghijkl'));
    assert.equal(rb.count, 8);
    assert.equal(rb.read(3).toString(), 'efg');
    rb.write(Buffer.from('XYZ'));
    assert.equal(rb.read(100).toString(), 'hijklXYZ');
    assert.equal(rb.read(100).length, 0);
  });

  it('wraps around the end of the buffer in both directions', async () => {
    const rb = await ring(4);
    for (let i = 0; i < 10; i++) {
      rb.write(Buffer.from([i, i + 100]));
      assert.deepEqual([...rb.read(2)], [i, i + 100]);
    }
  });

  it('defaults to 64 KiB and refuses sizes that are not powers of two, as QEMU does', async () => {
    assert.equal((await ring()).size, 65536);
    assert.equal((await ring(0)).size, 0);
    for (const size of [3, -4, 6, 65535]) {
      await assert.rejects(ring(size), (e: unknown) => e instanceof QmpError && e.message === 'size of ringbuf chardev must be power of two');
    }
    const empty = await ring(0);
    empty.write(Buffer.from('x'));
    assert.equal(empty.count, 0);
  });
});

describe('ringbuf codecs', () => {
  it('decodes bytes as QEMU prints a C string: NUL ends it, C0 80 is U+0000, invalid becomes U+FFFD', () => {
    assert.equal(decodeQemuString(Buffer.from('hello\0world')), 'hello');
    const b = Buffer.from('4oJB7aCA8J+YgMCA/w==', 'base64');
    assert.equal(decodeQemuString(b), '\uFFFDA\uFFFD\u{1F600}\u0000\uFFFD');
    assert.equal(decodeQemuString(Buffer.from('wIHggIDvt5Dvv75h', 'base64')), '\uFFFD\uFFFD\uFFFD\uFFFDa');
    assert.equal(decodeQemuString(Buffer.from([0xf0, 0x9f])), '\uFFFD');
    assert.equal(decodeQemuString(Buffer.from([0xf8, 0x88, 0x80, 0x80, 0x80, 0x41])), '\uFFFDA');
  });

  it('encodes U+0000 as C0 80 (modified UTF-8)', () => {
    assert.deepEqual([...encodeModifiedUtf8('a\0b')], [0x61, 0xc0, 0x80, 0x62]);
    assert.deepEqual([...encodeModifiedUtf8('\u00e9')], [0xc3, 0xa9]);
  });

  it("decodes base64 like GLib's lenient decoder behind QEMU's character check", () => {
    const hex = (s: string) => decodeQemuBase64(s).toString('hex');
    assert.equal(hex('aGk='), '6869');
    assert.equal(hex('abc'), '');
    assert.equal(hex('a=bc'), '6806dc');
    assert.equal(hex('/w=a'), 'ff1a');
    assert.equal(hex('===='), '00');
    assert.equal(hex('a==b'), '681b');
    assert.equal(hex('YQ==YWI='), '616162');
    assert.equal(hex(''), '');
    for (const bad of ['!!!', 'aGk=\n', 'a b', '\u00e9']) {
      assert.throws(() => decodeQemuBase64(bad), { message: 'Base64 data contains invalid characters' });
    }
  });
});
