/*
 * test_nomem.c - the coordinator out of memory, at every allocation.
 *
 * sbn-coordinator-nomem is the real coordinator linked with allocation
 * wrappers that make a chosen allocation fail (tests/nomem/coord_wrap.c).
 * A clean run of the workload below counts the allocations the
 * coordinator's own code makes (start-up, connections, jobs, groups, round
 * slots, arenas, the allreduce's read buffers, a scrape of its metrics
 * page); then, for each of them in
 * turn, the coordinator is run again with that one allocation failing:
 *
 *  - failing at start-up, it exits with status 1 and a message, no signal;
 *  - once listening, every worker call returns SBN_OK with the right values
 *    or a clear error with a message; a time-out only where another rank
 *    failed cleanly first (a message the coordinator lost would surface as
 *    time-outs on every rank);
 *  - the coordinator recovers: once the allocation has failed, the next job
 *    on it runs the workload whole;
 *  - it stops cleanly on SIGTERM (exit 0; under AddressSanitizer, leaks
 *    would make that exit status non-zero).
 *
 * With every allocation failing from some point on, workers still get
 * errors rather than hangs, and the coordinator still stops cleanly.
 *
 * To look into one: SBN_NOMEM_ONLY=N SBN_NOMEM_TRACE=1 test_nomem runs
 * allocation N alone and lets the coordinator print where it was made;
 * SBN_NOMEM_VERBOSE=1 prints what every worker got and how long each run took.
 */
#include <check.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "coord_proc.h"
#include "raw_peer.h"
#include "scrape.h"
#include "sbn/sbn.h"
#include "workers.h"

#define WORLD 2
#define C 64
/* Two chunks: the pipelined allreduce, read buffers kept in place. */
#define BIG_N (SBN_CHUNK_FLOATS + 4096)
#define BCAST_BYTES 1000
/* Rounds of a loaded machine (sanitizers, tests in parallel) are slow. */
#define ROUND_TIMEOUT_MS "2000"
/* More allocations than this in the clean run means the workload changed
 * and this bound should be looked at again. */
#define SWEEP_MAX 2000

typedef struct shared {
  int rc[WORLD];    /* first failing status, 0 = passed */
  int step[WORLD];  /* the step it failed at */
  int wrong[WORLD]; /* a step returned SBN_OK with wrong values */
  char msg[WORLD][512];
} shared;

typedef struct arg {
  const char *addr;
  const char *job;
} arg;

/* Records a failed step; a worker stops at its first. */
static int failed(shared *sh, int rank, int step, int rc) {
  sh->rc[rank] = rc;
  sh->step[rank] = step;
  snprintf(sh->msg[rank], sizeof(sh->msg[rank]), "%s", sbn_last_error());
  return 1;
}

static int wrong(shared *sh, int rank, int step, const char *what) {
  sh->wrong[rank] = 1;
  sh->step[rank] = step;
  snprintf(sh->msg[rank], sizeof(sh->msg[rank]), "wrong values: %s", what);
  return 2;
}

/* The merge of count 10, mean rank + c, M2 1 over the two ranks:
 * count 20, mean c + 0.5, M2 1 + 1 + 10 * 0.25 * 2 = 7 (all exact). */
static int check_stats(uint64_t n, const double *mean, const double *m2) {
  if (n != 10u * WORLD)
    return 0;
  for (int c = 0; c < C; c++)
    if (mean[c] != c + 0.5 || m2[c] != 7.0)
      return 0;
  return 1;
}

