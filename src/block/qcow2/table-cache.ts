// Metadata table cache (L2 tables, refcount blocks) with write-back, plus the async metadata mutex.
import type { BlockNode } from '../node.js';

/** One cached cluster-sized table. `dirty` tables are written back only by the owner's flush. */
export interface CachedTable {
  /** Host offset of the table in the file child. */
  offset: number;
  buf: Buffer;
  dirty: boolean;
}

/**
 * An LRU of tables keyed by host offset. Only clean tables are evicted, so a dirty table stays
 * until the owner writes it back in dependency order (refcounts before L2 tables).
 */
export class TableCache {
  private readonly map = new Map<number, CachedTable>();
  private readonly loading = new Map<number, Promise<CachedTable>>();
  dirtyCount = 0;

  constructor(
    private readonly file: BlockNode,
    private readonly tableSize: number,
    private readonly capacity: number,
  ) {}

  /** The cached table at `offset`, loading it from the file on a miss (concurrent misses share one read). */
  get(offset: number): CachedTable | Promise<CachedTable> {
    const t = this.map.get(offset);
    if (t !== undefined) {
      // Refresh LRU position.
      this.map.delete(offset);
      this.map.set(offset, t);
      return t;
    }
    let p = this.loading.get(offset);
    if (p === undefined) {
      p = this.load(offset);
      this.loading.set(offset, p);
    }
    return p;
  }

  /** The cached table at `offset` if it is in memory (LRU refreshed), without loading it. */
  peek(offset: number): CachedTable | undefined {
    const t = this.map.get(offset);
    if (t !== undefined) {
      this.map.delete(offset);
      this.map.set(offset, t);
    }
    return t;
  }

  private async load(offset: number): Promise<CachedTable> {
    try {
      const buf = Buffer.alloc(this.tableSize);
      // A table past the end of the file (written back lazily) reads as zeroes.
      const avail = Math.max(0, Math.min(this.tableSize, this.file.getLength() - offset));
      if (avail > 0) await this.file.read(offset, buf.subarray(0, avail));
      const again = this.map.get(offset);
      if (again !== undefined) return again;
      const t: CachedTable = { offset, buf, dirty: false };
      this.insert(t);
      return t;
    } finally {
      this.loading.delete(offset);
    }
  }

  /** Adds a freshly created table (already written or to be marked dirty by the caller). */
  insert(t: CachedTable): void {
    this.map.set(t.offset, t);
    if (this.map.size > this.capacity) this.evictClean();
  }

  /** Marks a table modified; re-inserts it if a concurrent load evicted it meanwhile. */
  markDirty(t: CachedTable): void {
    if (!t.dirty) {
      t.dirty = true;
      this.dirtyCount++;
    }
    if (this.map.get(t.offset) !== t) this.map.set(t.offset, t);
  }

  /** Drops a table (its cluster was freed); a dirty one is forgotten, not written. */
  drop(offset: number): void {
    const t = this.map.get(offset);
    if (t === undefined) return;
    if (t.dirty) this.dirtyCount--;
    t.dirty = false;
    this.map.delete(offset);
  }

  private evictClean(): void {
    for (const [off, t] of this.map) {
      if (this.map.size <= this.capacity) break;
      if (!t.dirty) this.map.delete(off);
    }
  }

  /** Writes every dirty table to the file (no flush); the caller orders this against other caches. */
  async writeBack(): Promise<void> {
    if (this.dirtyCount === 0) return;
    const dirty: CachedTable[] = [];
    for (const t of this.map.values()) if (t.dirty) dirty.push(t);
    dirty.sort((a, b) => a.offset - b.offset);
    for (const t of dirty) {
      t.dirty = false;
      this.dirtyCount--;
      try {
        await this.file.write(t.offset, t.buf);
      } catch (e) {
        this.markDirty(t);
        throw e;
      }
    }
    if (this.map.size > this.capacity) this.evictClean();
  }
}

/** A FIFO async mutex: metadata changes (allocation, L1/L2/refcount updates, write-back) run under it. */
export class Mutex {
  private locked = false;
  private readonly waiters: Array<() => void> = [];

  async lock(): Promise<void> {
    if (!this.locked) {
      this.locked = true;
      return;
    }
    await new Promise<void>((resolve) => this.waiters.push(resolve));
  }

  unlock(): void {
    const next = this.waiters.shift();
    if (next !== undefined) next();
    else this.locked = false;
  }

  async run<T>(fn: () => Promise<T>): Promise<T> {
    await this.lock();
    try {
      return await fn();
    } finally {
      this.unlock();
    }
  }
}
