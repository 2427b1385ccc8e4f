// FUSE device access: open/mount/clone /dev/fuse fds and poll one fd in the calling thread's loop.
//
// Only what JS cannot do lives here. Request parsing and dispatch stay in JS (src/exports/fuse-queue.ts):
// the measured cost of doing it in JS is 10-20 %, while any thread hop per request costs 30-90 µs.
#include "fuse_device.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>
#include <uv.h>

#include <string>
#include <vector>

extern char** environ;

namespace qsd {
namespace {

// An Error carrying .errno (positive), .code and .syscall, as binding.ts promises.
Napi::Value ThrowErrno(Napi::Env env, int err, const char* syscall, const std::string& what = "") {
  std::string msg = std::string(uv_err_name(-err)) + ": " + strerror(err) + ", " + syscall;
  if (!what.empty()) msg += " '" + what + "'";
  Napi::Error e = Napi::Error::New(env, msg);
  e.Set("errno", Napi::Number::New(env, err));
  e.Set("code", Napi::String::New(env, uv_err_name(-err)));
  e.Set("syscall", Napi::String::New(env, syscall));
  e.ThrowAsJavaScriptException();
  return env.Undefined();
}

Napi::Value ThrowType(Napi::Env env, const char* msg) {
  Napi::TypeError::New(env, msg).ThrowAsJavaScriptException();
  return env.Undefined();
}

Napi::Value FuseOpen(const Napi::CallbackInfo& info) {
  int fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
  if (fd < 0) return ThrowErrno(info.Env(), errno, "open", "/dev/fuse");
  return Napi::Number::New(info.Env(), fd);
}

Napi::Value Mount(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 5 || !info[0].IsString() || !info[1].IsString() || !info[2].IsString() ||
      !info[3].IsNumber() || !info[4].IsString()) {
    return ThrowType(env, "mount(source, target, fstype, flags, data)");
  }
  std::string source = info[0].As<Napi::String>();
  std::string target = info[1].As<Napi::String>();
  std::string fstype = info[2].As<Napi::String>();
  unsigned long flags = static_cast<unsigned long>(info[3].As<Napi::Number>().Int64Value());
  std::string data = info[4].As<Napi::String>();
  if (mount(source.c_str(), target.c_str(), fstype.c_str(), flags, data.c_str()) < 0) {
    return ThrowErrno(env, errno, "mount", target);
  }
  return env.Undefined();
}

Napi::Value Umount(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsString() || !info[1].IsNumber()) return ThrowType(env, "umount(target, flags)");
  std::string target = info[0].As<Napi::String>();
  if (umount2(target.c_str(), info[1].As<Napi::Number>().Int32Value()) < 0) {
    return ThrowErrno(env, errno, "umount2", target);
  }
  return env.Undefined();
}

// Find an executable in PATH before fork(): the child must only exec.
std::string FindExecutable(const char* name) {
  const char* path = getenv("PATH");
  std::string dirs = path && *path ? path : "/usr/local/bin:/usr/bin:/bin";
  dirs += ":/usr/bin:/bin";
  size_t start = 0;
  while (start <= dirs.size()) {
    size_t end = dirs.find(':', start);
    if (end == std::string::npos) end = dirs.size();
    std::string dir = dirs.substr(start, end - start);
    if (!dir.empty()) {
      std::string candidate = dir + "/" + name;
      if (access(candidate.c_str(), X_OK) == 0) return candidate;
    }
    start = end + 1;
  }
  return "";
}

