// Output filters for iotests: make golden output independent of paths, times, versions and daemon.

/** A text filter: takes one chunk of output, returns it with varying parts replaced. */
export type TextFilter = (text: string) => string;

/** Escapes a string for literal use inside a RegExp. */
function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

/**
 * Replaces the test directory (and its resolved form, if different) with `TEST_DIR`.
 * Longest path first, so a realpath containing the other does not leave a remainder.
 */
export function makeTestDirFilter(...dirs: string[]): TextFilter {
  const uniq = [...new Set(dirs.filter((d) => d.length > 1))].sort((a, b) => b.length - a.length);
  const re = uniq.length ? new RegExp(uniq.map(escapeRegExp).join('|'), 'g') : null;
  return (text) => (re ? text.replace(re, 'TEST_DIR') : text);
}

/**
 * QMP event timestamps `{"seconds": N, "microseconds": N}` (compact or pretty) → `"TIMESTAMP"`.
 * Only the value is replaced, so `"timestamp": "TIMESTAMP"` stays valid JSON.
 */
export const filterTimestamp: TextFilter = (text) =>
  text.replace(
    /\{\s*"(?:seconds|microseconds)":\s*-?\d+,\s*"(?:seconds|microseconds)":\s*-?\d+\s*\}/g, '"TIMESTAMP"');

/**
 * Version details: the QMP `{"micro": N, "minor": N, "major": N}` triple (any key order),
 * the `"package"` string, and `version X.Y.Z (anything)` in --version output.
 */
export const filterVersion: TextFilter = (text) =>
  text
    .replace(
      /\{(\s*)"(micro|minor|major)":\s*\d+,(\s*)"(micro|minor|major)":\s*\d+,(\s*)"(micro|minor|major)":\s*\d+(\s*)\}/g,
      (_m, s1: string, k1: string, s2: string, k2: string, s3: string, k3: string, s4: string) =>
        `{${s1}"${k1}": "N",${s2}"${k2}": "N",${s3}"${k3}": "N"${s4}}`,
    )
    .replace(/"package":\s*"(?:[^"\\]|\\.)*"/g, '"package": "PACKAGE"')
    .replace(/\bversion \d+\.\d+\.\d+(?:[-+.~\w]*)?(?: \([^)\n]*\))?/g, 'version VERSION');

/**
 * The program name, with or without a leading path: `/usr/bin/qemu-storage-daemon: x` and
 * `qsd-ts: x` both become `QSD: x`; `Usage: qemu-storage-daemon` becomes `Usage: QSD`.
 */
export const filterProgram: TextFilter = (text) =>
  text.replace(/(?:[\w./-]*\/)?(?:qemu-storage-daemon|qsd-ts)(?![\w-])/g, 'QSD');

/** QEMU's automatically generated node names: `#block123` → `#blockNNN`. */
export const filterNodeNames: TextFilter = (text) => text.replace(/#block\d+/g, '#blockNNN');

/** Replaces one known number (a PID, a port) wherever it appears as a whole word. */
export function makeNumberFilter(value: number, replacement: string): TextFilter {
  const re = new RegExp(`(?<![\\w.])${value}(?![\\w.])`, 'g');
  return (text) => text.replace(re, replacement);
}

/** TCP ports in `host:port`, `port=N` and `"port": "N"` forms → `PORT`. */
export const filterPorts: TextFilter = (text) =>
  text
    .replace(/("port":\s*)"?\d+"?/g, '$1"PORT"')
    .replace(/\bport=\d+/g, 'port=PORT')
    .replace(/((?:localhost|127\.0\.0\.1|\[::1?\]|::1?)):\d+\b/g, '$1:PORT');

/** Transfer rates and elapsed times as printed by qemu-io and dd. */
export const filterRates: TextFilter = (text) =>
  text
    .replace(/[\d.]+ [KMGT]?i?B\/s?ec\b|[\d.]+ [KMGT]?i?B\/s\b/g, 'X bytes/sec')
    .replace(/[\d.]+ (?:ops\/sec|s(?:ec)?)\b/g, 'X ops/sec')
    .replace(/\d+\.\d+(?:e[-+]\d+)? s,/g, 'X s,');

/** Applies filters left to right. */
export function chain(...filters: TextFilter[]): TextFilter {
  return (text) => filters.reduce((t, f) => f(t), text);
}

/**
 * Serializes like Python's `json.dumps` (QEMU's iotests format): `", "` and `": "` separators,
 * non-ASCII escaped, optional recursive key sorting, optional indentation.
 */
export function dumpJson(value: unknown, opts: { sortKeys?: boolean; indent?: number } = {}): string {
  const { sortKeys = false, indent } = opts;
  const str = (s: string) =>
    JSON.stringify(s).replace(/[\u007f-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
  const walk = (v: unknown, depth: number): string => {
    if (v === null || v === undefined) return 'null';
    if (typeof v === 'string') return str(v);
    if (typeof v === 'number') return Number.isFinite(v) ? String(v) : 'null';
    if (typeof v === 'boolean') return v ? 'true' : 'false';
    const nl = indent === undefined ? '' : '\n' + ' '.repeat(indent * (depth + 1));
    const end = indent === undefined ? '' : '\n' + ' '.repeat(indent * depth);
    const sep = indent === undefined ? ', ' : ',';
    if (Array.isArray(v)) {
      if (v.length === 0) return '[]';
      return '[' + v.map((x) => nl + walk(x, depth + 1)).join(sep) + end + ']';
    }
    const keys = Object.keys(v as object);
    if (sortKeys) keys.sort();
    if (keys.length === 0) return '{}';
    const rec = v as Record<string, unknown>;
    return '{' + keys.map((k) => nl + str(k) + ': ' + walk(rec[k], depth + 1)).join(sep) + end + '}';
  };
  return walk(value, 0);
}

/**
 * Rewrites QEMU's `json:{…}` pseudo-filenames (in any string of a QMP value) with their keys
 * sorted, so the golden output does not depend on the order a daemon builds them in.
 */
export function normalizeJsonFilenames<T>(value: T): T {
  const walk = (v: unknown): unknown => {
    if (typeof v === 'string' && v.startsWith('json:{')) {
      try { return 'json:' + dumpJson(JSON.parse(v.slice(5)), { sortKeys: true }); } catch { return v; }
    }
    if (Array.isArray(v)) return v.map(walk);
    if (v && typeof v === 'object') {
      return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, walk(x)]));
    }
    return v;
  };
  return walk(value) as T;
}
