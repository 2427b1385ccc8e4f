// NBD wire protocol constants (the NetworkBlockDevice project's proto.md): magics, flags, opcodes.

/** 'NBDMAGIC': first 8 bytes of the server greeting. */
export const NBD_INIT_MAGIC = 0x4e42444d41474943n;
/** 'IHAVEOPT': newstyle negotiation magic, also prefixes every client option. */
export const NBD_OPTS_MAGIC = 0x49484156454f5054n;
/** Prefix of every option reply. */
export const NBD_REP_MAGIC = 0x0003e889045565a9n;
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

// Handshake flags (server, 16 bit) and client flags (32 bit).
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

// Transmission flags (16 bit).
export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_ROTATIONAL = 1 << 4;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const NBD_FLAG_SEND_DF = 1 << 7;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
export const NBD_FLAG_SEND_RESIZE = 1 << 9;
export const NBD_FLAG_SEND_CACHE = 1 << 10;
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11;

// Options.
export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
export const NBD_OPT_PEEK_EXPORT = 4;
export const NBD_OPT_STARTTLS = 5;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_LIST_META_CONTEXT = 9;
export const NBD_OPT_SET_META_CONTEXT = 10;
export const NBD_OPT_EXTENDED_HEADERS = 11;

/** Option names as QEMU 7.2 prints them in replies (peek export and later options: "<unknown>"). */
export function nbdOptName(opt: number): string {
  switch (opt) {
    case NBD_OPT_EXPORT_NAME: return 'export name';
    case NBD_OPT_ABORT: return 'abort';
    case NBD_OPT_LIST: return 'list';
    case NBD_OPT_STARTTLS: return 'starttls';
    case NBD_OPT_INFO: return 'info';
    case NBD_OPT_GO: return 'go';
    case NBD_OPT_STRUCTURED_REPLY: return 'structured reply';
    case NBD_OPT_LIST_META_CONTEXT: return 'list meta context';
    case NBD_OPT_SET_META_CONTEXT: return 'set meta context';
    default: return '<unknown>';
  }
}

// Option reply types.
export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
export const NBD_REP_META_CONTEXT = 4;
export const NBD_REP_FLAG_ERROR = 0x80000000;
export const NBD_REP_ERR_UNSUP = (NBD_REP_FLAG_ERROR | 1) >>> 0;
export const NBD_REP_ERR_POLICY = (NBD_REP_FLAG_ERROR | 2) >>> 0;
export const NBD_REP_ERR_INVALID = (NBD_REP_FLAG_ERROR | 3) >>> 0;
export const NBD_REP_ERR_PLATFORM = (NBD_REP_FLAG_ERROR | 4) >>> 0;
export const NBD_REP_ERR_TLS_REQD = (NBD_REP_FLAG_ERROR | 5) >>> 0;
export const NBD_REP_ERR_UNKNOWN = (NBD_REP_FLAG_ERROR | 6) >>> 0;
export const NBD_REP_ERR_SHUTDOWN = (NBD_REP_FLAG_ERROR | 7) >>> 0;
export const NBD_REP_ERR_BLOCK_SIZE_REQD = (NBD_REP_FLAG_ERROR | 8) >>> 0;
export const NBD_REP_ERR_TOO_BIG = (NBD_REP_FLAG_ERROR | 9) >>> 0;

// NBD_OPT_INFO / NBD_OPT_GO information types.
export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_NAME = 1;
export const NBD_INFO_DESCRIPTION = 2;
export const NBD_INFO_BLOCK_SIZE = 3;

// Commands.
export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_BLOCK_STATUS = 7;

// Command flags.
export const NBD_CMD_FLAG_FUA = 1 << 0;
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
export const NBD_CMD_FLAG_DF = 1 << 2;
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;

// Structured reply chunk flags and types.
export const NBD_REPLY_FLAG_DONE = 1 << 0;
export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
export const NBD_REPLY_TYPE_ERROR = (1 << 15) | 1;
export const NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2;

// base:allocation extent flags.
export const NBD_STATE_HOLE = 1 << 0;
export const NBD_STATE_ZERO = 1 << 1;

// Error values on the wire (not host errno values, though Linux happens to agree).
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

/** Command names as QEMU prints them in error messages. */
export function nbdCmdName(cmd: number): string {
  switch (cmd) {
    case NBD_CMD_READ: return 'read';
    case NBD_CMD_WRITE: return 'write';
    case NBD_CMD_DISC: return 'disconnect';
    case NBD_CMD_FLUSH: return 'flush';
    case NBD_CMD_TRIM: return 'trim';
    case NBD_CMD_CACHE: return 'cache';
    case NBD_CMD_WRITE_ZEROES: return 'write zeroes';
    case NBD_CMD_BLOCK_STATUS: return 'block status';
    default: return '<unknown>';
  }
}

/** Meta context ids we hand out in NBD_OPT_SET_META_CONTEXT (QEMU's numbering). */
export const NBD_META_ID_BASE_ALLOCATION = 0;
export const NBD_META_ID_ALLOCATION_DEPTH = 1;

/** Largest READ/WRITE payload we accept (QEMU's NBD_MAX_BUFFER_SIZE); also NBD_INFO_BLOCK_SIZE's maximum. */
export const NBD_MAX_BUFFER_SIZE = 32 * 1024 * 1024;
/** Longest export name or description (QEMU's NBD_MAX_STRING_SIZE). */
export const NBD_MAX_STRING_SIZE = 4096;
/** Sizes of the fixed headers. */
export const NBD_REQUEST_SIZE = 28;
export const NBD_SIMPLE_REPLY_SIZE = 16;
export const NBD_CHUNK_HEADER_SIZE = 20;
export const NBD_OPT_HEADER_SIZE = 16;

/** Host errno → NBD wire error, as QEMU's system_errno_to_nbd_errno(). */
export function nbdErrno(errno: number | undefined): number {
  switch (errno) {
    case 0: return 0;
    case 1: case 30: return NBD_EPERM; // EPERM, EROFS
    case 5: return NBD_EIO;
    case 12: return NBD_ENOMEM;
    case 28: case 27: case 122: return NBD_ENOSPC; // ENOSPC, EFBIG, EDQUOT
    case 75: return NBD_EOVERFLOW;
    case 95: return NBD_ENOTSUP;
    case 108: return NBD_ESHUTDOWN;
    case 22: return NBD_EINVAL;
    default: return NBD_EINVAL;
  }
}
