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
/* No contraction of a*b + c into an FMA anywhere in this file: the kernels
 * must give the same bits on every CPU and dispatch path (see "dispatch"). */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <float.h>
#include <math.h>
#include <stdatomic.h>
#include <stddef.h>
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

/* Per thread: ranks run as threads of one process, each building its own
 * model, then number their layers alike (test_syncbn_dist). */
static _Thread_local unsigned long layer_counter;
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
 * The kernels use GCC/Clang vector extensions: 8 floats (v8f) and 4
 * doubles (v4d) at a time, written once and compiled up to four times
 * (see "dispatch" below): for the x86-64 baseline (SSE2, where the compiler
 * splits each 32-byte operation in two 16-byte ones), with AVX2, with
 * AVX2+FMA and with AVX-512, chosen at run time.  The AVX-512 copy runs
 * its own variants of the sums' inner loops (plane_stats_one8,
 * plane_grad_sums_one8 and the FM_512 blocks of the row sums) and of the
 * row kernels' element-wise passes (rows_normalize_block16,
 * rows_grad_input_block16) on 16 floats (v16f) and 8 doubles (v8d),
 * because GCC does not fuse two 256-bit operations into one 512-bit one and
 * splits 64-byte vectors badly without AVX-512 (so the other copies keep
 * the 256-bit loops).  The sums' variants give
 * every double lane the same values in the same order: a v8d holds two of
 * the v4d lanes (s01 = s0 and s1), a 4-value tail adds +0 to the other
 * half, and the folds are the same.  Floating-point contraction is off for
 * this file, and FMAs are used only as exact additions (acc_add, acc_add8),
 * so every path gives the same bits: a SyncBatchNorm rank computes the same
 * values whatever its CPU.  The element-wise kernels do exactly the scalar
 * operations, so a value's result does not depend on its position or the
 * vector width; the sums have a fixed order, so every run gives the same
 * bits.
 *
 * Two families, each with the same passes over the data:
 *   - plane kernels (S > 1): N*C contiguous planes of S values, inner loop
 *     over S (NCHW inputs with a spatial size).  A channel's sums run over
 *     its N planes in 16 double lanes (four v4d accumulators per sum, two
 *     v8d with AVX-512: the additions' latency is hidden), folded once per
 *     channel (see plane_stats for the two walking orders);
 *   - row kernels (S == 1): R rows of C contiguous values, inner loop over
 *     C with per-channel partial sums kept in double arrays across rows
 *     (channels-last inputs as (R, C), and NCHW inputs without spatial
 *     size, which are the same layout).  The sums handle RB rows per sweep
 *     of 16 channels (32 with AVX-512) so the partial sums are loaded and
 *     stored once per RB rows, or with AVX-512 all rows of 16 to 64
 *     channels in one sweep (ROWS_ALL16); each channel's sum still adds the
 *     rows in order, so the result does not depend on the blocking (nor on
 *     RBE or RBE_FM, the element-wise passes' rows per sweep).
 * The normalization's per-channel constants are floats: y = ((x - hi) - lo)
 * * a + b with hi = float(mean), lo = float(mean - hi) (the exact
 * subtraction of the mean, see normalize), a = float(weight * invstd),
 * b = float(bias), stored as aff = [hi(C) lo(C) a(C) b(C)].
 *
 * Fused ReLU: y = max(0, v) in the normalization store; backward keeps dy
 * where v = ((x - hi) - lo) * a + b > 0, v recomputed with the forward's
 * saved constants by the same expression (so the same bits as the
 * forward's), inside the sums pass and the dx pass; the AVX-512 sums (over
 * rows and over planes) compare x with a per-channel threshold instead, the
 * same mask (relu_thresholds, plane_relu_thresholds).
 */
/* The 32- and 64-byte vectors never cross a call (every helper is
 * always_inline), so GCC's note that their ABI differs without AVX or
 * AVX-512 does not apply. */
#if defined(__clang__)
#pragma clang diagnostic ignored "-Wunknown-warning-option"
#pragma clang diagnostic ignored "-Wpsabi"
#elif defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef int v8si __attribute__((vector_size(32)));
typedef int v4si __attribute__((vector_size(16)));
typedef double v4d __attribute__((vector_size(32)));
typedef double v2d __attribute__((vector_size(16)));
/* 64-byte vectors: only in the AVX-512 kernels (see "dispatch"). */
typedef float v16f __attribute__((vector_size(64)));
typedef int v16si __attribute__((vector_size(64)));
typedef unsigned v16su __attribute__((vector_size(64)));
typedef double v8d __attribute__((vector_size(64)));
#define RB 8 /* rows per sweep in the row kernels' sums */
/* Rows per sweep in the row kernels' element-wise passes: 8 for wide rows
 * (the constants stay in registers), 1 for narrow ones, where a sweep of
 * a few rows of a few cache lines each was slower than streaming row by row
 * (measured; the results do not depend on it). */
#define RBE(C) ((C) >= 128 ? 8 : 1)
/* The 512-bit blocks of rows_normalize and rows_grad_input: nb * 16
 * channels from c (nb = 1..4, up to nbmax, a constant in every call). */
#define ROWS_BLOCKS16(block, nbmax, ...)                                                           \
  do {                                                                                             \
    for (; c + 16 * (nbmax) <= C; c += 16 * (nbmax)) block(__VA_ARGS__, c, nbmax, relu);           \
    const size_t left_ = (C - c) / 16;                                                             \
    if (left_ == 3) block(__VA_ARGS__, c, 3, relu);                                                \
    if (left_ == 2) block(__VA_ARGS__, c, 2, relu);                                                \
    if (left_ == 1) block(__VA_ARGS__, c, 1, relu);                                                \
    c += 16 * left_;                                                                               \
  } while (0)
/* Rows of 16, 32, 48 or 64 channels with AVX-512: the element-wise row
 * kernels take all rows in one sweep (their constants stay in registers),
 * and so do the statistics and the backward's sums from ROWS_ALL_MIN rows
 * (rows_stats_all16, rows_grad_sums_all16). */
#define ROWS_ALL16(C, fm) ((fm) & FM_512 && (C) <= 64 && (C) % 16 == 0)
/* Rows per sweep of the element-wise row kernels: RBE, or all rows. */
#define RBE_FM(C, R, fm) (ROWS_ALL16(C, fm) ? (R) : RBE(C))
/* Fewer rows keep the sweeps of RB rows: the sums' setup in registers then
 * cost more than it saved (measured). */
#define ROWS_ALL_MIN 128
/* Bytes ahead that rows_grad_input_block16 prefetches x and dy when it
 * streams all rows (measured: 1 to 4 KB gave the same). */
#define ROWS_PREFETCH 2048
#define KERNEL static inline __attribute__((always_inline))

KERNEL v4f ld4f(const float *p) {
  v4f v;
  memcpy(&v, p, sizeof(v));
  return v;
}
KERNEL v8f ld8f(const float *p) {
  v8f v;
  memcpy(&v, p, sizeof(v));
  return v;
}
KERNEL void st4f(float *p, v4f v) { memcpy(p, &v, sizeof(v)); }
KERNEL void st8f(float *p, v8f v) { memcpy(p, &v, sizeof(v)); }
KERNEL v4d ld4d(const double *p) {
  v4d v;
  memcpy(&v, p, sizeof(v));
  return v;
}
KERNEL void st4d(double *p, v4d v) { memcpy(p, &v, sizeof(v)); }
KERNEL v16f ld16f(const float *p) {
  v16f v;
  memcpy(&v, p, sizeof(v));
  return v;
}
KERNEL v8d ld8d(const double *p) {
  v8d v;
  memcpy(&v, p, sizeof(v));
  return v;
}
/* 64-byte vectors go by address (or through macros): as parameters, GCC
 * notes that the ABI for 64-byte alignment changed, whatever the pragma
 * above says. */
KERNEL void st8d(double *p, const v8d *v) { memcpy(p, v, sizeof(*v)); }
KERNEL void st16f(float *p, const v16f *v) { memcpy(p, v, sizeof(*v)); }
/* float -> double conversions (exact), written element-wise: GCC 12 splits
 * __builtin_convertvector to v4d in two, but this becomes one vcvtps2pd. */
KERNEL v4d cvt4(v4f v) { return (v4d){v[0], v[1], v[2], v[3]}; }
KERNEL v4d cvt_lo(v8f v) { return (v4d){v[0], v[1], v[2], v[3]}; }
KERNEL v4d cvt_hi(v8f v) { return (v4d){v[4], v[5], v[6], v[7]}; }
KERNEL v16f splat16(float f) { return (v16f){f, f, f, f, f, f, f, f, f, f, f, f, f, f, f, f}; }
KERNEL v8d splat8d(double d) { return (v8d){d, d, d, d, d, d, d, d}; }
KERNEL v8f splat8(float f) { return (v8f){f, f, f, f, f, f, f, f}; }
KERNEL v4f splat4(float f) { return (v4f){f, f, f, f}; }
KERNEL v4d splat4d(double d) { return (v4d){d, d, d, d}; }
KERNEL double hsum4d(v4d v) { return (v[0] + v[1]) + (v[2] + v[3]); }

/*
 * fm, the last parameter of every kernel: the dispatch path's flags (a
 * constant in each compiled copy, see "dispatch").  FM_FMA: acc_add is an
 * FMA; FM_512: the sums run their 512-bit variants; FM_SPLIT (the generic
 * copy): 8 floats are compared as two halves of 4 (le0_8).
 */
enum { FM_FMA = 1, FM_512 = 2, FM_SPLIT = 4 };

/*
 * a + b, or with FM_FMA fma(b, 1, a): b * 1 is exact, so the FMA rounds
 * a + b once, exactly like the addition, and gives the same bits; it only
 * runs on the multiply-add units, which the sums' additions would otherwise
 * queue behind (see "dispatch").  GCC's x86 builtins (SBN_BN_BUILTINS) only
 * with optimization, where the branches a kernel copy does not take are gone
 * before GCC checks the builtin's ISA.
 */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__OPTIMIZE__)
#define SBN_BN_BUILTINS 1
#include <immintrin.h> /* declares the builtins */
#else
#define SBN_BN_BUILTINS 0
#endif
KERNEL v4d acc_add(v4d a, v4d b, const int fm) {
#if SBN_BN_BUILTINS
  if (fm & FM_FMA) return __builtin_ia32_vfmaddpd256(b, splat4d(1.0), a);
#endif
  (void)fm;
  return a + b;
}
/* The same for 8 lanes (the AVX-512 kernels only). */
KERNEL void acc_add8(v8d *a, const v8d *b, const int fm) {
#if SBN_BN_BUILTINS
  if (fm & FM_FMA) {
    *a = __builtin_ia32_vfmaddpd512_mask(*b, splat8d(1.0), *a, (unsigned char)-1, 4);
    return;
  }
#endif
  (void)fm;
  *a += *b;
}

/*
 * Broadcasts: a value to every lane.  GCC 12 builds a vector of equal
 * non-constant elements ({f, f, ...}, splat8 and so on) in a target("...")
 * function one element at a time (masked broadcasts or inserts, 16 for a
 * v16f, zext4d likewise), outside the inner loops but once per plane, which
 * cost the plane kernels more than their inner loops on small planes (the
 * fused-ReLU backward ran at half the speed of the plain one): the builtins
 * (one vbroadcastss or vbroadcastsd each) on every path with AVX, the
 * vector literals elsewhere.  Same values either way.
 */
KERNEL v8f bcast8(const float *p, const int fm) {
#if SBN_BN_BUILTINS
  if (!(fm & FM_SPLIT)) return __builtin_ia32_vbroadcastss256(p);
#endif
  (void)fm;
  return splat8(*p);
}
KERNEL v4f bcast4(const float *p, const int fm) {
#if SBN_BN_BUILTINS
  if (!(fm & FM_SPLIT)) return __builtin_ia32_vbroadcastss(p);
#endif
  (void)fm;
  return splat4(*p);
}
/* The AVX-512 kernels only. */
KERNEL v16f bcast16(const float *p) {
#if SBN_BN_BUILTINS
  return __builtin_ia32_broadcastss512((v4f){*p, 0, 0, 0}, splat16(0.0f), (unsigned short)-1);
#else
  return splat16(*p);
#endif
}
KERNEL v8d bcast8d(double d) {
#if SBN_BN_BUILTINS
  return __builtin_ia32_broadcastsd512((v2d){d, 0}, splat8d(0.0), (unsigned char)-1);
#else
  return splat8d(d);
#endif
}
/* v in the low half, +0 in the high one. */
KERNEL v8d zext4d(v4d v) {
#if SBN_BN_BUILTINS
  return __builtin_ia32_insertf64x4_mask(splat8d(0.0), v, 0, splat8d(0.0), (unsigned char)-1);
#else
  return (v8d){v[0], v[1], v[2], v[3], 0, 0, 0, 0};
#endif
}

/* float -> double of 8 values, of the low and high halves of 16 (the AVX-512
 * kernels only).  GCC 12 splits __builtin_convertvector to v8d in 256-bit
 * pieces, and builds the element-wise form of a half of a masked vector
 * (KEEP16) element by element: the builtin, on halves taken by memcpy. */
KERNEL v8d cvt8(v8f v) {
#if SBN_BN_BUILTINS
  return __builtin_ia32_cvtps2pd512_mask(v, splat8d(0.0), (unsigned char)-1, 4);
#else
  return (v8d){v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]};
#endif
}
KERNEL v8d cvt16_lo(const v16f *p) {
  v8f h;
  memcpy(&h, p, sizeof(h));
  return cvt8(h);
}
KERNEL v8d cvt16_hi(const v16f *p) {
  v8f h;
  memcpy(&h, (const char *)p + sizeof(h), sizeof(h));
  return cvt8(h);
}

