// Every command handler, one table per schema file.
import type { CommandHandler } from './types.js';
import { controlCommands } from './control.js';
import { blockCoreCommands } from './block-core.js';
import { blockExportCommands } from './block-export.js';
import { qomCommands } from './qom.js';
import { jobCommands } from './job.js';
import { charCommands } from './char.js';
import { blockDebugCommands } from './block-debug.js';
import { blockJobCommands } from './block-jobs.js';
import { blockDirtyBitmapCommands } from './block-dirty-bitmap.js';
import { blockSnapshotInternalCommands } from './block-snapshot-internal.js';
import { blockReopenCommands } from './block-reopen.js';
import { blockdevChangeCommands } from './blockdev-change.js';

export const allCommands: Record<string, CommandHandler> = {
  ...controlCommands,
  ...blockCoreCommands,
  ...blockExportCommands,
  ...qomCommands,
  ...jobCommands,
  ...charCommands,
  ...blockDebugCommands,
  ...blockDirtyBitmapCommands,
  ...blockJobCommands,
  ...blockReopenCommands,
  ...blockdevChangeCommands,
  ...blockSnapshotInternalCommands,
};
