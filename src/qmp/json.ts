// QMP's JSON dialect: QEMU's streaming lexer, streamer and parser (input) and QEMU's compact/pretty writer (output).
//
// The lexer is a byte-level state machine with the same transitions as QEMU's qobject/json-lexer.c, so
// error tokens, recovery points and the "stray '...'" texts match byte for byte. Unlike QEMU, tokens are
// not queued until an object is complete: they feed an incremental parser that keeps only the value under
// construction and the first error, and reports that error at the point QEMU would (when the braces and
// brackets balance). Messages verified against qemu-storage-daemon 7.2.22 (socket monitor; `|` separates
// successive replies; "not an object" = the dispatcher's "QMP input must be a JSON object"):
//
//   input                                   QEMU's replies (desc)
//   `{` then nothing                         (nothing: waits for the rest of the object)
//   `}`  `{"a":}`  `[1,]`  `{"a":1,}`        JSON parse error, expecting value
//   `foo `  `nul `                           JSON parse error, invalid keyword 'foo' / 'nul'
//   `tru`  `-`  `1.`  `1e`  `"\`             (nothing: token incomplete)
//   `Foo`                                    JSON parse error, stray 'F'   (then "oo" skipped)
//   `01`                                     JSON parse error, stray '01'
//   `{"a" 1}`                                JSON parse error, missing : in object pair
//   `{"a":1 "b":2}`                          JSON parse error, expected separator in dict
//   `[1 2]`                                  JSON parse error, expected separator in list
//   `{1:2}`                                  JSON parse error, key is not a string in object
//   `{"a":1,"a":2}`                          JSON parse error, duplicate key
//   `"\x"`                                   JSON parse error, invalid escape sequence in string
//   `"\u12"`                                 JSON parse error, \u12" is not a valid Unicode character
//   `"\ud800"` `"\ud800\u0041"`              JSON parse error, \ud800 is not a valid Unicode character
//   `"\ufffe"` `"\ufdd0"`                    JSON parse error, \ufffe / \ufdd0 is not a valid Unicode character
//   `"\x7f\x80"` `"\xc0\xaf"` `"\xed\xa0\x80"` `"\xf4\x90\x80\x80"` `"\xef\xbf\xbe"`
//                                            JSON parse error, invalid UTF-8 sequence in string
//   `"\xc0\x80"`  `"\u0000"`                 a string holding NUL (echoed as "\u0000")
//   `"abc\x01def"`                           JSON parse error, stray '"abc\u0001'   (rest skipped)
//   `"\\\x01"`                               JSON parse error, stray '"\\\u0001'
//   `\x01` / `\x00` / `\xff`                 JSON parse error, stray '\u0001' / stray '' / stray '\uFFFD'
//   `"\xc3\xa9\xff"`                         JSON parse error, stray '"\u00E9\uFFFD'
//   `true\xc3`                               not an object | JSON parse error, stray '\uFFFD'
//   `1.5x`                                   not an object (then "x" waits as a keyword)
//   `{"a": @, "b": 1}`                       stray '@' | expecting value | not an object | expecting value
//                                            | not an object | expecting value
//   `@abc\x01{...}` / `@abc\xfe{...}`        stray '@' | stray '\u0001' / stray '\uFFFD' | (the command)
//   `@abc\n{...}` `@abc\t{...}` `@abc"x{...}` stray '@' | (the command)
//   `{"id":"x\x01y"}{...}`                   stray '"x\u0001' | expecting value | (the command)
//   `'['*1025 + ']]]'`                       JSON nesting depth limit exceeded | expecting value x3
//   1024 levels                              accepted
//   `[` + `1,`*1048575 + `1]` (2097153 tokens)  JSON token count limit exceeded; 2097151 tokens accepted
//   echo of ids: 0.1 → 0.10000000000000001, 1e20 → 1e+20, 1e16 → 10000000000000000,
//     18446744073709551615 → same, 18446744073709551616 → 1.8446744073709552e+19, -0 → 0, -0.0 → -0,
//     0.00001 → 1.0000000000000001e-05, 1E400 → inf, "\u00e9" → "\u00E9", "\/" → "/", "\u007f" → "\u007F"
//   dict key order of every output object: QDict hash order, e.g. {"timestamp", "class", "event", "desc",
//     "return", "id", "error", "data"}; pretty=on: 4-space indent, "," line ends, empty {} / [] printed as
//     "{" NL indent "}", lines joined with CRLF by the monitor.
// One complete value (the command line's `{...}` form, parseQmpJson):
//   `{` → JSON parse error, premature EOI;  `{"x":1` → premature EOI;  `{"x":"a` → stray '"a';
//   `{} 1`, `{}}`, `{}]`, `{},`, `{}[`, `{} x` → Expecting at most one JSON value;  `` → Expecting a JSON value

