/*
 * test_rounds.c - end-to-end synchronization rounds: a real sbn-coordinator
 * process and N worker processes using libsbn-client on 127.0.0.1.
 *
 * Each worker generates every rank's data for a round from a shared seed, so
 * it can compute the reference over the concatenated batch itself (two-pass
 * in long double) and check its own reply; it also records a hash of the
 * reply's bytes so the parent can check that every rank got the same bytes,
 * and that a second run with a different arrival order got them too.
 */
#include <check.h>
#include <float.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "coord_proc.h"
#include "coordinator.h"
#include "sbn/sbn.h"
#include "workers.h"

#define ROUNDS 300
#define MAX_C 257
#define MAX_COUNT 40
#define REL_TOL 1e-12
#define WORKER_TIMEOUT_MS 60000

typedef struct shared_results {
  uint64_t hash[WORKERS_MAX][ROUNDS];
  int bad_rounds[WORKERS_MAX];
  char first_failure[WORKERS_MAX][256];
  long long t_return[WORKERS_MAX];
  int rc[WORKERS_MAX];
  char msg[WORKERS_MAX][512];
  volatile int ready[WORKERS_MAX];
} shared_results;

typedef struct run_arg {
  const char *addr;
  const char *job;
  int world;
  uint64_t jitter_salt; /* changes arrival order between runs */
  int spin_us;          /* the workers' spin option */
} run_arg;

