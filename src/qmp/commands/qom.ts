// Commands of QEMU's qom.json for the QOM tree qsd-ts has: /objects (iothreads) and /chardevs.
import type { CommandHandler, CommandContext } from './types.js';
import { genericError, QmpError } from '../../qapi/errors.js';
import { idWellformed } from '../../block/graph.js';
import { IoThread } from '../../iothread/iothread.js';
import type { Chardev } from '../../chardev/chardev.js';
import { SocketChardev, chardevOrder } from '../../chardev/registry.js';
import { qdictKeyOrder } from '../json.js';
import type { Daemon } from '../../daemon.js';
import { userObjects, type UserObject } from '../../objects/user-object.js';
import { checkSecretProperties, createSecret } from '../../objects/secret.js';
import { ThrottleGroup } from '../../objects/throttle-group.js';
import { AuthzSimple, checkTlsCredsProperties, createTlsCreds } from '../../objects/tls-creds.js';

// ---------------------------------------------------------------------------------------------
// GLib's GHashTable iteration order. QOM keeps an object's children in a GHashTable keyed by
// name, so qom-list and query-chardev list them in bucket order (reversed: QEMU prepends). This
// replays GLib's (>= 2.60) open addressing with g_str_hash, the x11-modulo-prime bucket index,
// quadratic probing, tombstones and in-place resizes, so the order is QEMU's for any history.

const PRIME_MOD = [1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071];
const MIN_SHIFT = 3;
const UNUSED = 0;
const TOMBSTONE = 1;

/** g_str_hash: djb2 over signed chars, 32-bit. */
function strHash(key: string): number {
  let h = 5381;
  for (const b of Buffer.from(key)) h = (Math.imul(h, 33) + ((b << 24) >> 24)) >>> 0;
  return h < 2 ? 2 : h; // 0 and 1 mark unused and deleted buckets
}

/** The key order of one GHashTable<string, …> given its insertions and removals. */
export class GHashOrder {
  private size = 1 << MIN_SHIFT;
  private mod = PRIME_MOD[MIN_SHIFT];
  private mask = this.size - 1;
  private nnodes = 0;
  private noccupied = 0;
  private hashes: number[] = new Array(this.size).fill(UNUSED);
  private keys: Array<string | undefined> = new Array(this.size).fill(undefined);

  constructor(keys: Iterable<string> = []) {
    for (const key of keys) this.insert(key);
  }

  private index(hash: number): number {
    return Number((BigInt(hash) * 11n) & 0xffffffffn) % this.mod;
  }

  private lookup(key: string): { i: number; hash: number } {
    const hash = strHash(key);
    let i = this.index(hash);
    let step = 0;
    let tombstone = -1;
    while (this.hashes[i] !== UNUSED) {
      if (this.hashes[i] === hash && this.keys[i] === key) return { i, hash };
      if (this.hashes[i] === TOMBSTONE && tombstone < 0) tombstone = i;
      step++;
      i = (i + step) & this.mask;
    }
    return { i: tombstone >= 0 ? tombstone : i, hash };
  }

  insert(key: string): void {
    const { i, hash } = this.lookup(key);
    if (this.hashes[i] > TOMBSTONE) return;
    const wasUnused = this.hashes[i] === UNUSED;
    this.hashes[i] = hash;
    this.keys[i] = key;
    this.nnodes++;
    if (wasUnused) {
      this.noccupied++;
      this.maybeResize();
    }
  }

  remove(key: string): void {
    const { i } = this.lookup(key);
    if (this.hashes[i] <= TOMBSTONE) return;
    this.hashes[i] = TOMBSTONE;
    this.keys[i] = undefined;
    this.nnodes--;
    this.maybeResize();
  }

  private maybeResize(): void {
    const occupied = this.noccupied;
    if ((this.size > this.nnodes * 4 && this.size > 1 << MIN_SHIFT) || this.size <= occupied + Math.floor(occupied / 16)) {
      this.resize();
    }
  }