/** QEMU's limits (qobject/json-streamer.c, json-lexer.c). */
export const QMP_JSON_MAX_TOKEN_SIZE = 64 * 1024 * 1024;
export const QMP_JSON_MAX_TOKEN_COUNT = 2 * 1024 * 1024;
export const QMP_JSON_MAX_NESTING = 1024;

/** Limits applied per top-level value; QEMU's values are the defaults. */
export interface QmpJsonLimits {
  /** Longest single token, and the most token bytes (+1) one top-level value may hold. */
  maxTokenSize?: number;
  /** Most tokens one top-level value may hold. */
  maxTokenCount?: number;
  /** Deepest nesting of objects and arrays. */
  maxNesting?: number;
}

// ---------------------------------------------------------------------------------------------------------
// Lexer states and token types (numbering mirrors QEMU's: tokens >= 100, JSON_ERROR = 0).

const ERROR = 0;
const IN_RECOVERY = 1;
const IN_DQ_STRING_ESCAPE = 2;
const IN_DQ_STRING = 3;
const IN_SQ_STRING_ESCAPE = 4;
const IN_SQ_STRING = 5;
const IN_ZERO = 6;
const IN_EXP_DIGITS = 7;
const IN_EXP_SIGN = 8;
const IN_EXP_E = 9;
const IN_MANTISSA = 10;
const IN_MANTISSA_DIGITS = 11;
const IN_DIGITS = 12;
const IN_SIGN = 13;
const IN_KEYWORD = 14;
const IN_START = 15;
const N_STATES = 16;

const T_LCURLY = 100;
const T_RCURLY = 101;
const T_LSQUARE = 102;
const T_RSQUARE = 103;
const T_COLON = 104;
const T_COMMA = 105;
const T_INTEGER = 106;
const T_FLOAT = 107;
const T_KEYWORD = 108;
const T_STRING = 109;

/** Set on a transition that does not consume the byte (it is looked at again in the new state). */
const LOOKAHEAD = 0x80;

