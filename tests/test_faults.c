/*
 * test_faults.c - faults with real processes: a real sbn-coordinator
 * (started with a shared secret, as in production) and worker processes
 * using libsbn-client.  A worker killed (-9) or stopped (SIGSTOP) mid-round;
 * the coordinator killed or frozen mid-round; a coordinator restarted on the
 * same port; a newer generation replacing a stuck one on a live coordinator.
 * In every case each worker returns within a bounded time with an error
 * that says what happened, and the next generation trains again.  And a
 * slow member: the others wait for it asleep, however short their
 * handshake's bound was.
 */
#define _GNU_SOURCE
#include <check.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "coord_proc.h"
#include "internal.h"
#include "sbn/sbn.h"
#include "workers.h"

#define C 4
#define READY_TIMEOUT_MS 15000
#define VICTIM_SLEEP_S 30
#define TOL 1e-9
/* slow_member_waits_asleep: the slow rank's delay, and the most wake-ups
 * and CPU time the waiting rank may have meanwhile. */
#define SLOW_DELAY_MS 3000
#define SLOW_WAKEUPS_MAX 3
#define SLOW_CPU_MS_MAX 150

static char dir[128], secret[160];
static coord_proc coord;

static void setup(void) {
  snprintf(dir, sizeof(dir), "/tmp/sbn-faults-XXXXXX");
  ck_assert_ptr_nonnull(mkdtemp(dir));
  snprintf(secret, sizeof(secret), "%s/secret", dir);
  int fd = open(secret, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  ck_assert_int_ge(fd, 0);
  const char *s = "fault-test shared secret 0123456789\n";
  ck_assert_int_eq(write(fd, s, strlen(s)), (ssize_t)strlen(s));
  close(fd);
}

static void teardown(void) {
  unlink(secret);
  rmdir(dir);
}

static void start_coord(const char *port, const char *round_timeout) {
  char listen[64];
  snprintf(listen, sizeof(listen), "127.0.0.1:%s", port);
  const char *args[] = {"--secret-file",   secret,        "--listen", listen,
                        "--round-timeout", round_timeout, NULL};
  ck_assert_int_eq(coord_start(&coord, args), 0);
}

typedef struct fault_arg {
  const char *addr;
  const char *job;
  int world;
  uint64_t generation;
  int timeout_ms; /* the client's bound on a round; 0 = default */
  int rounds;     /* rounds everyone completes (and checks) first */
  int victim;     /* this rank stops taking part after them; -1 = none */
  int spin_us;    /* the client's spin option */
} fault_arg;

typedef struct fault_shared {
  volatile int ready[WORKERS_MAX];
  int rc[WORKERS_MAX];
  int bad[WORKERS_MAX];
  long long t_return[WORKERS_MAX];
  char msg[WORKERS_MAX][512];
} fault_shared;

/* Rank r contributes count r+1, mean r + round, M2 1 on every channel. */
static int check_result(int world, int round, uint64_t gc, const double *gm, const double *gv) {
  double n = 0, s = 0;
  for (int r = 0; r < world; r++) {
    n += r + 1;
    s += (r + 1) * (double)(r + round);
  }
  double mean = s / n, m2 = 0;
  for (int r = 0; r < world; r++)
    m2 += 1 + (r + 1) * ((r + round) - mean) * ((r + round) - mean);
  if (gc != (uint64_t)n)
    return 0;
  for (int c = 0; c < C; c++)
    if (fabs(gm[c] - mean) > TOL * (1 + fabs(mean)) || fabs(gv[c] - m2) > TOL * (1 + m2))
      return 0;
  return 1;
}

static int fault_worker(int rank, void *argp, void *sharedp) {
  fault_arg *a = argp;
  fault_shared *sh = sharedp;
  sbn_config cfg;
  worker_config(&cfg, a->addr, a->job, rank, a->world);
  cfg.generation = a->generation;
  cfg.timeout_ms = a->timeout_ms;
  cfg.spin_us = a->spin_us;
  cfg.secret_file = secret;
  cfg.connect_timeout_ms = 5000;
  sbn_ctx *ctx;
  int rc = sbn_init(&cfg, &ctx);
  if (rc != SBN_OK) {
    sh->rc[rank] = rc;
    snprintf(sh->msg[rank], sizeof(sh->msg[rank]), "init: %s", sbn_last_error());
    sh->ready[rank] = -1;
    return 1;
  }
  double mean[C], m2[C], gm[C], gv[C];
  uint64_t gc;
  for (int k = 0; k < a->rounds; k++) {
    for (int c = 0; c < C; c++) {
      mean[c] = rank + k;
      m2[c] = 1;
    }
    rc = sbn_sync_stats(sbn_world(ctx), "bn", C, (uint64_t)rank + 1, mean, m2, &gc, gm, gv);
    if (rc != SBN_OK || !check_result(a->world, k, gc, gm, gv)) {
      sh->bad[rank]++;
      snprintf(sh->msg[rank], sizeof(sh->msg[rank]), "round %d: %d %s", k, rc, sbn_last_error());
      sh->ready[rank] = -1;
      return 1;
    }
  }
  sh->ready[rank] = 1;
  if (rank == a->victim) {
    sleep(VICTIM_SLEEP_S); /* stopped or killed by the test meanwhile */
    return 0;
  }
  rc = sbn_sync_stats(sbn_world(ctx), "bn.after", C, 1, mean, m2, &gc, gm, gv);
  sh->t_return[rank] = test_now_ms();
  sh->rc[rank] = rc;
  snprintf(sh->msg[rank], sizeof(sh->msg[rank]), "%s", rc ? sbn_last_error() : "");
  sbn_finalize(ctx);
  return 0;
}

/* Waits until every worker finished its checked rounds, then lets the
 * others block in the next one. */
static void wait_ready(fault_shared *sh, int world) {
  long long deadline = test_now_ms() + READY_TIMEOUT_MS;
  for (int r = 0; r < world; r++) {
    while (sh->ready[r] == 0 && test_now_ms() < deadline)
      usleep(1000);
    ck_assert_msg(sh->ready[r] == 1, "rank %d not ready: %s", r, sh->msg[r]);
  }
  usleep(100000);
}

/* Waits until every rank but skip has returned from its last round. */
static void wait_returned(fault_shared *sh, int world, int skip, int timeout_ms) {
  long long deadline = test_now_ms() + timeout_ms;
  for (int r = 0; r < world; r++)
    while (r != skip && sh->t_return[r] == 0 && test_now_ms() < deadline)
      usleep(1000);
}

static void expect_all(fault_shared *sh, int world, int skip, int code, const char *needle,
                       long long t0, long long bound_ms) {
  for (int r = 0; r < world; r++) {
    if (r == skip)
      continue;
    ck_assert_msg(sh->t_return[r] != 0, "rank %d did not return within the bound", r);
    ck_assert_msg(sh->rc[r] == code, "rank %d: rc %d (%s), wanted %d", r, sh->rc[r], sh->msg[r],
                  code);
    if (needle)
      ck_assert_msg(strstr(sh->msg[r], needle), "rank %d: '%s' lacks '%s'", r, sh->msg[r], needle);
    ck_assert_msg(sh->t_return[r] - t0 < bound_ms, "rank %d took %lld ms", r, sh->t_return[r] - t0);
  }
}

static void stop_coord_ok(void) {
  int st = coord_stop(&coord, SIGTERM, 5000);
  ck_assert_msg(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "coordinator status %d", st);
}

START_TEST(worker_killed_mid_round) {
  start_coord("0", "60000");
  fault_arg a = {coord.addr, unique_job(), 8, 0, 0, 5, 5, 0};
  worker_set ws;
  ck_assert_int_eq(workers_start(&ws, 8, fault_worker, &a, sizeof(fault_shared)), 0);
  fault_shared *sh = ws.shared;
  wait_ready(sh, 8);
  long long t0 = test_now_ms();
  kill(ws.pids[5], SIGKILL);
  wait_returned(sh, 8, 5, 5000);
  expect_all(sh, 8, 5, SBN_EPEERLOST, "rank 5", t0, 1000);
  workers_wait(&ws, 5000);
  workers_release(&ws);
  stop_coord_ok();
}
END_TEST

START_TEST(worker_stopped_mid_round) {
  start_coord("0", "500");
  fault_arg a = {coord.addr, unique_job(), 4, 0, 0, 3, 3, 0};
  worker_set ws;
  ck_assert_int_eq(workers_start(&ws, 4, fault_worker, &a, sizeof(fault_shared)), 0);
  fault_shared *sh = ws.shared;
  wait_ready(sh, 4);
  kill(ws.pids[3], SIGSTOP);
  long long t0 = test_now_ms();
  wait_returned(sh, 4, 3, 5000);
  /* The others contributed ~100 ms before t0; the round timeout is 500 ms. */
  expect_all(sh, 4, 3, SBN_ETIMEDOUT, "rank 3", t0, 1500);
  ck_assert_msg(strstr(sh->msg[0], "timed out after 500 ms"), "'%s'", sh->msg[0]);
  kill(ws.pids[3], SIGKILL);
  kill(ws.pids[3], SIGCONT);
  workers_wait(&ws, 5000);
  workers_release(&ws);
  stop_coord_ok();
}
END_TEST

/* The client's spin option in the fault tests: off, and far longer than any
 * bound (a spinning worker must still see a failure at once, and its round
 * bound must still hold). */
static const int fault_spin_us[] = {0, 5000000};

START_TEST(coordinator_killed_mid_round) {
  start_coord("0", "60000");
  fault_arg a = {coord.addr, unique_job(), 4, 0, 0, 3, 3, fault_spin_us[_i]};
  worker_set ws;
  ck_assert_int_eq(workers_start(&ws, 4, fault_worker, &a, sizeof(fault_shared)), 0);
  fault_shared *sh = ws.shared;
  wait_ready(sh, 4);
  long long t0 = test_now_ms();
  coord_stop(&coord, SIGKILL, 5000);
  wait_returned(sh, 4, 3, 5000);
  expect_all(sh, 4, 3, SBN_ECLOSED, "coordinator", t0, 1000);
  kill(ws.pids[3], SIGKILL);
  workers_wait(&ws, 5000);
  workers_release(&ws);
}
END_TEST

START_TEST(coordinator_frozen_mid_round) {
  /* A coordinator that stops answering (SIGSTOP: no FIN, no RST) is found
   * by the workers' own round bound. */
  start_coord("0", "60000");
  fault_arg a = {coord.addr, unique_job(), 3, 0, 1000, 2, -1, 0};
  worker_set ws;
  ck_assert_int_eq(workers_start(&ws, 3, fault_worker, &a, sizeof(fault_shared)), 0);
  fault_shared *sh = ws.shared;
  long long deadline = test_now_ms() + READY_TIMEOUT_MS;
  for (int r = 0; r < 3; r++)
    while (sh->ready[r] == 0 && test_now_ms() < deadline)
      usleep(200);
  /* Freeze it as soon as everyone is ready: some may already be done with
   * the last round; those that are not must return within the bound. */
  kill(coord.pid, SIGSTOP);
  long long t0 = test_now_ms();
  wait_returned(sh, 3, -1, 5000);
  for (int r = 0; r < 3; r++) {
    ck_assert_msg(sh->t_return[r] != 0, "rank %d hangs", r);
    ck_assert_msg(sh->rc[r] == SBN_OK || sh->rc[r] == SBN_ETIMEDOUT, "rank %d: %d %s", r, sh->rc[r],
                  sh->msg[r]);
    ck_assert_msg(sh->t_return[r] - t0 < 2000, "rank %d took %lld ms", r, sh->t_return[r] - t0);
  }
  kill(coord.pid, SIGCONT);
  workers_wait(&ws, 5000);
  workers_release(&ws);
  stop_coord_ok();
}
END_TEST

START_TEST(spinning_worker_keeps_its_bound) {
  /* Rank 1 never contributes and the coordinator waits a minute: rank 0,
   * spinning 5 s (fault_spin_us[1]) with a round bound of 1 s, must return
   * at its bound, not at the end of the spin. */
  start_coord("0", "60000");
  fault_arg a = {coord.addr, unique_job(), 2, 0, 1000, 2, 1, fault_spin_us[1]};
  worker_set ws;
  ck_assert_int_eq(workers_start(&ws, 2, fault_worker, &a, sizeof(fault_shared)), 0);
  fault_shared *sh = ws.shared;
  wait_ready(sh, 2);
  long long t0 = test_now_ms();
  wait_returned(sh, 2, 1, 8000);
  expect_all(sh, 2, 1, SBN_ETIMEDOUT, "within 1000 ms", t0, 1500);
  kill(ws.pids[1], SIGKILL);
  workers_wait(&ws, 5000);
  workers_release(&ws);
  stop_coord_ok();
}
END_TEST

typedef struct slow_arg {
  const char *addr, *job;
} slow_arg;

typedef struct slow_shared {
  int rc[2];
  long wakeups; /* rank 0's voluntary context switches in the slow round */
  long cpu_ms;  /* and its CPU time (user + system) */
  char msg[2][256];
} slow_shared;

static long rusage_ms(const struct rusage *r) {
  return (r->ru_utime.tv_sec + r->ru_stime.tv_sec) * 1000L +
         (r->ru_utime.tv_usec + r->ru_stime.tv_usec) / 1000L;
}

static int slow_worker(int rank, void *argp, void *sharedp) {
  slow_arg *a = argp;
  slow_shared *sh = sharedp;
  sbn_config cfg;
  worker_config(&cfg, a->addr, a->job, rank, 2);
  cfg.secret_file = secret;
  cfg.connect_timeout_ms = 5000;
  cfg.timeout_ms = 60000;
  sbn_ctx *ctx = NULL;
  int rc = sbn_init(&cfg, &ctx);
  double mean[C] = {0}, m2[C] = {0}, gm[C], gv[C];
  uint64_t gc;
  struct rusage r0, r1;
  for (int k = 0; rc == SBN_OK && k < 2; k++) {
    if (k == 1 && rank == 1)
      usleep(SLOW_DELAY_MS * 1000);
    getrusage(RUSAGE_SELF, &r0);
    rc = sbn_sync_stats(sbn_world(ctx), "bn", C, 1, mean, m2, &gc, gm, gv);
    getrusage(RUSAGE_SELF, &r1);
  }
  if (rank == 0) {
    sh->wakeups = r1.ru_nvcsw - r0.ru_nvcsw;
    sh->cpu_ms = rusage_ms(&r1) - rusage_ms(&r0);
  }
  sh->rc[rank] = rc;
  snprintf(sh->msg[rank], sizeof(sh->msg[rank]), "%s", rc ? sbn_last_error() : "");
  if (ctx != NULL)
    sbn_finalize(ctx);
  return rc != SBN_OK;
}

START_TEST(slow_member_waits_asleep) {
  /* Rank 0 waits SLOW_DELAY_MS for rank 1 in one round: asleep, neither
   * polling nor waking up again and again. */
  start_coord("0", "60000");
  slow_arg a = {coord.addr, unique_job()};
  worker_set ws;
  ck_assert_int_eq(workers_start(&ws, 2, slow_worker, &a, sizeof(slow_shared)), 0);
  ck_assert_int_eq(workers_wait(&ws, SLOW_DELAY_MS + 10000), 2);
  slow_shared *sh = ws.shared;
  for (int r = 0; r < 2; r++)
    ck_assert_msg(sh->rc[r] == SBN_OK, "rank %d: %d %s", r, sh->rc[r], sh->msg[r]);
  ck_assert_msg(sh->wakeups >= 1 && sh->wakeups <= SLOW_WAKEUPS_MAX,
                "rank 0 woke up %ld times waiting %d ms", sh->wakeups, SLOW_DELAY_MS);
  ck_assert_msg(sh->cpu_ms <= SLOW_CPU_MS_MAX, "rank 0 used %ld ms of CPU waiting %d ms",
                sh->cpu_ms, SLOW_DELAY_MS);
  workers_release(&ws);
  stop_coord_ok();
}
END_TEST

START_TEST(rcvtimeo_rules) {
  /* What bounds a blocking recv() (sbn__rcvtimeo_next): none set yet, kept
   * at both edges, shortened past the bound, lengthened past 4x. */
  ck_assert_int_eq(sbn__rcvtimeo_next(0, 60000), 30000);
  ck_assert_int_eq(sbn__rcvtimeo_next(30000, 60000), 0);
  ck_assert_int_eq(sbn__rcvtimeo_next(30000, 30000), 0);
  ck_assert_int_eq(sbn__rcvtimeo_next(30000, 29999), 14999);
  ck_assert_int_eq(sbn__rcvtimeo_next(30000, 120003), 0); /* 120003 / 4 == 30000 */
  ck_assert_int_eq(sbn__rcvtimeo_next(30000, 120004), 60002);
  ck_assert_int_eq(sbn__rcvtimeo_next(5, 60000), 30000); /* after a wait that ran out */
  ck_assert_int_eq(sbn__rcvtimeo_next(0, 1), 1);
  ck_assert_int_eq(sbn__rcvtimeo_next(2, 1), 1);
  ck_assert_int_eq(sbn__rcvtimeo_next(1, 1), 0);
  /* A wait that runs to its deadline, every recv() timing out: the bound
   * always holds, and the socket option is set a logarithmic number of
   * times. */
  for (int start = 1; start <= 70000; start = start * 3 + 1) {
    int cur = 0, left = start, sets = 0;
    while (left > 0) {
      int ms = sbn__rcvtimeo_next(cur, left);
      if (ms != 0) {
        cur = ms;
        sets++;
      }
      ck_assert_int_le(cur, left);
      ck_assert_int_ge(cur, 1);
      left -= cur;
    }
    ck_assert_int_le(sets, 18);
  }
}
END_TEST

START_TEST(coordinator_restart_same_port) {
  start_coord("0", "60000");
  char port[16];
  snprintf(port, sizeof(port), "%d", coord.port);
  const char *job = unique_job();
  fault_arg a = {coord.addr, job, 4, 0, 0, 3, 3, 0};
  worker_set ws;
  ck_assert_int_eq(workers_start(&ws, 4, fault_worker, &a, sizeof(fault_shared)), 0);
  fault_shared *sh = ws.shared;
  wait_ready(sh, 4);
  long long t0 = test_now_ms();
  coord_stop(&coord, SIGKILL, 5000);
  wait_returned(sh, 4, 3, 5000);
  expect_all(sh, 4, 3, SBN_ECLOSED, NULL, t0, 1000);
  kill(ws.pids[3], SIGKILL);
  workers_wait(&ws, 5000);
  workers_release(&ws);
  /* The launcher restarts the coordinator on the same port and the job
   * with the next generation: it trains again, every result checked. */
  start_coord(port, "60000");
  ck_assert_int_eq(coord.port, atoi(port));
  fault_arg b = {coord.addr, job, 4, 1, 0, 20, -1, 0};
  ck_assert_int_eq(workers_start(&ws, 4, fault_worker, &b, sizeof(fault_shared)), 0);
  ck_assert_int_eq(workers_wait(&ws, 20000), 4);
  sh = ws.shared;
  for (int r = 0; r < 4; r++)
    ck_assert_msg(sh->rc[r] == SBN_OK && sh->bad[r] == 0, "rank %d: %s", r, sh->msg[r]);
  workers_release(&ws);
  stop_coord_ok();
}
END_TEST

START_TEST(newer_generation_replaces_stuck_one) {
  start_coord("0", "60000");
  const char *job = unique_job();
  char jobcopy[64];
  snprintf(jobcopy, sizeof(jobcopy), "%s", job);
  fault_arg a = {coord.addr, jobcopy, 3, 0, 0, 2, 2, 0};
  worker_set old;
  ck_assert_int_eq(workers_start(&old, 3, fault_worker, &a, sizeof(fault_shared)), 0);
  fault_shared *osh = old.shared;
  wait_ready(osh, 3);
  kill(old.pids[2], SIGSTOP); /* stuck, with its connection open */
  /* Generation 1 starts on the live coordinator: the old ranks waiting in
   * a round are told at once, and the new ones train. */
  fault_arg b = {coord.addr, jobcopy, 3, 1, 0, 10, -1, 0};
  worker_set young;
  long long t0 = test_now_ms();
  ck_assert_int_eq(workers_start(&young, 3, fault_worker, &b, sizeof(fault_shared)), 0);
  wait_returned(osh, 3, 2, 5000);
  expect_all(osh, 3, 2, SBN_EPEERLOST, "restarted with generation 1", t0, 3000);
  ck_assert_int_eq(workers_wait(&young, 20000), 3);
  fault_shared *ysh = young.shared;
  for (int r = 0; r < 3; r++)
    ck_assert_msg(ysh->rc[r] == SBN_OK && ysh->bad[r] == 0, "rank %d: %s", r, ysh->msg[r]);
  kill(old.pids[2], SIGKILL);
  kill(old.pids[2], SIGCONT);
  workers_wait(&old, 5000);
  workers_release(&old);
  workers_release(&young);
  stop_coord_ok();
}
END_TEST

int main(void) {
  Suite *s = suite_create("faults");
  TCase *tc = tcase_create("faults");
  tcase_set_timeout(tc, 60);
  tcase_add_checked_fixture(tc, setup, teardown);
  tcase_add_test(tc, worker_killed_mid_round);
  tcase_add_test(tc, worker_stopped_mid_round);
  tcase_add_loop_test(tc, coordinator_killed_mid_round, 0, 2);
  tcase_add_test(tc, coordinator_frozen_mid_round);
  tcase_add_test(tc, spinning_worker_keeps_its_bound);
  tcase_add_test(tc, slow_member_waits_asleep);
  tcase_add_test(tc, rcvtimeo_rules);
  tcase_add_test(tc, coordinator_restart_same_port);
  tcase_add_test(tc, newer_generation_replaces_stuck_one);
  suite_add_tcase(s, tc);
  return run_suite(s);
}
