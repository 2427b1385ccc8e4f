// What block jobs need from the daemon, and the helpers they share: holding nodes, allocation.
import { ALL_PERMS, type BlockGraph, type NodeUser, type Permission } from '../block/graph.js';
import type { BlockNode } from '../block/node.js';
import type { ExportManager } from '../exports/manager.js';
import type { Qcow2State } from '../block/qcow2/index.js';

export interface JobContext {
  graph: BlockGraph;
  exports: ExportManager;
}

/**
 * The nodes a block job holds (QEMU's block_job_add_bdrv and the job's BlockBackends): each is
 * op-blocked with "block device is in use by block job: <type>", no longer a root node, and
 * those with a BlockBackend make blockdev-del say "Node x is in use".
 */
export class NodeHolds {
  private readonly held: Array<{ node: BlockNode; user: NodeUser; blocker?: string }> = [];
  /** Orders the job's edges in x-debug-query-block-graph (QEMU lists them as added). */
  private seq = 0;

  private stopListening: (() => void) | undefined;

  /**
   * `jobId`: the job's id (its node in x-debug-query-block-graph). `onDrain`: called when a drained
   * section quiesces a held node (QEMU pauses the job for it).
   */
  constructor(
    private readonly graph: BlockGraph, private readonly type: string, private readonly jobId = '', onDrain?: () => void,
  ) {
    if (onDrain) {
      this.stopListening = graph.onDrain((drained) => {
        if (this.held.some((h) => h.blocker !== undefined && drained.has(h.node))) onDrain();
      });
    }
  }

  /**
   * block_job_add_bdrv(): a job edge named `edge` ('main node', 'source', 'target',
   * 'intermediate node', 'base') and the op blocker. `shared`: what the job lets others do.
   */
  hold(node: BlockNode, edge = 'main node', shared: readonly Permission[] = ALL_PERMS, perms: readonly Permission[] = []): void {
    const entry = this.graph.entry(node.nodeName);
    if (!entry) return;
    const user: NodeUser = {
      name: `block job (${this.type})`, role: 'job', perms: new Set(perms), shared: new Set(shared),
      job: { id: this.jobId, edge, seq: this.seq++ },
    };
    entry.users.add(user);
    const blocker = `block device is in use by block job: ${this.type}`;
    this.graph.blockAll(node, blocker);
    this.held.push({ node, user, blocker });
  }

  /** A BlockBackend of the job on `node` (commit's base and top, mirror's target), with QEMU's permissions. */
  backend(node: BlockNode, perms: Permission[] = [], shared: readonly Permission[] = ALL_PERMS): void {
    const user = this.graph.attachBackend(node, `block job (${this.type})`, perms, shared);
    this.held.push({ node, user });
  }

  /** Drops every hold (idempotent); call before changing the graph around these nodes. */
  release(): void {
    this.stopListening?.();
    this.stopListening = undefined;
    for (const { node, user, blocker } of this.held.splice(0).reverse()) {
      this.graph.detachBackend(node, user);
      if (blocker) this.graph.unblockAll(node, blocker);
    }
  }
}

/** Whether `node` itself (not its backing chain) decides the content at offset; pnum: how far. */
export async function layerAllocated(node: BlockNode, offset: number, bytes: number): Promise<{ allocated: boolean; pnum: number }> {
  const length = node.getLength();
  if (offset >= length) return { allocated: false, pnum: bytes };
  const max = Math.min(bytes, length - offset);
  if (node.driver.name === 'qcow2') {
    const img = (node.state as Qcow2State).img;
    if (img.busy.size > 0) await img.waitBusy(offset, max);
    const r = await img.lookup(offset, max);
    // Kind.Unalloc is 0: everything else (zero flag, data, compressed) is this layer's.
    return { allocated: r.kind !== 0, pnum: Math.min(r.pnum, max) };
  }
  if (!node.backing) return { allocated: true, pnum: max };
  const st = await node.blockStatus(offset, max);
  return { allocated: st.allocated, pnum: Math.max(1, st.pnum) };
}

/**
 * QEMU's bdrv_is_allocated_above(top, bottom, include_base=true): allocated in some layer from
 * `top` down to `bottom` inclusive; pnum never crosses a change in any layer above the answer.
 */
export async function allocatedAbove(
  top: BlockNode, bottom: BlockNode | undefined, offset: number, bytes: number,
): Promise<{ allocated: boolean; pnum: number }> {
  let n = bytes;
  for (let node: BlockNode | undefined = top; node; node = node.backing) {
    const r = await layerAllocated(node, offset, n);
    if (r.allocated) return { allocated: true, pnum: r.pnum };
    n = Math.min(n, r.pnum);
    if (node === bottom) break;
  }
  return { allocated: false, pnum: n };
}

/** Copies [offset, offset+n) as `from` reads it into `to`, in bounded pieces. */
export async function copyRange(from: BlockNode, to: BlockNode, offset: number, n: number, buf: Buffer): Promise<void> {
  for (let done = 0; done < n;) {
    const len = Math.min(buf.length, n - done);
    const view = buf.subarray(0, len);
    await from.read(offset + done, view);
    await to.write(offset + done, view);
    done += len;
  }
}

/**
 * Runs copies one at a time in call order: a job's own copies and the copies guest writes cause
 * (backup's copy-before-write, mirror's write-blocking mode), as QEMU's in-flight operations wait
 * for each other. A failed copy does not stop the ones queued after it.
 */
export class CopyLock {
  private tail: Promise<void> = Promise.resolve();

  run<T>(fn: () => Promise<T>): Promise<T> {
    const result = this.tail.then(fn);
    this.tail = result.then(() => undefined, () => undefined);
    return result;
  }
}
