// Shared/exclusive locks on the blocks of one file, shared by every thread that writes to it.
// QEMU serialises a read-modify-write of a partial block against every other request touching
// that block (tracked requests); here the requests come from several threads, so the lock words
// live in a SharedArrayBuffer and waiting is Atomics.waitAsync (the thread's loop keeps running).

/** Lock words per file: blocks hash onto them, so unrelated blocks rarely share one. */
const STRIPES = 256;
const EXCLUSIVE = -1;

export function createBlockLocks(): SharedArrayBuffer {
  return new SharedArrayBuffer(STRIPES * 4);
}

/** One write's claim: stripe indexes ascending (no deadlock), each shared or exclusive. */
export interface BlockClaim {
  stripes: number[];
  exclusive: boolean[];
}

/**
 * The claim of a write of [offset, offset+length) in blocks of `blockSize`: the partial blocks
 * at its ends exclusive when it is bounced (it rewrites their other bytes), every block shared.
 */
export function claimFor(offset: number, length: number, blockSize: number, bounced: boolean): BlockClaim {
  const first = Math.floor(offset / blockSize);
  const last = Math.floor((offset + Math.max(length, 1) - 1) / blockSize);
  const modes = new Map<number, boolean>();
  const add = (block: number, exclusive: boolean) => {
    const stripe = block % STRIPES;
    modes.set(stripe, (modes.get(stripe) ?? false) || exclusive);
  };
  // More blocks than stripes: every stripe is involved.
  for (let b = first; b <= last && b - first < STRIPES; b++) add(b, false);
  if (bounced) {
    if (offset % blockSize !== 0) add(first, true);
    if ((offset + length) % blockSize !== 0) add(last, true);
  }
  const stripes = [...modes.keys()].sort((a, b) => a - b);
  return { stripes, exclusive: stripes.map((s) => modes.get(s)!) };
}

async function lockOne(words: Int32Array, stripe: number, exclusive: boolean): Promise<void> {
  for (;;) {
    const v = Atomics.load(words, stripe);
    if (exclusive ? v === 0 : v >= 0) {
      if (Atomics.compareExchange(words, stripe, v, exclusive ? EXCLUSIVE : v + 1) === v) return;
      continue;
    }
    const wait = Atomics.waitAsync(words, stripe, v);
    if (wait.async) await wait.value;
  }
}

function unlockOne(words: Int32Array, stripe: number, exclusive: boolean): void {
  if (exclusive) {
    Atomics.store(words, stripe, 0);
    Atomics.notify(words, stripe);
  } else if (Atomics.sub(words, stripe, 1) === 1) {
    Atomics.notify(words, stripe);
  }
}

/** Run fn holding the claim; always releases it. */
export async function withBlockLocks<T>(words: Int32Array, claim: BlockClaim, fn: () => Promise<T>): Promise<T> {
  let held = 0;
  try {
    for (; held < claim.stripes.length; held++) await lockOne(words, claim.stripes[held], claim.exclusive[held]);
    return await fn();
  } finally {
    for (let i = held - 1; i >= 0; i--) unlockOne(words, claim.stripes[i], claim.exclusive[i]);
  }
}
