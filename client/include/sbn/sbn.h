/*
 * sbn/sbn.h - synchronized BatchNorm for data-parallel training.
 *
 * The one header a user includes.  If it is not declared under sbn/, it is
 * not a published API.
 */
#ifndef SBN_SBN_H
#define SBN_SBN_H

#include "sbn/status.h"
#include "sbn/comm.h"
#include "sbn/tensor.h"
#include "sbn/module.h"
#include "sbn/nn.h"
#include "sbn/parallel.h"
#include "sbn/safetensors.h"

#ifdef __cplusplus
extern "C" {
#endif

#define SBN_VERSION_MAJOR 0
#define SBN_VERSION_MINOR 1
#define SBN_VERSION_PATCH 0
#define SBN_VERSION_STRING "0.1.0"
#define SBN_VERSION_NUMBER                                                     \
  (SBN_VERSION_MAJOR * 10000 + SBN_VERSION_MINOR * 100 + SBN_VERSION_PATCH)

/* The library's version at run time, as "0.1.0" / SBN_VERSION_NUMBER. */
SBN_API const char *sbn_version(void);
SBN_API int sbn_version_number(void);

/*
 * The message of the last failed sbn call on this thread ("rank 3 sent 64
 * channels for layer 'bn2', rank 0 sent 128"), or "" if none failed yet.
 * The string is owned by the library and valid until the next sbn call on
 * this thread.
 */
SBN_API const char *sbn_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* SBN_SBN_H */
