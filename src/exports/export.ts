// Block export core (QEMU's block/export/export.c): the driver table, shared by every export type.
import type { BlockNode } from '../block/node.js';
import type { IoContext } from '../iothread/context.js';
import type { Permission } from '../block/graph.js';

/** What the generic layer checked and prepared before BlockExportDriver.create(). */
export interface ExportCommon {
  readonly id: string;
  readonly nodeName: string;
  /** The exported node (main thread). */
  readonly node: BlockNode;
  readonly writable: boolean;
  /** Flush after every write (export option 'writethrough'). */
  readonly writethrough: boolean;
  /**
   * Where the export runs: one context per queue. [main] without 'iothread', [that iothread]
   * for a single name, one per listed name for a list.
   */
  readonly contexts: IoContext[];
  /** 'iothread' was given as a list (QEMU's multi-threading interface). */
  readonly multithread: boolean;
}

export interface BlockExport {
  readonly common: ExportCommon;
  /** Extra members for this export's query-block-exports entry (ours, beyond QEMU's fields). */
  queryInfo?(): Promise<Record<string, unknown>>;
  /** Connected clients that keep the export in use (NBD); safe-mode deletion refuses while > 0. */
  clientCount?(): number;
}

export interface BlockExportDriver<E extends BlockExport = BlockExport> {
  /** The schema's BlockExportType value. */
  readonly type: string;
  /** false: a list for 'iothread' is refused with "<NAME> export does not support multi-threading". */
  readonly supportsMultithread: boolean;
  /** Name used in that message, e.g. 'NBD'. */
  readonly displayName: string;
  /** Permissions the export does not let others take on its node (NBD: resize, as QEMU). */
  readonly unsharedPerms?: readonly Permission[];
  /**
   * Options are validated against the schema; id, node, writability and iothreads were checked.
   * Throw QmpError to refuse; undo everything on failure.
   */
  create(common: ExportCommon, options: Record<string, any>): Promise<E>;
  /** Stop taking new requests and start disconnecting clients. May return before they are gone. */
  requestShutdown(exp: E): void;
  /** After requestShutdown: wait until nothing is in flight, then release everything (unmount, close). */
  delete(exp: E): Promise<void>;
  /** Drained section on the exported node: stop taking requests, wait for in-flight ones. */
  drainBegin?(exp: E): Promise<void>;
  drainEnd?(exp: E): Promise<void>;
}
