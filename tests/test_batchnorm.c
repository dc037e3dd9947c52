/*
 * test_batchnorm.c - BatchNorm and SyncBatchNorm (local group) against the
 * PyTorch float64 references of tests/data/gen_reference.py (format in its
 * header), plus the closed-form and bitwise properties of the spec, §6.
 */
#include <check.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coord_proc.h"
#include "refdata.h"
#include "sbn/sbn.h"

/* ---- reference files ---------------------------------------------------------- */

/* |got - ref| <= 5e-6 + 5e-6*|ref| elementwise (the spec's tolerance). */
static void assert_close(const float *got, const float *ref, size_t n, const char *what) {
  double worst = 0;
  size_t at = 0;
  for (size_t i = 0; i < n; i++) {
    double err = fabs((double)got[i] - ref[i]) - (5e-6 + 5e-6 * fabs(ref[i]));
    if (isnan(got[i])) err = INFINITY;
    if (i == 0 || err > worst) worst = err, at = i;
  }
  ck_assert_msg(n == 0 || worst <= 0, "%s: element %zu is %.9g, reference %.9g", what, at,
                (double)got[at], (double)ref[at]);
}

static void assert_close_ref(const sbn_tensor *t, const ref_file *r, const char *name,
                             const char *what) {
  const ref_array *a = ref_get(r, name);
  ck_assert_uint_eq(sbn_tensor_numel(t), a->numel);
  assert_close(sbn_tensor_cdata(t), a->data, a->numel, what);
}

static int bitwise_equal(const sbn_tensor *a, const sbn_tensor *b) {
  return sbn_tensor_same_shape(a, b) &&
         memcmp(sbn_tensor_cdata(a), sbn_tensor_cdata(b), sbn_tensor_numel(a) * sizeof(float)) == 0;
}

/* ---- helpers ------------------------------------------------------------------ */

static sbn_module *make_bn(int sync, size_t C, int affine, int track, int freeze) {
  sbn_bn_options o;
  sbn_bn_options_init(&o, C);
  o.affine = affine;
  o.track_running_stats = track;
  o.freeze = freeze;
  sbn_module *m = NULL;
  int rc = sync ? sbn_syncbatchnorm_new(&o, &m) : sbn_batchnorm_new(&o, &m);
  ck_assert_msg(rc == SBN_OK, "%s", sbn_last_error());
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
  return dx;
}

static sbn_tensor *copy_of(const sbn_tensor *t) {
  sbn_tensor *c;
  ck_assert_int_eq(sbn_tensor_clone(t, &c), SBN_OK);
  return c;
}

/* Deterministic N(mu, 1) floats (Box-Muller on a fixed LCG). */
static uint64_t lcg_state = 12345;
static double uniform01(void) {
  lcg_state = lcg_state * 6364136223846793005ULL + 1442695040888963407ULL;
  return ((double)(lcg_state >> 11) + 0.5) / 9007199254740992.0;
}
static sbn_tensor *random_tensor(int ndim, const size_t *shape, double mu) {
  sbn_tensor *t;
  ck_assert_int_eq(sbn_tensor_new(ndim, shape, &t), SBN_OK);
  float *p = sbn_tensor_data(t);
  for (size_t i = 0; i < sbn_tensor_numel(t); i++)
    p[i] = (float)(mu + sqrt(-2 * log(uniform01())) * cos(6.283185307179586 * uniform01()));
  return t;
}

/* ---- §6: training steps then eval ----------------------------------------------- */

static void run_train_case(const char *file, int sync) {
  ref_file r = ref_load(file);
  sbn_module *bn = make_bn(sync, 8, 1, 1, 0);
  char key[16], what[64];
  for (int i = 0; i < 3; i++) {
    snprintf(key, sizeof(key), "x%d", i);
    sbn_tensor *x = ref_tensor(&r, key), *y = forward(bn, x);
    snprintf(key, sizeof(key), "y%d", i);
    snprintf(what, sizeof(what), "%s step %d output", file, i);
    assert_close_ref(y, &r, key, what);
    snprintf(key, sizeof(key), "rm%d", i);
    snprintf(what, sizeof(what), "%s step %d running_mean", file, i);
    assert_close_ref(T(bn, "running_mean"), &r, key, what);
    snprintf(key, sizeof(key), "rv%d", i);
    snprintf(what, sizeof(what), "%s step %d running_var", file, i);
    assert_close_ref(T(bn, "running_var"), &r, key, what);
    sbn_tensor_free(x);
    sbn_tensor_free(y);
  }
  ck_assert_int_eq(sbn_module_eval(bn), SBN_OK);
  sbn_tensor *rm = copy_of(T(bn, "running_mean")), *rv = copy_of(T(bn, "running_var"));
  sbn_tensor *x = ref_tensor(&r, "x3"), *y1 = forward(bn, x), *y2 = forward(bn, x);
  ck_assert_msg(bitwise_equal(y1, y2), "two eval calls differ");
  ck_assert(bitwise_equal(rm, T(bn, "running_mean")));
  ck_assert(bitwise_equal(rv, T(bn, "running_var")));
  snprintf(what, sizeof(what), "%s eval output", file);
  assert_close_ref(y1, &r, "y3", what);
  sbn_tensor_free(x);
  sbn_tensor_free(y1);
  sbn_tensor_free(y2);
  sbn_tensor_free(rm);
  sbn_tensor_free(rv);
  sbn_module_free(bn);
  ref_free(&r);
}

