// Member order of QEMU's QMP output: QEMU stores objects in a hash table (QDict) and prints them
// bucket by bucket, so scripts and golden outputs written against QEMU see that order.

const QDICT_BUCKET_MAX = 512;

/** QEMU's qdict tdb_hash over the UTF-8 bytes of a key (32-bit unsigned arithmetic). */
function tdbHash(name: string): number {
  const bytes = Buffer.from(name, 'utf8');
  let value = Math.imul(0x238f13af, bytes.length) >>> 0;
  for (let i = 0; i < bytes.length; i++) value = (value + ((bytes[i] << ((i * 5) % 24)) >>> 0)) >>> 0;
  return (Math.imul(1103515243, value) + 12345) >>> 0;
}

const bucketCache = new Map<string, number>();

function bucketOf(key: string): number {
  let bucket = bucketCache.get(key);
  if (bucket === undefined) {
    bucket = tdbHash(key) % QDICT_BUCKET_MAX;
    if (bucketCache.size < 4096) bucketCache.set(key, bucket);
  }
  return bucket;
}

/**
 * A copy of value whose objects list their members in QDict order: ascending bucket, and within a
 * bucket the member inserted last first (QEMU inserts at the head of the bucket's list). The
 * input's own member order is taken as QEMU's insertion order (schema order).
 */
export function qdictOrder(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(qdictOrder);
  if (value === null || typeof value !== 'object' || Buffer.isBuffer(value)) return value;
  const keys = Object.keys(value);
  const ranked = keys.map((key, index) => ({ key, index, bucket: bucketOf(key) }));
  ranked.sort((a, b) => a.bucket - b.bucket || b.index - a.index);
  const out: Record<string, unknown> = {};
  for (const { key } of ranked) {
    const member = (value as Record<string, unknown>)[key];
    if (member !== undefined) out[key] = qdictOrder(member);
  }
  return out;
}
