// Backing-file I/O: one io_uring per JS thread reaped on that thread's own libuv loop, plus sync helpers.
//
// Why this shape (see docs/ARCHITECTURE.md and the measured notes): any thread hop per request costs
// 30-90 us on this VM, so the ring lives in the thread that issues the I/O. Its completions wake
// that same thread's loop through an eventfd (uv_poll), and all SQEs queued during one loop
// iteration are submitted in one io_uring_enter from a uv_prepare handle just before the loop
// blocks.
#include "block_io.h"
#include "loop_ring.h"

#include <sys/mman.h>
#include <sys/uio.h>

#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <uv.h>

#include <memory>
#include <string>
#include <vector>

namespace qsd {
namespace {

// user_data of our own cancel SQE; JS tags are 32-bit, so this can never collide with one.
constexpr uint64_t kCancelTag = 1ull << 32;

Napi::Error ErrnoError(Napi::Env env, int err, const char* syscall) {
  const char* name = strerrorname_np(err);
  std::string msg = std::string(name ? name : "EUNKNOWN") + ": " + strerror(err) + ", " + syscall;
  Napi::Error e = Napi::Error::New(env, msg);
  e.Set("errno", Napi::Number::New(env, err));
  e.Set("code", Napi::String::New(env, name ? name : "EUNKNOWN"));
  e.Set("syscall", Napi::String::New(env, syscall));
  return e;
}

Napi::Value ThrowErrno(Napi::Env env, int err, const char* syscall) {
  ErrnoError(env, err, syscall).ThrowAsJavaScriptException();
  return env.Undefined();
}

Napi::Value ThrowType(Napi::Env env, const char* what) {
  Napi::TypeError::New(env, what).ThrowAsJavaScriptException();
  return env.Undefined();
}

// Raw Node-API argument readers: they cost less than the C++ wrappers on the per-request path
// and report a wrong type instead of silently reading 0.
bool ArgInt32(napi_env env, napi_value v, int32_t* out) {
  return napi_get_value_int32(env, v, out) == napi_ok;
}

bool ArgInt64(napi_env env, napi_value v, int64_t* out) {
  return napi_get_value_int64(env, v, out) == napi_ok;
}

bool ArgBuffer(napi_env env, napi_value v, uint8_t** data, size_t* len) {
  void* p = nullptr;
  if (napi_get_buffer_info(env, v, &p, len) != napi_ok) return false;
  *data = static_cast<uint8_t*>(p);
  return true;
}

// free() as a uv_close_cb: same ABI (one pointer argument, no result).
uv_close_cb FreeHandle() { return reinterpret_cast<uv_close_cb>(reinterpret_cast<void (*)()>(&free)); }

class IoRing : public Napi::ObjectWrap<IoRing> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "IoRing",
                       {
                           InstanceMethod<&IoRing::Read>("read"),
                           InstanceMethod<&IoRing::Write>("write"),
                           InstanceMethod<&IoRing::Fsync>("fsync"),
                           InstanceMethod<&IoRing::Fallocate>("fallocate"),
                           InstanceMethod<&IoRing::SubmitJs>("submit"),
                           InstanceMethod<&IoRing::CloseJs>("close"),
                           InstanceAccessor<&IoRing::Pending>("pending"),
                       });
  }

  explicit IoRing(const Napi::CallbackInfo& info) : Napi::ObjectWrap<IoRing>(info), env_(info.Env()) {
    Napi::Env env = info.Env();
    uint32_t entries = 0;
    if (info.Length() < 2 || napi_get_value_uint32(env, info[0], &entries) != napi_ok || entries == 0 ||
        !info[1].IsFunction()) {
      ThrowType(env, "IoRing(entries: number > 0, onComplete: function)");
      return;
    }
    // SUBMIT_ALL: a bad SQE must not leave the ones behind it unsubmitted. SINGLE_ISSUER: only
    // this thread ever enters the ring. Older kernels reject these flags; then go without.
    io_uring_params first, fallback;
    memset(&first, 0, sizeof first);
    memset(&fallback, 0, sizeof fallback);
    first.flags = IORING_SETUP_SUBMIT_ALL | IORING_SETUP_SINGLE_ISSUER;
    const char* syscall = nullptr;
    int r = OpenLoopRing(env, entries, first, fallback, &ring_, &efd_, &poll_, &prepare_, this, OnPoll, &syscall);
    if (r < 0) {
      ThrowErrno(env, -r, syscall);
      return;
    }
    uv_unref(reinterpret_cast<uv_handle_t*>(poll_));  // idle ring: don't keep the loop alive

    cap_ = ring_.cq.ring_entries;
    Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(env, size_t(cap_) * 8);
    Napi::Int32Array tags = Napi::Int32Array::New(env, cap_, ab, 0);
    Napi::Int32Array results = Napi::Int32Array::New(env, cap_, ab, size_t(cap_) * 4);
    tags_ = static_cast<int32_t*>(ab.Data());
    results_ = tags_ + cap_;
    tagsRef_ = Napi::Persistent(tags);
    resultsRef_ = Napi::Persistent(results);
    onComplete_ = Napi::Persistent(info[1].As<Napi::Function>());
    asyncCtx_ = std::make_unique<Napi::AsyncContext>(env, "qsd:IoRing", info.This().As<Napi::Object>());
    // A worker exiting with our uv handles open aborts the whole process; close them first.
    napi_add_env_cleanup_hook(env, CleanupHook, this);
    open_ = true;
  }

  ~IoRing() override { Close(false, false); }

 private:
  Napi::Value Read(const Napi::CallbackInfo& info) { return QueueRw(info, true); }
  Napi::Value Write(const Napi::CallbackInfo& info) { return QueueRw(info, false); }

  // read/write(fd, buf, offset, tag): IORING_OP_READ/WRITE on the Buffer's own memory; the
  // caller keeps buf alive until the tag completes.
  Napi::Value QueueRw(const Napi::CallbackInfo& info, bool isRead) {
    napi_env env = info.Env();
    int32_t fd, tag;
    int64_t offset;
    uint8_t* data;
    size_t len;
    if (info.Length() < 4 || !ArgInt32(env, info[0], &fd) || !ArgBuffer(env, info[1], &data, &len) ||
        !ArgInt64(env, info[2], &offset) || !ArgInt32(env, info[3], &tag)) {
      return ThrowType(info.Env(), "expected (fd, buffer, offset, tag)");
    }
    if (!open_) return Napi::Number::New(env, -EBADF);
    // A negative offset would mean "current file position" to the kernel; a single SQE carries
    // at most 2^31-1 bytes in its s32 result.
    if (offset < 0 || len > 0x7fffffff) return Napi::Number::New(env, -EINVAL);
    io_uring_sqe* sqe = GetSqe();
    if (!sqe) return Napi::Number::New(env, -EBUSY);
    if (isRead) {
      io_uring_prep_read(sqe, fd, data, unsigned(len), uint64_t(offset));
    } else {
      io_uring_prep_write(sqe, fd, data, unsigned(len), uint64_t(offset));
    }
    Queued(sqe, tag);
    return Napi::Number::New(env, 0);
  }

  Napi::Value Fsync(const Napi::CallbackInfo& info) {
    napi_env env = info.Env();
    int32_t fd, tag;
    if (info.Length() < 3 || !ArgInt32(env, info[0], &fd) || !ArgInt32(env, info[2], &tag)) {
      return ThrowType(info.Env(), "expected (fd, datasync, tag)");
    }
    if (!open_) return Napi::Number::New(env, -EBADF);
    io_uring_sqe* sqe = GetSqe();
    if (!sqe) return Napi::Number::New(env, -EBUSY);
    io_uring_prep_fsync(sqe, fd, info[1].ToBoolean().Value() ? IORING_FSYNC_DATASYNC : 0);
    Queued(sqe, tag);
    return Napi::Number::New(env, 0);
  }

  Napi::Value Fallocate(const Napi::CallbackInfo& info) {
    napi_env env = info.Env();
    int32_t fd, mode, tag;
    int64_t offset, length;
    if (info.Length() < 5 || !ArgInt32(env, info[0], &fd) || !ArgInt32(env, info[1], &mode) ||
        !ArgInt64(env, info[2], &offset) || !ArgInt64(env, info[3], &length) || !ArgInt32(env, info[4], &tag)) {
      return ThrowType(info.Env(), "expected (fd, mode, offset, length, tag)");
    }
    if (!open_) return Napi::Number::New(env, -EBADF);
    if (offset < 0 || length < 0) return Napi::Number::New(env, -EINVAL);
    io_uring_sqe* sqe = GetSqe();
    if (!sqe) return Napi::Number::New(env, -EBUSY);
    io_uring_prep_fallocate(sqe, fd, mode, uint64_t(offset), uint64_t(length));
    Queued(sqe, tag);
    return Napi::Number::New(env, 0);
  }

  Napi::Value SubmitJs(const Napi::CallbackInfo& info) {
    if (!open_) return Napi::Number::New(info.Env(), -EBADF);
    return Napi::Number::New(info.Env(), SubmitNow());
  }

  Napi::Value CloseJs(const Napi::CallbackInfo& info) {
    Close(true, false);
    return info.Env().Undefined();
  }

  Napi::Value Pending(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), pending_); }

  // An SQE, submitting what is queued once to make room if the SQ is full; nullptr if still full.
  io_uring_sqe* GetSqe() {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (!sqe) {
      SubmitNow();
      sqe = io_uring_get_sqe(&ring_);
    }
    return sqe;
  }

  void Queued(io_uring_sqe* sqe, int32_t tag) {
    io_uring_sqe_set_data64(sqe, uint64_t(uint32_t(tag)));
    if (pending_++ == 0) {
      // In-flight I/O keeps the loop (and this object, which JS may have dropped) alive.
      uv_ref(reinterpret_cast<uv_handle_t*>(poll_));
      Ref();
    }
    if (!prepareActive_) {
      uv_prepare_start(prepare_, OnPrepare);
      prepareActive_ = true;
    }
  }

  int SubmitNow() {
    int r;
    do {
      r = io_uring_submit(&ring_);
    } while (r == -EINTR);
    // On EBUSY/EAGAIN (the kernel is short of resources or the CQ overflowed) the SQEs stay
    // queued and the prepare handle stays active: completions will wake us and we retry.
    if (prepareActive_ && io_uring_sq_ready(&ring_) == 0) {
      uv_prepare_stop(prepare_);
      prepareActive_ = false;
    }
    return r;
  }

  static void OnPrepare(uv_prepare_t* h) { static_cast<IoRing*>(h->data)->SubmitNow(); }

  static void OnPoll(uv_poll_t* h, int status, int events) {
    static_cast<IoRing*>(h->data)->OnReadable();
  }

  // Moves up to cap ready CQEs (flushing the kernel's overflow list when it has one) into
  // tags/results; returns how many JS requests completed.
  unsigned Reap(int32_t* tags, int32_t* results, unsigned cap) {
    unsigned n = 0;
    for (;;) {
      unsigned head, seen = 0;
      io_uring_cqe* cqe;
      io_uring_for_each_cqe(&ring_, head, cqe) {
        if (n == cap) break;
        if (cqe->user_data != kCancelTag) {
          tags[n] = int32_t(uint32_t(cqe->user_data));
          results[n] = cqe->res;
          n++;
        }
        seen++;
      }
      io_uring_cq_advance(&ring_, seen);
      // IORING_FEAT_NODROP keeps CQEs that did not fit in an overflow list; entering the
      // kernel with GETEVENTS moves them into the CQ.
      if (n < cap && io_uring_cq_has_overflow(&ring_) && io_uring_get_events(&ring_) == 0 &&
          io_uring_cq_ready(&ring_) > 0) {
        continue;
      }
      break;
    }
    Completed(n);
    return n;
  }

  void Completed(unsigned n) {
    if (n == 0) return;
    pending_ -= n;
    if (pending_ == 0) {
      uv_unref(reinterpret_cast<uv_handle_t*>(poll_));
      Unref();
    }
  }

  void OnReadable() {
    uint64_t v;
    while (::read(efd_, &v, sizeof v) < 0 && errno == EINTR) {
    }
    Napi::Env env(env_);
    Napi::HandleScope scope(env);
    Napi::Object self = Value();  // keeps this object alive while JS runs
    for (;;) {
      unsigned n = Reap(tags_, results_, cap_);
      if (n == 0) return;
      // MakeCallback, not Call: promise continuations queued by onComplete must run before
      // the loop goes back to sleep.
      // Raw Node-API: the C++ wrapper aborts the process when the call fails, and it does fail
      // in a worker being terminated (its loop still runs once while JS can no longer run).
      napi_value argv[3] = {Napi::Number::New(env, n), tagsRef_.Value(), resultsRef_.Value()};
      napi_value result;
      if (napi_make_callback(env_, *asyncCtx_, self, onComplete_.Value(), 3, argv, &result) != napi_ok) {
        bool pending = false;
        napi_value err;
        if (napi_is_exception_pending(env_, &pending) == napi_ok && pending &&
            napi_get_and_clear_last_exception(env_, &err) == napi_ok) {
          napi_fatal_exception(env_, err);  // onComplete threw: an uncaught exception, as for any callback
        }
      }
      if (!open_) return;
      if (n < cap_ && io_uring_cq_ready(&ring_) == 0 && !io_uring_cq_has_overflow(&ring_)) return;
    }
  }

  static void CleanupHook(void* arg) { static_cast<IoRing*>(arg)->Close(false, true); }

  // Cancels and waits for everything in flight (the kernel must not touch JS buffers after we
  // return), reports those completions to JS when callJs, then releases the ring and handles.
  void Close(bool callJs, bool inCleanupHook) {
    if (!open_) return;
    open_ = false;
    std::vector<int32_t> tags, results;
    if (pending_ > 0) {
      io_uring_sqe* sqe = GetSqe();
      if (sqe) {
        io_uring_prep_cancel64(sqe, 0, IORING_ASYNC_CANCEL_ANY);
        io_uring_sqe_set_data64(sqe, kCancelTag);
      }
      SubmitNow();
      // Requests that cannot be cancelled (already in the block layer) complete on their own.
      tags.resize(cap_);
      results.resize(cap_);
      size_t total = 0;
      while (pending_ > 0) {
        io_uring_cqe* cqe;
        int r = io_uring_wait_cqe(&ring_, &cqe);
        if (r == -EINTR) continue;
        if (r < 0) break;
        if (tags.size() < total + cap_) {
          tags.resize(total + cap_);
          results.resize(total + cap_);
        }
        total += Reap(tags.data() + total, results.data() + total, cap_);
      }
      tags.resize(total);
      results.resize(total);
    }
    io_uring_queue_exit(&ring_);
    uv_poll_stop(poll_);
    ::close(efd_);
    uv_prepare_stop(prepare_);
    // The close callbacks run on a later loop turn: for a worker, after Node has dlclose()d
    // this addon. So the callback must not be code of ours: libc's free() stays mapped.
    uv_close(reinterpret_cast<uv_handle_t*>(poll_), FreeHandle());
    uv_close(reinterpret_cast<uv_handle_t*>(prepare_), FreeHandle());
    poll_ = nullptr;
    prepare_ = nullptr;
    if (!inCleanupHook) napi_remove_env_cleanup_hook(env_, CleanupHook, this);
    if (callJs && !tags.empty()) {
      // Fresh arrays: close() may be running inside onComplete, which still reads the shared ones.
      Napi::Env env(env_);
      size_t n = tags.size();
      Napi::Int32Array t = Napi::Int32Array::New(env, n);
      Napi::Int32Array res = Napi::Int32Array::New(env, n);
      memcpy(t.Data(), tags.data(), n * 4);
      memcpy(res.Data(), results.data(), n * 4);
      onComplete_.Call(Value(), {Napi::Number::New(env, double(n)), t, res});
    }
  }

  napi_env env_;
  io_uring ring_;
  bool open_ = false;
  int efd_ = -1;
  uv_poll_t* poll_ = nullptr;
  uv_prepare_t* prepare_ = nullptr;
  bool prepareActive_ = false;
  uint32_t pending_ = 0;  // queued or in flight: SQEs whose CQE has not been reaped yet
  unsigned cap_ = 0;
  int32_t* tags_ = nullptr;
  int32_t* results_ = nullptr;
  Napi::Reference<Napi::Int32Array> tagsRef_, resultsRef_;
  Napi::FunctionReference onComplete_;
  std::unique_ptr<Napi::AsyncContext> asyncCtx_;
};