function buildLexerTable(): Uint8Array {
  const t = new Uint8Array(N_STATES * 256); // default: ERROR
  const set = (state: number, from: number, to: number, next: number): void => {
    t.fill(next, state * 256 + from, state * 256 + to + 1);
  };
  const ch = (c: string): number => c.charCodeAt(0);
  const terminal = (state: number, token: number): void => set(state, 0, 0xff, token | LOOKAHEAD);

  // Skip until a structural character, a control character other than TAB, or 0xFE/0xFF.
  set(IN_RECOVERY, 0, 0x1f, IN_START | LOOKAHEAD);
  set(IN_RECOVERY, 0x20, 0xfd, IN_RECOVERY);
  set(IN_RECOVERY, 0xfe, 0xff, IN_START | LOOKAHEAD);
  set(IN_RECOVERY, 9, 9, IN_RECOVERY);
  for (const c of '[]{}:,') set(IN_RECOVERY, ch(c), ch(c), IN_START | LOOKAHEAD);

  set(IN_DQ_STRING_ESCAPE, 0x20, 0xfd, IN_DQ_STRING);
  set(IN_DQ_STRING, 0x20, 0xfd, IN_DQ_STRING);
  set(IN_DQ_STRING, ch('\\'), ch('\\'), IN_DQ_STRING_ESCAPE);
  set(IN_DQ_STRING, ch('"'), ch('"'), T_STRING);
  set(IN_SQ_STRING_ESCAPE, 0x20, 0xfd, IN_SQ_STRING);
  set(IN_SQ_STRING, 0x20, 0xfd, IN_SQ_STRING);
  set(IN_SQ_STRING, ch('\\'), ch('\\'), IN_SQ_STRING_ESCAPE);
  set(IN_SQ_STRING, ch("'"), ch("'"), T_STRING);

  terminal(IN_ZERO, T_INTEGER);
  set(IN_ZERO, ch('0'), ch('9'), ERROR);
  set(IN_ZERO, ch('.'), ch('.'), IN_MANTISSA);

  terminal(IN_EXP_DIGITS, T_FLOAT);
  set(IN_EXP_DIGITS, ch('0'), ch('9'), IN_EXP_DIGITS);
  set(IN_EXP_SIGN, ch('0'), ch('9'), IN_EXP_DIGITS);
  set(IN_EXP_E, ch('-'), ch('-'), IN_EXP_SIGN);
  set(IN_EXP_E, ch('+'), ch('+'), IN_EXP_SIGN);
  set(IN_EXP_E, ch('0'), ch('9'), IN_EXP_DIGITS);
  terminal(IN_MANTISSA_DIGITS, T_FLOAT);
  set(IN_MANTISSA_DIGITS, ch('0'), ch('9'), IN_MANTISSA_DIGITS);
  set(IN_MANTISSA_DIGITS, ch('e'), ch('e'), IN_EXP_E);
  set(IN_MANTISSA_DIGITS, ch('E'), ch('E'), IN_EXP_E);
  set(IN_MANTISSA, ch('0'), ch('9'), IN_MANTISSA_DIGITS);

  terminal(IN_DIGITS, T_INTEGER);
  set(IN_DIGITS, ch('0'), ch('9'), IN_DIGITS);
  set(IN_DIGITS, ch('e'), ch('e'), IN_EXP_E);
  set(IN_DIGITS, ch('E'), ch('E'), IN_EXP_E);
  set(IN_DIGITS, ch('.'), ch('.'), IN_MANTISSA);
  set(IN_SIGN, ch('0'), ch('0'), IN_ZERO);
  set(IN_SIGN, ch('1'), ch('9'), IN_DIGITS);

  terminal(IN_KEYWORD, T_KEYWORD);
  set(IN_KEYWORD, ch('a'), ch('z'), IN_KEYWORD);

  set(IN_START, ch('"'), ch('"'), IN_DQ_STRING);
  set(IN_START, ch("'"), ch("'"), IN_SQ_STRING);
  set(IN_START, ch('0'), ch('0'), IN_ZERO);
  set(IN_START, ch('1'), ch('9'), IN_DIGITS);
  set(IN_START, ch('-'), ch('-'), IN_SIGN);
  set(IN_START, ch('{'), ch('{'), T_LCURLY);
  set(IN_START, ch('}'), ch('}'), T_RCURLY);
  set(IN_START, ch('['), ch('['), T_LSQUARE);
  set(IN_START, ch(']'), ch(']'), T_RSQUARE);
  set(IN_START, ch(','), ch(','), T_COMMA);
  set(IN_START, ch(':'), ch(':'), T_COLON);
  set(IN_START, ch('a'), ch('z'), IN_KEYWORD);
  for (const c of ' \t\r\n') set(IN_START, ch(c), ch(c), IN_START);
  return t;
}

const LEXER = buildLexerTable();

// ---------------------------------------------------------------------------------------------------------
// QEMU's modified UTF-8 (util/unicode.c): "\xC0\x80" is NUL; surrogates and noncharacters are invalid.

function isValidCodepoint(cp: number): boolean {
  if (cp < 0 || cp > 0x10ffff) return false;
  if ((cp >= 0xfdd0 && cp <= 0xfdef) || (cp & 0xfffe) === 0xfffe) return false;
  return !(cp >= 0xd800 && cp <= 0xdfff);
}

const MIN_CP = [0x80, 0x800, 0x10000, 0x200000, 0x4000000];

/** Decodes one sequence at b[i] (b ends at `end`, as if NUL-terminated); sets `decodedEnd`. -1 if invalid. */
let decodedEnd = 0;
function modUtf8Codepoint(b: Uint8Array, i: number, end: number): number {
  let byte = b[i]!;
  let p = i + 1;
  let cp: number;
  if (byte < 0x80) {
    cp = byte;
  } else if (byte >= 0xfe || (byte & 0x40) === 0) {
    cp = -1; // impossible byte or stray continuation byte
  } else {
    let len = 0;
    let mask = 0x80;
    for (; byte & mask; mask >>= 1) len++;
    cp = byte & (mask - 1);
    for (let k = 1; k < len; k++) {
      byte = p < end ? b[p]! : 0;
      if ((byte & 0xc0) !== 0x80) {
        decodedEnd = p;
        return -1; // continuation byte missing; it is not consumed
      }
      p++;
      cp = cp * 64 + (byte & 0x3f);
    }
    if (!isValidCodepoint(cp)) cp = -1;
    else if (cp < MIN_CP[len - 2]! && !(cp === 0 && len === 2)) cp = -1; // overlong, except C0 80
  }
  decodedEnd = p;
  return cp;
}

