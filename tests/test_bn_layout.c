/*
 * test_bn_layout.c - BatchNorm / SyncBatchNorm options SBN_BN_CHANNELS_LAST
 * and SBN_BN_FUSED_RELU against PyTorch float64 references written by
 * tests/data/gen_reference.py (layout_*.bin, dist_cl_relu.bin; see its
 * header): channels-last rank 2..5 with |mean| = 1e4, the fused ReLU in both
 * layouts in train, eval and freeze (the distributed cases, 2 and 4 ranks
 * through a real coordinator, are in test_syncbn_dist.c).  The NCHW path on transposed data is an
 * additional check only.  Tolerance: the spec's 5e-6 + 5e-6 |ref|.
 */
#include <check.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coord_proc.h"
#include "refdata.h"
#include "sbn/sbn.h"
#include "workers.h"
#include "internal.h" /* sbn__bn_kernel_path */

/* ---- helpers ------------------------------------------------------------------ */

static void assert_close(const float *got, const float *ref, size_t n, const char *what) {
  long at = ref_worst(got, ref, n);
  ck_assert_msg(at < 0, "%s: element %ld is %.9g, reference %.9g", what, at,
                at < 0 ? 0.0 : (double)got[at], at < 0 ? 0.0 : (double)ref[at]);
}

static void assert_close_ref(const sbn_tensor *t, const ref_file *r, const char *name,
                             const char *what) {
  const ref_array *a = ref_get(r, name);
  ck_assert_msg(sbn_tensor_numel(t) == a->numel, "%s: %zu elements, reference %zu", what,
                sbn_tensor_numel(t), a->numel);
  assert_close(sbn_tensor_cdata(t), a->data, a->numel, what);
}

static int bitwise_equal(const sbn_tensor *a, const sbn_tensor *b) {
  return sbn_tensor_same_shape(a, b) &&
         memcmp(sbn_tensor_cdata(a), sbn_tensor_cdata(b), sbn_tensor_numel(a) * sizeof(float)) == 0;
}

static sbn_module *make_layer(int sync, size_t C, unsigned flags, int freeze) {
  sbn_bn_options o;
  sbn_bn_options_init(&o, C);
  o.flags = flags;
  o.freeze = freeze;
  o.name = "bn";
  sbn_module *m = NULL;
  int rc = sync ? sbn_syncbatchnorm_new(&o, &m) : sbn_batchnorm_new(&o, &m);
  ck_assert_msg(rc == SBN_OK, "new layer (flags 0x%x): %s", flags, sbn_last_error());
  return m;
}

static sbn_tensor *T(const sbn_module *m, const char *name) {
  sbn_tensor *t = sbn_module_get_tensor(m, name);
  ck_assert_msg(t != NULL, "no tensor '%s'", name);
  return t;
}

static void set_from_ref(sbn_module *m, const char *tensor, const ref_file *r, const char *name) {
  const ref_array *a = ref_get(r, name);
  sbn_tensor *t = T(m, tensor);
  ck_assert_uint_eq(sbn_tensor_numel(t), a->numel);
  memcpy(sbn_tensor_data(t), a->data, a->numel * sizeof(float));
}

static sbn_tensor *forward(sbn_module *m, sbn_tensor *x) {
  sbn_tensor *y = NULL;
  int rc = sbn_module_call(m, x, &y);
  ck_assert_msg(rc == SBN_OK, "forward: %s", sbn_last_error());
  ck_assert(sbn_tensor_same_shape(x, y));
  return y;
}

static sbn_tensor *backward(sbn_module *m, sbn_tensor *dy) {
  sbn_tensor *dx = NULL;
  int rc = sbn_module_backward(m, dy, &dx);
  ck_assert_msg(rc == SBN_OK, "backward: %s", sbn_last_error());
  ck_assert(sbn_tensor_same_shape(dy, dx));
  return dx;
}

static sbn_tensor *copy_of(const sbn_tensor *t) {
  sbn_tensor *c;
  ck_assert_int_eq(sbn_tensor_clone(t, &c), SBN_OK);
  return c;
}

static int all_zero(const sbn_tensor *t) {
  for (size_t i = 0; i < sbn_tensor_numel(t); i++)
    if (sbn_tensor_cdata(t)[i] != 0.0f) return 0;
  return 1;
}

/* ---- the reference cases -------------------------------------------------------- */

typedef struct layout_case {
  const char *file;
  unsigned flags;
} layout_case;

#define CL SBN_BN_CHANNELS_LAST
#define RELU SBN_BN_FUSED_RELU

static const layout_case cases[] = {
    {"layout_cl_2d.bin", CL},
    {"layout_cl_3d.bin", CL},
    {"layout_cl_4d.bin", CL},
    {"layout_cl_5d.bin", CL},
    {"layout_cl_odd.bin", CL},
    {"layout_cl_bigmean.bin", CL},
    {"layout_relu_nchw_3d.bin", RELU},
    {"layout_relu_nchw_4d.bin", RELU},
    {"layout_relu_nchw_odd.bin", RELU},
    {"layout_relu_cl_2d.bin", CL | RELU},
    {"layout_relu_cl_4d.bin", CL | RELU},
    {"layout_relu_cl_5d.bin", CL | RELU},
    {"layout_relu_cl_odd.bin", CL | RELU},
    {"layout_relu_cl_bigmean.bin", CL | RELU},
};
#define NCASES ((int)(sizeof(cases) / sizeof(cases[0])))

static size_t case_channels(const ref_array *x, unsigned flags) {
  return flags & CL ? x->shape[x->ndim - 1] : x->shape[1];
}

