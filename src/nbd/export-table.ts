// The NBD exports clients can reach by name (QEMU keeps one process-wide list, as we do).
import type { BlockNode } from '../block/node.js';
import type { NbdConnection } from './connection.js';
import type { DirtyBitmap } from '../block/dirty-bitmap.js';

/** What a connection needs to know about one export; created by src/exports/nbd.ts. */
export interface NbdServedExport {
  /** Name clients ask for (NBD_OPT_GO / EXPORT_NAME); unique in the table. */
  readonly name: string;
  /** Shown by NBD_OPT_LIST and NBD_INFO_DESCRIPTION; undefined = none. */
  readonly description: string | undefined;
  /** The exported node (main thread). */
  readonly node: BlockNode;
  readonly writable: boolean;
  /** Flush after every write (export option 'writethrough'). */
  readonly writethrough: boolean;
  /** Offer the qemu:allocation-depth meta context. */
  readonly allocationDepth: boolean;
  /** Offer qemu:dirty-bitmap:<name> for each (option 'bitmaps'); context id 2 + index. */
  readonly bitmaps?: readonly DirtyBitmap[];
  /** Connections in the transmission phase on this export; maintained by NbdConnection. */
  readonly connections: Set<NbdConnection>;
  /** While true, connections take no new requests (drained section). */
  drained: boolean;
  /** Called by a connection once it is closed and has nothing in flight. */
  connectionGone(conn: NbdConnection): void;
}

const table = new Map<string, NbdServedExport>();

export function nbdFindExport(name: string): NbdServedExport | undefined {
  return table.get(name);
}

/** Exports in creation order (NBD_OPT_LIST order). */
export function nbdListExports(): IterableIterator<NbdServedExport> {
  return table.values();
}

/** The caller has checked that the name is free. */
export function nbdAddExport(exp: NbdServedExport): void {
  table.set(exp.name, exp);
}

/** New clients can no longer reach the export; existing connections are untouched. */
export function nbdRemoveExport(exp: NbdServedExport): void {
  if (table.get(exp.name) === exp) table.delete(exp.name);
}