// libfuse's protocol with fusermount3: the child gets one end of a socketpair in _FUSE_COMMFD and
// sends the mounted /dev/fuse fd back with SCM_RIGHTS, then exits.
Napi::Value FusermountMount(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsString() || !info[1].IsString()) {
    return ThrowType(env, "fusermountMount(mountpoint, options)");
  }
  std::string mountpoint = info[0].As<Napi::String>();
  std::string options = info[1].As<Napi::String>();
  std::string prog = FindExecutable("fusermount3");
  if (prog.empty()) return ThrowErrno(env, ENOENT, "execve", "fusermount3");

  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) return ThrowErrno(env, errno, "socketpair");

  // Everything the child needs is built before fork(): after it only async-signal-safe calls.
  std::vector<std::string> envStrings;
  for (char** e = environ; e && *e; e++) {
    if (strncmp(*e, "_FUSE_COMMFD=", 13) != 0) envStrings.emplace_back(*e);
  }
  envStrings.push_back("_FUSE_COMMFD=" + std::to_string(sv[0]));
  std::vector<char*> envp;
  for (auto& s : envStrings) envp.push_back(const_cast<char*>(s.c_str()));
  envp.push_back(nullptr);
  std::vector<std::string> argStrings = {prog, "-o", options, "--", mountpoint};
  std::vector<char*> argv;
  for (auto& s : argStrings) argv.push_back(const_cast<char*>(s.c_str()));
  argv.push_back(nullptr);

  pid_t pid = fork();
  if (pid < 0) {
    int err = errno;
    close(sv[0]);
    close(sv[1]);
    return ThrowErrno(env, err, "fork");
  }
  if (pid == 0) {
    // Child: keep sv[0] across exec, nothing else of ours.
    fcntl(sv[0], F_SETFD, 0);
    execve(argv[0], argv.data(), envp.data());
    _exit(127);
  }
  close(sv[0]);

  char byte;
  struct iovec iov = {&byte, 1};
  union {
    struct cmsghdr align;
    char buf[CMSG_SPACE(sizeof(int))];
  } control;
  memset(&control, 0, sizeof(control));
  struct msghdr msg;
  memset(&msg, 0, sizeof(msg));
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.buf;
  msg.msg_controllen = sizeof(control.buf);
  ssize_t n;
  do {
    n = recvmsg(sv[1], &msg, MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  int recvErr = n < 0 ? errno : 0;
  close(sv[1]);

  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }

  int fd = -1;
  if (n > 0) {
    for (struct cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS && c->cmsg_len >= CMSG_LEN(sizeof(int))) {
        memcpy(&fd, CMSG_DATA(c), sizeof(int));
      }
    }
  }
  if (fd < 0) {
    if (recvErr) return ThrowErrno(env, recvErr, "recvmsg");
    // fusermount3 printed its reason on stderr (as with libfuse); we can only report that it failed.
    std::string what = "fusermount3 exited";
    if (WIFEXITED(status)) what += " with status " + std::to_string(WEXITSTATUS(status));
    return ThrowErrno(env, EIO, "fusermount3", what);
  }
  return Napi::Number::New(env, fd);
}

Napi::Value FuseCloneFd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsNumber()) return ThrowType(env, "fuseCloneFd(srcFd)");
  uint32_t src = info[0].As<Napi::Number>().Uint32Value();
  int fd = open("/dev/fuse", O_RDWR | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) return ThrowErrno(env, errno, "open", "/dev/fuse");
  if (ioctl(fd, FUSE_DEV_IOC_CLONE, &src) < 0) {
    int err = errno;
    close(fd);
    return ThrowErrno(env, err, "ioctl", "FUSE_DEV_IOC_CLONE");
  }
  return Napi::Number::New(env, fd);
}

// A connected AF_UNIX SOCK_SEQPACKET pair (both non-blocking): it keeps message boundaries like
// /dev/fuse, so tests can play the kernel's side of a queue.
Napi::Value SeqpacketPair(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) < 0) {
    return ThrowErrno(env, errno, "socketpair");
  }
  Napi::Array a = Napi::Array::New(env, 2);
  a.Set(0u, Napi::Number::New(env, sv[0]));
  a.Set(1u, Napi::Number::New(env, sv[1]));
  return a;
}

// One /dev/fuse fd polled by the libuv loop of the env (thread) that created it.
class FuseChannel : public Napi::ObjectWrap<FuseChannel> {
 public:
  static Napi::Function Init(Napi::Env env) {
    return DefineClass(env, "FuseChannel",
                       {
                           InstanceMethod<&FuseChannel::Read>("read"),
                           InstanceMethod<&FuseChannel::ReadMany>("readMany"),
                           InstanceMethod<&FuseChannel::Write>("write"),
                           InstanceMethod<&FuseChannel::WriteMany>("writeMany"),
                           InstanceMethod<&FuseChannel::Writev>("writev"),
                           InstanceMethod<&FuseChannel::Pause>("pause"),
                           InstanceMethod<&FuseChannel::Resume>("resume"),
                           InstanceMethod<&FuseChannel::Close>("close"),
                       });
  }

