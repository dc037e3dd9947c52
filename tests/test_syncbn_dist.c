/*
 * test_syncbn_dist.c - SyncBatchNorm across real worker processes.
 *
 * Each case takes a global batch from tests/data (PyTorch reference of one
 * training step over the whole batch) and gives every rank a slice of it
 * along some axis, with uneven and empty slices.  Every rank must produce its
 * slice of the full-batch output and input gradient, the full-batch running
 * statistics, and the ranks' dweight/dbias must add up to the full-batch
 * ones, all within the spec's 5e-6 + 5e-6 |ref|.
 */
#include <check.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "coord_proc.h"
#include "refdata.h"
#include "sbn/sbn.h"
#include "workers.h"

#define C 8
#define MAX_GROUPS 2

typedef struct dist_case {
  const char *file;
  int world;
  int axis;                   /* the axis the batch is split along */
  size_t sizes[WORKERS_MAX];  /* slice length per group rank */
  int two_groups;             /* ranks {0,2} and {1,3} each run the whole case */
  unsigned flags;             /* sbn_bn_options.flags */
} dist_case;

#define CL_RELU (SBN_BN_CHANNELS_LAST | SBN_BN_FUSED_RELU)

static const dist_case cases[] = {
    /* the spec's acceptance case: (3,8,4,16) split along W */
    {"dist_3x8x4x16.bin", 2, 3, {8, 8}, 0, 0},
    {"dist_3x8x4x16.bin", 4, 3, {5, 0, 7, 4}, 0, 0},
    /* along N, uneven, one rank empty */
    {"dist_3x8x4x16.bin", 4, 0, {1, 0, 2, 0}, 0, 0},
    {"dist_3x8x4x16.bin", 2, 0, {3, 0}, 0, 0},
    /* 2-D, 3-D and 5-D inputs */
    {"step_2d.bin", 4, 0, {3, 5, 0, 8}, 0, 0},
    {"step_3d.bin", 2, 2, {1, 3}, 0, 0},
    {"step_5d.bin", 2, 2, {1, 2}, 0, 0},
    {"step_5d.bin", 4, 3, {1, 1, 2, 0}, 0, 0},
    /* |mean| = 1e4, std = 1 */
    {"bigmean.bin", 4, 0, {1, 1, 1, 1}, 0, 0},
    {"bigmean.bin", 2, 3, {2, 3}, 0, 0},
    /* subgroups of WORLD, two at once */
    {"dist_3x8x4x16.bin", 4, 3, {6, 10}, 1, 0},
    /* channels-last (3,4,16,8) with the fused ReLU: along N, W, H (uneven), one empty */
    {"dist_cl_relu.bin", 2, 0, {1, 2}, 0, CL_RELU},
    {"dist_cl_relu.bin", 2, 2, {8, 8}, 0, CL_RELU},
    {"dist_cl_relu.bin", 2, 1, {3, 1}, 0, CL_RELU},
    {"dist_cl_relu.bin", 4, 2, {5, 0, 7, 4}, 0, CL_RELU},
};

typedef struct shared {
  float dweight[WORKERS_MAX][C], dbias[WORKERS_MAX][C];
  char msg[WORKERS_MAX][300];
} shared;

typedef struct arg {
  const char *addr;
  const char *job;
  const dist_case *dc;
  ref_file *ref;
} arg;

static int check(shared *sh, int rank, const char *what, const float *got, const float *want,
                 size_t n) {
  long at = ref_worst(got, want, n);
  if (at >= 0) {
    snprintf(sh->msg[rank], 300, "%s: element %ld is %.9g, reference %.9g", what, at,
             (double)got[at], (double)want[at]);
    return 1;
  }
  return 0;
}

#define TRY(call, what)                                                        \
  do {                                                                         \
    if ((call) != SBN_OK) {                                                    \
      snprintf(sh->msg[rank], 300, "%s: %s", what, sbn_last_error());          \
      goto out;                                                                \
    }                                                                          \
  } while (0)

