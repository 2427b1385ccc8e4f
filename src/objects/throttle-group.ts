// The 'throttle-group' object (QEMU's block/throttle-groups.c + util/throttle.c): leaky buckets
// shared by every throttle node of the group; requests wait in FIFO order per direction.
import { genericError } from '../qapi/errors.js';
import type { UserObject } from './user-object.js';

/** QEMU's THROTTLE_VALUE_MAX. */
const VALUE_MAX = 1000000000000000;
const UINT_MAX = 4294967295;

/** Bucket order of QEMU's BucketType. */
const BUCKETS = ['bps-total', 'bps-read', 'bps-write', 'iops-total', 'iops-read', 'iops-write'] as const;
type BucketName = (typeof BUCKETS)[number];
const BPS_TOTAL = 0, BPS_READ = 1, BPS_WRITE = 2, OPS_TOTAL = 3, OPS_READ = 4, OPS_WRITE = 5;

interface LeakyBucket {
  avg: number;
  max: number;
  /** Seconds the max rate may last. */
  burstLength: number;
  level: number;
  burstLevel: number;
}

interface ThrottleConfig {
  buckets: LeakyBucket[];
  opSize: number;
}

function newConfig(): ThrottleConfig {
  return { buckets: BUCKETS.map(() => ({ avg: 0, max: 0, burstLength: 1, level: 0, burstLevel: 0 })), opSize: 0 };
}

function copyConfig(cfg: ThrottleConfig): ThrottleConfig {
  return { buckets: cfg.buckets.map((b) => ({ ...b })), opSize: cfg.opSize };
}

/**
 * An int as QEMU's uint64_t bucket fields see it (negative values wrap to huge ones). Fields keep
 * the signed value, which is what reading them back as ThrottleLimits (int64) shows.
 */
const u64 = (v: number): number => (v < 0 ? 2 ** 64 + v : v);

/** QEMU's throttle_is_valid(), same checks in the same order. */
function checkConfig(cfg: ThrottleConfig): void {
  const b = cfg.buckets;
  const conflict = (t: number, r: number, w: number, key: 'avg' | 'max') => b[t][key] && (b[r][key] || b[w][key]);
  if (conflict(BPS_TOTAL, BPS_READ, BPS_WRITE, 'avg') || conflict(OPS_TOTAL, OPS_READ, OPS_WRITE, 'avg') ||
      conflict(BPS_TOTAL, BPS_READ, BPS_WRITE, 'max') || conflict(OPS_TOTAL, OPS_READ, OPS_WRITE, 'max')) {
    throw genericError('bps/iops/max total values and read/write values cannot be used at the same time');
  }
  if (cfg.opSize && !b[OPS_TOTAL].avg && !b[OPS_READ].avg && !b[OPS_WRITE].avg) {
    throw genericError('iops size requires an iops value to be set');
  }
  for (const bkt of b) {
    const avg = u64(bkt.avg);
    const max = u64(bkt.max);
    if (avg > VALUE_MAX || max > VALUE_MAX) {
      throw genericError(`bps/iops/max values must be within [0, ${VALUE_MAX}]`);
    }
    if (!bkt.burstLength) throw genericError('the burst length cannot be 0');
    if (bkt.burstLength > 1 && !max) throw genericError('burst length set without burst rate');
    if (max && bkt.burstLength > Math.floor(VALUE_MAX / max)) throw genericError('burst length too high for this burst rate');
    if (max && !avg) throw genericError('bps_max/iops_max require corresponding bps/iops values');
    if (max && max < avg) throw genericError('bps_max/iops_max cannot be lower than bps/iops');
  }
}

/** QEMU's throttle_limits_to_config(): the members given override the current ones. */
function applyLimits(limits: Record<string, number>, cfg: ThrottleConfig): void {
  BUCKETS.forEach((name, i) => {
    if (limits[name] !== undefined) cfg.buckets[i].avg = limits[name];
    if (limits[`${name}-max`] !== undefined) cfg.buckets[i].max = limits[`${name}-max`];
  });
  BUCKETS.forEach((name, i) => {
    const length = limits[`${name}-max-length`];
    if (length === undefined) return;
    if (length > UINT_MAX) throw genericError(`${name}-max-length value must be in the range [0, ${UINT_MAX}]`);
    cfg.buckets[i].burstLength = length >>> 0;
  });
  if (limits['iops-size'] !== undefined) cfg.opSize = limits['iops-size'];
}

/** QEMU's throttle_config_to_limits(). */
function configToLimits(cfg: ThrottleConfig): Record<string, number> {
  const out: Record<string, number> = {};
  BUCKETS.forEach((name, i) => {
    out[name] = cfg.buckets[i].avg;
    out[`${name}-max`] = cfg.buckets[i].max;
    out[`${name}-max-length`] = cfg.buckets[i].burstLength;
  });
  out['iops-size'] = cfg.opSize;
  return out;
}

