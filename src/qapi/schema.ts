// Runtime schema API: validates QMP and command-line arguments against schema/*.json with QEMU's messages.
import AjvModule from 'ajv';
import type { ValidateFunction } from 'ajv';
import { QmpError } from './errors.js';
import { schemaData } from './generated/schema-data.js';
import { introspection } from './generated/introspection.js';
import type { GenMember, GenType } from './generated/schema-shape.js';

const types = schemaData.types;
const commands = new Map(schemaData.commands.map((c) => [c.name, c]));

/** Options of validateType/validateCommandArgs. */
export interface ValidateOptions {
  /** Command-line keyval input: every scalar is a string and is converted to the member's type. */
  keyval?: boolean;
  /** Implied key (e.g. 'driver'): a bare string value stands for { [implied]: value }. */
  implied?: string;
}

function err(msg: string): QmpError {
  return new QmpError('GenericError', msg);
}

const INT_RANGES: Record<string, [bigint, bigint]> = {
  int8: [-(1n << 7n), (1n << 7n) - 1n], int16: [-(1n << 15n), (1n << 15n) - 1n], int32: [-(1n << 31n), (1n << 31n) - 1n],
  uint8: [0n, 255n], uint16: [0n, 65535n], uint32: [0n, (1n << 32n) - 1n],
};
const INT64_MIN = -(1n << 63n);
const INT64_MAX = (1n << 63n) - 1n;
const UINT64_MAX = (1n << 64n) - 1n;

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function asBigInt(v: unknown): bigint | undefined {
  if (typeof v === 'bigint') return v;
  if (typeof v === 'number' && Number.isInteger(v)) return BigInt(v);
  return undefined;
}

/** A number where it is exact, else a bigint. */
function toJs(v: bigint): number | bigint {
  return v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
}