/* The normalization of one value, 8, 4 and 1 at a time: the same operations. */
KERNEL v8f aff8(v8f x, v8f h, v8f l, v8f a, v8f b) { return ((x - h) - l) * a + b; }
KERNEL v4f aff4(v4f x, v4f h, v4f l, v4f a, v4f b) { return ((x - h) - l) * a + b; }
KERNEL float aff1(float x, float h, float l, float a, float b) { return ((x - h) - l) * a + b; }
/* v <= 0 as a mask.  Without 32-byte vectors GCC compares v8f one element
 * at a time, with branches (the ReLU kernels ran at 1-2 GB/s): FM_SPLIT
 * compares the two halves instead. */
KERNEL v8si le0_8(v8f v, const int fm) {
  if (!(fm & FM_SPLIT)) return (v8si)(v <= splat8(0.0f));
  v4f lo, hi;
  memcpy(&lo, &v, sizeof(lo));
  memcpy(&hi, (const char *)&v + sizeof(lo), sizeof(hi));
  const v4si ml = (v4si)(lo <= splat4(0.0f)), mh = (v4si)(hi <= splat4(0.0f));
  v8si m;
  memcpy(&m, &ml, sizeof(ml));
  memcpy((char *)&m + sizeof(ml), &mh, sizeof(mh));
  return m;
}
/* ReLU: +0 where v <= 0, else v (a NaN passes, as in PyTorch). */
KERNEL v8f relu8(v8f v, const int fm) { return (v8f)((v8si)v & ~le0_8(v, fm)); }
KERNEL v4f relu4(v4f v) { return (v4f)((v4si)v & ~(v4si)(v <= splat4(0.0f))); }
KERNEL float relu1(float v) { return v <= 0 ? 0.0f : v; }
/*
 * ReLU's backward: g where v > 0 (or NaN), else +0.  With AVX-512, GCC turns
 * this into a zero-masking load of g under the compare's mask, which made
 * the fused-ReLU backward almost twice as slow here (a Zen 5) as the compare
 * and and-not; an empty asm (MASK_BARRIER, GCC with optimization, where
 * the kernels without FM_512 have dropped it before the asm is checked)
 * hides the mask's origin.  KEEP16 is a macro: a 64-byte vector parameter
 * would make GCC note an ABI change once per build.
 */
#if SBN_BN_BUILTINS
#define MASK_BARRIER(m, fm)                                                                        \
  do {                                                                                             \
    if ((fm) & FM_512) __asm__("" : "+v"(m));                                                      \
  } while (0)
#else
#define MASK_BARRIER(m, fm) ((void)(fm))
#endif
#define KEEP16(v, g)                                                                               \
  __extension__({                                                                                  \
    v16si m_ = (v16si)((v) <= splat16(0.0f));                                                      \
    MASK_BARRIER(m_, FM_512);                                                                      \
    (v16f)((v16si)(g) & ~m_);                                                                      \
  })
KERNEL v8f keep8(v8f v, v8f g, const int fm) {
  v8si m = le0_8(v, fm);
  MASK_BARRIER(m, fm);
  return (v8f)((v8si)g & ~m);
}
KERNEL v4f keep4(v4f v, v4f g, const int fm) {
  v4si m = (v4si)(v <= splat4(0.0f));
  MASK_BARRIER(m, fm);
  return (v4f)((v4si)g & ~m);
}
KERNEL float keep1(float v, float g) { return v <= 0 ? 0.0f : g; }

/* Per-channel constants of the element-wise kernels, 8, 4 or 1 channels. */
typedef struct {
  v8f h, l, a, b;
} aff8_t;
typedef struct {
  v4f h, l, a, b;
} aff4_t;
KERNEL aff8_t aff8_at(const float *aff, size_t C, size_t c) {
  return (aff8_t){ld8f(aff + c), ld8f(aff + C + c), ld8f(aff + 2 * C + c), ld8f(aff + 3 * C + c)};
}
KERNEL aff4_t aff4_at(const float *aff, size_t C, size_t c) {
  return (aff4_t){ld4f(aff + c), ld4f(aff + C + c), ld4f(aff + 2 * C + c), ld4f(aff + 3 * C + c)};
}
KERNEL aff8_t aff8_splat(const float *aff, size_t C, size_t c, const int fm) {
  return (aff8_t){bcast8(aff + c, fm), bcast8(aff + C + c, fm), bcast8(aff + 2 * C + c, fm),
                  bcast8(aff + 3 * C + c, fm)};
}
KERNEL aff4_t aff4_splat(const float *aff, size_t C, size_t c, const int fm) {
  return (aff4_t){bcast4(aff + c, fm), bcast4(aff + C + c, fm), bcast4(aff + 2 * C + c, fm),
                  bcast4(aff + 3 * C + c, fm)};
}
KERNEL v8f fwd8(v8f x, aff8_t k) { return aff8(x, k.h, k.l, k.a, k.b); }
KERNEL v4f fwd4(v4f x, aff4_t k) { return aff4(x, k.h, k.l, k.a, k.b); }
KERNEL float fwd1(float x, const float *aff, size_t C, size_t c) {
  return aff1(x, aff[c], aff[C + c], aff[2 * C + c], aff[3 * C + c]);
}

/* Sums of d = x - k and d² for 4 values into s and q; STATS8: 8 values
 * already in double. */
#define STATS4(xv4, kv, s, q)                                                                      \
  do {                                                                                             \
    const v4d d_ = cvt4(xv4) - (kv);                                                               \
    (s) = acc_add((s), d_, fm);                                                                    \
    (q) += d_ * d_;                                                                                \
  } while (0)
#define STATS8(xd8, kv, s, q)                                                                      \
  do {                                                                                             \
    const v8d d_ = (xd8) - (kv);                                                                   \
    acc_add8(&(s), &d_, fm);                                                                       \
    (q) += d_ * d_;                                                                                \
  } while (0)

/*
 * Per-channel count, mean and M2 in one read.  Sums of d = x - K in double,
 * K being the channel's first value: with K a sample of the channel the
 * textbook cancellation of Σx² - (Σx)²/n cannot happen, and
 * M2 = Σd² - (Σd)²/n is accurate to double precision.
 *
 * A channel's sums live in 16 double lanes (plus a scalar for the plane
 * tails) that run over its planes n = 0..N-1 in order.  The walk is either
 * channel by channel (sums in registers; small planes) or in memory order
 * (sums kept in acc between planes; large planes, which then stream): each
 * lane sees the same values in the same order, so both give the same bits.
 */
typedef struct {
  v4d s0, s1, s2, s3, q0, q1, q2, q3;
  double st, qt;
} stats_acc;
#define STATS_ACC_DOUBLES (sizeof(stats_acc) / sizeof(double))
#define PLANE_STREAM_MIN 256 /* planes of at least this many values stream */
/* Scratch of the statistics and of the backward's sums, per channel: the
 * sums, then the ReLU's threshold and its flag (plane_grad_sums). */
#define ACC_DOUBLES (STATS_ACC_DOUBLES + 1)
/* The same lanes for the AVX-512 kernels, s01 = (s0, s1) and so on: the
 * same bytes up to qt (stats_acc8 has more padding). */
typedef struct {
  v8d s01, s23, q01, q23;
  double st, qt;
} stats_acc8;
#define STATS_ACC_BYTES (offsetof(stats_acc, qt) + sizeof(double))
_Static_assert(offsetof(stats_acc8, qt) == offsetof(stats_acc, qt), "stats_acc8 layout");

KERNEL void plane_stats_one(const float *p, size_t S, float k, stats_acc *a, const int fm) {
  const v4d kv = splat4d(k);
  size_t i = 0;
  for (; i + 16 <= S; i += 16) {
    STATS4(ld4f(p + i), kv, a->s0, a->q0);
    STATS4(ld4f(p + i + 4), kv, a->s1, a->q1);
    STATS4(ld4f(p + i + 8), kv, a->s2, a->q2);
    STATS4(ld4f(p + i + 12), kv, a->s3, a->q3);
  }
  for (; i + 4 <= S; i += 4) STATS4(ld4f(p + i), kv, a->s0, a->q0);
  for (; i < S; i++) {
    const double d = (double)p[i] - k;
    a->st += d;
    a->qt += d * d;
  }
}

