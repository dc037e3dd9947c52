/*
 * test_merge.c - Chan's merge and the statistics checks, against closed-form
 * and long-double references computed here, independently of merge.c.
 */
#include <check.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "merge.h"

#define MAX_RANKS 8
#define MAX_CHANNELS 4

/* A small deterministic generator (xorshift64*), so runs are repeatable. */
static uint64_t rng_state = 0x9E3779B97F4A7C15u;
static double uniform01(void) {
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return (double)((rng_state * 2685821657736338717u) >> 11) / 9007199254740992.0;
}
/* Roughly normal (sum of 12 uniforms), mean 0, standard deviation 1. */
static double normalish(void) {
  double s = 0;
  for (int i = 0; i < 12; i++)
    s += uniform01();
  return s - 6.0;
}

/* Two-pass mean and M2 in long double. */
static void two_pass(const double *x, size_t n, long double *mean, long double *m2) {
  long double s = 0, q = 0;
  for (size_t i = 0; i < n; i++)
    s += x[i];
  *mean = n ? s / (long double)n : 0;
  for (size_t i = 0; i < n; i++)
    q += (x[i] - *mean) * (x[i] - *mean);
  *m2 = q;
}

/*
 * Per-rank data sets with the given counts around `center` with std 1, one
 * channel each shifted by c; merges the per-rank (mean, M2) in rank order
 * and compares with the two-pass statistics of the concatenation.
 */
static void merge_vs_reference(const uint64_t *counts, int nranks, double center) {
  size_t total = 0;
  for (int r = 0; r < nranks; r++)
    total += counts[r];
  double *all = malloc((total ? total : 1) * MAX_CHANNELS * sizeof(double));
  ck_assert_ptr_nonnull(all);
  uint64_t n = 0;
  double mean[MAX_CHANNELS] = {0}, m2[MAX_CHANNELS] = {0};
  size_t off = 0;
  for (int r = 0; r < nranks; r++) {
    double rm[MAX_CHANNELS], rq[MAX_CHANNELS];
    for (size_t c = 0; c < MAX_CHANNELS; c++) {
      double *x = all + c * total + off;
      for (uint64_t i = 0; i < counts[r]; i++)
        x[i] = center + 0.5 * (double)c + normalish() + 0.25 * r;
      long double lm, lq;
      two_pass(x, counts[r], &lm, &lq);
      rm[c] = (double)lm;
      rq[c] = (double)lq;
      if (counts[r] == 0) {
        /* Garbage that must be ignored for an empty rank. */
        rm[c] = 1e300;
        rq[c] = 1e300;
      }
    }
    sbn__stats_merge(&n, mean, m2, counts[r], rm, rq, MAX_CHANNELS);
    off += counts[r];
  }
  ck_assert_uint_eq(n, total);
  for (size_t c = 0; c < MAX_CHANNELS; c++) {
    long double lm, lq;
    two_pass(all + c * total, total, &lm, &lq);
    if (total == 0) {
      ck_assert(mean[c] == 0.0 && m2[c] == 0.0);
      continue;
    }
    double em = fabs((double)(mean[c] - lm)) / fmax(1.0, fabs((double)lm));
    ck_assert_msg(em <= 1e-12, "channel %zu mean %.17g vs %.17Lg (rel %.3g)", c, mean[c], lm, em);
    if (total > 1) {
      double ev = fabs((double)((m2[c] - lq) / lq));
      ck_assert_msg(ev <= 1e-12, "channel %zu M2 %.17g vs %.17Lg (rel %.3g)", c, m2[c], lq, ev);
    }
  }
  free(all);
}

START_TEST(closed_form_small) {
  /* Ranks hold {1,2,3}, {}, {4,5}, {6}: the concatenation is 1..6, with
   * mean 3.5 and M2 = 17.5 exactly. */
  double m0 = 2.0, q0 = 2.0, m2_ = 4.5, q2 = 0.5, m3 = 6.0, q3 = 0.0, junk = NAN;
  uint64_t n = 0;
  double mean = 0, m2 = 0;
  sbn__stats_merge(&n, &mean, &m2, 3, &m0, &q0, 1);
  sbn__stats_merge(&n, &mean, &m2, 0, &junk, &junk, 1);
  sbn__stats_merge(&n, &mean, &m2, 2, &m2_, &q2, 1);
  sbn__stats_merge(&n, &mean, &m2, 1, &m3, &q3, 1);
  ck_assert_uint_eq(n, 6);
  ck_assert(fabs(mean - 3.5) <= 1e-15);
  ck_assert(fabs(m2 - 17.5) <= 1e-14);
}
END_TEST

