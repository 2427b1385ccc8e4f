// Structured logging (pino): quiet by default; QSD_TS_LOG=debug (any pino level) turns it up.
// (--trace parses QEMU's trace options as a build without a trace backend does; it logs nothing.)
// Users see QEMU-style error lines on stderr; these logs are for debugging the daemon.
import pino from 'pino';

export const log = pino(
  { name: 'qsd-ts', level: process.env.QSD_TS_LOG ?? 'silent', base: { pid: process.pid } },
  pino.destination({ fd: 2, sync: true }),
);
