// Commands of QEMU's control.json and introspect.json: negotiation, version, command list, quit.
import type { CommandHandler } from './types.js';
import { QmpError } from '../../qapi/errors.js';
import { commandNames, qmpSchemaIntrospection } from '../../qapi/schema.js';

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
    commandNames()
      .filter((name) => Object.hasOwn(daemon.commands, name))
      .map((name) => ({ name })),
  'query-qmp-schema': () => qmpSchemaIntrospection(),
  async quit(_args, { daemon }) {
    // QEMU closes the exports before the reply goes out: their events precede {"return": {}}.
    await daemon.closeExports();
    return {};
  },
};