START_TEST(test_train_3d) { run_train_case("train_3d.bin", _i); }
END_TEST

START_TEST(test_train_4d) { run_train_case("train_4d.bin", _i); }
END_TEST

static void run_nostats_case(const char *file, const char *xfile, int sync) {
  ref_file r = ref_load(file), rx = ref_load(xfile);
  sbn_module *bn = make_bn(sync, 8, 1, 0, 0);
  sbn_named_list l = {0};
  ck_assert_int_eq(sbn_module_buffers(bn, 1, &l), SBN_OK);
  ck_assert_uint_eq(l.count, 0); /* no running stats at all */
  sbn_named_list_release(&l);
  char key[16], what[64];
  for (int i = 0; i < 4; i++) {
    if (i == 2) sbn_module_eval(bn);
    snprintf(key, sizeof(key), "x%d", i);
    sbn_tensor *x = ref_tensor(&rx, key), *y = forward(bn, x);
    snprintf(key, sizeof(key), "y%d", i);
    snprintf(what, sizeof(what), "%s iteration %d (%s)", file, i, i < 2 ? "train" : "eval");
    assert_close_ref(y, &r, key, what);
    sbn_tensor_free(x);
    sbn_tensor_free(y);
  }
  sbn_module_free(bn);
  ref_free(&r);
  ref_free(&rx);
}

START_TEST(test_nostats_3d) { run_nostats_case("nostats_3d.bin", "nostats_3d.bin", _i); }
END_TEST

START_TEST(test_nostats_4d) { run_nostats_case("nostats_4d.bin", "train_4d.bin", _i); }
END_TEST

/* ---- one step with weight/bias, forward and backward ----------------------------- */

static void run_step_case(const char *file, int sync) {
  ref_file r = ref_load(file);
  const ref_array *x0 = ref_get(&r, "x");
  size_t C = x0->shape[1];
  sbn_module *bn = make_bn(sync, C, 1, 1, 0);
  set_from_ref(bn, "weight", &r, "weight");
  set_from_ref(bn, "bias", &r, "bias");
  char what[96];
  sbn_tensor *x = ref_tensor(&r, "x"), *dy = ref_tensor(&r, "dy");
  sbn_tensor *y = forward(bn, x), *dx = backward(bn, dy);
  snprintf(what, sizeof(what), "%s output", file);
  assert_close_ref(y, &r, "y", what);
  snprintf(what, sizeof(what), "%s dx", file);
  assert_close_ref(dx, &r, "dx", what);
  snprintf(what, sizeof(what), "%s dweight", file);
  assert_close_ref(sbn_tensor_grad(T(bn, "weight")), &r, "dweight", what);
  snprintf(what, sizeof(what), "%s dbias", file);
  assert_close_ref(sbn_tensor_grad(T(bn, "bias")), &r, "dbias", what);
  snprintf(what, sizeof(what), "%s running_mean", file);
  assert_close_ref(T(bn, "running_mean"), &r, "rm", what);
  snprintf(what, sizeof(what), "%s running_var", file);
  assert_close_ref(T(bn, "running_var"), &r, "rv", what);
  /* A second backward accumulates: gradients double. */
  sbn_tensor *g1 = copy_of(sbn_tensor_grad(T(bn, "weight")));
  sbn_tensor *dx2 = backward(bn, dy);
  ck_assert(bitwise_equal(dx, dx2));
  for (size_t c = 0; c < C; c++)
    ck_assert_float_eq_tol(sbn_tensor_cdata(sbn_tensor_grad(T(bn, "weight")))[c],
                           2 * sbn_tensor_cdata(g1)[c], 1e-5 * (1 + fabs(sbn_tensor_cdata(g1)[c])));
  sbn_tensor_free(g1);
  sbn_tensor_free(dx2);
  sbn_tensor_free(x);
  sbn_tensor_free(dy);
  sbn_tensor_free(y);
  sbn_tensor_free(dx);
  sbn_module_free(bn);
  ref_free(&r);
}