START_TEST(large_mean_unit_std) {
  uint64_t counts[] = {1000, 3, 0, 5000, 1, 777};
  merge_vs_reference(counts, 6, 1e4);
  merge_vs_reference(counts, 6, -1e4);
}
END_TEST

START_TEST(counts_differ_and_zero) {
  uint64_t a[] = {0, 0, 17, 0};
  merge_vs_reference(a, 4, 3.0);
  uint64_t b[] = {1, 1, 1, 1, 1, 1, 1, 1};
  merge_vs_reference(b, 8, 0.5);
  uint64_t c[] = {4096, 0};
  merge_vs_reference(c, 2, -7.0);
}
END_TEST

START_TEST(all_counts_zero) {
  uint64_t counts[] = {0, 0, 0};
  merge_vs_reference(counts, 3, 1.0);
}
END_TEST

/* The same inputs in the same (rank) order give bitwise the same result. */
START_TEST(rank_order_is_deterministic) {
  enum { R = 5, C = 3 };
  double mu[R][C], q[R][C];
  uint64_t cnt[R] = {10, 0, 3, 99, 1};
  for (int r = 0; r < R; r++)
    for (int c = 0; c < C; c++) {
      mu[r][c] = 1e4 + normalish();
      q[r][c] = fabs(normalish()) * (double)cnt[r];
    }
  double out[2][2][C];
  uint64_t n[2];
  for (int run = 0; run < 2; run++) {
    n[run] = 0;
    memset(out[run], 0, sizeof(out[run]));
    for (int r = 0; r < R; r++)
      sbn__stats_merge(&n[run], out[run][0], out[run][1], cnt[r], mu[r], q[r], C);
  }
  ck_assert_uint_eq(n[0], n[1]);
  ck_assert(memcmp(out[0], out[1], sizeof(out[0])) == 0);
}
END_TEST

START_TEST(sums) {
  double acc[3] = {1, 2, 3};
  const double b[3] = {0.5, -2, 1e16};
  sbn__sums_add(acc, b, 3);
  ck_assert(acc[0] == 1.5 && acc[1] == 0 && acc[2] == 1e16 + 3);
  ck_assert_int_eq(sbn__finite_check(acc, 3), -1);
  acc[1] = INFINITY;
  ck_assert_int_eq(sbn__finite_check(acc, 3), 1);
}
END_TEST