  /** GLib's in-place rehash: old buckets in order, evicting whatever sits at the new spot. */
  private resize(): void {
    const oldSize = this.size;
    let n = Math.trunc(this.nnodes * 1.333);
    let shift = 0;
    for (; n; shift++) n >>= 1;
    shift = Math.max(shift, MIN_SHIFT);
    this.size = 1 << shift;
    this.mod = PRIME_MOD[shift];
    this.mask = this.size - 1;
    for (let i = oldSize; i < this.size; i++) {
      this.hashes[i] = UNUSED;
      this.keys[i] = undefined;
    }
    const placed = new Array<boolean>(Math.max(oldSize, this.size)).fill(false);
    for (let i = 0; i < oldSize; i++) {
      let hash = this.hashes[i];
      if (hash <= TOMBSTONE) {
        this.hashes[i] = UNUSED;
        continue;
      }
      if (placed[i]) continue;
      this.hashes[i] = UNUSED;
      let key = this.keys[i];
      this.keys[i] = undefined;
      for (;;) {
        let j = this.index(hash);
        for (let step = 1; placed[j]; step++) j = (j + step) & this.mask;
        placed[j] = true;
        const replacedHash = this.hashes[j];
        const replacedKey = this.keys[j];
        this.hashes[j] = hash;
        this.keys[j] = key;
        if (replacedHash <= TOMBSTONE) break;
        hash = replacedHash;
        key = replacedKey;
      }
    }
    this.hashes.length = this.size;
    this.keys.length = this.size;
    this.noccupied = this.nnodes;
  }

  /** Keys in iteration order. */
  order(): string[] {
    const out: string[] = [];
    for (let i = 0; i < this.size; i++) if (this.hashes[i] > TOMBSTONE) out.push(this.keys[i]!);
    return out;
  }
}

// ---------------------------------------------------------------------------------------------
// The QOM types qsd-ts has, in the order QEMU 7.2's type table lists them (qom-list-types).

interface QomType {
  readonly name: string;
  readonly parent?: string;
  readonly abstract?: boolean;
  readonly interfaces?: readonly string[];
  /** qom-list-properties, in QEMU's order. */
  readonly properties?: ReadonlyArray<{ name: string; type: string }>;
}

const TYPE_PROPERTY = { name: 'type', type: 'string' };
const EVENT_LOOP_PROPERTIES = ['thread-pool-min', 'aio-max-batch', 'thread-pool-max'];
const IOTHREAD_PROPERTIES = [...EVENT_LOOP_PROPERTIES, 'poll-max-ns', 'poll-grow', 'poll-shrink'];
const intProps = (names: string[]) => names.map((name) => ({ name, type: 'int' }));

const SECRET_COMMON_PROPERTIES = [TYPE_PROPERTY, { name: 'iv', type: 'string' }, { name: 'keyid', type: 'string' },
  { name: 'loaded', type: 'bool' }, { name: 'format', type: 'QCryptoSecretFormat' }];

/** QEMU's class property table order for throttle-group (a GHashTable, so not declaration order). */
const THROTTLE_GROUP_PROPERTIES = [TYPE_PROPERTY, ...['x-bps-write-max-length', 'x-iops-total-max-length', 'x-iops-size']
  .map((name) => ({ name, type: 'int' })), { name: 'limits', type: 'ThrottleLimits' }, ...intProps([
  'x-bps-total', 'x-iops-read-max-length', 'x-bps-write', 'x-iops-write-max-length', 'x-bps-read-max', 'x-iops-read-max',
  'x-bps-total-max', 'x-bps-read-max-length', 'x-iops-read', 'x-bps-read', 'x-bps-write-max', 'x-iops-total-max',
  'x-iops-total', 'x-iops-write', 'x-bps-total-max-length', 'x-iops-write-max'])];

const TLS_CREDS_PROPERTIES = [TYPE_PROPERTY, { name: 'endpoint', type: 'QCryptoTLSCredsEndpoint' },
  { name: 'dir', type: 'string' }, { name: 'verify-peer', type: 'bool' }, { name: 'priority', type: 'string' }];
const LOADED_PROPERTY = { name: 'loaded', type: 'bool' };