/* Loop index i: case i / 2, a SyncBatchNorm (local) when i is odd. */
static void run_train_eval(int i) {
  const layout_case *lc = &cases[i / 2];
  int sync = i % 2;
  ref_file r = ref_load(lc->file);
  size_t C = case_channels(ref_get(&r, "x"), lc->flags);
  sbn_module *bn = make_layer(sync, C, lc->flags, 0);
  set_from_ref(bn, "weight", &r, "weight");
  set_from_ref(bn, "bias", &r, "bias");
  char what[128];
  /* training step */
  sbn_tensor *x = ref_tensor(&r, "x"), *dy = ref_tensor(&r, "dy");
  sbn_tensor *y = forward(bn, x), *dx = backward(bn, dy);
#define CHECK(t, name)                                                  \
  do {                                                                  \
    snprintf(what, sizeof(what), "%s (%s) %s", lc->file, sync ? "sync" : "plain", name); \
    assert_close_ref((t), &r, (name), what);                            \
  } while (0)
  CHECK(y, "y");
  CHECK(dx, "dx");
  CHECK(sbn_tensor_grad(T(bn, "weight")), "dweight");
  CHECK(sbn_tensor_grad(T(bn, "bias")), "dbias");
  CHECK(T(bn, "running_mean"), "rm");
  CHECK(T(bn, "running_var"), "rv");
  if (lc->flags & RELU) {
    /* y is exactly max(0, .): no negative values, zeros where cut. */
    const float *yd = sbn_tensor_cdata(y), *yr = ref_get(&r, "y")->data;
    for (size_t k = 0; k < sbn_tensor_numel(y); k++)
      ck_assert_msg(yd[k] >= 0.0f && (yr[k] != 0.0f || yd[k] == 0.0f), "%s y[%zu] = %.9g",
                    lc->file, k, (double)yd[k]);
  }
  sbn_tensor_free(x), sbn_tensor_free(dy), sbn_tensor_free(y), sbn_tensor_free(dx);
  /* eval step with the running stats as stored in the file (float32) */
  set_from_ref(bn, "running_mean", &r, "rm");
  set_from_ref(bn, "running_var", &r, "rv");
  ck_assert_int_eq(sbn_module_eval(bn), SBN_OK);
  ck_assert_int_eq(sbn_module_zero_grad(bn), SBN_OK);
  sbn_tensor *rm = copy_of(T(bn, "running_mean")), *rv = copy_of(T(bn, "running_var"));
  x = ref_tensor(&r, "ex");
  dy = ref_tensor(&r, "edy");
  sbn_tensor *y2 = forward(bn, x);
  y = forward(bn, x);
  ck_assert_msg(bitwise_equal(y, y2), "%s: two eval calls differ", lc->file);
  dx = backward(bn, dy);
  CHECK(y, "ey");
  CHECK(dx, "edx");
  CHECK(sbn_tensor_grad(T(bn, "weight")), "edweight");
  CHECK(sbn_tensor_grad(T(bn, "bias")), "edbias");
#undef CHECK
  ck_assert(bitwise_equal(rm, T(bn, "running_mean")));
  ck_assert(bitwise_equal(rv, T(bn, "running_var")));
  sbn_tensor_free(x), sbn_tensor_free(dy), sbn_tensor_free(y), sbn_tensor_free(y2);
  sbn_tensor_free(dx), sbn_tensor_free(rm), sbn_tensor_free(rv);
  sbn_module_free(bn);
  ref_free(&r);
}

START_TEST(test_train_eval) { run_train_eval(_i); }
END_TEST

/*
 * freeze: in training mode (and in eval) a frozen layer normalizes with the
 * running stats, which never change, and its weight and bias get no
 * gradient; output and dx are the eval step's.
 */
START_TEST(test_freeze) {
  const layout_case *lc = &cases[_i / 2];
  int sync = _i % 2;
  ref_file r = ref_load(lc->file);
  size_t C = case_channels(ref_get(&r, "x"), lc->flags);
  sbn_module *bn = make_layer(sync, C, lc->flags, 1);
  set_from_ref(bn, "weight", &r, "weight");
  set_from_ref(bn, "bias", &r, "bias");
  set_from_ref(bn, "running_mean", &r, "rm");
  set_from_ref(bn, "running_var", &r, "rv");
  sbn_tensor *w0 = copy_of(T(bn, "weight")), *b0 = copy_of(T(bn, "bias"));
  sbn_tensor *rm = copy_of(T(bn, "running_mean")), *rv = copy_of(T(bn, "running_var"));
  sbn_tensor *x = ref_tensor(&r, "ex"), *dy = ref_tensor(&r, "edy");
  char what[128];
  for (int mode = 1; mode >= 0; mode--) {
    ck_assert_int_eq(sbn_module_train(bn, mode, 1), SBN_OK);
    for (int step = 0; step < 2; step++) {
      sbn_tensor *y = forward(bn, x), *dx = backward(bn, dy);
      snprintf(what, sizeof(what), "%s frozen (%s, %s) y", lc->file, sync ? "sync" : "plain",
               mode ? "train" : "eval");
      assert_close_ref(y, &r, "ey", what);
      snprintf(what, sizeof(what), "%s frozen (%s, %s) dx", lc->file, sync ? "sync" : "plain",
               mode ? "train" : "eval");
      assert_close_ref(dx, &r, "edx", what);
      sbn_tensor_free(y);
      sbn_tensor_free(dx);
    }
  }
  ck_assert(all_zero(sbn_tensor_grad(T(bn, "weight"))));
  ck_assert(all_zero(sbn_tensor_grad(T(bn, "bias"))));
  ck_assert(bitwise_equal(w0, T(bn, "weight")) && bitwise_equal(b0, T(bn, "bias")));
  ck_assert(bitwise_equal(rm, T(bn, "running_mean")));
  ck_assert(bitwise_equal(rv, T(bn, "running_var")));
  sbn_tensor_free(x), sbn_tensor_free(dy), sbn_tensor_free(w0), sbn_tensor_free(b0);
  sbn_tensor_free(rm), sbn_tensor_free(rv);
  sbn_module_free(bn);
  ref_free(&r);
}
END_TEST

/* ---- additional check: the NCHW path on the transposed data -------------------- */

