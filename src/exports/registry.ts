// Export type registry: adding an export type = its own file + one line here + its schema branch.
import type { BlockExportDriver } from './export.js';
import { fuseExportDriver } from './fuse.js';
import { nbdExportDriver } from './nbd.js';

export const exportDrivers: readonly BlockExportDriver<any>[] = [nbdExportDriver, fuseExportDriver];

export function findExportDriver(type: string): BlockExportDriver<any> | undefined {
  return exportDrivers.find((d) => d.type === type);
}
