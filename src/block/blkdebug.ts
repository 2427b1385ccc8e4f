// blkdebug: a filter that injects I/O errors into requests to its 'image' child (QEMU's block/blkdebug.c).
//
// Semantics follow QEMU: a rule belongs to a debug event (read_aio, write_aio, flush_to_disk, …)
// that the node ABOVE blkdebug raises on it (raw raises read_aio/write_aio around its data I/O, the
// generic flush raises flush_to_os/flush_to_disk). When an event fires, the inject-error rules of
// that event (whose `state` matches) become the node's active rules, replacing the previous set; a
// request then fails with the first active rule that covers its offset and I/O type. So an export
// directly on a blkdebug node sees no error until something above has raised the event, exactly as
// with QEMU's daemon.
import { readFileSync } from 'node:fs';
import { constants as osConstants } from 'node:os';
import type { BlockDriver, BlockStatus, WriteFlags, ZeroFlags } from './driver.js';
import { BlockIoError, type BlockNode } from './node.js';
import { genericError } from '../qapi/errors.js';
import { strerror } from '../util/errno.js';
import { schemaData } from '../qapi/generated/schema-data.js';

/** The BlkdebugEvent enum, for config files (options were already checked by the schema). */
const BLKDEBUG_EVENTS: ReadonlySet<string> = new Set((schemaData.types.BlkdebugEvent as { values: string[] }).values);

const { EIO } = osConstants.errno;
const SECTOR_SIZE = 512;
const INT_MAX = 0x7fffffff;

/** BlkdebugIOType, as bits of a rule's I/O type mask. */
const IO_TYPES = ['read', 'write', 'write-zeroes', 'discard', 'flush', 'block-status'] as const;
type IoType = (typeof IO_TYPES)[number];
const IO_READ = 1 << 0;
const IO_WRITE = 1 << 1;
const IO_WRITE_ZEROES = 1 << 2;
const IO_DISCARD = 1 << 3;
const IO_FLUSH = 1 << 4;
const IO_BLOCK_STATUS = 1 << 5;
const IO_ALL = (1 << IO_TYPES.length) - 1;

/** One inject-error rule (BlkdebugInjectErrorOptions, normalised). */
interface InjectRule {
  event: string;
  /** Required state, 0 = any. */
  state: number;
  errno: number;
  /** Byte offset that a request must cover, or -1 for any request. */
  offset: number;
  once: boolean;
  immediately: boolean;
  iotypeMask: number;
}

/** One set-state rule. */
interface SetStateRule {
  event: string;
  state: number;
  newState: number;
}

/** What open() computed; structured-cloneable, so replicas start from the same rules. */
interface BlkdebugDescription {
  align: number;
  maxTransfer: number;
  inject: InjectRule[];
  setState: SetStateRule[];
}

interface BlkdebugState extends BlkdebugDescription {
  image: BlockNode;
  /**
   * Inject rules per event, in QEMU's list order (newest first). `once` rules are removed here when
   * they trigger. Each context (main thread, every iothread replica) has its own copy: `once` and
   * the set-state machine are per thread, as a replica cannot see another thread's triggers.
   */
  rulesByEvent: Map<string, InjectRule[]>;
  setStateByEvent: Map<string, SetStateRule[]>;
  /** The rules of the last event that had any (QEMU's active_rules), first match wins. */
  active: InjectRule[];
  /** The set-state machine's current state; QEMU starts at 1. */
  current: number;
  /** Writes since the last successful flush: an idle flush does not reach the driver (bdrv_co_flush). */
  writeGen: number;
  flushedGen: number;
}

function isPowerOf2(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0;
}

function normalise(options: Record<string, any>, image: BlockNode): BlkdebugDescription {
  // QEMU's order and messages (blkdebug_open).
  const align = Number(options.align ?? 0);
  if (align && (align < 0 || align >= INT_MAX || !isPowerOf2(align))) {
    throw genericError(`Cannot meet constraints with align ${BigInt.asUintN(64, BigInt(align))}`);
  }
  const effectiveAlign = Math.max(align, image.requestAlignment());
  const maxTransfer = Number(options['max-transfer'] ?? 0);
  if (maxTransfer && (maxTransfer < 0 || maxTransfer >= INT_MAX || maxTransfer % effectiveAlign !== 0)) {
    throw genericError(`Cannot meet constraints with max-transfer ${BigInt.asUintN(64, BigInt(maxTransfer))}`);
  }
  const inject: InjectRule[] = (options['inject-error'] ?? []).map((r: Record<string, any>) => {
    const sector = Number(r.sector ?? -1);
    return {
      event: r.event,
      state: Number(r.state ?? 0),
      errno: Number(r.errno ?? EIO),
      offset: sector === -1 ? -1 : sector * SECTOR_SIZE,
      once: r.once ?? false,
      immediately: r.immediately ?? false,
      iotypeMask: r.iotype === undefined ? IO_ALL : 1 << IO_TYPES.indexOf(r.iotype as IoType),
    };
  });
  const setState: SetStateRule[] = (options['set-state'] ?? []).map((r: Record<string, any>) => ({
    event: r.event, state: Number(r.state ?? 0), newState: Number(r.new_state),
  }));
  return { align: effectiveAlign, maxTransfer, inject, setState };
}