START_TEST(test_step_2d) { run_step_case("step_2d.bin", _i); }
END_TEST
START_TEST(test_step_3d) { run_step_case("step_3d.bin", _i); }
END_TEST
START_TEST(test_step_4d) { run_step_case("step_4d.bin", _i); }
END_TEST
START_TEST(test_step_5d) { run_step_case("step_5d.bin", _i); }
END_TEST
START_TEST(test_step_dist_batch) { run_step_case("dist_3x8x4x16.bin", _i); }
END_TEST

/* |mean| = 1e4, std = 1: the fused x*a + (b - mean*a) would be ~1e-3 off. */
START_TEST(test_big_mean_precision) { run_step_case("bigmean.bin", _i); }
END_TEST

START_TEST(test_eval_backward) {
  ref_file r = ref_load("eval_4d.bin");
  sbn_module *bn = make_bn(_i, 8, 1, 1, 0);
  set_from_ref(bn, "weight", &r, "weight");
  set_from_ref(bn, "bias", &r, "bias");
  set_from_ref(bn, "running_mean", &r, "rm");
  set_from_ref(bn, "running_var", &r, "rv");
  sbn_module_eval(bn);
  sbn_tensor *x = ref_tensor(&r, "x"), *dy = ref_tensor(&r, "dy");
  sbn_tensor *y = forward(bn, x), *dx = backward(bn, dy);
  assert_close_ref(y, &r, "y", "eval output");
  assert_close_ref(dx, &r, "dx", "eval dx");
  assert_close_ref(sbn_tensor_grad(T(bn, "weight")), &r, "dweight", "eval dweight");
  assert_close_ref(sbn_tensor_grad(T(bn, "bias")), &r, "dbias", "eval dbias");
  assert_close_ref(T(bn, "running_mean"), &r, "rm", "eval running_mean unchanged");
  sbn_tensor_free(x);
  sbn_tensor_free(dy);
  sbn_tensor_free(y);
  sbn_tensor_free(dx);
  sbn_module_free(bn);
  ref_free(&r);
}
END_TEST

/* ---- closed-form and bitwise properties ------------------------------------------ */

START_TEST(test_all_ones_twice_is_zero) {
  size_t shape[4] = {1, 1, 32, 32};
  sbn_module *bn = make_bn(_i, 1, 1, 1, 0);
  sbn_tensor *x;
  ck_assert_int_eq(sbn_tensor_new(4, shape, &x), SBN_OK);
  sbn_tensor_fill(x, 1.0f);
  for (int k = 0; k < 2; k++) {
    sbn_tensor *y = forward(bn, x);
    for (size_t i = 0; i < 1024; i++) ck_assert(sbn_tensor_cdata(y)[i] == 0.0f);
    sbn_tensor_free(y);
  }
  /* running_mean moved towards 1, running_var towards 0 (unbiased var 0). */
  ck_assert_float_eq_tol(sbn_tensor_cdata(T(bn, "running_mean"))[0], 0.19f, 1e-6);
  ck_assert_float_eq_tol(sbn_tensor_cdata(T(bn, "running_var"))[0], 0.81f, 1e-6);
  sbn_tensor_free(x);
  sbn_module_free(bn);
}
END_TEST

