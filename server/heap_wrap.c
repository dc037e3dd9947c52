/*
 * heap_wrap.c - the allocation wrappers of the sbn-coordinator binary (see
 * heap.h).  Linked with -Wl,--wrap=malloc,--wrap=calloc,--wrap=realloc, so
 * the calls of every object in the binary come here; the real functions
 * (the C library's, or a sanitizer's) do the work.
 */
#include <stddef.h>

#include "heap.h"

void *__real_malloc(size_t n);
void *__real_calloc(size_t k, size_t n);
void *__real_realloc(void *p, size_t n);
void *__wrap_malloc(size_t n);
void *__wrap_calloc(size_t k, size_t n);
void *__wrap_realloc(void *p, size_t n);

void *__wrap_malloc(size_t n) {
  sbn__srv_heap_note();
  return __real_malloc(n);
}

void *__wrap_calloc(size_t k, size_t n) {
  sbn__srv_heap_note();
  return __real_calloc(k, n);
}

void *__wrap_realloc(void *p, size_t n) {
  sbn__srv_heap_note();
  return __real_realloc(p, n);
}
