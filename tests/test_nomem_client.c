/*
 * test_nomem_client.c - a worker out of memory, at every allocation.
 *
 * This program is linked with allocation wrappers (tests/nomem/client_wrap.c)
 * that fail a chosen allocation while armed.  Two workers train the
 * example's model (Linear, SyncBatchNorm, ReLU) through a real coordinator:
 * connect, check the model, broadcast the weights, two steps of forward
 * (SyncBatchNorm rounds), backward, gradient allreduce and SGD, save and
 * load a safetensors file, an eval forward, finalize.  A clean run counts
 * rank 0's allocations and records the trained weights; then each
 * allocation of rank 0 fails in turn, and:
 *
 *  - rank 0's first failing call returns SBN_ENOMEM with a message (its own
 *    allocation is the only thing that went wrong), nothing crashes, and
 *    every later call (clean-up, finalize) is safe;
 *  - rank 1 passes, or gets a clear error: the peer lost, or (when rank 0
 *    never joined) the round's time-out naming rank 0;
 *  - when both pass, the weights are bitwise those of the clean run;
 *  - under AddressSanitizer, neither rank leaks (LeakSanitizer is asked
 *    before the worker exits).
 *
 * SBN_NOMEM_ONLY=N runs allocation N alone; SBN_NOMEM_VERBOSE=1 prints what
 * every worker got.
 */
#include <check.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/lsan_interface.h>
#define LEAK_CHECK() __lsan_do_recoverable_leak_check()
#else
#define LEAK_CHECK() 0
#endif

#include "client_wrap.h"
#include "coord_proc.h"
#include "mlp.h"
#include "sbn/sbn.h"
#include "workers.h"

#define WORLD 2
#define BATCH 16
#define HIDDEN 8
#define CLASSES 3
#define SEED 5
#define STEPS 2
/* Rounds of a loaded machine (sanitizers, tests in parallel) are slow. */
#define ROUND_TIMEOUT_MS "2000"
/* More allocations than this in the clean run means the workload changed
 * and this bound should be looked at again. */
#define SWEEP_MAX 3000

/* Exit codes of a worker. */
enum { W_PASS = 0, W_ERROR = 1, W_BAD = 2, W_LEAK = 3 };

typedef struct shared {
  int rc[WORLD];   /* first failing status */
  int step[WORLD]; /* where */
  char msg[WORLD][512];
  uint64_t hash[WORLD]; /* of the trained weights, when passed */
  unsigned long calls, failed; /* rank 0's allocations while armed */
} shared;

typedef struct arg {
  const char *addr;
  const char *job;
  const char *dir;
  unsigned long fail_at;
  int persist;
} arg;

static int failed(shared *sh, int rank, int step, int rc) {
  if (sh->rc[rank] == 0) {
    sh->rc[rank] = rc;
    sh->step[rank] = step;
    snprintf(sh->msg[rank], sizeof(sh->msg[rank]), "%s", sbn_last_error());
  }
  return rc;
}

/* FNV-1a over the bytes of every tensor of the model (parameters and
 * buffers, in order), or 0 when they cannot be listed. */
static uint64_t weights_hash(sbn_module *model) {
  sbn_named_list l;
  if (sbn_module_named_tensors(model, NULL, 1, &l) != SBN_OK)
    return 0;
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < l.count; i++) {
    const unsigned char *p = (const unsigned char *)sbn_tensor_cdata(l.items[i]);
    size_t n = sbn_tensor_numel(l.items[i]) * sizeof(float);
    for (size_t j = 0; j < n; j++)
      h = (h ^ p[j]) * 1099511628211ull;
  }
  sbn_named_list_release(&l);
  return h;
}

static int train_step(sbn_module *model, mlp_sgd *opt, sbn_group *g, int rank, int step,
                      shared *sh) {
  size_t shape[2] = {BATCH, MLP_FEATURES};
  int labels[BATCH];
  sbn_tensor *x = NULL, *y = NULL, *dy = NULL, *dx = NULL;
  int rc = sbn_tensor_new(2, shape, &x);
  if (rc != SBN_OK)
    return failed(sh, rank, 10 * step + 1, rc);
  uint64_t first = (uint64_t)(step * WORLD + rank) * BATCH;
  for (size_t i = 0; i < BATCH; i++)
    mlp_point(first + i, CLASSES, SEED, sbn_tensor_data(x) + i * MLP_FEATURES, &labels[i]);
  size_t correct;
  if ((rc = sbn_module_zero_grad(model)) != SBN_OK)
    failed(sh, rank, 10 * step + 6, rc);
  else if ((rc = sbn_module_call(model, x, &y)) != SBN_OK)
    failed(sh, rank, 10 * step + 2, rc);
  else if (isnan(mlp_xent(y, labels, 1.0, &dy, &correct)))
    rc = failed(sh, rank, 10 * step + 3, SBN_ENOMEM);
  else if ((rc = sbn_module_backward(model, dy, &dx)) != SBN_OK)
    failed(sh, rank, 10 * step + 4, rc);
  else if ((rc = sbn_module_allreduce_grads(g, model, SBN_REDUCE_MEAN)) != SBN_OK)
    failed(sh, rank, 10 * step + 5, rc);
  else
    mlp_sgd_step(opt);
  sbn_tensor_free(x);
  sbn_tensor_free(y);
  sbn_tensor_free(dy);
  sbn_tensor_free(dx);
  return rc;
}

