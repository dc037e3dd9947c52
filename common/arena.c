/* arena.c - reusable memory for decoded messages (see arena.h). */
#include "arena.h"

#include <stdlib.h>
#include <string.h>

#define SBN_ARENA_ALIGN 16

void sbn__arena_init(sbn__arena *a, size_t keep_max) {
  memset(a, 0, sizeof(*a));
  a->keep_max = keep_max;
}

static void *arena_alloc(void *ud, size_t size) {
  sbn__arena *a = ud;
  size = (size + SBN_ARENA_ALIGN - 1) & ~(size_t)(SBN_ARENA_ALIGN - 1);
  a->want += size;
  if (size <= a->cap - a->used) {
    void *p = a->buf + a->used;
    a->used += size;
    return p;
  }
  if (a->nspill == a->spill_cap) {
    size_t ncap = a->spill_cap ? 2 * a->spill_cap : 8;
    void **ns = realloc(a->spill, ncap * sizeof(*ns));
    if (ns == NULL) {
      a->failed = 1;
      return NULL;
    }
    a->spill = ns;
    a->spill_cap = ncap;
  }
  void *p = malloc(size);
  if (p != NULL)
    a->spill[a->nspill++] = p;
  else
    a->failed = 1;
  return p;
}

static void arena_free(void *ud, void *p) {
  (void)ud;
  (void)p; /* everything goes at the next reset */
}

void sbn__arena_reset(sbn__arena *a) {
  for (size_t i = 0; i < a->nspill; i++)
    free(a->spill[i]);
  a->nspill = 0;
  if (a->want > a->cap && (a->keep_max == 0 || a->cap < a->keep_max)) {
    size_t ncap = a->want + a->want / 4;
    if (a->keep_max != 0 && ncap > a->keep_max)
      ncap = a->keep_max;
    free(a->buf);
    a->buf = malloc(ncap);
    a->cap = a->buf ? ncap : 0;
  }
  a->used = a->want = 0;
  a->block_used = 0;
  a->failed = 0;
}

void sbn__arena_release(sbn__arena *a) {
  size_t keep_max = a->keep_max;
  a->want = 0; /* no growing on the way out */
  sbn__arena_reset(a);
  free(a->spill);
  free(a->buf);
  free(a->block);
  sbn__arena_init(a, keep_max);
}

ProtobufCAllocator sbn__arena_allocator(sbn__arena *a) {
  ProtobufCAllocator pa = {arena_alloc, arena_free, a};
  return pa;
}
