/* merge.c - Chan's parallel merge of (count, mean, M2) in double. */
#include "merge.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

void sbn__stats_merge(uint64_t *na, double *mean_a, double *m2_a, uint64_t nb, const double *mean_b,
                      const double *m2_b, size_t C) {
  if (nb == 0)
    return;
  if (*na == 0) {
    memcpy(mean_a, mean_b, C * sizeof(double));
    memcpy(m2_a, m2_b, C * sizeof(double));
    *na = nb;
    return;
  }
  double a = (double)*na, b = (double)nb, n = a + b;
  double wb = b / n, wab = a * b / n;
  for (size_t c = 0; c < C; c++) {
    double delta = mean_b[c] - mean_a[c];
    mean_a[c] += delta * wb;
    m2_a[c] += m2_b[c] + delta * delta * wab;
  }
  *na += nb;
}

void sbn__sums_add(double *acc, const double *b, size_t n) {
  for (size_t i = 0; i < n; i++)
    acc[i] += b[i];
}

/*
 * Whether any of v[0..n) is Inf or NaN, or with neg_too below zero, without
 * branches: the checks below run on every member's values in every round,
 * and nearly always pass.  x - x is +0 for a finite x and NaN otherwise, and
 * a sum of negative numbers never comes to 0: so the sums are 0 (or -0)
 * exactly when every value passes.  Eight sums side by side vectorize
 * (GCC does not vectorize a mask reduction over doubles on SSE2).
 */
static int any_suspect_d(const double *v, size_t n, int neg_too) {
  double m[8] = {0};
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; j++) {
      const double x = v[i + j];
      m[j] += (x - x) + (neg_too && x < 0 ? x : 0.0);
    }
  double t = 0;
  for (; i < n; i++) {
    const double x = v[i];
    t += (x - x) + (neg_too && x < 0 ? x : 0.0);
  }
  for (int j = 0; j < 8; j++)
    t += m[j];
  return t != 0;
}

long sbn__stats_check(uint64_t n, const double *mean, const double *m2, size_t C,
                      const char **what) {
  if (n > SBN_MAX_COUNT) {
    *what = "count is larger than 2^53";
    return 0;
  }
  if (!any_suspect_d(mean, C, 0) && !any_suspect_d(m2, C, 1))
    return -1;
  for (size_t c = 0; c < C; c++) {
    if (!isfinite(mean[c])) {
      *what = "mean is not finite";
      return (long)c;
    }
    if (!isfinite(m2[c])) {
      *what = "M2 is not finite";
      return (long)c;
    }
    if (m2[c] < 0) {
      *what = "M2 is negative";
      return (long)c;
    }
  }
  return -1;
}

long sbn__finite_check(const double *v, size_t n) {
  if (!any_suspect_d(v, n, 0))
    return -1;
  for (size_t i = 0; i < n; i++)
    if (!isfinite(v[i]))
      return (long)i;
  return -1;
}

/* Whether any of v[0..n) is Inf or NaN (exponent all ones), without branches. */
static int any_nonfinite_f(const float *v, size_t n) {
  uint32_t bad = 0;
  for (size_t i = 0; i < n; i++) {
    uint32_t b;
    memcpy(&b, &v[i], sizeof(b));
    bad |= (uint32_t)((b & 0x7f800000u) == 0x7f800000u);
  }
  return bad != 0;
}

/*
 * Block by block, so the double accumulator stays in the L1 cache and every
 * input is read once: the sums are the same as element by element (each
 * element's additions keep their order).
 */
long sbn__reduce_floats(void *out, const float *const *in, size_t k, size_t n, double scale,
                        double *acc, double *bad_value, long *bad_input) {
  int e;
  const int pow2 = frexp(scale, &e) == 0.5 && scale >= 1.0;
  const double inv = 1.0 / scale;
  /* Aligned output is written in place; otherwise each block is rounded
   * into o (L1) and copied out. */
  const int direct = (uintptr_t)out % _Alignof(float) == 0 && (k == 0 || out != in[0]);
  float ob[SBN_REDUCE_BLOCK];
  for (size_t j = 0; j < n; j += SBN_REDUCE_BLOCK) {
    size_t m = n - j < SBN_REDUCE_BLOCK ? n - j : SBN_REDUCE_BLOCK;
    float *o = direct ? (float *)out + j : ob;
    const float *a = in[0] + j;
    for (size_t i = 0; i < m; i++)
      acc[i] = (double)a[i];
    for (size_t r = 1; r < k; r++) {
      const float *b = in[r] + j;
      for (size_t i = 0; i < m; i++)
        acc[i] += (double)b[i];
    }
    if (scale == 1.0) {
      for (size_t i = 0; i < m; i++)
        o[i] = (float)acc[i];
    } else if (pow2) {
      /* x / 2^e and x * 2^-e are the same exact value, rounded alike. */
      for (size_t i = 0; i < m; i++)
        o[i] = (float)(acc[i] * inv);
    } else {
      for (size_t i = 0; i < m; i++)
        o[i] = (float)(acc[i] / scale);
    }
    /* A non-finite input makes its element's result non-finite too, so the
     * inputs need no pass of their own: only a bad result is looked into. */
    if (any_nonfinite_f(o, m)) {
      for (size_t i = 0; i < m; i++)
        if (!isfinite(o[i])) {
          *bad_value = acc[i] / scale;
          *bad_input = -1;
          for (size_t r = 0; r < k && *bad_input < 0; r++)
            if (!isfinite(in[r][j + i]))
              *bad_input = (long)r;
          return (long)(j + i);
        }
    }
    if (!direct)
      memcpy((unsigned char *)out + j * sizeof(float), ob, m * sizeof(float));
  }
  return -1;
}