const QOM_TYPES: readonly QomType[] = [
  { name: 'authz-simple', parent: 'authz', properties: [TYPE_PROPERTY, { name: 'identity', type: 'string' }] },
  { name: 'secret_common', parent: 'object', abstract: true, interfaces: ['user-creatable'], properties: SECRET_COMMON_PROPERTIES },
  { name: 'container', parent: 'object', properties: [TYPE_PROPERTY] },
  { name: 'interface', abstract: true },
  { name: 'iothread', parent: 'event-loop-base', properties: [TYPE_PROPERTY, ...intProps(IOTHREAD_PROPERTIES)] },
  { name: 'secret', parent: 'secret_common',
    properties: [...SECRET_COMMON_PROPERTIES, { name: 'file', type: 'string' }, { name: 'data', type: 'string' }] },
  { name: 'authz', parent: 'object', abstract: true, interfaces: ['user-creatable'], properties: [TYPE_PROPERTY] },
  { name: 'tls-creds-psk', parent: 'tls-creds',
    properties: [...TLS_CREDS_PROPERTIES, { name: 'username', type: 'string' }, LOADED_PROPERTY] },
  { name: 'tls-creds', parent: 'object', abstract: true, interfaces: ['user-creatable'], properties: TLS_CREDS_PROPERTIES },
  { name: 'chardev-pipe', parent: 'chardev-fd', properties: [TYPE_PROPERTY] },
  { name: 'chardev-fd', parent: 'chardev', abstract: true, properties: [TYPE_PROPERTY] },
  { name: 'chardev-null', parent: 'chardev', properties: [TYPE_PROPERTY] },
  { name: 'chardev-ringbuf', parent: 'chardev', properties: [TYPE_PROPERTY] },
  { name: 'event-loop-base', parent: 'object', abstract: true, interfaces: ['user-creatable'],
    properties: [TYPE_PROPERTY, ...intProps(EVENT_LOOP_PROPERTIES)] },
  { name: 'chardev-stdio', parent: 'chardev-fd', properties: [TYPE_PROPERTY] },
  { name: 'chardev', parent: 'object', abstract: true, properties: [TYPE_PROPERTY] },
  { name: 'user-creatable', parent: 'interface', abstract: true },
  { name: 'chardev-socket', parent: 'chardev',
    properties: [TYPE_PROPERTY, { name: 'connected', type: 'bool' }, { name: 'addr', type: 'SocketAddress' }] },
  { name: 'chardev-file', parent: 'chardev-fd', properties: [TYPE_PROPERTY] },
  { name: 'chardev-memory', parent: 'chardev-ringbuf', properties: [TYPE_PROPERTY] },
  { name: 'object', abstract: true, properties: [TYPE_PROPERTY] },
  { name: 'tls-creds-x509', parent: 'tls-creds', properties: [...TLS_CREDS_PROPERTIES,
    { name: 'sanity-check', type: 'bool' }, { name: 'passwordid', type: 'string' }, LOADED_PROPERTY] },
  { name: 'throttle-group', parent: 'object', interfaces: ['user-creatable'], properties: THROTTLE_GROUP_PROPERTIES },
];
const typeByName = new Map(QOM_TYPES.map((t) => [t.name, t]));

/** The type itself, its ancestors and every interface they (or the interfaces' ancestors) name. */
function typeClosure(name: string): Set<string> {
  const out = new Set<string>();
  const visit = (n: string | undefined): void => {
    for (let t = n ? typeByName.get(n) : undefined; t; t = t.parent ? typeByName.get(t.parent) : undefined) {
      if (out.has(t.name)) return;
      out.add(t.name);
      for (const i of t.interfaces ?? []) visit(i);
    }
  };
  visit(name);
  return out;
}

/** Properties without a setter: `--object <type>,help` leaves them out, as QEMU does. */
const READ_ONLY_PROPERTIES = new Set(['type', 'loaded', 'connected', 'addr']);

/**
 * `--object help`: the types object-add can create here, sorted by name. QEMU 7.2 also lists the
 * types it has and we lack (authz-list*, tls-creds-anon, main-loop, ...); we list only what works, so a
 * script that checks the list for a type learns whether creating it will succeed.
 */
export function objectTypesHelp(): string {
  const creatable = QOM_TYPES.filter((t) => !t.abstract && typeClosure(t.name).has('user-creatable')).map((t) => t.name);
  return `List of user creatable objects:\n${creatable.sort().map((n) => `  ${n}\n`).join('')}`;
}

/**
 * `--object <type>,help`: the settable properties of any known class, as QEMU 7.2 prints them
 * (`name=<type>`, sorted as whole lines); undefined when the class does not exist (the caller
 * then lists the types, as QEMU does).
 */
export function objectTypeHelp(type: string): string | undefined {
  const t = typeByName.get(type);
  if (!t) return undefined;
  const lines = (t.properties ?? []).filter((p) => !READ_ONLY_PROPERTIES.has(p.name)).map((p) => `${p.name}=<${p.type}>`);
  if (lines.length === 0) return `There are no options for ${type}.\n`;
  return `${type} options:\n${lines.sort().map((l) => `  ${l}\n`).join('')}`;
}

