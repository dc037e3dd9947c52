/*
 * batchnorm.c - BatchNorm and SyncBatchNorm: forward, backward, running
 * statistics, repr.  The maths is in shared/spec/SYNCBN_SEMANTICS.md.
 *
 * Layout: an input (N, C, S...) is N*C contiguous planes of S values; the
 * kernels walk plane by plane with a simple inner loop over S.  A
 * channels-last input (N, S..., C) is R = N*S rows of C values; its kernels
 * walk row by row with the inner loop over C (see "kernels").  Passes over
 * the data, for both layouts, with or without the fused ReLU: statistics one
 * read; normalization one read and one write; backward one read of x and dy
 * for the sums, then one read of x and dy and one write for dx.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "nn_internal.h"

/* ---- types ---------------------------------------------------------------- */

typedef struct bn {
  size_t C;
  double eps, momentum;
  int affine, track, freeze;
  unsigned flags; /* SBN_BN_CHANNELS_LAST, SBN_BN_FUSED_RELU */
  sbn_group *group;
  char *user_name;  /* from the options or sbn_bn_set_name */
  char *path_name;  /* from sbn_module_name_layers */
  char default_name[40];
  /* What the last successful forward left for backward. */
  int saved_valid;
  int saved_batch;       /* batch statistics (else running ones) */
  sbn_group *saved_sync; /* the group it synchronized over, or NULL */
  uint64_t saved_n;      /* (global) values per channel */
  sbn_tensor *saved_x;
  double *saved_mean, *saved_invstd; /* C each */
  float *saved_aff; /* 4C: the forward's hi, lo, a, b (see "kernels") */
} bn;

#define KNOWN_FLAGS (SBN_BN_CHANNELS_LAST | SBN_BN_FUSED_RELU)

static atomic_ulong layer_counter;
static atomic_int warned_n1;

/* ---- helpers -------------------------------------------------------------- */

const char *sbn__py_float(double v, char *buf, size_t len) {
  char tmp[40];
  if (isnan(v)) return snprintf(buf, len, "nan"), buf;
  if (isinf(v)) return snprintf(buf, len, v > 0 ? "inf" : "-inf"), buf;
  if (v == 0) return snprintf(buf, len, signbit(v) ? "-0.0" : "0.0"), buf;
  /* Shortest %e that reads back as v. */
  int p;
  for (p = 1; p <= 17; p++) {
    snprintf(tmp, sizeof(tmp), "%.*e", p - 1, v);
    if (strtod(tmp, NULL) == v) break;
  }
  /* tmp = [-]d[.ddd]e[+-]xx: split into sign, digits and exponent. */
  char digits[24];
  size_t nd = 0;
  const char *s = tmp;
  int neg = *s == '-';
  if (neg) s++;
  for (; *s && *s != 'e'; s++)
    if (*s != '.') digits[nd++] = *s;
  while (nd > 1 && digits[nd - 1] == '0') nd--;
  digits[nd] = '\0';
  int exp = atoi(s + 1);
  char out[48];
  size_t o = 0;
  if (neg) out[o++] = '-';
  if (exp < -4 || exp >= 16) {
    out[o++] = digits[0];
    if (nd > 1) {
      out[o++] = '.';
      for (size_t i = 1; i < nd; i++) out[o++] = digits[i];
    }
    o += (size_t)snprintf(out + o, sizeof(out) - o, "e%c%02d", exp < 0 ? '-' : '+', abs(exp));
  } else if (exp < 0) {
    out[o++] = '0';
    out[o++] = '.';
    for (int i = -1; i > exp; i--) out[o++] = '0';
    for (size_t i = 0; i < nd; i++) out[o++] = digits[i];
  } else {
    for (int i = 0; i <= exp; i++) out[o++] = (size_t)i < nd ? digits[i] : '0';
    out[o++] = '.';
    if ((size_t)exp + 1 < nd)
      for (size_t i = (size_t)exp + 1; i < nd; i++) out[o++] = digits[i];
    else
      out[o++] = '0';
  }
  out[o] = '\0';
  snprintf(buf, len, "%s", out);
  return buf;
}

static int is_bn(const sbn_module *m) {
  const sbn_module_vtable *vt = sbn_module_vtable_of(m);
  return vt == &sbn__batchnorm_vtable || vt == &sbn__syncbatchnorm_vtable;
}

static const char *identity(const bn *b) {
  if (b->user_name) return b->user_name;
  if (b->path_name) return b->path_name;
  return b->default_name;
}

/* True when g needs no coordinator; NULL never touches the transport. */
static int group_local(sbn_group *g) { return g == NULL || sbn__group_is_local(g); }

static int check_layer_name(const char *name) {
  if (!name) return SBN_OK;
  size_t len = strlen(name);
  if (len == 0) return sbn__fail(SBN_EINVAL, "layer name is empty");
  if (len >= SBN_LAYER_MAX)
    return sbn__fail(SBN_EINVAL, "layer name '%.32s...' is longer than %d bytes", name,
                     SBN_LAYER_MAX - 1);
  for (const char *p = name; *p; p++)
    if (*p == '\n' || *p == ' ')
      return sbn__fail(SBN_EINVAL, "layer name '%s' contains a space or newline", name);
  return SBN_OK;
}

/* The layer's tensors; SBN_ESTATE when one was removed or resized. */
typedef struct bn_tensors {
  sbn_tensor *w, *b, *rm, *rv;
} bn_tensors;

static int get_tensor(const sbn_module *m, const bn *b, const char *name, sbn_tensor **out) {
  sbn_tensor *t = sbn__module_attr_tensor(m, name);
  if (!t || sbn_tensor_numel(t) != b->C)
    return sbn__fail(SBN_ESTATE, "layer '%s' has no '%s' of %zu elements", identity(b), name,
                     b->C);
  *out = t;
  return SBN_OK;
}