/* MegEngine's test_frozen_bn, train and eval: SGD(lr=1) on mean(bn(d)). */
START_TEST(test_freeze_keeps_everything) {
  int training = _i & 1, affine = !(_i & 2), sync = (_i & 4) != 0;
  ref_file r = ref_load("freeze.bin");
  sbn_module *bn = make_bn(sync, 3, affine, 1, 1);
  sbn_tensor_fill(T(bn, "running_mean"), 1.0f);
  sbn_tensor_fill(T(bn, "running_var"), 4.0f);
  sbn_module_train(bn, training, 1);
  sbn_tensor *d = ref_tensor(&r, "d");
  sbn_tensor *before = NULL, *rm0 = copy_of(T(bn, "running_mean")),
             *rv0 = copy_of(T(bn, "running_var"));
  sbn_named_list params = {0};
  ck_assert_int_eq(sbn_module_parameters(bn, 1, &params), SBN_OK);
  ck_assert_uint_eq(params.count, affine ? 2 : 0);
  sbn_state_dict sd0;
  ck_assert_int_eq(sbn_module_state_dict(bn, NULL, 0, &sd0), SBN_OK);
  size_t n = sbn_tensor_numel(d);
  for (int step = 0; step < 9; step++) {
    sbn_module_zero_grad(bn);
    sbn_tensor *y = forward(bn, d);
    double loss = 0;
    for (size_t i = 0; i < n; i++) loss += sbn_tensor_cdata(y)[i];
    loss /= (double)n;
    double expect = 0;
    const ref_array *yr = ref_get(&r, "y");
    for (size_t i = 0; i < n; i++) expect += yr->data[i];
    expect /= (double)n;
    ck_assert_double_eq_tol(loss, expect, 1e-5);
    assert_close_ref(y, &r, "y", "frozen output");
    sbn_tensor *dy, *dx;
    ck_assert_int_eq(sbn_tensor_new(sbn_tensor_ndim(d), sbn_tensor_shape(d), &dy), SBN_OK);
    sbn_tensor_fill(dy, (float)(1.0 / (double)n));
    dx = backward(bn, dy);
    /* dx = dy * w / sqrt(rv + eps) = dy / 2. */
    ck_assert_float_eq_tol(sbn_tensor_cdata(dx)[0], (float)(1.0 / n / sqrt(4 + 1e-5)), 1e-9);
    for (size_t p = 0; p < params.count; p++) {
      sbn_tensor *w = params.items[p], *g = sbn_tensor_grad(w);
      for (size_t c = 0; c < sbn_tensor_numel(w); c++)
        sbn_tensor_data(w)[c] -= 1.0f * sbn_tensor_cdata(g)[c];
    }
    sbn_tensor_free(y);
    sbn_tensor_free(dy);
    sbn_tensor_free(dx);
  }
  sbn_state_dict sd1;
  ck_assert_int_eq(sbn_module_state_dict(bn, NULL, 0, &sd1), SBN_OK);
  ck_assert_uint_eq(sd0.count, sd1.count);
  for (size_t i = 0; i < sd0.count; i++)
    ck_assert_msg(bitwise_equal(sd0.values[i], sd1.values[i]), "'%s' changed", sd0.keys[i]);
  ck_assert(bitwise_equal(rm0, T(bn, "running_mean")));
  ck_assert(bitwise_equal(rv0, T(bn, "running_var")));
  sbn_state_dict_release(&sd0);
  sbn_state_dict_release(&sd1);
  sbn_named_list_release(&params);
  sbn_tensor_free(before);
  sbn_tensor_free(rm0);
  sbn_tensor_free(rv0);
  sbn_tensor_free(d);
  sbn_module_free(bn);
  ref_free(&r);
}
END_TEST

/* SyncBatchNorm with a NULL group is plain BatchNorm, bit for bit. */
START_TEST(test_sync_local_equals_plain) {
  static const size_t shapes[4][5] = {{16, 8}, {3, 8, 4}, {3, 8, 16, 16}, {2, 8, 3, 4, 2}};
  int nd = _i + 2;
  sbn_module *bn = make_bn(0, 8, 1, _i != 1, 0), *sbn = make_bn(1, 8, 1, _i != 1, 0);
  ck_assert_int_eq(sbn_bn_kind(bn), 0);
  ck_assert_int_eq(sbn_bn_kind(sbn), 1);
  for (int it = 0; it < 4; it++) {
    if (it == 2) {
      sbn_module_eval(bn);
      sbn_module_eval(sbn);
    }
    sbn_tensor *x = random_tensor(nd, shapes[_i], 2.3), *dy = random_tensor(nd, shapes[_i], 0);
    sbn_tensor *y1 = forward(bn, x), *y2 = forward(sbn, x);
    sbn_tensor *d1 = backward(bn, dy), *d2 = backward(sbn, dy);
    ck_assert_msg(bitwise_equal(y1, y2), "outputs differ at iteration %d", it);
    ck_assert_msg(bitwise_equal(d1, d2), "dx differs at iteration %d", it);
    ck_assert(bitwise_equal(sbn_tensor_grad(T(bn, "weight")), sbn_tensor_grad(T(sbn, "weight"))));
    ck_assert(bitwise_equal(sbn_tensor_grad(T(bn, "bias")), sbn_tensor_grad(T(sbn, "bias"))));
    sbn_tensor_free(x);
    sbn_tensor_free(dy);
    sbn_tensor_free(y1);
    sbn_tensor_free(y2);
    sbn_tensor_free(d1);
    sbn_tensor_free(d2);
  }
  if (_i != 1) {
    ck_assert(bitwise_equal(T(bn, "running_mean"), T(sbn, "running_mean")));
    ck_assert(bitwise_equal(T(bn, "running_var"), T(sbn, "running_var")));
  }
  sbn_module_free(bn);
  sbn_module_free(sbn);
}
END_TEST

