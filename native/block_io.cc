#include "block_io.h"

namespace qsd {
void InitBlockIo(Napi::Env env, Napi::Object exports) {}
}
