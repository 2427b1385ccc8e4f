// iotests library: launches the daemon under test ($QSD), speaks QMP, logs filtered output, cleans up.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, realpathSync, rmSync, writeFileSync, appendFileSync, existsSync } from 'node:fs';
import { connect, createServer, type Socket } from 'node:net';
import { basename, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Readable, Writable } from 'node:stream';
import {
  chain, dumpJson, filterNodeNames, filterProgram, filterTimestamp, filterVersion,
  makeNumberFilter, makeTestDirFilter, type TextFilter,
} from './filters.js';

export * from './filters.js';

/** This directory (tests/iotests). */
export const IOTESTS_DIR = dirname(fileURLToPath(import.meta.url));
/** The repository root. */
export const REPO_ROOT = resolve(IOTESTS_DIR, '../..');
/** The daemon under test: $QSD, else the repository's bin/qsd-ts. */
export const QSD = process.env.QSD ? resolve(process.env.QSD) : join(REPO_ROOT, 'bin/qsd-ts');
/** The running test's number ('001'), from the script name. */
export const TEST_NUM = basename(process.argv[1] ?? 'unknown');

const ownTestDir = !process.env.TEST_DIR;
/**
 * A fresh scratch directory for this test: $TEST_DIR when run by ./check, else a new one.
 * Removed at exit unless QSD_IOTESTS_KEEP=1 (./check -d).
 */
export const TEST_DIR = process.env.TEST_DIR
  ? resolve(process.env.TEST_DIR)
  : mkdtempSync(`/tmp/qsd-iotests.${TEST_NUM}.`);
const TEST_DIR_REAL = (() => { try { return realpathSync(TEST_DIR); } catch { return TEST_DIR; } })();
const KEEP_TEST_DIR = process.env.QSD_IOTESTS_KEEP === '1';
/** File where spawned daemon PIDs are recorded, so ./check can sweep them after a hard kill. */
const PID_FILE = join(TEST_DIR, '.qsd-pids');

/** The filters applied to everything logged: TEST_DIR, program name, timestamps, versions, node names. */
export const defaultFilter: TextFilter = chain(
  makeTestDirFilter(TEST_DIR, TEST_DIR_REAL), filterProgram, filterTimestamp, filterVersion, filterNodeNames,
);

/** Applies the default filters (plus any extra ones) to text. */
export function filterText(text: string, extra: TextFilter[] = []): string {
  return chain(defaultFilter, ...extra)(text);
}

/** Options for {@link log}. */
export interface LogOptions {
  /** Filters applied after the default ones. */
  filters?: TextFilter[];
  /** Sort object keys (QEMU iotests do); default true. */
  sortKeys?: boolean;
  /** Pretty-print objects with this indentation. */
  indent?: number;
}

/**
 * Writes one filtered entry to the test output: strings as they are, anything else as JSON in
 * QEMU's iotests style (Python json.dumps separators, keys sorted).
 */
export function log(msg: unknown, opts: LogOptions = {}): void {
  const text = typeof msg === 'string' ? msg : dumpJson(msg, { sortKeys: opts.sortKeys ?? true, indent: opts.indent });
  process.stdout.write(filterText(text, opts.filters) + '\n');
}

/** Resolves after `ms` milliseconds. */
export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Marks the test as not run (a missing tool, an unsupported environment) and exits cleanly. */
export function notrun(reason: string): never {
  const file = process.env.IOTEST_NOTRUN_FILE;
  if (file) writeFileSync(file, reason + '\n');
  else process.stderr.write(`${TEST_NUM} not run: ${reason}\n`);
  process.exit(0);
}

/** Calls {@link notrun} unless every command is found on PATH. */
export function requireCommands(...cmds: string[]): void {
  for (const cmd of cmds) {
    if (spawnSync('sh', ['-c', `command -v "$1"`, 'sh', cmd]).status !== 0) notrun(`${cmd} not found`);
  }
}