static int worker(int rank, void *ap, void *sp) {
  const arg *a = ap;
  const dist_case *dc = a->dc;
  const ref_file *ref = a->ref;
  shared *sh = sp;
  int failed = 1;
  sbn_ctx *ctx = NULL;
  sbn_group *g = NULL;
  sbn_module *bn = NULL;
  sbn_tensor *x = NULL, *dy = NULL, *y = NULL, *dx = NULL, *want = NULL, *w = NULL, *b = NULL;
  TRY(worker_connect(a->addr, a->job, rank, dc->world, &ctx), "init");
  g = sbn_world(ctx);
  if (dc->two_groups) {
    int members[2] = {rank % 2, rank % 2 + 2};
    TRY(sbn_new_group(ctx, members, 2, &g), "new_group");
  }
  int me = sbn_group_rank(g);
  size_t start = 0;
  for (int i = 0; i < me; i++)
    start += dc->sizes[i];
  size_t len = dc->sizes[me];
  sbn_bn_options o;
  sbn_bn_options_init(&o, C);
  o.group = g;
  o.name = "bn";
  o.flags = dc->flags;
  TRY(sbn_syncbatchnorm_new(&o, &bn), "syncbatchnorm_new");
  /* ref_slice, not ref_tensor: no Check assertions in a forked worker */
  w = ref_slice(ref, "weight", 0, 0, C);
  b = ref_slice(ref, "bias", 0, 0, C);
  TRY(sbn_tensor_copy(sbn_module_get_tensor(bn, "weight"), w), "weight");
  TRY(sbn_tensor_copy(sbn_module_get_tensor(bn, "bias"), b), "bias");
  x = ref_slice(ref, "x", dc->axis, start, len);
  dy = ref_slice(ref, "dy", dc->axis, start, len);
  TRY(sbn_module_call(bn, x, &y), "forward");
  TRY(sbn_module_backward(bn, dy, &dx), "backward");
  want = ref_slice(ref, "y", dc->axis, start, len);
  if (check(sh, rank, "y", sbn_tensor_cdata(y), sbn_tensor_cdata(want), sbn_tensor_numel(y)))
    goto out;
  sbn_tensor_free(want);
  want = ref_slice(ref, "dx", dc->axis, start, len);
  if (check(sh, rank, "dx", sbn_tensor_cdata(dx), sbn_tensor_cdata(want),
            sbn_tensor_numel(dx)))
    goto out;
  if (check(sh, rank, "running_mean",
            sbn_tensor_cdata(sbn_module_get_tensor(bn, "running_mean")),
            ref_get(ref, "rm")->data, C) ||
      check(sh, rank, "running_var", sbn_tensor_cdata(sbn_module_get_tensor(bn, "running_var")),
            ref_get(ref, "rv")->data, C))
    goto out;
  memcpy(sh->dweight[rank], sbn_tensor_cdata(sbn_tensor_grad(sbn_module_get_tensor(bn, "weight"))),
         sizeof(sh->dweight[rank]));
  memcpy(sh->dbias[rank], sbn_tensor_cdata(sbn_tensor_grad(sbn_module_get_tensor(bn, "bias"))),
         sizeof(sh->dbias[rank]));
  failed = 0;
out:
  sbn_tensor_free(w);
  sbn_tensor_free(b);
  sbn_tensor_free(x);
  sbn_tensor_free(dy);
  sbn_tensor_free(y);
  sbn_tensor_free(dx);
  sbn_tensor_free(want);
  sbn_module_free(bn);
  if (g != NULL && ctx != NULL && g != sbn_world(ctx))
    sbn_group_free(g);
  sbn_finalize(ctx);
  return failed;
}

static coord_proc coord;

/* Checks a case's ranks once they are done: each one's status and message,
 * and, per group, that the ranks' local dweight/dbias add up to the batch's. */
