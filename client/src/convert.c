/*
 * convert.c - BatchNorm <-> SyncBatchNorm conversion, layer identities and
 * the pre-training model check.
 *
 * Conversion is in place: both classes share one implementation and differ
 * only in their vtable, so swapping it keeps every tensor, option, flag,
 * hook and every parent's reference (shared layers stay shared).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "nn_internal.h"

static int convert(sbn_module *root, int to_sync, sbn_group *g, size_t *converted) {
  sbn_named_list l = {0};
  size_t count = 0;
  int rc = sbn_module_modules(root, &l);
  if (rc != SBN_OK) return rc;
  for (size_t i = 0; i < l.count; i++) {
    sbn_module *m = l.items[i];
    if (sbn_bn_kind(m) != !to_sync) continue;
    sbn__module_set_vtable(m, to_sync ? &sbn__syncbatchnorm_vtable : &sbn__batchnorm_vtable);
    sbn_bn_set_group(m, to_sync ? g : NULL);
    count++;
  }
  sbn_named_list_release(&l);
  if (converted) *converted = count;
  return SBN_OK;
}

SBN_API int sbn_convert_sync_batchnorm(sbn_module *root, sbn_group *g, size_t *converted) {
  return convert(root, 1, g, converted);
}

SBN_API int sbn_revert_sync_batchnorm(sbn_module *root, size_t *converted) {
  return convert(root, 0, NULL, converted);
}

SBN_API int sbn_module_name_layers(sbn_module *root, const char *prefix) {
  sbn_named_list l = {0};
  int rc = sbn_module_named_modules(root, prefix, &l);
  /* Entry 0 is root, keyed "" without a prefix: it keeps its name then. */
  size_t first = prefix && prefix[0] ? 0 : 1;
  /* Check every path first so that a failure renames nothing. */
  for (size_t i = first; rc == SBN_OK && i < l.count; i++)
    if (sbn_bn_kind(l.items[i]) >= 0) rc = sbn__bn_check_path_name(l.names[i]);
  for (size_t i = first; rc == SBN_OK && i < l.count; i++)
    if (sbn_bn_kind(l.items[i]) >= 0) rc = sbn__bn_set_path_name(l.items[i], l.names[i]);
  sbn_named_list_release(&l);
  return rc;
}

SBN_API int sbn_model_description(sbn_module *root, char **out, size_t *len) {
  if (!out) return sbn__fail(SBN_EINVAL, "description output pointer is NULL");
  sbn_named_list l = {0};
  int rc = sbn_module_modules(root, &l);
  if (rc != SBN_OK) return rc;
  sbn__strbuf b = {0};
  sbn__strbuf_add(&b, "", 0);
  for (size_t i = 0; i < l.count; i++) {
    sbn_bn_options o;
    if (sbn_bn_kind(l.items[i]) != 1) continue;
    sbn_bn_get_options(l.items[i], &o);
    /* %.17g: the exact doubles, so ranks compare bit patterns.  The flags
     * follow only when set, so a plain layer's line keeps its old form;
     * ranks that differ in layout or in the fused ReLU then mismatch. */
    sbn__strbuf_printf(&b, "%s %zu %.17g %.17g %d %d %d%s%s\n", o.name, o.num_features, o.eps,
                       o.momentum, o.affine, o.track_running_stats, o.freeze,
                       o.flags & SBN_BN_CHANNELS_LAST ? " channels_last" : "",
                       o.flags & SBN_BN_FUSED_RELU ? " fused_relu" : "");
  }
  sbn_named_list_release(&l);
  if (b.failed || !b.s) {
    free(b.s);
    return sbn__fail(SBN_ENOMEM, "out of memory describing the model");
  }
  *out = b.s;
  if (len) *len = b.len;
  return SBN_OK;
}

SBN_API int sbn_check_model(sbn_group *g, sbn_module *root) {
  char *text;
  size_t len;
  int rc = sbn_model_description(root, &text, &len);
  if (rc != SBN_OK) return rc;
  if (g) rc = sbn__group_model_check(g, text, len);
  free(text);
  return rc;
}
