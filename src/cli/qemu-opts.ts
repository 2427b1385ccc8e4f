// QEMU's QemuOpts syntax (util/qemu-option.c) as --chardev uses it: `socket,id=c,path=x,server=on,wait=off`.
//
// Differences from keyval: no dotted keys; a bare word is a flag ("server" = server=on, "nowait" =
// wait=off, with a deprecation warning); the first bare word is the implied option's value (and ",,"
// escapes work there too); `id` is taken from its first occurrence before anything else is checked;
// every option is checked against the list's descriptions in order, the first failure wins.
//
// Verified against qemu-storage-daemon 7.2.22 (`--chardev socket,id=c,path=…,server=on,wait=off,<x>`):
//   bogus=1                       Invalid parameter 'bogus'
//   =x                            Invalid parameter ''
//   x,  nohelp  help=on           warning for the flag form, then Invalid parameter 'x' / 'help' / 'help'
//   server  nowait  noserver      warning: short-form boolean option 'server' deprecated
//                                 + "Please use server=on instead" (wait=off, server=off)
//   id=1c / id= (first id)        Parameter 'id' expects an identifier
//                                 + hint "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter."
//   id=c,…,id=1                   accepted: only the first id counts; noid means id "off"
//   server=yes/true/y, wait=no/n/false accepted; wait=1, server=maybe, wait=off,, → Parameter 'wait' expects 'on' or 'off'
//   reconnect= / 5x               Parameter 'reconnect' expects a number  (-1, 0x10, 010, " 5" accepted)
//   reconnect=99999999999999999999   Value '99999999999999999999' is too large for parameter 'reconnect'
//   size=-1 / '' / 1.5 / 0x1.5 / 1KiB   Parameter 'size' expects a non-negative number below 2^64
//                                 + hint "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
//   size=99999E                   Value '99999E' is out of range for parameter 'size'  (1k 1.5M 0x10 1e " 1" 1b accepted)
//   socket,id=c,help  …,?         prints "chardev options:" and the sorted list, exit 1
//   server=on,…,server=off        the last value wins
//   {"backend":"socket","id":"c"} no JSON: backend '{"backend":"socket"', then flag '"id":"c"}' → Invalid parameter
// The chardev layer (qemu_chr_new_from_opts), after parsing: no id → chardev: no id specified;
// no backend → chardev: "c" missing backend; backend=help → lists backends (see checkChardevOpts).

import { QmpError } from '../qapi/errors.js';

export type QemuOptType = 'string' | 'bool' | 'number' | 'size';

/** A QemuOptsList: its name (for help), implied option and option descriptions. */
export interface QemuOptsList {
  readonly name: string;
  readonly impliedKey?: string;
  /** Option name → type; absent = any name accepted, all values strings. */
  readonly desc?: Readonly<Record<string, QemuOptType>>;
}

/** qemu_chardev_opts of QEMU 7.2 (names and types as `--chardev socket,help` lists them). */
export const CHARDEV_OPTS: QemuOptsList = {
  name: 'chardev',
  impliedKey: 'backend',
  desc: {
    abstract: 'bool', append: 'bool', backend: 'string', chardev: 'string', clipboard: 'bool', cols: 'number',
    debug: 'number', delay: 'bool', fd: 'string', height: 'number', host: 'string', ipv4: 'bool', ipv6: 'bool',
    localaddr: 'string', localport: 'string', logappend: 'bool', logfile: 'string', mouse: 'bool', mux: 'bool',
    name: 'string', nodelay: 'bool', path: 'string', port: 'string', reconnect: 'number', rows: 'number',
    server: 'bool', signal: 'bool', size: 'size', telnet: 'bool', tight: 'bool', 'tls-authz': 'string',
    'tls-creds': 'string', tn3270: 'bool', to: 'number', wait: 'bool', websocket: 'bool', width: 'number',
  },
};

/** A warning QEMU prints (as "<prog>: <option> <arg>: warning: <message>", then the hint verbatim). */
export interface QemuOptsWarning {
  message: string;
  /** Follow-up text, ending in "\n". */
  hint: string;
}

export interface ParsedQemuOpts {
  /** The first `id=` value (validated when the list has descriptions). */
  id?: string;
  /** Last value of each option: booleans for bool options, the validated text for the rest. */
  options: Record<string, string | boolean>;
  /** Option names in order of first appearance (id excluded). */
  order: string[];
  /** Deprecation warnings, in order; QEMU prints them even when parsing then fails. */
  warnings: QemuOptsWarning[];
  /** A bare `help` or `?` was given: QEMU prints formatQemuOptsHelp() and exits 1. */
  help: boolean;
}

/** A parse failure: QEMU's message, its hint (ending in "\n") and the warnings printed before it. */
export class QemuOptsError extends QmpError {
  constructor(message: string, hint: string | undefined, readonly warnings: QemuOptsWarning[]) {
    super('GenericError', message, hint);
  }
}

const ID_HINT = "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.\n";
const SIZE_HINT =
  'Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.\n';