/** Calls {@link notrun} unless FUSE can be mounted here (/dev/fuse, fusermount3, root). */
export function requireFuse(): void {
  if (!existsSync('/dev/fuse')) notrun('/dev/fuse not available');
  requireCommands('fusermount3');
  if (process.getuid?.() !== 0) notrun('FUSE tests need root');
}

/** Records a PID (e.g. a daemonized daemon's) so teardown kills it if still running. */
export function trackPid(pid: number): void {
  extraPids.add(pid);
  try { appendFileSync(PID_FILE, `${pid}\n`); } catch { /* TEST_DIR already gone */ }
}

/** A TCP port that was free a moment ago (for NBD servers). */
export function freePort(): Promise<number> {
  return new Promise((res, rej) => {
    const srv = createServer();
    srv.once('error', rej);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      srv.close(() => (addr && typeof addr === 'object' ? res(addr.port) : rej(new Error('no port'))));
    });
  });
}

/** Result of {@link runCommand}: output filtered unless `raw` was set. */
export interface CommandResult {
  stdout: string;
  stderr: string;
  /** Exit status, or null if killed by a signal. */
  status: number | null;
  /** The signal that ended the process, if any. */
  signal: NodeJS.Signals | null;
  /** True if the timeout expired and the process was killed. */
  timedOut: boolean;
}

/** Options for {@link runCommand}. */
export interface CommandOptions {
  /** Written to stdin, which is then closed. */
  input?: string | Buffer;
  /** Working directory; default TEST_DIR. */
  cwd?: string;
  /** Extra environment variables. */
  env?: Record<string, string>;
  /** Kill (SIGKILL) after this many ms; default 30000. */
  timeoutMs?: number;
  /** Skip the default filters. */
  raw?: boolean;
  /** Extra filters for stdout and stderr. */
  filters?: TextFilter[];
}

/**
 * Runs a peer program (qemu-img, qemu-io, dd, stat, …) to completion without blocking the
 * event loop (QMP events keep arriving), and returns its filtered output.
 */