static void check_case(int ci, const ref_file *ref, const shared *sh, const int *status) {
  const dist_case *dc = &cases[ci];
  for (int r = 0; r < dc->world; r++)
    ck_assert_msg(status[r] == 0, "case %d (%s, world %d, axis %d) rank %d (status %d): %s", ci,
                  dc->file, dc->world, dc->axis, r, status[r], sh->msg[r]);
  /* Per group, the ranks' local dweight/dbias add up to the batch's. */
  for (int grp = 0; grp < (dc->two_groups ? 2 : 1); grp++) {
    float dw[C] = {0}, db[C] = {0};
    for (int r = 0; r < dc->world; r++) {
      if (dc->two_groups && r % 2 != grp)
        continue;
      for (int c = 0; c < C; c++) {
        dw[c] += sh->dweight[r][c];
        db[c] += sh->dbias[r][c];
      }
    }
    long at = ref_worst(dw, ref_get(ref, "dweight")->data, C);
    ck_assert_msg(at < 0, "case %d: summed dweight[%ld] = %.9g", ci, at, at < 0 ? 0 : dw[at]);
    at = ref_worst(db, ref_get(ref, "dbias")->data, C);
    ck_assert_msg(at < 0, "case %d: summed dbias[%ld] = %.9g", ci, at, at < 0 ? 0 : db[at]);
  }
}

START_TEST(test_slices_match_full_batch) {
  const dist_case *dc = &cases[_i];
  ref_file ref = ref_load(dc->file);
  /* The case must cover the whole batch along its axis. */
  size_t total = 0;
  int per_group = dc->two_groups ? 2 : dc->world;
  for (int i = 0; i < per_group; i++)
    total += dc->sizes[i];
  ck_assert_uint_eq(total, ref_get(&ref, "x")->shape[dc->axis]);
  ck_assert_int_eq(coord_start(&coord, NULL), 0);
  arg a = {coord.addr, unique_job(), dc, &ref};
  worker_set ws;
  ck_assert_int_eq(workers_start(&ws, dc->world, worker, &a, sizeof(shared)), 0);
  int ok = workers_wait(&ws, 30000);
  check_case(_i, &ref, ws.shared, ws.status);
  ck_assert_int_eq(ok, dc->world);
  workers_release(&ws);
  ref_free(&ref);
  ck_assert_int_eq(coord_stop(&coord, SIGTERM, 5000), 0);
}
END_TEST

/*
 * The same cases with every rank a thread of this one process, each with its
 * own context (comm.h: a context belongs to one thread at a time, contexts
 * are independent): the buffer cache and everything global in the library
 * are shared by the threads, so the results must still be the reference's.
 * Each thread then fails a call of its own and must read its own message in
 * sbn_last_error() after all the others have failed theirs.
 */
static const int thread_cases[] = {1, 10, 14};

/* Then BIG_STEPS training steps of a layer of BIG_C channels on (2, BIG_C,
 * 16, 16) per rank: tensors of 128 KiB and more, which the threads take from
 * and give back to the library's one buffer cache at the same time. */
#define BIG_C 64
#define BIG_STEPS 3
#define BIG_HW 16

typedef struct thread_run {
  int rank, world;
  const arg *a;
  shared *sh;
  pthread_barrier_t *failed;
  int status;
  char err[300];
  double ysum[BIG_C], ysq[BIG_C]; /* the last step's output, summed per channel */
  float rmean[BIG_C];             /* running mean after the steps */
} thread_run;

static float big_value(int rank, size_t c, size_t i) {
  return (float)(rank + 1) * 0.5f + (float)c * 0.01f + (float)(i % 7) * 0.1f;
}

/* Forward and backward of m; the previous outputs *y and *dx are freed. */
static int train_step(sbn_module *m, sbn_tensor *x, sbn_tensor *dy, sbn_tensor **y,
                      sbn_tensor **dx) {
  sbn_tensor_free(*y);
  sbn_tensor_free(*dx);
  *y = *dx = NULL;
  int rc = sbn_module_call(m, x, y);
  return rc == SBN_OK ? sbn_module_backward(m, dy, dx) : rc;
}

