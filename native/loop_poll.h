// Adaptive busy-polling of the calling thread's libuv loop (QEMU's iothread poll-max-ns).
#pragma once
#include <napi.h>

namespace qsd {
void InitLoopPoll(Napi::Env env, Napi::Object exports);
}
