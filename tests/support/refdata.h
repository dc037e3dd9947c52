/*
 * refdata.h - reading the reference files written by tests/data/gen_reference.py
 * ("SBNREF1" format, documented in that script), and the spec's tolerance.
 * Loading asserts (Check) on any malformed file, so call it from the test
 * process, not from forked workers.
 */
#ifndef SBN_TEST_REFDATA_H
#define SBN_TEST_REFDATA_H

#include <stddef.h>

#include "sbn/sbn.h"

typedef struct ref_array {
  char name[64];
  int ndim;
  size_t shape[SBN_MAX_DIMS];
  size_t numel;
  float *data;
} ref_array;

typedef struct ref_file {
  size_t n;
  ref_array *a;
} ref_file;

/* Loads SBN_TEST_DATA_DIR/file. */
ref_file ref_load(const char *file);
void ref_free(ref_file *r);
/* The array called name (asserts that it exists). */
const ref_array *ref_get(const ref_file *r, const char *name);
/* A new tensor holding a copy of the array. */
sbn_tensor *ref_tensor(const ref_file *r, const char *name);

/*
 * A new tensor holding the block [start, start+len) along axis of array
 * name (a rank's slice of a global batch), or NULL when out of memory.
 * Safe to call in forked workers (no assertions).
 */
sbn_tensor *ref_slice(const ref_file *r, const char *name, int axis, size_t start, size_t len);

/* The spec's tolerance: |got - ref| <= 5e-6 + 5e-6 |ref|. */
#define REF_ATOL 5e-6
#define REF_RTOL 5e-6
/*
 * Index of the worst element outside the tolerance, or -1 when all are
 * within it (NaN counts as outside).
 */
long ref_worst(const float *got, const float *ref, size_t n);

#endif