  FuseChannel(const Napi::CallbackInfo& info) : Napi::ObjectWrap<FuseChannel>(info) {
    Napi::Env env = info.Env();
    if (info.Length() < 3 || !info[0].IsNumber() || !info[2].IsFunction()) {
      ThrowType(env, "new FuseChannel(fd, ownsFd, onReadable)");
      return;
    }
    fd_ = info[0].As<Napi::Number>().Int32Value();
    ownsFd_ = info[1].ToBoolean().Value();
    int fl = fcntl(fd_, F_GETFL);
    if (fl < 0 || (!(fl & O_NONBLOCK) && fcntl(fd_, F_SETFL, fl | O_NONBLOCK) < 0)) {
      ThrowErrno(env, errno, "fcntl");
      return;
    }
    uv_loop_t* loop = nullptr;
    if (napi_get_uv_event_loop(env, &loop) != napi_ok || !loop) {
      Napi::Error::New(env, "FuseChannel: no event loop").ThrowAsJavaScriptException();
      return;
    }
    poll_ = new uv_poll_t;
    int r = uv_poll_init(loop, poll_, fd_);
    if (r < 0) {
      delete poll_;
      poll_ = nullptr;
      ThrowErrno(env, -r, "uv_poll_init");
      return;
    }
    poll_->data = this;
    callback_ = Napi::Persistent(info[2].As<Napi::Function>());
    asyncResource_ = Napi::Persistent(Napi::Object::New(env));
    napi_async_init(env, asyncResource_.Value(), Napi::String::New(env, "FuseChannel"), &asyncContext_);
    // A worker exiting with an active handle aborts the process: close it on env teardown.
    napi_add_env_cleanup_hook(env, CleanupHook, this);
    hookAdded_ = true;
    Ref();  // An open channel keeps itself alive; close() drops this.
    polling_ = false;
    StartPolling();
  }

  ~FuseChannel() override { CloseInternal(false); }

 private:
  static void CleanupHook(void* arg) {
    auto* self = static_cast<FuseChannel*>(arg);
    self->hookAdded_ = false;  // Node removes it as it runs.
    self->CloseInternal(false);
  }

  static void OnPoll(uv_poll_t* handle, int status, int events) {
    auto* self = static_cast<FuseChannel*>(handle->data);
    if (!self || self->callback_.IsEmpty()) return;
    Napi::Env env = self->Env();
    Napi::HandleScope scope(env);
    // libuv stopped the handle itself on an error (e.g. POLLERR after unmount); JS's read() will see why.
    if (status < 0) self->polling_ = false;
    // make_callback (not a plain call) so promise jobs and nextTicks run when JS returns.
    napi_value recv = self->Value();
    napi_value result;
    napi_status st = napi_make_callback(env, self->asyncContext_, recv, self->callback_.Value(), 0, nullptr, &result);
    if (st == napi_pending_exception) {
      napi_value exc;
      napi_get_and_clear_last_exception(env, &exc);
      napi_fatal_exception(env, exc);
    }
  }

  void StartPolling() {
    if (!poll_ || polling_) return;
    if (uv_poll_start(poll_, UV_READABLE, OnPoll) == 0) polling_ = true;
  }

  void StopPolling() {
    if (!poll_ || !polling_) return;
    uv_poll_stop(poll_);
    polling_ = false;
  }

  // Stop polling, free the handle when libuv is done with it, drop references. Idempotent.
  void CloseInternal(bool fromJs) {
    if (closed_) return;
    closed_ = true;
    if (poll_) {
      uv_poll_stop(poll_);
      poll_->data = nullptr;
      uv_close(reinterpret_cast<uv_handle_t*>(poll_), [](uv_handle_t* h) { delete reinterpret_cast<uv_poll_t*>(h); });
      poll_ = nullptr;
    }
    polling_ = false;
    if (ownsFd_ && fd_ >= 0) close(fd_);
    fd_ = -1;
    if (hookAdded_) {
      napi_remove_env_cleanup_hook(Env(), CleanupHook, this);
      hookAdded_ = false;
    }
    if (asyncContext_) {
      napi_async_destroy(Env(), asyncContext_);
      asyncContext_ = nullptr;
    }
    if (fromJs) {
      callback_.Reset();
      asyncResource_.Reset();
      Unref();
    }
  }

