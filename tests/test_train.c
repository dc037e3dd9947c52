/*
 * test_train.c - the proof that SyncBatchNorm + gradient averaging are right:
 * k SGD steps with N workers of per-worker batch B (a real coordinator, real
 * processes) end with the same parameters and running statistics as one
 * process training on the concatenated batches of N*B, for N = 2 and 4.
 *
 * The model is the example's (examples/mlp.h): Linear -> SyncBatchNorm ->
 * ReLU -> Linear -> SyncBatchNorm -> ReLU -> Linear, with momentum SGD.
 */
#include <check.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>

#include "coord_proc.h"
#include "mlp.h"
#include "sbn/sbn.h"
#include "workers.h"

#define STEPS 6
#define BATCH 24      /* per worker */
#define HIDDEN 16
#define CLASSES 3
#define SEED 77
#define MAX_VALUES 4096
/* float32 arithmetic in different order on both sides, over STEPS steps */
#define ATOL 2e-5
#define RTOL 2e-4

typedef struct shared {
  float values[WORKERS_MAX][MAX_VALUES];
  size_t count[WORKERS_MAX];
  char msg[WORKERS_MAX][256];
} shared;

typedef struct arg {
  const char *addr;
  const char *job;
  int world;
} arg;

/* One SGD step on points first..first+n-1 of the data set. */
static int train_step(sbn_module *model, mlp_sgd *opt, sbn_group *g, uint64_t first, size_t n) {
  size_t shape[2] = {n, MLP_FEATURES};
  int labels[BATCH * WORKERS_MAX];
  sbn_tensor *x, *y = NULL, *dy = NULL, *dx = NULL;
  int rc = sbn_tensor_new(2, shape, &x);
  if (rc != SBN_OK)
    return rc;
  for (size_t i = 0; i < n; i++)
    mlp_point(first + i, CLASSES, SEED, sbn_tensor_data(x) + i * MLP_FEATURES, &labels[i]);
  sbn_module_zero_grad(model);
  size_t ok;
  if ((rc = sbn_module_call(model, x, &y)) == SBN_OK) {
    mlp_xent(y, labels, 1.0, &dy, &ok);
    if ((rc = sbn_module_backward(model, dy, &dx)) == SBN_OK &&
        (rc = sbn_module_allreduce_grads(g, model, SBN_REDUCE_MEAN)) == SBN_OK)
      mlp_sgd_step(opt);
  }
  sbn_tensor_free(x);
  sbn_tensor_free(y);
  sbn_tensor_free(dy);
  sbn_tensor_free(dx);
  return rc;
}

/* Every tensor of the model, flattened in named_tensors order. */
static size_t dump(sbn_module *model, float *out) {
  sbn_named_list l = {0};
  size_t off = 0;
  ck_assert_int_eq(sbn_module_named_tensors(model, NULL, 1, &l), SBN_OK);
  for (size_t i = 0; i < l.count; i++) {
    size_t n = sbn_tensor_numel(l.items[i]);
    ck_assert_uint_le(off + n, MAX_VALUES);
    memcpy(out + off, sbn_tensor_cdata(l.items[i]), n * sizeof(float));
    off += n;
  }
  sbn_named_list_release(&l);
  return off;
}