// ---- synchronous helpers ----

// pread/pwrite of a whole buffer: retries EINTR and continues short transfers. A read ends
// early at EOF (a short read is the answer); a zero-byte write for a non-empty request would loop
// forever, and QEMU reports such a short write as ENOSPC.
Napi::Value Transfer(const Napi::CallbackInfo& info, bool write) {
  napi_env env = info.Env();
  const char* syscall = write ? "pwrite" : "pread";
  int32_t fd;
  uint8_t* data;
  size_t len;
  int64_t offset;
  if (info.Length() < 3 || !ArgInt32(env, info[0], &fd) || !ArgBuffer(env, info[1], &data, &len) ||
      !ArgInt64(env, info[2], &offset)) {
    return ThrowType(info.Env(), "expected (fd, buffer, offset)");
  }
  size_t done = 0;
  while (done < len) {
    ssize_t r = write ? ::pwrite(fd, data + done, len - done, offset + off_t(done))
                      : ::pread(fd, data + done, len - done, offset + off_t(done));
    if (r < 0) {
      if (errno == EINTR) continue;
      return ThrowErrno(info.Env(), errno, syscall);
    }
    if (r == 0) {
      if (write) return ThrowErrno(info.Env(), ENOSPC, syscall);
      break;
    }
    done += size_t(r);
  }
  return Napi::Number::New(env, double(done));
}