START_TEST(test_empty_input) {
  size_t s3[3] = {0, 4, 0}, s4[4] = {0, 4, 0, 0}, s2[2] = {0, 4}, s4b[4] = {2, 4, 0, 3};
  const size_t *shapes[4] = {s3, s4, s2, s4b};
  int nds[4] = {3, 4, 2, 4};
  for (int k = 0; k < 4; k++) {
    sbn_module *bn = make_bn(_i, 4, 1, 1, 0);
    sbn_tensor *x, *y, *dx;
    ck_assert_int_eq(sbn_tensor_new(nds[k], shapes[k], &x), SBN_OK);
    y = forward(bn, x);
    ck_assert_uint_eq(sbn_tensor_numel(y), 0);
    for (int c = 0; c < 4; c++) {
      ck_assert(sbn_tensor_cdata(T(bn, "running_mean"))[c] == 0.0f);
      ck_assert(sbn_tensor_cdata(T(bn, "running_var"))[c] == 1.0f);
    }
    dx = backward(bn, y);
    ck_assert(sbn_tensor_same_shape(dx, x));
    ck_assert(sbn_tensor_cdata(sbn_tensor_grad(T(bn, "weight")))[0] == 0.0f);
    sbn_tensor_free(x);
    sbn_tensor_free(y);
    sbn_tensor_free(dx);
    sbn_module_free(bn);
  }
}
END_TEST

/* n = 1: the unbiased variance is undefined; running_var is kept, never inf. */
START_TEST(test_single_value_per_channel) {
  size_t shape[2] = {1, 4};
  float v[4] = {1, 2, 3, 4};
  sbn_module *bn = make_bn(_i, 4, 1, 1, 0);
  sbn_tensor *x, *y;
  ck_assert_int_eq(sbn_tensor_from_data(2, shape, v, &x), SBN_OK);
  y = forward(bn, x);
  for (int c = 0; c < 4; c++) {
    ck_assert(sbn_tensor_cdata(y)[c] == 0.0f);
    ck_assert(isfinite(sbn_tensor_cdata(T(bn, "running_var"))[c]));
    ck_assert(sbn_tensor_cdata(T(bn, "running_var"))[c] == 1.0f);
    ck_assert_float_eq_tol(sbn_tensor_cdata(T(bn, "running_mean"))[c], 0.1f * v[c], 1e-6);
  }
  sbn_tensor_free(y);
  sbn_tensor_free(x);
  sbn_module_free(bn);
}
END_TEST

START_TEST(test_bad_input_shapes) {
  sbn_module *bn = make_bn(_i, 8, 1, 1, 0);
  size_t s1[1] = {8}, s3[3] = {3, 4, 2}, s5[5] = {1, 8, 1, 1, 2};
  sbn_tensor *x, *y = NULL;
  ck_assert_int_eq(sbn_tensor_new(1, s1, &x), SBN_OK);
  ck_assert_int_eq(sbn_module_call(bn, x, &y), SBN_ESHAPE);
  ck_assert_ptr_null(y);
  ck_assert_msg(strstr(sbn_last_error(), "got 1D input of shape (8,)") != NULL, "%s",
                sbn_last_error());
  sbn_tensor_free(x);
  ck_assert_int_eq(sbn_tensor_new(3, s3, &x), SBN_OK);
  ck_assert_int_eq(sbn_module_call(bn, x, &y), SBN_ESHAPE);
  ck_assert_msg(strstr(sbn_last_error(), "expects 8 channels (num_features), got input of shape "
                                         "(3, 4, 2)") != NULL,
                "%s", sbn_last_error());
  ck_assert_ptr_null(y);
  sbn_tensor_free(x);
  /* Nothing changed by the failures. */
  ck_assert(sbn_tensor_cdata(T(bn, "running_var"))[0] == 1.0f);
  /* Backward before any forward, then with the wrong dy. */
  ck_assert_int_eq(sbn_tensor_new(5, s5, &x), SBN_OK);
  ck_assert_int_eq(sbn_module_backward(bn, x, &y), SBN_ESTATE);
  ck_assert_ptr_nonnull(strstr(sbn_last_error(), "before any forward"));
  y = forward(bn, x);
  sbn_tensor *dy, *dx = NULL;
  ck_assert_int_eq(sbn_tensor_new(3, s3, &dy), SBN_OK);
  ck_assert_int_eq(sbn_module_backward(bn, dy, &dx), SBN_ESHAPE);
  ck_assert_ptr_null(dx);
  ck_assert_msg(strstr(sbn_last_error(), "dy of shape (3, 4, 2) for an input of shape "
                                         "(1, 8, 1, 1, 2)") != NULL,
                "%s", sbn_last_error());
  sbn_tensor_free(dy);
  sbn_tensor_free(y);
  sbn_tensor_free(x);
  sbn_module_free(bn);
}
END_TEST