START_TEST(stats_check) {
  const char *what = NULL;
  double mean[3] = {0, 1, 2}, m2[3] = {0, 1, 2};
  ck_assert_int_eq(sbn__stats_check(10, mean, m2, 3, &what), -1);
  ck_assert_int_eq(sbn__stats_check(SBN_MAX_COUNT, mean, m2, 3, &what), -1);
  mean[1] = NAN;
  ck_assert_int_eq(sbn__stats_check(10, mean, m2, 3, &what), 1);
  ck_assert_ptr_nonnull(strstr(what, "mean"));
  mean[1] = 1;
  m2[2] = INFINITY;
  ck_assert_int_eq(sbn__stats_check(10, mean, m2, 3, &what), 2);
  ck_assert_ptr_nonnull(strstr(what, "M2"));
  m2[2] = -1e-300;
  ck_assert_int_eq(sbn__stats_check(10, mean, m2, 3, &what), 2);
  ck_assert_ptr_nonnull(strstr(what, "negative"));
  m2[2] = 2;
  ck_assert_int_eq(sbn__stats_check(SBN_MAX_COUNT + 1, mean, m2, 3, &what), 0);
  ck_assert_ptr_nonnull(strstr(what, "count"));
  mean[0] = -INFINITY;
  ck_assert_int_eq(sbn__stats_check(1, mean, m2, 3, &what), 0);
  /* The edges of the branch-free pre-check: -0 and negative means pass,
   * the smallest negative M2 and a NaN with its sign bit set do not. */
  double mv[1000], qv[1000];
  for (int i = 0; i < 1000; i++)
    mv[i] = -1.5 * i, qv[i] = i % 2 ? -0.0 : DBL_MAX;
  ck_assert_int_eq(sbn__stats_check(10, mv, qv, 1000, &what), -1);
  qv[777] = -DBL_TRUE_MIN;
  ck_assert_int_eq(sbn__stats_check(10, mv, qv, 1000, &what), 777);
  ck_assert_ptr_nonnull(strstr(what, "negative"));
  qv[777] = 0;
  mv[999] = -NAN;
  ck_assert_int_eq(sbn__stats_check(10, mv, qv, 1000, &what), 999);
  ck_assert_int_eq(sbn__finite_check(mv, 1000), 999);
  ck_assert_int_eq(sbn__finite_check(mv, 999), -1);
  ck_assert_int_eq(sbn__finite_check(qv, 1000), -1); /* -0 and DBL_MAX are finite */
  /* Past the last whole group of eight values, and sums that overflow. */
  mv[999] = -1;
  for (int i = 0; i < 1000; i++)
    qv[i] = DBL_MAX;
  ck_assert_int_eq(sbn__stats_check(10, mv, qv, 1000, &what), -1);
  ck_assert_int_eq(sbn__stats_check(10, mv, qv, 997, &what), -1);
  qv[995] = -DBL_MAX;
  ck_assert_int_eq(sbn__stats_check(10, mv, qv, 997, &what), 995);
  qv[995] = DBL_MAX;
  mv[996] = INFINITY;
  ck_assert_int_eq(sbn__stats_check(10, mv, qv, 997, &what), 996);
  ck_assert_int_eq(sbn__finite_check(mv, 997), 996);
}
END_TEST

/* A float spread over many binades, either sign (xorshift, fixed seed). */
static float wide_float(uint64_t *st) {
  *st ^= *st << 13;
  *st ^= *st >> 7;
  *st ^= *st << 17;
  double m = (double)(*st >> 11) / 9007199254740992.0; /* [0, 1) */
  int e = (int)(*st % 60) - 30;
  return (float)((*st & 1 ? -1 : 1) * ldexp(0.5 + m, e));
}

/* The allreduce reduction equals the element-wise double sum in input order,
 * rounded once, bit for bit, at every block boundary and scale, in place. */
START_TEST(reduce_floats_exact) {
  static const size_t ns[] = {0, 1, SBN_REDUCE_BLOCK - 1, SBN_REDUCE_BLOCK, SBN_REDUCE_BLOCK + 1,
                              3 * SBN_REDUCE_BLOCK + 5};
  static const size_t ks[] = {1, 2, 3, 4, 5};
  static double acc[SBN_REDUCE_BLOCK];
  uint64_t st = 0x9e3779b97f4a7c15u;
  for (size_t ni = 0; ni < sizeof(ns) / sizeof(ns[0]); ni++)
    for (size_t ki = 0; ki < sizeof(ks) / sizeof(ks[0]); ki++)
      for (int mean = 0; mean <= 1; mean++) {
        size_t n = ns[ni], k = ks[ki];
        double scale = mean ? (double)k : 1.0;
        float *buf[5], *want = malloc((n + 1) * sizeof(float)), *out = malloc((n + 1) * sizeof(float));
        const float *in[5];
        for (size_t r = 0; r < k; r++) {
          buf[r] = malloc((n + 1) * sizeof(float));
          for (size_t j = 0; j < n; j++)
            buf[r][j] = wide_float(&st);
          in[r] = buf[r];
        }
        for (size_t j = 0; j < n; j++) {
          double sum = 0;
          for (size_t r = 0; r < k; r++)
            sum += (double)buf[r][j];
          want[j] = (float)(sum / scale);
        }
        double bad_value = 0;
        long bad_input = 0;
        ck_assert_int_eq(sbn__reduce_floats(out, in, k, n, scale, acc, &bad_value, &bad_input),
                         -1);
        ck_assert(n == 0 || memcmp(out, want, n * sizeof(float)) == 0);
        /* In place, as the coordinator does it. */
        ck_assert_int_eq(sbn__reduce_floats(buf[0], in, k, n, scale, acc, &bad_value, &bad_input),
                         -1);
        ck_assert(n == 0 || memcmp(buf[0], want, n * sizeof(float)) == 0);
        for (size_t r = 0; r < k; r++)
          free(buf[r]);
        free(want);
        free(out);
      }
}
END_TEST