// One preadv2/pwritev2 with RWF_* flags for the inline fast path (RWF_NOWAIT: only what needs no
// wait). No retry of short transfers and no throw, as it runs per request: returns the bytes
// transferred (possibly short) or -errno (-EAGAIN: it would have blocked).
Napi::Value TransferNow(const Napi::CallbackInfo& info, bool write) {
  napi_env env = info.Env();
  int32_t fd;
  uint8_t* data;
  size_t len;
  int64_t offset;
  int32_t flags;
  if (info.Length() < 4 || !ArgInt32(env, info[0], &fd) || !ArgBuffer(env, info[1], &data, &len) ||
      !ArgInt64(env, info[2], &offset) || !ArgInt32(env, info[3], &flags)) {
    return ThrowType(info.Env(), "expected (fd, buffer, offset, flags)");
  }
  struct iovec iov = {data, len};
  ssize_t r;
  do {
    r = write ? ::pwritev2(fd, &iov, 1, offset, flags) : ::preadv2(fd, &iov, 1, offset, flags);
  } while (r < 0 && errno == EINTR);
  return Napi::Number::New(env, r < 0 ? -double(errno) : double(r));
}

Napi::Value PreadNow(const Napi::CallbackInfo& info) { return TransferNow(info, false); }
Napi::Value PwriteNow(const Napi::CallbackInfo& info) { return TransferNow(info, true); }

