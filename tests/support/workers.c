/* workers.c - fork worker processes that share a memory region. */
#include "workers.h"

#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "coord_proc.h"
#include "sbn/sbn.h"

#include <check.h>

int workers_start(worker_set *ws, int n, worker_fn fn, void *arg, size_t shared_size) {
  memset(ws, 0, sizeof(*ws));
  if (n < 1 || n > WORKERS_MAX)
    return -1;
  ws->shared_size = shared_size ? shared_size : 4096;
  ws->shared = mmap(NULL, ws->shared_size, PROT_READ | PROT_WRITE,
                    MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (ws->shared == MAP_FAILED) {
    ws->shared = NULL;
    return -1;
  }
  fflush(NULL);
  for (int r = 0; r < n; r++) {
    pid_t pid = fork();
    if (pid < 0)
      return -1;
    if (pid == 0) {
      int rc = fn(r, arg, ws->shared);
      fflush(NULL);
      _exit(rc & 0xff);
    }
    ws->pids[r] = pid;
    ws->n = r + 1;
  }
  return 0;
}

int workers_wait(worker_set *ws, int timeout_ms) {
  long long deadline = test_now_ms() + timeout_ms;
  int ok = 0;
  for (int r = 0; r < ws->n; r++) {
    long long left = deadline - test_now_ms();
    int st = wait_child(ws->pids[r], left > 0 ? (int)left : 0);
    ws->status[r] = (st >= 0 && WIFEXITED(st)) ? WEXITSTATUS(st) : -1;
    if (ws->status[r] == 0)
      ok++;
  }
  return ok;
}

void workers_release(worker_set *ws) {
  if (ws->shared != NULL)
    munmap(ws->shared, ws->shared_size);
  ws->shared = NULL;
}

const char *unique_job(void) {
  static char buf[64];
  static int counter;
  snprintf(buf, sizeof(buf), "test-%d-%d", (int)getpid(), ++counter);
  return buf;
}

void worker_config(sbn_config *cfg, const char *addr, const char *job, int rank, int world) {
  sbn_config_init(cfg);
  cfg->coordinator = addr;
  cfg->job = job;
  cfg->rank = rank;
  cfg->world_size = world;
}

int worker_connect(const char *addr, const char *job, int rank, int world, sbn_ctx **ctx) {
  sbn_config cfg;
  worker_config(&cfg, addr, job, rank, world);
  return sbn_init(&cfg, ctx);
}

int run_suite(Suite *s) {
  SRunner *sr = srunner_create(s);
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed == 0 ? 0 : 1;
}
