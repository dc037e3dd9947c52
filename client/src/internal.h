/*
 * internal.h - private declarations shared by the client's source files.
 * Names here are sbn__*: not exported, not part of the API.
 */
#ifndef SBN_CLIENT_INTERNAL_H
#define SBN_CLIENT_INTERNAL_H

#include <stdarg.h>
#include <stddef.h>

#include "sbn/sbn.h"

/*
 * Records a failure for sbn_last_error() on this thread and returns code, so
 * that error paths read `return sbn__fail(SBN_EINVAL, "C is %zu", c);`.
 * Messages follow the house style: lowercase, no final full stop, the
 * subject quoted.
 */
int sbn__fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Clears the last error (successful calls need not call this). */
void sbn__clear_error(void);

#endif /* SBN_CLIENT_INTERNAL_H */
