// User-creatable objects other than iothreads (secret, throttle-group): a per-daemon table.
import type { Daemon } from '../daemon.js';

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

/** The daemon's non-iothread objects by id, in creation order. */
export function userObjects(daemon: Daemon): Map<string, UserObject> {
  let table = tables.get(daemon);
  if (!table) tables.set(daemon, (table = new Map()));
  return table;
}