START_TEST(test_bad_options) {
  sbn_bn_options o;
  sbn_module *m = NULL;
  sbn_bn_options_init(&o, 4);
  o.freeze = 1;
  o.track_running_stats = 0;
  ck_assert_int_eq(sbn_syncbatchnorm_new(&o, &m), SBN_EINVAL);
  ck_assert_ptr_nonnull(strstr(sbn_last_error(), "freeze needs track_running_stats"));
  ck_assert_int_eq(sbn_batchnorm_new(&o, &m), SBN_EINVAL);
  ck_assert_ptr_null(m);
  sbn_bn_options_init(&o, 0);
  ck_assert_int_eq(sbn_batchnorm_new(&o, &m), SBN_EINVAL);
  sbn_bn_options_init(&o, 4);
  o.eps = -1;
  ck_assert_int_eq(sbn_batchnorm_new(&o, &m), SBN_EINVAL);
  ck_assert_str_eq(sbn_last_error(), "eps -1.0 is not a finite value >= 0");
  sbn_bn_options_init(&o, 4);
  o.momentum = NAN;
  ck_assert_int_eq(sbn_batchnorm_new(&o, &m), SBN_EINVAL);
  sbn_bn_options_init(&o, 4);
  o.flags = 1;
  ck_assert_int_eq(sbn_batchnorm_new(&o, &m), SBN_EINVAL);
  sbn_bn_options_init(&o, 4);
  o.name = "has space";
  ck_assert_int_eq(sbn_batchnorm_new(&o, &m), SBN_EINVAL);
  ck_assert_int_eq(sbn_batchnorm_new(NULL, &m), SBN_EINVAL);
  ck_assert_ptr_null(m);
  /* freeze can be switched later only when tracking. */
  m = make_bn(1, 4, 1, 0, 0);
  ck_assert_int_eq(sbn_bn_set_freeze(m, 1), SBN_EINVAL);
  sbn_module_free(m);
}
END_TEST

START_TEST(test_repr) {
  sbn_module *m = make_bn(1, 16, 1, 1, 0);
  char *s;
  ck_assert_int_eq(sbn_module_repr(m, &s), SBN_OK);
  ck_assert_str_eq(s, "SyncBatchNorm(16, eps=1e-05, momentum=0.9, affine=True, "
                      "track_running_stats=True)");
  sbn_free(s);
  sbn_module_free(m);
  sbn_bn_options o;
  sbn_bn_options_init(&o, 3);
  o.eps = 0.001;
  o.momentum = 0.1;
  o.affine = 0;
  o.track_running_stats = 0;
  ck_assert_int_eq(sbn_batchnorm_new(&o, &m), SBN_OK);
  ck_assert_int_eq(sbn_module_repr(m, &s), SBN_OK);
  ck_assert_str_eq(s, "BatchNorm(3, eps=0.001, momentum=0.1, affine=False, "
                      "track_running_stats=False)");
  sbn_free(s);
  sbn_module_free(m);
  /* Python's float repr at the edges. */
  static const struct {
    double v;
    const char *s;
  } cases[] = {{1e-6, "1e-06"}, {1.5e-7, "1.5e-07"}, {0.0001, "0.0001"}, {1.0, "1.0"},
               {0.0, "0.0"},    {1e16, "1e+16"},     {123.25, "123.25"}, {1e-5 * 3, "3.0000000000000004e-05"}};
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    sbn_bn_options_init(&o, 1);
    o.eps = cases[i].v;
    ck_assert_int_eq(sbn_batchnorm_new(&o, &m), SBN_OK);
    ck_assert_int_eq(sbn_module_repr(m, &s), SBN_OK);
    char want[128];
    snprintf(want, sizeof(want), "BatchNorm(1, eps=%s, momentum=0.9, affine=True, "
             "track_running_stats=True)", cases[i].s);
    ck_assert_str_eq(s, want);
    sbn_free(s);
    sbn_module_free(m);
  }
}
END_TEST

