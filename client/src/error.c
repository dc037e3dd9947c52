/* error.c - the per-thread last error message and the version queries. */
#include <stdio.h>

#include "internal.h"

#define SBN_ERRMSG_MAX 1024

static _Thread_local char last_error[SBN_ERRMSG_MAX];

int sbn__fail(int code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(last_error, sizeof(last_error), fmt, ap);
  va_end(ap);
  return code;
}

void sbn__clear_error(void) { last_error[0] = '\0'; }

SBN_API const char *sbn_last_error(void) { return last_error; }

SBN_API const char *sbn_version(void) { return SBN_VERSION_STRING; }

SBN_API int sbn_version_number(void) { return SBN_VERSION_NUMBER; }
