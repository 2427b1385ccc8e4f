// Commands of QEMU's block-export.json: exports of every type, and the NBD server.
import type { CommandHandler } from './types.js';
import { nbdServerStart, nbdServerStop, nbdServerAddOptionsToExport } from '../../nbd/server.js';

export const blockExportCommands: Record<string, CommandHandler> = {
  async 'block-export-add'(args, { daemon }) {
    await daemon.exports.add(args);
    return {};
  },
  async 'block-export-del'(args: { id: string; mode?: 'safe' | 'hard' }, { daemon }) {
    await daemon.exports.del(args.id, args.mode);
    return {};
  },
  'query-block-exports': (_args, { daemon }) => daemon.exports.query(),
  async 'nbd-server-start'(args: Record<string, any>) {
    // The legacy form boxes the address: {type, data: {...}} → the flat SocketAddress.
    const { addr, ...rest } = args;
    await nbdServerStart({ ...rest, addr: { type: addr.type, ...addr.data } } as any);
    return {};
  },
  async 'nbd-server-stop'(_args, { daemon }) {
    await nbdServerStop();
    await daemon.exports.closeAllOfType('nbd');
    return {};
  },
  async 'nbd-server-add'(args, { daemon }) {
    await daemon.exports.add(nbdServerAddOptionsToExport(args));
    return {};
  },
  async 'nbd-server-remove'(args: { name: string; mode?: 'safe' | 'hard' }, { daemon }) {
    await daemon.exports.del(args.name, args.mode);
    return {};
  },
};
