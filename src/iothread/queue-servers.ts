// Queue-server registry: what a context can host, by kind. Loaded in every context.
import type { QueueServerFactory } from './context.js';
import { startFuseQueue } from '../exports/fuse-queue.js';

export const queueServers: Record<string, QueueServerFactory> = {
  fuse: startFuseQueue,
};
