/*
 * kernel.c - BatchNorm kernels through the public Module API, single thread,
 * in GB/s of the bytes each op must touch at least, next to streaming
 * baselines measured here on the same buffer sizes:
 *
 *   op             minimal traffic                     matching baseline
 *   forward_train  read x, write y       (2 x 4 bytes)  copy: read 1, write 1
 *   forward_eval   read x, write y       (2 x 4 bytes)  copy
 *   backward       read x, dy, write dx  (3 x 4 bytes)  add:  read 2, write 1
 *
 * "ratio" is the op's GB/s over its matching baseline's: 1 would be an op
 * done in one pass.  But the passes an op cannot avoid are more than one
 * when it needs a global result first: a training forward reads x for the
 * statistics, which must be complete (merged over all ranks) before any
 * output, then reads x and writes y; a backward reads x and dy for its sums
 * (merged likewise), then reads x and dy and writes dx.  So every op also
 * has a pass-matched baseline, the sum of the medians of those passes:
 *
 *   op             passes_baseline  passes
 *   forward_train  read+copy        read x; read x, write y
 *   forward_eval   copy             read x, write y
 *   backward       read2+add        read x, dy; read x, dy, write dx
 *
 * passes_ms is that sum and passes_ratio = passes_ms / p50_ms: 1 means the
 * op is as fast as streaming its unavoidable passes.
 *
 * forward_train computes the batch statistics and normalizes (a layer in
 * training mode); backward is timed alone after an untimed forward.  The
 * library allocates the output tensor on every call, as a user sees it.
 * The baselines use plain stores (no non-temporal tricks) like a kernel.
 *
 * Every shape runs in four variants over the same data: NCHW and
 * channels-last (NHWC, the layer's SBN_BN_CHANNELS_LAST, input (N,H,W,C)),
 * each without and with the fused ReLU (SBN_BN_FUSED_RELU), against the
 * same baselines.  "shape" is always (N,C,H,W).
 */
#define _GNU_SOURCE
#include "bench.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sbn/sbn.h"
#include "sbn/module.h"
#include "sbn/nn.h"
#include "sbn/tensor.h"

/* The SSE width every x86-64 has: wider GCC vectors without -mavx spill to
 * the stack.  The library is built with the same flags. */
typedef float v4f __attribute__((vector_size(16)));

/* Defeats dead-code elimination of the read baseline. */
static volatile float sink;
static volatile float one_f = 1.0f;

static inline v4f ld(const float *p) {
  v4f v;
  memcpy(&v, p, sizeof(v));
  return v;
}

static inline void stv(float *p, v4f v) { memcpy(p, &v, sizeof(v)); }

/* Sums x with 8 independent accumulators (add latency hidden). */
static void base_read(const float *x, size_t n) {
  v4f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 += ld(x + i);
    a1 += ld(x + i + 4);
    a2 += ld(x + i + 8);
    a3 += ld(x + i + 12);
    a4 += ld(x + i + 16);
    a5 += ld(x + i + 20);
    a6 += ld(x + i + 24);
    a7 += ld(x + i + 28);
  }
  v4f acc = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7));
  float s = acc[0] + acc[1] + acc[2] + acc[3];
  for (; i < n; i++)
    s += x[i];
  sink = s;
}

/* Sums x and y in one pass (4 + 4 accumulators). */
static void base_read2(const float *x, const float *y, size_t n) {
  v4f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    a0 += ld(x + i);
    a1 += ld(x + i + 4);
    a2 += ld(x + i + 8);
    a3 += ld(x + i + 12);
    b0 += ld(y + i);
    b1 += ld(y + i + 4);
    b2 += ld(y + i + 8);
    b3 += ld(y + i + 12);
  }
  v4f acc = ((a0 + a1) + (a2 + a3)) + ((b0 + b1) + (b2 + b3));
  float s = acc[0] + acc[1] + acc[2] + acc[3];
  for (; i < n; i++)
    s += x[i] + y[i];
  sink = s;
}

/* y = x * s with s = 1 (a copy the compiler cannot turn into memcpy). */
static void base_copy(const float *x, float *y, size_t n) {
  const float s = one_f;
  const v4f sv = {s, s, s, s};
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    stv(y + i, ld(x + i) * sv);
    stv(y + i + 4, ld(x + i + 4) * sv);
    stv(y + i + 8, ld(x + i + 8) * sv);
    stv(y + i + 12, ld(x + i + 12) * sv);
  }
  for (; i < n; i++)
    y[i] = x[i] * s;
}

