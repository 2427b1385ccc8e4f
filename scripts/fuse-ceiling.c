// Benchmark ceiling: a minimal raw-/dev/fuse server (no libfuse) that answers null reads/writes.
//
// Usage: fuse-ceiling [-q QUEUES] [-s SIZE] MOUNTPOINT
//   Mounts over the existing regular file MOUNTPOINT (we must be root), serves a SIZE-byte
//   file (default 1 GiB) whose reads return zeroes and whose writes are accepted and dropped.
//   Queue 0 is the mount fd; queues 1..N-1 are clones (FUSE_DEV_IOC_CLONE), one blocking
//   thread each, so the kernel spreads requests over them round-robin like a multi-queue
//   export. Prints "ready" once the mount exists; unmounts (MNT_DETACH) on SIGTERM/SIGINT.
// Built by scripts/bench-fuse.ts with `cc -O2 -pthread`; never committed as a binary.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_WRITE (128u * 1024u)
#define MAX_PAGES 32u
// The kernel refuses read() buffers smaller than max_write + the WRITE headers (80 bytes);
// a page of slack also covers every other request (names are at most 4 KiB).
#define REQ_BUF_SIZE (MAX_WRITE + 4096u)
#define MAX_QUEUES 64

static uint64_t file_size = 1ull << 30;
static const char *mountpoint;
// READ replies point into this; it is never written, so all threads share it.
static char zeroes[MAX_WRITE];

struct queue {
  int fd;
  pthread_t thread;
};

// One reply: out header plus an optional body, in one writev() so the kernel sees one message.
static void reply(int fd, uint64_t unique, int error, const void *body, size_t body_len) {
  struct fuse_out_header oh = {
      .len = (uint32_t)(sizeof(oh) + (error ? 0 : body_len)),
      .error = error,
      .unique = unique,
  };
  struct iovec iov[2] = {{&oh, sizeof(oh)}, {(void *)body, body_len}};
  // ENOENT = the request was interrupted and is gone: nothing to do.
  if (writev(fd, iov, error || body_len == 0 ? 1 : 2) < 0 && errno != ENOENT) {
    perror("fuse-ceiling: writev");
  }
}

static void fill_attr(struct fuse_attr *a) {
  memset(a, 0, sizeof(*a));
  a->ino = FUSE_ROOT_ID;
  a->size = file_size;
  a->blocks = (file_size + 511) / 512;
  a->mode = S_IFREG | 0600;
  a->nlink = 1;
  a->blksize = 4096;
}

static void do_init(int fd, const struct fuse_in_header *ih, const void *arg) {
  const struct fuse_init_in *in = arg;
  struct fuse_init_out out;
  memset(&out, 0, sizeof(out));
  out.major = FUSE_KERNEL_VERSION;
  // Our header's minor; the kernel speaks every older minor it is offered.
  out.minor = FUSE_KERNEL_MINOR_VERSION;
  out.max_readahead = in->max_readahead;
  // Only what the kernel offers may be accepted.
  out.flags = in->flags & (FUSE_ASYNC_READ | FUSE_ASYNC_DIO | FUSE_MAX_PAGES | FUSE_PARALLEL_DIROPS);
  out.max_background = 4096;
  out.congestion_threshold = 3072;
  out.max_write = MAX_WRITE;
  out.time_gran = 1;
  out.max_pages = MAX_PAGES;
  reply(fd, ih->unique, 0, &out, sizeof(out));
}

static void serve(int fd, const struct fuse_in_header *ih, const void *arg) {
  switch (ih->opcode) {
    case FUSE_INIT:
      do_init(fd, ih, arg);
      break;
    case FUSE_GETATTR: {
      struct fuse_attr_out out;
      memset(&out, 0, sizeof(out));
      out.attr_valid = 1;
      fill_attr(&out.attr);
      reply(fd, ih->unique, 0, &out, sizeof(out));
      break;
    }
    case FUSE_OPEN: {
      struct fuse_open_out out;
      memset(&out, 0, sizeof(out));
      out.open_flags = FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES;
      reply(fd, ih->unique, 0, &out, sizeof(out));
      break;
    }
    case FUSE_READ: {
      const struct fuse_read_in *in = arg;
      uint64_t len = in->size > MAX_WRITE ? MAX_WRITE : in->size;
      // The kernel expects short reads at EOF: clamp, don't fail.
      if (in->offset >= file_size) {
        len = 0;
      } else if (len > file_size - in->offset) {
        len = file_size - in->offset;
      }
      reply(fd, ih->unique, 0, zeroes, len);
      break;
    }
    case FUSE_WRITE: {
      const struct fuse_write_in *in = arg;
      struct fuse_write_out out = {.size = in->size};
      reply(fd, ih->unique, 0, &out, sizeof(out));
      break;
    }
    case FUSE_FLUSH:
    case FUSE_FSYNC:
    case FUSE_RELEASE:
      reply(fd, ih->unique, 0, NULL, 0);
      break;
    case FUSE_LOOKUP:
      reply(fd, ih->unique, -ENOENT, NULL, 0);
      break;
    case FUSE_FORGET:
    case FUSE_BATCH_FORGET:
      break;  // The kernel expects no reply.
    default:
      reply(fd, ih->unique, -ENOSYS, NULL, 0);
      break;
  }
}

