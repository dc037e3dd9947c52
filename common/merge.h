/*
 * merge.h - the statistics merge (Chan et al.'s parallel formula) in double.
 *
 * Pure functions, no I/O.  The coordinator merges contributions in rank order
 * with these, so the result is the same bytes whatever order they arrived in.
 */
#ifndef SBN_MERGE_H
#define SBN_MERGE_H

#include <stddef.h>
#include <stdint.h>

/*
 * Merges (nb, mean_b[c], m2_b[c]) into (*na, mean_a[c], m2_a[c]) for c < C:
 *   n = na + nb, delta = mean_b - mean_a,
 *   mean = mean_a + delta * nb / n, M2 = M2_a + M2_b + delta^2 * na * nb / n.
 * A side with count 0 contributes nothing (its mean/M2 are ignored).
 */
void sbn__stats_merge(uint64_t *na, double *mean_a, double *m2_a, uint64_t nb, const double *mean_b,
                      const double *m2_b, size_t C);

/* acc[i] += b[i] for i < n. */
void sbn__sums_add(double *acc, const double *b, size_t n);

/*
 * Checks one contribution's statistics: every mean and M2 finite, M2 >= 0,
 * count at most SBN_MAX_COUNT.  Returns the first bad channel index, or -1
 * if all are good; *what names the problem.
 */
#define SBN_MAX_COUNT (UINT64_C(1) << 53) /* exact in a double */
long sbn__stats_check(uint64_t n, const double *mean, const double *m2, size_t C,
                      const char **what);

/* Checks that every value is finite; returns the first bad index or -1. */
long sbn__finite_check(const double *v, size_t n);
/*
 * Allreduce: out[j] = (float)((in[0][j] + in[1][j] + ... + in[k-1][j]) / scale)
 * with the sum in double, added in the order of in[] and rounded to float
 * once.  out need not be aligned (it may sit inside an encoded frame) and
 * may be in[0].  acc: SBN_REDUCE_BLOCK doubles of scratch.  Returns the
 * index of the first element whose result is not a finite float, or -1;
 * then *bad_input is the first input (in[] order) whose value there is Inf
 * or NaN, or -1 when all were finite and their sum overflowed (its value in
 * double in *bad_value).  The inputs need no finiteness check beforehand.
 */
#define SBN_REDUCE_BLOCK 2048
long sbn__reduce_floats(void *out, const float *const *in, size_t k, size_t n, double scale,
                        double *acc, double *bad_value, long *bad_input);

#endif /* SBN_MERGE_H */
