// Block driver registry: adding a driver = its own file + one line here + its schema branch.
import type { BlockDriver } from './driver.js';
import { fileDriver, hostDeviceDriver } from './file.js';
import { nullAioDriver, nullCoDriver } from './null.js';
import { rawDriver } from './raw.js';
import { qcow2Driver } from './qcow2/index.js';
import { blkdebugDriver } from './blkdebug.js';
import { throttleDriver } from './throttle.js';
import { copyOnReadDriver } from './copy-on-read.js';
import { nbdDriver } from './nbd-client/index.js';
import { luksDriver } from './luks/index.js';

export const blockDrivers: readonly BlockDriver[] = [blkdebugDriver, fileDriver, hostDeviceDriver, nullCoDriver, nullAioDriver, rawDriver, qcow2Driver, throttleDriver, copyOnReadDriver, luksDriver, nbdDriver];

export function findBlockDriver(name: string): BlockDriver | undefined {
  return blockDrivers.find((d) => d.name === name);
}
