// qsd-ts entry point: qemu-storage-daemon's command line, processed in order, then the main loop.
// Every option goes through the same validators and handlers as the matching QMP command.
import fs from 'node:fs';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { Daemon } from './daemon.js';
import { attachMonitor } from './qmp/server.js';
import { addChardev, chardevBackendFromOpts, CHARDEV_BACKEND_NAMES } from './chardev/registry.js';
import type { ChardevBackend } from './qapi/generated/types.js';
import { QmpError } from './qapi/errors.js';
import { validateType } from './qapi/schema.js';
import { parseKeyval, parseKeyvalWithHelp, isJsonArgument } from './cli/keyval.js';
import { parseQemuOpts, checkChardevOpts, formatQemuOptsHelp, QemuOptsError } from './cli/qemu-opts.js';
import { parseQmpJson } from './qmp/json.js';
import { objectAdd, objectTypeHelp, objectTypesHelp } from './qmp/commands/qom.js';
import { nbdServerStart } from './nbd/server.js';
import { unmountAllFuseExports } from './exports/fuse.js';
import { helpText, versionText } from './cli/help.js';
import { log } from './log.js';
import { traceOption } from './cli/trace.js';
import { strerror } from './util/errno.js';
import { native } from './native/binding.js';
import { ARGV0, PROGRAM_NAME } from './util/report.js';

/** error_report()'s prefix: the basename of the name we were invoked as. */
const PROGRAM = PROGRAM_NAME;
/** The main loop's busy-polling window (QEMU's iothread default poll-max-ns). */
const MAIN_LOOP_POLL_MAX_NS = 32768;

/** Set in the child of --daemonize: the parent waits for our "ready" message. */
const DAEMONIZED_ENV = 'QSD_TS_DAEMONIZED';

interface CliOption {
  /** Long name without dashes, e.g. 'blockdev'; 'argument' for a non-option; 'error' for a getopt error. */
  name: string;
  /** The argv text QEMU names as the location in messages: "--block x", "--blockdev=x", "-Tx". */
  loc: string;
  /** The option's argument; for 'error', getopt's message. */
  value?: string;
}

const LONG_OPTIONS: Record<string, boolean> = {
  blockdev: true, chardev: true, daemonize: false, export: true, help: false, monitor: true,
  'nbd-server': true, object: true, pidfile: true, trace: true, version: false,
};
const SHORT_OPTIONS: Record<string, { name: string; arg: boolean }> = {
  h: { name: 'help', arg: false }, T: { name: 'trace', arg: true }, V: { name: 'version', arg: false },
};

class CliError extends Error {}

function fail(message: string): never {
  throw new CliError(message);
}

/**
 * getopt_long("-hT:V") semantics, in order: --name=value, --name value, unambiguous prefixes,
 * -h/-V/-T (bundled, -Tvalue). Non-options are kept in place (QEMU rejects them in its second
 * pass), a getopt error ends the list (the first pass reports it), "--" ends option processing
 * and what follows it is ignored, as in QEMU.
 */
function parseArgv(argv: string[]): CliOption[] {
  const out: CliOption[] = [];
  const error = (message: string): CliOption[] => {
    out.push({ name: 'error', loc: '', value: message });
    return out;
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--') break;
    if (arg.startsWith('--')) {
      const eq = arg.indexOf('=');
      const typed = eq >= 0 ? arg.slice(2, eq) : arg.slice(2);
      const exact = Object.hasOwn(LONG_OPTIONS, typed) ? [typed] : [];
      const matches = exact.length ? exact : Object.keys(LONG_OPTIONS).filter((n) => n.startsWith(typed));
      // glibc quotes the whole argument here, "=value" included.
      if (matches.length === 0) return error(`unrecognized option '${arg}'`);
      if (matches.length > 1) return error(`option '${arg}' is ambiguous; possibilities: ${matches.map((m) => `'--${m}'`).join(' ')}`);
      const name = matches[0];
      if (LONG_OPTIONS[name]) {
        if (eq >= 0) out.push({ name, loc: arg, value: arg.slice(eq + 1) });
        else if (i + 1 < argv.length) out.push({ name, loc: `${arg} ${argv[i + 1]}`, value: argv[++i] });
        else return error(`option '--${name}' requires an argument`);
      } else {
        if (eq >= 0) return error(`option '--${name}' doesn't allow an argument`);
        out.push({ name, loc: arg });
      }
    } else if (arg.startsWith('-') && arg.length > 1) {
      for (let j = 1; j < arg.length; j++) {
        const opt = SHORT_OPTIONS[arg[j]];
        if (!opt) return error(`invalid option -- '${arg[j]}'`);
        if (!opt.arg) {
          out.push({ name: opt.name, loc: arg });
          continue;
        }
        if (j + 1 < arg.length) out.push({ name: opt.name, loc: arg, value: arg.slice(j + 1) });
        else if (i + 1 < argv.length) out.push({ name: opt.name, loc: `${arg} ${argv[i + 1]}`, value: argv[++i] });
        else return error(`option requires an argument -- '${arg[j]}'`);
        break;
      }
    } else {
      out.push({ name: 'argument', loc: arg });
    }
  }
  return out;
}