/**
 * Bytes of a C string as QEMU's JSON writer would read them: stop at NUL, invalid sequences become U+FFFD.
 * Used for error messages that quote raw input, so our writer reproduces QEMU's output exactly.
 */
export function cStringForMessage(b: Uint8Array, start: number, end: number): string {
  let out = '';
  for (let i = start; i < end && b[i] !== 0; i = decodedEnd) {
    const cp = modUtf8Codepoint(b, i, end);
    out += String.fromCodePoint(cp < 0 ? 0xfffd : cp);
  }
  return out;
}

function hexValue(c: number): number {
  if (c >= 0x30 && c <= 0x39) return c - 0x30;
  if (c >= 0x41 && c <= 0x46) return c - 0x37;
  if (c >= 0x61 && c <= 0x66) return c - 0x57;
  return -1;
}

/** Four hex digits at b[i] (reading stops at the first non-digit, as QEMU's cvt4hex does). */
function cvt4hex(b: Uint8Array, i: number, end: number): number {
  let cp = 0;
  for (let k = 0; k < 4; k++) {
    const v = i + k < end ? hexValue(b[i + k]!) : -1;
    if (v < 0) return -1;
    cp = cp * 16 + v;
  }
  return cp;
}

const ESCAPES: Record<number, string> = {
  0x22: '"', 0x27: "'", 0x5c: '\\', 0x2f: '/', 0x62: '\b', 0x66: '\f', 0x6e: '\n', 0x72: '\r', 0x74: '\t',
};

/** Thrown inside the parser; carries the text after "JSON parse error, ". */
class ParseError {
  constructor(readonly message: string) {}
}

/** The contents of a string token (quotes included in b[0..len)), as QEMU's parse_string reads them. */
function parseStringToken(b: Uint8Array, len: number): string {
  const end = len - 1; // the closing quote
  const units: number[] = [];
  let out = '';
  const flush = (): void => {
    out += String.fromCharCode.apply(null, units);
    units.length = 0;
  };
  let p = 1;
  while (p < end) {
    const c = b[p]!;
    if (c === 0x5c) {
      const beg = p;
      const e = b[p + 1]!;
      p += 2;
      if (e === 0x75) {
        let cp = cvt4hex(b, p, len);
        p += 4;
        if (cp >= 0xd800 && cp <= 0xdbff && p + 1 < len && b[p] === 0x5c && b[p + 1] === 0x75) {
          const trailing = cvt4hex(b, p + 2, len);
          if (trailing >= 0xdc00 && trailing <= 0xdfff) {
            cp = 0x10000 + ((cp & 0x3ff) << 10) + (trailing & 0x3ff);
            p += 6;
          } else {
            cp = -1;
          }
        }
        if (!isValidCodepoint(cp)) {
          throw new ParseError(`${cStringForMessage(b, beg, Math.min(p, len))} is not a valid Unicode character`);
        }
        pushCodepoint(units, cp);
      } else {
        const s = ESCAPES[e];
        if (s === undefined) throw new ParseError('invalid escape sequence in string');
        units.push(s.charCodeAt(0));
      }
    } else if (c < 0x80) {
      units.push(c);
      p++;
    } else {
      const cp = modUtf8Codepoint(b, p, end);
      if (cp < 0) throw new ParseError('invalid UTF-8 sequence in string');
      p = decodedEnd;
      pushCodepoint(units, cp);
    }
    if (units.length >= 8192) flush();
  }
  flush();
  return out;
}

function pushCodepoint(units: number[], cp: number): void {
  if (cp > 0xffff) {
    units.push(0xd800 + ((cp - 0x10000) >> 10), 0xdc00 + ((cp - 0x10000) & 0x3ff));
  } else {
    units.push(cp);
  }
}

const INT64_MIN = -(2n ** 63n);
const UINT64_MAX = 2n ** 64n - 1n;

/**
 * An integer token as QEMU represents it (int64, else uint64, else double): a number when exactly
 * representable, a bigint for int64/uint64 values beyond 2^53, a (rounded) number beyond uint64.
 */
function parseIntegerToken(text: string): number | bigint {
  const n = Number(text);
  if (Number.isSafeInteger(n)) return n === 0 ? 0 : n; // "-0" is int64 0 in QEMU
  const big = BigInt(text);
  if (big >= INT64_MIN && big <= UINT64_MAX) return big;
  return n;
}

// ---------------------------------------------------------------------------------------------------------
// Incremental parser: the recursive descent of qobject/json-parser.c, driven one token at a time.

