/*
 * heap.h - counting the coordinator's heap allocations.
 *
 * The sbn-coordinator binary is linked with the linker's --wrap for malloc,
 * calloc and realloc (heap_wrap.c) and hands the same functions to libuv,
 * while every message is decoded into arenas whose memory comes from malloc
 * too: so every allocation the coordinator's code, libuv and protobuf-c make
 * on its behalf is counted here.  The metrics endpoint's own work (accepting
 * a scrape, rendering the page) is not: sbn__srv_heap_pause() brackets it, so
 * the count read before and after a stretch of rounds shows what the rounds
 * alone allocated (sbn_coordinator_heap_allocations_total).
 *
 * Where the coordinator is linked without the wrapper (tests driving it
 * in-process, linkers without --wrap), nothing is counted and
 * sbn__srv_heap_counted() is 0.
 */
#ifndef SBN_SERVER_HEAP_H
#define SBN_SERVER_HEAP_H

#include <stdint.h>

/* Called by the wrappers for every allocation. */
void sbn__srv_heap_note(void);
/* The wrappers are linked in: turns the count on (main, before anything). */
void sbn__srv_heap_enable(void);
int sbn__srv_heap_counted(void);
uint64_t sbn__srv_heap_allocs(void);
/* +1 before work whose allocations are not counted, -1 after it. */
void sbn__srv_heap_pause(int delta);

#endif
