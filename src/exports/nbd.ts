// NBD export type: makes one block node reachable by name through the NBD server.
import type { BlockNode } from '../block/node.js';
import { genericError } from '../qapi/errors.js';
import type { NbdConnection } from '../nbd/connection.js';
import { nbdAddExport, nbdFindExport, nbdRemoveExport, type NbdServedExport } from '../nbd/export-table.js';
import { NBD_MAX_STRING_SIZE } from '../nbd/nbd-abi.js';
import { nbdServerRunning } from '../nbd/server.js';
import type { BlockExport, BlockExportDriver, ExportCommon } from './export.js';
import { findDirtyBitmap, lookupBitmapNode, type DirtyBitmap } from '../block/dirty-bitmap.js';

/**
 * QEMU 7.2's nbd_export_create bitmap checks: a name is searched from the exported node down its
 * backing chain, {node, name} on that node; busy bitmaps are refused, and an enabled bitmap on a
 * writable node cannot go out read-only (its contents could change under the client).
 */
function resolveBitmaps(common: ExportCommon, items: (string | { node: string; name: string })[]): DirtyBitmap[] {
  const out: DirtyBitmap[] = [];
  for (const item of items) {
    let bm: DirtyBitmap | undefined;
    if (typeof item === 'string') {
      for (let n: BlockNode | undefined = common.node; n && !bm; n = n.backing) bm = findDirtyBitmap(n, item);
      if (!bm) throw genericError(`Bitmap '${item}' is not found`);
    } else {
      const n = lookupBitmapNode(item.node, common.node);
      if (!n) throw genericError(`Node '${item.node}' not found`);
      bm = findDirtyBitmap(n, item.name);
      if (!bm) throw genericError(`Dirty bitmap '${item.name}' not found`);
    }
    if (bm.busy) throw genericError(`Bitmap '${bm.name}' is currently in use by another operation and cannot be used`);
    // QEMU 7.2 refuses whenever the bitmap's node is not read-only, writers or not, and checks
    // only bitmaps given by name.
    if (typeof item === 'string' && !common.writable && bm.recording && !bm.node.readOnly) {
      throw genericError(`Enabled bitmap '${item}' incompatible with readonly export`);
    }
    out.push(bm);
  }
  return out;
}

export class NbdExport implements BlockExport, NbdServedExport {
  readonly connections = new Set<NbdConnection>();
  drained = false;
  private goneWaiters: (() => void)[] = [];

  constructor(
    readonly common: ExportCommon,
    readonly name: string,
    readonly description: string | undefined,
    readonly allocationDepth: boolean,
    readonly bitmaps: readonly DirtyBitmap[] = [],
  ) {}

  get node(): BlockNode {
    return this.common.node;
  }

  get writable(): boolean {
    return this.common.writable;
  }

  get writethrough(): boolean {
    return this.common.writethrough;
  }

  /** Clients holding the export: one that disconnected counts no more, closed socket or not. */
  clientCount(): number {
    let n = 0;
    for (const c of this.connections) if (c.holdsExport) n++;
    return n;
  }

  connectionGone(): void {
    if (this.connections.size === 0) {
      const w = this.goneWaiters;
      this.goneWaiters = [];
      for (const f of w) f();
    }
  }

  /** Resolves once every connection on this export is closed and idle. */
  allClosed(): Promise<void> {
    if (this.connections.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.goneWaiters.push(resolve));
  }
}

export const nbdExportDriver: BlockExportDriver<NbdExport> = {
  unsharedPerms: ['resize'],
  type: 'nbd',
  supportsMultithread: false,
  displayName: 'NBD',

  async create(common: ExportCommon, options: Record<string, any>): Promise<NbdExport> {
    if (!nbdServerRunning()) throw genericError('NBD server not running');
    const name: string = options.name ?? common.nodeName;
    const description: string | undefined = options.description;
    if (Buffer.byteLength(name) > NBD_MAX_STRING_SIZE) throw genericError(`export name '${name}' too long`);
    if (description !== undefined && Buffer.byteLength(description) > NBD_MAX_STRING_SIZE) {
      throw genericError(`description '${description}' too long`);
    }
    if (nbdFindExport(name)) throw genericError(`NBD server already has export named '${name}'`);
    const bitmaps = resolveBitmaps(common, options.bitmaps ?? []);
    // Exported bitmaps are busy: QMP may not change them while a client reads them.
    for (const bm of bitmaps) bm.busy = true;
    const exp = new NbdExport(common, name, description, options['allocation-depth'] === true, bitmaps);
    nbdAddExport(exp);
    return exp;
  },

  requestShutdown(exp: NbdExport): void {
    nbdRemoveExport(exp);
    for (const c of exp.connections) c.close();
  },

  async delete(exp: NbdExport): Promise<void> {
    nbdRemoveExport(exp);
    for (const c of exp.connections) c.close();
    await exp.allClosed();
    for (const bm of exp.bitmaps) bm.busy = false;
  },

  async drainBegin(exp: NbdExport): Promise<void> {
    exp.drained = true;
    await Promise.all([...exp.connections].map((c) => c.waitIdle()));
  },

  async drainEnd(exp: NbdExport): Promise<void> {
    exp.drained = false;
    for (const c of exp.connections) c.kick();
  },
};

/** Arguments of the deprecated nbd-server-add. */
export interface NbdServerAddOptions {
  device: string;
  name?: string;
  description?: string;
  writable?: boolean;
  bitmap?: string;
}

/**
 * nbd-server-add → block-export-add options: the export id is the NBD name, which defaults to
 * the device (verified on QEMU 7.2: query-block-exports lists the name as the id).
 */
export function nbdServerAddOptionsToExport(args: NbdServerAddOptions): Record<string, any> {
  const { device, name = device, description, writable = false, bitmap } = args;
  const out: Record<string, any> = { type: 'nbd', id: name, 'node-name': device, name, writable };
  if (description !== undefined) out.description = description;
  if (bitmap !== undefined) out.bitmaps = [bitmap];
  return out;
}

/**
 * nbd-server-remove → block-export-del arguments. The command layer must first check that the
 * server runs ("NBD server not running") and that an existing export with that id has type nbd.
 */
export function nbdServerRemoveToExportDel(args: { name: string; mode?: 'safe' | 'hard' }): { id: string; mode?: 'safe' | 'hard' } {
  return args.mode === undefined ? { id: args.name } : { id: args.name, mode: args.mode };
}