export function runCommand(cmd: string, args: string[], opts: CommandOptions = {}): Promise<CommandResult> {
  return new Promise((res, rej) => {
    const child = spawn(cmd, args, {
      cwd: opts.cwd ?? TEST_DIR,
      env: { ...process.env, ...opts.env },
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    if (child.pid !== undefined) trackPid(child.pid);
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let timedOut = false;
    const timer = setTimeout(() => { timedOut = true; child.kill('SIGKILL'); }, opts.timeoutMs ?? 30000);
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => err.push(b));
    child.stdin.on('error', () => { /* the program may exit without reading its input */ });
    child.stdin.end(opts.input ?? '');
    child.once('error', (e) => { clearTimeout(timer); rej(e); });
    child.once('close', (status, signal) => {
      clearTimeout(timer);
      const f = (s: string) => (opts.raw ? s : filterText(s, opts.filters));
      res({
        stdout: f(Buffer.concat(out).toString()), stderr: f(Buffer.concat(err).toString()),
        status, signal, timedOut,
      });
    });
  });
}

/** Runs the daemon under test to completion (for command lines that must fail or print and exit). */
export function runDaemon(args: string[], opts: CommandOptions = {}): Promise<CommandResult> {
  return runCommand(QSD, args, { timeoutMs: 10000, ...opts });
}

/** Logs a command's filtered stdout and stderr (trailing newline trimmed) and its exit status. */
export function logResult(r: CommandResult, opts: { status?: boolean } = {}): void {
  if (r.stdout) log(r.stdout.replace(/\n$/, ''));
  if (r.stderr) log(r.stderr.replace(/\n$/, ''));
  if (opts.status ?? true) log(r.timedOut ? 'timed out' : r.signal ? `killed by ${r.signal}` : `exit status ${r.status}`);
}

/** One message read from a QMP stream: its exact text (CRLF and all) and its parsed value. */
export interface QmpMessage {
  /** The bytes as received, decoded as UTF-8. */
  raw: string;
  /** The parsed JSON value. */
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  value: any;
  /** Arrival order over the connection's life. */
  seq: number;
}

/**
 * Splits a QMP byte stream into top-level JSON values (compact or pretty-printed), keeping each
 * value's raw text including the line ending that follows it.
 */
class JsonSplitter {
  private buf = '';
  private pos = 0;
  private start = -1;
  private depth = 0;
  private inString = false;
  private escaped = false;

  /** Feeds a chunk; returns the complete raw values it finished. */
  push(chunk: string): string[] {
    this.buf += chunk;
    const done: string[] = [];
    for (; this.pos < this.buf.length; this.pos++) {
      const c = this.buf[this.pos];
      if (this.start < 0) {
        if (c === '{' || c === '[') { this.start = this.pos; this.depth = 1; }
        continue;
      }
      if (this.inString) {
        if (this.escaped) this.escaped = false;
        else if (c === '\\') this.escaped = true;
        else if (c === '"') this.inString = false;
        continue;
      }
      if (c === '"') this.inString = true;
      else if (c === '{' || c === '[') this.depth++;
      else if ((c === '}' || c === ']') && --this.depth === 0) {
        let end = this.pos + 1;
        if (this.buf[end] === '\r') end++;
        if (this.buf[end] === '\n') end++;
        done.push(this.buf.slice(this.start, end));
        this.buf = this.buf.slice(end);
        this.pos = -1;
        this.start = -1;
      }
    }
    if (this.start < 0) { this.buf = ''; this.pos = 0; }
    return done;
  }
}

/** Options for {@link Daemon.qmp}. */
export interface QmpOptions {
  /** Log the request and the reply (default true). */
  log?: boolean;
  /** An `id` member to send. */
  id?: unknown;
  /** Also log, in arrival order before the reply, the events that arrived while waiting. */
  logEvents?: boolean;
  /** Reply timeout in ms (default 30000). */
  timeoutMs?: number;
  /** Extra filters for the logged lines. */
  filters?: TextFilter[];
}

/** Options for {@link launchDaemon}. */
export interface LaunchOptions {
  /** Where the QMP monitor lives: a unix socket in TEST_DIR (default), stdin/stdout, or none. */
  qmp?: 'socket' | 'stdio' | 'none';
  /** Adds pretty=on to the QMP monitor. */
  pretty?: boolean;
  /** Negotiate capabilities after the greeting (default true). */
  negotiate?: boolean;
  /** How long to wait for the QMP socket, in ms (default 15000). */
  startTimeoutMs?: number;
}

const daemons = new Set<Daemon>();
const extraPids = new Set<number>();
let daemonCount = 0;

/** A running daemon under test with an optional QMP connection. */
export class Daemon {
  /** The daemon's child process. */
  readonly proc: ChildProcess;
  /** Index among the daemons of this test (0, 1, …), used in socket names. */
  readonly index: number;
  /** The parsed QMP greeting, once connected. */
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  greeting: any;
  /** Raw text of the QMP greeting, once connected. */
  greetingRaw = '';
  /** Everything the daemon wrote to stderr so far. */
  stderr = '';
  /** Everything written to stdout so far (when stdout is not the QMP channel). */
  stdout = '';
  /** Exit status once exited (null while running or if killed by a signal). */
  exitCode: number | null = null;
  /** Signal that ended the daemon, if any. */
  exitSignal: NodeJS.Signals | null = null;
  /** Every byte received on the QMP channel, in order (for line-ending and layout checks). */
  transcript = '';
  /** Path of the QMP socket, when qmp is 'socket'. */
  readonly qmpSocketPath: string;

  private exited: Promise<void>;
  private hasExited = false;
  private stderrLogged = 0;
  private sock?: Socket;
  private writer?: Writable;
  private splitter = new JsonSplitter();
  private seq = 0;
  private replies: QmpMessage[] = [];
  private eventQueue: QmpMessage[] = [];
  private waiters: Array<() => void> = [];
  private closed = false;
  private pidFilter: TextFilter;

  /** Spawns the daemon; use {@link launchDaemon}, which also connects QMP. */
  constructor(args: string[], opts: LaunchOptions = {}) {
    this.index = daemonCount++;
    this.qmpSocketPath = join(TEST_DIR, `qmp-${this.index}.sock`);
    const mode = opts.qmp ?? 'socket';
    const monArgs: string[] = [];
    const pretty = opts.pretty ? ',pretty=on' : '';
    if (mode === 'socket') {
      monArgs.push('--chardev', `socket,id=qmp_mon,path=${this.qmpSocketPath},server=on,wait=off`,
        '--monitor', `chardev=qmp_mon${pretty}`);
    } else if (mode === 'stdio') {
      monArgs.push('--chardev', 'stdio,id=qmp_mon', '--monitor', `chardev=qmp_mon${pretty}`);
    }
    this.proc = spawn(QSD, [...args, ...monArgs], { cwd: TEST_DIR, stdio: ['pipe', 'pipe', 'pipe'] });
    if (this.proc.pid !== undefined) trackPid(this.proc.pid);
    this.pidFilter = this.proc.pid !== undefined ? makeNumberFilter(this.proc.pid, 'PID') : (t) => t;
    daemons.add(this);
    this.proc.stderr!.on('data', (b: Buffer) => { this.stderr += b.toString(); });
    if (mode !== 'stdio') this.proc.stdout!.on('data', (b: Buffer) => { this.stdout += b.toString(); });
    this.proc.stdin!.on('error', () => { /* daemon gone */ });
    this.exited = new Promise((res) => {
      this.proc.once('exit', (code, signal) => {
        this.exitCode = code; this.exitSignal = signal; this.hasExited = true;
        daemons.delete(this);
        res();
        this.wake();
      });
      this.proc.once('error', (e) => {
        this.stderr += `spawn failed: ${e.message}\n`;
        this.hasExited = true; daemons.delete(this); res(); this.wake();
      });
    });
    if (mode === 'stdio') this.attach(this.proc.stdout!, this.proc.stdin!);
  }

  /** The daemon's PID. */
  get pid(): number | undefined { return this.proc.pid; }

  /** True while the process runs. */
  get running(): boolean { return !this.hasExited; }

  private attach(input: Readable, output: Writable): void {
    this.writer = output;
    this.closed = false;
    input.on('data', (b: Buffer) => {
      this.transcript += b.toString();
      for (const raw of this.splitter.push(b.toString())) {
        let value: unknown;
        try { value = JSON.parse(raw); } catch { value = { 'unparseable-qmp-output': raw }; }
        const msg: QmpMessage = { raw, value, seq: this.seq++ };
        if (value && typeof value === 'object' && 'event' in value) this.eventQueue.push(msg);
        else this.replies.push(msg);
      }
      this.wake();
    });
    input.once('close', () => { this.closed = true; this.wake(); });
  }

  private wake(): void {
    const w = this.waiters; this.waiters = [];
    for (const f of w) f();
  }

  /** Waits until `pred` holds, new input arrives repeatedly re-checking; rejects on timeout. */
  private async until<T>(pred: () => T | undefined, what: string, timeoutMs: number): Promise<T> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const v = pred();
      if (v !== undefined) return v;
      if (this.closed) {
        await this.waitExit(2000);
        throw new Error(`QMP connection closed while waiting for ${what}; daemon status ${this.exitCode}` +
          ` signal ${this.exitSignal}; stderr:\n${this.stderr}`);
      }
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${what}`);
      await new Promise<void>((res) => {
        const t = setTimeout(res, left);
        this.waiters.push(() => { clearTimeout(t); res(); });
      });
    }
  }

  /**
   * Connects to a QMP unix socket (retrying until it exists), reads the greeting and, unless
   * told otherwise, negotiates capabilities. Rejects if the daemon exits first (unless
   * `daemonized`: then the process that serves QMP is not the one spawned).
   */
  async connect(
    path = this.qmpSocketPath,
    opts: { negotiate?: boolean; timeoutMs?: number; daemonized?: boolean } = {},
  ): Promise<void> {
    const deadline = Date.now() + (opts.timeoutMs ?? 15000);
    for (;;) {
      // With --daemonize the spawned parent exits once startup is complete; its child serves QMP.
      if (this.hasExited && !opts.daemonized) {
        throw new Error(`daemon exited (status ${this.exitCode}, signal ${this.exitSignal}) before QMP was ready:\n${this.stderr}`);
      }
      try {
        this.sock = await new Promise<Socket>((res, rej) => {
          const s = connect(path);
          s.once('connect', () => { s.removeAllListeners('error'); res(s); });
          s.once('error', rej);
        });
        break;
      } catch (e) {
        if (Date.now() > deadline) throw new Error(`cannot connect to ${path}: ${(e as Error).message}\n${this.stderr}`);
        await sleep(20);
      }
    }
    this.sock.on('error', () => { this.closed = true; this.wake(); });
    this.splitter = new JsonSplitter();
    this.attach(this.sock, this.sock);
    await this.readGreeting(opts);
  }

  private async readGreeting(opts: { negotiate?: boolean; timeoutMs?: number }): Promise<void> {
    const msg = await this.until(() => this.replies.shift(), 'the QMP greeting', opts.timeoutMs ?? 15000);
    this.greeting = msg.value;
    this.greetingRaw = msg.raw;
    if (opts.negotiate ?? true) {
      const r = await this.qmp('qmp_capabilities', undefined, { log: false });
      if (!r || !('return' in r)) throw new Error(`qmp_capabilities failed: ${JSON.stringify(r)}`);
    }
  }

  /** Reads the greeting of a stdio monitor (called by launchDaemon). */
  async startStdio(opts: { negotiate?: boolean; timeoutMs?: number } = {}): Promise<void> {
    try {
      await this.readGreeting(opts);
    } catch (e) {
      throw new Error(`${(e as Error).message}\ndaemon stderr:\n${this.stderr}`);
    }
  }

  /** Logs filtered text (the daemon's PID becomes `PID`). */
  log(msg: unknown, opts: LogOptions = {}): void {
    log(msg, { ...opts, filters: [this.pidFilter, ...(opts.filters ?? [])] });
  }

  /** Logs the stderr written since the last call (filtered), if any. */
  logStderr(): void {
    const text = this.stderr.slice(this.stderrLogged);
    this.stderrLogged = this.stderr.length;
    if (text) this.log(text.replace(/\n$/, ''));
  }

  /**
   * Sends a command, waits for its reply and returns it. Logs the request as
   * `{"execute": …, "arguments": …}` and the reply with sorted keys, both filtered.
   */
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  async qmp(cmd: string, args?: Record<string, unknown>, opts: QmpOptions = {}): Promise<any> {
    const req: Record<string, unknown> = { execute: cmd };
    if (args !== undefined) req.arguments = args;
    if (opts.id !== undefined) req.id = opts.id;
    const line = dumpJson(req);
    const shouldLog = opts.log ?? true;
    if (shouldLog) this.log(line, { filters: opts.filters });
    const firstSeq = this.seq;
    this.send(line + '\n');
    const reply = await this.nextReply(opts.timeoutMs ?? 30000, `the reply to ${cmd}`);
    if (opts.logEvents) {
      const before = this.eventQueue.filter((e) => e.seq >= firstSeq && e.seq < reply.seq);
      this.eventQueue = this.eventQueue.filter((e) => !before.includes(e));
      for (const e of before) this.log(e.value, { filters: opts.filters });
    }
    if (shouldLog) this.log(reply.value, { filters: opts.filters });
    return reply.value;
  }

  /**
   * Sends one raw line (a newline is appended), logs it, then waits for and logs `replies`
   * replies (default 1; 0 sends only). Returns the last reply.
   */
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  async qmpRaw(line: string, opts: { replies?: number; log?: boolean; timeoutMs?: number } = {}): Promise<any> {
    const shouldLog = opts.log ?? true;
    if (shouldLog) this.log(line.replace(/[\x00-\x1f\x7f-\xff]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`));
    this.send(line + '\n');
    let last: unknown;
    for (let i = 0; i < (opts.replies ?? 1); i++) {
      const r = await this.nextReply(opts.timeoutMs ?? 30000, 'a reply to a raw line');
      if (shouldLog) this.log(r.value);
      last = r.value;
    }
    return last;
  }

  /** Writes bytes to the QMP channel as they are. */
  send(data: string | Buffer): void {
    if (!this.writer) throw new Error('no QMP connection');
    this.writer.write(data);
  }

  /** Waits for the next non-event message (its raw text is kept in the result). */
  nextReply(timeoutMs = 30000, what = 'a QMP reply'): Promise<QmpMessage> {
    return this.until(() => this.replies.shift(), what, timeoutMs);
  }

  /** True if a reply arrives within `ms` (used to show that nothing was answered). */
  async replyPending(ms: number): Promise<boolean> {
    try { await this.until(() => (this.replies.length ? true : undefined), 'x', ms); return true; } catch { return false; }
  }

  /** Returns and forgets the events received so far. */
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  events(): any[] {
    const e = this.eventQueue.map((m) => m.value);
    this.eventQueue = [];
    return e;
  }

  /** Waits for the next event called `name` (already queued or arriving), logs it and returns it. */
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  async waitEvent(name: string, opts: { timeoutMs?: number; log?: boolean } = {}): Promise<any> {
    const msg = await this.until(() => {
      const i = this.eventQueue.findIndex((m) => m.value.event === name);
      return i < 0 ? undefined : this.eventQueue.splice(i, 1)[0];
    }, `event ${name}`, opts.timeoutMs ?? 30000);
    if (opts.log ?? true) this.log(msg.value);
    return msg.value;
  }

  /** Sends a signal to the daemon. */
  kill(signal: NodeJS.Signals = 'SIGTERM'): void {
    if (!this.hasExited) this.proc.kill(signal);
  }

  /** Waits for the daemon to exit; returns false on timeout. */
  async waitExit(timeoutMs = 15000): Promise<boolean> {
    if (this.hasExited) return true;
    let t: NodeJS.Timeout | undefined;
    const timeout = new Promise<boolean>((res) => { t = setTimeout(() => res(false), timeoutMs); });
    const r = await Promise.race([this.exited.then(() => true), timeout]);
    clearTimeout(t);
    return r;
  }

  /**
   * Stops the daemon: `quit` over QMP if negotiated (else SIGTERM), waits for the exit, then
   * SIGTERM and finally SIGKILL. Logs nothing; returns the exit status (null if killed).
   */
  async stop(timeoutMs = 15000): Promise<number | null> {
    if (!this.hasExited) {
      if (this.writer && !this.closed && this.greeting) {
        try { this.send('{"execute": "quit"}\n'); } catch { this.kill('SIGTERM'); }
      } else {
        this.kill('SIGTERM');
      }
      if (!(await this.waitExit(timeoutMs))) {
        this.kill('SIGTERM');
        if (!(await this.waitExit(5000))) { this.kill('SIGKILL'); await this.waitExit(5000); }
      }
    }
    this.sock?.destroy();
    return this.exitCode;
  }

  /** Closes the QMP connection without stopping the daemon. */
  closeQmp(): void {
    this.sock?.destroy();
    this.sock = undefined;
  }
}