static int steps(sbn_ctx *ctx, int rank, shared *sh) {
  double mean[C], m2[C], gmean[C], gm2[C];
  uint64_t gn = 0;
  for (int c = 0; c < C; c++) {
    mean[c] = rank + c;
    m2[c] = 1.0;
  }
  sbn_group *w = sbn_world(ctx);
  int rc = sbn_sync_stats(w, "bn1", C, 10, mean, m2, &gn, gmean, gm2);
  if (rc != SBN_OK)
    return failed(sh, rank, 1, rc);
  if (!check_stats(gn, gmean, gm2))
    return wrong(sh, rank, 1, "sync_stats");
  /* Backward: a = rank + 1 sums to 3, b = c to 2c. */
  double a[C], b[C], ga[C], gb[C];
  for (int c = 0; c < C; c++) {
    a[c] = rank + 1;
    b[c] = c;
  }
  if ((rc = sbn_sync_sums(w, "bn1", C, a, b, ga, gb)) != SBN_OK)
    return failed(sh, rank, 2, rc);
  for (int c = 0; c < C; c++)
    if (ga[c] != 3.0 || gb[c] != 2.0 * c)
      return wrong(sh, rank, 2, "sync_sums");
  /* Allreduce of two chunks: i % 1000 + rank sums exactly in float. */
  float *big = malloc(sizeof(float) * BIG_N);
  if (big == NULL)
    return failed(sh, rank, 3, SBN_ENOMEM);
  for (size_t i = 0; i < BIG_N; i++)
    big[i] = (float)(i % 1000 + (size_t)rank);
  rc = sbn_allreduce(w, big, BIG_N, SBN_REDUCE_SUM);
  int ok = 1;
  for (size_t i = 0; rc == SBN_OK && i < BIG_N && ok; i++)
    ok = big[i] == (float)(2 * (i % 1000) + 1);
  free(big);
  if (rc != SBN_OK)
    return failed(sh, rank, 3, rc);
  if (!ok)
    return wrong(sh, rank, 3, "allreduce");
  /* Fused small buffers, an empty one among them; the mean of rank + 1. */
  float s1[100], s2[50];
  for (int i = 0; i < 100; i++)
    s1[i] = (float)(rank + 1);
  for (int i = 0; i < 50; i++)
    s2[i] = (float)(rank + 1) * 2.0f;
  float *bufs[3] = {s1, NULL, s2};
  size_t ns[3] = {100, 0, 50};
  if ((rc = sbn_allreduce_many(w, bufs, ns, 3, SBN_REDUCE_MEAN)) != SBN_OK)
    return failed(sh, rank, 4, rc);
  for (int i = 0; i < 100; i++)
    if (s1[i] != 1.5f || (i < 50 && s2[i] != 3.0f))
      return wrong(sh, rank, 4, "allreduce_many");
  unsigned char bc[BCAST_BYTES];
  for (int i = 0; i < BCAST_BYTES; i++)
    bc[i] = rank == 1 ? (unsigned char)(i * 7) : 0;
  if ((rc = sbn_broadcast(w, bc, sizeof(bc), 1)) != SBN_OK)
    return failed(sh, rank, 5, rc);
  for (int i = 0; i < BCAST_BYTES; i++)
    if (bc[i] != (unsigned char)(i * 7))
      return wrong(sh, rank, 5, "broadcast");
  /* A group of its own (both ranks, listed backwards) and a round in it. */
  const int ranks[WORLD] = {1, 0};
  sbn_group *g = NULL;
  if ((rc = sbn_new_group(ctx, ranks, WORLD, &g)) != SBN_OK)
    return failed(sh, rank, 6, rc);
  rc = sbn_sync_stats(g, "bn2", C, 10, mean, m2, &gn, gmean, gm2);
  sbn_group_free(g);
  if (rc != SBN_OK)
    return failed(sh, rank, 7, rc);
  if (!check_stats(gn, gmean, gm2))
    return wrong(sh, rank, 7, "sync_stats in a group");
  if ((rc = sbn_barrier(w)) != SBN_OK)
    return failed(sh, rank, 8, rc);
  return 0;
}

static int workload(int rank, void *varg, void *vsh) {
  const arg *a = varg;
  shared *sh = vsh;
  sbn_ctx *ctx = NULL;
  int rc = worker_connect(a->addr, a->job, rank, WORLD, &ctx);
  if (rc != SBN_OK)
    return failed(sh, rank, 0, rc);
  int res = steps(ctx, rank, sh);
  rc = sbn_finalize(ctx);
  if (res == 0 && rc != SBN_OK)
    return failed(sh, rank, 9, rc);
  return res;
}

/* One job: both workers run the workload, then the metrics page is read
 * (any answer will do, or none: the coordinator's survival is checked
 * after).  Returns 1 when both workers passed, 0 when they failed cleanly;
 * fails the test otherwise. */
