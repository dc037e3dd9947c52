/*
 * test_pool.c - the coordinator's pools (server/pool.c) and the message
 * arenas (common/arena.c), in process, at their bounds: how many idle
 * rounds, reply buffers and write records are kept, how many bytes, which
 * pooled item a request gets (best fit, never more than twice its size),
 * and an arena's keep_max.  Everything is freed by the end (ASan checks).
 */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include "arena.h"
#include "frame.h"
#include "coord_internal.h"
#include "coordinator.h"
#include "sbn/status.h"

static uv_loop_t loop;
static sbn__coord *coord;

static void setup(void) {
  sbn__coord_config cfg;
  sbn__coord_config_init(&cfg);
  ck_assert_int_eq(uv_loop_init(&loop), 0);
  ck_assert_int_eq(sbn__coord_new(&loop, &cfg, &coord), SBN_OK);
}

/* Stops (which drains the pools), runs the close callbacks, frees. */
static void teardown(void) {
  sbn__coord_stop(coord);
  uv_run(&loop, UV_RUN_DEFAULT);
  sbn__coord_free(coord);
  ck_assert_int_eq(uv_loop_close(&loop), 0);
}

START_TEST(rounds_kept_up_to_the_limit) {
  setup();
  enum { N = SBN_SRV_POOL_ROUNDS_MAX + 10 };
  static sbn__srv_round *r[N];
  for (int i = 0; i < N; i++) {
    r[i] = sbn__srv_pool_round_get(coord, 4);
    ck_assert_ptr_nonnull(r[i]);
    ck_assert_uint_eq(r[i]->n, 4);
  }
  for (int i = 0; i < N; i++)
    sbn__srv_pool_round_put(coord, r[i]);
  ck_assert_uint_eq(coord->pool_nrounds, SBN_SRV_POOL_ROUNDS_MAX);
  /* Reuse: the same memory comes back, reset. */
  sbn__srv_round *a = sbn__srv_pool_round_get(coord, 4);
  int found = 0;
  for (int i = 0; i < N; i++)
    found |= r[i] == a;
  ck_assert(found);
  ck_assert_uint_eq(a->nhave, 0);
  ck_assert_ptr_null(a->group);
  for (uint32_t i = 0; i < a->cap; i++)
    ck_assert_ptr_null(a->contrib[i]);
  ck_assert_uint_eq(coord->pool_nrounds, SBN_SRV_POOL_ROUNDS_MAX - 1);
  sbn__srv_pool_round_put(coord, a);
  teardown();
}
END_TEST

START_TEST(rounds_best_fit_within_twice) {
  setup();
  sbn__srv_round *r2 = sbn__srv_pool_round_get(coord, 2);
  sbn__srv_round *r4 = sbn__srv_pool_round_get(coord, 4);
  sbn__srv_round *r16 = sbn__srv_pool_round_get(coord, 16);
  sbn__srv_pool_round_put(coord, r16);
  sbn__srv_pool_round_put(coord, r4);
  sbn__srv_pool_round_put(coord, r2);
  /* 3 members: the 4-slot round (the 2-slot one is too small). */
  sbn__srv_round *a = sbn__srv_pool_round_get(coord, 3);
  ck_assert_ptr_eq(a, r4);
  ck_assert_uint_eq(a->n, 3);
  /* 4 members: the 16-slot one is more than twice that, so a new round. */
  sbn__srv_round *b = sbn__srv_pool_round_get(coord, 4);
  ck_assert(b != r16 && b != r2);
  ck_assert_uint_eq(b->cap, 4);
  /* 8 members: the 16-slot one, at exactly twice. */
  sbn__srv_round *c = sbn__srv_pool_round_get(coord, 8);
  ck_assert_ptr_eq(c, r16);
  sbn__srv_pool_round_put(coord, a);
  sbn__srv_pool_round_put(coord, b);
  sbn__srv_pool_round_put(coord, c);
  teardown();
}
END_TEST