/**
 * Starts $QSD with `args` plus (unless qmp is 'none') a QMP monitor on a unix socket in
 * TEST_DIR or on stdio; waits for the socket, reads the greeting and negotiates.
 * Throws (with the daemon's stderr) if the daemon exits before QMP is ready.
 */
export async function launchDaemon(args: string[], opts: LaunchOptions = {}): Promise<Daemon> {
  const d = new Daemon(args, opts);
  const mode = opts.qmp ?? 'socket';
  if (mode === 'socket') await d.connect(d.qmpSocketPath, { negotiate: opts.negotiate, timeoutMs: opts.startTimeoutMs });
  else if (mode === 'stdio') await d.startStdio({ negotiate: opts.negotiate, timeoutMs: opts.startTimeoutMs });
  return d;
}

/** FUSE mount points (from /proc/self/mounts) under `dir`. */
export function fuseMountsUnder(dir = TEST_DIR): string[] {
  let text = '';
  try { text = readFileSync('/proc/self/mounts', 'utf8'); } catch { return []; }
  const dirs = [dir, TEST_DIR_REAL];
  return text.split('\n')
    .map((l) => l.split(' '))
    .filter((f) => f.length > 2 && /^fuse/.test(f[2]))
    .map((f) => f[1].replace(/\\([0-7]{3})/g, (_m, o: string) => String.fromCharCode(parseInt(o, 8))))
    .filter((mp) => dirs.some((d) => mp === d || mp.startsWith(d + '/')));
}