START_TEST(reduce_floats_overflow) {
  enum { N = 2 * SBN_REDUCE_BLOCK + 9 };
  static float a[N], b[N], out[N];
  static double acc[SBN_REDUCE_BLOCK];
  const float *in[2] = {a, b};
  for (size_t j = 0; j < N; j++)
    a[j] = b[j] = 1.0f;
  a[SBN_REDUCE_BLOCK + 7] = b[SBN_REDUCE_BLOCK + 7] = FLT_MAX;
  a[N - 1] = b[N - 1] = FLT_MAX;
  double bad_value = 0;
  long bad_input = 0;
  ck_assert_int_eq(sbn__reduce_floats(out, in, 2, N, 1.0, acc, &bad_value, &bad_input),
                   SBN_REDUCE_BLOCK + 7);
  ck_assert(bad_value == 2.0 * (double)FLT_MAX);
  ck_assert_int_eq(bad_input, -1); /* finite inputs: an overflow */
  /* The mean of the same values fits. */
  ck_assert_int_eq(sbn__reduce_floats(out, in, 2, N, 2.0, acc, &bad_value, &bad_input), -1);
  ck_assert(out[SBN_REDUCE_BLOCK + 7] == FLT_MAX);
}
END_TEST

/* Inf or NaN in an input is found by the reduction itself: the first bad
 * element, and there the first input holding a non-finite value, also when
 * the non-finite inputs cancel (Inf - Inf) or the output is the input. */
START_TEST(reduce_floats_bad_inputs) {
  enum { N = 3 * SBN_REDUCE_BLOCK + 5, K = 3 };
  static float buf[K][N], out[N];
  static double acc[SBN_REDUCE_BLOCK];
  const float *in[K] = {buf[0], buf[1], buf[2]};
  static const struct {
    size_t at;
    int rank;
    float v, v2; /* rank's value, and rank + 1's (when not 1.0) */
    long want_input;
  } cases[] = {{0, 0, NAN, 1.0f, 0},
               {SBN_REDUCE_BLOCK - 1, 2, INFINITY, 1.0f, 2},
               {SBN_REDUCE_BLOCK, 1, -INFINITY, 1.0f, 1},
               {N - 1, 1, INFINITY, -INFINITY, 1},
               {2 * SBN_REDUCE_BLOCK + 3, 0, -NAN, NAN, 0}};
  for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++)
    for (int in_place = 0; in_place <= 1; in_place++)
      for (int mean = 0; mean <= 1; mean++) {
        for (int r = 0; r < K; r++)
          for (size_t j = 0; j < N; j++)
            buf[r][j] = 1.0f;
        buf[cases[c].rank][cases[c].at] = cases[c].v;
        if (cases[c].rank + 1 < K)
          buf[cases[c].rank + 1][cases[c].at] = cases[c].v2;
        buf[K - 1][N - 1] = buf[K - 1][N - 1] == 1.0f ? 2.0f : buf[K - 1][N - 1];
        double bad_value = 0;
        long bad_input = 99;
        long at = sbn__reduce_floats(in_place ? buf[0] : out, in, K, N, mean ? 3.0 : 1.0, acc,
                                     &bad_value, &bad_input);
        ck_assert_msg(at == (long)cases[c].at, "case %zu: element %ld", c, at);
        ck_assert_msg(bad_input == cases[c].want_input, "case %zu: input %ld", c, bad_input);
      }
}
END_TEST

int main(void) {
  Suite *s = suite_create("merge");
  TCase *tc = tcase_create("chan");
  tcase_add_test(tc, closed_form_small);
  tcase_add_test(tc, large_mean_unit_std);
  tcase_add_test(tc, counts_differ_and_zero);
  tcase_add_test(tc, all_counts_zero);
  tcase_add_test(tc, rank_order_is_deterministic);
  tcase_add_test(tc, sums);
  tcase_add_test(tc, stats_check);
  tcase_add_test(tc, reduce_floats_exact);
  tcase_add_test(tc, reduce_floats_overflow);
  tcase_add_test(tc, reduce_floats_bad_inputs);
  suite_add_tcase(s, tc);
  SRunner *sr = srunner_create(s);
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