/* Pooled rounds keep their slot arenas up to SBN_SRV_POOL_ROUND_BYTES_MAX. */
START_TEST(round_arena_bytes_bounded) {
  setup();
  const size_t big = SBN_SRV_ARENA_KEEP_MAX; /* the most one arena keeps */
  const int n = 4;
  /* Rounds whose 4 arenas keep `big` bytes each, until past the byte bound. */
  const int k = (int)(SBN_SRV_POOL_ROUND_BYTES_MAX / (n * big)) + 2;
  sbn__srv_round **r = calloc((size_t)k, sizeof(*r));
  ck_assert_ptr_nonnull(r);
  for (int i = 0; i < k; i++) {
    r[i] = sbn__srv_pool_round_get(coord, (uint32_t)n);
    for (int s = 0; s < n; s++) {
      ProtobufCAllocator pa = sbn__arena_allocator(&r[i]->arenas[s]);
      ck_assert_ptr_nonnull(pa.alloc(pa.allocator_data, big));
      sbn__arena_reset(&r[i]->arenas[s]); /* grows to keep `big` next time */
      ck_assert_uint_eq(r[i]->arenas[s].cap, big);
    }
  }
  for (int i = 0; i < k; i++)
    sbn__srv_pool_round_put(coord, r[i]);
  ck_assert_uint_eq(coord->pool_nrounds, (uint32_t)k);
  ck_assert_uint_le(coord->pool_round_bytes, SBN_SRV_POOL_ROUND_BYTES_MAX);
  ck_assert_uint_ge(coord->pool_round_bytes, SBN_SRV_POOL_ROUND_BYTES_MAX - n * big);
  free(r);
  teardown();
}
END_TEST

START_TEST(reply_buffers_bounded) {
  setup();
  enum { K = SBN_SRV_POOL_WBUFS_MAX + 5 };
  static sbn__srv_wbuf *w[K];
  for (int i = 0; i < K; i++) {
    w[i] = sbn__srv_pool_wbuf_get(coord, 1000 + (size_t)i);
    ck_assert_ptr_nonnull(w[i]);
    ck_assert_uint_ge(w[i]->cap, w[i]->len);
  }
  for (int i = 0; i < K; i++)
    sbn__srv_wbuf_unref(w[i]);
  ck_assert_uint_eq(coord->pool_nwbufs, SBN_SRV_POOL_WBUFS_MAX);
  /* A full pool keeps the larger buffers: the smallest ones left. */
  for (sbn__srv_wbuf *b = coord->pool_wbufs; b != NULL; b = b->next)
    ck_assert_uint_ge(b->cap, w[K - SBN_SRV_POOL_WBUFS_MAX]->cap);
  /* The same size again is served from the pool; a tiny one is not (more
   * than twice its size). */
  size_t before = coord->pool_nwbufs;
  sbn__srv_wbuf *again = sbn__srv_pool_wbuf_get(coord, 1000 + K - 1);
  ck_assert_uint_eq(coord->pool_nwbufs, before - 1);
  sbn__srv_wbuf *tiny = sbn__srv_pool_wbuf_get(coord, 10);
  ck_assert_uint_eq(coord->pool_nwbufs, before - 1);
  sbn__srv_wbuf_unref(tiny);
  sbn__srv_wbuf_unref(again);
  /* A buffer over SBN_SRV_ARENA_KEEP_MAX is never kept. */
  before = coord->pool_nwbufs;
  sbn__srv_wbuf *huge = sbn__srv_pool_wbuf_get(coord, SBN_SRV_ARENA_KEEP_MAX + 1);
  ck_assert_ptr_nonnull(huge);
  size_t bytes = coord->pool_wbuf_bytes;
  sbn__srv_wbuf_unref(huge);
  ck_assert_uint_eq(coord->pool_nwbufs, before);
  ck_assert_uint_eq(coord->pool_wbuf_bytes, bytes);
  ck_assert_uint_le(coord->pool_wbuf_bytes, SBN_SRV_POOL_WBUF_BYTES_MAX);
  teardown();
}
END_TEST

START_TEST(write_records_bounded) {
  setup();
  enum { K = SBN_SRV_POOL_WRITES_MAX + 3 };
  sbn__srv_write **w = calloc(K, sizeof(*w));
  ck_assert_ptr_nonnull(w);
  for (int i = 0; i < K; i++)
    ck_assert_ptr_nonnull(w[i] = sbn__srv_pool_write_get(coord));
  for (int i = 0; i < K; i++)
    sbn__srv_pool_write_put(coord, w[i]);
  ck_assert_uint_eq(coord->pool_nwrites, SBN_SRV_POOL_WRITES_MAX);
  sbn__srv_write *again = sbn__srv_pool_write_get(coord);
  ck_assert_uint_eq(coord->pool_nwrites, SBN_SRV_POOL_WRITES_MAX - 1);
  sbn__srv_pool_write_put(coord, again);
  free(w);
  teardown();
}
END_TEST

/* An arena grows to what its last use asked for, at most keep_max; what does
 * not fit spills to malloc until the next reset. */