// strtoll/strtoull with base 0, as qemu_strtoi64/qemu_strtou64 use them: whole string, leading
// blanks, sign, 0x hex, 0 octal.
function parseCInt(s: string): bigint | undefined {
  const m = /^[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$/.exec(s);
  if (!m) return undefined;
  const body = m[2];
  const v = body.length > 1 && body[0] === '0' && !/[xX]/.test(body) ? BigInt('0o' + body.slice(1)) : BigInt(body);
  return m[1] === '-' ? -v : v;
}

// qemu_strtosz: a number (decimal fraction allowed with a suffix), optional B/K/M/G/T/P/E suffix.
function parseSize(s: string): bigint | undefined {
  const m = /^[ \t]*(0[xX][0-9a-fA-F]+|[0-9]+(?:\.[0-9]*)?)([bBkKmMgGtTpPeE]?)$/.exec(s);
  if (!m) return undefined;
  const shift = 'bkmgtpe'.indexOf((m[2] || 'b').toLowerCase()) * 10;
  let v: bigint;
  if (/^0[xX]/.test(m[1])) {
    if (m[2]) return undefined;
    v = BigInt(m[1]);
  } else if (m[1].includes('.')) {
    if (!m[2] || m[2].toLowerCase() === 'b') return undefined;
    v = BigInt(Math.floor(Number(m[1]) * 2 ** shift));
    if (Number(m[1]) * 2 ** shift >= 2 ** 64) return undefined;
  } else v = BigInt(m[1]) << BigInt(shift);
  return v > UINT64_MAX ? undefined : v;
}

// QEMU names the first leftover key in the order GLib's GHashTable iterates (keys come from the
// QDict's 512 tdb_hash buckets, newest first per bucket; visited keys are removed). Simulated so
// that with several unexpected members we name the same one QEMU names.
function tdbHash(s: string): number {
  const b = Buffer.from(s, 'utf8');
  let v = Math.imul(0x238f13af, b.length) >>> 0;
  for (let i = 0; i < b.length; i++) v = (v + ((b[i] << ((i * 5) % 24)) >>> 0)) >>> 0;
  return (Math.imul(1103515243, v) + 12345) >>> 0;
}
function gStrHash(s: string): number {
  const b = Buffer.from(s, 'utf8');
  let h = 5381;
  for (const c of b) h = (Math.imul(h, 33) + (c << 24 >> 24)) >>> 0;
  return h;
}
const PRIME_MOD = [1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521];
class GHash {
  shift = 3; size = 8; mod = 7; mask = 7; nnodes = 0; noccupied = 0;
  keys: (string | undefined)[] = new Array(8); hashes: number[] = new Array(8).fill(0);
  private setShift(shift: number): void {
    this.shift = Math.max(shift, 3); this.size = 1 << this.shift; this.mod = PRIME_MOD[this.shift]; this.mask = this.size - 1;
  }
  private lookup(key: string, hv: number): number {
    let idx = (Math.imul(hv, 11) >>> 0) % this.mod; let step = 0; let tomb = -1;
    while (this.hashes[idx] !== 0) {
      if (this.hashes[idx] === hv && this.keys[idx] === key) return idx;
      if (this.hashes[idx] === 1 && tomb < 0) tomb = idx;
      step++; idx = (idx + step) & this.mask;
    }
    return tomb >= 0 ? tomb : idx;
  }
  private resize(): void {
    const oldK = this.keys; const oldH = this.hashes;
    const n = Math.floor(this.nnodes * 1.333);
    let s = 0; for (let x = n; x; x >>= 1) s++;
    this.setShift(s);
    this.keys = new Array(this.size); this.hashes = new Array(this.size).fill(0);
    for (let i = 0; i < oldH.length; i++) if (oldH[i] > 1) { const j = this.lookup(oldK[i]!, oldH[i]); this.keys[j] = oldK[i]; this.hashes[j] = oldH[i]; }
    this.noccupied = this.nnodes;
  }
  private maybeResize(): void {
    if ((this.size > this.nnodes * 4 && this.size > 8) || this.size <= this.noccupied + Math.floor(this.noccupied / 16)) this.resize();
  }
  insert(key: string): void {
    let hv = gStrHash(key); if (hv <= 1) hv = 2;
    const i = this.lookup(key, hv);
    if (this.hashes[i] > 1) return;
    const wasUnused = this.hashes[i] === 0;
    this.keys[i] = key; this.hashes[i] = hv; this.nnodes++;
    if (wasUnused) { this.noccupied++; this.maybeResize(); }
  }
  remove(key: string): void {
    let hv = gStrHash(key); if (hv <= 1) hv = 2;
    const i = this.lookup(key, hv);
    if (this.hashes[i] <= 1) return;
    this.hashes[i] = 1; this.keys[i] = undefined; this.nnodes--;
    this.maybeResize();
  }
  first(): string | undefined {
    for (let i = 0; i < this.size; i++) if (this.hashes[i] > 1) return this.keys[i];
    return undefined;
  }
}
/** The leftover key QEMU names first, given the object's keys (input order) and the visited ones (visit order). */
function firstUnexpected(keys: string[], visited: string[]): string | undefined {
  const order = keys.map((k, i) => ({ k, i, b: tdbHash(k) % 512 })).sort((x, y) => x.b - y.b || y.i - x.i);
  const h = new GHash();
  for (const { k } of order) h.insert(k);
  for (const k of visited) h.remove(k);
  return h.first();
}

/** Walks a value in QEMU's visitor order and reports the first error QEMU's input visitor reports. */
class Visitor {
  constructor(private readonly keyval: boolean) {}

  private full(path: string, name: string | number): string {
    if (typeof name === 'number') return this.keyval ? `${path}.${name}` : `${path}[${name}]`;
    return path ? `${path}.${name}` : name;
  }

  /** Rejects non-strings: in keyval form a dict/list where a scalar belongs is "Parameters 'x.*'". */
  private scalarString(v: unknown, full: string, expected: string): string {
    if (typeof v === 'string') return v;
    if (this.keyval && typeof v === 'object' && v !== null) throw err(`Parameters '${full}.*' are unexpected`);
    throw err(`Invalid parameter type for '${full}', expected: ${expected}`);
  }

  visit(ref: string, v: unknown, full: string, bare: string): unknown {
    if (ref.startsWith('[')) {
      if (!Array.isArray(v)) throw err(`Invalid parameter type for '${full}', expected: array`);
      const el = ref.slice(1, -1);
      return v.map((x, i) => this.visit(el, x, this.full(full, i), 'null'));
    }
    const t = types[ref];
    switch (t.kind) {
      case 'builtin': return this.builtin(ref, v, full, bare);
      case 'enum': {
        const s = this.keyval ? this.scalarString(v, full, 'string') : typeof v === 'string' ? v : this.scalarString(v, full, 'string');
        if (!t.values!.includes(s)) throw err(`Parameter '${bare}' does not accept value '${s}'`);
        return s;
      }
      case 'alternate': return this.alternate(t, v, full, bare);
      default: {
        if (!isPlainObject(v)) throw err(`Invalid parameter type for '${full}', expected: object`);
        const out: Record<string, unknown> = {};
        const seen = new Set<string>();
        this.members(t, v, full, out, seen);
        const keys = Object.keys(v);
        if (keys.some((k) => !seen.has(k))) throw err(`Parameter '${this.full(full, firstUnexpected(keys, [...seen])!)}' is unexpected`);
        return out;
      }
    }
  }

  private members(t: GenType, v: Record<string, unknown>, full: string, out: Record<string, unknown>, seen: Set<string>): void {
    if (t.base) this.members(types[t.base], v, full, out, seen);
    for (const m of t.members ?? []) this.member(m, v, full, out, seen);
    if (t.kind === 'union') {
      const branch = t.variants![out[t.discriminator!] as string];
      if (branch) this.members(types[branch], v, full, out, seen);
    }
  }

  private member(m: GenMember, v: Record<string, unknown>, full: string, out: Record<string, unknown>, seen: Set<string>): void {
    if (!Object.prototype.hasOwnProperty.call(v, m.name)) {
      if (m.optional) return;
      throw err(`Parameter '${this.full(full, m.name)}' is missing`);
    }
    seen.add(m.name);
    out[m.name] = this.visit(m.type, v[m.name], this.full(full, m.name), m.name);
  }

  private alternate(t: GenType, v: unknown, full: string, bare: string): unknown {
    const branches = Object.values(t.variants!);
    const kindOf = (ref: string): string => {
      if (ref.startsWith('[')) return 'array';
      const bt = types[ref];
      if (bt.kind === 'builtin') return bt.doc!; // the JSON type, see BUILTINS in the generator
      return bt.kind === 'enum' ? 'string' : 'object';
    };
    let want: string;
    if (Array.isArray(v)) want = 'array';
    else if (isPlainObject(v)) want = 'object';
    else if (this.keyval && typeof v === 'string') {
      // keyval scalars are strings: prefer a string branch, else the first scalar branch.
      const scalar = branches.find((b) => kindOf(b) === 'string') ?? branches.find((b) => !['array', 'object', 'null'].includes(kindOf(b)));
      if (scalar) return this.visit(scalar, v, full, bare);
      want = 'string';
    } else if (typeof v === 'string') want = 'string';
    else if (typeof v === 'boolean') want = 'boolean';
    else if (v === null) want = 'null';
    else if (typeof v === 'bigint' || (typeof v === 'number' && Number.isInteger(v))) want = branches.some((b) => kindOf(b) === 'int') ? 'int' : 'number';
    else if (typeof v === 'number') want = 'number';
    else want = '?';
    const hit = branches.find((b) => kindOf(b) === want || (want === 'int' && kindOf(b) === 'number'));
    if (!hit) throw err(`Invalid parameter type for '${bare}', expected: ${t.name}`);
    return this.visit(hit, v, full, bare);
  }

  private builtin(name: string, v: unknown, full: string, bare: string): unknown {
    switch (name) {
      case 'any': return v;
      case 'str': return this.scalarString(v, full, 'string');
      case 'bool':
        if (this.keyval) {
          const s = this.scalarString(v, full, 'boolean');
          if (['on', 'yes', 'true', 'y'].includes(s)) return true;
          if (['off', 'no', 'false', 'n'].includes(s)) return false;
          throw err(`Parameter '${full}' expects 'on' or 'off'`);
        }
        if (typeof v !== 'boolean') throw err(`Invalid parameter type for '${full}', expected: boolean`);
        return v;
      case 'null':
        if (this.keyval && v === '') return null;
        if (v !== null) throw err(`Invalid parameter type for '${full}', expected: null`);
        return null;
      case 'number':
        if (this.keyval) {
          const s = this.scalarString(v, full, 'number');
          const n = Number(s);
          if (s.trim() === '' || !Number.isFinite(n)) throw err(`Parameter '${full}' expects number`);
          return n;
        }
        if (typeof v === 'bigint') return Number(v);
        if (typeof v !== 'number') throw err(`Invalid parameter type for '${full}', expected: number`);
        return v;
      case 'uint64': case 'size': case 'uint8': case 'uint16': case 'uint32': {
        let u: bigint | undefined;
        if (this.keyval) {
          const s = this.scalarString(v, full, 'string');
          if (name === 'size') {
            u = parseSize(s);
            if (u === undefined) throw err(`Parameter '${full}' expects size`);
          } else {
            u = parseCInt(s);
            if (u !== undefined && u < 0n) u = -u <= UINT64_MAX ? UINT64_MAX + 1n + u : undefined;
            if (u === undefined || u > UINT64_MAX) throw err(`Parameter '${full}' expects integer`);
          }
        } else {
          u = asBigInt(v);
          // QEMU accepts negative int64 values for uint64 and wraps them (backward compatibility).
          if (u !== undefined && u < 0n) u = u >= INT64_MIN ? UINT64_MAX + 1n + u : undefined;
          if (u === undefined || u > UINT64_MAX) throw err(`Parameter '${full}' expects uint64`);
        }
        const r = INT_RANGES[name];
        if (r && (u < r[0] || u > r[1])) throw err(`Parameter '${bare}' expects ${name}_t`);
        return toJs(u);
      }
      default: { // int, int8..int64
        let i: bigint | undefined;
        if (this.keyval) {
          i = parseCInt(this.scalarString(v, full, 'string'));
          if (i === undefined || i < INT64_MIN || i > INT64_MAX) throw err(`Parameter '${full}' expects integer`);
        } else {
          i = asBigInt(v);
          if (i === undefined || i < INT64_MIN || i > INT64_MAX) throw err(`Invalid parameter type for '${full}', expected: integer`);
        }
        const r = INT_RANGES[name];
        if (r && (i < r[0] || i > r[1])) throw err(`Parameter '${bare}' expects ${name}_t`);
        return toJs(i);
      }
    }
  }
}

// --- ajv: the JSON Schema gate on the QMP path (a fast accept; on reject the visitor names the error)

let ajvInstance: InstanceType<typeof AjvModule.default> | undefined;
const ajvCache = new Map<string, ValidateFunction>();

function jsonSchemaFor(ref: string): Record<string, unknown> {
  if (ref.startsWith('[')) return { type: 'array', items: jsonSchemaFor(ref.slice(1, -1)) };
  const t = types[ref];
  if (t.kind !== 'builtin') return { $ref: `#/definitions/${ref}` };
  switch (ref) {
    case 'any': return {};
    case 'str': return { type: 'string' };
    case 'bool': return { type: 'boolean' };
    case 'null': return { type: 'null' };
    case 'number': return { qapiNumber: true };
    default: return { qapiInt: ref };
  }
}

function objectSchema(t: GenType): Record<string, unknown> {
  const collect = (tt: GenType, props: Record<string, unknown>, req: string[]): void => {
    if (tt.base) collect(types[tt.base], props, req);
    for (const m of tt.members ?? []) {
      props[m.name] = jsonSchemaFor(m.type);
      if (!m.optional) req.push(m.name);
    }
  };
  const props: Record<string, unknown> = {};
  const req: string[] = [];
  collect(t, props, req);
  if (t.kind !== 'union') return { type: 'object', properties: props, required: req, additionalProperties: false };
  const tag = t.discriminator!;
  const tagType = types[(function find(tt: GenType): string {
    const m = (tt.members ?? []).find((x) => x.name === tag);
    return m ? m.type : find(types[tt.base!]);
  })(t)];
  // One closed schema per case: base + branch members (an absent branch adds nothing).
  return {
    type: 'object', required: [tag], properties: { [tag]: { enum: tagType.values } },
    allOf: tagType.values!.map((c) => {
      const p = { ...props };
      const r = [...req];
      if (t.variants![c]) collect(types[t.variants![c]], p, r);
      p[tag] = { const: c };
      return { if: { properties: { [tag]: { const: c } } }, then: { properties: p, required: r, additionalProperties: false } };
    }),
  };
}

function ajvValidator(ref: string): ValidateFunction {
  let fn = ajvCache.get(ref);
  if (fn) return fn;
  if (!ajvInstance) {
    ajvInstance = new AjvModule.default({ strict: false, allErrors: false });
    ajvInstance.addKeyword({
      keyword: 'qapiInt',
      validate: (kind: string, v: unknown) => {
        const b = asBigInt(v);
        if (b === undefined) return false;
        if (kind === 'uint64' || kind === 'size') return b >= INT64_MIN && b <= UINT64_MAX;
        if (b < INT64_MIN || b > (kind.startsWith('uint') ? UINT64_MAX : INT64_MAX)) return false;
        const r = INT_RANGES[kind];
        if (!r) return true;
        const u = kind.startsWith('uint') && b < 0n ? UINT64_MAX + 1n + b : b;
        return u >= r[0] && u <= r[1];
      },
    });
    ajvInstance.addKeyword({ keyword: 'qapiNumber', validate: (_s: unknown, v: unknown) => typeof v === 'number' || typeof v === 'bigint' });
    const definitions: Record<string, unknown> = {};
    for (const t of Object.values(types)) {
      if (t.kind === 'enum') definitions[t.name] = { type: 'string', enum: t.values };
      else if (t.kind === 'alternate') definitions[t.name] = { anyOf: Object.values(t.variants!).map(jsonSchemaFor) };
      else if (t.kind !== 'builtin') definitions[t.name] = objectSchema(t);
    }
    ajvInstance.addSchema({ $id: 'qapi', definitions });
  }
  fn = ajvInstance.compile({ $ref: `qapi#/definitions/${ref}` });
  ajvCache.set(ref, fn);
  return fn;
}

function validate(ref: string, value: unknown, opts: ValidateOptions | undefined): any {
  let v = value;
  if (opts?.implied !== undefined && typeof v === 'string') v = { [opts.implied]: v };
  if (!opts?.keyval && types[ref].kind !== 'builtin' && ajvValidator(ref)(v)) {
    // Accepted by the schema; the visitor still converts uint64 wrap-arounds and copies.
    return new Visitor(false).visit(ref, v, '', 'null');
  }
  const out = new Visitor(opts?.keyval === true).visit(ref, v, '', 'null');
  if (!opts?.keyval) throw err(`Invalid parameter type for 'null', expected: ${ref}`); // ajv and visitor disagree
  return out;
}

/** Validates `args` of `command` (absent arguments = {}); throws QmpError with QEMU's message. */
export function validateCommandArgs(command: string, args: unknown, opts?: { keyval?: boolean }): Record<string, any> {
  const c = commands.get(command);
  if (!c) throw new QmpError('CommandNotFound', `The command ${command} has not been found`);
  const a = args === undefined ? {} : args;
  if (!c.argType) {
    if (isPlainObject(a) && Object.keys(a).length) throw err(`Parameter '${firstUnexpected(Object.keys(a), [])}' is unexpected`);
    return {};
  }
  return validate(c.argType, a, opts);
}

/** Validates a value of a named schema type, e.g. 'BlockdevOptions' for --blockdev. */
export function validateType(typeName: string, value: unknown, opts?: ValidateOptions): any {
  if (!types[typeName]) throw new Error(`unknown schema type '${typeName}'`);
  return validate(typeName, value, opts);
}

export function hasCommand(name: string): boolean {
  return commands.has(name);
}

/** Command names in the order QEMU's query-commands lists them (reverse of schema order). */
export function commandNames(): string[] {
  return schemaData.commands.map((c) => c.name).reverse();
}

/** The query-qmp-schema return value (a fresh copy). */
export function qmpSchemaIntrospection(): unknown[] {
  return structuredClone(introspection) as unknown[];
}

function placeholder(ref: string, name: string): string {
  if (ref.startsWith('[')) return `<${name}>`;
  const t = types[ref];
  if (t.kind === 'enum') return t.values!.join('|');
  if (ref === 'bool') return 'on|off';
  if (ref === 'size') return '<size>';
  if (t.kind === 'builtin' && ref !== 'str' && ref !== 'any') return '<n>';
  return `<${name}>`;
}

function optionWords(t: GenType, prefix: string, skip: string): string[] {
  const out: string[] = [];
  const walk = (tt: GenType): void => {
    if (tt.base) walk(types[tt.base]);
    for (const m of tt.members ?? []) {
      if (m.name === skip) continue;
      const mt = types[m.type.startsWith('[') ? m.type.slice(1, -1) : m.type];
      const key = prefix + m.name;
      const words = (mt.kind === 'struct' && !m.type.startsWith('['))
        ? optionWords(mt, `${key}.`, '').map((w) => w.replace(/^\[,/, ','))
        : [`,${key}=${placeholder(m.type, m.name)}`];
      for (const w of words) out.push(m.optional || w.startsWith('[') ? `[${w.replace(/^\[|\]$/g, '')}]` : w);
    }
  };
  walk(t);
  return out;
}

/**
 * --help text for a keyval option: one line per union case (or one for a struct), e.g.
 * "--export [type=]fuse,id=<id>,node-name=<node-name>,mountpoint=<mountpoint>[,growable=on|off]…".
 */
export function describeOptions(typeName: string, opts?: { option?: string; implied?: string }): string {
  const t = types[typeName];
  if (!t || (t.kind !== 'struct' && t.kind !== 'union')) throw new Error(`'${typeName}' is not a struct or union`);
  const lead = opts?.option ? `${opts.option} ` : '';
  if (t.kind === 'struct') return lead + optionWords(t, '', '').join('').replace(/^\[,/, '[').replace(/^,/, '');
  const tag = t.discriminator!;
  const tagKey = opts?.implied === tag ? `[${tag}=]` : `${tag}=`;
  const lines: string[] = [];
  for (const [c, b] of Object.entries(t.variants!)) {
    const words = [...optionWords(t, '', tag), ...optionWords(types[b], '', '')];
    lines.push(`${lead}${tagKey}${c}${words.join('')}`);
  }
  return lines.join('\n');
}