const enum Ctx {
  /** Expecting the top-level value. */
  Top,
  /** After '[': ']' or a value. */
  ArrFirst,
  /** After ',' in an array: a value. */
  ArrValue,
  /** After an element: ',' or ']'. */
  ArrNext,
  /** After '{': '}' or a key. */
  ObjFirst,
  /** After ',' in an object: a key. */
  ObjKey,
  /** After a key: ':'. */
  ObjColon,
  /** After ':': a value. */
  ObjValue,
  /** After a member: ',' or '}'. */
  ObjNext,
  /** The top-level value is complete. */
  Done,
}

interface Frame {
  ctx: Ctx;
  container: unknown[] | Record<string, unknown>;
  key: string;
}

function setMember(obj: Record<string, unknown>, key: string, value: unknown): void {
  if (key === '__proto__') {
    Object.defineProperty(obj, key, { value, enumerable: true, writable: true, configurable: true });
  } else {
    obj[key] = value;
  }
}

class IncrementalParser {
  private stack: Frame[] = [];
  private ctx: Ctx = Ctx.Top;
  private result: unknown = undefined;
  /** The first error, reported only when the streamer decides the value is complete. */
  error: string | null = null;

  reset(): void {
    this.stack = [];
    this.ctx = Ctx.Top;
    this.result = undefined;
    this.error = null;
  }

  /** The value, or throws ParseError; premature EOI if tokens ran out. */
  finish(): unknown {
    if (this.error !== null) throw new ParseError(this.error);
    if (this.ctx !== Ctx.Done) throw new ParseError('premature EOI');
    return this.result;
  }

  push(type: number, b: Uint8Array, len: number): void {
    if (this.error !== null || this.ctx === Ctx.Done) return;
    try {
      this.step(type, b, len);
    } catch (e) {
      if (!(e instanceof ParseError)) throw e;
      this.error = e.message;
    }
  }

  private step(type: number, b: Uint8Array, len: number): void {
    switch (this.ctx) {
      case Ctx.ArrFirst:
        if (type === T_RSQUARE) return this.close();
        return this.value(type, b, len);
      case Ctx.ArrNext:
        if (type === T_RSQUARE) return this.close();
        if (type !== T_COMMA) throw new ParseError('expected separator in list');
        this.ctx = Ctx.ArrValue;
        return;
      case Ctx.ObjFirst:
        if (type === T_RCURLY) return this.close();
        return this.value(type, b, len);
      case Ctx.ObjColon:
        if (type !== T_COLON) throw new ParseError('missing : in object pair');
        this.ctx = Ctx.ObjValue;
        return;
      case Ctx.ObjNext:
        if (type === T_RCURLY) return this.close();
        if (type !== T_COMMA) throw new ParseError('expected separator in dict');
        this.ctx = Ctx.ObjKey;
        return;
      default:
        return this.value(type, b, len);
    }
  }

  /** A token where a value must start. */
  private value(type: number, b: Uint8Array, len: number): void {
    switch (type) {
      case T_LCURLY:
        this.open({});
        this.ctx = Ctx.ObjFirst;
        return;
      case T_LSQUARE:
        this.open([]);
        this.ctx = Ctx.ArrFirst;
        return;
      case T_STRING:
        return this.complete(parseStringToken(b, len));
      case T_INTEGER:
        return this.complete(parseIntegerToken(latin1(b, len)));
      case T_FLOAT:
        return this.complete(Number(latin1(b, len)));
      case T_KEYWORD: {
        const word = latin1(b, len);
        if (word === 'true') return this.complete(true);
        if (word === 'false') return this.complete(false);
        if (word === 'null') return this.complete(null);
        throw new ParseError(`invalid keyword '${word}'`);
      }
      default:
        throw new ParseError('expecting value');
    }
  }

  private open(container: unknown[] | Record<string, unknown>): void {
    this.stack.push({ ctx: this.ctx, container, key: '' });
  }

  private close(): void {
    const frame = this.stack.pop()!;
    this.ctx = frame.ctx;
    this.complete(frame.container);
  }

