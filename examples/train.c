/*
 * train.c - data-parallel training with nothing but sbn.
 *
 * Every worker runs this program.  It reads its rank, the world size and the
 * coordinator's address from the environment (SBN_* or the launchers'
 * MASTER_ADDR/RANK/WORLD_SIZE or Slurm's variables), builds the classifier of
 * mlp.h with SyncBatchNorm, checks that every rank built the same model,
 * takes rank 0's initial weights, and trains with SGD + momentum on its own
 * shard of the spirals data set, averaging gradients after every backward.
 * Rank 0 prints one line per epoch and a final result line.
 *
 *   SBN_COORDINATOR=127.0.0.1:29517 SBN_RANK=0 SBN_WORLD_SIZE=4 sbn-train
 *
 * Exit status: 0 when the test accuracy reached --target, 1 when it did not,
 * 2 on bad usage, 3 when sbn reported an error (the message says which).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "mlp.h"
#include "sbn/sbn.h"

typedef struct options {
  int epochs;
  size_t batch;   /* per worker */
  size_t points;  /* training points in all */
  size_t tests;   /* held-out points */
  size_t hidden;
  size_t classes;
  double lr, momentum, weight_decay, target;
  uint64_t seed;
} options;

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int usage(const char *argv0) {
  fprintf(stderr,
          "usage: %s [--epochs N] [--batch B] [--points P] [--hidden H] [--lr X]\n"
          "          [--momentum X] [--target ACC] [--seed S]\n"
          "Rank, world size and coordinator come from SBN_RANK, SBN_WORLD_SIZE,\n"
          "SBN_COORDINATOR (or MASTER_ADDR/MASTER_PORT, RANK, WORLD_SIZE, Slurm).\n",
          argv0);
  return 2;
}

static int parse(int argc, char **argv, options *o) {
  *o = (options){.epochs = 20, .batch = 32, .points = 12000, .tests = 3000, .hidden = 64,
                 .classes = 3, .lr = 0.1, .momentum = 0.9, .weight_decay = 1e-4,
                 .target = 0.97, .seed = 2024};
  for (int i = 1; i < argc; i += 2) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    char *end = NULL;
    if (v == NULL)
      return usage(argv[0]);
    if (!strcmp(a, "--epochs")) o->epochs = (int)strtol(v, &end, 10);
    else if (!strcmp(a, "--batch")) o->batch = strtoul(v, &end, 10);
    else if (!strcmp(a, "--points")) o->points = strtoul(v, &end, 10);
    else if (!strcmp(a, "--hidden")) o->hidden = strtoul(v, &end, 10);
    else if (!strcmp(a, "--lr")) o->lr = strtod(v, &end);
    else if (!strcmp(a, "--momentum")) o->momentum = strtod(v, &end);
    else if (!strcmp(a, "--target")) o->target = strtod(v, &end);
    else if (!strcmp(a, "--seed")) o->seed = strtoull(v, &end, 10);
    else return usage(argv[0]);
    if (end == NULL || *end != '\0') {
      fprintf(stderr, "%s: bad value '%s' for %s\n", argv[0], v, a);
      return 2;
    }
  }
  if (o->epochs < 1 || o->batch < 1 || o->hidden < 1 || o->points < 1) {
    fprintf(stderr, "%s: epochs, batch, hidden and points must be positive\n", argv[0]);
    return 2;
  }
  return 0;
}

/* Reports an sbn failure and exits with status 3. */
#define CHECK(call)                                                            \
  do {                                                                         \
    int rc_ = (call);                                                          \
    if (rc_ != SBN_OK) {                                                       \
      fprintf(stderr, "rank %d: %s failed: %s (%s)\n", rank, #call,            \
              sbn_last_error(), sbn_strerror(rc_));                            \
      exit(3);                                                                 \
    }                                                                          \
  } while (0)

/* Fills x (n, 2) and labels with points idx[0..n) of the data set. */
static void load_batch(const options *o, const uint64_t *idx, size_t n, sbn_tensor *x,
                       int *labels) {
  float *xd = sbn_tensor_data(x);
  for (size_t i = 0; i < n; i++)
    mlp_point(idx[i], o->classes, o->seed, xd + i * MLP_FEATURES, &labels[i]);
}

/* Evaluates the held-out points of this rank's shard; returns the correct count. */
static size_t evaluate(const options *o, sbn_module *model, int rank, int world,
                       size_t *seen) {
  size_t correct = 0;
  *seen = 0;
  uint64_t idx[256];
  int labels[256];
  size_t shape[2] = {256, MLP_FEATURES};
  for (uint64_t first = o->points + (uint64_t)rank; first < o->points + o->tests;) {
    size_t n = 0;
    while (n < 256 && first < o->points + o->tests) {
      idx[n++] = first;
      first += (uint64_t)world;
    }
    shape[0] = n;
    sbn_tensor *x, *y, *d;
    CHECK(sbn_tensor_new(2, shape, &x));
    load_batch(o, idx, n, x, labels);
    CHECK(sbn_module_call(model, x, &y));
    size_t ok;
    mlp_xent(y, labels, 1.0, &d, &ok);
    correct += ok;
    *seen += n;
    sbn_tensor_free(x);
    sbn_tensor_free(y);
    sbn_tensor_free(d);
  }
  return correct;
}

