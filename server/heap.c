/* heap.c - the coordinator's allocation count (see heap.h). */
#include "heap.h"

#include <stdatomic.h>

/* Atomic: libuv's thread pool (the resolver, at start) allocates too. */
static atomic_uint_fast64_t allocs;
static atomic_int counted;
/* Only the loop's thread pauses; the pool's allocations are counted. */
static atomic_int paused;

void sbn__srv_heap_note(void) {
  if (atomic_load_explicit(&paused, memory_order_relaxed) == 0)
    atomic_fetch_add_explicit(&allocs, 1, memory_order_relaxed);
}

void sbn__srv_heap_enable(void) { atomic_store(&counted, 1); }

int sbn__srv_heap_counted(void) { return atomic_load(&counted); }

uint64_t sbn__srv_heap_allocs(void) {
  return (uint64_t)atomic_load_explicit(&allocs, memory_order_relaxed);
}

void sbn__srv_heap_pause(int delta) {
  atomic_fetch_add_explicit(&paused, delta, memory_order_relaxed);
}
