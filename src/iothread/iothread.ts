// IOThreads (`--object iothread,id=…`): each is a worker thread with its own event loop, seen from
// the main thread as an IoContext that export queues can be started in.
import { Worker } from 'node:worker_threads';
import type { BlockNode } from '../block/node.js';
import type { IoContext, QueueHandle, QueueStats } from './context.js';
import { describeNode, isReplicable } from './replica.js';
import { mainContext } from './main-context.js';
import type { WorkerReply, WorkerRequest } from './worker.js';
import { log } from '../log.js';

// Under tsx (tests) the sources are .ts; the installed daemon runs the compiled .js.
const workerUrl = new URL(import.meta.url.endsWith('.ts') ? './worker.ts' : './worker.js', import.meta.url);

/** The properties QEMU's iothread object has (qom-list shows them). */
export interface IoThreadProperties {
  'poll-max-ns'?: number;
  'poll-grow'?: number;
  'poll-shrink'?: number;
  'aio-max-batch'?: number;
  'thread-pool-min'?: number;
  'thread-pool-max'?: number;
}

/** V8 young generation of each iothread's isolate (see the Worker options below). */
const IOTHREAD_YOUNG_GENERATION_MB = 4;

/** How an iothread busy-polls its loop before it blocks (QEMU's poll-* properties). */
export interface PollingSettings {
  maxNs: number;
  grow: number;
  shrink: number;
}

let nextQueueId = 1;

class WorkerQueueHandle implements QueueHandle {
  constructor(readonly context: IoThread, private readonly queueId: number) {}
  async drainBegin(): Promise<void> {
    await this.context.request({ op: 'drain-begin', queueId: this.queueId });
  }
  async drainEnd(): Promise<void> {
    await this.context.request({ op: 'drain-end', queueId: this.queueId });
  }
  async stop(): Promise<void> {
    await this.context.request({ op: 'stop', queueId: this.queueId });
    this.context.queueCount--;
  }
  async stats(): Promise<QueueStats> {
    return (await this.context.request({ op: 'stats', queueId: this.queueId })) as QueueStats;
  }
}

export class IoThread implements IoContext {
  readonly iothreadId: string;
  private readonly worker: Worker;
  private readonly pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  private nextReqId = 1;
  private exited: Promise<number>;
  /** Queues currently hosted; a used iothread cannot be deleted. */
  queueCount = 0;

  constructor(readonly id: string, readonly properties: IoThreadProperties = {}) {
    this.iothreadId = id;
    // Under tsx the worker needs the TS loader too (Node 20 does not pass --import hooks on).
    const execArgv = workerUrl.pathname.endsWith('.ts') ? ['--import', 'tsx'] : undefined;
    this.worker = new Worker(workerUrl, {
      name: `iothread ${id}`, execArgv, workerData: { polling: this.polling() },
      // A queue allocates little per request (its promises), so a small young generation costs
      // no measurable IOPS here, while V8's default let each of four loaded iothreads hold
      // 4-5 MiB more: peak RSS with 4 iothreads under 4 fio jobs went from 150 to 135 MiB.
      resourceLimits: { maxYoungGenerationSizeMb: IOTHREAD_YOUNG_GENERATION_MB },
    });
    this.worker.on('message', (reply: WorkerReply) => {
      const waiter = this.pending.get(reply.reqId);
      if (!waiter) return;
      this.pending.delete(reply.reqId);
      if (reply.ok) waiter.resolve(reply.result);
      else waiter.reject(new Error(reply.error));
    });
    this.exited = new Promise((resolve) => this.worker.once('exit', resolve));
    // A dead thread answers nothing more: fail whatever waits on it instead of hanging.
    void this.exited.then((code) => this.failPending(new Error(`iothread '${id}' exited (code ${code})`)));
    this.worker.on('error', (err) => {
      log.error({ iothread: id, err }, 'iothread failed');
      this.failPending(err);
    });
  }

  get name(): string {
    return this.id;
  }

  /** poll-max-ns/-grow/-shrink with QEMU's defaults (32768 ns on Linux, factors 0 = QEMU's own). */
  private polling(): PollingSettings {
    const p = this.properties;
    return { maxNs: p['poll-max-ns'] ?? 32768, grow: p['poll-grow'] ?? 0, shrink: p['poll-shrink'] ?? 0 };
  }

  /** qom-set changed a poll-* property: the thread adopts it. */
  applyPolling(): void {
    this.request({ op: 'polling', polling: this.polling() }).catch(() => undefined);
  }

  private dead = false;

  private failPending(err: Error): void {
    this.dead = true;
    for (const waiter of this.pending.values()) waiter.reject(err);
    this.pending.clear();
  }

  request(req: WorkerRequest): Promise<unknown> {
    if (this.dead) return Promise.reject(new Error(`iothread '${this.id}' is not running`));
    const reqId = this.nextReqId++;
    return new Promise((resolve, reject) => {
      this.pending.set(reqId, { resolve, reject });
      this.worker.postMessage({ ...req, reqId });
    });
  }

  async startQueue(kind: string, node: BlockNode, params: unknown): Promise<QueueHandle> {
    if (!isReplicable(node)) {
      // A driver without replicas (qcow2 for now) is served from the main loop instead.
      log.warn({ iothread: this.id, node: node.nodeName }, 'node cannot be served from an iothread; using the main loop');
      return mainContext.startQueue(kind, node, params);
    }
    const queueId = nextQueueId++;
    await this.request({ op: 'start-queue', queueId, kind, node: describeNode(node), params });
    this.queueCount++;
    return new WorkerQueueHandle(this, queueId);
  }

  /** Nodes changed (blockdev-reopen): replicas of them in this thread take the new descriptions. */
  async updateReplicas(nodes: BlockNode[]): Promise<void> {
    const descs = nodes.filter(isReplicable).map(describeNode);
    if (descs.length > 0 && this.queueCount > 0) await this.request({ op: 'update-nodes', nodes: descs });
  }

  /** Stop the thread; every queue must have been stopped before. */
  async stop(): Promise<void> {
    await this.request({ op: 'exit' }).catch(() => undefined);
    const timer = setTimeout(() => void this.worker.terminate(), 2000);
    await this.exited;
    clearTimeout(timer);
  }
}
