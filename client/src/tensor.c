/* tensor.c - the float32 tensor: shape checks, ownership and helpers. */
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "nn_internal.h"

struct sbn_tensor {
  atomic_long refs;
  int ndim;
  size_t shape[SBN_MAX_DIMS];
  size_t numel;
  float *data;
  int owner;       /* data was allocated here */
  int parameter;   /* registered as a parameter somewhere */
  sbn_tensor *grad;
};

/* Validates a shape and computes its element count without overflow. */
static int shape_numel(int ndim, const size_t *shape, size_t *numel) {
  if (ndim < 1 || ndim > SBN_MAX_DIMS)
    return sbn__fail(SBN_ESHAPE, "tensor rank %d is outside 1..%d", ndim, SBN_MAX_DIMS);
  if (!shape) return sbn__fail(SBN_EINVAL, "tensor shape is NULL");
  size_t n = 1;
  for (int i = 0; i < ndim; i++) {
    if (shape[i] != 0 && n > SIZE_MAX / sizeof(float) / shape[i])
      return sbn__fail(SBN_ESHAPE, "tensor of %d dimensions is too large (dimension %d is %zu)",
                       ndim, i, shape[i]);
    n *= shape[i];
  }
  *numel = n;
  return SBN_OK;
}

static sbn_tensor *tensor_alloc(int ndim, const size_t *shape, size_t numel) {
  sbn_tensor *t = calloc(1, sizeof(*t));
  if (!t) return NULL;
  atomic_init(&t->refs, 1);
  t->ndim = ndim;
  memcpy(t->shape, shape, (size_t)ndim * sizeof(size_t));
  t->numel = numel;
  return t;
}

SBN_API int sbn_tensor_new(int ndim, const size_t *shape, sbn_tensor **out) {
  return sbn_tensor_from_data(ndim, shape, NULL, out);
}

/* Bytes of an owner's buffer: at least one element, so data is never NULL. */
static size_t buffer_bytes(size_t numel) { return (numel ? numel : 1) * sizeof(float); }

/* An owning tensor whose contents the caller fills. */
static int new_owner(int ndim, const size_t *shape, sbn_tensor **out) {
  size_t numel;
  int rc;
  if (!out) return sbn__fail(SBN_EINVAL, "tensor output pointer is NULL");
  if ((rc = shape_numel(ndim, shape, &numel)) != SBN_OK) return rc;
  sbn_tensor *t = tensor_alloc(ndim, shape, numel);
  if (!t) return sbn__fail(SBN_ENOMEM, "out of memory allocating a tensor");
  t->data = sbn__buf_get(buffer_bytes(numel));
  if (!t->data) {
    free(t);
    return sbn__fail(SBN_ENOMEM, "out of memory allocating %zu floats", numel);
  }
  t->owner = 1;
  *out = t;
  return SBN_OK;
}

int sbn__tensor_new_uninit(int ndim, const size_t *shape, sbn_tensor **out) {
  return new_owner(ndim, shape, out);
}

SBN_API int sbn_tensor_from_data(int ndim, const size_t *shape, const float *data,
                                 sbn_tensor **out) {
  sbn_tensor *t = NULL;
  if (!out) return sbn__fail(SBN_EINVAL, "tensor output pointer is NULL");
  int rc = new_owner(ndim, shape, &t);
  if (rc != SBN_OK) return rc;
  if (data && t->numel)
    memcpy(t->data, data, t->numel * sizeof(float));
  else
    memset(t->data, 0, buffer_bytes(t->numel));
  *out = t;
  return SBN_OK;
}

SBN_API int sbn_tensor_view(int ndim, const size_t *shape, float *data, sbn_tensor **out) {
  size_t numel;
  int rc;
  if (!out) return sbn__fail(SBN_EINVAL, "tensor output pointer is NULL");
  if ((rc = shape_numel(ndim, shape, &numel)) != SBN_OK) return rc;
  if (!data && numel)
    return sbn__fail(SBN_EINVAL, "view of %zu elements over NULL data", numel);
  sbn_tensor *t = tensor_alloc(ndim, shape, numel);
  if (!t) return sbn__fail(SBN_ENOMEM, "out of memory allocating a tensor");
  t->data = data;
  t->owner = 0;
  *out = t;
  return SBN_OK;
}

SBN_API int sbn_tensor_clone(const sbn_tensor *t, sbn_tensor **out) {
  if (!t) return sbn__fail(SBN_EINVAL, "tensor to clone is NULL");
  return sbn_tensor_from_data(t->ndim, t->shape, t->data, out);
}

SBN_API sbn_tensor *sbn_tensor_ref(sbn_tensor *t) {
  if (t) atomic_fetch_add(&t->refs, 1);
  return t;
}

