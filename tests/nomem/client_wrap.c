/* client_wrap.c - see client_wrap.h. */
#include "client_wrap.h"

#include <execinfo.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

void *__real_malloc(size_t n);
void *__real_calloc(size_t k, size_t n);
void *__real_realloc(void *p, size_t n);
void *__wrap_malloc(size_t n);
void *__wrap_calloc(size_t k, size_t n);
void *__wrap_realloc(void *p, size_t n);

static int armed, persist, held;
static unsigned long fail_at, calls, failed;

void nomem_arm(unsigned long at, int keep_failing) {
  fail_at = at;
  persist = keep_failing;
  calls = failed = 0;
  armed = 1;
}

unsigned long nomem_disarm(unsigned long *nfailed) {
  armed = 0;
  *nfailed = failed;
  return calls;
}

void nomem_hold(int on) { held = on; }

static int should_fail(void) {
  if (!armed || held)
    return 0;
  unsigned long n = ++calls;
  if (fail_at == 0 || n < fail_at || (n > fail_at && !persist))
    return 0;
  failed++;
  if (getenv("SBN_NOMEM_TRACE") != NULL) {
    /* libc's own allocations (backtrace's) do not come back here. */
    void *frames[32];
    int k = backtrace(frames, 32);
    dprintf(STDERR_FILENO, "allocation %lu fails, from:\n", n);
    backtrace_symbols_fd(frames, k, STDERR_FILENO);
  }
  return 1;
}

void *__wrap_malloc(size_t n) { return should_fail() ? NULL : __real_malloc(n); }

void *__wrap_calloc(size_t k, size_t n) { return should_fail() ? NULL : __real_calloc(k, n); }

void *__wrap_realloc(void *p, size_t n) { return should_fail() ? NULL : __real_realloc(p, n); }
