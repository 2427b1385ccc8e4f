// User-creatable objects other than iothreads (secret, throttle-group, tls-creds, authz): a per-daemon
// table, and the type checks their qom-set setters share.
import type { Daemon } from '../daemon.js';
import { genericError } from '../qapi/errors.js';

/** One object under /objects that is not an iothread. */
export interface UserObject {
  readonly id: string;
  /** The QOM type name, e.g. 'secret'. */
  readonly qomType: string;
  /** qom-get: the property's value, or undefined if the type has no such property. */
  getProperty(name: string): unknown;
  /** qom-set: false if the type has no such writable property; throw QmpError to refuse a value. */
  setProperty(name: string, value: unknown): boolean;
  /** object-del: a reason the object is still in use, or undefined. */
  inUse?(): boolean;
  /** object-del: release what the object holds. */
  delete?(): void;
}

const tables = new WeakMap<Daemon, Map<string, UserObject>>();
/** The daemon whose object table was used last (object-add of any type asks for it first). */
let lastDaemon: WeakRef<Daemon> | undefined;

/** The daemon's non-iothread objects by id, in creation order. */
export function userObjects(daemon: Daemon): Map<string, UserObject> {
  let table = tables.get(daemon);
  if (!table) tables.set(daemon, (table = new Map()));
  if (lastDaemon?.deref() !== daemon) lastDaemon = new WeakRef(daemon);
  return table;
}

/**
 * The daemon objects were last added to or looked up in, for code without a daemon at hand
 * (block drivers looking up a key-secret: QEMU has one object tree per process). Undefined
 * before any object exists, when every lookup would fail anyway.
 */
export function objectsDaemon(): Daemon | undefined {
  return lastDaemon?.deref();
}

/** A qom-set value of the wrong JSON type, refused with QEMU's visitor message. */
export function expectPropertyType(name: string, value: unknown, type: 'string'): asserts value is string;
export function expectPropertyType(name: string, value: unknown, type: 'boolean'): asserts value is boolean;
export function expectPropertyType(name: string, value: unknown, type: 'string' | 'boolean'): void {
  if (typeof value !== type) throw genericError(`Invalid parameter type for '${name}', expected: ${type}`);
}

/** A qom-set value of an enum property: a string, and one of `allowed` (QEMU's visitor messages). */
export function expectPropertyEnum<T extends string>(name: string, value: unknown, allowed: readonly T[]): asserts value is T {
  expectPropertyType(name, value, 'string');
  if (!(allowed as readonly string[]).includes(value)) throw genericError(`Parameter '${name}' does not accept value '${value}'`);
}