  /** A complete value, delivered to the context that asked for it. */
  private complete(v: unknown): void {
    const top = this.stack[this.stack.length - 1];
    switch (this.ctx) {
      case Ctx.Top:
        this.result = v;
        this.ctx = Ctx.Done;
        return;
      case Ctx.ArrFirst:
      case Ctx.ArrValue:
        (top!.container as unknown[]).push(v);
        this.ctx = Ctx.ArrNext;
        return;
      case Ctx.ObjFirst:
      case Ctx.ObjKey:
        if (typeof v !== 'string') throw new ParseError('key is not a string in object');
        top!.key = v;
        this.ctx = Ctx.ObjColon;
        return;
      case Ctx.ObjValue: {
        const obj = top!.container as Record<string, unknown>;
        if (Object.prototype.hasOwnProperty.call(obj, top!.key)) throw new ParseError('duplicate key');
        setMember(obj, top!.key, v);
        this.ctx = Ctx.ObjNext;
        return;
      }
      default:
        throw new Error('unreachable parser state');
    }
  }
}

function latin1(b: Uint8Array, len: number): string {
  return Buffer.from(b.buffer, b.byteOffset, len).toString('latin1');
}

// ---------------------------------------------------------------------------------------------------------

/**
 * QMP's streaming JSON reader: bytes in, one callback per top-level value or error out, exactly as QEMU's
 * json-streamer delivers them to its monitor (a value need not be an object; that check is the dispatcher's).
 */
export class QmpJsonStreamParser {
  private readonly maxTokenSize: number;
  private readonly maxTokenCount: number;
  private readonly maxNesting: number;
  private state = IN_START;
  private token = new Uint8Array(256);
  private tokenLen = 0;
  private braceCount = 0;
  private bracketCount = 0;
  private tokenSize = 0;
  private tokenCount = 0;
  private readonly parser = new IncrementalParser();
  /** Bumped by reset(), so a callback's reset() stops the chunk being fed. */
  private generation = 0;

  constructor(
    private readonly onValue: (value: unknown) => void,
    private readonly onError: (message: string) => void,
    limits: QmpJsonLimits = {},
  ) {
    this.maxTokenSize = limits.maxTokenSize ?? QMP_JSON_MAX_TOKEN_SIZE;
    this.maxTokenCount = limits.maxTokenCount ?? QMP_JSON_MAX_TOKEN_COUNT;
    this.maxNesting = limits.maxNesting ?? QMP_JSON_MAX_NESTING;
  }

  /** Feeds bytes (strings are UTF-8 encoded); values and errors are reported synchronously. */
  feed(chunk: Buffer | string): void {
    const data = typeof chunk === 'string' ? Buffer.from(chunk, 'utf8') : chunk;
    const gen = this.generation;
    for (let i = 0; i < data.length; i++) {
      this.feedByte(data[i]!, false);
      if (this.generation !== gen) return;
    }
  }

  /** End of input (QEMU's json_message_parser_flush): finishes a pending token and value. */
  flush(): void {
    this.feedByte(0, true);
    this.processToken(-1);
  }

  /** Forgets everything buffered, as for a new connection. */
  reset(): void {
    this.generation++;
    this.state = IN_START;
    this.tokenLen = 0;
    if (this.token.length > 4096) this.token = new Uint8Array(256);
    this.resetValue();
  }

  private resetValue(): void {
    this.braceCount = 0;
    this.bracketCount = 0;
    this.tokenSize = 0;
    this.tokenCount = 0;
    this.parser.reset();
  }

  private feedByte(c: number, flush: boolean): void {
    let consumed = false;
    while (flush ? this.state !== IN_START : !consumed) {
      const next = LEXER[this.state * 256 + c]!;
      consumed = !flush && (next & LOOKAHEAD) === 0;
      let ns = next & ~LOOKAHEAD;
      if (consumed) this.append(c);
      if (ns >= T_LCURLY) {
        this.processToken(ns);
        this.tokenLen = 0;
        ns = IN_START;
      } else if (ns === IN_START) {
        this.tokenLen = 0;
      } else if (ns === ERROR) {
        this.processToken(ERROR);
        this.tokenLen = 0;
        ns = IN_RECOVERY;
      } else if (ns === IN_RECOVERY) {
        this.tokenLen = 0;
      }
      this.state = ns;
    }
    // A single token may not grow without bound (QEMU does the same, then lexes the rest afresh).
    if (this.tokenLen > this.maxTokenSize) {
      this.tokenLen = 0;
      this.state = IN_START;
      this.emitError('JSON token size limit exceeded');
    }
  }

  private append(c: number): void {
    if (this.tokenLen === this.token.length) {
      const bigger = new Uint8Array(this.token.length * 2);
      bigger.set(this.token);
      this.token = bigger;
    }
    this.token[this.tokenLen++] = c;
  }