static int get_tensors(const sbn_module *m, const bn *b, bn_tensors *t) {
  int rc = SBN_OK;
  memset(t, 0, sizeof(*t));
  if (b->affine) {
    if ((rc = get_tensor(m, b, "weight", &t->w)) != SBN_OK) return rc;
    if ((rc = get_tensor(m, b, "bias", &t->b)) != SBN_OK) return rc;
  }
  if (b->track) {
    if ((rc = get_tensor(m, b, "running_mean", &t->rm)) != SBN_OK) return rc;
    if ((rc = get_tensor(m, b, "running_var", &t->rv)) != SBN_OK) return rc;
  }
  return rc;
}

/*
 * The kernels' view of x: NCHW as N planes-of-channels with spatial size S;
 * channels-last as N*S rows of C, i.e. *N = rows and *S = 1 (the row
 * kernels' layout; an NCHW input with S = 1 is the same).
 */
static void split_shape(const bn *b, const sbn_tensor *x, size_t *N, size_t *S) {
  int nd = sbn_tensor_ndim(x);
  if (b->flags & SBN_BN_CHANNELS_LAST) {
    *N = 1;
    for (int i = 0; i < nd - 1; i++) *N *= sbn_tensor_dim(x, i);
    *S = 1;
    return;
  }
  *N = sbn_tensor_dim(x, 0);
  *S = 1;
  for (int i = 2; i < nd; i++) *S *= sbn_tensor_dim(x, i);
}

/* Checks the input and splits its shape into N, C, S (see split_shape). */
static int check_input(const sbn_module *m, const bn *b, const sbn_tensor *x, size_t *N,
                       size_t *S) {
  char s[96];
  int nd = sbn_tensor_ndim(x);
  const int cl = !!(b->flags & SBN_BN_CHANNELS_LAST);
  if (nd < 2 || nd > 5)
    return sbn__fail(SBN_ESHAPE, "%s '%s' expects a 2D, 3D, 4D or 5D%s input, got %dD input of shape %s",
                     sbn_module_type_name(m), identity(b), cl ? " channels-last" : "", nd,
                     sbn_tensor_shape_str(x, s, sizeof(s)));
  if (cl && sbn_tensor_dim(x, nd - 1) != b->C)
    return sbn__fail(SBN_ESHAPE,
                     "%s '%s' expects %zu channels on the last axis (channels-last), input has "
                     "shape %s",
                     sbn_module_type_name(m), identity(b), b->C,
                     sbn_tensor_shape_str(x, s, sizeof(s)));
  if (!cl && sbn_tensor_dim(x, 1) != b->C)
    return sbn__fail(SBN_ESHAPE,
                     "%s '%s' expects %zu channels (num_features), got input of shape %s",
                     sbn_module_type_name(m), identity(b), b->C,
                     sbn_tensor_shape_str(x, s, sizeof(s)));
  split_shape(b, x, N, S);
  return SBN_OK;
}

/* ---- kernels ------------------------------------------------------------------ */

/*
 * The kernels use GCC/Clang vector extensions: 4 floats at a time (two
 * pairs of doubles for the sums) without depending on the optimization
 * level.  The element-wise kernels do exactly the scalar operations, so a
 * value's result does not depend on its position; the sums have a fixed
 * order, so every run gives the same bits.
 *
 * Two families, each with the same passes over the data:
 *   - plane kernels (S > 1): N*C contiguous planes of S values, inner loop
 *     over S (NCHW inputs with a spatial size);
 *   - row kernels (S == 1): R rows of C contiguous values, inner loop over
 *     C with per-channel partial sums kept in double arrays across rows
 *     (channels-last inputs as (R, C), and NCHW inputs without spatial
 *     size, which are the same layout).  RB rows are handled per sweep of
 *     the channels so the partial sums are loaded and stored once per RB
 *     rows; each channel's sum still adds the rows in order, so the result
 *     is the same as one row at a time (and as the plane kernels for S = 1).
 * The normalization's per-channel constants are floats: y = ((x - hi) - lo)
 * * a + b with hi = float(mean), lo = float(mean - hi) (the exact
 * subtraction of the mean, see normalize), a = float(weight * invstd),
 * b = float(bias), stored as aff = [hi(C) lo(C) a(C) b(C)].
 *
 * Fused ReLU: y = max(0, v) in the normalization store; backward keeps dy
 * where v = ((x - hi) - lo) * a + b > 0, v recomputed with the forward's
 * saved constants by the same expression (so the same bits as the
 * forward's), inside the sums pass and the dx pass.
 */
typedef float v4f __attribute__((vector_size(16))); /* 4 floats: SSE2/NEON width */
typedef int v4si __attribute__((vector_size(16)));
typedef double v2d __attribute__((vector_size(16)));
#define VL 4
#define RB 4 /* rows per sweep in the row kernels */
#define KERNEL static inline __attribute__((always_inline))

static inline v4f load4(const float *p) {
  v4f v;
  memcpy(&v, p, sizeof(v));
  return v;
}
static inline void store4(float *p, v4f v) { memcpy(p, &v, sizeof(v)); }
static inline v2d load2d(const double *p) {
  v2d v;
  memcpy(&v, p, sizeof(v));
  return v;
}
static inline void store2d(double *p, v2d v) { memcpy(p, &v, sizeof(v)); }
static inline v2d lo2(v4f v) { return (v2d){v[0], v[1]}; }
static inline v2d hi2(v4f v) { return (v2d){v[2], v[3]}; }
static inline double hsum2(v2d v) { return v[0] + v[1]; }
static inline v4f splat4(float f) { return (v4f){f, f, f, f}; }

/* The normalization of one value, vector and scalar: the same operations. */
KERNEL v4f aff4(v4f x, v4f h, v4f l, v4f a, v4f b) { return ((x - h) - l) * a + b; }
KERNEL float aff1(float x, float h, float l, float a, float b) { return ((x - h) - l) * a + b; }
/* ReLU: +0 where v <= 0, else v (a NaN passes, as in PyTorch). */
KERNEL v4f relu4(v4f v) { return (v4f)((v4si)v & ~(v4si)(v <= splat4(0.0f))); }
KERNEL float relu1(float v) { return v <= 0 ? 0.0f : v; }
/* ReLU's backward: g where v > 0 (or NaN), else +0. */
KERNEL v4f keep4(v4f v, v4f g) { return (v4f)((v4si)g & ~(v4si)(v <= splat4(0.0f))); }
KERNEL float keep1(float v, float g) { return v <= 0 ? 0.0f : g; }