Napi::Value Pread(const Napi::CallbackInfo& info) { return Transfer(info, false); }
Napi::Value Pwrite(const Napi::CallbackInfo& info) { return Transfer(info, true); }

bool FallocateArgs(const Napi::CallbackInfo& info, int32_t* fd, int32_t* mode, int64_t* offset, int64_t* length) {
  napi_env env = info.Env();
  return info.Length() >= 4 && ArgInt32(env, info[0], fd) && ArgInt32(env, info[1], mode) &&
         ArgInt64(env, info[2], offset) && ArgInt64(env, info[3], length);
}

int DoFallocate(int fd, int mode, int64_t offset, int64_t length) {
  while (::fallocate(fd, mode, offset, length) < 0) {
    if (errno != EINTR) return errno;
  }
  return 0;
}

Napi::Value Fallocate(const Napi::CallbackInfo& info) {
  int32_t fd, mode;
  int64_t offset, length;
  if (!FallocateArgs(info, &fd, &mode, &offset, &length)) {
    return ThrowType(info.Env(), "expected (fd, mode, offset, length)");
  }
  int err = DoFallocate(fd, mode, offset, length);
  if (err) return ThrowErrno(info.Env(), err, "fallocate");
  return info.Env().Undefined();
}

// fallocate on the libuv threadpool, for aio=threads (Node's fs has no fallocate): a large
// preallocation must not stall the loop. callback(errno) with 0 on success.
class FallocateWorker : public Napi::AsyncWorker {
 public:
  FallocateWorker(Napi::Function cb, int fd, int mode, int64_t offset, int64_t length)
      : Napi::AsyncWorker(cb, "qsd:fallocate"), fd_(fd), mode_(mode), offset_(offset), length_(length) {}
  void Execute() override { err_ = DoFallocate(fd_, mode_, offset_, length_); }
  void OnOK() override { Callback().Call({Napi::Number::New(Env(), err_)}); }