/* The tails of plane_stats_one8 from i: each lane adds the same values in
 * the same order as plane_stats_one (the 4-value tail adds +0 to s1 and q1,
 * which changes nothing: the sums start at +0 and so are never -0). */
KERNEL void plane_stats_tail8(const float *p, size_t i, size_t S, float k, stats_acc8 *a,
                              const int fm) {
  for (; i + 4 <= S; i += 4) {
    const v4d d = cvt4(ld4f(p + i)) - splat4d(k);
    const v8d d8 = zext4d(d);
    acc_add8(&a->s01, &d8, fm);
    a->q01 += zext4d(d * d);
  }
  for (; i < S; i++) {
    const double d = (double)p[i] - k;
    a->st += d;
    a->qt += d * d;
  }
}

/* plane_stats_one with 512-bit vectors. */
KERNEL void plane_stats_one8(const float *p, size_t S, float k, stats_acc8 *a, const int fm) {
  const v8d kv = bcast8d(k);
  size_t i = 0;
  for (; i + 16 <= S; i += 16) {
    const v16f xv = ld16f(p + i);
    STATS8(cvt16_lo(&xv), kv, a->s01, a->q01);
    STATS8(cvt16_hi(&xv), kv, a->s23, a->q23);
  }
  plane_stats_tail8(p, i, S, k, a, fm);
}

/*
 * plane_stats_one8 for two channels' planes p and r of the same size at
 * once, into a and b: the same additions in the same order for each, so the
 * same bits.  One channel's sums are four chains of dependent additions
 * (16 lanes in two 512-bit vectors, sums and squares), which bound a plane
 * at one 16-value block per addition's latency; two channels side by side
 * double the independent additions.
 */
KERNEL void plane_stats_two8(const float *p, const float *r, size_t S, float k, float kr,
                             stats_acc8 *a, stats_acc8 *b, const int fm) {
  const v8d kv = bcast8d(k), kw = bcast8d(kr);
  size_t i = 0;
  for (; i + 16 <= S; i += 16) {
    const v16f xv = ld16f(p + i), yv = ld16f(r + i);
    STATS8(cvt16_lo(&xv), kv, a->s01, a->q01);
    STATS8(cvt16_lo(&yv), kw, b->s01, b->q01);
    STATS8(cvt16_hi(&xv), kv, a->s23, a->q23);
    STATS8(cvt16_hi(&yv), kw, b->s23, b->q23);
  }
  plane_stats_tail8(p, i, S, k, a, fm);
  plane_stats_tail8(r, i, S, kr, b, fm);
}

/* Planes n0..n1-1 of channels c and c + 1 into a and b (AVX-512 only). */
KERNEL void plane_stats_run2(const float *x, size_t C, size_t S, size_t c, size_t n0, size_t n1,
                             stats_acc *a, stats_acc *b, const int fm) {
  const float k = x[c * S], kr = x[(c + 1) * S];
  stats_acc8 a8, b8;
  memcpy(&a8, a, STATS_ACC_BYTES);
  memcpy(&b8, b, STATS_ACC_BYTES);
  for (size_t n = n0; n < n1; n++) {
    const float *p = x + (n * C + c) * S;
    plane_stats_two8(p, p + S, S, k, kr, &a8, &b8, fm);
  }
  memcpy(a, &a8, STATS_ACC_BYTES);
  memcpy(b, &b8, STATS_ACC_BYTES);
}

/* Planes n0..n1-1 of channel c into a. */
KERNEL void plane_stats_run(const float *x, size_t C, size_t S, size_t c, size_t n0, size_t n1,
                            stats_acc *a, const int fm) {
  const float k = x[c * S];
  if (fm & FM_512) {
    stats_acc8 a8;
    memcpy(&a8, a, STATS_ACC_BYTES);
    for (size_t n = n0; n < n1; n++) plane_stats_one8(x + (n * C + c) * S, S, k, &a8, fm);
    memcpy(a, &a8, STATS_ACC_BYTES);
    return;
  }
  for (size_t n = n0; n < n1; n++) plane_stats_one(x + (n * C + c) * S, S, k, a, fm);
}

KERNEL void stats_finish(const stats_acc *a, float k, size_t count, double *mean, double *m2) {
  const double s = hsum4d((a->s0 + a->s1) + (a->s2 + a->s3)) + a->st;
  const double q = hsum4d((a->q0 + a->q1) + (a->q2 + a->q3)) + a->qt;
  *mean = (double)k + s / (double)count;
  const double v = q - s * s / (double)count;
  *m2 = v > 0 ? v : 0;
}

/* acc: STATS_ACC_DOUBLES * C doubles of scratch. */
KERNEL void plane_stats(const float *x, size_t N, size_t C, size_t S, double *mean, double *m2,
                        double *acc, const int fm) {
  const size_t count = N * S;
  for (size_t c = 0; c < C; c++) mean[c] = m2[c] = 0;
  if (count == 0) return;
  if (S < PLANE_STREAM_MIN) {
    /* With AVX-512, channels in pairs (plane_stats_two8): (8,256,14,14)
     * forward_train 81 -> 70 us, medians of 8 alternating runs. */
    const size_t pairs = fm & FM_512 ? C / 2 * 2 : 0;
    size_t c = 0;
    for (; c < pairs; c += 2) {
      stats_acc a, b;
      memset(&a, 0, sizeof(a));
      memset(&b, 0, sizeof(b));
      plane_stats_run2(x, C, S, c, 0, N, &a, &b, fm);
      stats_finish(&a, x[c * S], count, mean + c, m2 + c);
      stats_finish(&b, x[(c + 1) * S], count, mean + c + 1, m2 + c + 1);
    }
    for (; c < C; c++) {
      stats_acc a;
      memset(&a, 0, sizeof(a));
      plane_stats_run(x, C, S, c, 0, N, &a, fm);
      stats_finish(&a, x[c * S], count, mean + c, m2 + c);
    }
    return;
  }
  /* Streamed planes one at a time: two side by side (two streams) made
   * (64,32,56,56) 1.37x slower, and (32,64,32,32) a few percent. */
  memset(acc, 0, STATS_ACC_DOUBLES * C * sizeof(double));
  for (size_t n = 0; n < N; n++)
    for (size_t c = 0; c < C; c++) {
      stats_acc a;
      memcpy(&a, acc + STATS_ACC_DOUBLES * c, sizeof(a));
      plane_stats_run(x, C, S, c, n, n + 1, &a, fm);
      memcpy(acc + STATS_ACC_DOUBLES * c, &a, sizeof(a));
    }
  for (size_t c = 0; c < C; c++) {
    stats_acc a;
    memcpy(&a, acc + STATS_ACC_DOUBLES * c, sizeof(a));
    stats_finish(&a, x[c * S], count, mean + c, m2 + c);
  }
}

/* rows_stats' sums of nr rows of 16 * nb channels (nb = 1 or 2) with
 * 512-bit vectors: each channel still adds the rows in order; two blocks
 * make twice the independent additions. */
KERNEL void rows_stats_block8(const float *xr, size_t nr, size_t C, const double *K, double *s,
                              double *q, const int nb, const int fm) {
  v8d k[4], sv[4], qv[4];
  for (int b = 0; b < 2 * nb; b++)
    k[b] = ld8d(K + 8 * b), sv[b] = ld8d(s + 8 * b), qv[b] = ld8d(q + 8 * b);
  for (size_t j = 0; j < nr; j++)
    for (int b = 0; b < nb; b++) {
      const v16f xv = ld16f(xr + j * C + 16 * b);
      STATS8(cvt16_lo(&xv), k[2 * b], sv[2 * b], qv[2 * b]);
      STATS8(cvt16_hi(&xv), k[2 * b + 1], sv[2 * b + 1], qv[2 * b + 1]);
    }
  for (int b = 0; b < 2 * nb; b++) st8d(s + 8 * b, &sv[b]), st8d(q + 8 * b, &qv[b]);
}

/*
 * rows_stats with AVX-512 for rows of C = 16 * nb channels (nb = 1..4, a
 * constant in every call), as rows_grad_sums_all16: all R rows in one
 * sweep, the shifts K and the 4 * nb sums in registers (24 of the 32 with
 * 64 channels) from the first row to the last, stored once into s and q.
 * The sweeps of RB rows stored and reloaded every sum each RB rows and
 * walked RB rows at a stride of C floats, 32 channels at a time.  Each
 * channel still adds the rows in order from +0 with the same K: the same
 * bits as the sweeps.
 */
KERNEL void rows_stats_all16(const float *x, size_t R, size_t C, const double *K, double *s,
                             double *q, const int nb, const int fm) {
  v8d k[8], sv[8], qv[8];
  for (int b = 0; b < 2 * nb; b++) k[b] = ld8d(K + 8 * b), sv[b] = qv[b] = splat8d(0.0);
  for (size_t j = 0; j < R; j++)
    for (int b = 0; b < nb; b++) {
      const v16f xv = ld16f(x + j * C + 16 * (size_t)b);
      STATS8(cvt16_lo(&xv), k[2 * b], sv[2 * b], qv[2 * b]);
      STATS8(cvt16_hi(&xv), k[2 * b + 1], sv[2 * b + 1], qv[2 * b + 1]);
    }
  for (int b = 0; b < 2 * nb; b++) st8d(s + 8 * b, &sv[b]), st8d(q + 8 * b, &qv[b]);
}