/** The legacy x-* properties: bucket and field each one sets. */
function legacyProperty(name: string): { bucket: number; field: 'avg' | 'max' | 'burstLength' } | 'iops-size' | undefined {
  if (!name.startsWith('x-')) return undefined;
  const rest = name.slice(2);
  if (rest === 'iops-size') return 'iops-size';
  const m = /^((?:bps|iops)-(?:total|read|write))(-max)?(-length)?$/.exec(rest);
  if (!m || (m[3] && !m[2])) return undefined;
  const bucket = BUCKETS.indexOf(m[1] as BucketName);
  return { bucket, field: m[3] ? 'burstLength' : m[2] ? 'max' : 'avg' };
}

/** Throttle groups by name: QEMU keeps one process-wide list that throttle nodes look up. */
const groups = new Map<string, ThrottleGroup>();

/** QEMU's throttle_group_exists() + ref: the group a throttle node joins. */
export function findThrottleGroup(name: string): ThrottleGroup | undefined {
  return groups.get(name);
}

const NS_PER_S = 1e9;

export class ThrottleGroup implements UserObject {
  readonly qomType = 'throttle-group';
  private cfg = newConfig();
  private initialized = false;
  /** Throttle nodes using the group (object-del refuses while any). */
  members = 0;
  private previousLeak = 0;
  /** Requests waiting for their turn, per direction (0 read, 1 write). */
  private readonly queues: Array<Array<() => void>> = [[], []];
  private readonly timers: Array<NodeJS.Timeout | undefined> = [undefined, undefined];

  constructor(readonly id: string) {}

  /** object-add: one property, as QEMU sets them in QDict order before completion. */
  initProperty(name: string, value: number | Record<string, number>): void {
    if (name === 'limits') {
      this.setLimits(value as Record<string, number>);
      return;
    }
    this.setLegacy(name, value as number);
  }

  /** object-add's completion (throttle_group_obj_complete). */
  complete(): void {
    checkConfig(this.cfg);
    this.initialized = true;
    this.previousLeak = now();
    groups.set(this.id, this);
  }

  getProperty(name: string): unknown {
    if (name === 'limits') return configToLimits(this.cfg);
    const legacy = legacyProperty(name);
    if (legacy === undefined) return undefined;
    if (legacy === 'iops-size') return this.cfg.opSize;
    return this.cfg.buckets[legacy.bucket][legacy.field];
  }

  setProperty(name: string, value: unknown): boolean {
    if (name === 'limits') {
      if (typeof value !== 'object' || value === null || Array.isArray(value)) {
        throw genericError("Invalid parameter type for 'limits', expected: object");
      }
      for (const [key, v] of Object.entries(value)) {
        if (!BUCKETS.some((b) => key === b || key === `${b}-max` || key === `${b}-max-length`) && key !== 'iops-size') {
          throw genericError(`Parameter 'limits.${key}' is unexpected`);
        }
        if (typeof v !== 'number' || !Number.isSafeInteger(v)) {
          throw genericError(`Invalid parameter type for 'limits.${key}', expected: integer`);
        }
      }
      this.setLimits(value as Record<string, number>);
      return true;
    }
    if (legacyProperty(name) === undefined) return false;
    if (typeof value !== 'number' || !Number.isSafeInteger(value)) {
      throw genericError(`Invalid parameter type for '${name}', expected: integer`);
    }
    this.setLegacy(name, value);
    return true;
  }

  inUse(): boolean {
    return this.members > 0;
  }

  delete(): void {
    groups.delete(this.id);
    for (const t of this.timers) if (t) clearTimeout(t);
  }

  /** QEMU's throttle_group_set_limits(): applied to a copy, kept only if valid. */
  private setLimits(limits: Record<string, number>): void {
    const cfg = copyConfig(this.cfg);
    applyLimits(limits, cfg);
    checkConfig(cfg);
    this.cfg = cfg;
    this.kick();
  }

  /** QEMU's throttle_group_set(): the x-* properties work only before completion. */
  private setLegacy(name: string, value: number): void {
    if (this.initialized) throw genericError('Property cannot be set after initialization');
    if (value < 0) throw genericError('Property values cannot be negative');
    const legacy = legacyProperty(name)!;
    if (legacy === 'iops-size') {
      this.cfg.opSize = value;
    } else if (legacy.field === 'burstLength') {
      // QEMU's message lacks the space here (throttle_group_set), unlike throttle_limits_to_config's.
      if (value > UINT_MAX) throw genericError(`${name} value must be in therange [0, ${UINT_MAX}]`);
      this.cfg.buckets[legacy.bucket].burstLength = value;
    } else {
      this.cfg.buckets[legacy.bucket][legacy.field] = value;
    }
  }