  static int BufferArg(const Napi::Value& v, uint8_t** data, size_t* len) {
    if (!v.IsBuffer() && !v.IsTypedArray()) return -EINVAL;
    Napi::Uint8Array a = v.As<Napi::Uint8Array>();
    *data = a.Data();
    *len = a.ByteLength();
    return 0;
  }

  // One read(2): length, 0 when nothing is pending, or -errno.
  ssize_t ReadOne(uint8_t* data, size_t len) {
    if (fd_ < 0) return -EBADF;
    ssize_t n;
    do {
      n = read(fd_, data, len);
    } while (n < 0 && errno == EINTR);
    if (n < 0) return errno == EAGAIN ? 0 : -errno;
    return n;
  }

  Napi::Value Read(const Napi::CallbackInfo& info) {
    uint8_t* data;
    size_t len;
    if (info.Length() < 1 || BufferArg(info[0], &data, &len) < 0) return ThrowType(info.Env(), "read(buf)");
    return Napi::Number::New(info.Env(), static_cast<double>(ReadOne(data, len)));
  }

  Napi::Value ReadMany(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 2 || !info[0].IsArray() || !info[1].IsTypedArray() ||
        info[1].As<Napi::TypedArray>().TypedArrayType() != napi_int32_array) {
      return ThrowType(env, "readMany(bufs, lengths: Int32Array)");
    }
    Napi::Array bufs = info[0].As<Napi::Array>();
    Napi::Int32Array lengths = info[1].As<Napi::Int32Array>();
    uint32_t count = bufs.Length();
    if (lengths.ElementLength() < count) count = static_cast<uint32_t>(lengths.ElementLength());
    uint32_t i = 0;
    for (; i < count; i++) {
      uint8_t* data;
      size_t len;
      if (BufferArg(bufs.Get(i), &data, &len) < 0) return ThrowType(env, "readMany: bufs must hold Buffers");
      ssize_t n = ReadOne(data, len);
      if (n <= 0) {
        if (i == 0 && n < 0) return Napi::Number::New(env, static_cast<double>(n));
        break;  // An error after some reads shows up on the next call.
      }
      lengths[i] = static_cast<int32_t>(n);
    }
    return Napi::Number::New(env, i);
  }

  Napi::Value Write(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    uint8_t* data;
    size_t len;
    if (info.Length() < 2 || BufferArg(info[0], &data, &len) < 0 || !info[1].IsNumber()) {
      return ThrowType(env, "write(buf, length)");
    }
    int64_t want = info[1].As<Napi::Number>().Int64Value();
    if (want < 0 || static_cast<uint64_t>(want) > len) return Napi::Number::New(env, -EINVAL);
    if (fd_ < 0) return Napi::Number::New(env, -EBADF);
    ssize_t n;
    do {
      n = write(fd_, data, static_cast<size_t>(want));
    } while (n < 0 && errno == EINTR);
    return Napi::Number::New(env, static_cast<double>(n < 0 ? -errno : n));
  }

  // Several replies in one crossing: bufs[i][0, lengths[i]) each with its own write(2) (the
  // kernel takes one reply per write). lengths[i] is replaced by that write's result (bytes or
  // -errno); every reply is attempted whatever the others gave.
  Napi::Value WriteMany(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 3 || !info[0].IsArray() || !info[1].IsTypedArray() || !info[2].IsNumber() ||
        info[1].As<Napi::TypedArray>().TypedArrayType() != napi_int32_array) {
      return ThrowType(env, "writeMany(bufs, lengths: Int32Array, count)");
    }
    Napi::Array bufs = info[0].As<Napi::Array>();
    Napi::Int32Array lengths = info[1].As<Napi::Int32Array>();
    int64_t count = info[2].As<Napi::Number>().Int64Value();
    if (count < 0 || static_cast<uint64_t>(count) > bufs.Length() ||
        static_cast<uint64_t>(count) > lengths.ElementLength()) {
      return ThrowType(env, "writeMany: count out of range");
    }
    for (uint32_t i = 0; i < static_cast<uint32_t>(count); i++) {
      uint8_t* data;
      size_t len;
      if (BufferArg(bufs.Get(i), &data, &len) < 0) return ThrowType(env, "writeMany: bufs must hold Buffers");
      int32_t want = lengths[i];
      if (want < 0 || static_cast<size_t>(want) > len) {
        lengths[i] = -EINVAL;
        continue;
      }
      if (fd_ < 0) {
        lengths[i] = -EBADF;
        continue;
      }
      ssize_t n;
      do {
        n = write(fd_, data, static_cast<size_t>(want));
      } while (n < 0 && errno == EINTR);
      lengths[i] = static_cast<int32_t>(n < 0 ? -errno : n);
    }
    return env.Undefined();
  }

  Napi::Value Writev(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 1 || !info[0].IsArray()) return ThrowType(env, "writev(bufs)");
    Napi::Array bufs = info[0].As<Napi::Array>();
    uint32_t count = bufs.Length();
    constexpr uint32_t kMax = 64;
    if (count > kMax) return Napi::Number::New(env, -EINVAL);
    struct iovec iov[kMax];
    for (uint32_t i = 0; i < count; i++) {
      uint8_t* data;
      size_t len;
      if (BufferArg(bufs.Get(i), &data, &len) < 0) return ThrowType(env, "writev: bufs must hold Buffers");
      iov[i].iov_base = data;
      iov[i].iov_len = len;
    }
    if (fd_ < 0) return Napi::Number::New(env, -EBADF);
    ssize_t n;
    do {
      n = writev(fd_, iov, static_cast<int>(count));
    } while (n < 0 && errno == EINTR);
    return Napi::Number::New(env, static_cast<double>(n < 0 ? -errno : n));
  }

  Napi::Value Pause(const Napi::CallbackInfo& info) {
    StopPolling();
    return info.Env().Undefined();
  }

  Napi::Value Resume(const Napi::CallbackInfo& info) {
    if (!closed_) StartPolling();
    return info.Env().Undefined();
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    if (!closed_) CloseInternal(true);
    return info.Env().Undefined();
  }

  int fd_ = -1;
  bool ownsFd_ = false;
  bool closed_ = false;
  bool polling_ = false;
  bool hookAdded_ = false;
  uv_poll_t* poll_ = nullptr;
  Napi::FunctionReference callback_;
  Napi::ObjectReference asyncResource_;
  napi_async_context asyncContext_ = nullptr;
};

}  // namespace