/** A help request ends the daemon at once, as QEMU's exit(); earlier options' FUSE mounts go first. */
function exitAfterHelp(code: number): never {
  unmountAllFuseExports();
  process.exit(code);
}

/** --blockdev/--export/--object/...: JSON when it starts with '{', else keyval with an implied key. */
function parseStructured(text: string, impliedKey?: string): { value: unknown; keyval: boolean } {
  if (isJsonArgument(text)) return { value: parseQmpJson(text), keyval: false };
  return { value: parseKeyval(text, impliedKey), keyval: true };
}

function validated(typeName: string, text: string, impliedKey?: string): Record<string, any> {
  const { value, keyval } = parseStructured(text, impliedKey);
  return validateType(typeName, value, { keyval });
}

function chardevOptions(text: string, warn: (message: string, hint: string) => void): { id: string; backend: ChardevBackend } {
  let parsed;
  try {
    parsed = parseQemuOpts(text, 'backend');
  } catch (e) {
    // QEMU prints each warning as it parses, so those before the failing element come first.
    if (e instanceof QemuOptsError) for (const w of e.warnings) warn(w.message, w.hint);
    throw e;
  }
  for (const w of parsed.warnings) warn(w.message, w.hint);
  // `…,help`: the option list, exit 1; `help` as the backend: the backends, newest first, exit 0.
  if (parsed.help) {
    process.stdout.write(formatQemuOptsHelp());
    exitAfterHelp(1);
  }
  const checked = checkChardevOpts(parsed);
  if (checked === 'help') {
    process.stdout.write(`Available chardev backend types: \n${[...CHARDEV_BACKEND_NAMES].reverse().map((n) => `  ${n}\n`).join('')}`);
    exitAfterHelp(0);
  }
  return { id: checked.id, backend: chardevBackendFromOpts(checked.backend, parsed) };
}

async function processOption(daemon: Daemon, opt: CliOption): Promise<void> {
  const value = opt.value ?? '';
  switch (opt.name) {
    case 'blockdev':
      await daemon.graph.add(validated('BlockdevOptions', value, 'driver'));
      break;
    case 'object': {
      // QEMU's user_creatable_parse_str: a `help`/`?` element lists the type's settable properties,
      // or every creatable type when there is no (known) qom-type; then the daemon exits 0.
      if (!isJsonArgument(value)) {
        const { dict, help } = parseKeyvalWithHelp(value, 'qom-type');
        if (help) {
          const type = dict['qom-type'];
          process.stdout.write((typeof type === 'string' ? objectTypeHelp(type) : undefined) ?? objectTypesHelp());
          exitAfterHelp(0);
        }
      }
      objectAdd(daemon, validated('ObjectOptions', value, 'qom-type'));
      break;
    }
    case 'chardev': {
      const { id, backend } = chardevOptions(value, (message, hint) =>
        process.stderr.write(`${PROGRAM}: ${opt.loc}: warning: ${message}\n${hint}`));
      // QEMU's stdio backend refuses to open in a daemon, whose stdio is /dev/null.
      if (backend.type === 'stdio' && process.env[DAEMONIZED_ENV] === '1') fail('cannot use stdio with -daemonize');
      await addChardev(daemon, id, backend, { cli: opt.loc });
      break;
    }
    case 'monitor': {
      const mon = validated('MonitorOptions', value, 'chardev');
      const chardev = daemon.chardevs.get(mon.chardev);
      if (!chardev) fail(`chardev "${mon.chardev}" not found`);
      if (mon.mode === 'readline') fail('Only QMP is supported');
      if (chardev.frontend) fail(`Device '${mon.chardev}' is in use`);
      attachMonitor(daemon, chardev, mon.pretty ?? false);
      break;
    }
    case 'export':
      await daemon.exports.add(validated('BlockExportOptions', value, 'type'));
      break;
    case 'nbd-server':
      await nbdServerStart(validated('NbdServerOptions', value) as any);
      break;
    case 'trace': {
      const outcome = traceOption(value, PROGRAM, opt.loc);
      process.stderr.write(outcome.stderr);
      if (outcome.exit) {
        process.stdout.write(outcome.exit.stdout ?? '');
        exitAfterHelp(outcome.exit.code);
      }
      break;
    }
    case 'argument':
      fail('Unexpected argument');
  }
}