/* ---- identities and model description -------------------------------------------- */

START_TEST(test_layer_names) {
  sbn_module *a = make_bn(1, 4, 1, 1, 0), *b = make_bn(1, 4, 1, 1, 0);
  const char *na = sbn_bn_layer_name(a), *nb = sbn_bn_layer_name(b);
  unsigned long ka, kb;
  ck_assert_int_eq(sscanf(na, "SyncBatchNorm#%lu", &ka), 1);
  ck_assert_int_eq(sscanf(nb, "SyncBatchNorm#%lu", &kb), 1);
  ck_assert_uint_eq(kb, ka + 1);
  sbn_bn_options o;
  sbn_bn_options_init(&o, 4);
  o.name = "stem.bn";
  sbn_module *c;
  ck_assert_int_eq(sbn_syncbatchnorm_new(&o, &c), SBN_OK);
  sbn_module *layers[3] = {a, b, c}, *seq, *root;
  ck_assert_int_eq(sbn_sequential_new(layers, 3, &seq), SBN_OK);
  ck_assert_int_eq(sbn_sequential_new(&seq, 1, &root), SBN_OK);
  ck_assert_int_eq(sbn_module_name_layers(root, "net"), SBN_OK);
  ck_assert_str_eq(sbn_bn_layer_name(a), "net.0.0");
  ck_assert_int_eq(sbn_module_name_layers(root, NULL), SBN_OK);
  ck_assert_str_eq(sbn_bn_layer_name(a), "0.0");
  ck_assert_str_eq(sbn_bn_layer_name(b), "0.1");
  /* A root layer is named only with a prefix. */
  ck_assert_int_eq(sbn_module_name_layers(a, NULL), SBN_OK);
  ck_assert_str_eq(sbn_bn_layer_name(a), "0.0");
  ck_assert_int_eq(sbn_module_name_layers(a, "solo"), SBN_OK);
  ck_assert_str_eq(sbn_bn_layer_name(a), "solo");
  ck_assert_int_eq(sbn_module_name_layers(root, "bad prefix"), SBN_EINVAL);
  ck_assert_str_eq(sbn_bn_layer_name(a), "solo"); /* nothing renamed */
  ck_assert_int_eq(sbn_module_name_layers(root, NULL), SBN_OK);
  ck_assert_str_eq(sbn_bn_layer_name(c), "stem.bn"); /* the user's name wins */
  char *text;
  size_t len;
  ck_assert_int_eq(sbn_model_description(root, &text, &len), SBN_OK);
  ck_assert_str_eq(text, "0.0 4 1.0000000000000001e-05 0.90000000000000002 1 1 0\n"
                         "0.1 4 1.0000000000000001e-05 0.90000000000000002 1 1 0\n"
                         "stem.bn 4 1.0000000000000001e-05 0.90000000000000002 1 1 0\n");
  ck_assert_uint_eq(len, strlen(text));
  sbn_free(text);
  ck_assert_int_eq(sbn_check_model(NULL, root), SBN_OK);
  ck_assert_ptr_null(sbn_bn_layer_name(root));
  sbn_module_free(root);
  sbn_module_free(seq);
  sbn_module_free(a);
  sbn_module_free(b);
  sbn_module_free(c);
}
END_TEST

/* reset_parameters / reset_running_stats refill the initial values. */
START_TEST(test_reset) {
  sbn_module *bn = make_bn(1, 4, 1, 1, 0);
  const char *names[4] = {"weight", "bias", "running_mean", "running_var"};
  for (int i = 0; i < 4; i++) sbn_tensor_fill(T(bn, names[i]), 7.0f);
  ck_assert_int_eq(sbn_module_reset_running_stats(bn), SBN_OK);
  ck_assert(sbn_tensor_cdata(T(bn, "running_mean"))[3] == 0.0f);
  ck_assert(sbn_tensor_cdata(T(bn, "running_var"))[3] == 1.0f);
  ck_assert(sbn_tensor_cdata(T(bn, "weight"))[3] == 7.0f);
  ck_assert_int_eq(sbn_module_reset_parameters(bn), SBN_OK);
  ck_assert(sbn_tensor_cdata(T(bn, "weight"))[3] == 1.0f);
  ck_assert(sbn_tensor_cdata(T(bn, "bias"))[3] == 0.0f);
  sbn_module_free(bn);
}
END_TEST

/* A failed round (the other rank never comes) returns the transport's error
 * and leaves the layer exactly as it was. */