/*
 * Per-channel count, mean and M2 in one read.  Sums of d = x - K in double,
 * K being the channel's first value: with K a sample of the channel the
 * textbook cancellation of Σx² - (Σx)²/n cannot happen, and
 * M2 = Σd² - (Σd)²/n is accurate to double precision.
 */
static void plane_stats(const float *x, size_t N, size_t C, size_t S, double *mean, double *m2) {
  size_t count = N * S;
  for (size_t c = 0; c < C; c++) {
    mean[c] = 0;
    m2[c] = 0;
  }
  if (count == 0) return;
  for (size_t c = 0; c < C; c++) {
    const float k = x[c * S];
    const v2d kv = {k, k};
    double s = 0, q = 0;
    for (size_t n = 0; n < N; n++) {
      const float *p = x + (n * C + c) * S;
      v2d s0 = {0}, s1 = {0}, q0 = {0}, q1 = {0};
      size_t i = 0;
      for (; i + VL <= S; i += VL) {
        v4f v = load4(p + i);
        v2d d0 = lo2(v) - kv, d1 = hi2(v) - kv;
        s0 += d0, s1 += d1;
        q0 += d0 * d0, q1 += d1 * d1;
      }
      double st = hsum2(s0 + s1), qt = hsum2(q0 + q1);
      for (; i < S; i++) {
        double d = (double)p[i] - k;
        st += d;
        qt += d * d;
      }
      s += st;
      q += qt;
    }
    mean[c] = (double)k + s / (double)count;
    double v = q - s * s / (double)count;
    m2[c] = v > 0 ? v : 0;
  }
}

/* nr rows of x into the partial sums s, q of d = x - K (row kernels). */
KERNEL void rows_stats_block(const float *x, size_t nr, size_t C, const double *K, double *s,
                             double *q) {
  size_t c = 0;
  for (; c + VL <= C; c += VL) {
    const v2d k0 = load2d(K + c), k1 = load2d(K + c + 2);
    v2d s0 = load2d(s + c), s1 = load2d(s + c + 2);
    v2d q0 = load2d(q + c), q1 = load2d(q + c + 2);
    for (size_t j = 0; j < nr; j++) {
      v4f v = load4(x + j * C + c);
      v2d d0 = lo2(v) - k0, d1 = hi2(v) - k1;
      s0 += d0, s1 += d1;
      q0 += d0 * d0, q1 += d1 * d1;
    }
    store2d(s + c, s0), store2d(s + c + 2, s1);
    store2d(q + c, q0), store2d(q + c + 2, q1);
  }
  for (; c < C; c++) {
    double sc = s[c], qc = q[c];
    for (size_t j = 0; j < nr; j++) {
      double d = (double)x[j * C + c] - K[c];
      sc += d;
      qc += d * d;
    }
    s[c] = sc;
    q[c] = qc;
  }
}

/* The same statistics for R rows of C channels; acc: 3C doubles of scratch. */
static void rows_stats(const float *x, size_t R, size_t C, double *mean, double *m2,
                       double *acc) {
  for (size_t c = 0; c < C; c++) mean[c] = m2[c] = 0;
  if (R == 0) return;
  double *K = acc, *s = acc + C, *q = acc + 2 * C;
  for (size_t c = 0; c < C; c++) {
    K[c] = x[c];
    s[c] = q[c] = 0;
  }
  size_t r = 0;
  for (; r + RB <= R; r += RB) rows_stats_block(x + r * C, RB, C, K, s, q);
  if (r < R) rows_stats_block(x + r * C, R - r, C, K, s, q);
  for (size_t c = 0; c < C; c++) {
    mean[c] = K[c] + s[c] / (double)R;
    double v = q[c] - s[c] * s[c] / (double)R;
    m2[c] = v > 0 ? v : 0;
  }
}

/*
 * y = ((x - hi) - lo) * a + b (then the ReLU when relu).  The mean is
 * subtracted in two float steps, hi = float(mean) first (exact for values
 * near it) and then the remainder lo, so that |mean| >> std loses nothing;
 * the fused x*a + (b - mean*a) would cancel catastrophically.
 */
KERNEL void plane_normalize_body(const float *x, float *y, size_t N, size_t C, size_t S,
                                 const float *aff, const int relu) {
  const float *H = aff, *L = aff + C, *A = aff + 2 * C, *B = aff + 3 * C;
  for (size_t n = 0; n < N; n++)
    for (size_t c = 0; c < C; c++) {
      const float *p = x + (n * C + c) * S;
      float *q = y + (n * C + c) * S;
      const float hi = H[c], lo = L[c], a = A[c], b = B[c];
      const v4f hv = splat4(hi), lv = splat4(lo), av = splat4(a), bv = splat4(b);
      size_t i = 0;
      for (; i + VL <= S; i += VL) {
        v4f v = aff4(load4(p + i), hv, lv, av, bv);
        store4(q + i, relu ? relu4(v) : v);
      }
      for (; i < S; i++) {
        float v = aff1(p[i], hi, lo, a, b);
        q[i] = relu ? relu1(v) : v;
      }
    }
}

KERNEL void rows_normalize_block(const float *x, float *y, size_t nr, size_t C, const float *aff,
                                 const int relu) {
  const float *H = aff, *L = aff + C, *A = aff + 2 * C, *B = aff + 3 * C;
  size_t c = 0;
  for (; c + VL <= C; c += VL) {
    const v4f hv = load4(H + c), lv = load4(L + c), av = load4(A + c), bv = load4(B + c);
    for (size_t j = 0; j < nr; j++) {
      v4f v = aff4(load4(x + j * C + c), hv, lv, av, bv);
      store4(y + j * C + c, relu ? relu4(v) : v);
    }
  }
  for (; c < C; c++)
    for (size_t j = 0; j < nr; j++) {
      float v = aff1(x[j * C + c], H[c], L[c], A[c], B[c]);
      y[j * C + c] = relu ? relu1(v) : v;
    }
}

