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
  shared *sh = ws.shared;
  for (int r = 0; r < dc->world; r++)
    ck_assert_msg(ws.status[r] == 0, "case %d (%s, world %d, axis %d) rank %d: %s", _i,
                  dc->file, dc->world, dc->axis, r, sh->msg[r]);
  ck_assert_int_eq(ok, dc->world);
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
    long at = ref_worst(dw, ref_get(&ref, "dweight")->data, C);
    ck_assert_msg(at < 0, "case %d: summed dweight[%ld] = %.9g", _i, at, at < 0 ? 0 : dw[at]);
    at = ref_worst(db, ref_get(&ref, "dbias")->data, C);
    ck_assert_msg(at < 0, "case %d: summed dbias[%ld] = %.9g", _i, at, at < 0 ? 0 : db[at]);
  }
  workers_release(&ws);
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
