/* merge.c - Chan's parallel merge of (count, mean, M2) in double. */
#include "merge.h"

#include <math.h>
#include <string.h>

void sbn__stats_merge(uint64_t *na, double *mean_a, double *m2_a, uint64_t nb,
                      const double *mean_b, const double *m2_b, size_t C) {
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

long sbn__stats_check(uint64_t n, const double *mean, const double *m2, size_t C,
                      const char **what) {
  if (n > SBN_MAX_COUNT) {
    *what = "count is larger than 2^53";
    return 0;
  }
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
  for (size_t i = 0; i < n; i++)
    if (!isfinite(v[i]))
      return (long)i;
  return -1;
}