/* 0 or a status; the message in t->err. */
static int big_steps(thread_run *t) {
  char job[96];
  snprintf(job, sizeof(job), "%s-big", t->a->job);
  sbn_ctx *ctx = NULL;
  sbn_module *bn = NULL;
  sbn_tensor *x = NULL, *dy = NULL, *y = NULL, *dx = NULL;
  int rc = worker_connect(t->a->addr, job, t->rank, t->world, &ctx);
  sbn_bn_options o;
  sbn_bn_options_init(&o, BIG_C);
  o.group = ctx != NULL ? sbn_world(ctx) : NULL;
  o.affine = 0;
  const size_t shape[4] = {2, BIG_C, BIG_HW, BIG_HW}, S = BIG_HW * BIG_HW;
  if (rc == SBN_OK)
    rc = sbn_syncbatchnorm_new(&o, &bn);
  if (rc == SBN_OK)
    rc = sbn_tensor_new(4, shape, &x);
  if (rc == SBN_OK)
    rc = sbn_tensor_new(4, shape, &dy);
  for (int step = 0; rc == SBN_OK && step < BIG_STEPS; step++) {
    float *xd = sbn_tensor_data(x), *gd = sbn_tensor_data(dy);
    for (size_t n = 0; n < 2; n++)
      for (size_t c = 0; c < BIG_C; c++)
        for (size_t i = 0; i < S; i++) {
          xd[(n * BIG_C + c) * S + i] = big_value(t->rank, c, n * S + i);
          gd[(n * BIG_C + c) * S + i] = (float)((i + c + (size_t)step) % 5) - 2.0f;
        }
    rc = train_step(bn, x, dy, &y, &dx);
  }
  if (rc == SBN_OK) {
    const float *yd = sbn_tensor_cdata(y);
    for (size_t c = 0; c < BIG_C; c++) {
      t->ysum[c] = t->ysq[c] = 0;
      for (size_t n = 0; n < 2; n++)
        for (size_t i = 0; i < S; i++) {
          const double v = yd[(n * BIG_C + c) * S + i];
          t->ysum[c] += v;
          t->ysq[c] += v * v;
        }
    }
    memcpy(t->rmean, sbn_tensor_cdata(sbn_module_get_tensor(bn, "running_mean")),
           sizeof(t->rmean));
  }
  /* Then a plain BatchNorm: the threads' calls run side by side with no
   * round to wait for between them. */
  sbn_module *plain = NULL;
  if (rc == SBN_OK)
    rc = sbn_batchnorm_new(&o, &plain);
  for (int step = 0; rc == SBN_OK && step < BIG_STEPS; step++)
    rc = train_step(plain, x, dy, &y, &dx);
  sbn_module_free(plain);
  if (rc != SBN_OK)
    snprintf(t->err, sizeof(t->err), "big steps: %s", sbn_last_error());
  sbn_tensor_free(x);
  sbn_tensor_free(dy);
  sbn_tensor_free(y);
  sbn_tensor_free(dx);
  sbn_module_free(bn);
  sbn_finalize(ctx);
  return rc == SBN_OK ? 0 : 3;
}

static void *thread_worker(void *p) {
  thread_run *t = p;
  t->status = worker(t->rank, (void *)t->a, t->sh);
  if (t->status == 0)
    t->status = big_steps(t);
  if (t->status != 0) {
    pthread_barrier_wait(t->failed);
    return NULL;
  }
  size_t shape[1] = {1};
  sbn_tensor *x = NULL;
  if (sbn_tensor_new(100 + t->rank, shape, &x) != SBN_ESHAPE)
    t->status = 2;
  pthread_barrier_wait(t->failed);
  snprintf(t->err, sizeof(t->err), "%s", sbn_last_error());
  return NULL;
}