/** QEMU's id_wellformed(). */
export function isWellFormedId(id: string): boolean {
  return /^[A-Za-z][A-Za-z0-9._-]*$/.test(id);
}

/** get_opt_value(): up to the next single ',' (",," is a comma). Returns [value, position after it]. */
function getOptValue(text: string, p: number): [string, number] {
  let v = '';
  for (;;) {
    const comma = text.indexOf(',', p);
    if (comma < 0) return [v + text.slice(p), text.length];
    v += text.slice(p, comma);
    if (text[comma + 1] !== ',') return [v, comma];
    v += ',';
    p = comma + 2;
  }
}

interface Element {
  name: string;
  value: string;
  /** The flag form was used ("server", "nowait"). */
  flag: boolean;
  prefix: '' | 'no';
  next: number;
}

/** get_opt_name_value(). */
function nextElement(text: string, p: number, firstName: string | undefined): Element {
  let len = 0;
  while (p + len < text.length && text[p + len] !== '=' && text[p + len] !== ',') len++;
  let el: Element;
  if (text[p + len] !== '=') {
    if (firstName !== undefined) {
      const [value, q] = getOptValue(text, p);
      el = { name: firstName, value, flag: false, prefix: '', next: q };
    } else {
      const word = text.slice(p, p + len);
      el = word.startsWith('no')
        ? { name: word.slice(2), value: 'off', flag: true, prefix: 'no', next: p + len }
        : { name: word, value: 'on', flag: true, prefix: '', next: p + len };
    }
  } else {
    const [value, q] = getOptValue(text, p + len + 1);
    el = { name: text.slice(p, p + len), value, flag: false, prefix: '', next: q };
  }
  if (text[el.next] === ',') el.next++;
  return el;
}

function isHelpOption(name: string): boolean {
  return name === '?' || name === 'help';
}

/** qapi_bool_parse(). */
export function parseQemuOptBool(name: string, value: string): boolean {
  if (['on', 'yes', 'true', 'y'].includes(value)) return true;
  if (['off', 'no', 'false', 'n'].includes(value)) return false;
  throw new QmpError('GenericError', `Parameter '${name}' expects 'on' or 'off'`);
}

const U64_MAX = 2n ** 64n - 1n;

/** strtoull()-style parse in base 0 or 10 of the whole string; 'erange' or 'einval' on failure. */
function strtou64(s: string, base: 0 | 10, whole: boolean): { value: bigint; end: number } | 'erange' | 'einval' {
  const re = base === 0 ? /^\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)/ : /^\s*([+-]?)([0-9]+)/;
  const m = re.exec(s);
  if (!m) return 'einval';
  if (whole && m[0].length !== s.length) return 'einval';
  const digits = m[2]!;
  let v: bigint;
  if (/^0[xX]/.test(digits)) v = BigInt(digits);
  else if (base === 0 && digits.length > 1 && digits[0] === '0') v = BigInt(`0o${digits.slice(1)}`);
  else v = BigInt(digits);
  if (v > U64_MAX) return 'erange';
  if (m[1] === '-') v = (2n ** 64n - v) % 2n ** 64n; // strtoull negates; QEMU 7.2 keeps that
  return { value: v, end: m[0].length };
}

/** parse_option_number(): QEMU_OPT_NUMBER values (base 0, so 0x10 and 010 work). */
export function parseQemuOptNumber(name: string, value: string): bigint {
  const r = strtou64(value, 0, true);
  if (r === 'erange') throw new QmpError('GenericError', `Value '${value}' is too large for parameter '${name}'`);
  if (r === 'einval') throw new QmpError('GenericError', `Parameter '${name}' expects a number`);
  return r.value;
}

const SUFFIXES: Record<string, bigint> = { b: 1n, k: 1n << 10n, m: 1n << 20n, g: 1n << 30n, t: 1n << 40n, p: 1n << 50n, e: 1n << 60n };

/** qemu_strtosz(): decimal with optional fraction and k/M/G/T/P/E suffix, or hex without either. */
function strtosz(s: string): bigint | 'erange' | 'einval' {
  const int = strtou64(s, 10, false);
  if (int === 'erange' || int === 'einval') return int;
  if (s.slice(0, int.end).includes('-')) return 'einval';
  let val = int.value;
  let p = int.end;
  let valf = 0n;
  if (val === 0n && (s[p] === 'x' || s[p] === 'X')) {
    const m = /^\s*\+?0[xX]([0-9a-fA-F]+)/.exec(s);
    if (!m) return 'einval';
    val = BigInt(`0x${m[1]}`);
    if (val > U64_MAX) return 'erange';
    p = m[0].length;
    if (s[p] === '.' || SUFFIXES[s[p]?.toLowerCase() ?? ''] !== undefined) return 'einval';
  } else if (s[p] === '.') {
    const m = /^\.[0-9]*([eE][+-]?[0-9]+)?/.exec(s.slice(p))!;
    if (m[0].length === 1) {
      p++; // "1." and "1.k" have no fraction digits
    } else {
      if (m[1]) return 'einval';
      valf = BigInt(Math.trunc(Number(`0${m[0]}`) * 2 ** 64));
      p += m[0].length;
    }
  }
  const suffix = SUFFIXES[s[p]?.toLowerCase() ?? ''];
  let mul = 1n;
  if (suffix !== undefined) {
    mul = suffix;
    p++;
  }
  if (p !== s.length) return 'einval';
  if (mul === 1n) return valf !== 0n ? 'einval' : val;
  const total = (val << 64n) * mul + valf * mul;
  const result = (total >> 64n) + ((total >> 63n) & 1n); // round 0.5 up
  return result > U64_MAX ? 'erange' : result;
}