/* The sums of rows_stats in sweeps of RB rows: any C, any R. */
KERNEL void rows_stats_sweeps(const float *x, size_t R, size_t C, const double *K, double *s,
                              double *q, const int fm) {
  for (size_t r = 0; r < R; r += RB) {
    const size_t nr = R - r < RB ? R - r : RB;
    const float *xr = x + r * C;
    size_t c = 0;
    if (fm & FM_512) {
      for (; c + 32 <= C; c += 32) rows_stats_block8(xr + c, nr, C, K + c, s + c, q + c, 2, fm);
      for (; c + 16 <= C; c += 16) rows_stats_block8(xr + c, nr, C, K + c, s + c, q + c, 1, fm);
    }
    for (; c + 16 <= C; c += 16) {
      const v4d k0 = ld4d(K + c), k1 = ld4d(K + c + 4), k2 = ld4d(K + c + 8),
                k3 = ld4d(K + c + 12);
      v4d s0 = ld4d(s + c), s1 = ld4d(s + c + 4), s2 = ld4d(s + c + 8), s3 = ld4d(s + c + 12);
      v4d q0 = ld4d(q + c), q1 = ld4d(q + c + 4), q2 = ld4d(q + c + 8), q3 = ld4d(q + c + 12);
      for (size_t j = 0; j < nr; j++) {
        const float *p = xr + j * C + c;
        STATS4(ld4f(p), k0, s0, q0);
        STATS4(ld4f(p + 4), k1, s1, q1);
        STATS4(ld4f(p + 8), k2, s2, q2);
        STATS4(ld4f(p + 12), k3, s3, q3);
      }
      st4d(s + c, s0), st4d(s + c + 4, s1), st4d(s + c + 8, s2), st4d(s + c + 12, s3);
      st4d(q + c, q0), st4d(q + c + 4, q1), st4d(q + c + 8, q2), st4d(q + c + 12, q3);
    }
    for (; c + 4 <= C; c += 4) {
      const v4d k0 = ld4d(K + c);
      v4d s0 = ld4d(s + c), q0 = ld4d(q + c);
      for (size_t j = 0; j < nr; j++) STATS4(ld4f(xr + j * C + c), k0, s0, q0);
      st4d(s + c, s0), st4d(q + c, q0);
    }
    for (; c < C; c++) {
      double sc = s[c], qc = q[c];
      for (size_t j = 0; j < nr; j++) {
        const double d = (double)xr[j * C + c] - K[c];
        sc += d;
        qc += d * d;
      }
      s[c] = sc, q[c] = qc;
    }
  }
}

/* The same statistics for R rows of C channels; acc: 3C doubles of scratch. */
KERNEL void rows_stats(const float *x, size_t R, size_t C, double *mean, double *m2,
                       double *acc, const int fm) {
  for (size_t c = 0; c < C; c++) mean[c] = m2[c] = 0;
  if (R == 0) return;
  double *K = acc, *s = acc + C, *q = acc + 2 * C;
  for (size_t c = 0; c < C; c++) {
    K[c] = x[c];
    s[c] = q[c] = 0;
  }
  if (ROWS_ALL16(C, fm) && R >= ROWS_ALL_MIN) {
    if (C == 16) rows_stats_all16(x, R, C, K, s, q, 1, fm);
    if (C == 32) rows_stats_all16(x, R, C, K, s, q, 2, fm);
    if (C == 48) rows_stats_all16(x, R, C, K, s, q, 3, fm);
    if (C == 64) rows_stats_all16(x, R, C, K, s, q, 4, fm);
  } else {
    rows_stats_sweeps(x, R, C, K, s, q, fm);
  }
  for (size_t c = 0; c < C; c++) {
    mean[c] = K[c] + s[c] / (double)R;
    const double v = q[c] - s[c] * s[c] / (double)R;
    m2[c] = v > 0 ? v : 0;
  }
}

KERNEL void stats_impl(const float *x, size_t N, size_t C, size_t S, double *mean, double *m2,
                       double *acc, const int fm) {
  if (S == 1)
    rows_stats(x, N, C, mean, m2, acc, fm);
  else
    plane_stats(x, N, C, S, mean, m2, acc, fm);
}

/*
 * y = ((x - hi) - lo) * a + b (then the ReLU when relu).  The mean is
 * subtracted in two float steps, hi = float(mean) first (exact for values
 * near it) and then the remainder lo, so that |mean| >> std loses nothing;
 * the fused x*a + (b - mean*a) would cancel catastrophically.
 */
KERNEL void plane_normalize(const float *x, float *y, size_t N, size_t C, size_t S,
                            const float *aff, const int relu, const int fm) {
  for (size_t n = 0; n < N; n++)
    for (size_t c = 0; c < C; c++) {
      const float *p = x + (n * C + c) * S;
      float *o = y + (n * C + c) * S;
      const aff8_t k8 = aff8_splat(aff, C, c, fm);
      size_t i = 0;
      for (; i + 16 <= S; i += 16) {
        const v8f v0 = fwd8(ld8f(p + i), k8), v1 = fwd8(ld8f(p + i + 8), k8);
        st8f(o + i, relu ? relu8(v0, fm) : v0);
        st8f(o + i + 8, relu ? relu8(v1, fm) : v1);
      }
      for (; i + 8 <= S; i += 8) {
        const v8f v = fwd8(ld8f(p + i), k8);
        st8f(o + i, relu ? relu8(v, fm) : v);
      }
      if (i + 4 <= S) {
        const v4f v = fwd4(ld4f(p + i), aff4_splat(aff, C, c, fm));
        st4f(o + i, relu ? relu4(v) : v);
        i += 4;
      }
      for (; i < S; i++) {
        const float v = fwd1(p[i], aff, C, c);
        o[i] = relu ? relu1(v) : v;
      }
    }
}

/* rows_normalize's 512-bit blocks: nb * 16 channels (nb = 1..4) from c over
 * nr rows, with the constants in registers (4 * nb of the 32). */
KERNEL void rows_normalize_block16(const float *xr, float *yr, size_t nr, size_t C,
                                   const float *aff, size_t c, const int nb, const int relu) {
  v16f h[4], l[4], a[4], b[4];
  for (int k = 0; k < nb; k++) {
    const size_t ck = c + 16 * (size_t)k;
    h[k] = ld16f(aff + ck), l[k] = ld16f(aff + C + ck);
    a[k] = ld16f(aff + 2 * C + ck), b[k] = ld16f(aff + 3 * C + ck);
  }
  for (size_t j = 0; j < nr; j++)
    for (int k = 0; k < nb; k++) {
      const size_t o = j * C + c + 16 * (size_t)k;
      v16f v = ((ld16f(xr + o) - h[k]) - l[k]) * a[k] + b[k];
      if (relu) v = (v16f)((v16si)v & ~(v16si)(v <= splat16(0.0f)));
      st16f(yr + o, &v);
    }
}

KERNEL void rows_normalize(const float *x, float *y, size_t R, size_t C, const float *aff,
                           const int relu, const int fm) {
  const size_t rbe = RBE_FM(C, R, fm);
  for (size_t r = 0; r < R; r += rbe) {
    const size_t nr = R - r < rbe ? R - r : rbe;
    const float *xr = x + r * C;
    float *yr = y + r * C;
    size_t c = 0;
    if (fm & FM_512) ROWS_BLOCKS16(rows_normalize_block16, 4, xr, yr, nr, C, aff);
    for (; c + 16 <= C; c += 16) {
      const aff8_t k0 = aff8_at(aff, C, c), k1 = aff8_at(aff, C, c + 8);
      for (size_t j = 0; j < nr; j++) {
        const v8f v0 = fwd8(ld8f(xr + j * C + c), k0), v1 = fwd8(ld8f(xr + j * C + c + 8), k1);
        st8f(yr + j * C + c, relu ? relu8(v0, fm) : v0);
        st8f(yr + j * C + c + 8, relu ? relu8(v1, fm) : v1);
      }
    }
    for (; c + 8 <= C; c += 8) {
      const aff8_t k8 = aff8_at(aff, C, c);
      for (size_t j = 0; j < nr; j++) {
        const v8f v = fwd8(ld8f(xr + j * C + c), k8);
        st8f(yr + j * C + c, relu ? relu8(v, fm) : v);
      }
    }
    if (c + 4 <= C) {
      const aff4_t k4 = aff4_at(aff, C, c);
      for (size_t j = 0; j < nr; j++) {
        const v4f v = fwd4(ld4f(xr + j * C + c), k4);
        st4f(yr + j * C + c, relu ? relu4(v) : v);
      }
      c += 4;
    }
    for (; c < C; c++)
      for (size_t j = 0; j < nr; j++) {
        const float v = fwd1(xr[j * C + c], aff, C, c);
        yr[j * C + c] = relu ? relu1(v) : v;
      }
  }
}

/* One read of x, one write of y, for either layout. */
KERNEL void normalize_impl(const float *x, float *y, size_t N, size_t C, size_t S,
                           const float *aff, int relu, const int fm) {
  if (S == 1) {
    if (relu)
      rows_normalize(x, y, N, C, aff, 1, fm);
    else
      rows_normalize(x, y, N, C, aff, 0, fm);
  } else {
    if (relu)
      plane_normalize(x, y, N, C, S, aff, 1, fm);
    else
      plane_normalize(x, y, N, C, S, aff, 0, fm);
  }
}

/* Σg and Σg·(x - mu) for 4 values (as doubles) into a and b. */
#define GSUMS4(xd4, gd4, mv, a, b)                                                                 \
  do {                                                                                             \
    const v4d g_ = (gd4);                                                                          \
    (a) = acc_add((a), g_, fm);                                                                    \
    (b) += g_ * ((xd4) - (mv));                                                                    \
  } while (0)
#define GSUMS8(xd8, gd8, mv, a, b)                                                                 \
  do {                                                                                             \
    const v8d g_ = (gd8);                                                                          \
    acc_add8(&(a), &g_, fm);                                                                       \
    (b) += g_ * ((xd8) - (mv));                                                                    \
  } while (0)

/*
 * Per channel Σg and Σg·(x - mean), in double, one read of x and dy; g = dy,
 * or dy masked by the ReLU (aff: the forward's constants) when relu.  The
 * sums are kept as the statistics' (stats_acc: s for Σg, q for Σg·(x -
 * mean)), walked in either order with the same bits.
 */
KERNEL void plane_grad_sums_one(const float *p, const float *g, size_t S, const v4d mv,
                                double mu, const float *aff, size_t C, size_t c, stats_acc *a,
                                const int relu, const int fm) {
  const aff8_t k8 = aff8_splat(aff, C, c, fm);
  size_t i = 0;
  for (; i + 16 <= S; i += 16) {
    const v8f x0 = ld8f(p + i), x1 = ld8f(p + i + 8);
    v8f g0 = ld8f(g + i), g1 = ld8f(g + i + 8);
    if (relu) g0 = keep8(fwd8(x0, k8), g0, fm), g1 = keep8(fwd8(x1, k8), g1, fm);
    GSUMS4(cvt_lo(x0), cvt_lo(g0), mv, a->s0, a->q0);
    GSUMS4(cvt_hi(x0), cvt_hi(g0), mv, a->s1, a->q1);
    GSUMS4(cvt_lo(x1), cvt_lo(g1), mv, a->s2, a->q2);
    GSUMS4(cvt_hi(x1), cvt_hi(g1), mv, a->s3, a->q3);
  }
  for (; i + 4 <= S; i += 4) {
    const v4f xv = ld4f(p + i);
    v4f gv = ld4f(g + i);
    if (relu) gv = keep4(fwd4(xv, aff4_splat(aff, C, c, fm)), gv, fm);
    GSUMS4(cvt4(xv), cvt4(gv), mv, a->s0, a->q0);
  }
  for (; i < S; i++) {
    const float gi = relu ? keep1(fwd1(p[i], aff, C, c), g[i]) : g[i];
    a->st += gi;
    a->qt += (double)gi * ((double)p[i] - mu);
  }
}