void InitFuseDevice(Napi::Env env, Napi::Object exports) {
  exports.Set("fuseOpen", Napi::Function::New<FuseOpen>(env, "fuseOpen"));
  exports.Set("mount", Napi::Function::New<Mount>(env, "mount"));
  exports.Set("umount", Napi::Function::New<Umount>(env, "umount"));
  exports.Set("fusermountMount", Napi::Function::New<FusermountMount>(env, "fusermountMount"));
  exports.Set("fuseCloneFd", Napi::Function::New<FuseCloneFd>(env, "fuseCloneFd"));
  exports.Set("seqpacketPair", Napi::Function::New<SeqpacketPair>(env, "seqpacketPair"));
  exports.Set("FuseChannel", FuseChannel::Init(env));

  Napi::Object c = Napi::Object::New(env);
  c.Set("MS_RDONLY", Napi::Number::New(env, MS_RDONLY));
  c.Set("MS_NOSUID", Napi::Number::New(env, MS_NOSUID));
  c.Set("MS_NODEV", Napi::Number::New(env, MS_NODEV));
  c.Set("MS_NOEXEC", Napi::Number::New(env, MS_NOEXEC));
  c.Set("MS_NOATIME", Napi::Number::New(env, MS_NOATIME));
  c.Set("MS_NODIRATIME", Napi::Number::New(env, MS_NODIRATIME));
  c.Set("MS_RELATIME", Napi::Number::New(env, MS_RELATIME));
  c.Set("MNT_FORCE", Napi::Number::New(env, MNT_FORCE));
  c.Set("MNT_DETACH", Napi::Number::New(env, MNT_DETACH));
  c.Set("UMOUNT_NOFOLLOW", Napi::Number::New(env, UMOUNT_NOFOLLOW));
  exports.Set("constants", c);
}

}  // namespace qsd
