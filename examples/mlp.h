/*
 * mlp.h - the building blocks of the training example, written on sbn's
 * public Module API the way a user would: Linear and ReLU modules, softmax
 * cross-entropy, SGD with momentum, and a deterministic "spirals" data set.
 * tests/test_train.c reuses them to prove that N workers with batch B train
 * exactly like one process with batch N*B.
 */
#ifndef SBN_EXAMPLE_MLP_H
#define SBN_EXAMPLE_MLP_H

#include <stddef.h>
#include <stdint.h>

#include "sbn/sbn.h"

/* y = x W^T + b for x of shape (N, in); W (out, in), b (out,). */
int mlp_linear_new(size_t in, size_t out, uint64_t seed, sbn_module **m);
/* y = max(x, 0), any shape. */
int mlp_relu_new(sbn_module **m);

/*
 * The example's classifier: Linear(in, hidden) -> SyncBatchNorm(hidden) ->
 * ReLU -> Linear(hidden, hidden) -> SyncBatchNorm(hidden) -> ReLU ->
 * Linear(hidden, classes), synchronizing its batch statistics over group
 * (NULL = local BatchNorm).  Weights depend on seed only.
 */
int mlp_build(size_t in, size_t hidden, size_t classes, sbn_group *group, uint64_t seed,
              sbn_module **model);

/*
 * Mean softmax cross-entropy of logits (n, classes) against labels, scaled
 * by `scale` (1 for a plain mean over the local batch).  Writes d(loss)/d(logits)
 * into a new tensor *dlogits and the number of correct argmax predictions
 * into *correct.  Returns the unscaled mean loss.
 */
double mlp_xent(sbn_tensor *logits, const int *labels, double scale, sbn_tensor **dlogits,
                size_t *correct);

/* SGD with momentum (PyTorch's convention: v = mu*v + g; p -= lr*v). */
typedef struct mlp_sgd {
  double lr, momentum, weight_decay;
  sbn_named_list params;
  float **velocity;
} mlp_sgd;
int mlp_sgd_init(mlp_sgd *opt, sbn_module *model, double lr, double momentum,
                 double weight_decay);
void mlp_sgd_step(mlp_sgd *opt);
void mlp_sgd_release(mlp_sgd *opt);

/* The data set: `classes` interleaved noisy spirals in 2-D, point i has
 * label i % classes; a pure function of (i, seed), so a worker materializes
 * only the points of its shard. */
#define MLP_FEATURES 2
void mlp_point(uint64_t i, size_t classes, uint64_t seed, float x[MLP_FEATURES], int *label);

#endif