/*
 * The ReLU's mask of the backward as a threshold on x, for the AVX-512
 * sums over rows (and over planes, plane_relu_thresholds).  With h, l and b finite and a in [FLT_MIN, FLT_MAX],
 * v(x) = ((x - h) - l) * a + b is non-decreasing in x over [-inf, +inf]:
 * every step rounds a non-decreasing function of the previous one (flushing
 * to zero and reading denormals as zero keep that), no step makes a NaN, and
 * v(-inf) = -inf, v(+inf) = +inf.  So v <= 0 exactly where x <= T, T the
 * largest float with v(T) <= 0, and g is kept where x > T or x is NaN (as
 * where v > 0 or v is NaN): the same mask, in one compare of x instead of
 * four operations and a compare per 16 values.  With 256 channels those made
 * the fused-ReLU sums about 1.4 times as long as the plain ones (bound by
 * the vector units there, not by memory; the threshold took them from 57-62
 * to 46-52 us for 1568 rows, measured alone).  T is searched over the floats
 * in order, as keys from -inf: key k stands for the float of bits
 * i ^ ((i >> 31) & 0x7fffffff), i = k + key(-inf) (mod 2^32), which orders
 * them -inf .. -0, +0 .. +inf (the two zeros have the same v) and past +inf
 * gives NaNs, whose v is never <= 0.  The key is built bit by bit from the
 * top, each bit kept where v <= 0 still holds, evaluating v exactly as the
 * kernels do, so the search needs no error analysis: 32 steps, RELU_T_GROUP
 * blocks of 16 channels per step (independent, so they overlap), 0.7-0.8 us
 * for 256 channels.  T[c] for every channel of the C / 16 full blocks,
 * ok[b] = 1 where all 16 channels of block b qualify (else T is meaningless
 * there and the sums compute v).
 */
#define RELU_T 2 /* the relu argument of gsums16 and the row sums: T, not v */
#define RELU_T_GROUP 8 /* blocks of 16 channels searched together */
/* Fewer rows compute v: the search then cost about as much as it saved
 * (measured with 256 channels: 1.1 -> 2.1 us at 32 rows, even at 128-256). */
#define RELU_T_MIN_ROWS 256
KERNEL void relu_thresholds(const float *aff, size_t C, float *T, int *ok) {
  const size_t nb = C / 16;
  for (size_t b = 0; b < nb; b++) {
    const float *k = aff + 16 * b;
    const v16si inf = (v16si){0} + 0x7f800000, a = (v16si)ld16f(k + 2 * C);
    /* h, l, b finite; a in [FLT_MIN, FLT_MAX] (as ordered integers: a > 0). */
    const v16si good = (((v16si)ld16f(k) & inf) != inf) & (((v16si)ld16f(k + C) & inf) != inf) &
                       (((v16si)ld16f(k + 3 * C) & inf) != inf) & (a >= 0x00800000) & (a < inf);
    int all = -1;
    for (int i = 0; i < 16; i++) all &= good[i];
    ok[b] = all != 0;
  }
  for (size_t b0 = 0; b0 < nb; b0 += RELU_T_GROUP) {
    const int n = nb - b0 < RELU_T_GROUP ? (int)(nb - b0) : RELU_T_GROUP;
    v16su o[RELU_T_GROUP];
    for (int i = 0; i < RELU_T_GROUP; i++) o[i] = (v16su){0};
    for (int bit = 31; bit >= 0; bit--)
      for (int i = 0; i < RELU_T_GROUP && i < n; i++) {
        const float *k = aff + 16 * (b0 + (size_t)i);
        const v16su cand = o[i] | (1u << bit);
        const v16si key = (v16si)(cand + 0x807fffffu);
        const v16f x = (v16f)(key ^ ((key >> 31) & 0x7fffffff));
        const v16f v = ((x - ld16f(k)) - ld16f(k + C)) * ld16f(k + 2 * C) + ld16f(k + 3 * C);
        o[i] |= (v16su)(v <= splat16(0.0f)) & (1u << bit);
      }
    for (int i = 0; i < n; i++) {
      const v16si key = (v16si)(o[i] + 0x807fffffu);
      const v16f t = (v16f)(key ^ ((key >> 31) & 0x7fffffff));
      st16f(T + 16 * (b0 + (size_t)i), &t);
    }
  }
}

/*
 * GSUMS8 of the 16 values at p and g (the AVX-512 kernels only): the low
 * 8 into s0 and q0, the high 8 into s1 and q1 (mean m0, m1); with the ReLU,
 * k = the forward's constants (h, l, a, b) and g kept where v > 0 (or NaN),
 * else +0; relu == RELU_T: k[0] = the channels' thresholds T (see
 * relu_thresholds) and g kept where x > T (or NaN), the same mask.  With
 * the builtins the compare's mask (v > 0 or unordered) zeroes the
 * conversions of g to double: the same +0 as the and-not of KEEP16, but
 * two instructions (vmovdqa32, vpandnd) fewer and no vextractf32x8 (x and g
 * are converted by halves); g goes through an empty asm so that GCC does
 * not fold its load into the masked conversion (a zero-masking load, slow
 * here, see KEEP16).
 */
KERNEL void gsums16(const float *p, const float *g, const v16f *k, const v8d *m0, const v8d *m1,
                    v8d *s0, v8d *q0, v8d *s1, v8d *q1, const int relu, const int fm) {
  const v8d x0 = cvt8(ld8f(p)), x1 = cvt8(ld8f(p + 8));
  v8d g0, g1;
  if (!relu) {
    g0 = cvt8(ld8f(g)), g1 = cvt8(ld8f(g + 8));
  } else {
    /* The compare's operands: v and 0, or x and T (RELU_T). */
    const v16f xv = ld16f(p);
    const v16f u = relu == RELU_T ? xv : ((xv - k[0]) - k[1]) * k[2] + k[3];
    const v16f z = relu == RELU_T ? k[0] : splat16(0.0f);
#if SBN_BN_BUILTINS
    v8f gl = ld8f(g), gh = ld8f(g + 8);
    MASK_BARRIER(gl, fm);
    MASK_BARRIER(gh, fm);
    const unsigned short keep =
        __builtin_ia32_cmpps512_mask(u, z, 6 /* _CMP_NLE_UQ */, (unsigned short)-1, 4);
    g0 = __builtin_ia32_cvtps2pd512_mask(gl, splat8d(0.0), (unsigned char)keep, 4);
    g1 = __builtin_ia32_cvtps2pd512_mask(gh, splat8d(0.0), (unsigned char)(keep >> 8), 4);
#else
    const v16si m = (v16si)(u <= z);
    const v16f gv = (v16f)((v16si)ld16f(g) & ~m);
    g0 = cvt16_lo(&gv), g1 = cvt16_hi(&gv);
#endif
  }
  GSUMS8(x0, g0, *m0, *s0, *q0);
  GSUMS8(x1, g1, *m1, *s1, *q1);
}

/* The 4-value blocks and single values of plane_grad_sums_one8 from i. */
KERNEL void plane_grad_sums_tail8(const float *p, const float *g, size_t i, size_t S, double mu,
                                  const float *aff, size_t C, size_t c, float t, stats_acc8 *a,
                                  const int relu, const int fm) {
  for (; i + 4 <= S; i += 4) {
    const v4f xv = ld4f(p + i);
    v4f gv = ld4f(g + i);
    if (relu == RELU_T) {
      v4si m = (v4si)(xv <= splat4(t));
      MASK_BARRIER(m, fm);
      gv = (v4f)((v4si)gv & ~m);
    } else if (relu) {
      gv = keep4(fwd4(xv, aff4_splat(aff, C, c, fm)), gv, fm);
    }
    const v4d gd = cvt4(gv);
    const v8d g8 = zext4d(gd);
    acc_add8(&a->s01, &g8, fm);
    a->q01 += zext4d(gd * (cvt4(xv) - splat4d(mu)));
  }
  for (; i < S; i++) {
    const float gi = relu == RELU_T ? (p[i] <= t ? 0.0f : g[i])
                     : relu         ? keep1(fwd1(p[i], aff, C, c), g[i])
                                    : g[i];
    a->st += gi;
    a->qt += (double)gi * ((double)p[i] - mu);
  }
}

/* plane_grad_sums_one with 512-bit vectors (as plane_stats_one8); relu ==
 * RELU_T: g kept where x > t (or NaN), t the channel's threshold (see
 * plane_relu_thresholds), in the tails too. */
KERNEL void plane_grad_sums_one8(const float *p, const float *g, size_t S, double mu,
                                 const float *aff, size_t C, size_t c, float t, stats_acc8 *a,
                                 const int relu, const int fm) {
  const v8d mv = bcast8d(mu);
  v16f k[4];
  if (relu == RELU_T)
    k[0] = splat16(t);
  else if (relu)
    for (int j = 0; j < 4; j++) k[j] = bcast16(aff + (size_t)j * C + c);
  size_t i = 0;
  for (; i + 16 <= S; i += 16)
    gsums16(p + i, g + i, k, &mv, &mv, &a->s01, &a->q01, &a->s23, &a->q23, relu, fm);
  plane_grad_sums_tail8(p, g, i, S, mu, aff, C, c, t, a, relu, fm);
}

/*
 * plane_grad_sums_one8 for the planes (p, g) and (r, h) of channels c and
 * c + 1 at once, into a and b, as plane_stats_two8 does for the statistics:
 * each channel's additions in the same order, so the same bits, and twice
 * the independent additions.  relu is 0 or RELU_T (thresholds t and tr):
 * the other ReLU mode keeps four constants per channel in registers, and
 * its channels run one at a time.
 */
KERNEL void plane_grad_sums_two8(const float *p, const float *g, const float *r, const float *h,
                                 size_t S, double mu, double mr, float t, float tr, stats_acc8 *a,
                                 stats_acc8 *b, const int relu, const int fm) {
  const v8d mv = bcast8d(mu), mw = bcast8d(mr);
  v16f k[4], kr[4];
  k[0] = splat16(t), kr[0] = splat16(tr);
  size_t i = 0;
  for (; i + 16 <= S; i += 16) {
    gsums16(p + i, g + i, k, &mv, &mv, &a->s01, &a->q01, &a->s23, &a->q23, relu, fm);
    gsums16(r + i, h + i, kr, &mw, &mw, &b->s01, &b->q01, &b->s23, &b->q23, relu, fm);
  }
  plane_grad_sums_tail8(p, g, i, S, mu, NULL, 0, 0, t, a, relu, fm);
  plane_grad_sums_tail8(r, h, i, S, mr, NULL, 0, 0, tr, b, relu, fm);
}