KERNEL void rows_normalize_body(const float *x, float *y, size_t R, size_t C, const float *aff,
                                const int relu) {
  size_t r = 0;
  for (; r + RB <= R; r += RB) rows_normalize_block(x + r * C, y + r * C, RB, C, aff, relu);
  if (r < R) rows_normalize_block(x + r * C, y + r * C, R - r, C, aff, relu);
}

/* One read of x, one write of y, for either layout. */
static void normalize(const float *x, float *y, size_t N, size_t C, size_t S, const float *aff,
                      int relu) {
  if (S == 1) {
    if (relu) rows_normalize_body(x, y, N, C, aff, 1);
    else rows_normalize_body(x, y, N, C, aff, 0);
  } else {
    if (relu) plane_normalize_body(x, y, N, C, S, aff, 1);
    else plane_normalize_body(x, y, N, C, S, aff, 0);
  }
}

/*
 * Per channel Σg and Σg·(x - mean), in double, one read of x and dy; g = dy,
 * or dy masked by the ReLU (aff: the forward's constants) when relu.
 */
KERNEL void plane_grad_sums_body(const float *x, const float *dy, size_t N, size_t C, size_t S,
                                 const double *mean, const float *aff, double *sdy, double *sdyx,
                                 const int relu) {
  const float *H = aff, *L = aff + C, *A = aff + 2 * C, *B = aff + 3 * C;
  for (size_t c = 0; c < C; c++) sdy[c] = sdyx[c] = 0;
  for (size_t n = 0; n < N; n++)
    for (size_t c = 0; c < C; c++) {
      const float *p = x + (n * C + c) * S, *g = dy + (n * C + c) * S;
      const double mu = mean[c];
      const v2d mv = {mu, mu};
      const float hi = relu ? H[c] : 0, lo = relu ? L[c] : 0;
      const float a = relu ? A[c] : 0, b = relu ? B[c] : 0;
      const v4f hv = splat4(hi), lv = splat4(lo), av = splat4(a), bv = splat4(b);
      v2d a0 = {0}, a1 = {0}, b0 = {0}, b1 = {0};
      size_t i = 0;
      for (; i + VL <= S; i += VL) {
        v4f xv = load4(p + i), gv = load4(g + i);
        if (relu) gv = keep4(aff4(xv, hv, lv, av, bv), gv);
        v2d g0 = lo2(gv), g1 = hi2(gv);
        a0 += g0, a1 += g1;
        b0 += g0 * (lo2(xv) - mv), b1 += g1 * (hi2(xv) - mv);
      }
      double at = hsum2(a0 + a1), bt = hsum2(b0 + b1);
      for (; i < S; i++) {
        float gi = relu ? keep1(aff1(p[i], hi, lo, a, b), g[i]) : g[i];
        at += gi;
        bt += (double)gi * ((double)p[i] - mu);
      }
      sdy[c] += at;
      sdyx[c] += bt;
    }
}

KERNEL void rows_grad_sums_block(const float *x, const float *dy, size_t nr, size_t C,
                                 const double *mean, const float *aff, double *sdy, double *sdyx,
                                 const int relu) {
  const float *H = aff, *L = aff + C, *A = aff + 2 * C, *B = aff + 3 * C;
  size_t c = 0;
  for (; c + VL <= C; c += VL) {
    const v2d m0 = load2d(mean + c), m1 = load2d(mean + c + 2);
    v2d a0 = load2d(sdy + c), a1 = load2d(sdy + c + 2);
    v2d b0 = load2d(sdyx + c), b1 = load2d(sdyx + c + 2);
    v4f hv = {0}, lv = {0}, av = {0}, bv = {0};
    if (relu) hv = load4(H + c), lv = load4(L + c), av = load4(A + c), bv = load4(B + c);
    for (size_t j = 0; j < nr; j++) {
      v4f xv = load4(x + j * C + c), gv = load4(dy + j * C + c);
      if (relu) gv = keep4(aff4(xv, hv, lv, av, bv), gv);
      v2d g0 = lo2(gv), g1 = hi2(gv);
      a0 += g0, a1 += g1;
      b0 += g0 * (lo2(xv) - m0), b1 += g1 * (hi2(xv) - m1);
    }
    store2d(sdy + c, a0), store2d(sdy + c + 2, a1);
    store2d(sdyx + c, b0), store2d(sdyx + c + 2, b1);
  }
  for (; c < C; c++) {
    double at = sdy[c], bt = sdyx[c];
    for (size_t j = 0; j < nr; j++) {
      float xi = x[j * C + c], gi = dy[j * C + c];
      if (relu) gi = keep1(aff1(xi, H[c], L[c], A[c], B[c]), gi);
      at += gi;
      bt += (double)gi * ((double)xi - mean[c]);
    }
    sdy[c] = at;
    sdyx[c] = bt;
  }
}

KERNEL void rows_grad_sums_body(const float *x, const float *dy, size_t R, size_t C,
                                const double *mean, const float *aff, double *sdy, double *sdyx,
                                const int relu) {
  for (size_t c = 0; c < C; c++) sdy[c] = sdyx[c] = 0;
  size_t r = 0;
  for (; r + RB <= R; r += RB)
    rows_grad_sums_block(x + r * C, dy + r * C, RB, C, mean, aff, sdy, sdyx, relu);
  if (r < R) rows_grad_sums_block(x + r * C, dy + r * C, R - r, C, mean, aff, sdy, sdyx, relu);
}

static void grad_sums(const float *x, const float *dy, size_t N, size_t C, size_t S,
                      const double *mean, const float *aff, double *sdy, double *sdyx, int relu) {
  if (S == 1) {
    if (relu) rows_grad_sums_body(x, dy, N, C, mean, aff, sdy, sdyx, 1);
    else rows_grad_sums_body(x, dy, N, C, mean, aff, sdy, sdyx, 0);
  } else {
    if (relu) plane_grad_sums_body(x, dy, N, C, S, mean, aff, sdy, sdyx, 1);
    else plane_grad_sums_body(x, dy, N, C, S, mean, aff, sdy, sdyx, 0);
  }
}