/* (N, S..., C) <-> (N, C, S...) for a tensor of numel N*S*C. */
static sbn_tensor *transpose(const sbn_tensor *t, int to_nchw) {
  int nd = sbn_tensor_ndim(t);
  size_t shape[SBN_MAX_DIMS], N = sbn_tensor_dim(t, 0), C, S = 1;
  if (to_nchw) {
    C = sbn_tensor_dim(t, nd - 1);
    shape[0] = N, shape[1] = C;
    for (int d = 1; d < nd - 1; d++) shape[d + 1] = sbn_tensor_dim(t, d), S *= shape[d + 1];
  } else {
    C = sbn_tensor_dim(t, 1);
    shape[0] = N, shape[nd - 1] = C;
    for (int d = 2; d < nd; d++) shape[d - 1] = sbn_tensor_dim(t, d), S *= shape[d - 1];
  }
  sbn_tensor *o;
  ck_assert_int_eq(sbn_tensor_new(nd, shape, &o), SBN_OK);
  const float *in = sbn_tensor_cdata(t);
  float *out = sbn_tensor_data(o);
  for (size_t n = 0; n < N; n++)
    for (size_t s = 0; s < S; s++)
      for (size_t c = 0; c < C; c++) {
        size_t cl = (n * S + s) * C + c, nc = (n * C + c) * S + s;
        if (to_nchw) out[nc] = in[cl];
        else out[cl] = in[nc];
      }
  return o;
}

START_TEST(test_matches_nchw_path) {
  const layout_case *lc = &cases[_i];
  if (!(lc->flags & CL)) return;
  ref_file r = ref_load(lc->file);
  size_t C = case_channels(ref_get(&r, "x"), lc->flags);
  sbn_module *a = make_layer(0, C, lc->flags, 0), *b = make_layer(0, C, lc->flags & ~CL, 0);
  sbn_module *both[2] = {a, b};
  for (int k = 0; k < 2; k++) {
    set_from_ref(both[k], "weight", &r, "weight");
    set_from_ref(both[k], "bias", &r, "bias");
  }
  sbn_tensor *x = ref_tensor(&r, "x"), *dy = ref_tensor(&r, "dy");
  sbn_tensor *xt = transpose(x, 1), *dyt = transpose(dy, 1);
  sbn_tensor *ya = forward(a, x), *dxa = backward(a, dy);
  sbn_tensor *yb = forward(b, xt), *dxb = backward(b, dyt);
  sbn_tensor *ybt = transpose(yb, 0), *dxbt = transpose(dxb, 0);
  char what[128];
  snprintf(what, sizeof(what), "%s y vs NCHW path", lc->file);
  assert_close(sbn_tensor_cdata(ya), sbn_tensor_cdata(ybt), sbn_tensor_numel(ya), what);
  snprintf(what, sizeof(what), "%s dx vs NCHW path", lc->file);
  assert_close(sbn_tensor_cdata(dxa), sbn_tensor_cdata(dxbt), sbn_tensor_numel(dxa), what);
  const char *names[] = {"running_mean", "running_var"};
  for (int k = 0; k < 2; k++) {
    snprintf(what, sizeof(what), "%s %s vs NCHW path", lc->file, names[k]);
    assert_close(sbn_tensor_cdata(T(a, names[k])), sbn_tensor_cdata(T(b, names[k])), C, what);
  }
  snprintf(what, sizeof(what), "%s dweight vs NCHW path", lc->file);
  assert_close(sbn_tensor_cdata(sbn_tensor_grad(T(a, "weight"))),
               sbn_tensor_cdata(sbn_tensor_grad(T(b, "weight"))), C, what);
  /* For rank 2 both layouts are the same: bit for bit. */
  if (sbn_tensor_ndim(x) == 2) {
    ck_assert(bitwise_equal(ya, yb));
    ck_assert(bitwise_equal(dxa, dxb));
  }
  sbn_tensor_free(x), sbn_tensor_free(dy), sbn_tensor_free(xt), sbn_tensor_free(dyt);
  sbn_tensor_free(ya), sbn_tensor_free(dxa), sbn_tensor_free(yb), sbn_tensor_free(dxb);
  sbn_tensor_free(ybt), sbn_tensor_free(dxbt);
  sbn_module_free(a);
  sbn_module_free(b);
  ref_free(&r);
}
END_TEST

/* ---- closed-form properties ------------------------------------------------------ */

/* All-ones input in training: y = 0 exactly; with the ReLU every dy is cut,
 * so dx = 0 and dweight = dbias = 0. */
START_TEST(test_all_ones) {
  unsigned flags[] = {CL, RELU, CL | RELU};
  for (size_t f = 0; f < 3; f++) {
    sbn_module *bn = make_layer(1, 5, flags[f], 0);
    size_t shape[4] = {2, 3, 4, 5};
    if (!(flags[f] & CL)) shape[1] = 5, shape[3] = 3;
    sbn_tensor *x, *dy;
    ck_assert_int_eq(sbn_tensor_new(4, shape, &x), SBN_OK);
    ck_assert_int_eq(sbn_tensor_new(4, shape, &dy), SBN_OK);
    sbn_tensor_fill(x, 1.0f);
    sbn_tensor_fill(dy, 0.5f);
    sbn_tensor *y = forward(bn, x), *y2 = forward(bn, x);
    ck_assert(all_zero(y) && all_zero(y2));
    sbn_tensor *dx = backward(bn, dy);
    if (flags[f] & RELU) {
      ck_assert(all_zero(dx));
      ck_assert(all_zero(sbn_tensor_grad(T(bn, "bias"))));
    }
    sbn_tensor_free(x), sbn_tensor_free(dy), sbn_tensor_free(y), sbn_tensor_free(y2);
    sbn_tensor_free(dx);
    sbn_module_free(bn);
  }
}
END_TEST