/* z = x + y. */
static void base_add(const float *x, const float *y, float *z, size_t n) {
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    stv(z + i, ld(x + i) + ld(y + i));
    stv(z + i + 4, ld(x + i + 4) + ld(y + i + 4));
    stv(z + i + 8, ld(x + i + 8) + ld(y + i + 8));
    stv(z + i + 12, ld(x + i + 12) + ld(y + i + 12));
  }
  for (; i < n; i++)
    z[i] = x[i] + y[i];
}

static int kernel_reps(void) { return bench_reps(30, 5); }

/*
 * Repetitions for a shape of n values: at least kernel_reps(), and by
 * default as many as take about as long as 30 of (32,64,32,32) (2^21
 * values), at most 10 times more: 30 calls of (8,256,14,14) last a few
 * milliseconds, and their medians came out 20-40 % slower than those of
 * 100 (backward, measured).  --reps N and --quick give exactly that many.
 */
static int shape_reps(size_t n) {
  const int r = kernel_reps();
  if (g_opts.reps > 0 || g_opts.quick)
    return r;
  const double k = (double)(1u << 21) / (double)n;
  return k <= 1 ? r : k >= 10 ? 10 * r : (int)(r * k);
}

/* Untimed calls before the timed ones: a fifth as many, at least 2. */
static int kernel_warm(int reps) { return reps / 5 > 2 ? reps / 5 : 2; }

enum { B_READ, B_COPY, B_ADD, B_READ2, N_BASE };
static const char *base_name[N_BASE] = {"read", "copy", "add", "read2"};
static const int base_streams[N_BASE] = {1, 2, 3, 2}; /* 4-byte streams touched */

/* Each op: bytes streamed at least, its one-pass baseline and its
 * unavoidable passes (see the table at the top). */
enum { OP_TRAIN, OP_BACKWARD, OP_EVAL, N_OP };
static const struct {
  const char *name;
  int streams, base;
  const char *passes;
  int pass[2]; /* baselines, -1 for none */
} op_info[N_OP] = {
    {"forward_train", 2, B_COPY, "read+copy", {B_READ, B_COPY}},
    {"backward", 3, B_ADD, "read2+add", {B_READ2, B_ADD}},
    {"forward_eval", 2, B_COPY, "copy", {B_COPY, -1}},
};

/* Median seconds of each baseline over reps on n floats. */
static void measure_baselines(float *x, float *y, float *z, size_t n, int reps,
                              double med_s[N_BASE]) {
  double *t = malloc(sizeof(double) * (size_t)reps);
  if (t == NULL) {
    for (int b = 0; b < N_BASE; b++)
      med_s[b] = NAN;
    return;
  }
  for (int b = 0; b < N_BASE; b++) {
    for (int r = -kernel_warm(reps); r < reps; r++) {
      double t0 = now_s();
      if (b == B_READ)
        base_read(x, n);
      else if (b == B_READ2)
        base_read2(x, y, n);
      else if (b == B_COPY)
        base_copy(x, y, n);
      else
        base_add(x, y, z, n);
      double t1 = now_s();
      if (r >= 0)
        t[r] = t1 - t0;
    }
    bench_stats st;
    stats_compute(t, reps, &st);
    med_s[b] = st.p50;
  }
  free(t);
}

static void fill(float *p, size_t n, unsigned seed) {
  uint32_t s = seed * 2654435761u + 1;
  for (size_t i = 0; i < n; i++) {
    s = s * 1664525u + 1013904223u;
    p[i] = (float)((s >> 8) & 0xffff) * (1.0f / 65536.0f) * 4.0f - 2.0f + 0.5f;
  }
}

