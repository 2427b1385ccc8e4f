// FUSE kernel protocol 7.x (as Linux 6.18 speaks it, 7.45): struct layouts as byte offsets, and constants.
// Offsets are relative to the start of each struct; all fields are little-endian.

/** The protocol we speak; replies use min(this, kernel's minor). */
export const FUSE_KERNEL_VERSION = 7;
export const FUSE_KERNEL_MINOR_VERSION = 45;
/** Oldest minor we accept (QEMU's rule; older ones used different struct sizes). */
export const FUSE_MIN_MINOR_VERSION = 9;
/** init_out size below minor 23 (FUSE_COMPAT_22_INIT_OUT_SIZE). */
export const FUSE_COMPAT_22_INIT_OUT_SIZE = 24;
/** The kernel's read() refuses buffers smaller than this (or max_write + 80). */
export const FUSE_MIN_READ_BUFFER = 8192;
/** Node id of the root (our only) inode. */
export const FUSE_ROOT_ID = 1;

// ---- opcodes (enum fuse_opcode) ----
export const FUSE_LOOKUP = 1;
export const FUSE_FORGET = 2;
export const FUSE_GETATTR = 3;
export const FUSE_SETATTR = 4;
export const FUSE_READLINK = 5;
export const FUSE_SYMLINK = 6;
export const FUSE_MKNOD = 8;
export const FUSE_MKDIR = 9;
export const FUSE_UNLINK = 10;
export const FUSE_RMDIR = 11;
export const FUSE_RENAME = 12;
export const FUSE_LINK = 13;
export const FUSE_OPEN = 14;
export const FUSE_READ = 15;
export const FUSE_WRITE = 16;
export const FUSE_STATFS = 17;
export const FUSE_RELEASE = 18;
export const FUSE_FSYNC = 20;
export const FUSE_SETXATTR = 21;
export const FUSE_GETXATTR = 22;
export const FUSE_LISTXATTR = 23;
export const FUSE_REMOVEXATTR = 24;
export const FUSE_FLUSH = 25;
export const FUSE_INIT = 26;
export const FUSE_OPENDIR = 27;
export const FUSE_READDIR = 28;
export const FUSE_RELEASEDIR = 29;
export const FUSE_FSYNCDIR = 30;
export const FUSE_GETLK = 31;
export const FUSE_SETLK = 32;
export const FUSE_SETLKW = 33;
export const FUSE_ACCESS = 34;
export const FUSE_CREATE = 35;
export const FUSE_INTERRUPT = 36;
export const FUSE_BMAP = 37;
export const FUSE_DESTROY = 38;
export const FUSE_IOCTL = 39;
export const FUSE_POLL = 40;
export const FUSE_NOTIFY_REPLY = 41;
export const FUSE_BATCH_FORGET = 42;
export const FUSE_FALLOCATE = 43;
export const FUSE_READDIRPLUS = 44;
export const FUSE_RENAME2 = 45;
export const FUSE_LSEEK = 46;
export const FUSE_COPY_FILE_RANGE = 47;
export const FUSE_SETUPMAPPING = 48;
export const FUSE_REMOVEMAPPING = 49;
export const FUSE_SYNCFS = 50;
export const FUSE_TMPFILE = 51;
export const FUSE_STATX = 52;
export const FUSE_COPY_FILE_RANGE_64 = 53;

// ---- struct fuse_in_header (40 bytes) ----
export const IN_HEADER_SIZE = 40;
export const IN_LEN = 0; // u32: total request length, header included
export const IN_OPCODE = 4; // u32
export const IN_UNIQUE = 8; // u64
export const IN_NODEID = 16; // u64
export const IN_UID = 24; // u32
export const IN_GID = 28; // u32
export const IN_PID = 32; // u32
export const IN_TOTAL_EXTLEN = 36; // u16, in units of 8 bytes (7.38)

// ---- struct fuse_out_header (16 bytes) ----
export const OUT_HEADER_SIZE = 16;
export const OUT_LEN = 0; // u32
export const OUT_ERROR = 4; // i32: 0 or -errno, in (-512, 0]
export const OUT_UNIQUE = 8; // u64

// ---- INIT: struct fuse_init_in (compat layout, 16 bytes; 64 since 7.36) ----
export const INIT_IN_COMPAT_SIZE = 16;
export const INIT_IN_MAJOR = 0;
export const INIT_IN_MINOR = 4;
export const INIT_IN_MAX_READAHEAD = 8;
export const INIT_IN_FLAGS = 12;
export const INIT_IN_FLAGS2 = 16; // only with FUSE_INIT_EXT