/* Empty channels-last inputs: empty output, no error, backward too. */
START_TEST(test_empty) {
  size_t shapes[3][3] = {{0, 5, 8}, {2, 0, 8}, {0, 0, 8}};
  for (int k = 0; k < 3; k++) {
    sbn_module *bn = make_layer(1, 8, CL | RELU, 0);
    sbn_tensor *x;
    ck_assert_int_eq(sbn_tensor_new(3, shapes[k], &x), SBN_OK);
    sbn_tensor *y = forward(bn, x), *dx = backward(bn, x);
    ck_assert_uint_eq(sbn_tensor_numel(y), 0);
    ck_assert_uint_eq(sbn_tensor_numel(dx), 0);
    ck_assert(sbn_tensor_cdata(T(bn, "running_var"))[0] == 1.0f);
    sbn_tensor_free(x), sbn_tensor_free(y), sbn_tensor_free(dx);
    sbn_module_free(bn);
  }
}
END_TEST

/* ---- options, errors, repr, conversions ------------------------------------------ */

START_TEST(test_bad_flags) {
  unsigned bad[] = {1u, 8u, 0x80000000u, CL | RELU | 0x10u, CL | 1u};
  sbn_bn_options o;
  for (size_t k = 0; k < sizeof(bad) / sizeof(bad[0]); k++) {
    sbn_module *m = NULL;
    sbn_bn_options_init(&o, 4);
    o.flags = bad[k];
    ck_assert_int_eq(sbn_batchnorm_new(&o, &m), SBN_EINVAL);
    ck_assert_ptr_null(m);
    ck_assert_msg(strstr(sbn_last_error(), "unknown batchnorm flags") != NULL, "%s",
                  sbn_last_error());
    ck_assert_int_eq(sbn_syncbatchnorm_new(&o, &m), SBN_EINVAL);
    ck_assert_ptr_null(m);
  }
  unsigned good[] = {0, CL, RELU, CL | RELU};
  for (size_t k = 0; k < 4; k++) {
    sbn_module *m = make_layer((int)k % 2, 4, good[k], 0);
    sbn_bn_options got;
    ck_assert_int_eq(sbn_bn_get_options(m, &got), SBN_OK);
    ck_assert_uint_eq(got.flags, good[k]);
    sbn_module_free(m);
  }
}
END_TEST

START_TEST(test_wrong_channels) {
  int sync = _i;
  sbn_module *bn = make_layer(sync, 16, CL, 0);
  const char *type = sync ? "SyncBatchNorm" : "BatchNorm";
  char want[200];
  sbn_tensor *x, *y = NULL;
  /* C on axis 1 (an NCHW tensor) is not enough: the last axis counts. */
  size_t s1[4] = {2, 5, 5, 8}, s2[4] = {2, 16, 5, 5}, s3[1] = {16};
  size_t s6[6] = {1, 1, 1, 1, 1, 16};
  ck_assert_int_eq(sbn_tensor_new(4, s1, &x), SBN_OK);
  ck_assert_int_eq(sbn_module_call(bn, x, &y), SBN_ESHAPE);
  ck_assert_ptr_null(y);
  snprintf(want, sizeof(want),
           "%s 'bn' expects 16 channels on the last axis (channels-last), input has shape "
           "(2, 5, 5, 8)",
           type);
  ck_assert_str_eq(sbn_last_error(), want);
  sbn_tensor_free(x);
  ck_assert_int_eq(sbn_tensor_new(4, s2, &x), SBN_OK);
  ck_assert_int_eq(sbn_module_call(bn, x, &y), SBN_ESHAPE);
  ck_assert_msg(strstr(sbn_last_error(), "on the last axis (channels-last), input has shape "
                                         "(2, 16, 5, 5)") != NULL,
                "%s", sbn_last_error());
  sbn_tensor_free(x);
  ck_assert_int_eq(sbn_tensor_new(1, s3, &x), SBN_OK);
  ck_assert_int_eq(sbn_module_call(bn, x, &y), SBN_ESHAPE);
  ck_assert_msg(strstr(sbn_last_error(), "channels-last input, got 1D input of shape (16,)"),
                "%s", sbn_last_error());
  sbn_tensor_free(x);
  if (sbn_tensor_new(6, s6, &x) == SBN_OK) { /* only if tensors of rank 6 exist */
    ck_assert_int_eq(sbn_module_call(bn, x, &y), SBN_ESHAPE);
    sbn_tensor_free(x);
  }
  ck_assert_ptr_null(y);
  /* Nothing changed, and no forward was saved. */
  ck_assert(sbn_tensor_cdata(T(bn, "running_var"))[0] == 1.0f);
  ck_assert(sbn_tensor_cdata(T(bn, "running_mean"))[0] == 0.0f);
  ck_assert_int_eq(sbn_tensor_new(4, s1, &x), SBN_OK);
  ck_assert_int_eq(sbn_module_backward(bn, x, &y), SBN_ESTATE);
  sbn_tensor_free(x);
  /* The NCHW layer still names num_features. */
  sbn_module *plain = make_layer(sync, 16, RELU, 0);
  ck_assert_int_eq(sbn_tensor_new(4, s1, &x), SBN_OK);
  ck_assert_int_eq(sbn_module_call(plain, x, &y), SBN_ESHAPE);
  ck_assert_msg(strstr(sbn_last_error(), "expects 16 channels (num_features), got input of "
                                         "shape (2, 5, 5, 8)"),
                "%s", sbn_last_error());
  /* dy of another shape than the input */
  sbn_tensor *ok, *dy, *dx = NULL;
  size_t good[3] = {2, 3, 16}, other[3] = {3, 2, 16};
  ck_assert_int_eq(sbn_tensor_new(3, good, &ok), SBN_OK);
  ck_assert_int_eq(sbn_tensor_new(3, other, &dy), SBN_OK);
  y = forward(bn, ok);
  ck_assert_int_eq(sbn_module_backward(bn, dy, &dx), SBN_ESHAPE);
  ck_assert_ptr_null(dx);
  sbn_tensor_free(x), sbn_tensor_free(ok), sbn_tensor_free(dy), sbn_tensor_free(y);
  sbn_module_free(plain);
  sbn_module_free(bn);
}
END_TEST