static uint64_t splitmix(uint64_t *s) {
  uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

static double unif(uint64_t *s) { return (double)(splitmix(s) >> 11) * 0x1p-53; }

static double normal(uint64_t *s) {
  double u = unif(s), v = unif(s);
  return sqrt(-2.0 * log(u + 1e-300)) * cos(2 * M_PI * v);
}

/* The round's shape: channels, location and scale of the data. */
static void round_shape(int round, size_t *C, double *loc, double *scale) {
  static const size_t Cs[] = {1, 3, 16, 64, MAX_C};
  static const double locs[] = {0.0, 2.3, -50.0, 1e4};
  static const double scales[] = {1.0, 0.01, 10.0};
  uint64_t s = 1000003u * (uint64_t)round + 17;
  *C = Cs[splitmix(&s) % 5];
  *loc = locs[splitmix(&s) % 4];
  *scale = scales[splitmix(&s) % 3];
}

/* Rank r's float32 data for a round, channel-major: x[c * count + i]. */
static size_t rank_data(int round, int rank, size_t C, double loc, double scale,
                        double *x) {
  uint64_t s = ((uint64_t)round << 20) ^ ((uint64_t)rank * 7919u) ^ 0xABCDEFu;
  size_t count = splitmix(&s) % (MAX_COUNT + 1);
  if (splitmix(&s) % 7 == 0)
    count = 0; /* empty local batches happen */
  for (size_t c = 0; c < C; c++)
    for (size_t i = 0; i < count; i++)
      x[c * count + i] = (double)(float)(loc + scale * (normal(&s) + 0.1 * (double)c));
  return count;
}

static uint64_t fnv(uint64_t h, const void *p, size_t n) {
  const unsigned char *b = p;
  for (size_t i = 0; i < n; i++)
    h = (h ^ b[i]) * 0x100000001B3ull;
  return h;
}

static int close_rel(double got, long double ref, long double scale) {
  return fabsl((long double)got - ref) <= REL_TOL * scale;
}

/* Runs ROUNDS rounds alternating forward and backward; checks every reply. */
static int rounds_worker(int rank, void *argp, void *sharedp) {
  run_arg *arg = argp;
  shared_results *sh = sharedp;
  sbn_config cfg;
  worker_config(&cfg, arg->addr, arg->job, rank, arg->world);
  cfg.spin_us = arg->spin_us;
  sbn_ctx *ctx;
  if (sbn_init(&cfg, &ctx) != SBN_OK) {
    snprintf(sh->first_failure[rank], 256, "init: %s", sbn_last_error());
    return 1;
  }
  static double x[MAX_COUNT * MAX_C], mean[MAX_C], m2[MAX_C], gmean[MAX_C], gm2[MAX_C];
  static long double rs1[MAX_C], rmean[MAX_C], rm2[MAX_C];
  for (int round = 0; round < ROUNDS; round++) {
    size_t C;
    double loc, scale;
    round_shape(round, &C, &loc, &scale);
    /* Reference over the concatenated batch: every rank's data. */
    memset(rs1, 0, sizeof(rs1));
    memset(rm2, 0, sizeof(rm2));
    uint64_t total = 0;
    for (int pass = 0; pass < 2; pass++) {
      for (int r = 0; r < arg->world; r++) {
        size_t cnt = rank_data(round, r, C, loc, scale, x);
        if (pass == 0)
          total += cnt;
        for (size_t c = 0; c < C; c++)
          for (size_t i = 0; i < cnt; i++) {
            if (pass == 0)
              rs1[c] += x[c * cnt + i];
            else
              rm2[c] += (x[c * cnt + i] - rmean[c]) * (x[c * cnt + i] - rmean[c]);
          }
      }
      if (pass == 0)
        for (size_t c = 0; c < C; c++)
          rmean[c] = total ? rs1[c] / total : 0;
    }
    /* This rank's contribution, two-pass in double. */
    size_t cnt = rank_data(round, rank, C, loc, scale, x);
    for (size_t c = 0; c < C; c++) {
      double s = 0, q = 0;
      for (size_t i = 0; i < cnt; i++)
        s += x[c * cnt + i];
      mean[c] = cnt ? s / (double)cnt : 0;
      for (size_t i = 0; i < cnt; i++)
        q += (x[c * cnt + i] - mean[c]) * (x[c * cnt + i] - mean[c]);
      m2[c] = q;
    }
    uint64_t js = arg->jitter_salt ^ ((uint64_t)round * 31 + (uint64_t)rank);
    if (arg->jitter_salt && splitmix(&js) % 3 == 0)
      usleep((useconds_t)(splitmix(&js) % 400));
    int rc;
    uint64_t gcount = 0;
    char layer[32];
    snprintf(layer, sizeof(layer), "layer%d", round % 7);
    if (round % 2 == 0) {
      rc = sbn_sync_stats(sbn_world(ctx), layer, C, cnt, mean, m2, &gcount, gmean, gm2);
    } else {
      /* Backward: sums of (mean, m2) stand in for (sum dy, sum dy*xhat). */
      rc = sbn_sync_sums(sbn_world(ctx), layer, C, mean, m2, gmean, gm2);
    }
    if (rc != SBN_OK) {
      snprintf(sh->first_failure[rank], 256, "round %d: %s", round, sbn_last_error());
      sbn_finalize(ctx);
      return 1;
    }
    int bad = 0;
    char detail[160] = "";
    if (round % 2 == 0) {
      bad |= gcount != total;
      if (bad)
        snprintf(detail, sizeof(detail), "count %llu, expected %llu",
                 (unsigned long long)gcount, (unsigned long long)total);
      for (size_t c = 0; c < C && total > 0; c++) {
        long double sd = sqrtl(rm2[c] / total);
        /* M2 to 1e-12 relative, plus the first-order effect of storing
         * each rank's mean in double: |dM2| <= 2 eps |mean| sqrt(n M2),
         * which only matters when |mean|/std is huge (1e4 / 0.01 here). */
        long double repr = 2 * DBL_EPSILON * fabsl(rmean[c]) * sqrtl(total * rm2[c]);
        int b = !close_rel(gmean[c], rmean[c], fabsl(rmean[c]) + sd + 1e-300L) ||
                fabsl((long double)gm2[c] - rm2[c]) > REL_TOL * rm2[c] + repr + 1e-300L;
        if (b && !bad)
          snprintf(detail, sizeof(detail), "channel %zu: mean %.17g vs %.17Lg, M2 %.17g vs %.17Lg",
                   c, gmean[c], rmean[c], gm2[c], rm2[c]);
        bad |= b;
      }
    } else {
      /* Reference sums of every rank's (mean, m2), each rank's data made once. */
      static long double sa[MAX_C], sb[MAX_C], aa[MAX_C];
      memset(sa, 0, sizeof(sa));
      memset(sb, 0, sizeof(sb));
      memset(aa, 0, sizeof(aa));
      for (int r = 0; r < arg->world; r++) {
        size_t k = rank_data(round, r, C, loc, scale, x);
        for (size_t c = 0; c < C; c++) {
          double s = 0, q = 0, mu;
          for (size_t i = 0; i < k; i++)
            s += x[c * k + i];
          mu = k ? s / (double)k : 0;
          for (size_t i = 0; i < k; i++)
            q += (x[c * k + i] - mu) * (x[c * k + i] - mu);
          sa[c] += mu;
          aa[c] += fabs(mu);
          sb[c] += q;
        }
      }
      for (size_t c = 0; c < C; c++) {
        bad |= !close_rel(gmean[c], sa[c], aa[c] + 1e-300L);
        bad |= !close_rel(gm2[c], sb[c], sb[c] + 1e-300L);
      }
    }
    if (bad && sh->bad_rounds[rank]++ == 0)
      snprintf(sh->first_failure[rank], 256, "round %d: reply differs from reference: %s",
               round, detail);
    uint64_t h = fnv(0xCBF29CE484222325ull, &gcount, sizeof(gcount));
    h = fnv(h, gmean, C * sizeof(double));
    sh->hash[rank][round] = fnv(h, gm2, C * sizeof(double));
  }
  return sbn_finalize(ctx) == SBN_OK ? 0 : 1;
}

static void run_rounds(const char *addr, int world, uint64_t salt, int spin_us,
                       shared_results *out) {
  run_arg arg = {addr, unique_job(), world, salt, spin_us};
  worker_set ws;
  ck_assert_int_eq(workers_start(&ws, world, rounds_worker, &arg, sizeof(shared_results)), 0);
  int ok = workers_wait(&ws, WORKER_TIMEOUT_MS);
  shared_results *sh = ws.shared;
  for (int r = 0; r < world; r++)
    ck_assert_msg(ws.status[r] == 0 && sh->bad_rounds[r] == 0,
                  "world %d rank %d: status %d, %d bad rounds, %s", world, r, ws.status[r],
                  sh->bad_rounds[r], sh->first_failure[r]);
  ck_assert_int_eq(ok, world);
  for (int round = 0; round < ROUNDS; round++)
    for (int r = 1; r < world; r++)
      ck_assert_msg(sh->hash[r][round] == sh->hash[0][round],
                    "round %d: rank %d got other bytes than rank 0", round, r);
  if (out)
    memcpy(out, sh, sizeof(*out));
  workers_release(&ws);
}

static coord_proc coord;

static void start_coord(void) {
  ck_assert_int_eq(coord_start(&coord, NULL), 0);
}

static void stop_coord(void) {
  int st = coord_stop(&coord, SIGTERM, 5000);
  ck_assert_msg(st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0,
                "coordinator did not exit cleanly (status %d)", st);
}

START_TEST(test_rounds_n) {
  static const int worlds[] = {2, 4, 8};
  start_coord();
  run_rounds(coord.addr, worlds[_i], 0, 0, NULL);
  stop_coord();
}
END_TEST

/* A spinning coordinator (--spin-us at its limit) and spinning workers
 * (reading the socket without waiting) give the same answers, and the
 * coordinator still shuts down cleanly. */
START_TEST(test_rounds_spinning) {
  char max[16];
  snprintf(max, sizeof(max), "%u", SBN_COORD_SPIN_MAX_US);
  const char *args[] = {"--spin-us", max, NULL};
  ck_assert_int_eq(coord_start(&coord, args), 0);
  run_rounds(coord.addr, 4, 0, 200, NULL);
  stop_coord();
}
END_TEST

START_TEST(test_rounds_shuffled_same_bytes) {
  static shared_results a, b;
  start_coord();
  run_rounds(coord.addr, 4, 0x1234, 0, &a);
  run_rounds(coord.addr, 4, 0x9876, 0, &b);
  for (int round = 0; round < ROUNDS; round++)
    ck_assert_msg(a.hash[0][round] == b.hash[0][round],
                  "round %d: other bytes when arrival order changed", round);
  stop_coord();
}
END_TEST

/* ---- faults ------------------------------------------------------------ */

typedef struct fault_arg {
  const char *addr;
  const char *job;
  int world;
  int victim;        /* rank that misbehaves */
  int mode;          /* what the victim does */
} fault_arg;

enum { VICTIM_HANGS = 1, VICTIM_OTHER_C = 2, VICTIM_OTHER_LAYER = 3 };

static int fault_worker(int rank, void *argp, void *sharedp) {
  fault_arg *arg = argp;
  shared_results *sh = sharedp;
  sbn_config cfg;
  worker_config(&cfg, arg->addr, arg->job, rank, arg->world);
  cfg.timeout_ms = 20000;
  sbn_ctx *ctx;
  if (sbn_init(&cfg, &ctx) != SBN_OK) {
    snprintf(sh->msg[rank], 512, "init: %s", sbn_last_error());
    sh->rc[rank] = 99;
    return 1;
  }
  double mean[128] = {0}, m2[128] = {0}, gm[128], gv[128];
  uint64_t gc;
  /* Round 0 completes for everybody: all are connected and in step. */
  int rc = sbn_sync_stats(sbn_world(ctx), "bn0", 4, 1, mean, m2, &gc, gm, gv);
  if (rc != SBN_OK) {
    snprintf(sh->msg[rank], 512, "round 0: %s", sbn_last_error());
    sh->rc[rank] = 98;
    return 1;
  }
  size_t C = 128;
  const char *layer = "bn1";
  if (rank == arg->victim) {
    if (arg->mode == VICTIM_HANGS) {
      sh->ready[rank] = 1;
      sleep(30); /* killed or times out the others */
      sbn_finalize(ctx);
      return 0;
    }
    if (arg->mode == VICTIM_OTHER_C)
      C = 64;
    if (arg->mode == VICTIM_OTHER_LAYER)
      layer = "bn2";
  }
  sh->ready[rank] = 1;
  rc = sbn_sync_stats(sbn_world(ctx), layer, C, 1, mean, m2, &gc, gm, gv);
  sh->t_return[rank] = test_now_ms();
  sh->rc[rank] = rc;
  snprintf(sh->msg[rank], 512, "%s", sbn_last_error());
  sbn_finalize(ctx);
  return 0;
}

static void wait_ready(shared_results *sh, int world) {
  long long deadline = test_now_ms() + 10000;
  for (int r = 0; r < world; r++)
    while (!sh->ready[r] && test_now_ms() < deadline)
      usleep(1000);
  usleep(100000); /* let the others block in the round */
}

START_TEST(test_kill9_member) {
  start_coord();
  fault_arg arg = {coord.addr, unique_job(), 4, 3, VICTIM_HANGS};
  worker_set ws;
  ck_assert_int_eq(workers_start(&ws, 4, fault_worker, &arg, sizeof(shared_results)), 0);
  shared_results *sh = ws.shared;
  wait_ready(sh, 4);
  long long t_kill = test_now_ms();
  kill(ws.pids[3], SIGKILL);
  workers_wait(&ws, 10000);
  for (int r = 0; r < 3; r++) {
    ck_assert_msg(sh->rc[r] == SBN_EPEERLOST, "rank %d: rc %d (%s)", r, sh->rc[r],
                  sh->msg[r]);
    ck_assert_msg(strstr(sh->msg[r], "rank 3") != NULL, "rank %d: '%s' does not name rank 3",
                  r, sh->msg[r]);
    ck_assert_msg(sh->t_return[r] - t_kill < 1000, "rank %d took %lld ms", r,
                  sh->t_return[r] - t_kill);
  }
  workers_release(&ws);
  stop_coord();
}
END_TEST

START_TEST(test_member_never_contributes) {
  static const char *const args[] = {"--round-timeout", "500", NULL};
  ck_assert_int_eq(coord_start(&coord, args), 0);
  fault_arg arg = {coord.addr, unique_job(), 3, 2, VICTIM_HANGS};
  worker_set ws;
  ck_assert_int_eq(workers_start(&ws, 3, fault_worker, &arg, sizeof(shared_results)), 0);
  shared_results *sh = ws.shared;
  long long t0 = test_now_ms();
  wait_ready(sh, 3);
  /* The victim sleeps 30 s; the others must come back after ~0.5 s. */
  long long deadline = t0 + 10000;
  while ((!sh->t_return[0] || !sh->t_return[1]) && test_now_ms() < deadline)
    usleep(2000);
  for (int r = 0; r < 2; r++) {
    ck_assert_msg(sh->rc[r] == SBN_ETIMEDOUT, "rank %d: rc %d (%s)", r, sh->rc[r], sh->msg[r]);
    ck_assert_msg(strstr(sh->msg[r], "2") != NULL, "rank %d: '%s' does not name rank 2", r,
                  sh->msg[r]);
  }
  kill(ws.pids[2], SIGKILL);
  workers_wait(&ws, 10000);
  workers_release(&ws);
  stop_coord();
}
END_TEST

START_TEST(test_mismatch) {
  /* _i = 0: rank 1 sends 64 channels; _i = 1: rank 1 names another layer. */
  start_coord();
  fault_arg arg = {coord.addr, unique_job(), 3, 1, _i == 0 ? VICTIM_OTHER_C : VICTIM_OTHER_LAYER};
  worker_set ws;
  ck_assert_int_eq(workers_start(&ws, 3, fault_worker, &arg, sizeof(shared_results)), 0);
  ck_assert_int_eq(workers_wait(&ws, 20000), 3);
  shared_results *sh = ws.shared;
  for (int r = 0; r < 3; r++) {
    ck_assert_msg(sh->rc[r] == SBN_EMISMATCH, "rank %d: rc %d (%s)", r, sh->rc[r], sh->msg[r]);
    ck_assert_msg(strstr(sh->msg[r], "rank 1") != NULL, "rank %d: '%s'", r, sh->msg[r]);
    if (_i == 0)
      ck_assert_msg(strstr(sh->msg[r], "64") && strstr(sh->msg[r], "128"), "'%s'", sh->msg[r]);
    else
      ck_assert_msg(strstr(sh->msg[r], "bn1") && strstr(sh->msg[r], "bn2"), "'%s'", sh->msg[r]);
  }
  workers_release(&ws);
  stop_coord();
}
END_TEST

START_TEST(test_coordinator_dies) {
  start_coord();
  fault_arg arg = {coord.addr, unique_job(), 2, 1, VICTIM_HANGS};
  worker_set ws;
  ck_assert_int_eq(workers_start(&ws, 2, fault_worker, &arg, sizeof(shared_results)), 0);
  shared_results *sh = ws.shared;
  wait_ready(sh, 2);
  long long t_kill = test_now_ms();
  coord_stop(&coord, SIGKILL, 5000);
  long long deadline = t_kill + 5000;
  while (!sh->t_return[0] && test_now_ms() < deadline)
    usleep(2000);
  ck_assert_msg(sh->rc[0] == SBN_ECLOSED, "rc %d (%s)", sh->rc[0], sh->msg[0]);
  ck_assert_msg(sh->t_return[0] - t_kill < 1000, "took %lld ms", sh->t_return[0] - t_kill);
  kill(ws.pids[1], SIGKILL);
  workers_wait(&ws, 5000);
  workers_release(&ws);
}
END_TEST

START_TEST(test_bad_use) {
  sbn_config cfg;
  sbn_ctx *ctx = (sbn_ctx *)1;
  sbn_config_init(&cfg);
  cfg.world_size = 4;
  cfg.rank = 4;
  cfg.coordinator = "127.0.0.1:1";
  ck_assert_int_eq(sbn_init(&cfg, &ctx), SBN_EINVAL);
  ck_assert_ptr_null(ctx);
  ck_assert_ptr_nonnull(strstr(sbn_last_error(), "rank 4"));
  cfg.rank = 0;
  cfg.coordinator = NULL;
  ck_assert_int_eq(sbn_init(&cfg, &ctx), SBN_EINVAL);
  ck_assert_ptr_nonnull(strstr(sbn_last_error(), "coordinator"));
  cfg.coordinator = "127.0.0.1:notaport";
  ck_assert_int_eq(sbn_init(&cfg, &ctx), SBN_EINVAL);
  /* Nobody listens on port 1: a bounded retry, then SBN_ECONNECT. */
  cfg.coordinator = "127.0.0.1:1";
  cfg.connect_timeout_ms = 300;
  long long t0 = test_now_ms();
  ck_assert_int_eq(sbn_init(&cfg, &ctx), SBN_ECONNECT);
  ck_assert_int_lt(test_now_ms() - t0, 3000);
  ck_assert_ptr_nonnull(strstr(sbn_last_error(), "127.0.0.1:1"));
  /* A world of one needs no coordinator and merges locally. */
  sbn_config_init(&cfg);
  ck_assert_int_eq(sbn_init(&cfg, &ctx), SBN_OK);
  double m[2] = {1, 2}, q[2] = {3, 4}, gm[2], gq[2];
  uint64_t gc;
  ck_assert_int_eq(sbn_sync_stats(sbn_world(ctx), "bn", 2, 5, m, q, &gc, gm, gq), SBN_OK);
  ck_assert(gc == 5 && gm[1] == 2 && gq[1] == 4);
  ck_assert_int_eq(sbn_sync_stats(sbn_world(ctx), "bn", 0, 5, m, q, &gc, gm, gq), SBN_EINVAL);
  ck_assert_int_eq(sbn_sync_stats(sbn_world(ctx), NULL, 2, 5, m, q, &gc, gm, gq), SBN_EINVAL);
  sbn_group *g;
  int bad[] = {0, 7};
  ck_assert_int_eq(sbn_new_group(ctx, bad, 2, &g), SBN_EINVAL);
  ck_assert_ptr_nonnull(strstr(sbn_last_error(), "rank 7"));
  ck_assert_int_eq(sbn_finalize(ctx), SBN_OK);
  ck_assert_int_eq(sbn_finalize(NULL), SBN_OK);
}
END_TEST

static Suite *rounds_suite(void) {
  Suite *s = suite_create("rounds");
  TCase *tc = tcase_create("rounds");
  tcase_set_timeout(tc, 120);
  tcase_add_loop_test(tc, test_rounds_n, 0, 3);
  tcase_add_test(tc, test_rounds_shuffled_same_bytes);
  tcase_add_test(tc, test_rounds_spinning);
  suite_add_tcase(s, tc);
  TCase *tf = tcase_create("faults");
  tcase_set_timeout(tf, 60);
  tcase_add_test(tf, test_kill9_member);
  tcase_add_test(tf, test_member_never_contributes);
  tcase_add_loop_test(tf, test_mismatch, 0, 2);
  tcase_add_test(tf, test_coordinator_dies);
  tcase_add_test(tf, test_bad_use);
  suite_add_tcase(s, tf);
  return s;
}

int main(void) {
  return run_suite(rounds_suite());
}
