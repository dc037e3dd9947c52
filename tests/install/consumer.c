/*
 * consumer.c - a program outside the tree, built against an installed
 * libsbn-client by tests/install/run.sh (pkg-config + cc, and CMake's
 * find_package(sbn)), static and shared.
 *
 *   consumer VERSION   checks that the header and the library both say
 *                      VERSION, then runs a SyncBatchNorm forward in a
 *                      context of world size 1 (no network).
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <sbn/sbn.h>

#define N 8
#define C 3
#define TOLERANCE 1e-4

static int fail(const char *what) {
  fprintf(stderr, "consumer: %s: %s\n", what, sbn_last_error());
  return 1;
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: consumer VERSION\n");
    return 2;
  }
  if (strcmp(sbn_version(), argv[1]) != 0 || strcmp(SBN_VERSION_STRING, argv[1]) != 0 ||
      sbn_version_number() != SBN_VERSION_NUMBER) {
    fprintf(stderr, "consumer: version: library %s (%d), header %s (%d), expected %s\n",
            sbn_version(), sbn_version_number(), SBN_VERSION_STRING, SBN_VERSION_NUMBER, argv[1]);
    return 1;
  }

  if (strcmp(sbn_strerror(SBN_ETIMEDOUT), "unknown status") == 0)
    return fail("strerror");

  /* A context of world size 1 (no network), and one training forward of a
   * SyncBatchNorm(C) on its WORLD group, which is then local, on an (N, C)
   * batch: every output channel has mean 0 and (biased) variance 1. */
  sbn_config cfg;
  sbn_config_init(&cfg);
  sbn_ctx *ctx;
  if (sbn_init(&cfg, &ctx) != SBN_OK)
    return fail("init");
  sbn_bn_options o;
  sbn_bn_options_init(&o, C);
  o.group = sbn_world(ctx);
  sbn_module *bn;
  if (sbn_syncbatchnorm_new(&o, &bn) != SBN_OK)
    return fail("syncbatchnorm_new");
  size_t shape[2] = {N, C};
  float x[N * C];
  for (int i = 0; i < N * C; i++)
    x[i] = (float)(i % 7) * 1.5f - (float)(i % C) * 10.0f;
  sbn_tensor *in, *out;
  if (sbn_tensor_from_data(2, shape, x, &in) != SBN_OK)
    return fail("tensor");
  if (sbn_module_call(bn, in, &out) != SBN_OK)
    return fail("forward");
  const float *y = sbn_tensor_cdata(out);
  for (int c = 0; c < C; c++) {
    double mean = 0, var = 0;
    for (int n = 0; n < N; n++)
      mean += y[n * C + c];
    mean /= N;
    for (int n = 0; n < N; n++)
      var += (y[n * C + c] - mean) * (y[n * C + c] - mean);
    var /= N;
    if (fabs(mean) > TOLERANCE || fabs(var - 1.0) > 1e-3) {
      fprintf(stderr, "consumer: channel %d: mean %g, var %g\n", c, mean, var);
      return 1;
    }
  }
  sbn_tensor_free(out);
  sbn_tensor_free(in);
  sbn_module_free(bn);
  if (sbn_finalize(ctx) != SBN_OK)
    return fail("finalize");
  printf("consumer: sbn %s, SyncBatchNorm forward ok\n", sbn_version());
  return 0;
}