START_TEST(test_repr) {
  static const struct {
    unsigned flags;
    const char *tail;
  } r[] = {{0, ")"},
           {CL, ", channels_last=True)"},
           {RELU, ", fused_relu=True)"},
           {CL | RELU, ", channels_last=True, fused_relu=True)"}};
  for (size_t k = 0; k < 4; k++) {
    sbn_module *m = make_layer(1, 16, r[k].flags, 0);
    char *s, want[160];
    ck_assert_int_eq(sbn_module_repr(m, &s), SBN_OK);
    snprintf(want, sizeof(want),
             "SyncBatchNorm(16, eps=1e-05, momentum=0.9, affine=True, track_running_stats=True%s",
             r[k].tail);
    ck_assert_str_eq(s, want);
    sbn_free(s);
    sbn_module_free(m);
  }
}
END_TEST

/* Conversions keep the flags; state_dict does not depend on them. */
START_TEST(test_convert_and_state_dict) {
  sbn_module *layers[2] = {make_layer(0, 6, CL | RELU, 0), make_layer(0, 6, 0, 0)};
  sbn_module *seq;
  ck_assert_int_eq(sbn_sequential_new(layers, 2, &seq), SBN_OK);
  size_t n = 0;
  ck_assert_int_eq(sbn_convert_sync_batchnorm(seq, NULL, &n), SBN_OK);
  ck_assert_uint_eq(n, 2);
  sbn_bn_options o;
  ck_assert_int_eq(sbn_bn_kind(layers[0]), 1);
  ck_assert_int_eq(sbn_bn_get_options(layers[0], &o), SBN_OK);
  ck_assert_uint_eq(o.flags, CL | RELU);
  ck_assert_int_eq(sbn_revert_sync_batchnorm(seq, &n), SBN_OK);
  ck_assert_int_eq(sbn_bn_kind(layers[0]), 0);
  ck_assert_int_eq(sbn_bn_get_options(layers[0], &o), SBN_OK);
  ck_assert_uint_eq(o.flags, CL | RELU);
  ck_assert_int_eq(sbn_bn_get_options(layers[1], &o), SBN_OK);
  ck_assert_uint_eq(o.flags, 0);
  /* the same keys and shapes for both layers */
  sbn_state_dict sd;
  ck_assert_int_eq(sbn_module_state_dict(seq, NULL, 0, &sd), SBN_OK);
  ck_assert_uint_eq(sd.count, 8);
  static const char *keys[] = {"0.bias", "0.running_mean", "0.running_var", "0.weight",
                               "1.bias", "1.running_mean", "1.running_var", "1.weight"};
  for (size_t k = 0; k < 8; k++) {
    ck_assert_str_eq(sd.keys[k], keys[k]);
    ck_assert_int_eq(sbn_tensor_ndim(sd.values[k]), 1);
    ck_assert_uint_eq(sbn_tensor_dim(sd.values[k], 0), 6);
  }
  /* loads into a model with other flags */
  ck_assert_int_eq(sbn_module_load_state_dict(seq, &sd, 1), SBN_OK);
  sbn_state_dict_release(&sd);
  /* a channels-last layer still works after the round trip */
  size_t shape[3] = {2, 3, 6};
  sbn_tensor *x;
  ck_assert_int_eq(sbn_tensor_new(3, shape, &x), SBN_OK);
  sbn_tensor_fill(x, 2.0f);
  sbn_tensor *y = forward(layers[0], x);
  ck_assert(all_zero(y));
  sbn_tensor_free(x);
  sbn_tensor_free(y);
  sbn_module_free(layers[0]);
  sbn_module_free(layers[1]);
  sbn_module_free(seq);
}
END_TEST

/* ---- kernel dispatch ------------------------------------------------------------ */

/* Not in the API (batchnorm.c): -1 automatic, 0 generic kernels, 1 AVX2,
 * 2 AVX2+FMA, 3 AVX-512; returns the path in use, or -1 when the CPU or the
 * build lacks the one asked for. */
#define N_PATHS 4

/*
 * Spikes of +-2^40 at every period-th value of each channel from first on,
 * of alternating signs (an even number, so they cancel exactly): the double
 * sums of the small values in between then round at 2^-13, differently in
 * every order, and the means (running_mean) and Σdy (the bias' gradient)
 * show it.  Without them, the sums of small floats are mostly exact in
 * double and any order gives the same bits.
 */
static void add_spikes(float *v, const size_t *shape, int nd, size_t C, unsigned flags,
                       size_t period, size_t first) {
  size_t n = 1, S = 1;
  for (int d = 0; d < nd; d++) n *= shape[d];
  for (int d = 2; d < nd; d++) S *= shape[d];
  if (flags & CL) S = 1;
  for (size_t c = 0; c < C; c++) {
    size_t count = 0, last = 0;
    float last_v = 0;
    for (size_t i = 0; i < n; i++) {
      const size_t ch = (flags & CL) ? i % C : (i / S) % C;
      const size_t j = (flags & CL) ? i / C : (i / (S * C)) * S + i % S;
      if (ch != c || j % period != first) continue;
      last = i, last_v = v[i];
      v[i] = count++ % 2 ? -0x1p40f : 0x1p40f;
    }
    if (count % 2) v[last] = last_v;
  }
}

/* One training forward and backward, and an eval forward, on path. */
typedef struct run_out {
  sbn_tensor *y, *dx, *ye, *rm, *rv, *gw, *gb;
} run_out;

