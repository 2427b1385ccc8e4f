// strerror(3) texts for the errnos QEMU's messages embed (Node gives codes, not glibc's words).
import { constants as osConstants } from 'node:os';

const MESSAGES: Record<string, string> = {
  EPERM: 'Operation not permitted',
  ENOENT: 'No such file or directory',
  EIO: 'Input/output error',
  EBADF: 'Bad file descriptor',
  EAGAIN: 'Resource temporarily unavailable',
  ENOMEM: 'Cannot allocate memory',
  EACCES: 'Permission denied',
  EBUSY: 'Device or resource busy',
  EEXIST: 'File exists',
  ENODEV: 'No such device',
  ENOTDIR: 'Not a directory',
  EISDIR: 'Is a directory',
  EINVAL: 'Invalid argument',
  EFBIG: 'File too large',
  ENOSPC: 'No space left on device',
  EROFS: 'Read-only file system',
  ENAMETOOLONG: 'File name too long',
  ENOSYS: 'Function not implemented',
  ELOOP: 'Too many levels of symbolic links',
  ENOTSUP: 'Operation not supported',
  EOPNOTSUPP: 'Operation not supported',
  EADDRINUSE: 'Address already in use',
  EADDRNOTAVAIL: 'Cannot assign requested address',
  ECONNREFUSED: 'Connection refused',
  ENOTCONN: 'Transport endpoint is not connected',
  ENXIO: 'No such device or address',
};

const CODE_BY_ERRNO = new Map<number, string>(
  Object.entries(osConstants.errno).map(([code, value]) => [value, code] as [number, string]),
);

/** glibc's strerror text for an errno number, a code ('ENOENT') or an Error from node:fs/native. */
export function strerror(err: unknown): string {
  let code: string | undefined;
  if (typeof err === 'number') code = CODE_BY_ERRNO.get(Math.abs(err));
  else if (typeof err === 'string') code = err;
  else if (err && typeof err === 'object') {
    const e = err as { code?: unknown; errno?: unknown; message?: string };
    if (typeof e.code === 'string') code = e.code;
    else if (typeof e.errno === 'number') code = CODE_BY_ERRNO.get(Math.abs(e.errno));
    if (!code || !MESSAGES[code]) return MESSAGES[code ?? ''] ?? e.message ?? String(err);
  }
  return (code && MESSAGES[code]) ?? `Unknown error ${String(err)}`;
}

/** The positive errno of an Error from node:fs or the native addon (EIO when unknown). */
export function errnoOf(err: unknown): number {
  const e = err as { errno?: number; code?: string };
  if (typeof e?.errno === 'number') return Math.abs(e.errno);
  const code = e?.code && (osConstants.errno as Record<string, number>)[e.code];
  return typeof code === 'number' ? code : osConstants.errno.EIO;
}
