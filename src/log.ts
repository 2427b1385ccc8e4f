// Structured logging (pino): quiet by default; --trace or QSD_TS_LOG=debug turns it up.
// Users see QEMU-style error lines on stderr; these logs are for debugging the daemon.
import pino from 'pino';

export const log = pino(
  { name: 'qsd-ts', level: process.env.QSD_TS_LOG ?? 'silent', base: { pid: process.pid } },
  pino.destination({ fd: 2, sync: true }),
);

export function setLogLevel(level: string): void {
  log.level = level;
}