static int run_job(const char *addr, int metrics_port, const char *what) {
  arg a = {.addr = addr, .job = unique_job()};
  worker_set ws;
  ck_assert_int_eq(workers_start(&ws, WORLD, workload, &a, sizeof(shared)), 0);
  int passed = workers_wait(&ws, 30000);
  shared *sh = ws.shared;
  /*
   * A rank whose connection failed before the other joined leaves the
   * other's round to time out: the job ended with its last connection, so
   * the coordinator cannot know the rank will not come (that error names
   * it).  A time-out is accepted only next to another rank's clean error:
   * a message lost by the coordinator would time every rank out.
   */
  int clean = 0;
  for (int r = 0; r < WORLD; r++)
    clean |= ws.status[r] == 1 && sh->rc[r] != SBN_ETIMEDOUT;
  for (int r = 0; r < WORLD; r++) {
    ck_assert_msg(ws.status[r] == 0 || ws.status[r] == 1,
                  "%s: rank %d exited with %d (step %d: %s)", what, r, ws.status[r],
                  sh->step[r], sh->msg[r]);
    if (ws.status[r] == 1) {
      ck_assert_msg(sh->rc[r] < 0 && sh->rc[r] >= SBN_STATUS_MIN &&
                        (sh->rc[r] != SBN_ETIMEDOUT || clean),
                    "%s: rank %d step %d failed with %d (%s): %s", what, r, sh->step[r],
                    sh->rc[r], sbn_strerror(sh->rc[r]), sh->msg[r]);
      ck_assert_msg(sh->msg[r][0] != '\0', "%s: rank %d step %d failed without a message", what,
                    r, sh->step[r]);
    }
  }
  if (getenv("SBN_NOMEM_VERBOSE") != NULL)
    for (int r = 0; r < WORLD; r++)
      printf("  %s, rank %d: exit %d, step %d, status %d: %s\n", what, r, ws.status[r],
             sh->step[r], sh->rc[r], sh->msg[r]);
  workers_release(&ws);
  if (metrics_port > 0)
    free(http_get(metrics_port, "/metrics"));
  return passed == WORLD;
}

static const char *const coord_args[] = {"--round-timeout", ROUND_TIMEOUT_MS, "--metrics",
                                         "127.0.0.1:0", NULL};

/* Runs the coordinator with allocation n failing (0: none); with persist,
 * every one from n on.  Returns how many failable allocations it made
 * (from its report), and in *hit whether one failed. */
static unsigned long run_coordinator(unsigned long n, int persist, int *hit) {
  long long t0 = test_now_ms();
  char what[96], report[64], hit_path[80], fail_at[32];
  snprintf(what, sizeof(what), "allocation %lu failing%s", n, persist ? " from on" : "");
  snprintf(report, sizeof(report), "/tmp/sbn-nomem-%d.txt", (int)getpid());
  snprintf(hit_path, sizeof(hit_path), "%s.hit", report);
  snprintf(fail_at, sizeof(fail_at), "%lu", n);
  unlink(report);
  unlink(hit_path);
  setenv("SBN_NOMEM_FAIL", fail_at, 1);
  setenv("SBN_NOMEM_PERSIST", persist ? "1" : "0", 1);
  setenv("SBN_NOMEM_REPORT", report, 1);
  /* The coordinator's log tells the metrics port; it is printed (with
   * SBN_NOMEM_TRACE=1, where each failing allocation came from) when
   * tracing. */
  char log[128];
  temp_log_path(log, sizeof(log));
  coord_proc cp;
  int started = coord_start_bin(&cp, SBN_COORDINATOR_NOMEM_BIN, coord_args, log) == 0;
  int mport = started ? log_metrics_port(log) : -1;
  if (!started) {
    /* Out of memory at start-up: a message and exit status 1. */
    ck_assert_msg(cp.start_status != -1 && WIFEXITED(cp.start_status) &&
                      WEXITSTATUS(cp.start_status) == 1,
                  "%s: the coordinator did not start and did not exit with status 1 "
                  "(wait status %d)", what, cp.start_status);
  } else {
    char pw[128];
    snprintf(pw, sizeof(pw), "%s, first job", what);
    ck_assert_msg(run_job(cp.addr, mport, pw) || n != 0, "%s: the clean run failed", pw);
    /* Once the allocation has failed (at start-up or in the first job,
     * which may have passed or failed), a second job runs whole. */
    if (!persist && access(hit_path, F_OK) == 0) {
      snprintf(pw, sizeof(pw), "%s, second job", what);
      ck_assert_msg(run_job(cp.addr, mport, pw), "%s: the coordinator did not recover", pw);
    }
    int st = coord_stop(&cp, SIGTERM, 10000);
    ck_assert_msg(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0,
                  "%s: the coordinator did not stop cleanly on SIGTERM (wait status %d)", what,
                  st);
  }
  if (getenv("SBN_NOMEM_TRACE") != NULL) {
    char *text = read_file(log);
    fprintf(stderr, "%s", text != NULL ? text : "");
    free(text);
  }
  unlink(log);
  unsigned long calls = 0, nfailed = 0;
  FILE *f = fopen(report, "r");
  ck_assert_msg(f != NULL, "%s: no allocation report", what);
  ck_assert_msg(fscanf(f, "%lu %lu", &calls, &nfailed) == 2, "%s: a short report", what);
  fclose(f);
  unlink(report);
  unlink(hit_path);
  *hit = nfailed > 0;
  if (getenv("SBN_NOMEM_VERBOSE") != NULL)
    printf("%s: %lld ms\n", what, test_now_ms() - t0);
  return calls;
}

