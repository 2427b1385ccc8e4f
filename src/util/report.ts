// QEMU's error_report(): one line on stderr, prefixed with the program name.

export const PROGRAM_NAME = 'qsd-ts';

export function errorReport(message: string): void {
  process.stderr.write(`${PROGRAM_NAME}: ${message}\n`);
}