// ---------------------------------------------------------------------------------------------
// The QOM tree: / (container) → objects (container) → iothreads; chardevs (container) → chardevs.

type QomObject =
  | { kind: 'container'; path: string }
  | { kind: 'iothread'; path: string; obj: IoThread }
  | { kind: 'user'; path: string; obj: UserObject }
  | { kind: 'chardev'; path: string; chardev: Chardev };

/** /objects' children table per daemon, replaying object-add/object-del for QEMU's order. */
const objectTables = new WeakMap<Daemon, GHashOrder>();
function objectTable(daemon: Daemon): GHashOrder {
  let table = objectTables.get(daemon);
  if (!table) objectTables.set(daemon, (table = new GHashOrder(daemon.objects.keys())));
  return table;
}


function typeOf(o: QomObject): string {
  if (o.kind === 'container') return 'container';
  if (o.kind === 'iothread') return 'iothread';
  if (o.kind === 'user') return o.obj.qomType;
  return o.chardev.qomType;
}

/** Child objects in GHashTable iteration order. */
function children(daemon: Daemon, o: QomObject): Array<[string, QomObject]> {
  if (o.kind !== 'container') return [];
  const at = (name: string) => (o.path === '/' ? `/${name}` : `${o.path}/${name}`);
  if (o.path === '/') {
    const names: string[] = [];
    if (daemon.objectsContainer) names.push('objects');
    if (daemon.chardevs.size > 0) names.push('chardevs');
    return new GHashOrder(names).order().map((n) => [n, { kind: 'container', path: at(n) }]);
  }
  if (o.path === '/objects') {
    const others = userObjects(daemon);
    return objectTable(daemon).order().map((id): [string, QomObject] => {
      const other = others.get(id);
      return [id, other ? { kind: 'user', path: at(id), obj: other } : { kind: 'iothread', path: at(id), obj: daemon.objects.get(id)! }];
    });
  }
  return chardevOrder(daemon).map((c) => [c.id, { kind: 'chardev', path: at(c.id), chardev: c }]);
}

const root: QomObject = { kind: 'container', path: '/' };

function resolveAbs(daemon: Daemon, parent: QomObject, parts: string[]): QomObject | undefined {
  let obj: QomObject | undefined = parent;
  for (const part of parts) {
    if (part === '') continue;
    obj = children(daemon, obj).find(([name]) => name === part)?.[1];
    if (!obj) return undefined;
  }
  return obj;
}

/** QEMU's object_resolve_partial_path: the path may start at any object, if only one fits. */
function resolvePartial(daemon: Daemon, parent: QomObject, parts: string[], state: { ambiguous: boolean }): QomObject | undefined {
  let obj = resolveAbs(daemon, parent, parts);
  for (const [, child] of children(daemon, parent)) {
    const found = resolvePartial(daemon, child, parts, state);
    if (found) {
      if (obj) {
        state.ambiguous = true;
        return undefined;
      }
      obj = found;
    }
    if (state.ambiguous) return undefined;
  }
  return obj;
}

function resolvePath(daemon: Daemon, path: string): { obj?: QomObject; ambiguous: boolean } {
  const parts = path === '' ? [] : path.split('/');
  if (parts.length > 0 && parts[0] === '') return { obj: resolveAbs(daemon, root, parts.slice(1)), ambiguous: false };
  const state = { ambiguous: false };
  const obj = resolvePartial(daemon, root, parts, state);
  return { obj, ambiguous: state.ambiguous };
}

/** qom-get / qom-set: an ambiguous path is simply not found. */
function requireObject(daemon: Daemon, path: string): QomObject {
  const { obj } = resolvePath(daemon, path);
  if (!obj) throw new QmpError('DeviceNotFound', `Device '${path}' not found`);
  return obj;
}

/** The properties qom-list shows, in its order: class ones first, then children newest bucket first. */
function listProperties(daemon: Daemon, o: QomObject): Array<{ name: string; type: string }> {
  const own = typeByName.get(typeOf(o))!.properties ?? [TYPE_PROPERTY];
  const kids = children(daemon, o).map(([name, child]) => ({ name, type: `child<${typeOf(child)}>` }));
  return [...own, ...kids.reverse()];
}

/** QEMU's defaults (poll-max-ns 32768 on Linux hosts). */
const IOTHREAD_DEFAULTS: Record<string, number> = {
  'thread-pool-min': 0, 'aio-max-batch': 0, 'thread-pool-max': 64, 'poll-max-ns': 32768, 'poll-grow': 0, 'poll-shrink': 0,
};

