// An iothread's body: a worker thread whose own event loop hosts export queues and node replicas.
// The main thread talks to it only for control (start/drain/stop), never per request.
import { parentPort, workerData } from 'node:worker_threads';
import { native } from '../native/binding.js';
import type { PollingSettings } from './iothread.js';
import type { LocalQueue } from './context.js';
import { ReplicaSet, type NodeDescription } from './replica.js';
import { queueServers } from './queue-servers.js';
import type { BlockNode } from '../block/node.js';

export type WorkerRequest =
  | { op: 'start-queue'; queueId: number; kind: string; node: NodeDescription; params: unknown }
  | { op: 'drain-begin' | 'drain-end' | 'stop' | 'stats'; queueId: number }
  | { op: 'polling'; polling: PollingSettings }
  | { op: 'update-nodes'; nodes: NodeDescription[] }
  | { op: 'exit' };

export interface WorkerReply {
  reqId: number;
  ok: boolean;
  result?: unknown;
  error?: string;
}

/**
 * Busy-poll this thread's loop before it blocks, as QEMU's iothreads do: a request that arrives
 * within the window is served without the 40-80 µs cross-vCPU wake-up (native/loop_poll.cc).
 */
function applyPolling(p: PollingSettings): void {
  native.setLoopPolling(p.maxNs, p.grow, p.shrink);
}
applyPolling((workerData as { polling: PollingSettings }).polling);

const replicas = new ReplicaSet();
const queues = new Map<number, { queue: LocalQueue; node: BlockNode }>();

function queueOf(queueId: number) {
  const entry = queues.get(queueId);
  if (!entry) throw new Error(`no queue ${queueId} in this iothread`);
  return entry;
}

async function handle(req: WorkerRequest): Promise<unknown> {
  switch (req.op) {
    case 'start-queue': {
      const factory = queueServers[req.kind];
      if (!factory) throw new Error(`no queue server of kind '${req.kind}'`);
      const node = replicas.acquire(req.node);
      try {
        queues.set(req.queueId, { queue: await factory(node, req.params), node });
      } catch (err) {
        replicas.release(node);
        throw err;
      }
      return undefined;
    }
    case 'drain-begin':
      return queueOf(req.queueId).queue.drainBegin();
    case 'drain-end':
      return queueOf(req.queueId).queue.drainEnd();
    case 'stats':
      return queueOf(req.queueId).queue.stats();
    case 'stop': {
      const { queue, node } = queueOf(req.queueId);
      await queue.stop();
      queues.delete(req.queueId);
      replicas.release(node);
      return undefined;
    }
    case 'update-nodes':
      for (const desc of req.nodes) replicas.update(desc);
      return undefined;
    case 'polling':
      applyPolling(req.polling);
      return undefined;
    case 'exit':
      for (const { queue, node } of queues.values()) {
        await queue.stop().catch(() => undefined);
        replicas.release(node);
      }
      queues.clear();
      // Let the loop empty out by itself: closing the port ends the thread once nothing is left.
      setImmediate(() => parentPort!.close());
      return undefined;
  }
}

parentPort!.on('message', (msg: WorkerRequest & { reqId: number }) => {
  handle(msg).then(
    (result) => parentPort!.postMessage({ reqId: msg.reqId, ok: true, result } satisfies WorkerReply),
    (err: unknown) =>
      parentPort!.postMessage({ reqId: msg.reqId, ok: false, error: err instanceof Error ? err.message : String(err) }),
  );
});