START_TEST(test_slices_as_threads) {
  const int ci = thread_cases[_i];
  const dist_case *dc = &cases[ci];
  ref_file ref = ref_load(dc->file);
  ck_assert_int_eq(coord_start(&coord, NULL), 0);
  arg a = {coord.addr, unique_job(), dc, &ref};
  shared *sh = calloc(1, sizeof(shared));
  ck_assert_ptr_nonnull(sh);
  pthread_barrier_t failed;
  ck_assert_int_eq(pthread_barrier_init(&failed, NULL, (unsigned)dc->world), 0);
  thread_run t[WORKERS_MAX];
  pthread_t th[WORKERS_MAX];
  for (int r = 0; r < dc->world; r++) {
    t[r] = (thread_run){.rank = r, .world = dc->world, .a = &a, .sh = sh, .failed = &failed};
    ck_assert_int_eq(pthread_create(&th[r], NULL, thread_worker, &t[r]), 0);
  }
  int status[WORKERS_MAX] = {0};
  for (int r = 0; r < dc->world; r++) {
    ck_assert_int_eq(pthread_join(th[r], NULL), 0);
    status[r] = t[r].status;
  }
  for (int r = 0; r < dc->world; r++)
    ck_assert_msg(t[r].status != 3, "thread %d: %s", r, t[r].err);
  check_case(ci, &ref, sh, status);
  /* The big steps: over all ranks each channel of y has mean 0 and (biased)
   * variance var / (var + eps), var the channel's; every rank has the same
   * running mean, bit for bit. */
  const double cnt = 2.0 * BIG_HW * BIG_HW * dc->world;
  for (size_t c = 0; c < BIG_C; c++) {
    double s1 = 0, s2 = 0, m = 0, v = 0;
    for (int r = 0; r < dc->world; r++)
      for (size_t i = 0; i < 2 * BIG_HW * BIG_HW; i++)
        m += big_value(r, c, i) / cnt;
    for (int r = 0; r < dc->world; r++) {
      s1 += t[r].ysum[c], s2 += t[r].ysq[c];
      for (size_t i = 0; i < 2 * BIG_HW * BIG_HW; i++)
        v += (big_value(r, c, i) - m) * (big_value(r, c, i) - m) / cnt;
      ck_assert_msg(memcmp(&t[r].rmean[c], &t[0].rmean[c], sizeof(float)) == 0,
                    "channel %zu: running mean of rank %d %.9g, rank 0 %.9g", c, r,
                    (double)t[r].rmean[c], (double)t[0].rmean[c]);
    }
    ck_assert_msg(fabs(s1 / cnt) < 1e-5, "channel %zu: mean of y %g", c, s1 / cnt);
    ck_assert_msg(fabs(s2 / cnt - v / (v + 1e-5)) < 1e-4, "channel %zu: variance of y %g, want %g",
                  c, s2 / cnt, v / (v + 1e-5));
  }
  for (int r = 0; r < dc->world; r++) {
    char want[64];
    snprintf(want, sizeof(want), "tensor rank %d is outside", 100 + r);
    ck_assert_msg(strstr(t[r].err, want) != NULL, "thread %d read '%s'", r, t[r].err);
  }
  pthread_barrier_destroy(&failed);
  free(sh);
  ref_free(&ref);
  ck_assert_int_eq(coord_stop(&coord, SIGTERM, 5000), 0);
}
END_TEST


/* ---- failures --------------------------------------------------------------- */

typedef struct fail_shared {
  int rc[WORKERS_MAX];
  char msg[WORKERS_MAX][300];
  int stats_unchanged[WORKERS_MAX];
  volatile int ready[WORKERS_MAX];
  long long t_return[WORKERS_MAX];
} fail_shared;

/* Rank 0 blocks in a SyncBatchNorm forward; rank 1 never joins the round
 * (it sleeps until killed); the test then kills the coordinator. */
static int gone_worker(int rank, void *ap, void *sp) {
  const arg *a = ap;
  fail_shared *sh = sp;
  sbn_ctx *ctx;
  if (worker_connect(a->addr, a->job, rank, 2, &ctx) != SBN_OK)
    return 1;
  if (rank == 1) {
    sh->ready[rank] = 1;
    sleep(30);
    return 0;
  }
  sbn_bn_options o;
  sbn_bn_options_init(&o, C);
  o.group = sbn_world(ctx);
  sbn_module *bn;
  if (sbn_syncbatchnorm_new(&o, &bn) != SBN_OK)
    return 1;
  size_t shape[4] = {2, C, 3, 3};
  sbn_tensor *x, *y = NULL;
  sbn_tensor_new(4, shape, &x);
  sbn_tensor_fill(x, 2.5f);
  sh->ready[rank] = 1;
  sh->rc[rank] = sbn_module_call(bn, x, &y);
  sh->t_return[rank] = test_now_ms();
  snprintf(sh->msg[rank], 300, "%s", sbn_last_error());
  const float *rm = sbn_tensor_cdata(sbn_module_get_tensor(bn, "running_mean"));
  const float *rv = sbn_tensor_cdata(sbn_module_get_tensor(bn, "running_var"));
  sh->stats_unchanged[rank] = y == NULL;
  for (int c = 0; c < C; c++)
    sh->stats_unchanged[rank] &= rm[c] == 0.0f && rv[c] == 1.0f;
  sbn_tensor_free(x);
  sbn_tensor_free(y);
  sbn_module_free(bn);
  sbn_finalize(ctx);
  return 0;
}

