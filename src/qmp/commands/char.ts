// Commands of QEMU's char.json: chardev queries, chardev-add/-change/-remove/-send-break, ringbuf-read/-write.
import type { CommandHandler } from './types.js';
import type { ChardevBackend, DataFormat } from '../../qapi/generated/types.js';
import { genericError } from '../../qapi/errors.js';
import {
  addChardev, changeChardev, chardevOrder, findChardev, removeChardev, RingbufChardev, CHARDEV_BACKEND_NAMES,
} from '../../chardev/registry.js';
import { decodeQemuBase64, decodeQemuString, encodeModifiedUtf8 } from '../../chardev/ringbuf.js';

/** ringbuf-read/-write: the device must exist and be a ringbuf (memory included). */
function ringbuf(daemon: Parameters<CommandHandler>[1]['daemon'], device: string): RingbufChardev {
  const chardev = findChardev(daemon, device, `Device '${device}' not found`);
  if (!(chardev instanceof RingbufChardev)) throw genericError(`${device} is not a ringbuf device`);
  return chardev;
}

export const charCommands: Record<string, CommandHandler> = {
  // QEMU walks the chardev container (GHashTable order) and prepends: the list comes out reversed.
  'query-chardev': (_args, { daemon }) =>
    chardevOrder(daemon).reverse().map((c) => ({ label: c.id, filename: c.filename(), 'frontend-open': c.frontendOpen })),
  // QEMU 7.2 lists its twelve backends in registration order; these are the ones qsd-ts has, in that order.
  'query-chardev-backends': () => CHARDEV_BACKEND_NAMES.map((name) => ({ name })),
  async 'chardev-add'(args: { id: string; backend: ChardevBackend }, { daemon }) {
    await addChardev(daemon, args.id, args.backend, 'qmp');
    return {};
  },
  async 'chardev-change'(args: { id: string; backend: ChardevBackend }, { daemon }) {
    await changeChardev(daemon, args.id, args.backend);
    return {};
  },
  async 'chardev-remove'(args: { id: string }, { daemon }) {
    await removeChardev(daemon, args.id);
    return {};
  },
  'chardev-send-break'(args: { id: string }, { daemon }) {
    findChardev(daemon, args.id, `Chardev '${args.id}' not found`).sendBreak();
    return {};
  },
  'ringbuf-write'(args: { device: string; data: string; format?: DataFormat }, { daemon }) {
    const rb = ringbuf(daemon, args.device);
    rb.write(args.format === 'base64' ? decodeQemuBase64(args.data) : encodeModifiedUtf8(args.data));
    return {};
  },
  'ringbuf-read'(args: { device: string; size: number | bigint; format?: DataFormat }, { daemon }) {
    const rb = ringbuf(daemon, args.device);
    if (args.size <= 0) throw genericError('size must be greater than zero');
    const data = rb.read(Number(args.size > rb.count ? rb.count : args.size));
    return args.format === 'base64' ? data.toString('base64') : decodeQemuString(data);
  },
};
