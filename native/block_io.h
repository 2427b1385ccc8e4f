// Backing-file I/O for block drivers: a per-thread io_uring (IoRing) and synchronous helpers.
#pragma once
#include <napi.h>

namespace qsd {
/** Adds IoRing, pread, pwrite, fallocate, fallocateAsync, lseek, fdatasync, blockDeviceSize,
 *  allocAligned and ioConstants to exports. Called once per env (main thread and each worker). */
void InitBlockIo(Napi::Env env, Napi::Object exports);
}  // namespace qsd