/* The clean run: the job passes and nothing fails. */
static unsigned long clean_count(void) {
  int hit = 1;
  unsigned long k = run_coordinator(0, 0, &hit);
  ck_assert_int_eq(hit, 0);
  ck_assert_msg(k > 10 && k < SWEEP_MAX, "%lu allocations in the clean run", k);
  return k;
}

START_TEST(each_allocation_fails_once) {
  unsigned long k = clean_count();
  unsigned long hits = 0, first = 1;
  /* SBN_NOMEM_ONLY=N runs allocation N alone (with SBN_NOMEM_TRACE=1 to
   * see where it is made). */
  const char *only = getenv("SBN_NOMEM_ONLY");
  if (only != NULL) {
    first = strtoul(only, NULL, 10);
    k = hits = first; /* nothing to count */
  }
  for (unsigned long n = first; n <= k; n++) {
    int hit = 0;
    run_coordinator(n, 0, &hit);
    hits += (unsigned long)hit;
  }
  printf("each_allocation_fails_once: %lu of %lu allocations made to fail\n", hits, k);
  /* The count varies a little with timing (which chunk arrives first), so
   * the last few may not be reached; nearly all must be. */
  ck_assert_msg(hits + 8 >= k, "only %lu of %lu allocations were made to fail", hits, k);
}
END_TEST

START_TEST(every_allocation_fails_from_some_point) {
  unsigned long k = clean_count();
  const unsigned long at[] = {1, 2, k / 8, k / 4, k / 2, 3 * k / 4, k - 1};
  for (size_t i = 0; i < sizeof(at) / sizeof(at[0]); i++) {
    int hit = 0;
    run_coordinator(at[i] > 0 ? at[i] : 1, 1, &hit);
  }
}
END_TEST

/*
 * Connections that come while the coordinator has no memory for any: each
 * is taken off the listener and closed, also those that arrive while the
 * handle that closes them is busy with the one before (libuv reads a
 * listener no further until its pending connection is taken: left there,
 * they and every later one would hang).
 */
#define REFUSED_CONNS 8
START_TEST(connections_without_memory_are_closed) {
  setenv("SBN_NOMEM_PERSIST", "1", 1);
  setenv("SBN_NOMEM_REPORT", "", 1);
  setenv("SBN_TEST_QUIET", "1", 1);
  static const char *const args[] = {NULL};
  coord_proc cp;
  int started = 0;
  /* The first allocation after start-up: every one from there on fails. */
  for (unsigned long n = 1; n <= 64 && !started; n++) {
    char at[32];
    snprintf(at, sizeof(at), "%lu", n);
    setenv("SBN_NOMEM_FAIL", at, 1);
    started = coord_start_bin(&cp, SBN_COORDINATOR_NOMEM_BIN, args, NULL) == 0;
  }
  ck_assert_msg(started, "the coordinator did not start with 64 allocations");
  rp *p[REFUSED_CONNS];
  for (int i = 0; i < REFUSED_CONNS; i++) /* all at once, before it runs */
    p[i] = rp_open(cp.port, 0);
  for (int i = 0; i < REFUSED_CONNS; i++) {
    ck_assert_msg(rp_wait_closed(p[i], RP_IO_TIMEOUT_MS), "connection %d was not closed", i);
    rp_close(p[i]);
  }
  int st = coord_stop(&cp, SIGTERM, 10000);
  ck_assert_msg(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0,
                "the coordinator did not stop cleanly (wait status %d)", st);
}
END_TEST

int main(void) {
#ifndef SBN_COORDINATOR_NOMEM_BIN
  printf("skipped: the linker cannot wrap malloc, so there is no sbn-coordinator-nomem\n");
  return 77;
#else
  Suite *s = suite_create("nomem");
  TCase *tc = tcase_create("coordinator");
  tcase_set_timeout(tc, 600);
  tcase_add_test(tc, each_allocation_fails_once);
  tcase_add_test(tc, every_allocation_fails_from_some_point);
  tcase_add_test(tc, connections_without_memory_are_closed);
  suite_add_tcase(s, tc);
  return run_suite(s);
#endif
}