/**
 * QEMU's qemu_write_pidfile: create, lock (a second daemon with the same pidfile fails), make sure
 * the locked file is still the one at the path, then write our PID. The fd stays open (and
 * locked) for the daemon's lifetime.
 */
function writePidfile(path: string): void {
  let fd: number;
  try {
    fd = fs.openSync(path, fs.constants.O_WRONLY | fs.constants.O_CREAT, 0o600);
  } catch (err) {
    fail(`cannot create PID file: Could not create '${path}': ${strerror(err)}`);
  }
  try {
    native.tryLockFile(fd);
    const locked = fs.fstatSync(fd);
    const current = fs.statSync(path);
    if (locked.ino !== current.ino || locked.dev !== current.dev) fail('cannot create PID file: Failed to lock pid file');
    fs.ftruncateSync(fd, 0);
    fs.writeSync(fd, `${process.pid}\n`, 0);
  } catch (err) {
    fs.closeSync(fd);
    if (err instanceof CliError) throw err;
    fail(`cannot create PID file: Cannot lock pid file: ${strerror(err)}`);
  }
}

/**
 * Copies what the child wrote to one of its output pipes and we have not passed on yet: the
 * stream's buffer, then the pipe itself, read without blocking until it is empty. The child's
 * writes to pipes are synchronous, so everything it wrote before "ready" is there.
 */
function drainPipe(stream: NodeJS.ReadableStream & { _handle?: { fd?: number } }, out: NodeJS.WriteStream): void {
  stream.pause();
  for (let chunk = stream.read(); chunk !== null; chunk = stream.read()) out.write(chunk as Buffer);
  const fd = stream._handle?.fd;
  if (fd === undefined || fd < 0) return;
  const buf = Buffer.allocUnsafe(65536);
  for (;;) {
    let n: number;
    try {
      n = fs.readSync(fd, buf, 0, buf.length, null);
    } catch {
      return; // EAGAIN: empty
    }
    if (n <= 0) return;
    out.write(buf.subarray(0, n));
  }
}

/**
 * --daemonize: run a detached copy of ourselves and exit 0 once it reports a complete startup.
 * Until then its stdout and stderr reach ours (help texts, warnings, errors); if it ends before,
 * we exit 1 whatever its status, as QEMU's parent does.
 */
function daemonize(argv: string[]): void {
  const child = spawn(process.execPath, [...process.execArgv, ...process.argv.slice(1, 2), ...argv], {
    detached: true,
    stdio: ['ignore', 'pipe', 'pipe', 'ipc'],
    env: { ...process.env, [DAEMONIZED_ENV]: '1' },
  });
  child.stdout!.pipe(process.stdout);
  child.stderr!.pipe(process.stderr);
  child.on('message', (msg) => {
    if (msg === 'ready') {
      for (const [stream, out] of [[child.stdout!, process.stdout], [child.stderr!, process.stderr]] as const) {
        stream.unpipe();
        drainPipe(stream, out);
        stream.destroy();
      }
      child.disconnect();
      child.unref();
      process.exit(0);
    }
  });
  // 'close' comes after the child's output has been read to the end.
  child.on('close', () => process.exit(1));
}