function getProperty(o: QomObject, property: string, daemon: Daemon): unknown {
  if (property === 'type') return typeOf(o);
  if (o.kind === 'iothread' && IOTHREAD_PROPERTIES.includes(property)) {
    const props = o.obj.properties as Record<string, unknown>;
    return props[property] ?? IOTHREAD_DEFAULTS[property];
  }
  if (o.kind === 'user') {
    const value = o.obj.getProperty(property);
    if (value !== undefined) return value;
  }
  if (o.kind === 'chardev' && o.chardev instanceof SocketChardev) {
    if (property === 'connected') return o.chardev.connected;
    if (property === 'addr') return o.chardev.address();
  }
  const child = children(daemon, o).find(([name]) => name === property);
  if (child) return child[1].path; // a child<> property reads as the child's canonical path
  throw genericError(`Property '${typeOf(o)}.${property}' not found`);
}

/** QEMU's visit_type_int64 on a QMP value: integers only, within int64. */
function int64Value(property: string, value: unknown): number | bigint {
  const ok = (typeof value === 'number' && Number.isSafeInteger(value)) ||
    (typeof value === 'bigint' && value >= -(1n << 63n) && value < 1n << 63n);
  if (!ok) throw genericError(`Invalid parameter type for '${property}', expected: integer`);
  return typeof value === 'bigint' && value >= BigInt(Number.MIN_SAFE_INTEGER) && value <= BigInt(Number.MAX_SAFE_INTEGER)
    ? Number(value) : (value as number | bigint);
}

/** QEMU's aio_context_set_thread_pool_params() check (INT_MAX bound, max non-zero). */
function checkThreadPool(props: Record<string, unknown>): void {
  const min = BigInt((props['thread-pool-min'] as number | bigint | undefined) ?? IOTHREAD_DEFAULTS['thread-pool-min']);
  const max = BigInt((props['thread-pool-max'] as number | bigint | undefined) ?? IOTHREAD_DEFAULTS['thread-pool-max']);
  if (min > max || max === 0n || min > 2147483647n || max > 2147483647n) {
    throw genericError('bad thread-pool-min/thread-pool-max values');
  }
}

/** One iothread property write, as QEMU's setters: range first; the value stays even if the pool check fails. */
function setIothreadProperty(props: Record<string, unknown>, property: string, value: unknown): void {
  const v = int64Value(property, value);
  if (v < 0) throw genericError(`${property} value must be in range [0, 9223372036854775807]`);
  props[property] = v;
  if (property.startsWith('thread-pool-')) checkThreadPool(props);
}

function setProperty(o: QomObject, property: string, value: unknown, daemon: Daemon): void {
  if (o.kind === 'iothread' && IOTHREAD_PROPERTIES.includes(property)) {
    setIothreadProperty(o.obj.properties as Record<string, unknown>, property, value);
    // The thread polls its loop with the new window from its next wait on (as QEMU applies it).
    if (property.startsWith('poll-')) (o.obj as IoThread).applyPolling();
    return;
  }
  if (o.kind === 'user' && o.obj.setProperty(property, value)) return;
  getProperty(o, property, daemon); // not found → QEMU's message
  throw genericError(`Property '${typeOf(o)}.${property}' is not writable`);
}

/**
 * The non-iothread types object-add creates (the schema has checked type and properties): set the
 * properties in QDict order now, and return the completion step, run once the object is in /objects.
 */
function prepareUserObject(daemon: Daemon, type: string, id: string, props: Record<string, any>): () => UserObject {
  if (type === 'secret') {
    checkSecretProperties(props);
    return () => createSecret(daemon, id, props);
  }
  if (type === 'throttle-group') {
    const group = new ThrottleGroup(id);
    for (const key of qdictKeyOrder(Object.keys(props))) group.initProperty(key, props[key]);
    return () => {
      group.complete();
      return group;
    };
  }
  if (type === 'tls-creds-x509' || type === 'tls-creds-psk') {
    checkTlsCredsProperties(type, props);
    return () => createTlsCreds(daemon, type, id, props);
  }
  if (type === 'authz-simple') return () => new AuthzSimple(id, props.identity);
  throw genericError(`Parameter 'qom-type' does not accept value '${type}'`);
}

