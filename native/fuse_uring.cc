// FUSE-over-io_uring transport: one io_uring per JS thread that holds FUSE ring entries and is reaped on
// that thread's libuv loop.
//
// Each entry (a header buffer + a payload buffer owned by JS) is registered once with
// FUSE_IO_URING_CMD_REGISTER; a completion means the kernel put a request into the entry's buffers;
// the answer goes back with FUSE_IO_URING_CMD_COMMIT_AND_FETCH on the same entry, which also re-arms
// it. Parsing and dispatch stay in JS (src/exports/fuse-queue.ts), as for /dev/fuse reads.
// Wake-ups and batching work as in block_io.cc: an eventfd polled by uv_poll, and the SQEs queued
// during one loop turn are submitted together from a uv_prepare handle.
#include "fuse_uring.h"
#include "loop_ring.h"

#include <errno.h>
#include <stddef.h>
#include <liburing.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>
#include <uv.h>

#include <memory>
#include <string>
#include <vector>

namespace qsd {
namespace {

Napi::Value ThrowErrno(Napi::Env env, int err, const char* syscall) {
  const char* name = strerrorname_np(err);
  std::string msg = std::string(name ? name : "EUNKNOWN") + ": " + strerror(err) + ", " + syscall;
  Napi::Error e = Napi::Error::New(env, msg);
  e.Set("errno", Napi::Number::New(env, err));
  e.Set("code", Napi::String::New(env, name ? name : "EUNKNOWN"));
  e.Set("syscall", Napi::String::New(env, syscall));
  e.ThrowAsJavaScriptException();
  return env.Undefined();
}

Napi::Value ThrowType(Napi::Env env, const char* what) {
  Napi::TypeError::New(env, what).ThrowAsJavaScriptException();
  return env.Undefined();
}

// free() as a uv_close_cb: the close callback may run after a worker's addon was unloaded.
uv_close_cb FreeHandle() { return reinterpret_cast<uv_close_cb>(reinterpret_cast<void (*)()>(&free)); }

struct Entry {
  bool registered = false;
  uint16_t qid = 0;
  FuseUringReqHeader* header = nullptr;
  struct iovec iov[kFuseUringIovSegs];
  // The buffers stay referenced while the kernel may write into them.
  Napi::Reference<Napi::Value> headerRef, payloadRef;
};

class FuseUring : public Napi::ObjectWrap<FuseUring> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "FuseUring",
                       {
                           InstanceMethod<&FuseUring::Register>("register"),
                           InstanceMethod<&FuseUring::Commit>("commit"),
                           InstanceMethod<&FuseUring::SubmitJs>("submit"),
                           InstanceMethod<&FuseUring::CloseJs>("close"),
                           InstanceAccessor<&FuseUring::Pending>("pending"),
                       });
  }

  explicit FuseUring(const Napi::CallbackInfo& info) : Napi::ObjectWrap<FuseUring>(info), env_(info.Env()) {
    Napi::Env env = info.Env();
    int32_t fd = -1;
    uint32_t entries = 0;
    if (info.Length() < 3 || napi_get_value_int32(env, info[0], &fd) != napi_ok ||
        napi_get_value_uint32(env, info[1], &entries) != napi_ok || entries == 0 || entries > 4096 ||
        !info[2].IsFunction()) {
      ThrowType(env, "FuseUring(fuseFd, entries: 1..4096, onComplete)");
      return;
    }
    fd_ = fd;
    entries_.resize(entries);
    // SQE128: the FUSE command (struct fuse_uring_cmd_req) lives in the big SQE's command area.
    // Each entry has at most one SQE in flight, so an SQ of `entries` never fills up.
    io_uring_params first, fallback;
    memset(&first, 0, sizeof first);
    memset(&fallback, 0, sizeof fallback);
    // DEFER_TASKRUN: deliveries queued by the requesting threads wait as task work until this
    // thread asks for them (io_uring_get_events when the eventfd fires), so one wake-up takes every
    // request pending instead of each delivery interrupting this thread.
    first.flags = IORING_SETUP_SQE128 | IORING_SETUP_SUBMIT_ALL | IORING_SETUP_SINGLE_ISSUER |
                  IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_CQSIZE;
    first.cq_entries = entries * 2;
    fallback.flags = IORING_SETUP_SQE128 | IORING_SETUP_CQSIZE;
    fallback.cq_entries = entries * 2;
    const char* syscall = nullptr;
    int r = OpenLoopRing(env, entries, first, fallback, &ring_, &efd_, &poll_, &prepare_, this, OnPoll, &syscall);
    if (r < 0) {
      ThrowErrno(env, -r, syscall);
      return;
    }

    cap_ = ring_.cq.ring_entries;
    Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(env, size_t(cap_) * 8);
    tags_ = static_cast<int32_t*>(ab.Data());
    results_ = tags_ + cap_;
    tagsRef_ = Napi::Persistent(Napi::Int32Array::New(env, cap_, ab, 0));
    resultsRef_ = Napi::Persistent(Napi::Int32Array::New(env, cap_, ab, size_t(cap_) * 4));
    onComplete_ = Napi::Persistent(info[2].As<Napi::Function>());
    asyncCtx_ = std::make_unique<Napi::AsyncContext>(env, "qsd:FuseUring", info.This().As<Napi::Object>());
    napi_add_env_cleanup_hook(env, CleanupHook, this);
    open_ = true;
    Ref();  // An open ring keeps itself alive (the kernel holds its buffers); close() drops this.
  }

  ~FuseUring() override { Close(); }

 private:
  static int BufferArg(napi_env env, napi_value v, uint8_t** data, size_t* len) {
    void* p = nullptr;
    if (napi_get_buffer_info(env, v, &p, len) != napi_ok) return -1;
    *data = static_cast<uint8_t*>(p);
    return 0;
  }

  // register(tag, qid, header, payload): queue FUSE_IO_URING_CMD_REGISTER for entry `tag`.
  Napi::Value Register(const Napi::CallbackInfo& info) {
    napi_env env = info.Env();
    uint32_t tag, qid;
    uint8_t *hdr, *pay;
    size_t hdrLen, payLen;
    if (info.Length() < 4 || napi_get_value_uint32(env, info[0], &tag) != napi_ok ||
        napi_get_value_uint32(env, info[1], &qid) != napi_ok || BufferArg(env, info[2], &hdr, &hdrLen) < 0 ||
        BufferArg(env, info[3], &pay, &payLen) < 0) {
      return ThrowType(info.Env(), "register(tag, qid, header: Buffer, payload: Buffer)");
    }
    if (!open_) return Napi::Number::New(env, -EBADF);
    if (tag >= entries_.size() || qid > 0xffff || hdrLen < sizeof(FuseUringReqHeader)) {
      return Napi::Number::New(env, -EINVAL);
    }
    Entry& e = entries_[tag];
    if (e.registered) return Napi::Number::New(env, -EBUSY);
    e.registered = true;
    e.qid = uint16_t(qid);
    e.header = reinterpret_cast<FuseUringReqHeader*>(hdr);
    e.iov[0] = {hdr, sizeof(FuseUringReqHeader)};
    e.iov[1] = {pay, payLen};
    e.headerRef = Napi::Persistent(info[2]);
    e.payloadRef = Napi::Persistent(info[3]);
    io_uring_sqe* sqe = Prep(tag, kFuseIoUringCmdRegister, 0);
    if (!sqe) return Napi::Number::New(env, -EBUSY);
    sqe->addr = reinterpret_cast<uint64_t>(e.iov);
    sqe->len = kFuseUringIovSegs;
    return Napi::Number::New(env, 0);
  }

  // commit(tag): the reply is in the entry's buffers (out header in in_out, payload_sz set); queue
  // FUSE_IO_URING_CMD_COMMIT_AND_FETCH with the commit_id the kernel delivered.
  Napi::Value Commit(const Napi::CallbackInfo& info) {
    napi_env env = info.Env();
    uint32_t tag;
    if (info.Length() < 1 || napi_get_value_uint32(env, info[0], &tag) != napi_ok) {
      return ThrowType(info.Env(), "commit(tag)");
    }
    if (!open_) return Napi::Number::New(env, -EBADF);
    if (tag >= entries_.size() || !entries_[tag].registered) return Napi::Number::New(env, -EINVAL);
    uint64_t commitId = entries_[tag].header->ring_ent_in_out.commit_id;
    if (!Prep(tag, kFuseIoUringCmdCommitAndFetch, commitId)) return Napi::Number::New(env, -EBUSY);
    return Napi::Number::New(env, 0);
  }

  io_uring_sqe* Prep(uint32_t tag, uint32_t cmdOp, uint64_t commitId) {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (!sqe) {
      SubmitNow();
      sqe = io_uring_get_sqe(&ring_);
      if (!sqe) return nullptr;
    }
    memset(sqe, 0, 128);  // SQE128: the command area is the second half
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = fd_;
    sqe->cmd_op = cmdOp;
    sqe->user_data = tag;
    auto* req = reinterpret_cast<FuseUringCmdReq*>(sqe->cmd);
    req->commit_id = commitId;
    req->qid = entries_[tag].qid;
    pending_++;
    if (!prepareActive_) {
      uv_prepare_start(prepare_, OnPrepare);
      prepareActive_ = true;
    }
    return sqe;
  }

  Napi::Value SubmitJs(const Napi::CallbackInfo& info) {
    if (!open_) return Napi::Number::New(info.Env(), -EBADF);
    return Napi::Number::New(info.Env(), SubmitNow());
  }

  Napi::Value CloseJs(const Napi::CallbackInfo& info) {
    Close();
    return info.Env().Undefined();
  }

  Napi::Value Pending(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), pending_); }

  int SubmitNow() {
    int r;
    do {
      r = io_uring_submit(&ring_);
    } while (r == -EINTR);
    if (prepareActive_ && io_uring_sq_ready(&ring_) == 0) {
      uv_prepare_stop(prepare_);
      prepareActive_ = false;
    }
    return r;
  }

  static void OnPrepare(uv_prepare_t* h) { static_cast<FuseUring*>(h->data)->SubmitNow(); }
  static void OnPoll(uv_poll_t* h, int status, int events) { static_cast<FuseUring*>(h->data)->OnReadable(); }

  unsigned Reap() {
    unsigned n = 0;
    for (;;) {
      unsigned head, seen = 0;
      io_uring_cqe* cqe;
      io_uring_for_each_cqe(&ring_, head, cqe) {
        if (n == cap_) break;
        tags_[n] = int32_t(uint32_t(cqe->user_data));
        results_[n] = cqe->res;
        n++;
        seen++;
      }
      io_uring_cq_advance(&ring_, seen);
      if (n < cap_ && io_uring_cq_has_overflow(&ring_) && io_uring_get_events(&ring_) == 0 &&
          io_uring_cq_ready(&ring_) > 0) {
        continue;
      }
      break;
    }
    pending_ -= n;
    return n;
  }

  void OnReadable() {
    uint64_t v;
    while (::read(efd_, &v, sizeof v) < 0 && errno == EINTR) {
    }
    if (ring_.flags & IORING_SETUP_DEFER_TASKRUN) io_uring_get_events(&ring_);
    Napi::Env env(env_);
    Napi::HandleScope scope(env);
    Napi::Object self = Value();
    for (;;) {
      if (!open_) return;
      unsigned n = Reap();
      if (n == 0) return;
      napi_value argv[3] = {Napi::Number::New(env, n), tagsRef_.Value(), resultsRef_.Value()};
      napi_value result;
      if (napi_make_callback(env_, *asyncCtx_, self, onComplete_.Value(), 3, argv, &result) != napi_ok) {
        bool pending = false;
        napi_value err;
        if (napi_is_exception_pending(env_, &pending) == napi_ok && pending &&
            napi_get_and_clear_last_exception(env_, &err) == napi_ok) {
          napi_fatal_exception(env_, err);
        }
      }
      // JS may have closed the ring from the callback (or a promise job it ran).
      if (!open_) return;
      if (ring_.flags & IORING_SETUP_DEFER_TASKRUN) io_uring_get_events(&ring_);
      if (n < cap_ && io_uring_cq_ready(&ring_) == 0 && !io_uring_cq_has_overflow(&ring_)) return;
    }
  }

  static void CleanupHook(void* arg) {
    auto* self = static_cast<FuseUring*>(arg);
    self->hookAdded_ = false;
    self->Close();
  }

  // Closing the ring makes the kernel cancel the armed entries (fuse_uring_cancel); we cannot reap
  // those cancellations, so when commands are still armed the buffers stay referenced (leaked)
  // rather than risk the kernel writing into freed memory. JS avoids that by waiting for the
  // entries' -ENOTCONN completions (the connection aborts at unmount) before closing.
  void Close() {
    if (!open_) return;
    open_ = false;
    io_uring_queue_exit(&ring_);
    uv_poll_stop(poll_);
    ::close(efd_);
    efd_ = -1;
    uv_prepare_stop(prepare_);
    uv_close(reinterpret_cast<uv_handle_t*>(poll_), FreeHandle());
    uv_close(reinterpret_cast<uv_handle_t*>(prepare_), FreeHandle());
    poll_ = nullptr;
    prepare_ = nullptr;
    if (hookAdded_) {
      napi_remove_env_cleanup_hook(env_, CleanupHook, this);
      hookAdded_ = false;
    }
    if (pending_ == 0) {
      for (Entry& e : entries_) {
        e.headerRef.Reset();
        e.payloadRef.Reset();
      }
    } else {
      for (Entry& e : entries_) {
        e.headerRef.SuppressDestruct();
        e.payloadRef.SuppressDestruct();
      }
    }
    onComplete_.Reset();
    Unref();
  }

  napi_env env_;
  io_uring ring_;
  int fd_ = -1;
  bool open_ = false;
  bool hookAdded_ = true;
  int efd_ = -1;
  uv_poll_t* poll_ = nullptr;
  uv_prepare_t* prepare_ = nullptr;
  bool prepareActive_ = false;
  uint32_t pending_ = 0;
  unsigned cap_ = 0;
  int32_t* tags_ = nullptr;
  int32_t* results_ = nullptr;
  std::vector<Entry> entries_;
  Napi::Reference<Napi::Int32Array> tagsRef_, resultsRef_;
  Napi::FunctionReference onComplete_;
  std::unique_ptr<Napi::AsyncContext> asyncCtx_;
};

}  // namespace

void InitFuseUring(Napi::Env env, Napi::Object exports) {
  exports.Set("FuseUring", FuseUring::Define(env));
  Napi::Object c = Napi::Object::New(env);
  c.Set("HEADER_SIZE", Napi::Number::New(env, sizeof(FuseUringReqHeader)));
  c.Set("OP_IN_OFFSET", Napi::Number::New(env, offsetof(FuseUringReqHeader, op_in)));
  c.Set("ENT_IN_OUT_OFFSET", Napi::Number::New(env, offsetof(FuseUringReqHeader, ring_ent_in_out)));
  exports.Set("fuseUringConstants", c);
}

}  // namespace qsd
