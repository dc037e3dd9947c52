/*
 * sbn/tensor.h - a small float32 tensor: contiguous, rank 1 to SBN_MAX_DIMS,
 * owning its memory or viewing the caller's, reference counted.
 *
 * Ownership: every function that gives out a tensor (sbn_tensor_new, _view,
 * _clone, ...) hands the caller one reference.  sbn_tensor_ref() adds one,
 * sbn_tensor_free() drops one; the tensor and its memory go away with the
 * last reference.  Modules take their own reference when a tensor is
 * registered, so a caller may free its reference right after registering,
 * and the same tensor may be shared by several modules (a shared weight).
 *
 * Gradients: a tensor may carry a gradient slot, a second tensor of the same
 * shape (zero-filled when created).  Parameters registered on a module get
 * one; BatchNorm's backward accumulates (+=) into it.
 *
 * Threading: a tensor may be read from several threads at once; changing its
 * contents, its gradient slot or its reference count needs one thread at a
 * time (the count itself is atomic, so dropping references to a tensor
 * shared by two otherwise independent modules from two threads is safe).
 *
 * Failure: fallible functions return SBN_OK or a negative SBN_E* code and set
 * the message of sbn_last_error(); outputs are left unchanged on failure.
 */
#ifndef SBN_TENSOR_H
#define SBN_TENSOR_H

#include <stddef.h>

#include "sbn/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Largest rank a tensor may have: (N, C, D, H, W). */
#define SBN_MAX_DIMS 5

typedef struct sbn_tensor sbn_tensor;

/*
 * A new zero-filled tensor of the given shape (ndim in 1..SBN_MAX_DIMS; any
 * dimension may be 0, giving an empty tensor).  SBN_ESHAPE for a bad rank or
 * a size that overflows, SBN_ENOMEM when out of memory.
 */
SBN_API int sbn_tensor_new(int ndim, const size_t *shape, sbn_tensor **out);

/* Like sbn_tensor_new, then copies numel floats from data (NULL = zeros). */
SBN_API int sbn_tensor_from_data(int ndim, const size_t *shape, const float *data,
                                 sbn_tensor **out);

/*
 * A tensor viewing the caller's memory (not copied, never freed by the
 * library).  data must hold numel floats and outlive every reference to the
 * view; it may be NULL only when numel is 0.
 */
SBN_API int sbn_tensor_view(int ndim, const size_t *shape, float *data, sbn_tensor **out);

/* A new owning tensor with the same shape and contents (no gradient slot). */
SBN_API int sbn_tensor_clone(const sbn_tensor *t, sbn_tensor **out);

/* Adds a reference and returns t (NULL gives NULL). */
SBN_API sbn_tensor *sbn_tensor_ref(sbn_tensor *t);

/* Drops one reference; the last one frees the tensor.  NULL is a no-op. */
SBN_API void sbn_tensor_free(sbn_tensor *t);

/*
 * Replaces the reference held in *slot with value (whose reference the slot
 * now owns) and drops the old one.  For hooks that replace inputs/outputs.
 */
SBN_API void sbn_tensor_replace(sbn_tensor **slot, sbn_tensor *value);

SBN_API int sbn_tensor_ndim(const sbn_tensor *t);
/* Size of dimension i, or 0 when i is out of range. */
SBN_API size_t sbn_tensor_dim(const sbn_tensor *t, int i);
/* The ndim sizes, owned by the tensor. */
SBN_API const size_t *sbn_tensor_shape(const sbn_tensor *t);
SBN_API size_t sbn_tensor_numel(const sbn_tensor *t);
/* The contiguous row-major data (NULL possible when numel is 0). */
SBN_API float *sbn_tensor_data(sbn_tensor *t);
SBN_API const float *sbn_tensor_cdata(const sbn_tensor *t);
/* True when t owns its memory, false for a view. */
SBN_API int sbn_tensor_is_owner(const sbn_tensor *t);
/* Number of references (for tests and debugging). */
SBN_API long sbn_tensor_refcount(const sbn_tensor *t);
/* True when both have the same rank and sizes. */
SBN_API int sbn_tensor_same_shape(const sbn_tensor *a, const sbn_tensor *b);

/*
 * Reinterprets t with another shape of the same number of elements (data
 * untouched).  SBN_ESHAPE when the counts differ or the rank is bad.  The
 * gradient slot, if any, is reshaped too.
 */
SBN_API int sbn_tensor_reshape(sbn_tensor *t, int ndim, const size_t *shape);

/* Sets every element to v. */
SBN_API void sbn_tensor_fill(sbn_tensor *t, float v);

/*
 * Copies src's values into dst.  Requires equal element counts (shapes may
 * differ: the copy is flat); SBN_ESHAPE naming both shapes otherwise.
 */
SBN_API int sbn_tensor_copy(sbn_tensor *dst, const sbn_tensor *src);

/*
 * The gradient slot: sbn_tensor_grad() returns it (borrowed, valid while t
 * lives) or NULL when t has none.  sbn_tensor_require_grad() creates a
 * zero-filled slot if missing (SBN_ENOMEM possible).
 */
SBN_API sbn_tensor *sbn_tensor_grad(const sbn_tensor *t);
SBN_API int sbn_tensor_require_grad(sbn_tensor *t);

/* True when t was registered as a parameter of some module. */
SBN_API int sbn_tensor_is_parameter(const sbn_tensor *t);

/*
 * Writes "(3, 8, 4)" into buf (always terminated when len > 0) and returns
 * buf.  Handy for error messages.
 */
SBN_API const char *sbn_tensor_shape_str(const sbn_tensor *t, char *buf, size_t len);

/*
 * Buffer cache.  Freed tensor buffers of 64 KiB or more are kept (up to a
 * byte limit, default 256 MiB) and reused for tensors of the same size, so
 * a training loop does not pay page faults for fresh memory every step.
 * sbn_tensor_cache_set_limit(0) turns it off; sbn_tensor_cache_trim() gives
 * every cached buffer back to the system (sbn_finalize() does too).
 * Thread-safe.
 */
SBN_API void sbn_tensor_cache_set_limit(size_t bytes);
SBN_API void sbn_tensor_cache_trim(void);
/* Bytes currently held by the cache. */
SBN_API size_t sbn_tensor_cache_bytes(void);

#ifdef __cplusplus
}
#endif

#endif /* SBN_TENSOR_H */