START_TEST(arena_keep_max) {
  sbn__arena a;
  sbn__arena_init(&a, 1024);
  ProtobufCAllocator pa = sbn__arena_allocator(&a);
  void *p = pa.alloc(pa.allocator_data, 100);
  ck_assert_ptr_nonnull(p);
  ck_assert_uint_eq(a.nspill, 1); /* nothing kept yet */
  sbn__arena_reset(&a);
  ck_assert_uint_ge(a.cap, 100);
  ck_assert_uint_le(a.cap, 1024);
  p = pa.alloc(pa.allocator_data, 100);
  ck_assert_uint_eq(a.nspill, 0); /* served from the kept buffer */
  ck_assert(p == (void *)a.buf);
  pa.free(pa.allocator_data, p); /* a no-op */
  /* Asked for more than keep_max: it spills, and the buffer stops at it. */
  ck_assert_ptr_nonnull(pa.alloc(pa.allocator_data, 5000));
  ck_assert_uint_eq(a.nspill, 1);
  sbn__arena_reset(&a);
  ck_assert_uint_eq(a.cap, 1024);
  ck_assert_ptr_nonnull(pa.alloc(pa.allocator_data, 5000));
  ck_assert_uint_eq(a.nspill, 1);
  /* Swapping hands the memory over whole. */
  sbn__arena b;
  sbn__arena_init(&b, 0);
  uint8_t *buf = a.buf;
  sbn__arena_swap(&a, &b);
  ck_assert_ptr_eq(b.buf, buf);
  ck_assert_ptr_null(a.buf);
  sbn__arena_release(&a);
  sbn__arena_release(&b);
  ck_assert_ptr_null(b.buf);
  ck_assert_uint_eq(b.keep_max, 1024);
}
END_TEST

/* A reader's spare block stays with its arena through swaps, unless a
 * block holds the message being handed over; then it goes with it. */
START_TEST(arena_blocks_travel_with_messages) {
  sbn__arena conn, slot;
  sbn__arena_init(&conn, 0);
  sbn__arena_init(&slot, 0);
  sbn__framer rx;
  sbn__framer_init(&rx, 1 << 20);
  /* Two frames' bytes in the reader; the first is "decoded in place". */
  static const uint8_t bytes[] = "first frame|second...";
  ck_assert_int_eq(sbn__framer_feed(&rx, bytes, sizeof(bytes)), SBN_OK);
  rx.off = 12; /* the first 12 bytes were handed out */
  uint8_t *first = rx.buf;
  ck_assert_int_eq(sbn__framer_swap_buf(&rx, &conn.block, &conn.block_cap), SBN_OK);
  ck_assert_ptr_eq(conn.block, first); /* the handed-out frame stays valid */
  ck_assert(memcmp(conn.block, "first frame|", 12) == 0);
  ck_assert_uint_eq(rx.off, 0); /* the rest moved to the reader's new buffer */
  ck_assert_uint_eq(rx.len, sizeof(bytes) - 12);
  ck_assert(memcmp(rx.buf, "second...", 10) == 0);
  conn.block_used = 1;
  /* Filed into a slot: the block goes with the message. */
  sbn__arena_swap(&conn, &slot);
  ck_assert_ptr_eq(slot.block, first);
  ck_assert(slot.block_used && !conn.block_used);
  ck_assert_ptr_null(conn.block);
  /* The round ends: the slot keeps the block, no longer in use; a message
   * not in place swapped with it leaves each block where it is. */
  sbn__arena_reset(&slot);
  ck_assert_ptr_eq(slot.block, first);
  ck_assert(!slot.block_used);
  uint8_t *reader_spare = malloc(64);
  conn.block = reader_spare;
  conn.block_cap = 64;
  sbn__arena_swap(&conn, &slot);
  ck_assert_ptr_eq(conn.block, reader_spare);
  ck_assert_ptr_eq(slot.block, first);
  ck_assert_uint_eq(sbn__arena_bytes(&slot), slot.cap + slot.block_cap);
  sbn__framer_release(&rx);
  sbn__arena_release(&conn);
  sbn__arena_release(&slot);
  ck_assert_ptr_null(slot.block);
}
END_TEST

int main(void) {
  Suite *s = suite_create("pool");
  TCase *tc = tcase_create("pool");
  tcase_add_test(tc, rounds_kept_up_to_the_limit);
  tcase_add_test(tc, rounds_best_fit_within_twice);
  tcase_add_test(tc, round_arena_bytes_bounded);
  tcase_add_test(tc, reply_buffers_bounded);
  tcase_add_test(tc, write_records_bounded);
  tcase_add_test(tc, arena_keep_max);
  tcase_add_test(tc, arena_blocks_travel_with_messages);
  suite_add_tcase(s, tc);
  SRunner *sr = srunner_create(s);
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