START_TEST(test_failed_round_changes_nothing) {
  static const char *const args[] = {"--round-timeout", "300", NULL};
  coord_proc coord;
  ck_assert_int_eq(coord_start(&coord, args), 0);
  sbn_config cfg;
  sbn_config_init(&cfg);
  cfg.coordinator = coord.addr;
  cfg.job = "test_batchnorm_failed_round";
  cfg.rank = 0;
  cfg.world_size = 2;
  cfg.timeout_ms = 5000;
  sbn_ctx *ctx = NULL;
  ck_assert_msg(sbn_init(&cfg, &ctx) == SBN_OK, "%s", sbn_last_error());
  sbn_bn_options o;
  sbn_bn_options_init(&o, 8);
  o.group = sbn_world(ctx);
  o.name = "lonely";
  sbn_module *bn;
  ck_assert_int_eq(sbn_syncbatchnorm_new(&o, &bn), SBN_OK);
  sbn_tensor_fill(T(bn, "running_mean"), 0.5f);
  sbn_state_dict before;
  ck_assert_int_eq(sbn_module_state_dict(bn, NULL, 0, &before), SBN_OK);
  size_t shape[3] = {3, 8, 4};
  sbn_tensor *x = random_tensor(3, shape, 2.3), *y = NULL;
  int rc = sbn_module_call(bn, x, &y);
  ck_assert_int_ne(rc, SBN_OK);
  ck_assert_ptr_null(y);
  ck_assert_msg(strlen(sbn_last_error()) > 0, "no message for status %d", rc);
  /* Nothing changed, and no state was saved for a backward. */
  sbn_state_dict after;
  ck_assert_int_eq(sbn_module_state_dict(bn, NULL, 0, &after), SBN_OK);
  for (size_t i = 0; i < before.count; i++)
    ck_assert_msg(bitwise_equal(before.values[i], after.values[i]), "'%s' changed",
                  before.keys[i]);
  ck_assert_int_eq(sbn_module_backward(bn, x, &y), SBN_ESTATE);
  /* Eval with running stats needs no round and works. */
  sbn_module_eval(bn);
  y = forward(bn, x);
  sbn_tensor_free(y);
  sbn_state_dict_release(&before);
  sbn_state_dict_release(&after);
  sbn_tensor_free(x);
  sbn_module_free(bn);
  sbn_finalize(ctx);
  coord_stop(&coord, SIGTERM, 5000);
}
END_TEST

int main(void) {
  Suite *s = suite_create("batchnorm");
  TCase *tc = tcase_create("reference");
  /* _i = 0: BatchNorm, 1: SyncBatchNorm with a NULL group. */
  tcase_add_loop_test(tc, test_train_3d, 0, 2);
  tcase_add_loop_test(tc, test_train_4d, 0, 2);
  tcase_add_loop_test(tc, test_nostats_3d, 0, 2);
  tcase_add_loop_test(tc, test_nostats_4d, 0, 2);
  tcase_add_loop_test(tc, test_step_2d, 0, 2);
  tcase_add_loop_test(tc, test_step_3d, 0, 2);
  tcase_add_loop_test(tc, test_step_4d, 0, 2);
  tcase_add_loop_test(tc, test_step_5d, 0, 2);
  tcase_add_loop_test(tc, test_step_dist_batch, 0, 2);
  tcase_add_loop_test(tc, test_big_mean_precision, 0, 2);
  tcase_add_loop_test(tc, test_eval_backward, 0, 2);
  suite_add_tcase(s, tc);
  tc = tcase_create("properties");
  tcase_add_loop_test(tc, test_all_ones_twice_is_zero, 0, 2);
  tcase_add_loop_test(tc, test_freeze_keeps_everything, 0, 8);
  tcase_add_loop_test(tc, test_sync_local_equals_plain, 0, 4);
  tcase_add_loop_test(tc, test_empty_input, 0, 2);
  tcase_add_loop_test(tc, test_single_value_per_channel, 0, 2);
  tcase_add_loop_test(tc, test_bad_input_shapes, 0, 2);
  tcase_add_test(tc, test_bad_options);
  tcase_add_test(tc, test_repr);
  tcase_add_test(tc, test_layer_names);
  tcase_add_test(tc, test_reset);
  suite_add_tcase(s, tc);
  tc = tcase_create("transport");
  tcase_set_timeout(tc, 30);
  tcase_add_test(tc, test_failed_round_changes_nothing);
  suite_add_tcase(s, tc);
  SRunner *sr = srunner_create(s);
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
