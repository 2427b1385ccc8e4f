// qsd-ts native addon: the exports table only; each area registers its own functions.
#include <napi.h>
#include "fuse_device.h"
#include "block_io.h"
#include "fuse_uring.h"
#include "thread_affinity.h"
#include "loop_poll.h"

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  qsd::InitFuseDevice(env, exports);
  qsd::InitBlockIo(env, exports);
  qsd::InitFuseUring(env, exports);
  qsd::InitThreadAffinity(env, exports);
  qsd::InitLoopPoll(env, exports);
  return exports;
}

NODE_API_MODULE(qsd_native, Init)