 private:
  int fd_, mode_;
  int64_t offset_, length_;
  int err_ = 0;
};

Napi::Value FallocateAsync(const Napi::CallbackInfo& info) {
  int32_t fd, mode;
  int64_t offset, length;
  if (!FallocateArgs(info, &fd, &mode, &offset, &length) || info.Length() < 5 || !info[4].IsFunction()) {
    return ThrowType(info.Env(), "expected (fd, mode, offset, length, callback)");
  }
  (new FallocateWorker(info[4].As<Napi::Function>(), fd, mode, offset, length))->Queue();
  return info.Env().Undefined();
}

Napi::Value Lseek(const Napi::CallbackInfo& info) {
  napi_env env = info.Env();
  int32_t fd, whence;
  int64_t offset;
  if (info.Length() < 3 || !ArgInt32(env, info[0], &fd) || !ArgInt64(env, info[1], &offset) ||
      !ArgInt32(env, info[2], &whence)) {
    return ThrowType(info.Env(), "expected (fd, offset, whence)");
  }
  off_t r = ::lseek(fd, offset, whence);
  return Napi::Number::New(env, r < 0 ? -double(errno) : double(r));
}

Napi::Value Fdatasync(const Napi::CallbackInfo& info) {
  int32_t fd;
  if (info.Length() < 1 || !ArgInt32(info.Env(), info[0], &fd)) return ThrowType(info.Env(), "expected (fd)");
  while (::fdatasync(fd) < 0) {
    if (errno != EINTR) return ThrowErrno(info.Env(), errno, "fdatasync");
  }
  return info.Env().Undefined();
}

