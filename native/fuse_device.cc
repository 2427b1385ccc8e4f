#include "fuse_device.h"

namespace qsd {
void InitFuseDevice(Napi::Env env, Napi::Object exports) {}
}
