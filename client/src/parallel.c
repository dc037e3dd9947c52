/*
 * parallel.c - broadcast of a module's tensors and gradient averaging, on
 * top of the fused collectives.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "sbn/parallel.h"

/* A layout check travels first so that models of different shapes fail
 * with a clear message instead of a byte count mismatch. */
static int check_layout(sbn_group *g, const sbn_named_list *l) {
  size_t total = 0;
  uint64_t h = 0xCBF29CE484222325ull;
  for (size_t i = 0; i < l->count; i++) {
    size_t n = sbn_tensor_numel(l->items[i]);
    total += n;
    for (const char *p = l->names[i]; *p; p++)
      h = (h ^ (unsigned char)*p) * 0x100000001B3ull;
    h = (h ^ n) * 0x100000001B3ull;
  }
  /* Every member sends the same blob if and only if the layouts agree. */
  char blob[64];
  int len = snprintf(blob, sizeof(blob), "tensors %zu values %zu layout %016llx", l->count,
                     total, (unsigned long long)h);
  return sbn__group_model_check(g, blob, (size_t)len);
}

SBN_API int sbn_module_broadcast(sbn_group *g, sbn_module *m, int root) {
  if (m == NULL)
    return sbn__fail(SBN_EINVAL, "sbn_module_broadcast got a NULL module");
  if (root < 0 || root >= sbn_group_size(g))
    return sbn__fail(SBN_EINVAL, "broadcast root %d is not a group rank (group of %d)", root,
                     sbn_group_size(g));
  if (sbn__group_is_local(g))
    return SBN_OK;
  sbn_named_list l = {0};
  int rc = sbn_module_named_tensors(m, NULL, 1, &l);
  if (rc != SBN_OK)
    return rc;
  rc = check_layout(g, &l);
  size_t total = 0;
  for (size_t i = 0; i < l.count; i++)
    total += sbn_tensor_numel(l.items[i]);
  float *pack = NULL;
  if (rc == SBN_OK && total > 0 && (pack = malloc(total * sizeof(float))) == NULL)
    rc = sbn__fail(SBN_ENOMEM, "out of memory packing %zu values to broadcast", total);
  if (rc == SBN_OK && total > 0) {
    size_t off = 0;
    for (size_t i = 0; i < l.count; i++) {
      size_t n = sbn_tensor_numel(l.items[i]);
      memcpy(pack + off, sbn_tensor_cdata(l.items[i]), n * sizeof(float));
      off += n;
    }
    rc = sbn_broadcast(g, pack, total * sizeof(float), root);
    if (rc == SBN_OK) {
      off = 0;
      for (size_t i = 0; i < l.count; i++) {
        size_t n = sbn_tensor_numel(l.items[i]);
        memcpy(sbn_tensor_data(l.items[i]), pack + off, n * sizeof(float));
        off += n;
      }
    }
  }
  free(pack);
  sbn_named_list_release(&l);
  return rc;
}

SBN_API int sbn_module_allreduce_grads(sbn_group *g, sbn_module *m, sbn_reduce_op op) {
  if (m == NULL)
    return sbn__fail(SBN_EINVAL, "sbn_module_allreduce_grads got a NULL module");
  if (sbn__group_is_local(g))
    return SBN_OK;
  sbn_named_list l = {0};
  int rc = sbn_module_named_parameters(m, NULL, 1, &l);
  if (rc != SBN_OK)
    return rc;
  float **bufs = calloc(l.count + 1, sizeof(*bufs));
  size_t *ns = calloc(l.count + 1, sizeof(*ns));
  size_t k = 0;
  if (bufs == NULL || ns == NULL) {
    rc = sbn__fail(SBN_ENOMEM, "out of memory listing gradients");
  } else {
    for (size_t i = 0; i < l.count; i++) {
      sbn_tensor *grad = sbn_tensor_grad(l.items[i]);
      if (grad == NULL)
        continue;
      bufs[k] = sbn_tensor_data(grad);
      ns[k++] = sbn_tensor_numel(grad);
    }
    rc = sbn_allreduce_many(g, bufs, ns, k, op);
  }
  free(bufs);
  free(ns);
  sbn_named_list_release(&l);
  return rc;
}
