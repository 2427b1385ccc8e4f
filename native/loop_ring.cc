#include "loop_ring.h"

#include <errno.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

namespace qsd {

int OpenLoopRing(napi_env env, unsigned entries, io_uring_params first, io_uring_params fallback, io_uring* ring,
                 int* efd, uv_poll_t** poll, uv_prepare_t** prepare, void* data, uv_poll_cb onPoll,
                 const char** syscall) {
  *efd = -1;
  int r = io_uring_queue_init_params(entries, ring, &first);
  if (r == -EINVAL) r = io_uring_queue_init_params(entries, ring, &fallback);
  if (r < 0) {
    *syscall = "io_uring_setup";
    return r;
  }
  int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    io_uring_queue_exit(ring);
    *syscall = "eventfd";
    return -err;
  }
  r = io_uring_register_eventfd(ring, fd);
  uv_loop_t* loop = nullptr;
  if (r == 0 && napi_get_uv_event_loop(env, &loop) != napi_ok) r = -EINVAL;
  if (r < 0) {
    ::close(fd);
    io_uring_queue_exit(ring);
    *syscall = "io_uring_register";
    return r;
  }
  *efd = fd;
  *poll = static_cast<uv_poll_t*>(malloc(sizeof(uv_poll_t)));
  *prepare = static_cast<uv_prepare_t*>(malloc(sizeof(uv_prepare_t)));
  if (!*poll || !*prepare) abort();
  uv_poll_init(loop, *poll, fd);
  (*poll)->data = data;
  uv_poll_start(*poll, UV_READABLE, onPoll);
  uv_prepare_init(loop, *prepare);
  (*prepare)->data = data;
  return 0;
}

}  // namespace qsd
