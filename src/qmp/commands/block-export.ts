// Commands of QEMU's block-export.json: exports of every type, and the NBD server.
import type { CommandHandler } from './types.js';
import { nbdServerStart, nbdServerStop, nbdServerRunning, nbdServerConfigFromLegacy } from '../../nbd/server.js';
import { nbdServerAddOptionsToExport, nbdServerRemoveToExportDel } from '../../exports/nbd.js';
import { genericError } from '../../qapi/errors.js';

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
  async 'nbd-server-start'(args, _ctx) {
    await nbdServerStart(nbdServerConfigFromLegacy(args));
    return {};
  },
  async 'nbd-server-stop'(_args, { daemon }) {
    await nbdServerStop(() => daemon.exports.closeAllOfType('nbd'));
    return {};
  },
  async 'nbd-server-add'(args, { daemon }) {
    // QEMU 7.2 looks the device up (as a device name, then a node name) before anything else,
    // even before checking that the server runs.
    const { device } = args as { device: string };
    if (!daemon.graph.lookup(device)) throw genericError(`Cannot find device='${device}' nor node-name='${device}'`);
    if (!nbdServerRunning()) throw genericError('NBD server not running');
    await daemon.exports.add(nbdServerAddOptionsToExport(args));
    return {};
  },
  async 'nbd-server-remove'(args: { name: string; mode?: 'safe' | 'hard' }, { daemon }) {
    // QEMU 7.2 only refuses exports of another type here and otherwise is block-export-del: it
    // never says the server is not running (every NBD export is gone once it stops).
    const del = nbdServerRemoveToExportDel(args);
    const entry = daemon.exports.find(del.id);
    if (entry && entry.type !== 'nbd') throw genericError(`Block export '${del.id}' is not an NBD export`);
    await daemon.exports.del(del.id, del.mode);
    return {};
  },
};