/** parse_option_size(): QEMU_OPT_SIZE values. Errors carry QEMU's hint. */
export function parseQemuOptSize(name: string, value: string): bigint {
  const r = strtosz(value);
  if (r === 'erange') throw new QmpError('GenericError', `Value '${value}' is out of range for parameter '${name}'`);
  if (r === 'einval') {
    throw new QmpError('GenericError', `Parameter '${name}' expects a non-negative number below 2^64`, SIZE_HINT);
  }
  return r;
}

/**
 * Parses a QemuOpts argument (QEMU's qemu_opts_parse_noisily with permit_abbrev). `impliedKey` names the
 * first bare word (chardev: "backend"); `list` supplies descriptions (default: chardev's). Throws
 * QemuOptsError with QEMU's message and hint; the caller adds "<prog>: <option> <arg>: ".
 */
export function parseQemuOpts(text: string, impliedKey?: string, list: QemuOptsList = CHARDEV_OPTS): ParsedQemuOpts {
  const desc = list.desc;
  const warnings: QemuOptsWarning[] = [];
  const fail = (e: unknown): never => {
    if (e instanceof QmpError) throw new QemuOptsError(e.message, e.hint, warnings);
    throw e;
  };

  // opts_parse_id(): the first id, found with no implied name and no warnings.
  let id: string | undefined;
  for (let p = 0; p < text.length; ) {
    const el = nextElement(text, p, undefined);
    if (el.name === 'id') {
      id = el.value;
      break;
    }
    p = el.next;
  }
  if (id !== undefined && !isWellFormedId(id)) {
    fail(new QmpError('GenericError', "Parameter 'id' expects an identifier", ID_HINT));
  }

  const options: Record<string, string | boolean> = {};
  const order: string[] = [];
  let firstName = impliedKey;
  for (let p = 0; p < text.length; ) {
    const el = nextElement(text, p, firstName);
    p = el.next;
    const help = el.flag && el.prefix === '' && isHelpOption(el.name);
    if (el.flag && !(help && desc)) {
      warnings.push({
        message: `short-form boolean option '${el.prefix}${el.name}' deprecated`,
        hint: `Please use ${el.name}=${el.value} instead\n`,
      });
    }
    if (help && desc) return { id, options, order, warnings, help: true };
    firstName = undefined;
    if (el.name === 'id') continue;

    let value: string | boolean = el.value;
    if (desc) {
      const type = Object.prototype.hasOwnProperty.call(desc, el.name) ? desc[el.name] : undefined;
      if (type === undefined) fail(new QmpError('GenericError', `Invalid parameter '${el.name}'`));
      try {
        if (type === 'bool') value = parseQemuOptBool(el.name, el.value);
        else if (type === 'number') parseQemuOptNumber(el.name, el.value);
        else if (type === 'size') parseQemuOptSize(el.name, el.value);
      } catch (e) {
        fail(e);
      }
    }
    if (!Object.prototype.hasOwnProperty.call(options, el.name)) order.push(el.name);
    if (el.name === '__proto__') {
      Object.defineProperty(options, el.name, { value, enumerable: true, writable: true, configurable: true });
    } else {
      options[el.name] = value;
    }
  }
  return { id, options, order, warnings, help: false };
}

const TYPE_NAMES: Record<QemuOptType, string> = { string: 'str', bool: 'bool (on/off)', number: 'num', size: 'size' };

/** qemu_opts_print_help(list, true): what `--chardev socket,help` prints (each line ends in "\n"). */
export function formatQemuOptsHelp(list: QemuOptsList = CHARDEV_OPTS): string {
  const names = Object.keys(list.desc ?? {}).sort();
  return `${list.name} options:\n${names.map((n) => `  ${n}=<${TYPE_NAMES[list.desc![n]!]}>\n`).join('')}`;
}

/**
 * The checks qemu_chr_new_from_opts() makes before looking at the backend: returns 'help' for
 * backend=help/?, else the id and backend, or throws QmpError with QEMU's message.
 */
export function checkChardevOpts(p: ParsedQemuOpts): 'help' | { id: string; backend: string } {
  const backend = p.options.backend;
  if (typeof backend === 'string' && isHelpOption(backend)) return 'help';
  if (p.id === undefined) throw new QmpError('GenericError', 'chardev: no id specified');
  if (typeof backend !== 'string') throw new QmpError('GenericError', `chardev: "${p.id}" missing backend`);
  return { id: p.id, backend };
}