  /** QEMU's json_message_process_token; type -1 is end of input. */
  private processToken(type: number): void {
    const len = this.tokenLen;
    switch (type) {
      case T_LCURLY: this.braceCount++; break;
      case T_RCURLY: this.braceCount--; break;
      case T_LSQUARE: this.bracketCount++; break;
      case T_RSQUARE: this.bracketCount--; break;
      case ERROR:
        this.emitError(`JSON parse error, stray '${cStringForMessage(this.token, 0, len)}'`);
        return;
      case -1:
        if (this.tokenCount === 0) return;
        this.complete();
        return;
      default:
        break;
    }
    // QEMU bounds memory and recursion per top-level value.
    if (this.tokenSize + len + 1 > this.maxTokenSize) return this.emitError('JSON token size limit exceeded');
    if (this.tokenCount + 1 > this.maxTokenCount) return this.emitError('JSON token count limit exceeded');
    if (this.bracketCount + this.braceCount > this.maxNesting) {
      return this.emitError('JSON nesting depth limit exceeded');
    }
    this.tokenSize += len;
    this.tokenCount++;
    this.parser.push(type, this.token, len);
    if ((this.braceCount > 0 || this.bracketCount > 0) && this.braceCount >= 0 && this.bracketCount >= 0) return;
    this.complete();
  }

  private complete(): void {
    let value: unknown;
    try {
      value = this.parser.finish();
    } catch (e) {
      if (!(e instanceof ParseError)) throw e;
      return this.emitError(`JSON parse error, ${e.message}`);
    }
    this.resetValue();
    this.onValue(value);
  }

  private emitError(message: string): void {
    this.resetValue();
    this.onError(message);
  }
}

/**
 * Parses exactly one JSON value in QMP's dialect (QEMU's qobject_from_json, as used for the command
 * line's `{...}` arguments). Throws Error with QEMU's message.
 */
export function parseQmpJson(text: string, limits?: QmpJsonLimits): unknown {
  let result: unknown;
  let haveResult = false;
  let error: string | null = null;
  const consume = (value: unknown, err: string | null): void => {
    if (haveResult) {
      haveResult = false;
      result = undefined;
      error = 'Expecting at most one JSON value';
    }
    if (error !== null) return;
    if (err !== null) {
      error = err;
      return;
    }
    result = value;
    haveResult = true;
  };
  const p = new QmpJsonStreamParser((v) => consume(v, null), (m) => consume(undefined, m), limits);
  const nul = text.indexOf('\0'); // QEMU reads a C string
  p.feed(nul >= 0 ? text.slice(0, nul) : text);
  p.flush();
  if (!haveResult && error === null) error = 'Expecting a JSON value';
  if (error !== null) throw new Error(error);
  return result;
}

// ---------------------------------------------------------------------------------------------------------
// Output: QEMU's qobject/qjson.c to_json().

/** QDict's bucket for a key: tdb_hash() modulo QDICT_BUCKET_MAX (512), over the key's UTF-8 bytes. */
export function qdictBucket(key: string): number {
  // QEMU stores NUL as the two bytes C0 80 (modified UTF-8).
  const parts = key.split('\0').map((part) => Buffer.from(part, 'utf8'));
  return tdbHash(parts.length === 1 ? parts[0]! : Buffer.concat(parts.flatMap((x, i) => (i ? [NUL_MUTF8, x] : [x]))));
}

const NUL_MUTF8 = Buffer.from([0xc0, 0x80]);

function tdbHash(b: Uint8Array): number {
  let value = Math.imul(0x238f13af, b.length) >>> 0;
  for (let i = 0; i < b.length; i++) value = (value + (b[i]! << ((i * 5) % 24))) >>> 0;
  return ((Math.imul(1103515243, value) + 12345) >>> 0) % 512;
}

/**
 * Keys in the order QEMU prints a QDict: by hash bucket, and within a bucket the most recently
 * inserted first (we take the object's property order as insertion order).
 */
export function qdictKeyOrder(keys: readonly string[]): string[] {
  const decorated = keys.map((k, i) => ({ k, i, b: qdictBucket(k) }));
  decorated.sort((x, y) => x.b - y.b || y.i - x.i);
  return decorated.map((d) => d.k);
}