static void emit_kernel(const char *shape, const char *layout, int relu, int op, size_t n,
                        double med_s, const double base_s[N_BASE], int reps) {
  const int base = op_info[op].base;
  double bytes = (double)n * 4.0 * op_info[op].streams;
  double gbps = bytes / med_s / 1e9;
  double bgbps = (double)n * 4.0 * base_streams[base] / base_s[base] / 1e9;
  double passes_s = 0;
  for (int k = 0; k < 2; k++)
    if (op_info[op].pass[k] >= 0)
      passes_s += base_s[op_info[op].pass[k]];
  jline j;
  j_begin(&j, "kernel");
  j_str(&j, "shape", shape);
  j_str(&j, "layout", layout);
  j_bool(&j, "fused_relu", relu);
  j_str(&j, "op", op_info[op].name);
  j_int(&j, "threads", 1);
  j_int(&j, "reps", reps);
  j_int(&j, "bytes", (long long)bytes);
  j_num(&j, "p50_ms", med_s * 1e3);
  j_num(&j, "gbps", gbps);
  j_str(&j, "baseline", base_name[base]);
  j_num(&j, "baseline_gbps", bgbps);
  j_num(&j, "ratio", gbps / bgbps);
  j_str(&j, "passes_baseline", op_info[op].passes);
  j_num(&j, "passes_ms", passes_s * 1e3);
  j_num(&j, "passes_ratio", passes_s / med_s);
  j_emit(&j);
}

/* forward_train, backward and forward_eval of one layer variant; t: reps
 * doubles of scratch.  0 on success. */
static int bench_variant(const char *sh, const size_t shape[4], const char *layout,
                         unsigned flags, sbn_tensor *x, sbn_tensor *dy, size_t n,
                         const double base_s[N_BASE], double *t, int reps) {
  sbn_tensor *y = NULL, *dx = NULL;
  sbn_module *bn = NULL;
  const int relu = !!(flags & SBN_BN_FUSED_RELU);
  bench_stats s;
  int rc = -1;
  sbn_bn_options o;
  sbn_bn_options_init(&o, shape[1]);
  o.flags = flags;
  int st = sbn_batchnorm_new(&o, &bn);
  if (st != SBN_OK) {
    note("kernel: sbn_batchnorm_new: %s", sbn_last_error());
    goto out;
  }
  /* forward, training: statistics + normalize. */
  sbn_module_train(bn, 1, 1);
  for (int r = -kernel_warm(reps); r < reps; r++) {
    double t0 = now_s();
    st = sbn_module_forward(bn, x, &y);
    double t1 = now_s();
    if (st != SBN_OK) {
      note("kernel: forward: %s", sbn_last_error());
      goto out;
    }
    sbn_tensor_free(y);
    y = NULL;
    if (r >= 0)
      t[r] = t1 - t0;
  }
  stats_compute(t, reps, &s);
  emit_kernel(sh, layout, relu, OP_TRAIN, n, s.p50, base_s, reps);

  /* backward, timed alone after an untimed forward. */
  for (int r = -kernel_warm(reps); r < reps; r++) {
    st = sbn_module_forward(bn, x, &y);
    if (st != SBN_OK) {
      note("kernel: forward: %s", sbn_last_error());
      goto out;
    }
    sbn_tensor_free(y);
    y = NULL;
    double t0 = now_s();
    st = sbn_module_backward(bn, dy, &dx);
    double t1 = now_s();
    if (st != SBN_OK) {
      note("kernel: backward: %s", sbn_last_error());
      goto out;
    }
    sbn_tensor_free(dx);
    dx = NULL;
    if (r >= 0)
      t[r] = t1 - t0;
  }
  stats_compute(t, reps, &s);
  emit_kernel(sh, layout, relu, OP_BACKWARD, n, s.p50, base_s, reps);

  /* forward, eval: normalize with the running statistics. */
  sbn_module_eval(bn);
  for (int r = -kernel_warm(reps); r < reps; r++) {
    double t0 = now_s();
    st = sbn_module_forward(bn, x, &y);
    double t1 = now_s();
    if (st != SBN_OK) {
      note("kernel: eval forward: %s", sbn_last_error());
      goto out;
    }
    sbn_tensor_free(y);
    y = NULL;
    if (r >= 0)
      t[r] = t1 - t0;
  }
  stats_compute(t, reps, &s);
  emit_kernel(sh, layout, relu, OP_EVAL, n, s.p50, base_s, reps);
  rc = 0;
out:
  sbn_module_free(bn);
  return rc;
}

