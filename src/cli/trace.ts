// -T/--trace as QEMU 7.2's trace_opt_parse(): QemuOpts syntax, event patterns, events files, a log file.
//
// qsd-ts records no trace events; it behaves like a QEMU built with the nop backend, so scripts
// written for QEMU's daemon get the same listing, warnings, errors and exit codes. Verified on 7.2:
//   -T help | -T ? | -T enable=help        the event names, one a line, exit 0
//   -T foo,help                            "trace options:" and the three options, exit 1
//   -T bogus=1                             <prog>: -T bogus=1: Invalid parameter 'bogus', exit 1
//   -T nope | -T enable=-nope              warning: trace event 'nope' does not exist (patterns with '*' never warn)
//   -T events=<file>                       each line of more than one byte, last byte cut, '#' lines skipped;
//                                          warnings as "<prog>:<file>:<line>: warning: …"; an unreadable file
//                                          is "<prog>:<file>: <strerror>", exit 1
//   -T file=<path>                         the file is created (not truncated); failure: "Error opening logfile …"
import fs from 'node:fs';
import { parseQemuOpts, formatQemuOptsHelp, QemuOptsError, type QemuOptsList, type QemuOptsWarning } from './qemu-opts.js';
import { TRACE_EVENT_NAMES } from './trace-events.js';
import { QmpError } from '../qapi/errors.js';
import { strerror } from '../util/errno.js';

/** qemu_trace_opts: `enable` is the implied option. */
export const TRACE_OPTS: QemuOptsList = {
  name: 'trace',
  impliedKey: 'enable',
  desc: { enable: 'string', events: 'string', file: 'string' },
};

/** What one -T option asks of the daemon. */
export interface TraceOutcome {
  /** Text for stderr (warnings and errors, each line complete with QEMU's prefixes). */
  stderr: string;
  /** Set when the daemon stops here: help (exit 0 or 1, text for stdout) or an error (exit 1). */
  exit?: { code: number; stdout?: string };
}

/** GLib's g_pattern_match_simple: '*' any run, '?' one character. */
function globMatch(pattern: string, name: string): boolean {
  let p = 0;
  let n = 0;
  let star = -1;
  let mark = 0;
  while (n < name.length) {
    if (p < pattern.length && (pattern[p] === '?' || pattern[p] === name[n])) {
      p++;
      n++;
    } else if (p < pattern.length && pattern[p] === '*') {
      star = p++;
      mark = n;
    } else if (star >= 0) {
      p = star + 1;
      n = ++mark;
    } else {
      return false;
    }
  }
  while (p < pattern.length && pattern[p] === '*') p++;
  return p === pattern.length;
}

/** trace_enable_events(): a leading '-' disables; a name (not a '*' pattern) that matches nothing warns. */
function enableEvents(line: string): string | undefined {
  const name = line.startsWith('-') ? line.slice(1) : line;
  if (name.includes('*')) return undefined;
  if (TRACE_EVENT_NAMES.some((event) => globMatch(name, event))) return undefined;
  return `trace event '${name}' does not exist`;
}

/**
 * Processes one -T argument. `prog` is error_report()'s prefix (the program's basename), `option`
 * the location QEMU prints ("-T enable=foo", or "--trace enable=foo" as the user spelled it).
 */
export function traceOption(text: string, prog: string, option: string): TraceOutcome {
  let stderr = '';
  const warn = (w: QemuOptsWarning): void => {
    stderr += `${prog}: ${option}: warning: ${w.message}\n${w.hint}`;
  };
  const fatal = (message: string, hint = ''): TraceOutcome => ({ stderr: `${stderr}${prog}: ${option}: ${message}\n${hint}`, exit: { code: 1 } });

  let parsed;
  try {
    parsed = parseQemuOpts(text, 'enable', TRACE_OPTS);
  } catch (err) {
    if (err instanceof QemuOptsError) err.warnings.forEach(warn);
    if (err instanceof QmpError) return fatal(err.message, err.hint);
    throw err;
  }
  parsed.warnings.forEach(warn);
  if (parsed.help) return { stderr, exit: { code: 1, stdout: formatQemuOptsHelp(TRACE_OPTS) } };

  const { enable, events, file } = parsed.options as Record<string, string | undefined>;
  if (enable !== undefined) {
    if (enable === 'help' || enable === '?') {
      return { stderr, exit: { code: 0, stdout: TRACE_EVENT_NAMES.map((n) => `${n}\n`).join('') } };
    }
    const warning = enableEvents(enable);
    if (warning) stderr += `${prog}: ${option}: warning: ${warning}\n`;
  }
  if (events !== undefined) {
    let content: Buffer;
    try {
      content = fs.readFileSync(events);
    } catch (err) {
      return { stderr: `${stderr}${prog}:${events}: ${strerror(err)}\n`, exit: { code: 1 } };
    }
    // QEMU reads with fgets() into a 1024-byte buffer: a longer line comes in 1023-byte pieces,
    // each counted as a line; each is a C string (cut at a NUL), and its last byte (the newline,
    // or the last character of an unterminated last line) is cut.
    let lineNo = 0;
    for (let p = 0; p < content.length; ) {
      const piece = content.subarray(p, p + 1023);
      const nl = piece.indexOf(10);
      let raw = nl < 0 ? piece : piece.subarray(0, nl + 1);
      p += raw.length;
      lineNo++;
      const nul = raw.indexOf(0);
      if (nul >= 0) raw = raw.subarray(0, nul);
      if (raw.length <= 1) continue;
      const line = raw.toString('latin1', 0, raw.length - 1);
      if (line.startsWith('#')) continue;
      const warning = enableEvents(line);
      if (warning) stderr += `${prog}:${events}:${lineNo}: warning: ${warning}\n`;
    }
  }
  if (file !== undefined) {
    try {
      fs.closeSync(fs.openSync(file, 'a'));
    } catch (err) {
      return fatal(`Error opening logfile ${file}: ${strerror(err)}`);
    }
  }
  return { stderr };
}