/* Everything after connecting; stops at the first failure. */
static int steps(sbn_ctx *ctx, int rank, const arg *a, shared *sh, sbn_module **model_out) {
  sbn_group *w = sbn_world(ctx);
  sbn_module *model = NULL;
  int rc = mlp_build(MLP_FEATURES, HIDDEN, CLASSES, w, SEED + (uint64_t)rank, &model);
  *model_out = model;
  if (rc != SBN_OK)
    return failed(sh, rank, 1, rc);
  if ((rc = sbn_module_name_layers(model, NULL)) != SBN_OK)
    return failed(sh, rank, 2, rc);
  if ((rc = sbn_check_model(w, model)) != SBN_OK)
    return failed(sh, rank, 3, rc);
  if ((rc = sbn_module_broadcast(w, model, 0)) != SBN_OK)
    return failed(sh, rank, 4, rc);
  mlp_sgd opt;
  if ((rc = mlp_sgd_init(&opt, model, 0.1, 0.9, 0.0)) != SBN_OK) {
    mlp_sgd_release(&opt);
    return failed(sh, rank, 5, rc);
  }
  for (int s = 0; s < STEPS && rc == SBN_OK; s++)
    rc = train_step(model, &opt, w, rank, s + 1, sh);
  mlp_sgd_release(&opt);
  if (rc != SBN_OK)
    return rc;
  char path[256];
  snprintf(path, sizeof(path), "%s/rank%d.safetensors", a->dir, rank);
  if ((rc = sbn_safetensors_save(model, path)) != SBN_OK)
    return failed(sh, rank, 40, rc);
  rc = sbn_safetensors_load(model, path, 1);
  unlink(path);
  if (rc != SBN_OK)
    return failed(sh, rank, 41, rc);
  if ((rc = sbn_module_eval(model)) != SBN_OK)
    return failed(sh, rank, 42, rc);
  size_t shape[2] = {BATCH, MLP_FEATURES};
  sbn_tensor *x = NULL, *y = NULL;
  if ((rc = sbn_tensor_new(2, shape, &x)) != SBN_OK)
    return failed(sh, rank, 43, rc);
  memset(sbn_tensor_data(x), 0, sizeof(float) * BATCH * MLP_FEATURES);
  rc = sbn_module_call(model, x, &y);
  sbn_tensor_free(x);
  sbn_tensor_free(y);
  if (rc != SBN_OK)
    return failed(sh, rank, 44, rc);
  return SBN_OK;
}

static int worker(int rank, void *varg, void *vsh) {
  const arg *a = varg;
  shared *sh = vsh;
  if (rank == 0)
    nomem_arm(a->fail_at, a->persist);
  sbn_ctx *ctx = NULL;
  sbn_module *model = NULL;
  int rc = worker_connect(a->addr, a->job, rank, WORLD, &ctx);
  if (rc != SBN_OK)
    failed(sh, rank, 0, rc);
  else
    rc = steps(ctx, rank, a, sh, &model);
  /* Clean-up runs still armed: it must be safe whatever failed. */
  nomem_hold(1);
  uint64_t h = rc == SBN_OK ? weights_hash(model) : 0;
  nomem_hold(0);
  sbn_module_free(model);
  int frc = sbn_finalize(ctx);
  if (rc == SBN_OK && frc != SBN_OK)
    rc = failed(sh, rank, 50, frc);
  if (rank == 0)
    sh->calls = nomem_disarm(&sh->failed);
  sh->hash[rank] = h;
  if (LEAK_CHECK())
    return W_LEAK;
  return rc == SBN_OK ? W_PASS : W_ERROR;
}

static const char *const coord_args[] = {"--round-timeout", ROUND_TIMEOUT_MS, NULL};

typedef struct outcome {
  unsigned long calls, failed;
  uint64_t hash;
  int passed;
} outcome;