/*
 * dx = k*(g - c1) - ((x - hi) - lo)*q (mean split as in normalize), g as in
 * grad_sums; kcq = [k(C) c1(C) q(C)] floats.
 */
KERNEL void plane_grad_input_body(const float *x, const float *dy, float *dx, size_t N, size_t C,
                                  size_t S, const float *aff, const float *kcq, const int relu) {
  const float *H = aff, *L = aff + C, *A = aff + 2 * C, *B = aff + 3 * C;
  for (size_t n = 0; n < N; n++)
    for (size_t c = 0; c < C; c++) {
      const float *p = x + (n * C + c) * S, *g = dy + (n * C + c) * S;
      float *o = dx + (n * C + c) * S;
      const float hi = H[c], lo = L[c], a = A[c], b = B[c];
      const float kf = kcq[c], cf = kcq[C + c], qf = kcq[2 * C + c];
      const v4f hv = splat4(hi), lv = splat4(lo), av = splat4(a), bv = splat4(b);
      const v4f kv = splat4(kf), cv = splat4(cf), qv = splat4(qf);
      size_t i = 0;
      for (; i + VL <= S; i += VL) {
        v4f xv = load4(p + i), gv = load4(g + i);
        if (relu) gv = keep4(aff4(xv, hv, lv, av, bv), gv);
        store4(o + i, kv * (gv - cv) - ((xv - hv) - lv) * qv);
      }
      for (; i < S; i++) {
        float gi = relu ? keep1(aff1(p[i], hi, lo, a, b), g[i]) : g[i];
        o[i] = kf * (gi - cf) - ((p[i] - hi) - lo) * qf;
      }
    }
}

KERNEL void rows_grad_input_block(const float *x, const float *dy, float *dx, size_t nr, size_t C,
                                  const float *aff, const float *kcq, const int relu) {
  const float *H = aff, *L = aff + C, *A = aff + 2 * C, *B = aff + 3 * C;
  const float *K = kcq, *C1 = kcq + C, *Q = kcq + 2 * C;
  size_t c = 0;
  for (; c + VL <= C; c += VL) {
    const v4f hv = load4(H + c), lv = load4(L + c);
    const v4f kv = load4(K + c), cv = load4(C1 + c), qv = load4(Q + c);
    v4f av = {0}, bv = {0};
    if (relu) av = load4(A + c), bv = load4(B + c);
    for (size_t j = 0; j < nr; j++) {
      v4f xv = load4(x + j * C + c), gv = load4(dy + j * C + c);
      if (relu) gv = keep4(aff4(xv, hv, lv, av, bv), gv);
      store4(dx + j * C + c, kv * (gv - cv) - ((xv - hv) - lv) * qv);
    }
  }
  for (; c < C; c++)
    for (size_t j = 0; j < nr; j++) {
      float xi = x[j * C + c], gi = dy[j * C + c];
      if (relu) gi = keep1(aff1(xi, H[c], L[c], A[c], B[c]), gi);
      dx[j * C + c] = K[c] * (gi - C1[c]) - ((xi - H[c]) - L[c]) * Q[c];
    }
}

KERNEL void rows_grad_input_body(const float *x, const float *dy, float *dx, size_t R, size_t C,
                                 const float *aff, const float *kcq, const int relu) {
  size_t r = 0;
  for (; r + RB <= R; r += RB)
    rows_grad_input_block(x + r * C, dy + r * C, dx + r * C, RB, C, aff, kcq, relu);
  if (r < R) rows_grad_input_block(x + r * C, dy + r * C, dx + r * C, R - r, C, aff, kcq, relu);
}

static void grad_input(const float *x, const float *dy, float *dx, size_t N, size_t C, size_t S,
                       const float *aff, const float *kcq, int relu) {
  if (S == 1) {
    if (relu) rows_grad_input_body(x, dy, dx, N, C, aff, kcq, 1);
    else rows_grad_input_body(x, dy, dx, N, C, aff, kcq, 0);
  } else {
    if (relu) plane_grad_input_body(x, dy, dx, N, C, S, aff, kcq, 1);
    else plane_grad_input_body(x, dy, dx, N, C, S, aff, kcq, 0);
  }
}

/* ---- forward ----------------------------------------------------------------- */

static void warn_n1(const char *layer) {
  if (atomic_exchange(&warned_n1, 1)) return;
  fprintf(stderr,
          "sbn: warning: layer '%s' normalized one value per channel; running_var is not "
          "updated when n = 1 (this warning is shown once)\n",
          layer);
}

