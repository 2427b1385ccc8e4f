// QAPI code generator: schema/*.json → src/qapi/generated/{types,schema-data,introspection}.ts.
import { readFileSync, writeFileSync, mkdirSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** One member after normalisation: '*name' → optional, 'T' | ['T'] | {type, doc, ...}. */
export interface GenMember {
  name: string;
  /** Type reference: builtin or defined name, '[T]' for arrays. */
  type: string;
  optional: boolean;
  doc?: string;
  since?: string;
  features?: string[];
}

export interface GenType {
  kind: 'builtin' | 'enum' | 'struct' | 'union' | 'alternate';
  name: string;
  doc?: string;
  since?: string;
  features?: string[];
  /** enum: values in order. */
  values?: string[];
  /** struct/union: own members (for a union: the base members when the base is inline). */
  members?: GenMember[];
  /** struct/union: named base type (its members come first). */
  base?: string;
  discriminator?: string;
  /** union: case → branch struct; alternate: branch name → type. */
  variants?: Record<string, string>;
  /** true for types made up by the generator (inline union bases, command argument structs). */
  implicit?: boolean;
  module?: string;
}

export interface GenCommand {
  name: string;
  /** Argument type name (implicit struct for inline data), or undefined for no arguments. */
  argType?: string;
  boxed: boolean;
  /** Return type reference, or undefined for {}. */
  returns?: string;
  features?: string[];
  allowOob?: boolean;
  doc?: string;
  since?: string;
  errors?: string[];
  module?: string;
}

export interface GenEvent {
  name: string;
  argType?: string;
  features?: string[];
  doc?: string;
  since?: string;
  module?: string;
}

export interface GenSchema {
  types: Record<string, GenType>;
  commands: GenCommand[];
  events: GenEvent[];
}

/** QAPI's builtin types and the JSON type each one travels as. */
export const BUILTINS: Record<string, string> = {
  str: 'string', number: 'number', int: 'int', int8: 'int', int16: 'int', int32: 'int', int64: 'int',
  uint8: 'int', uint16: 'int', uint32: 'int', uint64: 'int', size: 'int', bool: 'boolean', null: 'null', any: 'value',
};

class SchemaError extends Error {}

function fail(where: string, msg: string): never {
  throw new SchemaError(`${where}: ${msg}`);
}

const DEF_KEYS: Record<string, string[]> = {
  struct: ['struct', 'data', 'base', 'doc', 'since', 'features'],
  union: ['union', 'data', 'base', 'discriminator', 'doc', 'since', 'features'],
  enum: ['enum', 'data', 'doc', 'since', 'features', 'prefix'],
  alternate: ['alternate', 'data', 'doc', 'since', 'features'],
  command: ['command', 'data', 'boxed', 'returns', 'features', 'doc', 'since', 'errors', 'allow-oob', 'allow-preconfig', 'gen', 'success-response', 'coroutine'],
  event: ['event', 'data', 'boxed', 'features', 'doc', 'since'],
};

function typeRef(v: unknown, where: string): string {
  if (typeof v === 'string') return v;
  if (Array.isArray(v) && v.length === 1 && typeof v[0] === 'string') return `[${v[0]}]`;
  return fail(where, `invalid type reference ${JSON.stringify(v)}`);
}

function members(data: unknown, where: string): GenMember[] {
  if (typeof data !== 'object' || data === null || Array.isArray(data)) fail(where, "'data' must be an object");
  const out: GenMember[] = [];
  for (const [key, spec] of Object.entries(data as Record<string, unknown>)) {
    const optional = key.startsWith('*');
    const name = optional ? key.slice(1) : key;
    const w = `${where} member '${name}'`;
    if (typeof spec === 'object' && spec !== null && !Array.isArray(spec)) {
      const s = spec as Record<string, unknown>;
      for (const k of Object.keys(s)) if (!['type', 'doc', 'since', 'features'].includes(k)) fail(w, `unknown key '${k}'`);
      const m: GenMember = { name, type: typeRef(s.type, w), optional };
      if (s.doc !== undefined) m.doc = String(s.doc);
      if (s.since !== undefined) m.since = String(s.since);
      if (s.features !== undefined) m.features = s.features as string[];
      out.push(m);
    } else {
      out.push({ name, type: typeRef(spec, w), optional });
    }
  }
  return out;
}

function common(def: Record<string, unknown>, t: { doc?: string; since?: string; features?: string[] }): void {
  if (def.doc !== undefined) t.doc = String(def.doc);
  if (def.since !== undefined) t.since = String(def.since);
  if (def.features !== undefined) t.features = def.features as string[];
}

/** Read the module list in schema/qapi-schema.json, then every module, into one resolved schema. */
export function loadSchema(schemaDir: string): GenSchema {
  const schema: GenSchema = { types: {}, commands: [], events: [] };
  for (const [name, json] of Object.entries(BUILTINS)) schema.types[name] = { kind: 'builtin', name, doc: json };
  const names = new Map<string, string>();
  const define = (name: string, where: string): void => {
    if (names.has(name) || BUILTINS[name]) fail(where, `'${name}' is already defined${names.has(name) ? ` in ${names.get(name)}` : ' as a builtin'}`);
    names.set(name, where);
  };
  const top = JSON.parse(readFileSync(path.join(schemaDir, 'qapi-schema.json'), 'utf8')) as Record<string, unknown>[];
  for (const inc of top) {
    if (inc.include === undefined) continue;
    const module = String(inc.include);
    const defs = JSON.parse(readFileSync(path.join(schemaDir, module), 'utf8')) as unknown;
    if (!Array.isArray(defs)) fail(module, 'must be an array of definitions');
    for (const [i, d] of defs.entries()) {
      const def = d as Record<string, unknown>;
      const meta = Object.keys(DEF_KEYS).find((k) => k in def);
      if (!meta) fail(`${module}[${i}]`, 'no struct/union/enum/alternate/command/event key');
      const name = String(def[meta]);
      const where = `${module}: ${meta} '${name}'`;
      for (const k of Object.keys(def)) if (!DEF_KEYS[meta].includes(k)) fail(where, `unknown key '${k}'`);
      define(name, where);
      if (meta === 'enum') {
        if (!Array.isArray(def.data)) fail(where, "'data' must be an array");
        const values = (def.data as unknown[]).map((v) => (typeof v === 'string' ? v : String((v as { name: string }).name)));
        if (new Set(values).size !== values.length) fail(where, 'duplicate enum value');
        const t: GenType = { kind: 'enum', name, values, module };
        common(def, t);
        schema.types[name] = t;
      } else if (meta === 'struct' || meta === 'union') {
        const t: GenType = { kind: meta, name, module, members: [] };
        common(def, t);
        if (meta === 'struct') t.members = members(def.data ?? {}, where);
        if (typeof def.base === 'string') t.base = def.base;
        else if (def.base !== undefined) {
          if (meta === 'struct') fail(where, 'a struct base must be a type name');
          t.members = members(def.base, `${where} base`);
        }
        if (meta === 'union') {
          if (typeof def.discriminator !== 'string') fail(where, "a union needs 'discriminator'");
          t.discriminator = def.discriminator;
          t.variants = {};
          for (const [c, v] of Object.entries((def.data ?? {}) as Record<string, unknown>)) t.variants[c] = typeRef(v, `${where} branch '${c}'`);
        }
        schema.types[name] = t;
      } else if (meta === 'alternate') {
        const t: GenType = { kind: 'alternate', name, module, variants: {} };
        common(def, t);
        for (const m of members(def.data, where)) t.variants![m.name] = m.type;
        schema.types[name] = t;
      } else if (meta === 'command') {
        const c: GenCommand = { name, boxed: def.boxed === true, module };
        common(def, c);
        if (typeof def.data === 'string') c.argType = def.data;
        else if (def.data !== undefined) {
          const argName = `q_obj_${name}-arg`;
          schema.types[argName] = { kind: 'struct', name: argName, members: members(def.data, where), implicit: true, module };
          c.argType = argName;
        }
        if (c.boxed && typeof def.data !== 'string') fail(where, "'boxed' needs a named 'data' type");
        if (def.returns !== undefined) c.returns = typeRef(def.returns, `${where} returns`);
        if (def['allow-oob'] === true) c.allowOob = true;
        if (def.errors !== undefined) c.errors = def.errors as string[];
        schema.commands.push(c);
      } else {
        const e: GenEvent = { name, module };
        common(def, e);
        if (typeof def.data === 'string') e.argType = def.data;
        else if (def.data !== undefined) {
          const argName = `q_obj_${name}-arg`;
          schema.types[argName] = { kind: 'struct', name: argName, members: members(def.data, where), implicit: true, module };
          e.argType = argName;
        }
        schema.events.push(e);
      }
    }
  }
  check(schema);
  return schema;
}

function elementOf(ref: string): string {
  return ref.startsWith('[') ? ref.slice(1, -1) : ref;
}

/** All members of a struct or union base, base type first (QAPI's flattening). */
export function allMembers(schema: GenSchema, t: GenType): GenMember[] {
  const base = t.base ? allMembers(schema, schema.types[t.base]) : [];
  return [...base, ...(t.members ?? [])];
}

function check(schema: GenSchema): void {
  const known = (ref: string, where: string): GenType => {
    const t = schema.types[elementOf(ref)];
    if (!t) fail(where, `unknown type '${elementOf(ref)}'`);
    return t;
  };
  for (const t of Object.values(schema.types)) {
    const where = `${t.module}: ${t.kind} '${t.name}'`;
    if (t.kind === 'struct' || t.kind === 'union') {
      if (t.base) {
        const b = known(t.base, where);
        if (b.kind !== 'struct') fail(where, `base '${t.base}' must be a struct`);
      }
      const seen = new Set<string>();
      for (const m of allMembers(schema, t)) {
        known(m.type, `${where} member '${m.name}'`);
        if (seen.has(m.name)) fail(where, `member '${m.name}' is defined twice`);
        seen.add(m.name);
      }
      if (t.kind === 'union') {
        const tag = allMembers(schema, t).find((m) => m.name === t.discriminator);
        if (!tag || tag.optional) fail(where, `discriminator '${t.discriminator}' must be a mandatory base member`);
        const e = known(tag.type, where);
        if (e.kind !== 'enum') fail(where, `discriminator '${t.discriminator}' must be an enum`);
        for (const [c, v] of Object.entries(t.variants!)) {
          if (!e.values!.includes(c)) fail(where, `branch '${c}' is not a value of ${e.name}`);
          const vt = known(v, `${where} branch '${c}'`);
          if (vt.kind !== 'struct') fail(where, `branch '${c}' must be a struct`);
          for (const m of allMembers(schema, vt)) if (seen.has(m.name)) fail(where, `branch '${c}' member '${m.name}' clashes with the base`);
        }
      }
    } else if (t.kind === 'alternate') {
      const jsonKinds = new Set<string>();
      for (const [b, v] of Object.entries(t.variants!)) {
        if (v.startsWith('[')) { known(v, where); if (jsonKinds.has('array')) fail(where, 'two array branches'); jsonKinds.add('array'); continue; }
        const vt = known(v, `${where} branch '${b}'`);
        const k = vt.kind === 'builtin' ? BUILTINS[vt.name] : vt.kind === 'enum' ? 'string' : vt.kind === 'alternate' ? fail(where, 'nested alternate') : 'object';
        if (jsonKinds.has(k)) fail(where, `branch '${b}' is ambiguous (${k})`);
        jsonKinds.add(k);
      }
    }
  }
  const seen = new Set<string>();
  for (const c of [...schema.commands, ...schema.events]) {
    if (seen.has(c.name)) fail(c.module ?? '', `'${c.name}' is defined twice`);
    seen.add(c.name);
    if (c.argType) {
      const a = known(c.argType, `${c.module ?? ''}: '${c.name}'`);
      if (a.kind !== 'struct' && a.kind !== 'union') fail(c.module ?? '', `'${c.name}' arguments must be a struct or union`);
      if (a.kind === 'union' && !('boxed' in c && c.boxed)) fail(c.module ?? '', `'${c.name}' union arguments need 'boxed'`);
    }
    if ('returns' in c && c.returns) known(c.returns, `${c.module ?? ''}: '${c.name}' returns`);
  }
}

// ---------------------------------------------------------------------------------------------
// types.ts

const TS_SCALAR: Record<string, string> = {
  str: 'string', number: 'number', bool: 'boolean', null: 'null', any: 'unknown',
  int: 'number', int8: 'number', int16: 'number', int32: 'number', int64: 'number | bigint',
  uint8: 'number', uint16: 'number', uint32: 'number', uint64: 'number | bigint', size: 'number | bigint',
};

function tsName(name: string): string {
  return name.replace(/^q_obj_/, 'QObj_').replace(/[^A-Za-z0-9_]/g, '_');
}

function tsRef(ref: string): string {
  if (ref.startsWith('[')) {
    const inner = tsRef(elementOf(ref));
    return /[ |&]/.test(inner) ? `Array<${inner}>` : `${inner}[]`;
  }
  return TS_SCALAR[ref] ?? tsName(ref);
}

function tsDoc(d: { doc?: string; since?: string; features?: string[] }, indent: string): string {
  const parts = [d.doc, d.since ? `@since ${d.since}` : undefined, d.features?.length ? `features: ${d.features.join(', ')}` : undefined].filter(Boolean);
  return parts.length ? `${indent}/** ${parts.join(' ').replace(/\*\//g, '* /')} */\n` : '';
}

function tsProps(ms: GenMember[], indent: string): string {
  return ms.map((m) => `${tsDoc(m, indent)}${indent}${JSON.stringify(m.name)}${m.optional ? '?' : ''}: ${tsRef(m.type)};\n`).join('');
}

export function genTypes(schema: GenSchema): string {
  let out = '// Generated by scripts/qapi-gen.ts from schema/*.json; do not edit.\n/* eslint-disable */\n\n';
  for (const t of Object.values(schema.types)) {
    if (t.kind === 'builtin') continue;
    const n = tsName(t.name);
    out += tsDoc(t, '');
    if (t.kind === 'enum') out += `export type ${n} = ${t.values!.map((v) => JSON.stringify(v)).join(' | ')};\n\n`;
    else if (t.kind === 'struct') {
      out += `export interface ${n}${t.base ? ` extends ${tsName(t.base)}` : ''} {\n${tsProps(t.members!, '  ')}}\n\n`;
    } else if (t.kind === 'union') {
      const baseName = `${n}Base`;
      out += `export interface ${baseName}${t.base ? ` extends ${tsName(t.base)}` : ''} {\n${tsProps(t.members!, '  ')}}\n`;
      const tag = allMembers(schema, t).find((m) => m.name === t.discriminator)!;
      const cases = schema.types[tag.type].values!;
      out += `export type ${n} =\n${cases.map((c) => `  | (${baseName} & { ${JSON.stringify(t.discriminator)}: ${JSON.stringify(c)} }${t.variants![c] ? ` & ${tsName(t.variants![c])}` : ''})`).join('\n')};\n\n`;
    } else {
      out += `export type ${n} = ${Object.values(t.variants!).map(tsRef).join(' | ')};\n\n`;
    }
  }
  out += '/** Every QMP command: its arguments and its return value. */\nexport interface QmpCommands {\n';
  for (const c of schema.commands) {
    out += tsDoc(c, '  ');
    out += `  ${JSON.stringify(c.name)}: { args: ${c.argType ? tsName(c.argType) : 'Record<string, never>'}; ret: ${c.returns ? tsRef(c.returns) : 'Record<string, never>'} };\n`;
  }
  out += '}\n\n/** Every QMP event and its data. */\nexport interface QmpEvents {\n';
  for (const e of schema.events) out += `${tsDoc(e, '  ')}  ${JSON.stringify(e.name)}: ${e.argType ? tsName(e.argType) : 'Record<string, never>'};\n`;
  out += '}\n\nexport type QmpCommandName = keyof QmpCommands;\nexport type QmpEventName = keyof QmpEvents;\n';
  return out;
}

// ---------------------------------------------------------------------------------------------
// schema-data.ts: the resolved schema the runtime walks (no docs beyond what --help needs).

export function genSchemaData(schema: GenSchema): string {
  const strip = <T extends object>(o: T): T => JSON.parse(JSON.stringify(o, (k, v) => (k === 'module' || k === 'since' || k === 'errors' ? undefined : v)));
  const data = { types: strip(schema.types), commands: strip(schema.commands), events: strip(schema.events) };
  return `// Generated by scripts/qapi-gen.ts from schema/*.json; do not edit.\nimport type { GenSchema } from './schema-shape.js';\n\nexport const schemaData: GenSchema = ${JSON.stringify(data, null, 1)};\n`;
}

export function genSchemaShape(): string {
  const src = readFileSync(fileURLToPath(import.meta.url), 'utf8');
  const pick = (name: string): string => {
    const m = new RegExp(`/\\*\\*[^]*?\\*/\\nexport interface ${name} \\{[^]*?\\n\\}\\n|export interface ${name} \\{[^]*?\\n\\}\\n`).exec(src);
    if (!m) throw new Error(`interface ${name} not found`);
    return m[0];
  };
  return `// Generated by scripts/qapi-gen.ts: the shape of schema-data.ts; do not edit.\n\n${['GenMember', 'GenType', 'GenCommand', 'GenEvent', 'GenSchema'].map(pick).join('\n')}`;
}

// ---------------------------------------------------------------------------------------------
// introspection.ts: query-qmp-schema's value, built as QEMU's introspect.py does: commands and
// events in schema order, then every type they use in order of first use, non-builtin type
// names masked as '0', '1', … in order of first mention, all integer types shown as 'int'.

const EMPTY = 'q_empty';

export function genIntrospection(schema: GenSchema): unknown[] {
  const nameMap = new Map<string, string>();
  const used: string[] = [];
  const entities: Record<string, unknown>[] = [];
  const mask = (n: string): string => {
    if (!nameMap.has(n)) nameMap.set(n, String(nameMap.size));
    return nameMap.get(n)!;
  };
  const intLike = (n: string): boolean => BUILTINS[n] === 'int';
  const use = (ref: string): string => {
    let r = ref;
    if (!r.startsWith('[') && intLike(r)) r = 'int';
    if (r.startsWith('[') && intLike(elementOf(r))) r = '[int]';
    if (!used.includes(r)) used.push(r);
    if (schema.types[r]?.kind === 'builtin') return r;
    if (r.startsWith('[')) return `[${use(elementOf(r))}]`;
    return mask(r);
  };
  const features = (o: Record<string, unknown>, f?: string[]): void => {
    if (f?.length) o.features = f;
  };
  // Commands and events interleaved in definition order, as QEMU visits them.
  const order = [...schema.commands.map((c) => ({ c, e: undefined as GenEvent | undefined })), ...schema.events.map((e) => ({ c: undefined as GenCommand | undefined, e }))];
  const seq = new Map<string, number>();
  let i = 0;
  for (const d of definitionOrder) seq.set(d, i++);
  order.sort((a, b) => (seq.get((a.c ?? a.e)!.name) ?? 0) - (seq.get((b.c ?? b.e)!.name) ?? 0));
  for (const { c, e } of order) {
    if (c) {
      const o: Record<string, unknown> = { 'arg-type': use(c.argType ?? EMPTY), 'ret-type': use(c.returns ?? EMPTY) };
      if (c.allowOob) o['allow-oob'] = true;
      o.name = c.name;
      o['meta-type'] = 'command';
      features(o, c.features);
      entities.push(o);
    } else if (e) {
      const o: Record<string, unknown> = { 'arg-type': use(e.argType ?? EMPTY), name: e.name, 'meta-type': 'event' };
      features(o, e.features);
      entities.push(o);
    }
  }
  for (let k = 0; k < used.length; k++) {
    const r = used[k];
    if (r.startsWith('[')) {
      const el = use(elementOf(r));
      entities.push({ 'element-type': el, name: `[${el}]`, 'meta-type': 'array' });
      continue;
    }
    if (r === EMPTY) {
      entities.push({ members: [], name: mask(r), 'meta-type': 'object' });
      continue;
    }
    const t = schema.types[r];
    if (t.kind === 'builtin') entities.push({ 'json-type': BUILTINS[t.name], name: t.name, 'meta-type': 'builtin' });
    else if (t.kind === 'enum') {
      const o: Record<string, unknown> = { members: t.values!.map((v) => ({ name: v })), values: [...t.values!], name: mask(r), 'meta-type': 'enum' };
      features(o, t.features);
      entities.push(o);
    } else if (t.kind === 'alternate') {
      const o: Record<string, unknown> = { members: Object.values(t.variants!).map((v) => ({ type: use(v) })), name: mask(r), 'meta-type': 'alternate' };
      features(o, t.features);
      entities.push(o);
    } else {
      const o: Record<string, unknown> = {
        members: allMembers(schema, t).map((m) => {
          const mo: Record<string, unknown> = { name: m.name, type: use(m.type) };
          if (m.optional) mo.default = null;
          features(mo, m.features);
          return mo;
        }),
      };
      if (t.kind === 'union') {
        const tag = allMembers(schema, t).find((m) => m.name === t.discriminator)!;
        o.tag = t.discriminator;
        o.variants = schema.types[tag.type].values!.map((v) => ({ case: v, type: use(t.variants![v] ?? EMPTY) }));
      }
      o.name = mask(r);
      o['meta-type'] = 'object';
      features(o, t.features);
      entities.push(o);
    }
  }
  return entities;
}

/** Command and event names in the order they appear in the modules (filled by main()). */
let definitionOrder: string[] = [];

export function definitionNames(schemaDir: string): string[] {
  const top = JSON.parse(readFileSync(path.join(schemaDir, 'qapi-schema.json'), 'utf8')) as Record<string, unknown>[];
  const out: string[] = [];
  for (const inc of top) {
    if (inc.include === undefined) continue;
    for (const d of JSON.parse(readFileSync(path.join(schemaDir, String(inc.include)), 'utf8')) as Record<string, unknown>[]) {
      if (d.command !== undefined) out.push(String(d.command));
      if (d.event !== undefined) out.push(String(d.event));
    }
  }
  return out;
}

/** Generate every output file into outDir; returns the file names written. */
export function generate(schemaDir: string, outDir: string): string[] {
  const schema = loadSchema(schemaDir);
  definitionOrder = definitionNames(schemaDir);
  mkdirSync(outDir, { recursive: true });
  const files: Record<string, string> = {
    'types.ts': genTypes(schema),
    'schema-shape.ts': genSchemaShape(),
    'schema-data.ts': genSchemaData(schema),
    'introspection.ts': `// Generated by scripts/qapi-gen.ts from schema/*.json; do not edit.\n// query-qmp-schema's value in QEMU's SchemaInfo format.\n\nexport const introspection: readonly unknown[] = ${JSON.stringify(genIntrospection(schema), null, 1)};\n`,
  };
  for (const [f, text] of Object.entries(files)) writeFileSync(path.join(outDir, f), text);
  return Object.keys(files);
}

const isMain = process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url);
if (isMain) {
  const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
  const schemaDir = process.argv[2] ?? path.join(root, 'schema');
  const outDir = process.argv[3] ?? path.join(root, 'src/qapi/generated');
  try {
    const files = generate(schemaDir, outDir);
    console.log(`qapi-gen: wrote ${files.join(', ')} to ${path.relative(process.cwd(), outDir) || '.'}`);
  } catch (err) {
    if (err instanceof SchemaError) {
      console.error(`qapi-gen: ${err.message}`);
      process.exit(1);
    }
    throw err;
  }
}
