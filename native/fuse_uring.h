// FUSE-over-io_uring: the Linux 6.14+ uapi subset we use (REGISTER / COMMIT_AND_FETCH) and our ring class.
//
// The system's <linux/fuse.h> (linux-libc-dev 6.1, protocol 7.38) predates FUSE-over-io_uring
// (protocol 7.42), so the layouts below are written out from the uapi; they are ABI facts.
#pragma once
#include <napi.h>
#include <stdint.h>

namespace qsd {

/** Size of the in/out header area of a ring entry: fuse_in_header on delivery, fuse_out_header on commit. */
constexpr uint32_t kFuseUringInOutHeaderSz = 128;
/** Size of the per-opcode header area (e.g. fuse_read_in, fuse_write_in). */
constexpr uint32_t kFuseUringOpInOutSz = 128;

/** Per-entry bookkeeping the kernel and the server exchange (struct fuse_uring_ent_in_out). */
struct FuseUringEntInOut {
  uint64_t flags;
  /** Kernel → server: the id to commit the answer with (the request's unique). */
  uint64_t commit_id;
  /** Kernel → server: request payload bytes; server → kernel: reply payload bytes. */
  uint32_t payload_sz;
  uint32_t padding;
  uint64_t reserved;
};

/** The header buffer of one ring entry (struct fuse_uring_req_header); iov[0] of REGISTER. */
struct FuseUringReqHeader {
  char in_out[kFuseUringInOutHeaderSz];
  char op_in[kFuseUringOpInOutSz];
  FuseUringEntInOut ring_ent_in_out;
};
static_assert(sizeof(FuseUringReqHeader) == 288, "fuse_uring_req_header layout");

/** io_uring command opcodes (sqe->cmd_op) for a /dev/fuse fd (enum fuse_uring_cmd). */
enum FuseUringCmd : uint32_t {
  kFuseIoUringCmdInvalid = 0,
  kFuseIoUringCmdRegister = 1,
  kFuseIoUringCmdCommitAndFetch = 2,
};

/** The command area of a 128-byte SQE (struct fuse_uring_cmd_req). */
struct FuseUringCmdReq {
  uint64_t flags;
  /** COMMIT_AND_FETCH: the commit_id the kernel gave with the request. */
  uint64_t commit_id;
  /** The queue (one per possible CPU) this entry belongs to. */
  uint16_t qid;
  uint8_t padding[6];
};
static_assert(sizeof(FuseUringCmdReq) == 24, "fuse_uring_cmd_req layout");

/** REGISTER takes exactly two iovecs: the header and the payload buffer. */
constexpr uint32_t kFuseUringIovSegs = 2;

/** Registers FuseUring (one io_uring per thread carrying FUSE ring entries). */
void InitFuseUring(Napi::Env env, Napi::Object exports);

}  // namespace qsd