static int worker(int rank, void *ap, void *sp) {
  const arg *a = ap;
  shared *sh = sp;
  sbn_ctx *ctx;
  int rc = worker_connect(a->addr, a->job, rank, a->world, &ctx);
  if (rc != SBN_OK) {
    snprintf(sh->msg[rank], 256, "init: %s", sbn_last_error());
    return 1;
  }
  sbn_module *model;
  mlp_sgd opt;
  /* Different seeds per rank: the broadcast must make them equal. */
  if ((rc = mlp_build(MLP_FEATURES, HIDDEN, CLASSES, sbn_world(ctx), SEED + (uint64_t)rank,
                      &model)) != SBN_OK ||
      (rc = sbn_module_name_layers(model, NULL)) != SBN_OK ||
      (rc = sbn_check_model(sbn_world(ctx), model)) != SBN_OK ||
      (rc = sbn_module_broadcast(sbn_world(ctx), model, 0)) != SBN_OK ||
      (rc = mlp_sgd_init(&opt, model, 0.1, 0.9, 1e-4)) != SBN_OK) {
    snprintf(sh->msg[rank], 256, "setup: %s", sbn_last_error());
    return 1;
  }
  for (int s = 0; s < STEPS && rc == SBN_OK; s++) {
    uint64_t first = (uint64_t)s * BATCH * (uint64_t)a->world + (uint64_t)rank * BATCH;
    rc = train_step(model, &opt, sbn_world(ctx), first, BATCH);
  }
  if (rc != SBN_OK)
    snprintf(sh->msg[rank], 256, "step: %s", sbn_last_error());
  sh->count[rank] = dump(model, sh->values[rank]);
  mlp_sgd_release(&opt);
  sbn_module_free(model);
  sbn_finalize(ctx);
  return rc == SBN_OK ? 0 : 1;
}

START_TEST(test_n_workers_equal_one_big_batch) {
  static const int worlds[] = {2, 4};
  int world = worlds[_i];
  /* The reference: one process, batch world*BATCH, rank 0's initial weights. */
  sbn_module *model;
  mlp_sgd opt;
  ck_assert_int_eq(mlp_build(MLP_FEATURES, HIDDEN, CLASSES, NULL, SEED, &model), SBN_OK);
  ck_assert_int_eq(mlp_sgd_init(&opt, model, 0.1, 0.9, 1e-4), SBN_OK);
  for (int s = 0; s < STEPS; s++)
    ck_assert_int_eq(train_step(model, &opt, NULL, (uint64_t)s * BATCH * (uint64_t)world,
                                (size_t)world * BATCH),
                     SBN_OK);
  static float ref[MAX_VALUES], init[MAX_VALUES];
  size_t n = dump(model, ref);
  mlp_sgd_release(&opt);
  sbn_module_free(model);
  ck_assert_int_eq(mlp_build(MLP_FEATURES, HIDDEN, CLASSES, NULL, SEED, &model), SBN_OK);
  dump(model, init);
  sbn_module_free(model);

  coord_proc coord;
  ck_assert_int_eq(coord_start(&coord, NULL), 0);
  arg a = {coord.addr, unique_job(), world};
  worker_set ws;
  ck_assert_int_eq(workers_start(&ws, world, worker, &a, sizeof(shared)), 0);
  int ok = workers_wait(&ws, 60000);
  shared *sh = ws.shared;
  for (int r = 0; r < world; r++)
    ck_assert_msg(ws.status[r] == 0, "rank %d: %s", r, sh->msg[r]);
  ck_assert_int_eq(ok, world);
  size_t moved = 0;
  for (int r = 0; r < world; r++) {
    ck_assert_uint_eq(sh->count[r], n);
    /* Replicas stay bitwise identical: same reduced gradients everywhere. */
    ck_assert(memcmp(sh->values[r], sh->values[0], n * sizeof(float)) == 0);
  }
  for (size_t i = 0; i < n; i++) {
    double got = sh->values[0][i], want = ref[i];
    ck_assert_msg(fabs(got - want) <= ATOL + RTOL * fabs(want),
                  "value %zu: %d workers %.9g, one process %.9g", i, world, got, want);
    moved += init[i] != ref[i];
  }
  /* Training moved nearly everything (the check above is not vacuous). */
  ck_assert_uint_gt(moved, n * 9 / 10);
  workers_release(&ws);
  ck_assert_int_eq(coord_stop(&coord, SIGTERM, 5000), 0);
}
END_TEST

int main(void) {
  Suite *s = suite_create("train");
  TCase *tc = tcase_create("train");
  tcase_set_timeout(tc, 120);
  tcase_add_loop_test(tc, test_n_workers_equal_one_big_batch, 0, 2);
  suite_add_tcase(s, tc);
  return run_suite(s);
}