SBN_API void sbn_tensor_free(sbn_tensor *t) {
  if (!t) return;
  if (atomic_fetch_sub(&t->refs, 1) != 1) return;
  sbn_tensor_free(t->grad);
  if (t->owner) sbn__buf_put(t->data, buffer_bytes(t->numel));
  free(t);
}

SBN_API void sbn_tensor_replace(sbn_tensor **slot, sbn_tensor *value) {
  if (!slot) return;
  sbn_tensor *old = *slot;
  *slot = value;
  /* Even when old == value: the slot's old reference is dropped and the
   * caller's new one takes its place. */
  sbn_tensor_free(old);
}

SBN_API int sbn_tensor_ndim(const sbn_tensor *t) { return t ? t->ndim : 0; }

SBN_API size_t sbn_tensor_dim(const sbn_tensor *t, int i) {
  return (t && i >= 0 && i < t->ndim) ? t->shape[i] : 0;
}

SBN_API const size_t *sbn_tensor_shape(const sbn_tensor *t) { return t ? t->shape : NULL; }
SBN_API size_t sbn_tensor_numel(const sbn_tensor *t) { return t ? t->numel : 0; }
SBN_API float *sbn_tensor_data(sbn_tensor *t) { return t ? t->data : NULL; }
SBN_API const float *sbn_tensor_cdata(const sbn_tensor *t) { return t ? t->data : NULL; }
SBN_API int sbn_tensor_is_owner(const sbn_tensor *t) { return t ? t->owner : 0; }
SBN_API long sbn_tensor_refcount(const sbn_tensor *t) { return t ? atomic_load(&t->refs) : 0; }

SBN_API int sbn_tensor_same_shape(const sbn_tensor *a, const sbn_tensor *b) {
  if (!a || !b || a->ndim != b->ndim) return 0;
  return memcmp(a->shape, b->shape, (size_t)a->ndim * sizeof(size_t)) == 0;
}

SBN_API int sbn_tensor_reshape(sbn_tensor *t, int ndim, const size_t *shape) {
  size_t numel;
  int rc;
  char a[96];
  if (!t) return sbn__fail(SBN_EINVAL, "tensor to reshape is NULL");
  if ((rc = shape_numel(ndim, shape, &numel)) != SBN_OK) return rc;
  if (numel != t->numel)
    return sbn__fail(SBN_ESHAPE, "cannot reshape tensor of shape %s (%zu elements) to %zu elements",
                     sbn_tensor_shape_str(t, a, sizeof(a)), t->numel, numel);
  t->ndim = ndim;
  memcpy(t->shape, shape, (size_t)ndim * sizeof(size_t));
  if (t->grad) {
    t->grad->ndim = ndim;
    memcpy(t->grad->shape, shape, (size_t)ndim * sizeof(size_t));
  }
  return SBN_OK;
}

SBN_API void sbn_tensor_fill(sbn_tensor *t, float v) {
  if (!t) return;
  for (size_t i = 0; i < t->numel; i++) t->data[i] = v;
}

SBN_API int sbn_tensor_copy(sbn_tensor *dst, const sbn_tensor *src) {
  char a[96], b[96];
  if (!dst || !src) return sbn__fail(SBN_EINVAL, "tensor copy with a NULL tensor");
  if (dst->numel != src->numel)
    return sbn__fail(SBN_ESHAPE, "cannot copy tensor of shape %s into one of shape %s",
                     sbn_tensor_shape_str(src, a, sizeof(a)),
                     sbn_tensor_shape_str(dst, b, sizeof(b)));
  if (dst->numel && dst->data != src->data)
    memmove(dst->data, src->data, dst->numel * sizeof(float));
  return SBN_OK;
}

SBN_API sbn_tensor *sbn_tensor_grad(const sbn_tensor *t) { return t ? t->grad : NULL; }

SBN_API int sbn_tensor_require_grad(sbn_tensor *t) {
  if (!t) return sbn__fail(SBN_EINVAL, "tensor is NULL");
  if (t->grad) return SBN_OK;
  return sbn_tensor_new(t->ndim, t->shape, &t->grad);
}

SBN_API int sbn_tensor_is_parameter(const sbn_tensor *t) { return t ? t->parameter : 0; }

void sbn__tensor_mark_parameter(sbn_tensor *t) { t->parameter = 1; }

SBN_API const char *sbn_tensor_shape_str(const sbn_tensor *t, char *buf, size_t len) {
  if (!buf || len == 0) return buf;
  if (!t) {
    snprintf(buf, len, "(null)");
    return buf;
  }
  size_t used = 0;
  buf[0] = '\0';
  used += (size_t)snprintf(buf, len, "(");
  for (int i = 0; i < t->ndim && used < len; i++)
    used += (size_t)snprintf(buf + used, len - used, "%s%zu", i ? ", " : "", t->shape[i]);
  if (used < len) snprintf(buf + used, len - used, t->ndim == 1 ? ",)" : ")");
  return buf;
}