START_TEST(test_coordinator_gone_mid_forward) {
  ck_assert_int_eq(coord_start(&coord, NULL), 0);
  arg a = {coord.addr, unique_job(), NULL, NULL};
  worker_set ws;
  ck_assert_int_eq(workers_start(&ws, 2, gone_worker, &a, sizeof(fail_shared)), 0);
  fail_shared *sh = ws.shared;
  long long deadline = test_now_ms() + 10000;
  while ((!sh->ready[0] || !sh->ready[1]) && test_now_ms() < deadline)
    usleep(1000);
  usleep(100000);
  long long t_kill = test_now_ms();
  coord_stop(&coord, SIGKILL, 5000);
  deadline = t_kill + 5000;
  while (!sh->t_return[0] && test_now_ms() < deadline)
    usleep(1000);
  ck_assert_msg(sh->rc[0] == SBN_ECLOSED, "rc %d: %s", sh->rc[0], sh->msg[0]);
  ck_assert_msg(sh->t_return[0] - t_kill < 1000, "took %lld ms", sh->t_return[0] - t_kill);
  ck_assert_msg(sh->stats_unchanged[0], "a failed forward changed the layer or gave output");
  kill(ws.pids[1], SIGKILL);
  workers_wait(&ws, 5000);
  workers_release(&ws);
}
END_TEST

START_TEST(test_bad_group_use) {
  /* Before connecting there is no context to make groups from. */
  sbn_group *g = (sbn_group *)1;
  int r0[] = {0};
  ck_assert_int_eq(sbn_new_group(NULL, r0, 1, &g), SBN_ESTATE);
  ck_assert_ptr_null(g);
  /* A world of one: rank 0 only. */
  sbn_config cfg;
  sbn_config_init(&cfg);
  sbn_ctx *ctx;
  ck_assert_int_eq(sbn_init(&cfg, &ctx), SBN_OK);
  int r1[] = {1};
  ck_assert_int_eq(sbn_new_group(ctx, r1, 1, &g), SBN_EINVAL);
  ck_assert_ptr_nonnull(strstr(sbn_last_error(), "rank 1"));
  int dup[] = {0, 0};
  ck_assert_int_eq(sbn_new_group(ctx, dup, 2, &g), SBN_EINVAL);
  ck_assert_int_eq(sbn_new_group(ctx, r0, 0, &g), SBN_EINVAL);
  ck_assert_int_eq(sbn_new_group(ctx, r0, 1, &g), SBN_OK);
  ck_assert_int_eq(sbn_group_size(g), 1);
  ck_assert_int_eq(sbn_group_rank(g), 0);
  ck_assert_int_eq(sbn_group_member(g, 0), 0);
  ck_assert_int_eq(sbn_group_member(g, 1), -1);
  sbn_group_free(g);
  sbn_finalize(ctx);
}
END_TEST

/* A rank that is not a member of the group it names is refused. */
static int notmember_worker(int rank, void *ap, void *sp) {
  const arg *a = ap;
  fail_shared *sh = sp;
  sbn_ctx *ctx;
  if (worker_connect(a->addr, a->job, rank, 3, &ctx) != SBN_OK)
    return 1;
  int others[] = {(rank + 1) % 3, (rank + 2) % 3};
  sbn_group *g = NULL;
  sh->rc[rank] = sbn_new_group(ctx, others, 2, &g);
  snprintf(sh->msg[rank], 300, "%s", sbn_last_error());
  sbn_finalize(ctx);
  return g == NULL ? 0 : 1;
}

