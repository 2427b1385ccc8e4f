// Adaptive busy-polling of an iothread's libuv loop, as QEMU's aio_poll does for iothreads
// (poll-max-ns, poll-grow, poll-shrink).
//
// Why: on this VM a thread that sleeps in epoll_wait costs 40-80 µs to wake from another vCPU,
// which is most of a queue-depth-1 request's round trip. Before the loop would block, a prepare
// hook polls the loop's own epoll fd (so every handle counts: FUSE fds, io_uring eventfds,
// sockets, the worker's message port) for up to poll_ns; when something is ready the loop goes
// on without sleeping. poll_ns adapts as in QEMU: it grows while the waits end a little after
// the polling window, and shrinks when the loop then blocks longer than poll-max-ns.
#include "loop_poll.h"

#include <poll.h>
#include <stdint.h>
#include <time.h>
#include <uv.h>

namespace qsd {
namespace {

// QEMU's initial polling time when growing from 0 (aio-posix.c).
constexpr int64_t kInitialPollNs = 4000;
// A sleeping wait is judged against poll-max-ns times this (see OnCheck).
constexpr int64_t kWakeAllowance = 4;

struct LoopPoll {
  uv_loop_t* loop = nullptr;
  uv_prepare_t prepare;
  uv_check_t check;
  int64_t maxNs = 0;
  int64_t grow = 0;    // 0: QEMU's default factor 2
  int64_t shrink = 0;  // 0: drop to 0 at once, as QEMU does
  int64_t pollNs = 0;
  int64_t waitStart = 0;  // when the prepare hook started polling, 0 when the loop did not block
};

int64_t NowNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

void OnPrepare(uv_prepare_t* handle) {
  auto* s = static_cast<LoopPoll*>(handle->data);
  // Work already pending (setImmediate, closing handles): the loop will not block, so no polling.
  if (s->maxNs == 0 || uv_backend_timeout(s->loop) == 0) {
    s->waitStart = 0;
    return;
  }
  int64_t start = NowNs();
  s->waitStart = start;
  if (s->pollNs == 0) return;
  pollfd p = {uv_backend_fd(s->loop), POLLIN, 0};
  int64_t deadline = start + s->pollNs;
  do {
    if (poll(&p, 1, 0) > 0) return;  // ready: libuv's epoll_wait returns without sleeping
  } while (NowNs() < deadline);
}

// Runs right after the loop's poll phase: adjust the window from how long the wait lasted.
void OnCheck(uv_check_t* handle) {
  auto* s = static_cast<LoopPoll*>(handle->data);
  if (s->waitStart == 0) return;
  int64_t blockNs = NowNs() - s->waitStart;
  s->waitStart = 0;
  if (blockNs <= s->pollNs) return;  // polling found the event: keep the window
  // QEMU compares the wait with poll-max-ns itself. A wait that ended in a sleep also paid for
  // waking this vCPU from halt (40-80 us on this VM), which polling would not pay: judge the
  // wait with that allowance, or a window never grows where the round trip is longer than the
  // default 32 us only because of the wake-ups it would save.
  int64_t limit = s->maxNs * kWakeAllowance;
  if (blockNs > limit) {
    // The loop slept long: polling only burns CPU at this load.
    s->pollNs = s->shrink > 1 ? s->pollNs / s->shrink : 0;
  } else if (s->pollNs < s->maxNs) {
    // The event came shortly after the window closed: a longer window would have caught it.
    int64_t next = s->pollNs == 0 ? kInitialPollNs : s->pollNs * (s->grow > 1 ? s->grow : 2);
    s->pollNs = next > s->maxNs ? s->maxNs : next;
  }
}

// This thread's poller (one loop per thread), created by the first setLoopPolling.
thread_local LoopPoll* threadPoll = nullptr;

// The thread is ending. No close callback: libuv runs close callbacks after the env's cleanup,
// when this addon may already be unloaded (a worker that alone loaded it), so the few bytes of
// LoopPoll stay allocated, once per thread that polled.
void CleanupHook(void* arg) {
  auto* s = static_cast<LoopPoll*>(arg);
  uv_close(reinterpret_cast<uv_handle_t*>(&s->prepare), nullptr);
  uv_close(reinterpret_cast<uv_handle_t*>(&s->check), nullptr);
  threadPoll = nullptr;
}

// setLoopPolling(maxNs, grow, shrink): poll this thread's loop adaptively for up to maxNs before
// it blocks; maxNs 0 turns polling off. Returns 0 or a negative errno.
Napi::Value SetLoopPolling(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 3 || !info[0].IsNumber() || !info[1].IsNumber() || !info[2].IsNumber()) {
    Napi::TypeError::New(env, "setLoopPolling(maxNs, grow, shrink)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  if (!threadPoll) {
    uv_loop_t* loop = nullptr;
    if (napi_get_uv_event_loop(env, &loop) != napi_ok || !loop) return Napi::Number::New(env, -22);
    auto* s = new LoopPoll();
    s->loop = loop;
    uv_prepare_init(loop, &s->prepare);
    uv_check_init(loop, &s->check);
    s->prepare.data = s;
    s->check.data = s;
    uv_prepare_start(&s->prepare, OnPrepare);
    uv_check_start(&s->check, OnCheck);
    // Polling must never keep a thread alive that has nothing else to do.
    uv_unref(reinterpret_cast<uv_handle_t*>(&s->prepare));
    uv_unref(reinterpret_cast<uv_handle_t*>(&s->check));
    napi_add_env_cleanup_hook(env, CleanupHook, s);
    threadPoll = s;
  }
  LoopPoll* s = threadPoll;
  s->maxNs = info[0].As<Napi::Number>().Int64Value();
  s->grow = info[1].As<Napi::Number>().Int64Value();
  s->shrink = info[2].As<Napi::Number>().Int64Value();
  if (s->maxNs < 0) s->maxNs = 0;
  if (s->pollNs > s->maxNs) s->pollNs = s->maxNs;
  return Napi::Number::New(env, 0);
}

// loopPollingNs(): the current adaptive window of this thread's loop (for tests), -1 if none.
Napi::Value LoopPollingNs(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), threadPoll ? static_cast<double>(threadPoll->pollNs) : -1);
}

}  // namespace

void InitLoopPoll(Napi::Env env, Napi::Object exports) {
  exports.Set("setLoopPolling", Napi::Function::New<SetLoopPolling>(env, "setLoopPolling"));
  exports.Set("loopPollingNs", Napi::Function::New<LoopPollingNs>(env, "loopPollingNs"));
}

}  // namespace qsd