/** printf("%.17g", x) as glibc prints it. */
export function formatDouble(x: number): string {
  if (Number.isNaN(x)) return 'nan';
  if (!Number.isFinite(x)) return x > 0 ? 'inf' : '-inf';
  if (x === 0) return Object.is(x, -0) ? '-0' : '0';
  const exp = x.toExponential(16);
  const e = exp.indexOf('e');
  const exponent = Number(exp.slice(e + 1));
  if (exponent < -4 || exponent >= 17) {
    const mant = stripZeros(exp.slice(0, e));
    const mag = Math.abs(exponent);
    return `${mant}e${exponent < 0 ? '-' : '+'}${mag < 10 ? '0' : ''}${mag}`;
  }
  return stripZeros(x.toFixed(16 - exponent));
}

function stripZeros(s: string): string {
  if (!s.includes('.')) return s;
  s = s.replace(/0+$/, '');
  return s.endsWith('.') ? s.slice(0, -1) : s;
}

// eslint-disable-next-line no-control-regex
const PLAIN = /^[\x20-\x21\x23-\x5b\x5d-\x7e]*$/;

function quote(s: string): string {
  if (PLAIN.test(s)) return `"${s}"`;
  let out = '"';
  for (let i = 0; i < s.length; i++) {
    let cp = s.charCodeAt(i);
    if (cp >= 0xd800 && cp <= 0xdbff && i + 1 < s.length) {
      const lo = s.charCodeAt(i + 1);
      if (lo >= 0xdc00 && lo <= 0xdfff) {
        cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
        i++;
      }
    }
    switch (cp) {
      case 0x22: out += '\\"'; continue;
      case 0x5c: out += '\\\\'; continue;
      case 0x08: out += '\\b'; continue;
      case 0x0c: out += '\\f'; continue;
      case 0x0a: out += '\\n'; continue;
      case 0x0d: out += '\\r'; continue;
      case 0x09: out += '\\t'; continue;
      default:
        break;
    }
    // What QEMU holds is UTF-8: a lone surrogate or a noncharacter could not survive there.
    if (cp !== 0 && !isValidCodepoint(cp)) cp = 0xfffd;
    if (cp > 0xffff) {
      out += `\\u${hex4(0xd800 + ((cp - 0x10000) >> 10))}\\u${hex4(0xdc00 + ((cp - 0x10000) & 0x3ff))}`;
    } else if (cp < 0x20 || cp >= 0x7f) {
      out += `\\u${hex4(cp)}`;
    } else {
      out += String.fromCharCode(cp);
    }
  }
  return out + '"';
}

function hex4(n: number): string {
  return n.toString(16).toUpperCase().padStart(4, '0');
}

function write(v: unknown, pretty: boolean, indent: number, out: string[]): void {
  switch (typeof v) {
    case 'string':
      out.push(quote(v));
      return;
    case 'number':
      out.push(formatDouble(v));
      return;
    case 'bigint':
      out.push(v.toString());
      return;
    case 'boolean':
      out.push(v ? 'true' : 'false');
      return;
    case 'undefined':
      out.push('null');
      return;
    case 'object':
      break;
    default:
      throw new TypeError(`cannot format a ${typeof v} as QMP JSON`);
  }
  if (v === null) {
    out.push('null');
    return;
  }
  const nl = pretty ? `\r\n${' '.repeat((indent + 1) * 4)}` : '';
  const end = pretty ? `\r\n${' '.repeat(indent * 4)}` : '';
  const sep = pretty ? ',' : ', ';
  if (Array.isArray(v)) {
    out.push('[');
    for (let i = 0; i < v.length; i++) {
      if (i > 0) out.push(sep);
      out.push(nl);
      write(v[i], pretty, indent + 1, out);
    }
    out.push(end, ']');
    return;
  }
  const obj = v as Record<string, unknown>;
  const keys = qdictKeyOrder(Object.keys(obj).filter((k) => obj[k] !== undefined));
  out.push('{');
  for (let i = 0; i < keys.length; i++) {
    if (i > 0) out.push(sep);
    out.push(nl, quote(keys[i]!), ': ');
    write(obj[keys[i]!], pretty, indent + 1, out);
  }
  out.push(end, '}');
}

/**
 * A value as QEMU's monitor writes it, without the final line end (append "\r\n"). Compact form uses
 * ", " and ": "; `pretty` is QEMU's pretty=on layout with the monitor's CRLF line breaks already in
 * place. Object keys come out in QDict hash order, as QEMU prints them. Numbers print as "%.17g"
 * (integers below 1e17 exactly); use bigint for exact 64-bit values. Undefined members are left out.
 */
export function formatQmpJson(value: unknown, pretty = false): string {
  const out: string[] = [];
  write(value, pretty, 0, out);
  return out.join('');
}