static int bn_forward(sbn_module *m, sbn_tensor *x, sbn_tensor **out) {
  bn *b = sbn_module_impl(m);
  size_t N = 0, S = 0, C = b->C;
  bn_tensors t;
  int rc = check_input(m, b, x, &N, &S);
  if (rc == SBN_OK) rc = get_tensors(m, b, &t);
  if (rc != SBN_OK) return rc;
  const int training = sbn_module_is_training(m);
  const int use_batch = !b->track || (training && !b->freeze);
  const int update = b->track && training && !b->freeze;
  const int is_sync = sbn_module_vtable_of(m) == &sbn__syncbatchnorm_vtable;
  sbn_group *sync = (is_sync && use_batch && !group_local(b->group)) ? b->group : NULL;

  sbn_tensor *y = NULL;
  /* 9C doubles (the last 3C: row statistics' scratch), then 4C floats. */
  double *work = malloc(9 * C * sizeof(double) + 4 * C * sizeof(float));
  if (!work) return sbn__fail(SBN_ENOMEM, "out of memory in '%s' forward", identity(b));
  double *mean = work, *m2 = work + C, *invstd = work + 2 * C;
  double *scale = work + 3 * C, *shift = work + 4 * C, *gmean = work + 5 * C;
  double *acc = work + 6 * C;
  float *aff = (float *)(work + 9 * C);
  if ((rc = sbn__tensor_new_uninit(sbn_tensor_ndim(x), sbn_tensor_shape(x), &y)) != SBN_OK) {
    free(work);
    return rc;
  }
  const float *xd = sbn_tensor_cdata(x);
  uint64_t n = (uint64_t)N * S; /* N rows when S = 1 (channels-last) */
  if (use_batch) {
    if (S == 1)
      rows_stats(xd, N, C, mean, m2, acc);
    else
      plane_stats(xd, N, C, S, mean, m2);
    if (sync) {
      uint64_t gn = 0;
      /* gm2 goes to scale (free until normalization). */
      rc = sbn_sync_stats(sync, identity(b), C, n, mean, m2, &gn, gmean, scale);
      if (rc != SBN_OK) {
        sbn_tensor_free(y);
        free(work);
        return rc;
      }
      n = gn;
      memcpy(mean, gmean, C * sizeof(double));
      memcpy(m2, scale, C * sizeof(double));
    }
    for (size_t c = 0; c < C; c++) {
      double var = n ? m2[c] / (double)n : 0.0;
      invstd[c] = 1.0 / sqrt(var + b->eps);
    }
  } else {
    const float *rm = sbn_tensor_cdata(t.rm), *rv = sbn_tensor_cdata(t.rv);
    for (size_t c = 0; c < C; c++) {
      mean[c] = rm[c];
      invstd[c] = 1.0 / sqrt((double)rv[c] + b->eps);
    }
  }
  const float *w = t.w ? sbn_tensor_cdata(t.w) : NULL, *bs = t.b ? sbn_tensor_cdata(t.b) : NULL;
  for (size_t c = 0; c < C; c++) {
    scale[c] = (w ? (double)w[c] : 1.0) * invstd[c];
    shift[c] = bs ? bs[c] : 0.0;
    const float hi = (float)mean[c];
    aff[c] = hi;
    aff[C + c] = (float)(mean[c] - (double)hi);
    aff[2 * C + c] = (float)scale[c];
    aff[3 * C + c] = (float)shift[c];
  }
  normalize(xd, sbn_tensor_data(y), N, C, S, aff, !!(b->flags & SBN_BN_FUSED_RELU));

  /* Nothing below can fail: commit. */
  if (update && n > 0) {
    float *rm = sbn_tensor_data(t.rm), *rv = sbn_tensor_data(t.rv);
    const double mo = b->momentum;
    for (size_t c = 0; c < C; c++) rm[c] = (float)(mo * rm[c] + (1.0 - mo) * mean[c]);
    if (n > 1) {
      for (size_t c = 0; c < C; c++)
        rv[c] = (float)(mo * rv[c] + (1.0 - mo) * (m2[c] / (double)(n - 1)));
    } else {
      warn_n1(identity(b));
    }
  }
  sbn_tensor_replace(&b->saved_x, sbn_tensor_ref(x));
  memcpy(b->saved_mean, mean, C * sizeof(double));
  memcpy(b->saved_invstd, invstd, C * sizeof(double));
  memcpy(b->saved_aff, aff, 4 * C * sizeof(float));
  b->saved_valid = 1;
  b->saved_batch = use_batch;
  b->saved_sync = sync;
  b->saved_n = n;
  free(work);
  *out = y;
  return SBN_OK;
}

/* ---- backward ---------------------------------------------------------------- */

static int bn_backward(sbn_module *m, sbn_tensor *dy, sbn_tensor **out) {
  bn *b = sbn_module_impl(m);
  size_t C = b->C;
  char s1[96], s2[96];
  if (!b->saved_valid)
    return sbn__fail(SBN_ESTATE, "backward of layer '%s' before any forward", identity(b));
  sbn_tensor *x = b->saved_x;
  if (!sbn_tensor_same_shape(x, dy))
    return sbn__fail(SBN_ESHAPE, "layer '%s' got dy of shape %s for an input of shape %s",
                     identity(b), sbn_tensor_shape_str(dy, s1, sizeof(s1)),
                     sbn_tensor_shape_str(x, s2, sizeof(s2)));
  bn_tensors t;
  int rc = get_tensors(m, b, &t);
  if (rc != SBN_OK) return rc;
  size_t N = 0, S = 0;
  split_shape(b, x, &N, &S);
  const int relu = !!(b->flags & SBN_BN_FUSED_RELU);
  sbn_tensor *dx = NULL;
  /* 7C doubles, then 3C floats. */
  double *work = malloc(7 * C * sizeof(double) + 3 * C * sizeof(float));
  if (!work) return sbn__fail(SBN_ENOMEM, "out of memory in '%s' backward", identity(b));
  double *sdy = work, *sdyx = work + C, *gdy = work + 2 * C, *gdyx = work + 3 * C;
  double *k = work + 4 * C, *c1 = work + 5 * C, *q = work + 6 * C;
  float *kcq = (float *)(work + 7 * C);
  if ((rc = sbn__tensor_new_uninit(sbn_tensor_ndim(x), sbn_tensor_shape(x), &dx)) != SBN_OK) {
    free(work);
    return rc;
  }
  const double *mean = b->saved_mean, *invstd = b->saved_invstd;
  /* With the fused ReLU, dy is masked by the forward's y > 0 inside both
   * passes; everything below is then BatchNorm's backward of the masked dy. */
  grad_sums(sbn_tensor_cdata(x), sbn_tensor_cdata(dy), N, C, S, mean, b->saved_aff, sdy, sdyx,
            relu);
  for (size_t c = 0; c < C; c++) sdyx[c] *= invstd[c]; /* now Σ dy·x̂ */
  const float *w = t.w ? sbn_tensor_cdata(t.w) : NULL;
  if (b->saved_batch) {
    if (b->saved_sync) {
      rc = sbn_sync_sums(b->saved_sync, identity(b), C, sdy, sdyx, gdy, gdyx);
      if (rc != SBN_OK) {
        sbn_tensor_free(dx);
        free(work);
        return rc;
      }
    } else {
      memcpy(gdy, sdy, C * sizeof(double));
      memcpy(gdyx, sdyx, C * sizeof(double));
    }
    /* dx = w·invstd·(dy - Σdy/n - x̂·Σ(dy·x̂)/n), x̂ = (x - mean)·invstd. */
    double n = (double)b->saved_n;
    for (size_t c = 0; c < C; c++) {
      k[c] = (w ? (double)w[c] : 1.0) * invstd[c];
      c1[c] = n > 0 ? gdy[c] / n : 0.0;
      q[c] = n > 0 ? k[c] * invstd[c] * gdyx[c] / n : 0.0;
    }
  } else {
    /* Running statistics are constants: dx = dy·w/sqrt(rv + eps). */
    for (size_t c = 0; c < C; c++) {
      k[c] = (w ? (double)w[c] : 1.0) * invstd[c];
      c1[c] = q[c] = 0.0;
    }
  }
  for (size_t c = 0; c < C; c++) {
    kcq[c] = (float)k[c];
    kcq[C + c] = (float)c1[c];
    kcq[2 * C + c] = (float)q[c];
  }
  grad_input(sbn_tensor_cdata(x), sbn_tensor_cdata(dy), sbn_tensor_data(dx), N, C, S,
             b->saved_aff, kcq, relu);
  /* Local parameter gradients; a frozen layer's weight and bias get none. */
  if (b->affine && !b->freeze) {
    sbn_tensor *gw = sbn_tensor_grad(t.w), *gb = sbn_tensor_grad(t.b);
    float *pw = gw ? sbn_tensor_data(gw) : NULL, *pb = gb ? sbn_tensor_data(gb) : NULL;
    for (size_t c = 0; c < C; c++) {
      if (pw) pw[c] = (float)((double)pw[c] + sdyx[c]);
      if (pb) pb[c] = (float)((double)pb[c] + sdy[c]);
    }
  }
  free(work);
  *out = dx;
  return SBN_OK;
}