  /**
   * Wait until a request of `bytes` may go (throttle_group_co_io_limits_intercept), then account
   * it. Unthrottled or not over the limit and nobody queued: resolves at once, allocating nothing.
   */
  intercept(isWrite: boolean, bytes: number): Promise<void> | undefined {
    const dir = isWrite ? 1 : 0;
    if (this.queues[dir].length === 0 && this.computeWait(isWrite) === 0) {
      this.account(isWrite, bytes);
      return undefined;
    }
    return new Promise<void>((resolve) => {
      this.queues[dir].push(() => {
        this.account(isWrite, bytes);
        resolve();
      });
      this.schedule(dir);
    });
  }

  /** Arm the direction's timer for its head request (throttle_group_schedule_timer). */
  private schedule(dir: number): void {
    if (this.timers[dir] || this.queues[dir].length === 0) return;
    const waitNs = this.computeWait(dir === 1);
    if (waitNs === 0) {
      this.queues[dir].shift()!();
      // The next waiter goes on a fresh turn, as QEMU restarts the next request from the queue.
      if (this.queues[dir].length > 0) this.timers[dir] = setTimeout(() => this.fire(dir), 0);
      return;
    }
    this.timers[dir] = setTimeout(() => this.fire(dir), Math.ceil(waitNs / 1e6));
  }

  private fire(dir: number): void {
    this.timers[dir] = undefined;
    this.schedule(dir);
  }

  /** New limits: queued requests re-check at once (QEMU restarts the queues on a config change). */
  private kick(): void {
    for (const dir of [0, 1]) {
      const t = this.timers[dir];
      if (t) {
        clearTimeout(t);
        this.timers[dir] = undefined;
      }
      this.schedule(dir);
    }
  }

  /** throttle_do_leak(): drain every bucket for the time since the last leak. */
  private leak(): void {
    const t = now();
    const delta = t - this.previousLeak;
    this.previousLeak = t;
    if (delta <= 0) return;
    for (const bkt of this.cfg.buckets) {
      bkt.level = Math.max(bkt.level - (bkt.avg * delta) / NS_PER_S, 0);
      if (bkt.burstLength > 1) bkt.burstLevel = Math.max(bkt.burstLevel - (bkt.max * delta) / NS_PER_S, 0);
    }
  }

  /** throttle_compute_wait_for(): the longest wait of the total and per-direction buckets, in ns. */
  private computeWait(isWrite: boolean): number {
    this.leak();
    const idx = isWrite ? [BPS_TOTAL, BPS_WRITE, OPS_TOTAL, OPS_WRITE] : [BPS_TOTAL, BPS_READ, OPS_TOTAL, OPS_READ];
    let max = 0;
    for (const i of idx) max = Math.max(max, bucketWait(this.cfg.buckets[i]));
    return max;
  }

  /** throttle_account(): an I/O of `bytes`, counting as bytes / iops-size operations if larger. */
  private account(isWrite: boolean, bytes: number): void {
    const opSize = u64(this.cfg.opSize);
    const units = opSize && bytes > opSize ? bytes / opSize : 1;
    const b = this.cfg.buckets;
    const add = (i: number, amount: number) => {
      b[i].level += amount;
      if (b[i].burstLength > 1) b[i].burstLevel += amount;
    };
    add(BPS_TOTAL, bytes);
    add(isWrite ? BPS_WRITE : BPS_READ, bytes);
    add(OPS_TOTAL, units);
    add(isWrite ? OPS_WRITE : OPS_READ, units);
  }
}

function now(): number {
  return Number(process.hrtime.bigint());
}

/** throttle_compute_wait(): ns until the bucket has room (0 = go now). */
function bucketWait(bkt: LeakyBucket): number {
  if (!bkt.avg) return 0;
  let bucketSize: number;
  let burstBucketSize: number;
  if (!bkt.max) {
    // Without a burst rate QEMU still allows a tenth of a second's worth at once.
    bucketSize = bkt.avg / 10;
    burstBucketSize = 0;
  } else {
    bucketSize = bkt.max * bkt.burstLength;
    burstBucketSize = bkt.max / 10;
  }
  let extra = bkt.level - bucketSize;
  if (extra > 0) return Math.trunc((extra * NS_PER_S) / bkt.avg);
  if (bkt.burstLength > 1) {
    extra = bkt.burstLevel - burstBucketSize;
    if (extra > 0) return Math.trunc((extra * NS_PER_S) / bkt.max);
  }
  return 0;
}
