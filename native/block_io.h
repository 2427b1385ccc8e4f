#pragma once
#include <napi.h>

namespace qsd {
void InitBlockIo(Napi::Env env, Napi::Object exports);
}
