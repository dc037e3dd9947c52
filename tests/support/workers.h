/*
 * workers.h - run N worker processes against a real coordinator.
 *
 * run_workers() forks n children; child r runs fn(r, arg, shared) and exits
 * with its return value (0 = pass).  `shared` is an anonymous shared mapping
 * of shared_size bytes visible to the parent and all children, zeroed before
 * the fork, for results and timestamps.  Every wait is bounded.
 */
#ifndef SBN_TEST_WORKERS_H
#define SBN_TEST_WORKERS_H

#include <stddef.h>
#include <sys/types.h>

#define WORKERS_MAX 16

typedef int (*worker_fn)(int rank, void *arg, void *shared);

typedef struct worker_set {
  int n;
  pid_t pids[WORKERS_MAX];
  int status[WORKERS_MAX]; /* exit codes after workers_wait, -1 = killed/timeout */
  void *shared;
  size_t shared_size;
} worker_set;

/* Forks the workers; returns 0 or -1. */
int workers_start(worker_set *ws, int n, worker_fn fn, void *arg, size_t shared_size);
/* Waits for all, at most timeout_ms in total; returns how many exited 0. */
int workers_wait(worker_set *ws, int timeout_ms);
/* Unmaps the shared region. */
void workers_release(worker_set *ws);

/* A per-test unique job id ("test-<pid>-<counter>"). */
const char *unique_job(void);

struct sbn_ctx;
struct sbn_config;
/* sbn_config_init(cfg), then a test worker's coordinator addr, job, rank and
 * world: callers set whatever else they need before sbn_init(). */
void worker_config(struct sbn_config *cfg, const char *addr, const char *job, int rank,
                   int world);

/*
 * sbn_init() for a worker of a test: coordinator addr, job, rank, world,
 * everything else default.  Returns the status; *ctx is NULL on failure.
 */
int worker_connect(const char *addr, const char *job, int rank, int world,
                   struct sbn_ctx **ctx);

struct Suite;
/* Runs a Check suite (fork mode) and returns 0 when every test passed. */
int run_suite(struct Suite *s);

#endif