/** Lazily unmounts every FUSE mount under TEST_DIR (fusermount3 -u -z, then umount -l). */
export function unmountAll(): void {
  for (const mp of fuseMountsUnder()) {
    spawnSync('fusermount3', ['-u', '-z', mp], { stdio: 'ignore' });
    if (fuseMountsUnder().includes(mp)) spawnSync('umount', ['-l', mp], { stdio: 'ignore' });
  }
}

function pidBelongsToTest(pid: number): boolean {
  try {
    const cmdline = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
    return cmdline.includes(TEST_DIR) || cmdline.includes(TEST_DIR_REAL);
  } catch {
    return false;
  }
}

/**
 * Processes whose command line names this test's unique TEST_DIR (e.g. a --daemonize child,
 * which leaves our process tree), other than this test process itself.
 */
function testProcesses(): number[] {
  let entries: string[] = [];
  try { entries = readdirSync('/proc'); } catch { return []; }
  return entries.filter((e) => /^[0-9]+$/.test(e)).map(Number)
    .filter((pid) => pid !== process.pid && pidBelongsToTest(pid));
}

/** Waits until a process (not necessarily our child) no longer exists; false on timeout. */
export async function waitPidGone(pid: number, timeoutMs = 15000): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
      if (/^\d+ \(.*\) Z/.test(stat)) return true;
    } catch {
      return true;
    }
    await sleep(20);
  }
  return false;
}

