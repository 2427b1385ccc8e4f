// The main loop as a context: queues started here run in the main thread on the graph's nodes.
import type { BlockNode } from '../block/node.js';
import type { IoContext, LocalQueue, QueueHandle } from './context.js';
import { queueServers } from './queue-servers.js';

class LocalQueueHandle implements QueueHandle {
  constructor(readonly context: IoContext, private readonly queue: LocalQueue) {}
  drainBegin(): Promise<void> {
    return this.queue.drainBegin();
  }
  async drainEnd(): Promise<void> {
    this.queue.drainEnd();
  }
  stop(): Promise<void> {
    return this.queue.stop();
  }
  async stats() {
    return this.queue.stats();
  }
}

export class MainContext implements IoContext {
  readonly name = 'main';
  readonly iothreadId = undefined;

  async startQueue(kind: string, node: BlockNode, params: unknown): Promise<QueueHandle> {
    const factory = queueServers[kind];
    if (!factory) throw new Error(`no queue server of kind '${kind}'`);
    return new LocalQueueHandle(this, await factory(node, params));
  }
}

export const mainContext = new MainContext();
