// The filter nodes block jobs put into the graph while they run (QEMU's commit_top, mirror_top and
// copy-before-write drivers): named, listed and linked as QEMU shows them; data passes through.
import type { BlockDriver, DriverImageInfo } from '../block/driver.js';
import type { BlockNode } from '../block/node.js';
import type { BlockGraph, FilterSpec, Permission } from '../block/graph.js';
import { QmpError } from '../qapi/errors.js';

interface FilterState {
  /** The filter itself (replaceNode-safe back pointer). */
  node: BlockNode;
  /** The node the filter passes I/O to. */
  child: BlockNode;
}

/** A pass-through driver named as QEMU's job filter drivers are. */
function filterDriver(name: string): BlockDriver<FilterState> {
  return {
    name,
    isProtocol: false,
    isFilter: true,
    async open() {
      throw new Error(`${name} nodes are created by block jobs only`);
    },
    async close() {},
    getLength: (s) => s.child.getLength(),
    async getAllocatedFileSize(s) {
      return (await s.child.getAllocatedFileSize()) ?? (await s.child.file?.getAllocatedFileSize());
    },
    read: (s, offset, buf) => s.child.read(offset, buf),
    write: (s, offset, buf, flags) => s.child.write(offset, buf, flags),
    writeZeroes: (s, offset, bytes, flags) => s.child.writeZeroes(offset, bytes, flags),
    discard: (s, offset, bytes) => s.child.discard(offset, bytes),
    flush: (s) => s.child.flush(),
    blockStatus: (s, offset, bytes) => s.child.blockStatus(offset, bytes),
    // QEMU's bdrv_query_image_info on a filter: the child's cluster size and dirty flag, nothing format-specific.
    imageInfo(s): DriverImageInfo {
      const info = s.child.driver.imageInfo?.(s.child.state) ?? {};
      const out: DriverImageInfo = {};
      if (info['cluster-size'] !== undefined) out['cluster-size'] = info['cluster-size'];
      if (info['dirty-flag'] !== undefined) out['dirty-flag'] = info['dirty-flag'];
      return out;
    },
  };
}

const commitTop = filterDriver('commit_top');
const mirrorTop = filterDriver('mirror_top');
const copyBeforeWrite = filterDriver('copy-before-write');
const copyOnRead = filterDriver('copy-on-read');

const ALL: readonly Permission[] = ['consistent read', 'write', 'write unchanged', 'resize'];
const NO_RESIZE: readonly Permission[] = ['consistent read', 'write', 'write unchanged'];

/** A running job's filter: put in place now, taken out by remove() (idempotent). */
export class JobFilter {
  private removed = false;

  private constructor(private readonly graph: BlockGraph, readonly node: BlockNode) {}

  /** `viaOpen`: QEMU creates this filter with bdrv_insert_node(), whose errors say so. */
  private static insert(graph: BlockGraph, spec: FilterSpec, viaOpen = false): JobFilter {
    try {
      return new JobFilter(graph, graph.insertFilter(spec));
    } catch (err) {
      if (viaOpen && err instanceof QmpError) throw new QmpError(err.errorClass, `Could not create node: ${err.message}`, err.hint);
      throw err;
    }
  }

  /** block-commit (not the active layer): commit_top above `top` (QEMU opens it read-only). */
  static commitTop(graph: BlockGraph, top: BlockNode, nodeName?: string): JobFilter {
    return JobFilter.insert(graph, { driver: commitTop, nodeName, child: top, role: 'backing', readOnly: true, perms: [], shared: ALL });
  }

  /**
   * Mirror and active commit: mirror_top above the source. QEMU's filter asks its child for what
   * its parents ask (write, and consistent read for a mirror) and never shares resize.
   */
  static mirrorTop(graph: BlockGraph, source: BlockNode, nodeName: string | undefined, activeCommit: boolean): JobFilter {
    const perms: Permission[] = activeCommit ? ['write'] : ['consistent read', 'write'];
    return JobFilter.insert(graph, { driver: mirrorTop, nodeName, child: source, role: 'backing', readOnly: false, perms, shared: NO_RESIZE });
  }

  /** Backup: copy-before-write above the source, with the target as its 'target' child. */
  static copyBeforeWrite(graph: BlockGraph, source: BlockNode, target: BlockNode, nodeName?: string): JobFilter {
    return JobFilter.insert(graph, {
      driver: copyBeforeWrite, nodeName, child: source, role: 'file', readOnly: false,
      perms: ['consistent read', 'write'], shared: ['consistent read', 'write unchanged'],
      target: { node: target, perms: ['write'], shared: NO_RESIZE },
    }, true);
  }

  /** Stream: copy-on-read above the node streamed into, asking and sharing all but resize. */
  static copyOnRead(graph: BlockGraph, bs: BlockNode, nodeName?: string): JobFilter {
    return JobFilter.insert(graph, {
      driver: copyOnRead, nodeName, child: bs, role: 'file', readOnly: false, perms: [...NO_RESIZE].reverse(), shared: NO_RESIZE,
    }, true);
  }

  /**
   * The filter-node-name checks QEMU makes before the job exists (mirror, active commit: plain;
   * backup, stream: through bdrv_insert_node, `viaOpen`). Non-active commit names its filter later.
   */
  static checkName(graph: BlockGraph, nodeName: string | undefined, viaOpen: boolean): void {
    if (nodeName === undefined) return;
    try {
      graph.checkNewNodeName(nodeName);
    } catch (err) {
      if (viaOpen && err instanceof QmpError) throw new QmpError(err.errorClass, `Could not create node: ${err.message}`, err.hint);
      throw err;
    }
  }

  remove(): void {
    if (this.removed) return;
    this.removed = true;
    this.graph.removeFilter(this.node);
  }
}
