// CPU affinity of the calling thread: Node has no API for it, and a worker can only set its own.
#include "thread_affinity.h"

#include <errno.h>
#include <sched.h>
#include <string.h>

namespace qsd {
namespace {

// threadAffinity(): the CPUs the calling thread may run on, ascending.
Napi::Value GetAffinity(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) != 0) {
    Napi::Error::New(env, strerror(errno)).ThrowAsJavaScriptException();
    return env.Undefined();
  }
  Napi::Array cpus = Napi::Array::New(env);
  uint32_t n = 0;
  for (int cpu = 0; cpu < CPU_SETSIZE; cpu++) {
    if (CPU_ISSET(cpu, &set)) cpus.Set(n++, Napi::Number::New(env, cpu));
  }
  return cpus;
}

// setThreadAffinity(cpus): restrict the calling thread (pid 0 = this thread, not the process) to
// cpus; returns 0 or a negative errno (EINVAL when none of them is online).
Napi::Value SetAffinity(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsArray()) {
    Napi::TypeError::New(env, "setThreadAffinity(cpus: number[])").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  Napi::Array cpus = info[0].As<Napi::Array>();
  cpu_set_t set;
  CPU_ZERO(&set);
  for (uint32_t i = 0; i < cpus.Length(); i++) {
    int64_t cpu = cpus.Get(i).ToNumber().Int64Value();
    if (cpu < 0 || cpu >= CPU_SETSIZE) return Napi::Number::New(env, -EINVAL);
    CPU_SET(static_cast<int>(cpu), &set);
  }
  int r = sched_setaffinity(0, sizeof set, &set);
  return Napi::Number::New(env, r == 0 ? 0 : -errno);
}

}  // namespace

void InitThreadAffinity(Napi::Env env, Napi::Object exports) {
  exports.Set("threadAffinity", Napi::Function::New<GetAffinity>(env, "threadAffinity"));
  exports.Set("setThreadAffinity", Napi::Function::New<SetAffinity>(env, "setThreadAffinity"));
}

}  // namespace qsd
