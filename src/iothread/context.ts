// Event-loop contexts (QEMU's AioContext): the main loop or one iothread (a worker thread).
// Export queues are started *in* a context through this interface; the request loop then runs
// entirely in that context's thread.
import type { BlockNode } from '../block/node.js';

export interface QueueStats {
  /** Requests answered since the queue started. */
  served: number;
  /** Requests taken but not yet answered. */
  inFlight: number;
}

/**
 * A queue as its own context sees it (created by a QueueServerFactory in that thread).
 * Contract: after drainBegin() resolves, the queue takes no new request and has none in flight;
 * drainEnd() lets it take requests again. stop() implies a drain and releases the queue (it does
 * not close fds it was given unless the factory's params say so).
 */
export interface LocalQueue {
  drainBegin(): Promise<void>;
  drainEnd(): void;
  stop(): Promise<void>;
  stats(): QueueStats;
}

/**
 * Starts a queue in the calling context. `node` is the node in this context (the graph's node on
 * the main thread, a replica in an iothread). `params` is structured-cloneable (fds, flags,
 * SharedArrayBuffers).
 */
export type QueueServerFactory = (node: BlockNode, params: any) => LocalQueue | Promise<LocalQueue>;

/** The main thread's handle on a queue running in some context (same contract as LocalQueue). */
export interface QueueHandle {
  readonly context: IoContext;
  drainBegin(): Promise<void>;
  drainEnd(): Promise<void>;
  stop(): Promise<void>;
  stats(): Promise<QueueStats>;
}

/** Main-thread view of a context. */
export interface IoContext {
  /** 'main' for the main loop, else the iothread's id. */
  readonly name: string;
  /** The iothread's id, undefined for the main loop (query output uses this). */
  readonly iothreadId: string | undefined;
  /**
   * Start a queue of `kind` (a key of the queue-server registry, e.g. 'fuse') serving `node`
   * (the main-thread node; the context builds or reuses its replica of the node's stack).
   */
  startQueue(kind: string, node: BlockNode, params: unknown): Promise<QueueHandle>;
}
