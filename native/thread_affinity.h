// CPU affinity of the calling thread (an iothread pins itself to the CPUs whose FUSE ring queues it serves).
#pragma once
#include <napi.h>

namespace qsd {
void InitThreadAffinity(Napi::Env env, Napi::Object exports);
}
