// QEMU's keyval syntax (util/keyval.c) for --blockdev, --export, --monitor, --nbd-server and --object.
//
// Grammar: key-vals = [ key-val { ',' key-val } [ ',' ] ]; key-val = key '=' val | help;
// key = key-fragment { '.' key-fragment }; a value runs to the next single ',' (",," is a comma);
// the first element may omit "key=" when an implied key is given (its value then ends at the first
// ',' or '=', with no ",," escape). Dotted keys build nested objects, all-numeric members become
// arrays; every scalar stays a string (the keyval input visitor converts it later).
//
// Messages verified against qemu-storage-daemon 7.2.22 (`--blockdev <arg>`, implied key "driver"):
//   null-co,,x                         Invalid parameter ''
//   driver=null-co,=x  ,driver=…  =x   Invalid parameter ''
//   driver=null-co,foo                 Expected '=' after parameter 'foo'   (also 'foo.bar')
//   help  ?  null-co,help              Help is not available for this option
//   a..b=1  a.=1  .a=1  1=x  _x=1  'a b=1'
//                                      Invalid parameter 'a..b' / 'a.' / '.a' / '1' / '_x' / 'a b'
//   a.1=x   a.2=x,a.3=y   a.99999999999=x
//                                      Parameter 'a.0' missing
//   a.0=x,a.2=y                        Parameter 'a.1' missing
//   a.b.1=x,a.c.1=y                    Parameter 'a.b.0' missing   (members visited in QDict hash order)
//   a.0=x,a.b=y                        Parameters 'a.*' used inconsistently
//   a=1,a.b=2   a.b=2,a=1              Parameters 'a.*' used inconsistently
//   a.b.c=2,a.b=1                      Parameters 'a.b.*' used inconsistently
//   128-char key / x.<128 chars>       Parameter '<key>' is too long / Parameter fragment '<frag>' is too long
//   127-char key, __com.redhat_x=1, a.0=x,a.00=y
//                                      accepted by keyval (the visitor then rejects the member)
//   node-name=x,node-name=y,,z         last one wins, value "y,z"
//   null-co,size=1,                    trailing ',' accepted

import { qdictKeyOrder } from '../qmp/json.js';

/** A parsed keyval tree: strings, nested objects and arrays of those. */
export type KeyvalValue = string | KeyvalDict | KeyvalValue[];
export interface KeyvalDict {
  [key: string]: KeyvalValue;
}

/** The longest key fragment QEMU accepts (key_in_cur[128] holds it with its NUL). */
const MAX_FRAGMENT = 127;
const INT_MAX = 2147483647;

/** QEMU's parse_qapi_name(s, false): the length of a QAPI name at s[i], or -1. */
function qapiNameLength(s: string, i: number): number {
  let p = i;
  if (s[p] === '_') {
    // Downstream extension prefix __RFQDN_
    p++;
    if (s[p] !== '_') return -1;
    for (p++; p < s.length && /[A-Za-z0-9.-]/.test(s[p]!); p++);
    if (s[p] !== '_') return -1;
    p++;
  }
  if (!/[A-Za-z]/.test(s[p] ?? '')) return -1;
  for (p++; p < s.length && /[A-Za-z0-9_-]/.test(s[p]!); p++);
  return p - i;
}

/** QEMU's key_to_index(): a decimal index at s[i] and its length, or null. */
function keyToIndex(s: string, i: number): { index: number; len: number } | null {
  const m = /^[0-9]+/.exec(s.slice(i));
  if (!m) return null;
  const n = Number(m[0]);
  return { index: n > INT_MAX ? INT_MAX : n, len: m[0].length };
}

function isIndexKey(key: string): boolean {
  return /^[0-9]/.test(key) && /^[0-9]+$/.test(key);
}

class KeyvalError extends Error {}

