// QEMU's error_report(): one line on stderr, prefixed with the program name.
import path from 'node:path';

/**
 * argv[0] as the user typed it (the launcher passes it in QSD_TS_ARGV0). getopt's messages
 * ("unrecognized option") print it verbatim, as QEMU's daemon does.
 */
export const ARGV0 = process.env.QSD_TS_ARGV0 || 'qsd-ts';

/** The basename of argv[0]: QEMU's error_report() prefix and the name in --help/--version. */
export const PROGRAM_NAME = path.basename(ARGV0) || 'qsd-ts';

export function errorReport(message: string): void {
  process.stderr.write(`${PROGRAM_NAME}: ${message}\n`);
}