/*
 * The thresholds of relu_thresholds for the planes, where each channel
 * decides alone: T[c] for all C channels (the C % 16 last ones searched as
 * one block padded with copies of channel C - 1), ok[c] = 1 where h, l, b
 * are finite and a is in [FLT_MIN, FLT_MAX] (else T[c] is meaningless and
 * the sums compute v).  T: C floats, then ok: C ints.
 */
KERNEL void plane_relu_thresholds(const float *aff, size_t C, float *T, int *ok) {
  /* ok as scratch for the blocks' flags (C / 16 ints), overwritten below. */
  if (C >= 16) relu_thresholds(aff, C, T, ok);
  const size_t c0 = C / 16 * 16;
  if (c0 < C) {
    float tmp[4 * 16], t16[16];
    int ok1;
    for (int j = 0; j < 4; j++)
      for (size_t i = 0; i < 16; i++)
        tmp[16 * j + i] = aff[(size_t)j * C + (c0 + i < C ? c0 + i : C - 1)];
    relu_thresholds(tmp, 16, t16, &ok1);
    for (size_t c = c0; c < C; c++) T[c] = t16[c - c0];
  }
  for (size_t c = 0; c < C; c++) {
    uint32_t u[4];
    for (int j = 0; j < 4; j++) memcpy(&u[j], aff + (size_t)j * C + c, sizeof(u[j]));
    const uint32_t inf = 0x7f800000u;
    ok[c] = (u[0] & inf) != inf && (u[1] & inf) != inf && (u[3] & inf) != inf &&
            u[2] >= 0x00800000u && u[2] < inf;
  }
}

/* Planes n0..n1-1 of channel c into a (t: the threshold when relu ==
 * RELU_T). */
KERNEL void plane_grad_sums_run(const float *x, const float *dy, size_t C, size_t S, size_t c,
                                size_t n0, size_t n1, double mu, const float *aff, float t,
                                stats_acc *a, const int relu, const int fm) {
  if (fm & FM_512) {
    stats_acc8 a8;
    memcpy(&a8, a, STATS_ACC_BYTES);
    for (size_t n = n0; n < n1; n++)
      plane_grad_sums_one8(x + (n * C + c) * S, dy + (n * C + c) * S, S, mu, aff, C, c, t, &a8,
                           relu, fm);
    memcpy(a, &a8, STATS_ACC_BYTES);
    return;
  }
  for (size_t n = n0; n < n1; n++)
    plane_grad_sums_one(x + (n * C + c) * S, dy + (n * C + c) * S, S, splat4d(mu), mu, aff, C,
                        c, a, relu != 0, fm);
}

/* Planes n0..n1-1 of channels c and c + 1 into a and b (AVX-512 only;
 * relu 0 or RELU_T with thresholds t and tr). */
KERNEL void plane_grad_sums_run2(const float *x, const float *dy, size_t C, size_t S, size_t c,
                                 size_t n0, size_t n1, double mu, double mr, float t, float tr,
                                 stats_acc *a, stats_acc *b, const int relu, const int fm) {
  stats_acc8 a8, b8;
  memcpy(&a8, a, STATS_ACC_BYTES);
  memcpy(&b8, b, STATS_ACC_BYTES);
  for (size_t n = n0; n < n1; n++) {
    const size_t o = (n * C + c) * S;
    plane_grad_sums_two8(x + o, dy + o, x + o + S, dy + o + S, S, mu, mr, t, tr, &a8, &b8, relu,
                         fm);
  }
  memcpy(a, &a8, STATS_ACC_BYTES);
  memcpy(b, &b8, STATS_ACC_BYTES);
}

KERNEL void grad_sums_finish(const stats_acc *a, double *sdy, double *sdyx) {
  *sdy = hsum4d((a->s0 + a->s1) + (a->s2 + a->s3)) + a->st;
  *sdyx = hsum4d((a->q0 + a->q1) + (a->q2 + a->q3)) + a->qt;
}

/* Planes n0..n1-1 of channel c into a: with the threshold where thr and
 * the channel allows it (ok[c]), else as relu. */
#define PLANE_GRAD_SUMS_RUN(n0, n1)                                                                \
  do {                                                                                             \
    if (thr && ok[c])                                                                              \
      plane_grad_sums_run(x, dy, C, S, c, n0, n1, mean[c], aff, T[c], &a, RELU_T, fm);             \
    else                                                                                           \
      plane_grad_sums_run(x, dy, C, S, c, n0, n1, mean[c], aff, 0.0f, &a, relu, fm);               \
  } while (0)

/* acc: ACC_DOUBLES * C doubles of scratch. */
KERNEL void plane_grad_sums(const float *x, const float *dy, size_t N, size_t C, size_t S,
                            const double *mean, const float *aff, double *sdy, double *sdyx,
                            double *acc, const int relu, const int fm) {
  /* With AVX-512 and the ReLU, from RELU_T_MIN_ROWS values per channel
   * (N * S, as for the rows), the channels whose constants allow it compare
   * x with their threshold (plane_relu_thresholds): T[c], ok[c], after the
   * sums' scratch.  Measured, the whole backward with 256 channels, old and
   * new in one process: 0.95 times as long at 8 x 196 values per channel,
   * 1.00 at 2 x 128 (the search then costs about what it saves), 0.99 at
   * 4 x 128. */
  float *T = (float *)(acc + STATS_ACC_DOUBLES * C);
  int *ok = (int *)(T + C);
  const int thr = relu && (fm & FM_512) && N * S >= RELU_T_MIN_ROWS;
  if (thr) plane_relu_thresholds(aff, C, T, ok);
  if (S < PLANE_STREAM_MIN) {
    /* With AVX-512, channels in pairs where both compute the same way
     * (without the ReLU, or both with their thresholds), as the statistics
     * do (plane_stats). */
    for (size_t c = 0; c < C;) {
      stats_acc a;
      memset(&a, 0, sizeof(a));
      const int mode = thr && ok[c] ? RELU_T : relu;
      if ((fm & FM_512) && c + 1 < C && (mode == 0 || mode == RELU_T) &&
          mode == (thr && ok[c + 1] ? RELU_T : relu)) {
        stats_acc b;
        memset(&b, 0, sizeof(b));
        const float t = mode == RELU_T ? T[c] : 0.0f, tr = mode == RELU_T ? T[c + 1] : 0.0f;
        plane_grad_sums_run2(x, dy, C, S, c, 0, N, mean[c], mean[c + 1], t, tr, &a, &b, mode,
                             fm);
        grad_sums_finish(&a, sdy + c, sdyx + c);
        grad_sums_finish(&b, sdy + c + 1, sdyx + c + 1);
        c += 2;
        continue;
      }
      PLANE_GRAD_SUMS_RUN(0, N);
      grad_sums_finish(&a, sdy + c, sdyx + c);
      c++;
    }
    return;
  }
  memset(acc, 0, STATS_ACC_DOUBLES * C * sizeof(double));
  for (size_t n = 0; n < N; n++)
    for (size_t c = 0; c < C; c++) {
      stats_acc a;
      memcpy(&a, acc + STATS_ACC_DOUBLES * c, sizeof(a));
      PLANE_GRAD_SUMS_RUN(n, n + 1);
      memcpy(acc + STATS_ACC_DOUBLES * c, &a, sizeof(a));
    }
  for (size_t c = 0; c < C; c++) {
    stats_acc a;
    memcpy(&a, acc + STATS_ACC_DOUBLES * c, sizeof(a));
    grad_sums_finish(&a, sdy + c, sdyx + c);
  }
}

/*
 * rows_grad_sums with AVX-512 for rows of C = 16 * nb channels (nb = 1..4,
 * a constant in every call): all R rows in one sweep, the 4 * nb sums in
 * registers from the first row to the last (the means and the ReLU's
 * constants partly come from memory).  The sweeps of RB rows stored and
 * reloaded every sum each RB rows and walked RB rows of a few cache lines
 * each at a stride of C floats: with 64 channels the sums took 1.4 to 1.8
 * times as long, with 32 channels 1.1 (measured, with and without the
 * fused ReLU).  Each channel still adds the rows in order: the same bits as
 * the sweeps.
 */
KERNEL void rows_grad_sums_all16(const float *x, const float *dy, size_t R, size_t C,
                                 const double *mean, const float *aff, const float *T,
                                 double *sdy, double *sdyx, const int nb, const int relu,
                                 const int fm) {
  v8d m[8], a[8], q[8];
  v16f k[4][4];
  for (int b = 0; b < 2 * nb; b++) m[b] = ld8d(mean + 8 * b), a[b] = q[b] = splat8d(0.0);
  if (relu == RELU_T)
    for (int b = 0; b < nb; b++) k[b][0] = ld16f(T + 16 * (size_t)b);
  else if (relu)
    for (int b = 0; b < nb; b++)
      for (int i = 0; i < 4; i++) k[b][i] = ld16f(aff + (size_t)i * C + 16 * (size_t)b);
  for (size_t j = 0; j < R; j++)
    for (int b = 0; b < nb; b++) {
      const size_t o = j * C + 16 * (size_t)b;
      gsums16(x + o, dy + o, k[b], &m[2 * b], &m[2 * b + 1], &a[2 * b], &q[2 * b], &a[2 * b + 1],
              &q[2 * b + 1], relu, fm);
    }
  for (int b = 0; b < 2 * nb; b++) st8d(sdy + 8 * b, &a[b]), st8d(sdyx + 8 * b, &q[b]);
}

/* rows_grad_sums_all16 for C = 16, 32, 48 or 64. */
#define ROWS_GRAD_SUMS_ALL16(relu)                                                                 \
  do {                                                                                             \
    if (C == 16) rows_grad_sums_all16(x, dy, R, C, mean, aff, T, sdy, sdyx, 1, relu, fm);          \
    if (C == 32) rows_grad_sums_all16(x, dy, R, C, mean, aff, T, sdy, sdyx, 2, relu, fm);          \
    if (C == 48) rows_grad_sums_all16(x, dy, R, C, mean, aff, T, sdy, sdyx, 3, relu, fm);          \
    if (C == 64) rows_grad_sums_all16(x, dy, R, C, mean, aff, T, sdy, sdyx, 4, relu, fm);          \
  } while (0)