function isDict(v: unknown): v is KeyvalDict {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function put(cur: KeyvalDict, name: string, value: string | null, text: string, keyStart: number, keyEnd: number): KeyvalDict | null {
  const old = Object.prototype.hasOwnProperty.call(cur, name) ? cur[name] : undefined;
  if (old !== undefined) {
    if ((value === null) !== isDict(old)) {
      throw new KeyvalError(`Parameters '${text.slice(keyStart, keyEnd)}.*' used inconsistently`);
    }
    if (value === null) return old as KeyvalDict;
  }
  const v: KeyvalValue = value ?? {};
  if (name === '__proto__') {
    Object.defineProperty(cur, name, { value: v, enumerable: true, writable: true, configurable: true });
  } else {
    cur[name] = v;
  }
  return value === null ? (v as KeyvalDict) : null;
}

/** QEMU's starts_with_help_option(). */
function helpOptionLength(s: string, i: number): number {
  if (s[i] === '?') return 1;
  return s.startsWith('help', i) ? 4 : 0;
}

/** One key=value element starting at text[pos]; returns the position after it. */
function parseOne(dict: KeyvalDict, text: string, pos: number, impliedKey: string | undefined, help: { wanted: boolean }): number {
  let len = 0;
  while (pos + len < text.length && text[pos + len] !== '=' && text[pos + len] !== ',') len++;
  let key = text;
  let keyStart = pos;
  let valEnd = -1;
  let implied = false;
  if (len && text[pos + len] !== '=') {
    if (helpOptionLength(text, pos) === len) {
      help.wanted = true;
      const s = pos + len;
      return text[s] === ',' ? s + 1 : s;
    }
    if (impliedKey !== undefined) {
      key = impliedKey;
      implied = true;
      keyStart = 0;
      valEnd = pos + len;
      len = impliedKey.length;
    }
  }
  const keyEnd = keyStart + len;

  let cur = dict;
  let s = keyStart;
  let keyInCur = '';
  for (;;) {
    let flen: number;
    const idx = s !== keyStart ? keyToIndex(key, s) : null;
    if (idx) {
      flen = idx.len;
    } else {
      const n = qapiNameLength(key, s);
      flen = n < 0 ? 0 : n;
    }
    if (flen > keyEnd - s) flen = keyEnd - s; // a name never crosses '=' or ','
    if (!flen || (s + flen < keyEnd && key[s + flen] !== '.')) {
      throw new KeyvalError(`Invalid parameter '${key.slice(keyStart, keyEnd)}'`);
    }
    if (flen > MAX_FRAGMENT) {
      const fragment = s !== keyStart || s + flen !== keyEnd ? ' fragment' : '';
      throw new KeyvalError(`Parameter${fragment} '${key.slice(s, s + flen)}' is too long`);
    }
    if (s !== keyStart) cur = put(cur, keyInCur, null, key, keyStart, s - 1)!;
    keyInCur = key.slice(s, s + flen);
    s += flen;
    if (key[s] !== '.' || s >= keyEnd) break;
    s++;
  }

  let value: string;
  let next: number;
  if (implied) {
    value = text.slice(pos, valEnd);
    next = text[valEnd] === ',' ? valEnd + 1 : valEnd;
  } else {
    if (text[s] !== '=') throw new KeyvalError(`Expected '=' after parameter '${text.slice(keyStart, s)}'`);
    s++;
    let v = '';
    for (;;) {
      if (s >= text.length) break;
      if (text[s] === ',') {
        s++;
        if (text[s] !== ',') break;
      }
      v += text[s++];
    }
    value = v;
    next = s;
  }
  put(cur, keyInCur, value, key, keyStart, keyEnd);
  return next;
}

/** QEMU's keyval_listify(): dicts whose members are all indexes become arrays (no gaps). */
function listify(cur: KeyvalDict, path: string[]): KeyvalDict | KeyvalValue[] {
  let hasIndex = false;
  let hasMember = false;
  // QEMU walks a QDict, i.e. in hash order; that decides which error is reported first.
  const keys = qdictKeyOrder(Object.keys(cur));
  for (const k of keys) {
    if (isIndexKey(k)) hasIndex = true;
    else hasMember = true;
    const v = cur[k];
    if (isDict(v)) cur[k] = listify(v, [...path, k]);
  }
  const prefix = path.map((p) => `${p}.`).join('');
  if (hasIndex && hasMember) throw new KeyvalError(`Parameters '${prefix}*' used inconsistently`);
  if (!hasIndex) return cur;

  const nelt = keys.length + 1;
  const elt: (KeyvalValue | undefined)[] = new Array(nelt);
  let maxIndex = -1;
  for (const k of keys) {
    const index = keyToIndex(k, 0)!.index;
    if (index > maxIndex) maxIndex = index;
    if (index >= nelt - 1) continue;
    elt[index] = cur[k]; // "0" and "00" are the same index: the later one in hash order wins
  }
  const list: KeyvalValue[] = [];
  for (let i = 0; i < Math.min(nelt, maxIndex + 1); i++) {
    const v = elt[i];
    if (v === undefined) throw new KeyvalError(`Parameter '${prefix}${i}' missing`);
    list.push(v);
  }
  return list;
}

/**
 * Parses keyval text, also reporting a `help` / `?` element (QEMU's keyval_parse with a help flag).
 * Throws Error with QEMU's message (the caller adds "<prog>: <option> <arg>: ").
 */
export function parseKeyvalWithHelp(text: string, impliedKey?: string): { dict: KeyvalDict; help: boolean } {
  const dict: KeyvalDict = {};
  const help = { wanted: false };
  try {
    let pos = 0;
    let implied = impliedKey;
    while (pos < text.length) {
      pos = parseOne(dict, text, pos, implied, help);
      implied = undefined;
    }
    const listified = listify(dict, []);
    return { dict: listified as KeyvalDict, help: help.wanted };
  } catch (e) {
    if (e instanceof KeyvalError) throw new Error(e.message);
    throw e;
  }
}

/**
 * Parses keyval text where help is not offered (QEMU's qobject_input_visitor_new_str, used by
 * --blockdev, --export, --monitor and --nbd-server). Values stay strings.
 */
export function parseKeyval(text: string, impliedKey?: string): KeyvalDict {
  const { dict, help } = parseKeyvalWithHelp(text, impliedKey);
  if (help) throw new Error('Help is not available for this option');
  return dict;
}

/** QEMU takes an option argument as JSON when its first character is '{' (no whitespace skipped). */
export function isJsonArgument(text: string): boolean {
  return text.startsWith('{');
}