static run_out run_path(int path, const size_t *shape, int nd, size_t C, unsigned flags,
                        float mean, int spiky, int signs) {
  ck_assert_int_eq(sbn__bn_kernel_path(path), path);
  sbn_module *m = make_layer(0, C, flags, 0);
  sbn_tensor *x, *dy;
  ck_assert_int_eq(sbn_tensor_new(nd, shape, &x), SBN_OK);
  ck_assert_int_eq(sbn_tensor_new(nd, shape, &dy), SBN_OK);
  uint32_t s = 12345;
  for (size_t i = 0; i < sbn_tensor_numel(x); i++) {
    s = s * 1664525u + 1013904223u;
    sbn_tensor_data(x)[i] = mean + (float)((s >> 8) & 0xffff) / 65536.0f * 3.0f - 1.2f;
    s = s * 1664525u + 1013904223u;
    sbn_tensor_data(dy)[i] = (float)((s >> 8) & 0xffff) / 65536.0f * 2.0f - 1.0f;
  }
  if (spiky) {
    add_spikes(sbn_tensor_data(x), shape, nd, C, flags, 7, 3);
    add_spikes(sbn_tensor_data(dy), shape, nd, C, flags, 5, 2);
  }
  for (size_t c = 0; c < C; c++) {
    sbn_tensor_data(T(m, "weight"))[c] = 0.5f + 0.1f * (float)c;
    /* signs: some negative and zero weights (the ReLU's mask then is not a
     * threshold on x from below, see relu_thresholds in batchnorm.c). */
    if (signs && c % 5 == 1) sbn_tensor_data(T(m, "weight"))[c] *= -1.0f;
    if (signs && c % 7 == 2) sbn_tensor_data(T(m, "weight"))[c] = 0.0f;
    sbn_tensor_data(T(m, "bias"))[c] = 0.25f - 0.05f * (float)c;
  }
  run_out o;
  sbn_module_train(m, 1, 1);
  o.y = forward(m, x);
  o.dx = backward(m, dy);
  sbn_module_eval(m);
  o.ye = forward(m, x);
  o.rm = copy_of(T(m, "running_mean"));
  o.rv = copy_of(T(m, "running_var"));
  o.gw = copy_of(sbn_tensor_grad(T(m, "weight")));
  o.gb = copy_of(sbn_tensor_grad(T(m, "bias")));
  sbn_tensor_free(x);
  sbn_tensor_free(dy);
  sbn_module_free(m);
  ck_assert_int_ge(sbn__bn_kernel_path(-1), 0);
  return o;
}

static void run_free(run_out *o) {
  sbn_tensor *all[] = {o->y, o->dx, o->ye, o->rm, o->rv, o->gw, o->gb};
  for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++) sbn_tensor_free(all[i]);
}

/*
 * The generic, AVX2, AVX2+FMA and AVX-512 kernels give the same bits (a
 * SyncBatchNorm rank computes the same values on any CPU): every layout and
 * family, the fused ReLU, shapes with every kind of tail, small planes and
 * streamed ones, and |mean| >> std; each also with spikes (add_spikes), where
 * any change in the sums' order shows.  Paths the CPU lacks are skipped (on
 * a CPU without AVX2 only the generic one runs, against itself).
 */