let cleanedUp = false;
/** Synchronous last-resort teardown: kill daemons, unmount, remove TEST_DIR. Runs at exit. */
function cleanupSync(): void {
  if (cleanedUp) return;
  cleanedUp = true;
  for (const d of daemons) { try { d.proc.kill('SIGKILL'); } catch { /* gone */ } }
  for (const pid of [...extraPids, ...testProcesses()]) {
    if (pidBelongsToTest(pid)) { try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ } }
  }
  unmountAll();
  if (!KEEP_TEST_DIR && (ownTestDir || process.env.QSD_IOTESTS_CHECK === '1')) {
    try { rmSync(TEST_DIR, { recursive: true, force: true }); } catch { /* ./check retries */ }
  }
}

process.on('exit', cleanupSync);
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
  process.on(sig, () => {
    process.stderr.write(`${TEST_NUM}: got ${sig}, cleaning up\n`);
    cleanupSync();
    process.exit(128 + (sig === 'SIGINT' ? 2 : sig === 'SIGTERM' ? 15 : 1));
  });
}

/**
 * Ends a test: stops every daemon still running (logging a line only if one does not exit
 * with status 0), unmounts leftovers and prints `*** done`.
 */
export async function done(): Promise<void> {
  for (const d of [...daemons]) {
    const status = await d.stop();
    if (status !== 0) log(`daemon ${d.index} exited with ${status === null ? `signal ${d.exitSignal}` : `status ${status}`}`);
  }
  const left = fuseMountsUnder();
  if (left.length) log(`FUSE mounts left behind: ${left.join(' ')}`);
  unmountAll();
  log('*** done');
}

if (/^[0-9]{3}$/.test(TEST_NUM)) process.stdout.write(`QA output created by ${TEST_NUM}\n`);