/* acc: ACC_DOUBLES * C doubles of scratch (the ReLU's thresholds). */
KERNEL void rows_grad_sums(const float *x, const float *dy, size_t R, size_t C,
                           const double *mean, const float *aff, double *sdy, double *sdyx,
                           double *acc, const int relu, const int fm) {
  /* With AVX-512 and the ReLU, the blocks of 16 channels whose constants
   * allow it compare x with thresholds (relu_thresholds): T[c], ok[c / 16]. */
  float *T = (float *)acc;
  int *ok = (int *)(T + C);
  const int thr = relu && (fm & FM_512) && C >= 16 && R >= RELU_T_MIN_ROWS;
  if (thr) relu_thresholds(aff, C, T, ok);
  if (ROWS_ALL16(C, fm) && R >= ROWS_ALL_MIN) {
    int all = thr;
    for (size_t b = 0; all && b < C / 16; b++) all = ok[b];
    if (all)
      ROWS_GRAD_SUMS_ALL16(RELU_T);
    else
      ROWS_GRAD_SUMS_ALL16(relu);
    return;
  }
  for (size_t c = 0; c < C; c++) sdy[c] = sdyx[c] = 0;
  for (size_t r = 0; r < R; r += RB) {
    const size_t nr = R - r < RB ? R - r : RB;
    const float *xr = x + r * C, *gr = dy + r * C;
    size_t c = 0;
    if (fm & FM_512)
      for (; c + 16 <= C; c += 16) {
        const v8d m0 = ld8d(mean + c), m1 = ld8d(mean + c + 8);
        v8d a0 = ld8d(sdy + c), a1 = ld8d(sdy + c + 8), b0 = ld8d(sdyx + c),
            b1 = ld8d(sdyx + c + 8);
        v16f k[4];
        if (thr && ok[c / 16]) {
          k[0] = ld16f(T + c);
          for (size_t j = 0; j < nr; j++)
            gsums16(xr + j * C + c, gr + j * C + c, k, &m0, &m1, &a0, &b0, &a1, &b1, RELU_T, fm);
        } else {
          if (relu)
            for (int i = 0; i < 4; i++) k[i] = ld16f(aff + (size_t)i * C + c);
          for (size_t j = 0; j < nr; j++)
            gsums16(xr + j * C + c, gr + j * C + c, k, &m0, &m1, &a0, &b0, &a1, &b1, relu, fm);
        }
        st8d(sdy + c, &a0), st8d(sdy + c + 8, &a1), st8d(sdyx + c, &b0), st8d(sdyx + c + 8, &b1);
      }
    for (; c + 16 <= C; c += 16) {
      const v4d m0 = ld4d(mean + c), m1 = ld4d(mean + c + 4), m2 = ld4d(mean + c + 8),
                m3 = ld4d(mean + c + 12);
      v4d a0 = ld4d(sdy + c), a1 = ld4d(sdy + c + 4), a2 = ld4d(sdy + c + 8),
          a3 = ld4d(sdy + c + 12);
      v4d b0 = ld4d(sdyx + c), b1 = ld4d(sdyx + c + 4), b2 = ld4d(sdyx + c + 8),
          b3 = ld4d(sdyx + c + 12);
      for (size_t j = 0; j < nr; j++) {
        const float *p = xr + j * C + c, *g = gr + j * C + c;
        const v8f x0 = ld8f(p), x1 = ld8f(p + 8);
        v8f g0 = ld8f(g), g1 = ld8f(g + 8);
        if (relu) {
          g0 = keep8(fwd8(x0, aff8_at(aff, C, c)), g0, fm);
          g1 = keep8(fwd8(x1, aff8_at(aff, C, c + 8)), g1, fm);
        }
        GSUMS4(cvt_lo(x0), cvt_lo(g0), m0, a0, b0);
        GSUMS4(cvt_hi(x0), cvt_hi(g0), m1, a1, b1);
        GSUMS4(cvt_lo(x1), cvt_lo(g1), m2, a2, b2);
        GSUMS4(cvt_hi(x1), cvt_hi(g1), m3, a3, b3);
      }
      st4d(sdy + c, a0), st4d(sdy + c + 4, a1), st4d(sdy + c + 8, a2), st4d(sdy + c + 12, a3);
      st4d(sdyx + c, b0), st4d(sdyx + c + 4, b1), st4d(sdyx + c + 8, b2),
          st4d(sdyx + c + 12, b3);
    }
    for (; c + 4 <= C; c += 4) {
      const v4d m0 = ld4d(mean + c);
      v4d a0 = ld4d(sdy + c), b0 = ld4d(sdyx + c);
      for (size_t j = 0; j < nr; j++) {
        const v4f xv = ld4f(xr + j * C + c);
        v4f gv = ld4f(gr + j * C + c);
        if (relu) gv = keep4(fwd4(xv, aff4_at(aff, C, c)), gv, fm);
        GSUMS4(cvt4(xv), cvt4(gv), m0, a0, b0);
      }
      st4d(sdy + c, a0), st4d(sdyx + c, b0);
    }
    for (; c < C; c++) {
      double at = sdy[c], bt = sdyx[c];
      for (size_t j = 0; j < nr; j++) {
        const float xi = xr[j * C + c];
        const float gi = relu ? keep1(fwd1(xi, aff, C, c), gr[j * C + c]) : gr[j * C + c];
        at += gi;
        bt += (double)gi * ((double)xi - mean[c]);
      }
      sdy[c] = at, sdyx[c] = bt;
    }
  }
}

KERNEL void grad_sums_impl(const float *x, const float *dy, size_t N, size_t C, size_t S,
                           const double *mean, const float *aff, double *sdy, double *sdyx,
                           double *acc, int relu, const int fm) {
  if (S == 1) {
    if (relu)
      rows_grad_sums(x, dy, N, C, mean, aff, sdy, sdyx, acc, 1, fm);
    else
      rows_grad_sums(x, dy, N, C, mean, aff, sdy, sdyx, acc, 0, fm);
  } else {
    if (relu)
      plane_grad_sums(x, dy, N, C, S, mean, aff, sdy, sdyx, acc, 1, fm);
    else
      plane_grad_sums(x, dy, N, C, S, mean, aff, sdy, sdyx, acc, 0, fm);
  }
}

/*
 * dx = k*(g - c1) - ((x - hi) - lo)*q (mean split as in normalize), g as in
 * grad_sums; kcq = [k(C) c1(C) q(C)] floats.
 */
KERNEL v8f dx8(v8f x, v8f g, v8f h, v8f l, v8f k, v8f c1, v8f q) {
  return k * (g - c1) - ((x - h) - l) * q;
}
KERNEL v4f dx4(v4f x, v4f g, v4f h, v4f l, v4f k, v4f c1, v4f q) {
  return k * (g - c1) - ((x - h) - l) * q;
}
KERNEL float dx1(float x, float g, float h, float l, float k, float c1, float q) {
  return k * (g - c1) - ((x - h) - l) * q;
}

KERNEL void plane_grad_input(const float *x, const float *dy, float *dx, size_t N, size_t C,
                             size_t S, const float *aff, const float *kcq, const int relu,
                             const int fm) {
  for (size_t n = 0; n < N; n++)
    for (size_t c = 0; c < C; c++) {
      const float *p = x + (n * C + c) * S, *g = dy + (n * C + c) * S;
      float *o = dx + (n * C + c) * S;
      const aff8_t k8 = aff8_splat(aff, C, c, fm);
      const float kf = kcq[c], cf = kcq[C + c], qf = kcq[2 * C + c];
      const v8f kv = bcast8(kcq + c, fm), cv = bcast8(kcq + C + c, fm),
                qv = bcast8(kcq + 2 * C + c, fm);
      size_t i = 0;
      for (; i + 8 <= S; i += 8) {
        const v8f xv = ld8f(p + i);
        v8f gv = ld8f(g + i);
        if (relu) gv = keep8(fwd8(xv, k8), gv, fm);
        st8f(o + i, dx8(xv, gv, k8.h, k8.l, kv, cv, qv));
      }
      if (i + 4 <= S) {
        const aff4_t k4 = aff4_splat(aff, C, c, fm);
        const v4f xv = ld4f(p + i);
        v4f gv = ld4f(g + i);
        if (relu) gv = keep4(fwd4(xv, k4), gv, fm);
        st4f(o + i, dx4(xv, gv, k4.h, k4.l, bcast4(kcq + c, fm), bcast4(kcq + C + c, fm),
                        bcast4(kcq + 2 * C + c, fm)));
        i += 4;
      }
      for (; i < S; i++) {
        const float gi = relu ? keep1(fwd1(p[i], aff, C, c), g[i]) : g[i];
        o[i] = dx1(p[i], gi, aff[c], aff[C + c], kf, cf, qf);
      }
    }
}

/*
 * rows_grad_input's 512-bit blocks, as rows_normalize_block16 (5 or, with
 * the ReLU, 7 constants per 16 channels, mostly in registers).  pf (a
 * constant): prefetch x and dy ROWS_PREFETCH bytes ahead, for the sweep over
 * all rows (ROWS_ALL16): with the hardware prefetchers alone, this pass of
 * the fused-ReLU backward took about 1.2 times as long with 32 and 64
 * channels, that of the plain one 1.05 to 1.15 times (measured); the sweeps
 * of RBE rows were slower with it, and so were the sums.  The address is an
 * integer sum: it may be past the end, which a prefetch does not touch.
 */
KERNEL void rows_grad_input_block16(const float *xr, const float *gr, float *orow, size_t nr,
                                    size_t C, const float *aff, const float *kcq, const int pf,
                                    size_t c, const int nb, const int relu) {
  v16f h[4], l[4], a[4], b[4], k[4], c1[4], q[4];
  for (int i = 0; i < nb; i++) {
    const size_t ci = c + 16 * (size_t)i;
    h[i] = ld16f(aff + ci), l[i] = ld16f(aff + C + ci);
    if (relu) a[i] = ld16f(aff + 2 * C + ci), b[i] = ld16f(aff + 3 * C + ci);
    k[i] = ld16f(kcq + ci), c1[i] = ld16f(kcq + C + ci), q[i] = ld16f(kcq + 2 * C + ci);
  }
  for (size_t j = 0; j < nr; j++)
    for (int i = 0; i < nb; i++) {
      const size_t o = j * C + c + 16 * (size_t)i;
      if (pf) {
        __builtin_prefetch((const void *)((uintptr_t)(xr + o) + ROWS_PREFETCH));
        __builtin_prefetch((const void *)((uintptr_t)(gr + o) + ROWS_PREFETCH));
      }
      const v16f xc = (ld16f(xr + o) - h[i]) - l[i];
      v16f g = ld16f(gr + o);
      if (relu) g = KEEP16(xc * a[i] + b[i], g);
      const v16f d = k[i] * (g - c1[i]) - xc * q[i];
      st16f(orow + o, &d);
    }
}

