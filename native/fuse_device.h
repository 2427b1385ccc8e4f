#pragma once
#include <napi.h>

namespace qsd {
void InitFuseDevice(Napi::Env env, Napi::Object exports);
}