/**
 * A blkdebug config file (QemuOpts' INI dialect): `[inject-error]` and `[set-state]` sections of
 * `key = "value"` lines, read before the rules given as options.
 */
function readConfig(filename: string): Record<'inject-error' | 'set-state', Record<string, unknown>[]> {
  let text: string;
  try {
    text = readFileSync(filename, 'utf8');
  } catch (err) {
    throw genericError(`Could not read blkdebug config file: ${strerror(err)}`);
  }
  const out: Record<'inject-error' | 'set-state', Record<string, unknown>[]> = { 'inject-error': [], 'set-state': [] };
  let section: Record<string, unknown> | undefined;
  for (const [i, raw] of text.split('\n').entries()) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) continue;
    const group = /^\[([a-z-]+)(?:\s+"[^"]*")?\]$/.exec(line);
    if (group) {
      section = undefined;
      if (group[1] === 'inject-error' || group[1] === 'set-state') out[group[1]].push((section = {}));
      continue;
    }
    const kv = /^([a-z_-]+)\s*=\s*"([^"]*)"$/.exec(line);
    if (!kv) throw genericError(`${filename}:${i + 1}: parse error`);
    if (!section) continue;
    const [, key, value] = kv;
    if (key === 'event' || key === 'iotype') {
      if (key === 'event' && !BLKDEBUG_EVENTS.has(value)) throw genericError(`Invalid event name "${value}"`);
      section[key] = value;
    } else if (key === 'once' || key === 'immediately') {
      section[key] = value === 'on' || value === 'yes' || value === 'true';
    } else {
      section[key] = Number(value);
    }
  }
  return out;
}

function makeState(image: BlockNode, desc: BlkdebugDescription): BlkdebugState {
  const rulesByEvent = new Map<string, InjectRule[]>();
  // QEMU inserts each rule at the head of its event's list.
  for (const rule of desc.inject) {
    const list = rulesByEvent.get(rule.event) ?? [];
    list.unshift({ ...rule });
    rulesByEvent.set(rule.event, list);
  }
  const setStateByEvent = new Map<string, SetStateRule[]>();
  for (const rule of desc.setState) {
    const list = setStateByEvent.get(rule.event) ?? [];
    list.unshift(rule);
    setStateByEvent.set(rule.event, list);
  }
  return { ...desc, image, rulesByEvent, setStateByEvent, active: [], current: 1, writeGen: 0, flushedGen: 0 };
}

function imageOf(node: BlockNode): BlockNode {
  const image = node.file;
  if (!image) throw genericError("Parameter 'image' is missing");
  return image;
}

/** QEMU's blkdebug_debug_event: activate this event's inject rules, run its set-state rules. */
function debugEvent(s: BlkdebugState, event: string): void {
  const inject = s.rulesByEvent.get(event);
  const setState = s.setStateByEvent.get(event);
  if (!inject && !setState) return;
  let newState = s.current;
  let injected = 0;
  if (inject) {
    for (const rule of inject) {
      if (rule.state && rule.state !== s.current) continue;
      // The first inject rule of an event replaces the active set; each is inserted at its head.
      if (injected++ === 0) s.active = [];
      s.active.unshift(rule);
    }
  }
  if (setState) {
    for (const rule of setState) {
      if (rule.state && rule.state !== s.current) continue;
      newState = rule.newState;
    }
  }
  s.current = newState;
}

/** QEMU's rule_check: the rule a request fails with, if any; a `once` rule disappears here. */
function ruleCheck(s: BlkdebugState, offset: number, bytes: number, ioType: number): InjectRule | undefined {
  const active = s.active;
  if (active.length === 0) return undefined;
  let found: InjectRule | undefined;
  for (const rule of active) {
    const o = rule.offset;
    if ((o === -1 || (bytes > 0 && o >= offset && o < offset + bytes)) && (rule.iotypeMask & ioType) !== 0) {
      found = rule;
      break;
    }
  }
  if (!found || !found.errno) return undefined;
  if (found.once) {
    s.active = active.filter((r) => r !== found);
    const list = s.rulesByEvent.get(found.event);
    if (list) s.rulesByEvent.set(found.event, list.filter((r) => r !== found));
  }
  return found;
}