export function objectAdd(daemon: Daemon, args: Record<string, any>): void {
  const { 'qom-type': type, id, ...props } = args;
  if (!idWellformed(id)) {
    throw genericError("Parameter 'id' expects an identifier", "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.\n");
  }
  // QEMU (user_creatable_add_type) sets the properties first, then adds the child to /objects
  // (the duplicate check), then completes it: a bad value wins over a taken id.
  const checkDuplicate = (): void => {
    if (daemon.objects.has(id) || userObjects(daemon).has(id)) {
      throw genericError(`attempt to add duplicate property '${id}' to object (type 'container')`);
    }
  };
  if (type !== 'iothread') {
    const complete = prepareUserObject(daemon, type, id, props);
    checkDuplicate();
    // QEMU adds the child before completing it and deletes it on failure: the table keeps a tombstone.
    objectTable(daemon).insert(id);
    let obj: UserObject;
    try {
      obj = complete();
    } catch (err) {
      objectTable(daemon).remove(id);
      throw err;
    }
    userObjects(daemon).set(id, obj);
    daemon.objectsContainer = true;
    return;
  }
  // QEMU sets the properties in QDict order, then checks the thread pool when the object completes.
  const checked: Record<string, unknown> = {};
  for (const key of qdictKeyOrder(Object.keys(props))) {
    const v = int64Value(key, props[key]);
    if (v < 0) throw genericError(`${key} value must be in range [0, 9223372036854775807]`);
    checked[key] = v;
  }
  checkDuplicate();
  checkThreadPool(checked);
  objectTable(daemon).insert(id);
  daemon.objects.set(id, new IoThread(id, checked));
  daemon.objectsContainer = true;
}

export const qomCommands: Record<string, CommandHandler> = {
  'object-add'(args, { daemon }: CommandContext) {
    objectAdd(daemon, args);
    return {};
  },
  async 'object-del'(args: { id: string }, { daemon }) {
    const other = userObjects(daemon).get(args.id);
    if (other) {
      if (other.inUse?.()) throw genericError(`object '${args.id}' is in use, can not be deleted`);
      objectTable(daemon).remove(args.id);
      userObjects(daemon).delete(args.id);
      other.delete?.();
      return {};
    }
    const obj = daemon.objects.get(args.id);
    if (!obj) throw genericError(`object '${args.id}' not found`);
    if (daemon.exports.usesIothread(args.id) || obj.queueCount > 0) {
      throw genericError(`object '${args.id}' is in use, can not be deleted`);
    }
    objectTable(daemon).remove(args.id);
    daemon.objects.delete(args.id);
    await obj.stop();
    return {};
  },
  'qom-list'(args: { path: string }, { daemon }) {
    const { obj, ambiguous } = resolvePath(daemon, args.path);
    if (!obj) {
      if (ambiguous) throw genericError(`Path '${args.path}' is ambiguous`);
      throw new QmpError('DeviceNotFound', `Device '${args.path}' not found`);
    }
    return listProperties(daemon, obj);
  },
  'qom-list-get'(args: { paths: string[] }, { daemon }) {
    return args.paths.map((path) => {
      const obj = requireObject(daemon, path);
      return {
        properties: listProperties(daemon, obj).map((p) => ({ ...p, value: getProperty(obj, p.name, daemon) })),
      };
    });
  },
  'qom-get'(args: { path: string; property: string }, { daemon }) {
    return getProperty(requireObject(daemon, args.path), args.property, daemon);
  },
  'qom-set'(args: { path: string; property: string; value: unknown }, { daemon }) {
    setProperty(requireObject(daemon, args.path), args.property, args.value, daemon);
    return {};
  },
  'qom-list-types'(args: { implements?: string; abstract?: boolean }) {
    return QOM_TYPES
      .filter((t) => (args.abstract ?? false) || !t.abstract)
      .filter((t) => args.implements === undefined || typeClosure(t.name).has(args.implements))
      .map((t) => ({ name: t.name, ...(t.abstract ? { abstract: true } : {}), ...(t.parent ? { parent: t.parent } : {}) }));
  },
  'qom-list-properties'(args: { typename: string }) {
    const t = typeByName.get(args.typename);
    if (!t) throw new QmpError('DeviceNotFound', `Class '${args.typename}' not found`);
    if (!typeClosure(t.name).has('object')) throw genericError("Parameter 'typename' expects a QOM type");
    return (t.properties ?? []).map((p) => ({ ...p }));
  },
};
