// FUSE device access for qsd-ts: /dev/fuse, mount(2)/fusermount3, FD cloning, and a polled channel.
#pragma once
#include <napi.h>

namespace qsd {
/** Registers fuseOpen, mount, umount, fusermountMount, fuseCloneFd, FuseChannel and constants. */
void InitFuseDevice(Napi::Env env, Napi::Object exports);
}
