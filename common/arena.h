/*
 * arena.h - memory for decoded messages, reused from one message to the next.
 *
 * A message decoded into an arena (through sbn__arena_allocator) lives until
 * the arena's next reset: protobuf-c's own frees are no-ops.  One buffer is
 * reused for every message, so a steady stream of messages of one size
 * allocates nothing; what does not fit goes to malloc until the next reset,
 * which then grows the buffer to fit (up to keep_max bytes, past which large
 * messages keep costing an allocation each rather than pinning their size).
 *
 * An arena holds no pointer to itself, so two arenas may be swapped to hand
 * a decoded message (and the memory under it) to a new owner.  Not
 * thread-safe: one owner at a time.
 *
 * An arena also carries one block of raw bytes (block, block_cap): the
 * receive buffer holding a message decoded in place (sbn__msg_decode_tail),
 * traded for the reader's next buffer with sbn__framer_swap_buf, after which
 * the owner sets block_used.  A swap moves the blocks along when one of them
 * is in use (the message goes with its bytes); otherwise each arena keeps
 * its own block, so a reader's spare buffer stays with its reader.  Resets
 * keep the block (no longer in use); release frees it.
 */
#ifndef SBN_COMMON_ARENA_H
#define SBN_COMMON_ARENA_H

#include <protobuf-c/protobuf-c.h>
#include <stddef.h>
#include <stdint.h>

typedef struct sbn__arena {
  uint8_t *buf;
  size_t cap, used, want; /* want: what the messages since the reset asked for */
  size_t keep_max;        /* the buffer grows to at most this; 0 = no limit */
  void **spill;           /* what did not fit, malloc'd until the next reset */
  size_t nspill, spill_cap;
  uint8_t *block;         /* raw bytes that may travel with the arena (see above) */
  size_t block_cap;
  int block_used;         /* block holds bytes of the message in the arena */
  int failed;             /* an allocation failed since the reset: a decode that
                             failed then was out of memory, not a bad message */
} sbn__arena;

/* An empty arena whose buffer grows to at most keep_max bytes (0: no limit). */
void sbn__arena_init(sbn__arena *a, size_t keep_max);
/* Forgets everything allocated; grows the buffer if the last use overflowed. */
void sbn__arena_reset(sbn__arena *a);
/* Frees all memory; the arena is empty and usable again. */
void sbn__arena_release(sbn__arena *a);
/* The bytes a holds while idle: its buffer and its block. */
static inline size_t sbn__arena_bytes(const sbn__arena *a) { return a->cap + a->block_cap; }
/* A protobuf-c allocator drawing on a (valid while a is not moved). */
ProtobufCAllocator sbn__arena_allocator(sbn__arena *a);

static inline void sbn__arena_swap(sbn__arena *a, sbn__arena *b) {
  sbn__arena t = *a;
  *a = *b;
  *b = t;
  if (!a->block_used && !b->block_used) { /* the blocks stay where they were */
    uint8_t *blk = a->block;
    size_t cap = a->block_cap;
    a->block = b->block;
    a->block_cap = b->block_cap;
    b->block = blk;
    b->block_cap = cap;
  }
}

#endif