int main(int argc, char **argv) {
  options o;
  int rank = 0;
  int prc = parse(argc, argv, &o);
  if (prc != 0)
    return prc;
  sbn_config cfg;
  sbn_config_init(&cfg);
  CHECK(sbn_config_from_env(&cfg));
  sbn_ctx *ctx;
  CHECK(sbn_init(&cfg, &ctx));
  rank = sbn_rank(ctx);
  int world = sbn_world_size(ctx);
  sbn_group *g = sbn_world(ctx);
  double t_start = now_s();

  /* Same model everywhere: checked, then rank 0's weights for all. */
  sbn_module *model;
  CHECK(mlp_build(MLP_FEATURES, o.hidden, o.classes, g, o.seed + (uint64_t)rank, &model));
  CHECK(sbn_module_name_layers(model, NULL));
  CHECK(sbn_check_model(g, model));
  CHECK(sbn_module_broadcast(g, model, 0));
  mlp_sgd opt;
  CHECK(mlp_sgd_init(&opt, model, o.lr, o.momentum, o.weight_decay));

  /* This worker's shard: points rank, rank + world, ... (only these are made). */
  size_t shard = o.points / (size_t)world;
  size_t steps = shard / o.batch;
  if (steps == 0) {
    fprintf(stderr, "rank %d: shard of %zu points is smaller than a batch of %zu\n", rank,
            shard, o.batch);
    return 2;
  }
  uint64_t *order = malloc(shard * sizeof(uint64_t));
  int *labels = malloc(o.batch * sizeof(int));
  if (order == NULL || labels == NULL) {
    fprintf(stderr, "rank %d: out of memory for a shard of %zu points\n", rank, shard);
    return 3;
  }
  for (size_t i = 0; i < shard; i++)
    order[i] = (uint64_t)rank + (uint64_t)i * (uint64_t)world;
  size_t xshape[2] = {o.batch, MLP_FEATURES};
  if (rank == 0)
    printf("sbn-train: %d workers, %zu points (%zu per worker), batch %zu per worker, "
           "%zu steps per epoch\n",
           world, o.points, shard, o.batch, steps);
  sbn_round_stats_get(ctx, &(sbn_round_stats){0}, 1);
  uint64_t rng = o.seed * 7 + (uint64_t)rank;
  float acc = 0;
  for (int epoch = 1; epoch <= o.epochs; epoch++) {
    sbn_module_train(model, 1, 1);
    /* Cosine learning-rate decay over the run. */
    opt.lr = o.lr * 0.5 * (1 + cos(M_PI * (epoch - 1) / o.epochs));
    /* Shuffle the local shard (Fisher-Yates with a seeded xorshift). */
    for (size_t i = shard - 1; i > 0; i--) {
      rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
      size_t j = (size_t)(rng % (i + 1));
      uint64_t t = order[i];
      order[i] = order[j];
      order[j] = t;
    }
    double loss_sum = 0;
    size_t correct = 0;
    for (size_t s = 0; s < steps; s++) {
      sbn_tensor *x, *y, *dy, *dx;
      CHECK(sbn_tensor_new(2, xshape, &x));
      load_batch(&o, order + s * o.batch, o.batch, x, labels);
      sbn_module_zero_grad(model);
      CHECK(sbn_module_call(model, x, &y));
      size_t ok;
      loss_sum += mlp_xent(y, labels, 1.0, &dy, &ok);
      correct += ok;
      CHECK(sbn_module_backward(model, dy, &dx));
      CHECK(sbn_module_allreduce_grads(g, model, SBN_REDUCE_MEAN));
      mlp_sgd_step(&opt);
      sbn_tensor_free(x);
      sbn_tensor_free(y);
      sbn_tensor_free(dy);
      sbn_tensor_free(dx);
    }
    /* Epoch metrics over all workers. */
    float m[3] = {(float)loss_sum, (float)correct, (float)(steps * o.batch)};
    sbn_round_stats st;
    CHECK(sbn_round_stats_get(ctx, &st, 1));
    CHECK(sbn_allreduce(g, m, 3, SBN_REDUCE_SUM));
    acc = m[1] / m[2];
    if (rank == 0)
      printf("epoch %3d  loss %.4f  train-acc %.2f%%  rounds %llu  round-latency mean %.0f us"
             "  p99 %.0f us\n",
             epoch, m[0] / (float)(steps * (size_t)world), 100 * acc, st.rounds, st.mean_us,
             st.p99_us);
    fflush(stdout);
  }
  /* Held-out accuracy, with the running statistics (eval mode). */
  sbn_module_eval(model);
  size_t seen;
  size_t correct = evaluate(&o, model, rank, world, &seen);
  float t[2] = {(float)correct, (float)seen};
  CHECK(sbn_allreduce(g, t, 2, SBN_REDUCE_SUM));
  double test_acc = t[1] > 0 ? t[0] / t[1] : 0;
  int reached = test_acc >= o.target;
  if (rank == 0)
    printf("result: test accuracy %.2f%% on %.0f held-out points after %d epochs in %.1f s "
           "with %d workers (target %.1f%%: %s)\n",
           100 * test_acc, t[1], o.epochs, now_s() - t_start, world, 100 * o.target,
           reached ? "reached" : "missed");
  mlp_sgd_release(&opt);
  sbn_module_free(model);
  free(order);
  free(labels);
  CHECK(sbn_finalize(ctx));
  return reached ? 0 : 1;
}
