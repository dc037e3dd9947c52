/*
 * sequential.c - the Sequential container: children "0", "1", ... called in
 * index order.  The layers live only in the module's attributes, so a layer
 * re-assigned with sbn_module_set_module(seq, "1", other) is the one used.
 */
#include <stdio.h>
#include <stdlib.h>

#include "internal.h"
#include "nn_internal.h"

typedef struct seq {
  size_t n;
} seq;

static const sbn_module_vtable seq_vtable;

static int layer_at(const sbn_module *m, size_t i, sbn_module **out) {
  char key[32];
  snprintf(key, sizeof(key), "%zu", i);
  *out = sbn_module_get_module(m, key);
  if (!*out) return sbn__fail(SBN_ESTATE, "Sequential has no layer '%s'", key);
  return SBN_OK;
}

static int seq_forward(sbn_module *m, sbn_tensor *x, sbn_tensor **out) {
  const seq *s = sbn_module_impl(m);
  sbn_tensor *cur = sbn_tensor_ref(x);
  int rc = SBN_OK;
  for (size_t i = 0; i < s->n && rc == SBN_OK; i++) {
    sbn_module *layer;
    sbn_tensor *next = NULL;
    rc = layer_at(m, i, &layer);
    if (rc == SBN_OK) rc = sbn_module_call(layer, cur, &next);
    if (rc == SBN_OK) sbn_tensor_replace(&cur, next);
  }
  if (rc != SBN_OK) {
    sbn_tensor_free(cur);
    return rc;
  }
  *out = cur;
  return SBN_OK;
}

static int seq_backward(sbn_module *m, sbn_tensor *dy, sbn_tensor **out) {
  const seq *s = sbn_module_impl(m);
  sbn_tensor *cur = sbn_tensor_ref(dy);
  int rc = SBN_OK;
  for (size_t i = s->n; i-- > 0 && rc == SBN_OK;) {
    sbn_module *layer;
    sbn_tensor *next = NULL;
    rc = layer_at(m, i, &layer);
    if (rc == SBN_OK) rc = sbn_module_backward(layer, cur, &next);
    if (rc == SBN_OK) sbn_tensor_replace(&cur, next);
  }
  if (rc != SBN_OK) {
    sbn_tensor_free(cur);
    return rc;
  }
  *out = cur;
  return SBN_OK;
}

static const sbn_module_vtable seq_vtable = {
    .type_name = "Sequential",
    .forward = seq_forward,
    .backward = seq_backward,
    .destroy = free,
};

SBN_API int sbn_sequential_new(sbn_module *const *layers, size_t n, sbn_module **out) {
  if (!out) return sbn__fail(SBN_EINVAL, "sequential output pointer is NULL");
  if (n && !layers) return sbn__fail(SBN_EINVAL, "sequential layers are NULL");
  for (size_t i = 0; i < n; i++)
    if (!layers[i]) return sbn__fail(SBN_EINVAL, "sequential layer %zu is NULL", i);
  seq *s = calloc(1, sizeof(*s));
  if (!s) return sbn__fail(SBN_ENOMEM, "out of memory creating a Sequential");
  sbn_module *m;
  int rc = sbn_module_new(&seq_vtable, s, &m);
  if (rc != SBN_OK) return rc;
  for (size_t i = 0; i < n && rc == SBN_OK; i++) rc = sbn_sequential_append(m, layers[i]);
  if (rc != SBN_OK) {
    sbn_module_free(m);
    return rc;
  }
  *out = m;
  return SBN_OK;
}

SBN_API int sbn_sequential_append(sbn_module *m, sbn_module *layer) {
  if (!m || sbn_module_vtable_of(m) != &seq_vtable)
    return sbn__fail(SBN_EINVAL, "module is not a Sequential");
  if (!layer) return sbn__fail(SBN_EINVAL, "sequential layer is NULL");
  seq *s = sbn_module_impl(m);
  char key[32];
  snprintf(key, sizeof(key), "%zu", s->n);
  int rc = sbn_module_set_module(m, key, layer);
  if (rc == SBN_OK) s->n++;
  return rc;
}

SBN_API size_t sbn_sequential_len(const sbn_module *m) {
  if (!m || sbn_module_vtable_of(m) != &seq_vtable) return 0;
  return ((const seq *)sbn_module_impl(m))->n;
}

SBN_API sbn_module *sbn_sequential_get(const sbn_module *m, size_t i) {
  if (i >= sbn_sequential_len(m)) return NULL;
  char key[32];
  snprintf(key, sizeof(key), "%zu", i);
  return sbn_module_get_module(m, key);
}