// ---- struct fuse_init_out (64 bytes) ----
export const INIT_OUT_SIZE = 64;
export const INIT_OUT_MAJOR = 0;
export const INIT_OUT_MINOR = 4;
export const INIT_OUT_MAX_READAHEAD = 8;
export const INIT_OUT_FLAGS = 12;
export const INIT_OUT_MAX_BACKGROUND = 16; // u16
export const INIT_OUT_CONGESTION_THRESHOLD = 18; // u16
export const INIT_OUT_MAX_WRITE = 20;
export const INIT_OUT_TIME_GRAN = 24;
export const INIT_OUT_MAX_PAGES = 28; // u16
export const INIT_OUT_MAP_ALIGNMENT = 30; // u16
export const INIT_OUT_FLAGS2 = 32;
export const INIT_OUT_MAX_STACK_DEPTH = 36; // 7.40
export const INIT_OUT_REQUEST_TIMEOUT = 40; // u16, 7.43

// ---- INIT flags (low 32 bits; flags2 holds bits 32-63) ----
export const FUSE_ASYNC_READ = 1 << 0;
export const FUSE_POSIX_LOCKS = 1 << 1;
export const FUSE_FILE_OPS = 1 << 2;
export const FUSE_ATOMIC_O_TRUNC = 1 << 3;
export const FUSE_EXPORT_SUPPORT = 1 << 4;
export const FUSE_BIG_WRITES = 1 << 5;
export const FUSE_DONT_MASK = 1 << 6;
export const FUSE_SPLICE_WRITE = 1 << 7;
export const FUSE_SPLICE_MOVE = 1 << 8;
export const FUSE_SPLICE_READ = 1 << 9;
export const FUSE_FLOCK_LOCKS = 1 << 10;
export const FUSE_HAS_IOCTL_DIR = 1 << 11;
export const FUSE_AUTO_INVAL_DATA = 1 << 12;
export const FUSE_DO_READDIRPLUS = 1 << 13;
export const FUSE_READDIRPLUS_AUTO = 1 << 14;
export const FUSE_ASYNC_DIO = 1 << 15;
export const FUSE_WRITEBACK_CACHE = 1 << 16;
export const FUSE_NO_OPEN_SUPPORT = 1 << 17;
export const FUSE_PARALLEL_DIROPS = 1 << 18;
export const FUSE_HANDLE_KILLPRIV = 1 << 19;
export const FUSE_POSIX_ACL = 1 << 20;
export const FUSE_ABORT_ERROR = 1 << 21;
export const FUSE_MAX_PAGES = 1 << 22;
export const FUSE_CACHE_SYMLINKS = 1 << 23;
export const FUSE_NO_OPENDIR_SUPPORT = 1 << 24;
export const FUSE_EXPLICIT_INVAL_DATA = 1 << 25;
export const FUSE_MAP_ALIGNMENT = 1 << 26;
export const FUSE_SUBMOUNTS = 1 << 27;
export const FUSE_HANDLE_KILLPRIV_V2 = 1 << 28;
export const FUSE_SETXATTR_EXT = 1 << 29;
export const FUSE_INIT_EXT = 1 << 30;
export const FUSE_INIT_RESERVED = 2 ** 31;
// flags2 bits (bit n here is bit n+32 of the 64-bit flags); newer than bookworm's 7.38 header.
export const FUSE2_SECURITY_CTX = 1 << 0;
export const FUSE2_HAS_INODE_DAX = 1 << 1;
export const FUSE2_CREATE_SUPP_GROUP = 1 << 2;
export const FUSE2_HAS_EXPIRE_ONLY = 1 << 3;
export const FUSE2_DIRECT_IO_ALLOW_MMAP = 1 << 4;
export const FUSE2_PASSTHROUGH = 1 << 5;
export const FUSE2_NO_EXPORT_SUPPORT = 1 << 6;
export const FUSE2_HAS_RESEND = 1 << 7;
export const FUSE2_ALLOW_IDMAP = 1 << 8;
export const FUSE2_OVER_IO_URING = 1 << 9;
export const FUSE2_REQUEST_TIMEOUT = 1 << 10;

// ---- struct fuse_attr (88 bytes) inside struct fuse_attr_out (104 bytes) ----
export const ATTR_OUT_SIZE = 104;
export const ATTR_OUT_ATTR_VALID = 0; // u64 seconds
export const ATTR_OUT_ATTR_VALID_NSEC = 8; // u32
export const ATTR_OUT_ATTR = 16;
export const ATTR_INO = 0; // u64
export const ATTR_SIZE = 8; // u64
export const ATTR_BLOCKS = 16; // u64
export const ATTR_ATIME = 24; // u64
export const ATTR_MTIME = 32; // u64
export const ATTR_CTIME = 40; // u64
export const ATTR_ATIMENSEC = 48; // u32
export const ATTR_MTIMENSEC = 52; // u32
export const ATTR_CTIMENSEC = 56; // u32
export const ATTR_MODE = 60; // u32
export const ATTR_NLINK = 64; // u32
export const ATTR_UID = 68; // u32
export const ATTR_GID = 72; // u32
export const ATTR_RDEV = 76; // u32
export const ATTR_BLKSIZE = 80; // u32
export const ATTR_FLAGS = 84; // u32