/* One job with rank 0's allocation n failing (0: none). */
static outcome run(const char *addr, const char *dir, unsigned long n, int persist,
                   uint64_t want_hash) {
  char what[96];
  snprintf(what, sizeof(what), "rank 0's allocation %lu failing%s", n,
           persist ? " and all after it" : "");
  arg a = {.addr = addr, .job = unique_job(), .dir = dir, .fail_at = n, .persist = persist};
  worker_set ws;
  ck_assert_int_eq(workers_start(&ws, WORLD, worker, &a, sizeof(shared)), 0);
  int npassed = workers_wait(&ws, 30000);
  shared *sh = ws.shared;
  if (getenv("SBN_NOMEM_VERBOSE") != NULL)
    for (int r = 0; r < WORLD; r++)
      printf("  %s, rank %d: exit %d, step %d, status %d: %s\n", what, r, ws.status[r],
             sh->step[r], sh->rc[r], sh->msg[r]);
  for (int r = 0; r < WORLD; r++) {
    ck_assert_msg(ws.status[r] != W_LEAK, "%s: rank %d leaked (LeakSanitizer's report above)",
                  what, r);
    ck_assert_msg(ws.status[r] == W_PASS || ws.status[r] == W_ERROR,
                  "%s: rank %d exited with %d (step %d: %s)", what, r, ws.status[r], sh->step[r],
                  sh->msg[r]);
    /* Steps 1 and 5 run the example's own code (mlp.c), which returns
     * SBN_ENOMEM for its own allocations without a message. */
    if (ws.status[r] == W_ERROR && sh->step[r] != 1 && sh->step[r] != 5)
      ck_assert_msg(sh->msg[r][0] != '\0', "%s: rank %d step %d failed without a message", what,
                    r, sh->step[r]);
  }
  if (ws.status[0] == W_ERROR && !persist)
    ck_assert_msg(sh->rc[0] == SBN_ENOMEM, "%s: rank 0 step %d failed with %d (%s): %s", what,
                  sh->step[0], sh->rc[0], sbn_strerror(sh->rc[0]), sh->msg[0]);
  if (ws.status[1] == W_ERROR)
    ck_assert_msg(ws.status[0] == W_ERROR &&
                      (sh->rc[1] == SBN_EPEERLOST || sh->rc[1] == SBN_ETIMEDOUT),
                  "%s: rank 1 step %d failed with %d (%s): %s", what, sh->step[1], sh->rc[1],
                  sbn_strerror(sh->rc[1]), sh->msg[1]);
  outcome o = {.calls = sh->calls, .failed = sh->failed, .hash = sh->hash[0],
               .passed = npassed == WORLD};
  if (o.passed && want_hash != 0)
    for (int r = 0; r < WORLD; r++)
      ck_assert_msg(sh->hash[r] == want_hash, "%s: rank %d trained to other weights", what, r);
  workers_release(&ws);
  return o;
}

typedef struct fixture {
  coord_proc cp;
  char dir[64];
} fixture;

static void fixture_start(fixture *f) {
  setenv("SBN_TEST_QUIET", "1", 1);
  ck_assert_int_eq(coord_start(&f->cp, coord_args), 0);
  snprintf(f->dir, sizeof(f->dir), "/tmp/sbn-nomem-client-XXXXXX");
  ck_assert_ptr_nonnull(mkdtemp(f->dir));
}

static void fixture_stop(fixture *f) {
  int st = coord_stop(&f->cp, SIGTERM, 10000);
  ck_assert_msg(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0,
                "the coordinator did not stop cleanly (wait status %d)", st);
  rmdir(f->dir);
}

/* The clean run: both pass, both ranks hold the same weights. */
static outcome clean_run(fixture *f) {
  outcome o = run(f->cp.addr, f->dir, 0, 0, 0);
  ck_assert_msg(o.passed, "the clean run failed");
  ck_assert_uint_eq(o.failed, 0);
  ck_assert_msg(o.calls > 10 && o.calls < SWEEP_MAX, "%lu allocations in the clean run",
                o.calls);
  ck_assert_uint_ne(o.hash, 0);
  return o;
}

START_TEST(each_allocation_fails_once) {
  fixture f;
  fixture_start(&f);
  outcome clean = clean_run(&f);
  unsigned long first = 1, last = clean.calls, hits = 0;
  const char *only = getenv("SBN_NOMEM_ONLY");
  if (only != NULL)
    first = last = strtoul(only, NULL, 10);
  for (unsigned long n = first; n <= last; n++) {
    outcome o = run(f.cp.addr, f.dir, n, 0, clean.hash);
    hits += o.failed;
  }
  printf("each_allocation_fails_once: %lu of %lu allocations made to fail\n", hits,
         last - first + 1);
  /* The count varies a little with timing; nearly all must be reached. */
  ck_assert_msg(hits + 8 >= last - first + 1, "only %lu allocations were made to fail", hits);
  fixture_stop(&f);
}
END_TEST

START_TEST(every_allocation_fails_from_some_point) {
  fixture f;
  fixture_start(&f);
  unsigned long k = clean_run(&f).calls;
  const unsigned long at[] = {1, k / 8, k / 4, k / 2, 3 * k / 4, k - 1};
  for (size_t i = 0; i < sizeof(at) / sizeof(at[0]); i++)
    run(f.cp.addr, f.dir, at[i] > 0 ? at[i] : 1, 1, 0);
  fixture_stop(&f);
}
END_TEST

int main(void) {
  Suite *s = suite_create("nomem_client");
  TCase *tc = tcase_create("worker");
  tcase_set_timeout(tc, 900);
  tcase_add_test(tc, each_allocation_fails_once);
  tcase_add_test(tc, every_allocation_fails_from_some_point);
  suite_add_tcase(s, tc);
  return run_suite(s);
}
