// Commands of QEMU's control.json and introspect.json: negotiation, version, command list, quit.
import type { CommandHandler } from './types.js';
import { QmpError } from '../../qapi/errors.js';
import { commandNames, qmpSchemaIntrospection } from '../../qapi/schema.js';

/**
 * QEMU 7.2's query-commands order (the reverse of its registration order, module by module).
 * Commands it lacks keep their place after the command our schema lists before them.
 */
const QEMU_COMMAND_ORDER: readonly string[] = [
  'transaction', 'object-del', 'object-add', 'qom-list-properties', 'qom-list-types', 'qom-set', 'qom-get',
  'qom-list', 'query-qmp-schema', 'quit', 'query-commands', 'query-version', 'qmp_capabilities',
  'chardev-send-break', 'chardev-remove', 'chardev-change', 'chardev-add', 'ringbuf-read', 'ringbuf-write',
  'query-chardev-backends', 'query-chardev', 'query-block-exports', 'block-export-del', 'block-export-add',
  'nbd-server-stop', 'nbd-server-remove', 'nbd-server-add', 'nbd-server-start', 'query-jobs', 'job-finalize',
  'job-dismiss', 'job-complete', 'job-cancel', 'job-resume', 'job-pause',
  'blockdev-snapshot-delete-internal-sync', 'blockdev-snapshot-internal-sync', 'x-blockdev-set-iothread',
  'x-blockdev-change', 'block-set-write-threshold', 'x-blockdev-amend', 'blockdev-create', 'blockdev-del',
  'blockdev-reopen', 'blockdev-add', 'block-job-finalize', 'block-job-dismiss', 'block-job-complete',
  'block-job-resume', 'block-job-pause', 'block-job-cancel', 'block-job-set-speed', 'block-stream',
  'blockdev-mirror', 'x-debug-block-dirty-bitmap-sha256', 'block-dirty-bitmap-merge',
  'block-dirty-bitmap-disable', 'block-dirty-bitmap-enable', 'block-dirty-bitmap-clear',
  'block-dirty-bitmap-remove', 'block-dirty-bitmap-add', 'drive-mirror', 'x-debug-query-block-graph',
  'query-named-block-nodes', 'blockdev-backup', 'drive-backup', 'block-commit', 'change-backing-file',
  'blockdev-snapshot', 'blockdev-snapshot-sync', 'block_resize', 'query-block-jobs', 'query-blockstats',
  'query-block',
];
const qemuCommandRank = new Map(QEMU_COMMAND_ORDER.map((name, i) => [name, i]));

/** Our command names (schema order, reversed as QEMU does) put in QEMU's order. */
function inQemuOrder(names: readonly string[]): string[] {
  let rank = -1;
  const ranked = names.map((name, i) => {
    const known = qemuCommandRank.get(name);
    // A command QEMU 7.2 lacks sorts right after its schema predecessor (ties keep schema order).
    rank = known ?? rank;
    return { name, rank, known: known !== undefined, i };
  });
  return ranked
    .sort((a, b) => a.rank - b.rank || Number(b.known) - Number(a.known) || a.i - b.i)
    .map((r) => r.name);
}

export const controlCommands: Record<string, CommandHandler> = {
  qmp_capabilities(args: { enable?: string[] }, { monitor }) {
    if (!monitor || !monitor.negotiating) {
      throw new QmpError('CommandNotFound', 'Capabilities negotiation is already complete, command ignored');
    }
    for (const cap of args.enable ?? []) {
      if (cap !== 'oob') throw new QmpError('GenericError', `Capability ${cap} not available`);
    }
    monitor.oobEnabled = (args.enable ?? []).includes('oob');
    monitor.negotiating = false;
    return {};
  },
  'query-version': (_args, { daemon }) => daemon.version(),
  'query-commands': (_args, { daemon }) =>
    inQemuOrder(commandNames().filter((name) => Object.hasOwn(daemon.commands, name))).map((name) => ({ name })),
  'query-qmp-schema': () => qmpSchemaIntrospection(),
  async quit(_args, { daemon }) {
    // QEMU closes the exports before the reply goes out: their events precede {"return": {}}.
    await daemon.closeExports();
    return {};
  },
};
