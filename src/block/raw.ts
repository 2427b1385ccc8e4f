// raw: the format driver that passes bytes through, optionally a window [offset, offset+size).
import type { BlockDriver, BlockStatus } from './driver.js';
import type { BlockNode } from './node.js';
import { genericError } from '../qapi/errors.js';
import { BlockIoError } from './node.js';
import { constants as osConstants } from 'node:os';

interface RawState {
  file: BlockNode;
  offset: number;
  /** Fixed size from the 'size' option, or undefined to follow the file. */
  size?: number;
}

function fileOf(node: BlockNode): BlockNode {
  const file = node.file;
  if (!file) throw genericError("A block device must be specified for \"file\"");
  return file;
}

export const rawDriver: BlockDriver<RawState> = {
  name: 'raw',
  isProtocol: false,
  async open(node, options) {
    const file = fileOf(node);
    const offset = Number(options.offset ?? 0);
    const size = options.size === undefined ? undefined : Number(options.size);
    const fileSize = file.getLength();
    if (offset > fileSize) {
      throw genericError(`Offset (${offset}) cannot be greater than size of the containing file (${fileSize})`);
    }
    if (size !== undefined) {
      if (fileSize - offset < size) {
        throw genericError(
          `The sum of offset (${offset}) and size (${size}) has to be smaller or equal to the  actual size of the containing file (${fileSize})`,
        );
      }
      if (size % 512 !== 0) throw genericError('Specified size is not multiple of 512');
    }
    return { file, offset, size };
  },
  async close() {},
  describe: (state) => ({ offset: state.offset, size: state.size }),
  openReplica: (node, description) => ({ file: fileOf(node), ...(description as { offset: number; size?: number }) }),
  closeReplica() {},
  getLength: (state) => state.size ?? Math.max(0, state.file.getLength() - state.offset),
  getAllocatedFileSize: (state) => state.file.getAllocatedFileSize(),
  requestAlignment: (state) => state.file.requestAlignment(),
  read(state, offset, buf) {
    state.file.debugEvent('read_aio');
    return state.file.read(state.offset + offset, buf);
  },
  readNow(state, offset, buf) {
    // The debug event is raised by whichever path ends up serving the request.
    if (!state.file.tryRead(state.offset + offset, buf)) return false;
    state.file.debugEvent('read_aio');
    return true;
  },
  writeNow(state, offset, buf, flags) {
    if (!state.file.tryWrite(state.offset + offset, buf, flags)) return false;
    state.file.debugEvent('write_aio');
    return true;
  },
  write(state, offset, buf, flags) {
    state.file.debugEvent('write_aio');
    return state.file.write(state.offset + offset, buf, flags);
  },
  writeZeroes: (state, offset, bytes, flags) => state.file.writeZeroes(state.offset + offset, bytes, flags),
  discard: (state, offset, bytes) => state.file.discard(state.offset + offset, bytes),
  flush: (state) => state.file.flush(),
  async truncate(state, size, exact, prealloc) {
    if (state.size !== undefined) {
      throw new BlockIoError(osConstants.errno.ENOTSUP, 'Cannot resize fixed-size raw disks');
    }
    return state.file.truncate(state.offset + size, exact, prealloc);
  },
  async blockStatus(state, offset, bytes): Promise<BlockStatus> {
    // raw passes status through from its file (QEMU's BDRV_BLOCK_RAW).
    const st = await state.file.blockStatus(state.offset + offset, bytes);
    return { ...st, offset: state.offset + offset };
  },
  // QEMU's raw_get_info asks the file child: only a child that answers (file-posix) gives a dirty flag.
  imageInfo: (state) => (state.file.driver.imageInfo ? { 'dirty-flag': false } : {}),
};
