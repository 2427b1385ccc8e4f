// null-co and null-aio: nodes without storage, for benchmarks and tests (QEMU's block/null.c).
import type { BlockDriver, BlockStatus } from './driver.js';
import { genericError } from '../qapi/errors.js';

interface NullState {
  size: number;
  readZeroes: boolean;
  latencyNs: number;
}

function delay(ns: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, Math.ceil(ns / 1e6)));
}

function makeNullDriver(name: 'null-co' | 'null-aio'): BlockDriver<NullState> {
  return {
    name,
    isProtocol: true,
    async open(_node, options) {
      // QEMU 7.2 aborts on a negative size (its size parser takes it as an unsigned string); we
      // refuse it with the message that abort prints, and keep serving.
      if (options.size !== undefined && options.size < 0) {
        throw genericError("Parameter 'size' expects a non-negative number below 2^64");
      }
      // latency-ns is a uint64 that QEMU reads back as int64: -1 (accepted as 2^64-1) is invalid.
      const latency = options['latency-ns'];
      if (latency !== undefined && (latency < 0 || Number(latency) >= 2 ** 63)) throw genericError('latency-ns is invalid');
      // QEMU's defaults: 1 GiB, reads leave the buffer untouched unless read-zeroes.
      return {
        size: Number(options.size ?? 1 << 30),
        readZeroes: options['read-zeroes'] ?? false,
        latencyNs: Number(options['latency-ns'] ?? 0),
      };
    },
    async close() {},
    describe: (state) => ({ ...state }),
    openReplica: (_node, description) => ({ ...(description as NullState) }),
    closeReplica() {},
    getLength: (state) => state.size,
    async read(state, _offset, buf) {
      if (state.latencyNs) await delay(state.latencyNs);
      if (state.readZeroes) buf.fill(0);
    },
    readNow(state, _offset, buf) {
      if (state.latencyNs) return false;
      if (state.readZeroes) buf.fill(0);
      return true;
    },
    writeNow: (state) => !state.latencyNs,
    async write(state) {
      if (state.latencyNs) await delay(state.latencyNs);
    },
    async writeZeroes() {},
    async blockStatus(state, _offset, bytes): Promise<BlockStatus> {
      // QEMU reports OFFSET_VALID (| ZERO with read-zeroes), never DATA.
      return { pnum: bytes, data: false, zero: state.readZeroes, allocated: true, depth: 1 };
    },
  };
}

export const nullCoDriver = makeNullDriver('null-co');
export const nullAioDriver = makeNullDriver('null-aio');