START_TEST(test_dispatch_paths_agree) {
  static const struct {
    int nd;
    size_t shape[4];
    size_t C;
    unsigned flags;
    float mean;
    int signs; /* some weights negative or zero (run_path) */
  } k[] = {
      {4, {3, 5, 7, 9}, 5, 0, 0.0f, 0},        /* small planes with tails */
      {4, {3, 5, 7, 9}, 5, RELU, 0.0f, 0},
      {4, {2, 3, 17, 19}, 3, 0, 0.0f, 0},      /* streamed planes (S >= 256) */
      {4, {2, 3, 17, 19}, 3, RELU, 1e4f, 0},
      {3, {4, 6, 300}, 6, 0, 1e4f, 0},
      {2, {37, 19}, 19, 0, 0.0f, 0},           /* S = 1: row kernels */
      {2, {37, 19}, 19, RELU, 0.0f, 0},
      {4, {3, 5, 7, 37}, 37, CL, 0.0f, 0},     /* channels-last, tails of 16/8/4 */
      {4, {3, 5, 7, 37}, 37, CL | RELU, 1e4f, 0},
      {3, {9, 11, 64}, 64, CL, 0.5f, 0},
      {3, {2, 3, 261}, 3, RELU, 0.0f, 0},      /* streamed, 16-value blocks + 4 + 1 */
      {2, {13, 53}, 53, RELU, 0.0f, 0},        /* rows: 16-channel blocks + 4 + 1 */
      {3, {5, 7, 80}, 80, CL, 0.0f, 0},        /* rows of 64 + 16 channels */
      {2, {21, 144}, 144, RELU, 0.0f, 0},      /* 8 rows per sweep */
      /* AVX-512 sums over all rows in one sweep (16-64 channels, from 128
       * rows: ROWS_ALL_MIN), at the edge and around it. */
      {3, {4, 40, 64}, 64, CL | RELU, 1e4f, 0},
      {3, {2, 64, 16}, 16, CL, 0.0f, 0},       /* exactly 128 rows */
      {3, {3, 43, 48}, 48, CL | RELU, 0.0f, 0},
      {2, {127, 32}, 32, RELU, 0.0f, 0},       /* one row short: sweeps of RB */
      {2, {130, 32}, 32, 0, 1e4f, 0},
      /* The statistics over all rows in one sweep (rows_stats_all16, the
       * same edge): 127, 128 and 129 rows of 16, 32, 48 and 64 channels,
       * channels-last and NCHW without spatial size, |mean| 0 and 1e4. */
      {3, {1, 127, 16}, 16, CL, 0.0f, 0},
      {4, {2, 4, 16, 16}, 16, CL | RELU, 1e4f, 0}, /* 128 rows */
      {3, {3, 43, 16}, 16, CL, 0.5f, 0},
      {2, {127, 32}, 32, 0, 1e4f, 0},
      {3, {2, 64, 32}, 32, CL, 0.0f, 0},
      {4, {1, 3, 43, 32}, 32, CL | RELU, 0.0f, 0},
      {3, {1, 127, 48}, 48, CL | RELU, 1e4f, 0},
      {2, {128, 48}, 48, 0, 0.0f, 0},
      {3, {3, 43, 48}, 48, CL, 1e4f, 0},
      {3, {1, 127, 64}, 64, CL, 0.0f, 0},
      {3, {4, 32, 64}, 64, CL | RELU, 0.0f, 0},
      {2, {129, 64}, 64, RELU, 1e4f, 0},
      /* The fused ReLU's mask as a threshold on x (AVX-512 sums, from 256
       * rows: RELU_T_MIN_ROWS): in sweeps of RB rows (144 = 8 + 1 blocks
       * of 16 channels searched together, 200 = 12 blocks + 8), over all
       * rows (48), at the edge and around it; and with negative and zero
       * weights, whose blocks compute v. */
      {2, {256, 144}, 144, RELU, 0.0f, 0},
      {3, {5, 51, 144}, 144, CL | RELU, 1e4f, 0},
      {2, {255, 200}, 200, RELU, 0.5f, 0},
      {4, {2, 3, 43, 200}, 200, CL | RELU, 0.0f, 0},
      {3, {2, 150, 48}, 48, CL | RELU, 0.0f, 0},
      {3, {2, 150, 48}, 48, CL | RELU, 1e4f, 1},
      {2, {300, 144}, 144, RELU, 0.5f, 1},
      /* The same for NCHW planes (plane_relu_thresholds: every channel
       * alone, C % 16 channels in a padded block), from 256 values per
       * channel (N * S): planes with 16-value blocks and 4 + 1 tails, at the
       * edge and around it, small and streamed (S >= 256), 5 to 40 channels
       * (21 = 16 + 5, 37 = 32 + 5, 40 = 32 + 8), some with negative and zero
       * weights (those channels compute v). */
      {4, {2, 21, 8, 16}, 21, RELU, 0.0f, 1},  /* N * S = 256 */
      {4, {1, 21, 15, 17}, 21, RELU, 0.5f, 1}, /* 255 */
      {4, {3, 40, 7, 13}, 40, RELU, 1e4f, 0},  /* 273 */
      {4, {3, 40, 7, 13}, 40, RELU, 0.0f, 1},
      {3, {5, 5, 61}, 5, RELU, 0.0f, 0},       /* 305, fewer than 16 channels */
      {3, {2, 37, 301}, 37, RELU, 0.5f, 1},    /* streamed */
      {3, {1, 19, 261}, 19, RELU, 0.0f, 0},    /* streamed, 261 values */
  };
  int paths[N_PATHS], np = 0;
  for (int p = 0; p < N_PATHS; p++)
    if (sbn__bn_kernel_path(p) == p) paths[np++] = p;
  ck_assert_int_ge(sbn__bn_kernel_path(-1), 0);
  ck_assert_int_ge(np, 1);
  for (size_t t = 0; t < 2 * sizeof(k) / sizeof(k[0]); t++) {
    const size_t i = t / 2;
    const int spiky = (int)(t % 2);
    run_out g =
        run_path(0, k[i].shape, k[i].nd, k[i].C, k[i].flags, k[i].mean, spiky, k[i].signs);
    for (int j = 0; j < np; j++) {
      run_out v = run_path(paths[j], k[i].shape, k[i].nd, k[i].C, k[i].flags, k[i].mean, spiky,
                           k[i].signs);
      const int p = paths[j];
#define SAME(f, what)                                                                              \
  ck_assert_msg(bitwise_equal(g.f, v.f), "case %zu%s path %d: " what " differs", i,              \
                spiky ? " (spikes)" : "", p)
      SAME(y, "y");
      SAME(dx, "dx");
      SAME(ye, "eval y");
      SAME(rm, "running_mean");
      SAME(rv, "running_var");
      SAME(gw, "dweight");
      SAME(gb, "dbias");
#undef SAME
      run_free(&v);
    }
    run_free(&g);
  }
}
END_TEST

/*
 * The fused ReLU's mask at its edge: the AVX-512 sums replace v > 0 by x > T
 * per channel (relu_thresholds and plane_relu_thresholds in batchnorm.c),
 * which must be exact to the last bit of x.  Rows R0..R-1 of each channel
 * (its values in order: rows, or the planes' values one plane after the
 * other) hold consecutive floats around the x where v = ((x - hi) - lo) * a
 * + b changes sign (found by iterating on the batch statistics, which those
 * rows move), so an error of one float in T keeps or drops one dy and Σdy
 * (the bias' gradient) shows it; every path must give the generic one's
 * bits.  In the planes of 25 values (a 16-value block, two 4-value tails and
 * one value) the edge's place in the run moves with the channel (c % 25),
 * so that it falls in every part of a plane.
 */