static void *queue_loop(void *opaque) {
  struct queue *q = opaque;
  char *buf = malloc(REQ_BUF_SIZE);  // Once per queue, never per request.
  if (!buf) {
    perror("fuse-ceiling: malloc");
    exit(1);
  }
  for (;;) {
    ssize_t n = read(q->fd, buf, REQ_BUF_SIZE);
    if (n < 0) {
      if (errno == EINTR || errno == ENOENT || errno == EAGAIN) continue;  // ENOENT: interrupted
      if (errno == ENODEV) break;                                        // unmounted
      perror("fuse-ceiling: read");
      exit(1);
    }
    if ((size_t)n < sizeof(struct fuse_in_header)) {
      fprintf(stderr, "fuse-ceiling: short request (%zd bytes)\n", n);
      exit(1);
    }
    const struct fuse_in_header *ih = (const void *)buf;
    serve(q->fd, ih, buf + sizeof(*ih));
  }
  free(buf);
  return NULL;
}

static void usage(void) {
  fprintf(stderr, "usage: fuse-ceiling [-q QUEUES] [-s SIZE] MOUNTPOINT\n");
  exit(2);
}

int main(int argc, char **argv) {
  int nqueues = 1;
  int opt;
  while ((opt = getopt(argc, argv, "q:s:")) != -1) {
    switch (opt) {
      case 'q':
        nqueues = atoi(optarg);
        if (nqueues < 1 || nqueues > MAX_QUEUES) usage();
        break;
      case 's':
        file_size = strtoull(optarg, NULL, 0);
        break;
      default:
        usage();
    }
  }
  if (optind != argc - 1) usage();
  mountpoint = argv[optind];

  // Block the stop signals in every thread; main waits for them with sigwait().
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGTERM);
  sigaddset(&stop, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop, NULL);

  static struct queue queues[MAX_QUEUES];
  int fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    perror("fuse-ceiling: open /dev/fuse");
    return 1;
  }
  char opts[256];
  snprintf(opts, sizeof(opts), "fd=%d,rootmode=100000,user_id=0,group_id=0,max_read=%u", fd, MAX_WRITE);
  if (mount("fuse-ceiling", mountpoint, "fuse.fuse-ceiling", MS_NOSUID | MS_NODEV, opts) < 0) {
    perror("fuse-ceiling: mount");
    return 1;
  }
  queues[0].fd = fd;
  for (int i = 1; i < nqueues; i++) {
    int cfd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
    uint32_t src = (uint32_t)fd;
    if (cfd < 0 || ioctl(cfd, FUSE_DEV_IOC_CLONE, &src) < 0) {
      perror("fuse-ceiling: clone /dev/fuse");
      umount2(mountpoint, MNT_DETACH);
      return 1;
    }
    queues[i].fd = cfd;
  }
  for (int i = 0; i < nqueues; i++) {
    int err = pthread_create(&queues[i].thread, NULL, queue_loop, &queues[i]);
    if (err) {
      fprintf(stderr, "fuse-ceiling: pthread_create: %s\n", strerror(err));
      umount2(mountpoint, MNT_DETACH);
      return 1;
    }
  }
  printf("ready\n");
  fflush(stdout);

  int sig;
  sigwait(&stop, &sig);
  if (umount2(mountpoint, MNT_DETACH) < 0) perror("fuse-ceiling: umount2");
  // Exiting closes the fds, which aborts the connection and anything still in flight.
  return 0;
}