START_TEST(test_rank_outside_group) {
  ck_assert_int_eq(coord_start(&coord, NULL), 0);
  arg a = {coord.addr, unique_job(), NULL, NULL};
  worker_set ws;
  ck_assert_int_eq(workers_start(&ws, 3, notmember_worker, &a, sizeof(fail_shared)), 0);
  ck_assert_int_eq(workers_wait(&ws, 20000), 3);
  fail_shared *sh = ws.shared;
  for (int r = 0; r < 3; r++) {
    ck_assert_msg(sh->rc[r] == SBN_ENOTMEMBER, "rank %d: %d %s", r, sh->rc[r], sh->msg[r]);
    ck_assert_msg(strstr(sh->msg[r], "not a member") != NULL, "'%s'", sh->msg[r]);
  }
  workers_release(&ws);
  ck_assert_int_eq(coord_stop(&coord, SIGTERM, 5000), 0);
}
END_TEST

/* Ranks whose models differ are told before training, with the first
 * difference named; identical models pass. */
static int model_check_worker(int rank, void *ap, void *sp) {
  const arg *a = ap;
  fail_shared *sh = sp;
  sbn_ctx *ctx;
  if (worker_connect(a->addr, a->job, rank, 3, &ctx) != SBN_OK)
    return 1;
  sbn_module *layers[3] = {0}, *model = NULL;
  for (int i = 0; i < 3; i++) {
    sbn_bn_options o;
    /* Rank 2 builds its second layer with 32 channels instead of 16. */
    sbn_bn_options_init(&o, rank == 2 && i == 1 ? 32 : 16);
    o.group = sbn_world(ctx);
    if (sbn_syncbatchnorm_new(&o, &layers[i]) != SBN_OK)
      return 1;
  }
  if (sbn_sequential_new(layers, 3, &model) != SBN_OK ||
      sbn_module_name_layers(model, NULL) != SBN_OK)
    return 1;
  /* First the first layer alone (identical everywhere), then the model. */
  int rc0 = sbn_check_model(sbn_world(ctx), layers[0]);
  sh->rc[rank] = sbn_check_model(sbn_world(ctx), model);
  snprintf(sh->msg[rank], 300, "%s", sbn_last_error());
  for (int i = 0; i < 3; i++)
    sbn_module_free(layers[i]);
  sbn_module_free(model);
  sbn_finalize(ctx);
  return rc0 == SBN_OK ? 0 : 1;
}

START_TEST(test_model_check_names_difference) {
  ck_assert_int_eq(coord_start(&coord, NULL), 0);
  arg a = {coord.addr, unique_job(), NULL, NULL};
  worker_set ws;
  ck_assert_int_eq(workers_start(&ws, 3, model_check_worker, &a, sizeof(fail_shared)), 0);
  ck_assert_int_eq(workers_wait(&ws, 20000), 3);
  fail_shared *sh = ws.shared;
  for (int r = 0; r < 3; r++) {
    ck_assert_msg(sh->rc[r] == SBN_EMISMATCH, "rank %d: %d %s", r, sh->rc[r], sh->msg[r]);
    /* names the rank, the layer (its dotted path "1") and both channel counts */
    ck_assert_msg(strstr(sh->msg[r], "rank 2") && strstr(sh->msg[r], "32") &&
                      strstr(sh->msg[r], "16"),
                  "rank %d: '%s'", r, sh->msg[r]);
  }
  workers_release(&ws);
  ck_assert_int_eq(coord_stop(&coord, SIGTERM, 5000), 0);
}
END_TEST

int main(void) {
  Suite *s = suite_create("syncbn_dist");
  TCase *tc = tcase_create("slices");
  tcase_set_timeout(tc, 60);
  tcase_add_loop_test(tc, test_slices_match_full_batch, 0,
                      (int)(sizeof(cases) / sizeof(cases[0])));
  tcase_add_loop_test(tc, test_slices_as_threads, 0,
                      (int)(sizeof(thread_cases) / sizeof(thread_cases[0])));
  suite_add_tcase(s, tc);
  TCase *tf = tcase_create("failures");
  tcase_set_timeout(tf, 60);
  tcase_add_test(tf, test_coordinator_gone_mid_forward);
  tcase_add_test(tf, test_bad_group_use);
  tcase_add_test(tf, test_rank_outside_group);
  tcase_add_test(tf, test_model_check_names_difference);
  suite_add_tcase(s, tf);
  return run_suite(s);
}
