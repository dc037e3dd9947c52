/*
 * coord_wrap.c - the allocation wrappers of sbn-coordinator-nomem, a build
 * of the coordinator for test_nomem only (never installed).  Like the real
 * binary's heap_wrap.c it is linked with --wrap=malloc,calloc,realloc and
 * counts every allocation (heap.h); on top of that it makes chosen
 * allocations fail, as SQLite's test harness does:
 *
 *   SBN_NOMEM_FAIL=N      the N-th failable allocation (1-based) returns
 *                         NULL; 0 or unset: none does
 *   SBN_NOMEM_PERSIST=1   ... and so does every failable allocation after it
 *   SBN_NOMEM_REPORT=PATH at exit, write "<failable calls> <failed>\n" there;
 *                         PATH.hit is created when the allocation fails
 *   SBN_NOMEM_TRACE=1     print a backtrace to stderr at each failed call
 *                         (addresses; addr2line -f -e BINARY names them)
 *
 * "Failable" is every allocation the coordinator's own code makes (its
 * arenas, pools, connections, jobs, rounds, protobuf-c decoding into its
 * arenas).  Allocations libuv makes through the allocator main() hands it
 * are passed through: libuv aborts on some of its own failures (growing its
 * watcher array), which is libuv's choice and not what this test checks.
 * They are told apart by the caller's address (dladdr: which object the
 * call came from).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include "heap.h"

void *__real_malloc(size_t n);
void *__real_calloc(size_t k, size_t n);
void *__real_realloc(void *p, size_t n);
void *__wrap_malloc(size_t n);
void *__wrap_calloc(size_t k, size_t n);
void *__wrap_realloc(void *p, size_t n);

static atomic_int ready;          /* 1 once the settings are read */
static unsigned long fail_at;     /* SBN_NOMEM_FAIL */
static int persist;               /* SBN_NOMEM_PERSIST */
static int trace;                 /* SBN_NOMEM_TRACE */
static const void *libuv_base;    /* where libuv is mapped */
static atomic_ulong calls;        /* failable allocations so far */
static atomic_ulong failed;       /* of which returned NULL */
static char hit_path[512];        /* SBN_NOMEM_REPORT + ".hit", or "" */

static void setup(void) {
  /* Racing first calls read the same values: harmless. */
  const char *s = getenv("SBN_NOMEM_FAIL");
  fail_at = s != NULL ? strtoul(s, NULL, 10) : 0;
  s = getenv("SBN_NOMEM_PERSIST");
  persist = s != NULL && s[0] == '1';
  s = getenv("SBN_NOMEM_REPORT");
  if (s != NULL && s[0] != '\0')
    snprintf(hit_path, sizeof(hit_path), "%s.hit", s);
  s = getenv("SBN_NOMEM_TRACE");
  trace = s != NULL && s[0] == '1';
  Dl_info info;
  if (dladdr((const void *)&uv_version, &info) != 0)
    libuv_base = info.dli_fbase;
  atomic_store(&ready, 1);
}

/* 1 when this call, made from the code at ret, is to fail. */
static int should_fail(const void *ret) {
  if (!atomic_load_explicit(&ready, memory_order_acquire))
    setup();
  Dl_info info;
  if (libuv_base != NULL && dladdr(ret, &info) != 0 && info.dli_fbase == libuv_base)
    return 0;
  unsigned long n = atomic_fetch_add(&calls, 1) + 1;
  if (fail_at == 0 || n < fail_at || (n > fail_at && !persist))
    return 0;
  if (atomic_fetch_add(&failed, 1) == 0 && hit_path[0] != '\0') {
    int fd = open(hit_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd >= 0)
      close(fd);
  }
  if (trace) {
    /* libc's own allocations (backtrace's) do not come back here. */
    void *frames[32];
    int k = backtrace(frames, 32);
    dprintf(STDERR_FILENO, "sbn-coordinator-nomem: allocation %lu fails, from:\n", n);
    backtrace_symbols_fd(frames, k, STDERR_FILENO);
  }
  return 1;
}

void *__wrap_malloc(size_t n) {
  if (should_fail(__builtin_return_address(0)))
    return NULL;
  sbn__srv_heap_note();
  return __real_malloc(n);
}

void *__wrap_calloc(size_t k, size_t n) {
  if (should_fail(__builtin_return_address(0)))
    return NULL;
  sbn__srv_heap_note();
  return __real_calloc(k, n);
}

void *__wrap_realloc(void *p, size_t n) {
  if (should_fail(__builtin_return_address(0)))
    return NULL;
  sbn__srv_heap_note();
  return __real_realloc(p, n);
}

__attribute__((destructor)) static void report(void) {
  const char *path = getenv("SBN_NOMEM_REPORT");
  if (path == NULL || path[0] == '\0')
    return;
  char line[64];
  int len = snprintf(line, sizeof(line), "%lu %lu\n", atomic_load(&calls), atomic_load(&failed));
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0)
    return;
  if (write(fd, line, (size_t)len) != len)
    (void)0; /* the test then finds a short report and says so */
  close(fd);
}