START_TEST(test_relu_mask_edge) {
  static const struct {
    size_t C, N, S; /* S == 0: channels-last rows (R = N) */
  } cs[] = {
      {48, 600, 0},  /* rows: all rows in one sweep */
      {160, 600, 0}, /* sweeps of RB */
      {40, 24, 25},  /* planes: two blocks of 16 channels and 8 more */
      {21, 2, 301},  /* streamed planes, 16 + 5 channels */
  };
  const size_t C = cs[_i].C, S = cs[_i].S ? cs[_i].S : 1, N = cs[_i].N, R = N * S, R0 = R - 100;
  const size_t shape[3] = {N, C, S};
  const unsigned flags = cs[_i].S ? RELU : CL | RELU;
  /* Channel c's value j: row j, or value j % S of plane j / S. */
#define AT(j, c) (cs[_i].S ? ((j) / S * C + (c)) * S + (j) % S : (j) * C + (c))
  float *x = malloc(R * C * sizeof(float)), *dy = malloc(R * C * sizeof(float));
  ck_assert(x && dy);
  uint32_t s = 777;
  for (size_t i = 0; i < R * C; i++) {
    s = s * 1664525u + 1013904223u;
    x[i] = (float)((s >> 8) & 0xffff) / 65536.0f * 3.0f - 1.0f;
    s = s * 1664525u + 1013904223u;
    dy[i] = (float)((s >> 8) & 0xffff) / 65536.0f * 2.0f - 1.0f;
  }
  float w[160], bias[160];
  for (size_t c = 0; c < C; c++) w[c] = 0.5f + 0.01f * (float)c, bias[c] = -0.3f + 0.004f * (float)c;
  for (int it = 0; it < 40; it++)
    for (size_t c = 0; c < C; c++) {
      double sum = 0, sq = 0;
      for (size_t r = 0; r < R; r++) sum += x[AT(r, c)];
      const double mean = sum / (double)R;
      for (size_t r = 0; r < R; r++) sq += (x[AT(r, c)] - mean) * (x[AT(r, c)] - mean);
      const double edge = mean - (double)bias[c] * sqrt(sq / (double)R + 1e-5) / (double)w[c];
      float v = (float)edge;
      const size_t mid = (R0 + R) / 2 + (cs[_i].S ? c % 25 : 12) - 12;
      for (size_t r = R0; r < mid; r++) v = nextafterf(v, -INFINITY);
      for (size_t r = R0; r < R; r++) x[AT(r, c)] = v, v = nextafterf(v, INFINITY);
    }
  sbn_tensor *out[N_PATHS][4] = {{NULL}};
  for (int p = 0; p < N_PATHS; p++) {
    if (sbn__bn_kernel_path(p) != p) continue;
    sbn_module *m = make_layer(0, C, flags, 0);
    memcpy(sbn_tensor_data(T(m, "weight")), w, C * sizeof(float));
    memcpy(sbn_tensor_data(T(m, "bias")), bias, C * sizeof(float));
    sbn_tensor *xt, *dyt;
    const int nd = cs[_i].S ? 3 : 2;
    const size_t *sh = cs[_i].S ? shape : (const size_t[]){R, C};
    ck_assert_int_eq(sbn_tensor_new(nd, sh, &xt), SBN_OK);
    ck_assert_int_eq(sbn_tensor_new(nd, sh, &dyt), SBN_OK);
    memcpy(sbn_tensor_data(xt), x, R * C * sizeof(float));
    memcpy(sbn_tensor_data(dyt), dy, R * C * sizeof(float));
    sbn_module_train(m, 1, 1);
    out[p][0] = forward(m, xt);
    out[p][1] = backward(m, dyt);
    out[p][2] = copy_of(sbn_tensor_grad(T(m, "weight")));
    out[p][3] = copy_of(sbn_tensor_grad(T(m, "bias")));
    sbn_tensor_free(xt);
    sbn_tensor_free(dyt);
    sbn_module_free(m);
  }
  ck_assert_int_ge(sbn__bn_kernel_path(-1), 0);
  /* The edge is inside the runs: y has zeros and positive values there. */
  for (size_t c = 0; c < C; c++) {
    size_t zeros = 0;
    for (size_t r = R0; r < R; r++) zeros += sbn_tensor_cdata(out[0][0])[AT(r, c)] == 0.0f;
    ck_assert_msg(zeros > 0 && zeros < R - R0, "channel %zu: %zu zeros", c, zeros);
  }
#undef AT
  for (int p = 1; p < N_PATHS; p++)
    for (int k = 0; k < 4 && out[p][0]; k++)
      ck_assert_msg(bitwise_equal(out[0][k], out[p][k]), "C %zu path %d: output %d differs", C,
                    p, k);
  for (int p = 0; p < N_PATHS; p++)
    for (int k = 0; k < 4; k++) sbn_tensor_free(out[p][k]);
  free(x);
  free(dy);
}
END_TEST

/* ---- model check ----------------------------------------------------------------- */

/* The model description carries the flags (only when set, so a plain layer's
 * line is unchanged): ranks that differ in layout or fused ReLU mismatch. */
START_TEST(test_model_check_flags) {
  static const struct {
    unsigned flags;
    const char *tail;
  } r[] = {{0, " 1 1 0\n"},
           {CL, " 1 1 0 channels_last\n"},
           {RELU, " 1 1 0 fused_relu\n"},
           {CL | RELU, " 1 1 0 channels_last fused_relu\n"}};
  char *texts[4];
  for (size_t k = 0; k < 4; k++) {
    sbn_module *m = make_layer(1, 16, r[k].flags, 0);
    size_t len;
    char want[160];
    ck_assert_int_eq(sbn_model_description(m, &texts[k], &len), SBN_OK);
    snprintf(want, sizeof(want), "bn 16 1.0000000000000001e-05 0.90000000000000002%s", r[k].tail);
    ck_assert_str_eq(texts[k], want);
    ck_assert_uint_eq(len, strlen(want));
    ck_assert_int_eq(sbn_check_model(NULL, m), SBN_OK);
    sbn_module_free(m);
  }
  for (size_t a = 0; a < 4; a++)
    for (size_t b = a + 1; b < 4; b++) ck_assert_str_ne(texts[a], texts[b]);
  for (size_t k = 0; k < 4; k++) sbn_free(texts[k]);
}
END_TEST

int main(void) {
  Suite *s = suite_create("bn_layout");
  TCase *tc = tcase_create("reference");
  tcase_add_loop_test(tc, test_train_eval, 0, 2 * NCASES);
  tcase_add_loop_test(tc, test_freeze, 0, 2 * NCASES);
  tcase_add_loop_test(tc, test_matches_nchw_path, 0, NCASES);
  tcase_add_test(tc, test_all_ones);
  tcase_add_test(tc, test_empty);
  suite_add_tcase(s, tc);
  TCase *to = tcase_create("options");
  tcase_add_test(to, test_bad_flags);
  tcase_add_loop_test(to, test_wrong_channels, 0, 2);
  tcase_add_test(to, test_repr);
  tcase_add_test(to, test_convert_and_state_dict);
  tcase_add_test(to, test_dispatch_paths_agree);
  tcase_add_loop_test(to, test_relu_mask_edge, 0, 4);
  tcase_add_test(to, test_model_check_flags);
  suite_add_tcase(s, to);
  return run_suite(s);
}
