// ringbuf/memory chardevs (a power-of-two ring of the newest output) and the byte codecs of ringbuf-read/-write.
import { Chardev, type ChardevData } from './chardev.js';
import { genericError } from '../qapi/errors.js';
import { cStringForMessage } from '../qmp/json.js';

/** QEMU's default ring size. */
const DEFAULT_SIZE = 65536;
/** Larger rings are refused rather than allocated (QEMU would abort on a failed g_malloc). */
const MAX_SIZE = 1 << 30;

export class RingbufChardev extends Chardev {
  private ring = Buffer.alloc(0);
  /** Bytes ever written and ever consumed (QEMU's prod/cons); prod - cons <= size. */
  private prod = 0;
  private cons = 0;

  get qomType(): string {
    return this.backend.type === 'memory' ? 'chardev-memory' : 'chardev-ringbuf';
  }

  filename(): string {
    return this.backend.type;
  }

  get size(): number {
    return this.ring.length;
  }

  protected async openBackend(): Promise<void> {
    const { size = DEFAULT_SIZE } = this.backend.data as ChardevData<'ringbuf'>;
    // QEMU checks size & (size - 1) on a size_t: 0 passes, negative numbers fail.
    const n = BigInt(size);
    if (n < 0n || (n & (n - 1n)) !== 0n) throw genericError('size of ringbuf chardev must be power of two');
    if (n > BigInt(MAX_SIZE)) throw genericError('Cannot allocate memory');
    this.ring = Buffer.alloc(Number(n));
  }

  protected async closeBackend(): Promise<void> {}

  /** A monitor on a ringbuf writes into the ring; it never gets input. */
  protected startFrontend(): void {
    this.connectStream({ write: (text) => this.write(Buffer.from(text)), pendingOutput: 0, pauseInput() {}, resumeInput() {}, close() {} });
  }

  /** Number of unread bytes. */
  get count(): number {
    return this.prod - this.cons;
  }

  /** Append, dropping the oldest bytes when full (a size-0 ring keeps nothing). */
  write(data: Uint8Array): void {
    const size = this.ring.length;
    if (size === 0 || data.length === 0) return;
    const keep = Buffer.from(data.buffer, data.byteOffset, data.byteLength).subarray(Math.max(0, data.length - size));
    const start = this.prod + (data.length - keep.length);
    for (let i = 0; i < keep.length; ) {
      const pos = (start + i) & (size - 1);
      const n = Math.min(keep.length - i, size - pos);
      keep.copy(this.ring, pos, i, i + n);
      i += n;
    }
    this.prod += data.length;
    if (this.prod - this.cons > size) this.cons = this.prod - size;
  }

  /** Take up to `max` of the oldest unread bytes. */
  read(max: number): Buffer {
    const n = Math.min(max, this.count);
    const out = Buffer.allocUnsafe(n);
    const size = this.ring.length;
    for (let i = 0; i < n; ) {
      const pos = (this.cons + i) & (size - 1);
      const k = Math.min(n - i, size - pos);
      this.ring.copy(out, i, pos, pos + k);
      i += k;
    }
    this.cons += n;
    return out;
  }
}

// ---------------------------------------------------------------------------------------------
// Codecs. QEMU holds strings as NUL-terminated modified UTF-8 (NUL is C0 80).

const NUL_MUTF8 = Buffer.from([0xc0, 0x80]);

/** The bytes QEMU has for a QMP string: UTF-8 with U+0000 as C0 80. */
export function encodeModifiedUtf8(text: string): Buffer {
  if (!text.includes('\0')) return Buffer.from(text, 'utf8');
  const parts = text.split('\0').map((p) => Buffer.from(p, 'utf8'));
  return Buffer.concat(parts.flatMap((p, i) => (i ? [NUL_MUTF8, p] : [p])));
}

/**
 * What ringbuf-read's utf8 format returns for raw bytes: QEMU hands them to its JSON writer as a C
 * string, so output stops at the first NUL byte, C0 80 reads as U+0000, and each invalid sequence
 * (stray continuation, truncated, overlong, surrogate, noncharacter, beyond U+10FFFF) becomes U+FFFD.
 */
export function decodeQemuString(b: Uint8Array): string {
  // The same reading as the JSON parser's quoting of raw input (QEMU's modified UTF-8).
  return cStringForMessage(b, 0, b.length);
}

const BASE64_ALPHABET = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/';
const BASE64_RANK = new Int16Array(128).fill(-1);
for (let i = 0; i < 64; i++) BASE64_RANK[BASE64_ALPHABET.charCodeAt(i)] = i;
BASE64_RANK[0x3d] = 0; // '=' decodes as zero bits; only its place in a quad trims output

/**
 * QEMU's qbase64_decode() in 7.2: any character outside the alphabet and '=' is refused; the rest
 * is GLib's lenient g_base64_decode (quads anywhere, an incomplete last quad dropped).
 */
export function decodeQemuBase64(text: string): Buffer {
  const bytes = encodeModifiedUtf8(text);
  for (const c of bytes) {
    if (c >= 128 || BASE64_RANK[c]! < 0) throw genericError('Base64 data contains invalid characters');
  }
  const out = Buffer.allocUnsafe(Math.floor(bytes.length / 4) * 3);
  let n = 0;
  let v = 0;
  let i = 0;
  let last0 = 0;
  let last1 = 0;
  for (const c of bytes) {
    last1 = last0;
    last0 = c;
    v = ((v << 6) | BASE64_RANK[c]!) & 0xffffff;
    if (++i === 4) {
      out[n++] = v >> 16;
      if (last1 !== 0x3d) out[n++] = (v >> 8) & 0xff;
      if (last0 !== 0x3d) out[n++] = v & 0xff;
      i = 0;
    }
  }
  return out.subarray(0, n);
}