export async function main(argv: string[]): Promise<void> {
  const options = parseArgv(argv);
  // First pass, as QEMU: help, version and getopt's errors in order, before anything is created.
  for (const opt of options) {
    if (opt.name === 'error') {
      // getopt names the program as argv[0] was typed, path included.
      process.stderr.write(`${ARGV0}: ${opt.value}\n`);
      process.exit(1);
    }
    if (opt.name === 'help') {
      process.stdout.write(helpText(PROGRAM));
      process.exit(0);
    }
    if (opt.name === 'version') {
      process.stdout.write(versionText());
      process.exit(0);
    }
  }
  // Absolute, as QEMU keeps its realpath: the file is removed at exit whatever the cwd is then.
  const pidfileArg = options.filter((o) => o.name === 'pidfile').pop()?.value;
  const pidfile = pidfileArg === undefined ? undefined : path.resolve(pidfileArg);
  const isDaemonChild = process.env[DAEMONIZED_ENV] === '1';
  if (options.some((o) => o.name === 'daemonize') && !isDaemonChild) {
    daemonize(argv);
    return;
  }
  if (isDaemonChild) {
    // Once the parent has gone, our output pipes are closed: lose the text, as QEMU's /dev/null does.
    process.stdout.on('error', () => undefined);
    process.stderr.on('error', () => undefined);
  }

  const daemon = new Daemon();
  // The main loop (QMP, NBD, exports without an iothread) polls like an iothread with QEMU's
  // default window: a queue-depth-1 NBD client gets 2.5x the requests through on this VM (40k
  // against 16k IOPS, 4k reads) because the loop is awake when the next one arrives. QEMU's own
  // main loop does not poll; the window drops to 0 whenever the loop idles, so an idle daemon
  // does not spin.
  native.setLoopPolling(MAIN_LOOP_POLL_MAX_NS, 0, 0);
  let pidfileWritten = false;
  daemon.onExit = (code) => {
    if (pidfileWritten && pidfile) fs.rmSync(pidfile, { force: true });
    process.exit(code);
  };
  installSignalHandlers(daemon);

  for (const opt of options) {
    if (opt.name === 'pidfile' || opt.name === 'daemonize') continue;
    try {
      await processOption(daemon, opt);
    } catch (err) {
      const prefix = `${PROGRAM}: ${opt.loc}: `;
      if (err instanceof QmpError) {
        process.stderr.write(`${prefix}${err.message}\n${err.hint ?? ''}`);
      } else if (err instanceof CliError) {
        process.stderr.write(`${prefix}${err.message}\n`);
      } else {
        process.stderr.write(`${prefix}${(err as Error).message ?? String(err)}\n`);
        log.error({ err }, 'unexpected error while processing the command line');
      }
      await shutdownAfterStartupFailure(daemon);
      process.exit(1);
    }
  }
  // QEMU writes the pidfile once exports and servers exist, before serving.
  if (pidfile) {
    try {
      writePidfile(pidfileArg!);
      pidfileWritten = true;
    } catch (err) {
      process.stderr.write(`${PROGRAM}: ${(err as Error).message}\n`);
      await shutdownAfterStartupFailure(daemon);
      process.exit(1);
    }
  }
  daemon.startupDone();
  if (isDaemonChild && process.send) {
    // QEMU's os_setup_post(): files the daemon creates from now on are not world-readable. (It
    // also changes to '/', which we do not: exports and sockets given relative paths are still
    // unmounted and unlinked by those paths at exit.)
    process.umask(0o027);
    process.send('ready');
    process.disconnect?.();
  }
}

/** Startup failed half way: undo what exists (mounts above all), then the caller exits 1. */
async function shutdownAfterStartupFailure(daemon: Daemon): Promise<void> {
  process.exitCode = 1;
  daemon.onExit = () => undefined;
  await daemon.requestExit().catch(() => undefined);
}

function installSignalHandlers(daemon: Daemon): void {
  for (const signal of ['SIGTERM', 'SIGINT', 'SIGHUP'] as const) {
    process.on(signal, () => void daemon.requestExit());
  }
  // A bug must not leave a stale FUSE mount behind.
  process.on('uncaughtException', (err) => {
    process.stderr.write(`${PROGRAM}: internal error: ${err.stack ?? err.message}\n`);
    try {
      unmountAllFuseExports();
    } finally {
      process.exit(1);
    }
  });
}

// Run when started as a program (bin/qsd-ts), not when imported by tests.
if (process.argv[1] && import.meta.url === new URL(`file://${fs.realpathSync(process.argv[1])}`).href) {
  void main(process.argv.slice(2));
}
