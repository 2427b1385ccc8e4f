// An io_uring whose completions wake the calling thread's own libuv loop (shared by the block
// I/O ring and the FUSE ring).
#pragma once
#include <liburing.h>
#include <napi.h>
#include <uv.h>

namespace qsd {

/**
 * Set up `ring` with `first` (or `fallback` when the kernel refuses those flags with EINVAL), an
 * eventfd registered for its completions, a started uv_poll on that eventfd (calling onPoll with
 * handle->data = data) and an initialised, not yet started uv_prepare for batched submission, all
 * on env's loop. The handles are malloc'ed; the owner closes them. Returns 0, or -errno with
 * *syscall naming the failed call; then nothing is left allocated and *efd is -1.
 */
int OpenLoopRing(napi_env env, unsigned entries, io_uring_params first, io_uring_params fallback, io_uring* ring,
                 int* efd, uv_poll_t** poll, uv_prepare_t** prepare, void* data, uv_poll_cb onPoll,
                 const char** syscall);

}  // namespace qsd
