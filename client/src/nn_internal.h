/*
 * nn_internal.h - private declarations shared by tensor.c, module.c,
 * batchnorm.c, sequential.c and convert.c.  Names here are sbn__*: not
 * exported.
 */
#ifndef SBN_NN_INTERNAL_H
#define SBN_NN_INTERNAL_H

#include <stddef.h>

#include "sbn/module.h"
#include "sbn/nn.h"
#include "sbn/tensor.h"

/* Marks t as a parameter (MegEngine's Parameter type). */
void sbn__tensor_mark_parameter(sbn_tensor *t);

/* The tensor held by plain attribute name of m, or NULL. */
sbn_tensor *sbn__module_attr_tensor(const sbn_module *m, const char *name);

/* Swaps m's vtable (BatchNorm <-> SyncBatchNorm share one impl layout). */
void sbn__module_set_vtable(sbn_module *m, const sbn_module_vtable *vt);

/* The vtables of the two BatchNorm classes (batchnorm.c). */
extern const sbn_module_vtable sbn__batchnorm_vtable;
extern const sbn_module_vtable sbn__syncbatchnorm_vtable;

/* The identity given by sbn_module_name_layers (m is a BatchNorm). */
int sbn__bn_set_path_name(sbn_module *m, const char *path);
/* SBN_OK when path is usable as a layer identity, else SBN_EINVAL. */
int sbn__bn_check_path_name(const char *path);

/* A growable string for repr and messages. */
typedef struct sbn__strbuf {
  char *s;
  size_t len, cap;
  int failed; /* an allocation failed: the contents are incomplete */
} sbn__strbuf;

void sbn__strbuf_add(sbn__strbuf *b, const char *s, size_t n);
void sbn__strbuf_printf(sbn__strbuf *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/*
 * Formats v like Python's repr(float): the shortest string that reads back
 * as v, "1e-05", "0.9", "1.0".  buf needs 32 bytes.
 */
const char *sbn__py_float(double v, char *buf, size_t len);

#endif /* SBN_NN_INTERNAL_H */
