// Version numbers: ours, and the QEMU release whose QMP interface we implement (query-version).
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
export const PACKAGE_VERSION: string = (require('../package.json') as { version: string }).version;

/** The QEMU interface level we follow: multi-threaded FUSE exports arrived in 10.1. */
export const QEMU_VERSION = { major: 10, minor: 1, micro: 0 } as const;