// Is the buffer's address a multiple of alignment? O_DIRECT needs it; JS cannot see addresses.
Napi::Value IsBufferAligned(const Napi::CallbackInfo& info) {
  napi_env env = info.Env();
  uint8_t* data;
  size_t len;
  int64_t alignment;
  if (info.Length() < 2 || !ArgBuffer(env, info[0], &data, &len) || !ArgInt64(env, info[1], &alignment) ||
      alignment <= 0) {
    return ThrowType(info.Env(), "expected (buffer, alignment)");
  }
  return Napi::Boolean::New(info.Env(), reinterpret_cast<uintptr_t>(data) % uint64_t(alignment) == 0);
}

// lockf(fd, F_TLOCK, 0): the pidfile lock QEMU takes; held until the fd is closed or we exit.
Napi::Value TryLockFile(const Napi::CallbackInfo& info) {
  int32_t fd;
  if (info.Length() < 1 || !ArgInt32(info.Env(), info[0], &fd)) return ThrowType(info.Env(), "expected (fd)");
  while (::lockf(fd, F_TLOCK, 0) < 0) {
    if (errno != EINTR) return ThrowErrno(info.Env(), errno, "lockf");
  }
  return info.Env().Undefined();
}

Napi::Value BlockDeviceSize(const Napi::CallbackInfo& info) {
  int32_t fd;
  if (info.Length() < 1 || !ArgInt32(info.Env(), info[0], &fd)) return ThrowType(info.Env(), "expected (fd)");
  uint64_t size = 0;
  if (::ioctl(fd, BLKGETSIZE64, &size) < 0) return ThrowErrno(info.Env(), errno, "ioctl(BLKGETSIZE64)");
  return Napi::Number::New(info.Env(), double(size));
}