static int bench_shape(const size_t shape[4], int reps) {
  char sh[64];
  snprintf(sh, sizeof(sh), "(%zu,%zu,%zu,%zu)", shape[0], shape[1], shape[2], shape[3]);
  size_t n = shape[0] * shape[1] * shape[2] * shape[3];
  sbn_tensor *x = NULL, *dy = NULL, *y = NULL, *xcl = NULL, *dycl = NULL;
  float *b1 = malloc(n * sizeof(float)), *b2 = malloc(n * sizeof(float));
  double *t = malloc(sizeof(double) * (size_t)reps);
  int rc = -1;
  if (b1 == NULL || b2 == NULL || t == NULL)
    goto out;
  if (sbn_tensor_new(4, shape, &x) != SBN_OK || sbn_tensor_new(4, shape, &dy) != SBN_OK)
    goto out;
  fill(sbn_tensor_data(x), n, 1);
  fill(sbn_tensor_data(dy), n, 2);
  fill(b1, n, 3);
  fill(b2, n, 4);

  /* Baselines on the same sizes: x as the source, b1 and b2 as outputs. */
  double base_s[N_BASE];
  measure_baselines(sbn_tensor_data(x), b1, b2, n, reps, base_s);
  for (int b = 0; b < N_BASE; b++) {
    jline j;
    j_begin(&j, "kernel");
    j_str(&j, "shape", sh);
    j_str(&j, "op", "baseline");
    j_str(&j, "baseline", base_name[b]);
    j_int(&j, "threads", 1);
    j_int(&j, "reps", reps);
    j_int(&j, "bytes", (long long)(n * 4 * (size_t)base_streams[b]));
    j_num(&j, "p50_ms", base_s[b] * 1e3);
    j_num(&j, "gbps", (double)n * 4.0 * base_streams[b] / base_s[b] / 1e9);
    j_emit(&j);
  }

  /* What a new zero-filled tensor of this size costs (allocation, zeroing,
   * page faults).  The kernels allocate their outputs uninitialized from the
   * buffer cache, so they do not pay the zeroing; this row is for scale. */
  for (int r = -kernel_warm(reps); r < reps; r++) {
    double t0 = now_s();
    int a = sbn_tensor_new(4, shape, &y);
    double t1 = now_s();
    if (a != SBN_OK)
      goto out;
    sbn_tensor_free(y);
    y = NULL;
    if (r >= 0)
      t[r] = t1 - t0;
  }
  bench_stats s;
  stats_compute(t, reps, &s);
  {
    jline j;
    j_begin(&j, "kernel");
    j_str(&j, "shape", sh);
    j_str(&j, "op", "tensor_new");
    j_int(&j, "threads", 1);
    j_int(&j, "reps", reps);
    j_int(&j, "bytes", (long long)(n * 4));
    j_num(&j, "p50_ms", s.p50 * 1e3);
    j_num(&j, "gbps", (double)n * 4.0 / s.p50 / 1e9);
    j_emit(&j);
  }

  static const struct {
    const char *layout;
    unsigned flags;
  } variants[] = {{"NCHW", 0},
                  {"NHWC", SBN_BN_CHANNELS_LAST},
                  {"NCHW", SBN_BN_FUSED_RELU},
                  {"NHWC", SBN_BN_CHANNELS_LAST | SBN_BN_FUSED_RELU}};
  /* NHWC views of the same data: (N, H, W, C). */
  const size_t cl_shape[4] = {shape[0], shape[2], shape[3], shape[1]};
  if (sbn_tensor_view(4, cl_shape, sbn_tensor_data(x), &xcl) != SBN_OK ||
      sbn_tensor_view(4, cl_shape, sbn_tensor_data(dy), &dycl) != SBN_OK)
    goto out;
  for (size_t v = 0; v < sizeof(variants) / sizeof(variants[0]); v++) {
    const int cl = !!(variants[v].flags & SBN_BN_CHANNELS_LAST);
    if (bench_variant(sh, shape, variants[v].layout, variants[v].flags, cl ? xcl : x,
                      cl ? dycl : dy, n, base_s, t, reps) != 0)
      goto out;
  }
  rc = 0;
out:
  sbn_tensor_free(xcl);
  sbn_tensor_free(dycl);
  sbn_tensor_free(x);
  sbn_tensor_free(dy);
  free(b1);
  free(b2);
  free(t);
  return rc;
}

int bench_kernel(void) {
  static const size_t shapes[][4] = {{32, 64, 32, 32}, {8, 256, 14, 14}, {64, 32, 56, 56}};
  int fails = 0;
  for (int i = 0; i < 3; i++) {
    const size_t n = shapes[i][0] * shapes[i][1] * shapes[i][2] * shapes[i][3];
    note("kernel shape (%zu,%zu,%zu,%zu)", shapes[i][0], shapes[i][1], shapes[i][2],
         shapes[i][3]);
    if (bench_shape(shapes[i], shape_reps(n)) != 0)
      fails++;
  }
  return fails ? -1 : 0;
}