/** Fail a request as QEMU does: after one trip through the event loop unless `immediately`. */
async function check(s: BlkdebugState, offset: number, bytes: number, ioType: number): Promise<void> {
  if (s.active.length === 0) return;
  const rule = ruleCheck(s, offset, bytes, ioType);
  if (!rule) return;
  if (!rule.immediately) await new Promise<void>((resolve) => setImmediate(resolve));
  throw new BlockIoError(rule.errno, `blkdebug: injected error (errno ${rule.errno})`);
}

/**
 * The block layer widens requests to the node's alignment and splits them at max-transfer before a
 * driver sees them; blkdebug checks its rules per resulting request, so do the same here.
 */
async function eachChunk(
  s: BlkdebugState, offset: number, bytes: number, ioType: number,
  io: (offset: number, bytes: number) => Promise<void>,
): Promise<void> {
  const max = s.maxTransfer || bytes;
  for (let done = 0; done < bytes;) {
    const n = Math.min(max, bytes - done);
    await check(s, offset + done, n, ioType);
    await io(offset + done, n);
    done += n;
  }
}

function alignedRange(s: BlkdebugState, offset: number, bytes: number): [start: number, end: number] {
  const a = s.align;
  return [offset - (offset % a), Math.ceil((offset + bytes) / a) * a];
}

async function readAligned(s: BlkdebugState, offset: number, buf: Buffer): Promise<void> {
  await eachChunk(s, offset, buf.length, IO_READ, (o, n) => s.image.read(o, buf.subarray(o - offset, o - offset + n)));
}

export const blkdebugDriver: BlockDriver<BlkdebugState> = {
  name: 'blkdebug',
  isFilter: true,
  isProtocol: false,
  childOption: 'image',
  async open(node, options) {
    const image = imageOf(node);
    const fromConfig = options.config === undefined ? undefined : readConfig(options.config);
    return makeState(image, normalise({
      ...options,
      'inject-error': [...(fromConfig?.['inject-error'] ?? []), ...(options['inject-error'] ?? [])],
      'set-state': [...(fromConfig?.['set-state'] ?? []), ...(options['set-state'] ?? [])],
    }, image));
  },
  async close() {},
  describe: (s): BlkdebugDescription => ({ align: s.align, maxTransfer: s.maxTransfer, inject: s.inject, setState: s.setState }),
  openReplica: (node, description) => makeState(imageOf(node), description as BlkdebugDescription),
  closeReplica() {},
  debugEvent,
  getLength: (s) => s.image.getLength(),
  // QEMU's blkdebug is a protocol driver without its own allocated size: actual-size is absent.
  getAllocatedFileSize: async () => NaN,
  requestAlignment: (s) => s.align,
  optimalTransfer: (s) => s.image.optimalTransfer(),

  async read(s, offset, buf) {
    const [start, end] = alignedRange(s, offset, buf.length);
    if (start === offset && end === offset + buf.length) return readAligned(s, offset, buf);
    // Rare: an unaligned request is widened through a bounce buffer, as the block layer would.
    const bounce = Buffer.allocUnsafe(end - start);
    await readAligned(s, start, bounce);
    bounce.copy(buf, 0, offset - start, offset - start + buf.length);
  },

  async write(s, offset, buf, flags: WriteFlags) {
    s.writeGen++;
    const [start, end] = alignedRange(s, offset, buf.length);
    let data = buf;
    if (start !== offset || end !== offset + buf.length) {
      // Read-modify-write of the partial blocks at both ends (bdrv_co_pwritev's padding).
      data = Buffer.allocUnsafe(end - start);
      await readAligned(s, start, data);
      buf.copy(data, offset - start);
    }
    await eachChunk(s, start, data.length, IO_WRITE, (o, n) => s.image.write(o, data.subarray(o - start, o - start + n), flags));
  },

  async writeZeroes(s, offset, bytes, flags: ZeroFlags) {
    s.writeGen++;
    await check(s, offset, bytes, IO_WRITE_ZEROES);
    return s.image.writeZeroes(offset, bytes, flags);
  },

  async discard(s, offset, bytes) {
    s.writeGen++;
    await check(s, offset, bytes, IO_DISCARD);
    return s.image.discard(offset, bytes);
  },

  async flush(s) {
    // bdrv_co_flush skips a node with nothing written since its last successful flush.
    const gen = s.writeGen;
    if (gen === s.flushedGen) return s.image.flush();
    await check(s, 0, 0, IO_FLUSH);
    await s.image.flush();
    s.flushedGen = gen;
  },

  async truncate(s, size, exact, prealloc) {
    s.writeGen++;
    return s.image.truncate(size, exact, prealloc);
  },

  async blockStatus(s, offset, bytes): Promise<BlockStatus> {
    await check(s, offset, bytes, IO_BLOCK_STATUS);
    return s.image.blockStatus(offset, bytes);
  },

  refreshLength: (s) => s.image.driver.refreshLength?.(s.image.state),
};
