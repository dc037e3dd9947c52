/* refdata.c - the SBNREF1 reader shared by the BatchNorm test suites. */
#include "refdata.h"

#include <check.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define REF_MAX_ARRAYS 64

static uint32_t rd_u32(FILE *f) {
  unsigned char b[4];
  ck_assert_uint_eq(fread(b, 1, 4, f), 4);
  return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
}

ref_file ref_load(const char *file) {
  char path[512];
  snprintf(path, sizeof(path), "%s/%s", SBN_TEST_DATA_DIR, file);
  FILE *f = fopen(path, "rb");
  ck_assert_msg(f != NULL, "cannot open %s (run tests/data/gen_reference.py)", path);
  char magic[8];
  ck_assert_uint_eq(fread(magic, 1, 8, f), 8);
  ck_assert(memcmp(magic, "SBNREF1\0", 8) == 0);
  ref_file r;
  r.n = rd_u32(f);
  ck_assert_uint_le(r.n, REF_MAX_ARRAYS);
  r.a = calloc(r.n, sizeof(*r.a));
  ck_assert_ptr_nonnull(r.a);
  for (size_t i = 0; i < r.n; i++) {
    ref_array *a = &r.a[i];
    uint32_t len = rd_u32(f);
    ck_assert_uint_lt(len, sizeof(a->name));
    ck_assert_uint_eq(fread(a->name, 1, len, f), len);
    a->ndim = (int)rd_u32(f);
    ck_assert(a->ndim >= 1 && a->ndim <= SBN_MAX_DIMS);
    a->numel = 1;
    for (int d = 0; d < a->ndim; d++)
      a->numel *= a->shape[d] = rd_u32(f);
    a->data = malloc(a->numel * sizeof(float) + 1);
    ck_assert_ptr_nonnull(a->data);
    /* The files are little endian, like every machine this runs on. */
    ck_assert_uint_eq(fread(a->data, sizeof(float), a->numel, f), a->numel);
  }
  fclose(f);
  return r;
}

void ref_free(ref_file *r) {
  for (size_t i = 0; i < r->n; i++)
    free(r->a[i].data);
  free(r->a);
  r->a = NULL;
  r->n = 0;
}

const ref_array *ref_get(const ref_file *r, const char *name) {
  for (size_t i = 0; i < r->n; i++)
    if (strcmp(r->a[i].name, name) == 0)
      return &r->a[i];
  ck_abort_msg("reference array '%s' missing", name);
  return NULL;
}

sbn_tensor *ref_tensor(const ref_file *r, const char *name) {
  const ref_array *a = ref_get(r, name);
  sbn_tensor *t;
  ck_assert_int_eq(sbn_tensor_from_data(a->ndim, a->shape, a->data, &t), SBN_OK);
  return t;
}

long ref_worst(const float *got, const float *ref, size_t n) {
  long at = -1;
  double worst = 0;
  for (size_t i = 0; i < n; i++) {
    double err = fabs((double)got[i] - ref[i]) - (REF_ATOL + REF_RTOL * fabs(ref[i]));
    if (isnan(got[i]))
      err = INFINITY;
    if (err > worst) {
      worst = err;
      at = (long)i;
    }
  }
  return at;
}

sbn_tensor *ref_slice(const ref_file *r, const char *name, int axis, size_t start, size_t len) {
  const ref_array *a = NULL;
  for (size_t i = 0; i < r->n && a == NULL; i++)
    if (strcmp(r->a[i].name, name) == 0)
      a = &r->a[i];
  if (a == NULL || axis < 0 || axis >= a->ndim || start + len > a->shape[axis])
    return NULL;
  size_t shape[SBN_MAX_DIMS], outer = 1, inner = 1;
  memcpy(shape, a->shape, sizeof(shape));
  shape[axis] = len;
  for (int d = 0; d < axis; d++)
    outer *= a->shape[d];
  for (int d = axis + 1; d < a->ndim; d++)
    inner *= a->shape[d];
  sbn_tensor *t;
  if (sbn_tensor_new(a->ndim, shape, &t) != SBN_OK)
    return NULL;
  for (size_t o = 0; o < outer; o++)
    memcpy(sbn_tensor_data(t) + o * len * inner, a->data + (o * a->shape[axis] + start) * inner,
           len * inner * sizeof(float));
  return t;
}
