// Test iothread body: serves one FUSE queue in this worker thread over its own replica of a test-file node.
import { parentPort, workerData } from 'node:worker_threads';
import { startFuseQueue, type FuseQueueParams } from '../../../src/exports/fuse-queue.js';
import { openTestNode, testFileDriver } from './fuse-harness.js';

const { image, params } = workerData as { image: string; params: FuseQueueParams };
const node = await openTestNode(image);
const queue = startFuseQueue(node, params);

parentPort!.on('message', async (msg: { op: string; id: number }) => {
  let result: unknown;
  switch (msg.op) {
    case 'drain-begin': result = await queue.drainBegin(); break;
    case 'drain-end': result = queue.drainEnd(); break;
    case 'stats': result = queue.stats(); break;
    case 'stop':
      await queue.stop();
      await testFileDriver.close(node.state);
      parentPort!.postMessage({ id: msg.id });
      parentPort!.close();
      return;
  }
  parentPort!.postMessage({ id: msg.id, result });
});
parentPort!.postMessage({ id: 0 });