KERNEL void rows_grad_input(const float *x, const float *dy, float *dx, size_t R, size_t C,
                            const float *aff, const float *kcq, const int relu, const int fm) {
  const float *K = kcq, *C1 = kcq + C, *Q = kcq + 2 * C;
  const size_t rbe = RBE_FM(C, R, fm);
  for (size_t r = 0; r < R; r += rbe) {
    const size_t nr = R - r < rbe ? R - r : rbe;
    const float *xr = x + r * C, *gr = dy + r * C;
    float *orow = dx + r * C;
    size_t c = 0;
    if (ROWS_ALL16(C, fm))
      ROWS_BLOCKS16(rows_grad_input_block16, 4, xr, gr, orow, nr, C, aff, kcq, 1);
    else if (fm & FM_512)
      ROWS_BLOCKS16(rows_grad_input_block16, 4, xr, gr, orow, nr, C, aff, kcq, 0);
    for (; c + 16 <= C; c += 16) {
      const aff8_t k0 = aff8_at(aff, C, c), k1 = aff8_at(aff, C, c + 8);
      const v8f kv0 = ld8f(K + c), cv0 = ld8f(C1 + c), qv0 = ld8f(Q + c);
      const v8f kv1 = ld8f(K + c + 8), cv1 = ld8f(C1 + c + 8), qv1 = ld8f(Q + c + 8);
      for (size_t j = 0; j < nr; j++) {
        const v8f x0 = ld8f(xr + j * C + c), x1 = ld8f(xr + j * C + c + 8);
        v8f g0 = ld8f(gr + j * C + c), g1 = ld8f(gr + j * C + c + 8);
        if (relu) g0 = keep8(fwd8(x0, k0), g0, fm), g1 = keep8(fwd8(x1, k1), g1, fm);
        st8f(orow + j * C + c, dx8(x0, g0, k0.h, k0.l, kv0, cv0, qv0));
        st8f(orow + j * C + c + 8, dx8(x1, g1, k1.h, k1.l, kv1, cv1, qv1));
      }
    }
    for (; c + 8 <= C; c += 8) {
      const aff8_t k8 = aff8_at(aff, C, c);
      const v8f kv = ld8f(K + c), cv = ld8f(C1 + c), qv = ld8f(Q + c);
      for (size_t j = 0; j < nr; j++) {
        const v8f xv = ld8f(xr + j * C + c);
        v8f gv = ld8f(gr + j * C + c);
        if (relu) gv = keep8(fwd8(xv, k8), gv, fm);
        st8f(orow + j * C + c, dx8(xv, gv, k8.h, k8.l, kv, cv, qv));
      }
    }
    if (c + 4 <= C) {
      const aff4_t k4 = aff4_at(aff, C, c);
      const v4f kv = ld4f(K + c), cv = ld4f(C1 + c), qv = ld4f(Q + c);
      for (size_t j = 0; j < nr; j++) {
        const v4f xv = ld4f(xr + j * C + c);
        v4f gv = ld4f(gr + j * C + c);
        if (relu) gv = keep4(fwd4(xv, k4), gv, fm);
        st4f(orow + j * C + c, dx4(xv, gv, k4.h, k4.l, kv, cv, qv));
      }
      c += 4;
    }
    for (; c < C; c++)
      for (size_t j = 0; j < nr; j++) {
        const float xi = xr[j * C + c];
        const float gi = relu ? keep1(fwd1(xi, aff, C, c), gr[j * C + c]) : gr[j * C + c];
        orow[j * C + c] = dx1(xi, gi, aff[c], aff[C + c], K[c], C1[c], Q[c]);
      }
  }
}

KERNEL void grad_input_impl(const float *x, const float *dy, float *dx, size_t N, size_t C,
                            size_t S, const float *aff, const float *kcq, int relu, const int fm) {
  if (S == 1) {
    if (relu)
      rows_grad_input(x, dy, dx, N, C, aff, kcq, 1, fm);
    else
      rows_grad_input(x, dy, dx, N, C, aff, kcq, 0, fm);
  } else {
    if (relu)
      plane_grad_input(x, dy, dx, N, C, S, aff, kcq, 1, fm);
    else
      plane_grad_input(x, dy, dx, N, C, S, aff, kcq, 0, fm);
  }
}

/* ---- dispatch ------------------------------------------------------------------ */

/*
 * Each kernel entry point below exists up to four times: *_generic with
 * the build's flags; on x86 with GCC or Clang, *_avx2 compiled for AVX2
 * (256-bit vectors); with GCC, *_fma for AVX2 and FMA, where some of the
 * sums' additions run as fma(b, 1, a) (acc_add); and on x86 with GCC or
 * Clang, *_avx512 for AVX-512 (F, VL, DQ) with AVX2 and FMA, whose sums run
 * on 512-bit vectors (FM_512; with GCC, with the FMA additions too).  None
 * contracts a*b + c (the pragma at the top), so all give the same bits.
 * The best the CPU has runs; sbn__bn_kernel_path forces one (tests compare
 * them bit for bit).
 */
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define SBN_BN_AVX2 1
#define AVX2_TARGET __attribute__((target("avx2")))
#define FMA_TARGET __attribute__((target("avx2,fma")))
#define AVX512_TARGET __attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma")))
#else
#define SBN_BN_AVX2 0
#define AVX2_TARGET
#define FMA_TARGET
#define AVX512_TARGET
#endif

enum { PATH_GENERIC, PATH_AVX2, PATH_FMA, PATH_AVX512 };
static atomic_int kernel_path = -1; /* -1: not chosen yet */

/* The best path this CPU (and this build) has. */
static int cpu_path(void) {
#if SBN_BN_AVX2
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2")) return PATH_GENERIC;
  if (!__builtin_cpu_supports("fma")) return PATH_AVX2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    return PATH_AVX512;
  if (SBN_BN_BUILTINS) return PATH_FMA;
  return PATH_AVX2;
#else
  return PATH_GENERIC;
#endif
}

static int path(void) {
  int p = atomic_load_explicit(&kernel_path, memory_order_relaxed);
  if (p < 0) {
    p = cpu_path();
    atomic_store_explicit(&kernel_path, p, memory_order_relaxed);
  }
  return p;
}

/* Not in the API: -1 chooses by the CPU again, 0 forces the generic
 * kernels, 1 the AVX2 ones, 2 the AVX2+FMA ones, 3 the AVX-512 ones.
 * Returns the path now in use, or -1 (nothing changed) when the CPU or the
 * build lacks the one asked for. */
int sbn__bn_kernel_path(int want) {
  const int best = cpu_path();
  if (want > best || (want == PATH_FMA && !SBN_BN_BUILTINS)) return -1;
  atomic_store(&kernel_path, want < 0 ? best : want);
  return path();
}

#define FM_FMA_IF (SBN_BN_BUILTINS ? FM_FMA : 0)
#define WITH_FM0(...) (__VA_ARGS__, 0)
#define WITH_SPLIT(...) (__VA_ARGS__, FM_SPLIT)
#define WITH_FMA(...) (__VA_ARGS__, FM_FMA_IF)
#define WITH_512(...) (__VA_ARGS__, FM_512 | FM_FMA_IF)
#define BN_KERNEL(name, params, args)                                                              \
  static void name##_generic params { name##_impl WITH_SPLIT args; }                      \
  AVX2_TARGET static void name##_avx2 params { name##_impl WITH_FM0 args; }             \
  FMA_TARGET static void name##_fma params { name##_impl WITH_FMA args; }       \
  AVX512_TARGET static void name##_avx512 params {                                                 \
    name##_impl WITH_512 args;                                          \
  }                                                                                                \
  static void name params {                                                                        \
    const int p_ = SBN_BN_AVX2 ? path() : PATH_GENERIC;                                            \
    if (SBN_BN_AVX2 && p_ == PATH_AVX512)                                                          \
      name##_avx512 args;                                                                          \
    else if (SBN_BN_BUILTINS && p_ == PATH_FMA)                                                         \
      name##_fma args;                                                                             \
    else if (p_ >= PATH_AVX2)                                                                      \
      name##_avx2 args;                                                                            \
    else                                                                                           \
      name##_generic args;                                                                         \
  }

BN_KERNEL(stats,
          (const float *x, size_t N, size_t C, size_t S, double *mean, double *m2, double *acc),
          (x, N, C, S, mean, m2, acc))
BN_KERNEL(normalize,
          (const float *x, float *y, size_t N, size_t C, size_t S, const float *aff, int relu),
          (x, y, N, C, S, aff, relu))
BN_KERNEL(grad_sums,
          (const float *x, const float *dy, size_t N, size_t C, size_t S, const double *mean,
           const float *aff, double *sdy, double *sdyx, double *acc, int relu),
          (x, dy, N, C, S, mean, aff, sdy, sdyx, acc, relu))
BN_KERNEL(grad_input,
          (const float *x, const float *dy, float *dx, size_t N, size_t C, size_t S,
           const float *aff, const float *kcq, int relu),
          (x, dy, dx, N, C, S, aff, kcq, relu))

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
  /* 6C doubles, the statistics' scratch (ACC_DOUBLES * C), then 4C floats. */
  double *work = malloc((6 + ACC_DOUBLES) * C * sizeof(double) + 4 * C * sizeof(float));
  if (!work) return sbn__fail(SBN_ENOMEM, "out of memory in '%s' forward", identity(b));
  double *mean = work, *m2 = work + C, *invstd = work + 2 * C;
  double *scale = work + 3 * C, *shift = work + 4 * C, *gmean = work + 5 * C;
  double *acc = work + 6 * C;
  float *aff = (float *)(work + (6 + ACC_DOUBLES) * C);
  if ((rc = sbn__tensor_new_uninit(sbn_tensor_ndim(x), sbn_tensor_shape(x), &y)) != SBN_OK) {
    free(work);
    return rc;
  }
  const float *xd = sbn_tensor_cdata(x);
  uint64_t n = (uint64_t)N * S; /* N rows when S = 1 (channels-last) */
  if (use_batch) {
    stats(xd, N, C, S, mean, m2, acc);
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
  /* 7C doubles, the sums' scratch (ACC_DOUBLES * C), then 3C floats. */
  double *work = malloc((7 + ACC_DOUBLES) * C * sizeof(double) + 3 * C * sizeof(float));
  if (!work) return sbn__fail(SBN_ENOMEM, "out of memory in '%s' backward", identity(b));
  double *sdy = work, *sdyx = work + C, *gdy = work + 2 * C, *gdyx = work + 3 * C;
  double *k = work + 4 * C, *c1 = work + 5 * C, *q = work + 6 * C;
  double *acc = work + 7 * C;
  float *kcq = (float *)(work + (7 + ACC_DOUBLES) * C);
  if ((rc = sbn__tensor_new_uninit(sbn_tensor_ndim(x), sbn_tensor_shape(x), &dx)) != SBN_OK) {
    free(work);
    return rc;
  }
  const double *mean = b->saved_mean, *invstd = b->saved_invstd;
  /* With the fused ReLU, dy is masked by the forward's y > 0 inside both
   * passes; everything below is then BatchNorm's backward of the masked dy. */
  grad_sums(sbn_tensor_cdata(x), sbn_tensor_cdata(dy), N, C, S, mean, b->saved_aff, sdy, sdyx,
            acc, relu);
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
  if (o->num_features > SIZE_MAX / (64 * sizeof(double)))
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
  snprintf(b->default_name, sizeof(b->default_name), "SyncBatchNorm#%lu", layer_counter++);
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