/* ---- the rest of the vtable -------------------------------------------------- */

static int bn_extra_repr(const sbn_module *m, char *buf, size_t len) {
  const bn *b = sbn_module_impl(m);
  char e[40], mo[40];
  /* MegEngine's text; the flags (ours) are appended only when set. */
  return snprintf(buf, len, "%zu, eps=%s, momentum=%s, affine=%s, track_running_stats=%s%s%s",
                  b->C, sbn__py_float(b->eps, e, sizeof(e)),
                  sbn__py_float(b->momentum, mo, sizeof(mo)), b->affine ? "True" : "False",
                  b->track ? "True" : "False",
                  b->flags & SBN_BN_CHANNELS_LAST ? ", channels_last=True" : "",
                  b->flags & SBN_BN_FUSED_RELU ? ", fused_relu=True" : "");
}

static void bn_destroy(void *impl) {
  bn *b = impl;
  if (!b) return;
  sbn_tensor_free(b->saved_x);
  free(b->saved_mean);
  free(b->saved_invstd);
  free(b->saved_aff);
  free(b->user_name);
  free(b->path_name);
  free(b);
}

static int bn_reset_running_stats(sbn_module *m) {
  bn *b = sbn_module_impl(m);
  bn_tensors t;
  if (!b->track) return SBN_OK;
  int rc = get_tensors(m, b, &t);
  if (rc != SBN_OK) return rc;
  sbn_tensor_fill(t.rm, 0.0f);
  sbn_tensor_fill(t.rv, 1.0f);
  return SBN_OK;
}

static int bn_reset_parameters(sbn_module *m) {
  bn *b = sbn_module_impl(m);
  bn_tensors t;
  int rc = get_tensors(m, b, &t);
  if (rc != SBN_OK) return rc;
  bn_reset_running_stats(m);
  if (b->affine) {
    sbn_tensor_fill(t.w, 1.0f);
    sbn_tensor_fill(t.b, 0.0f);
  }
  return SBN_OK;
}

const sbn_module_vtable sbn__batchnorm_vtable = {
    .type_name = "BatchNorm",
    .forward = bn_forward,
    .backward = bn_backward,
    .extra_repr = bn_extra_repr,
    .destroy = bn_destroy,
    .reset_parameters = bn_reset_parameters,
    .reset_running_stats = bn_reset_running_stats,
    .flags = SBN_MODULE_FLAT_STATE,
};

const sbn_module_vtable sbn__syncbatchnorm_vtable = {
    .type_name = "SyncBatchNorm",
    .forward = bn_forward,
    .backward = bn_backward,
    .extra_repr = bn_extra_repr,
    .destroy = bn_destroy,
    .reset_parameters = bn_reset_parameters,
    .reset_running_stats = bn_reset_running_stats,
    .flags = SBN_MODULE_FLAT_STATE,
};

/* ---- construction ------------------------------------------------------------- */

SBN_API void sbn_bn_options_init(sbn_bn_options *o, size_t num_features) {
  if (!o) return;
  memset(o, 0, sizeof(*o));
  o->num_features = num_features;
  o->eps = 1e-5;
  o->momentum = 0.9;
  o->affine = 1;
  o->track_running_stats = 1;
}

static int check_options(const sbn_bn_options *o) {
  char v[40];
  if (!o) return sbn__fail(SBN_EINVAL, "batchnorm options are NULL");
  if (o->num_features == 0) return sbn__fail(SBN_EINVAL, "num_features must be at least 1");
  if (!isfinite(o->eps) || o->eps < 0)
    return sbn__fail(SBN_EINVAL, "eps %s is not a finite value >= 0",
                     sbn__py_float(o->eps, v, sizeof(v)));
  if (!isfinite(o->momentum) || o->momentum < 0 || o->momentum > 1)
    return sbn__fail(SBN_EINVAL, "momentum %s is outside [0, 1]",
                     sbn__py_float(o->momentum, v, sizeof(v)));
  if (o->freeze && !o->track_running_stats)
    return sbn__fail(SBN_EINVAL, "freeze needs track_running_stats (a frozen layer normalizes "
                                 "with running statistics)");
  if (o->flags & ~KNOWN_FLAGS)
    return sbn__fail(SBN_EINVAL, "unknown batchnorm flags 0x%x (known: SBN_BN_CHANNELS_LAST 0x%x, "
                                 "SBN_BN_FUSED_RELU 0x%x)",
                     o->flags & ~KNOWN_FLAGS, SBN_BN_CHANNELS_LAST, SBN_BN_FUSED_RELU);
  for (size_t i = 0; i < sizeof(o->reserved) / sizeof(o->reserved[0]); i++)
    if (o->reserved[i]) return sbn__fail(SBN_EINVAL, "batchnorm options reserved[%zu] is set", i);
  if (o->num_features > SIZE_MAX / (16 * sizeof(double)))
    return sbn__fail(SBN_EINVAL, "num_features %zu is too large", o->num_features);
  return check_layer_name(o->name);
}