// ---- struct fuse_setattr_in (88 bytes) ----
export const SETATTR_IN_SIZE = 88;
export const SETATTR_VALID = 0; // u32, FATTR_* bits
export const SETATTR_FH = 8; // u64
export const SETATTR_SIZE = 16; // u64
export const SETATTR_LOCK_OWNER = 24; // u64
export const SETATTR_ATIME = 32;
export const SETATTR_MTIME = 40;
export const SETATTR_CTIME = 48;
export const SETATTR_MODE = 68; // u32
export const SETATTR_UID = 76; // u32
export const SETATTR_GID = 80; // u32

export const FATTR_MODE = 1 << 0;
export const FATTR_UID = 1 << 1;
export const FATTR_GID = 1 << 2;
export const FATTR_SIZE = 1 << 3;
export const FATTR_ATIME = 1 << 4;
export const FATTR_MTIME = 1 << 5;
export const FATTR_FH = 1 << 6;
export const FATTR_ATIME_NOW = 1 << 7;
export const FATTR_MTIME_NOW = 1 << 8;
export const FATTR_LOCKOWNER = 1 << 9;
export const FATTR_CTIME = 1 << 10;
export const FATTR_KILL_SUIDGID = 1 << 11;

// ---- OPEN: struct fuse_open_in (8 bytes), struct fuse_open_out (16 bytes) ----
export const OPEN_IN_SIZE = 8;
export const OPEN_IN_FLAGS = 0;
export const OPEN_OUT_SIZE = 16;
export const OPEN_OUT_FH = 0; // u64
export const OPEN_OUT_OPEN_FLAGS = 8; // u32
export const OPEN_OUT_BACKING_ID = 12; // i32 (7.40)

export const FOPEN_DIRECT_IO = 1 << 0;
export const FOPEN_KEEP_CACHE = 1 << 1;
export const FOPEN_NONSEEKABLE = 1 << 2;
export const FOPEN_CACHE_DIR = 1 << 3;
export const FOPEN_STREAM = 1 << 4;
export const FOPEN_NOFLUSH = 1 << 5;
export const FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6;
export const FOPEN_PASSTHROUGH = 1 << 7;

// ---- READ / WRITE: struct fuse_read_in, struct fuse_write_in (40 bytes each) ----
export const READ_IN_SIZE = 40;
export const WRITE_IN_SIZE = 40;
export const RW_IN_FH = 0; // u64
export const RW_IN_OFFSET = 8; // u64
export const RW_IN_SIZE = 16; // u32
export const RW_IN_FLAGS = 20; // u32: read_flags / write_flags
/** WRITE payload offset in a request: in_header + write_in. */
export const WRITE_DATA_OFFSET = IN_HEADER_SIZE + WRITE_IN_SIZE;
export const WRITE_OUT_SIZE = 8;
export const WRITE_OUT_SIZE_FIELD = 0; // u32

// ---- FALLOCATE: struct fuse_fallocate_in (32 bytes) ----
export const FALLOCATE_IN_SIZE = 32;
export const FALLOCATE_FH = 0;
export const FALLOCATE_OFFSET = 8; // u64
export const FALLOCATE_LENGTH = 16; // u64
export const FALLOCATE_MODE = 24; // u32

export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_NO_HIDE_STALE = 0x04;
export const FALLOC_FL_COLLAPSE_RANGE = 0x08;
export const FALLOC_FL_ZERO_RANGE = 0x10;
export const FALLOC_FL_INSERT_RANGE = 0x20;
export const FALLOC_FL_UNSHARE_RANGE = 0x40;

// ---- LSEEK: struct fuse_lseek_in (24 bytes), struct fuse_lseek_out (8 bytes) ----
export const LSEEK_IN_SIZE = 24;
export const LSEEK_IN_OFFSET = 8; // u64
export const LSEEK_IN_WHENCE = 16; // u32
export const LSEEK_OUT_SIZE = 8;
export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;

// ---- STATFS: struct fuse_statfs_out = struct fuse_kstatfs (80 bytes) ----
export const STATFS_OUT_SIZE = 80;
export const KSTATFS_BLOCKS = 0; // u64
export const KSTATFS_BFREE = 8;
export const KSTATFS_BAVAIL = 16;
export const KSTATFS_FILES = 24;
export const KSTATFS_FFREE = 32;
export const KSTATFS_BSIZE = 40; // u32
export const KSTATFS_NAMELEN = 44; // u32
export const KSTATFS_FRSIZE = 48; // u32

// ---- File mode bits ----
export const S_IFREG = 0o100000;
export const S_IRWXG = 0o070;
export const S_IRWXO = 0o007;
export const S_IRUSR = 0o400;
export const S_IWUSR = 0o200;
export const S_IWGRP = 0o020;
export const S_IWOTH = 0o002;