Napi::Value AllocAligned(const Napi::CallbackInfo& info) {
  napi_env env = info.Env();
  int64_t size, alignment;
  if (info.Length() < 2 || !ArgInt64(env, info[0], &size) || !ArgInt64(env, info[1], &alignment)) {
    return ThrowType(info.Env(), "expected (size, alignment)");
  }
  if (size < 0 || alignment <= 0 || (alignment & (alignment - 1)) != 0) {
    return ThrowErrno(info.Env(), EINVAL, "posix_memalign");
  }
  // Large buffers (FUSE request slots) come from anonymous mmap: zeroed by the kernel and resident
  // only once touched, so a queue's 64 slots cost memory only for the bytes requests really use.
  long page = sysconf(_SC_PAGESIZE);
  if (size >= 65536 && alignment <= page) {
    void* m = mmap(nullptr, size_t(size), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return ThrowErrno(info.Env(), errno, "mmap");
    size_t len = size_t(size);
    return Napi::Buffer<uint8_t>::New(info.Env(), static_cast<uint8_t*>(m), len,
                                      [len](Napi::Env, uint8_t* data) { munmap(data, len); });
  }
  // posix_memalign needs a multiple of sizeof(void*); a smaller power of two is implied by it.
  size_t align = size_t(alignment) < sizeof(void*) ? sizeof(void*) : size_t(alignment);
  void* p = nullptr;
  int err = posix_memalign(&p, align, size > 0 ? size_t(size) : align);
  if (err) return ThrowErrno(info.Env(), err, "posix_memalign");
  memset(p, 0, size_t(size));
  return Napi::Buffer<uint8_t>::New(info.Env(), static_cast<uint8_t*>(p), size_t(size),
                                    [](Napi::Env, uint8_t* data) { free(data); });
}

Napi::Object IoConstants(Napi::Env env) {
  Napi::Object c = Napi::Object::New(env);
  c.Set("FALLOC_FL_KEEP_SIZE", FALLOC_FL_KEEP_SIZE);
  c.Set("FALLOC_FL_PUNCH_HOLE", FALLOC_FL_PUNCH_HOLE);
  c.Set("FALLOC_FL_ZERO_RANGE", FALLOC_FL_ZERO_RANGE);
  c.Set("FALLOC_FL_NO_HIDE_STALE", FALLOC_FL_NO_HIDE_STALE);
  c.Set("SEEK_SET", SEEK_SET);
  c.Set("SEEK_CUR", SEEK_CUR);
  c.Set("SEEK_END", SEEK_END);
  c.Set("SEEK_DATA", SEEK_DATA);
  c.Set("SEEK_HOLE", SEEK_HOLE);
  c.Set("O_DIRECT", O_DIRECT);
  c.Set("RWF_NOWAIT", RWF_NOWAIT);
  return c;
}

}  // namespace

void InitBlockIo(Napi::Env env, Napi::Object exports) {
  exports.Set("IoRing", IoRing::Define(env));
  exports.Set("pread", Napi::Function::New<Pread>(env, "pread"));
  exports.Set("pwrite", Napi::Function::New<Pwrite>(env, "pwrite"));
  exports.Set("preadNow", Napi::Function::New<PreadNow>(env, "preadNow"));
  exports.Set("pwriteNow", Napi::Function::New<PwriteNow>(env, "pwriteNow"));
  exports.Set("fallocate", Napi::Function::New<Fallocate>(env, "fallocate"));
  exports.Set("fallocateAsync", Napi::Function::New<FallocateAsync>(env, "fallocateAsync"));
  exports.Set("lseek", Napi::Function::New<Lseek>(env, "lseek"));
  exports.Set("fdatasync", Napi::Function::New<Fdatasync>(env, "fdatasync"));
  exports.Set("isBufferAligned", Napi::Function::New<IsBufferAligned>(env, "isBufferAligned"));
  exports.Set("tryLockFile", Napi::Function::New<TryLockFile>(env, "tryLockFile"));
  exports.Set("blockDeviceSize", Napi::Function::New<BlockDeviceSize>(env, "blockDeviceSize"));
  exports.Set("allocAligned", Napi::Function::New<AllocAligned>(env, "allocAligned"));
  exports.Set("ioConstants", IoConstants(env));
}

}  // namespace qsd