static int add_filled(sbn_module *m, const char *name, size_t C, float v, int param) {
  sbn_tensor *t;
  int rc = sbn_tensor_new(1, &C, &t);
  if (rc != SBN_OK) return rc;
  sbn_tensor_fill(t, v);
  rc = param ? sbn_module_set_parameter(m, name, t) : sbn_module_set_buffer(m, name, t);
  sbn_tensor_free(t);
  return rc;
}

static int bn_new(const sbn_module_vtable *vt, const sbn_bn_options *o, sbn_module **out) {
  if (!out) return sbn__fail(SBN_EINVAL, "batchnorm output pointer is NULL");
  int rc = check_options(o);
  if (rc != SBN_OK) return rc;
  bn *b = calloc(1, sizeof(*b));
  if (!b) return sbn__fail(SBN_ENOMEM, "out of memory creating a batchnorm");
  size_t C = o->num_features;
  b->C = C;
  b->eps = o->eps;
  b->momentum = o->momentum;
  b->affine = !!o->affine;
  b->track = !!o->track_running_stats;
  b->freeze = !!o->freeze;
  b->flags = o->flags;
  b->group = o->group;
  snprintf(b->default_name, sizeof(b->default_name), "SyncBatchNorm#%lu",
           atomic_fetch_add(&layer_counter, 1));
  b->saved_mean = malloc(C * sizeof(double));
  b->saved_invstd = malloc(C * sizeof(double));
  b->saved_aff = malloc(4 * C * sizeof(float));
  if (o->name) b->user_name = strdup(o->name);
  sbn_module *m = NULL;
  if (!b->saved_mean || !b->saved_invstd || !b->saved_aff || (o->name && !b->user_name)) {
    bn_destroy(b);
    return sbn__fail(SBN_ENOMEM, "out of memory creating a batchnorm");
  }
  if ((rc = sbn_module_new(vt, b, &m)) != SBN_OK) return rc; /* b destroyed */
  /* MegEngine's attribute order, which repr does not show for tensors. */
  if (b->affine) {
    if (rc == SBN_OK) rc = add_filled(m, "weight", C, 1.0f, 1);
    if (rc == SBN_OK) rc = add_filled(m, "bias", C, 0.0f, 1);
  }
  if (b->track) {
    if (rc == SBN_OK) rc = add_filled(m, "running_mean", C, 0.0f, 0);
    if (rc == SBN_OK) rc = add_filled(m, "running_var", C, 1.0f, 0);
  }
  if (rc != SBN_OK) {
    sbn_module_free(m);
    return rc;
  }
  *out = m;
  return SBN_OK;
}

SBN_API int sbn_batchnorm_new(const sbn_bn_options *o, sbn_module **out) {
  return bn_new(&sbn__batchnorm_vtable, o, out);
}

SBN_API int sbn_syncbatchnorm_new(const sbn_bn_options *o, sbn_module **out) {
  return bn_new(&sbn__syncbatchnorm_vtable, o, out);
}

/* ---- accessors ------------------------------------------------------------------ */

SBN_API int sbn_bn_kind(const sbn_module *m) {
  if (!m || !is_bn(m)) return -1;
  return sbn_module_vtable_of(m) == &sbn__syncbatchnorm_vtable;
}

static bn *bn_of(const sbn_module *m) {
  if (!m || !is_bn(m)) {
    sbn__fail(SBN_EINVAL, "module '%s' is not a BatchNorm", m ? sbn_module_type_name(m) : "(null)");
    return NULL;
  }
  return sbn_module_impl(m);
}

SBN_API int sbn_bn_get_options(const sbn_module *m, sbn_bn_options *o) {
  bn *b = bn_of(m);
  if (!b) return SBN_EINVAL;
  if (!o) return sbn__fail(SBN_EINVAL, "options pointer is NULL");
  sbn_bn_options_init(o, b->C);
  o->eps = b->eps;
  o->momentum = b->momentum;
  o->affine = b->affine;
  o->track_running_stats = b->track;
  o->freeze = b->freeze;
  o->flags = b->flags;
  o->group = b->group;
  o->name = identity(b);
  return SBN_OK;
}

SBN_API int sbn_bn_set_freeze(sbn_module *m, int freeze) {
  bn *b = bn_of(m);
  if (!b) return SBN_EINVAL;
  if (freeze && !b->track)
    return sbn__fail(SBN_EINVAL, "layer '%s' does not track running stats and cannot freeze",
                     identity(b));
  b->freeze = !!freeze;
  return SBN_OK;
}

SBN_API int sbn_bn_set_group(sbn_module *m, sbn_group *g) {
  bn *b = bn_of(m);
  if (!b) return SBN_EINVAL;
  b->group = g;
  return SBN_OK;
}

SBN_API int sbn_bn_set_name(sbn_module *m, const char *name) {
  bn *b = bn_of(m);
  if (!b) return SBN_EINVAL;
  int rc = check_layer_name(name);
  if (rc != SBN_OK) return rc;
  char *copy = NULL;
  if (name && !(copy = strdup(name))) return sbn__fail(SBN_ENOMEM, "out of memory naming a layer");
  free(b->user_name);
  b->user_name = copy;
  return SBN_OK;
}

SBN_API const char *sbn_bn_layer_name(const sbn_module *m) {
  if (!m || !is_bn(m)) return NULL;
  return identity(sbn_module_impl(m));
}

int sbn__bn_set_path_name(sbn_module *m, const char *path) {
  bn *b = sbn_module_impl(m);
  char *copy = strdup(path);
  if (!copy) return sbn__fail(SBN_ENOMEM, "out of memory naming a layer");
  free(b->path_name);
  b->path_name = copy;
  return SBN_OK;
}

int sbn__bn_check_path_name(const char *path) { return check_layer_name(path); }
