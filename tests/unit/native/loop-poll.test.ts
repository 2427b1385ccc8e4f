// Adaptive loop polling (native/loop_poll.cc): a thread that polls still exits cleanly, and the
// window grows when events come just after it and falls back to 0 when the thread sleeps long.
import assert from 'node:assert/strict';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';

const addon = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../build/Release/qsd_native.node');

/** Run body (plain JS, `native` in scope) in a worker; resolves with what it posts, and its exit code. */
function inWorker(body: string): Promise<{ result: unknown; code: number }> {
  const code = `
    const { parentPort } = require('node:worker_threads');
    const native = require(${JSON.stringify(addon)});
    (async () => { ${body} })().then((r) => parentPort.postMessage(r), (e) => parentPort.postMessage({ error: String(e) }));
  `;
  return new Promise((resolve, reject) => {
    const w = new Worker(code, { eval: true });
    let result: unknown;
    w.on('message', (m) => { result = m; });
    w.on('error', reject);
    w.on('exit', (exitCode) => resolve({ result, code: exitCode }));
  });
}

describe('loop polling', () => {
  it('starts at 0, stays off with poll-max-ns 0, and the thread exits cleanly while polling', async () => {
    const { result, code } = await inWorker(`
      const before = native.loopPollingNs();
      const r1 = native.setLoopPolling(0, 0, 0);
      const off = native.loopPollingNs();
      const r2 = native.setLoopPolling(32768, 0, 0);
      return { before, r1, off, r2, after: native.loopPollingNs() };
    `);
    assert.equal(code, 0);
    assert.deepEqual(result, { before: -1, r1: 0, off: 0, r2: 0, after: 0 });
  });

  it('grows the window while waits are short, and drops it after a long sleep', async () => {
    const { result, code } = await inWorker(`
      native.setLoopPolling(1000000000, 0, 0); // 1 s: every wait below is shorter
      const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
      for (let i = 0; i < 6; i++) await sleep(1);
      const grown = native.loopPollingNs();
      native.setLoopPolling(2000000, 0, 0); // 2 ms: a 20 ms sleep is longer, so polling stops
      await sleep(20);
      await sleep(20);
      return { grown, dropped: native.loopPollingNs() };
    `);
    assert.equal(code, 0);
    const { grown, dropped } = result as { grown: number; dropped: number };
    assert.ok(grown >= 4000 * 2 ** 3, `window after six short waits: ${grown} ns`);
    assert.equal(dropped, 0);
  });
});
