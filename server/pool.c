/*
 * pool.c - what a round needs, kept for the next one: rounds (with their
 * timers and slot arenas), encoded buffers and queued-write records.
 *
 * With these pools a coordinator in steady state (the same groups running
 * rounds of the same sizes) makes no heap allocation per round: the
 * connection arenas and the slot arenas swap back and forth, the reply is
 * encoded into a pooled buffer, and writes the socket does not take at once
 * reuse their records.  Each pool is a free list bounded in count and, where
 * it holds payload memory, in bytes (coord_internal.h), so a burst leaves at
 * most that much behind.  Single-threaded: the coordinator's loop only.
 */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "coord_internal.h"

/* Rounds */

static size_t round_arena_bytes(const sbn__srv_round *r) {
  size_t b = 0;
  for (uint32_t i = 0; i < r->cap; i++)
    b += sbn__arena_bytes(&r->arenas[i]);
  return b;
}

static void round_release_arenas(sbn__srv_round *r) {
  for (uint32_t i = 0; i < r->cap; i++)
    sbn__arena_release(&r->arenas[i]);
}

static void round_on_close(uv_handle_t *h) {
  sbn__srv_round *r = h->data;
  round_release_arenas(r);
  free(r);
}

/*
 * Pooled items are taken by best fit, and never one more than twice the
 * size asked for: otherwise small requests would drain the pool of large
 * items, and the next large request would allocate (the pool's contents
 * would drift with timing instead of settling).  A reply buffer may also
 * exceed twice a small request by its own slack (sbn__srv_pool_wbuf_get).
 */
static int fits(size_t have, size_t want, size_t slack) {
  return have >= want && have - want <= want + slack;
}
#define WBUF_SLACK(len) ((len) / 8 + 64)

sbn__srv_round *sbn__srv_pool_round_get(sbn__coord *c, uint32_t n) {
  sbn__srv_round **best = NULL;
  for (sbn__srv_round **q = &c->pool_rounds; *q != NULL; q = &(*q)->pool_next)
    if (fits((*q)->cap, n, 0) && (best == NULL || (*q)->cap < (*best)->cap))
      best = q;
  sbn__srv_round *r;
  if (best != NULL) {
    r = *best;
    *best = r->pool_next;
    c->pool_nrounds--;
    c->pool_round_bytes -= round_arena_bytes(r);
  } else {
    /* One block: the round, contrib[n], arenas[n], arrived[n], t_us[n]. */
    r = calloc(1, sizeof(*r) + n * (sizeof(Sbn__Envelope *) + sizeof(sbn__arena)) +
                      2 * n * sizeof(uint32_t));
    if (r == NULL)
      return NULL;
    r->cap = n;
    r->arenas = (sbn__arena *)(r->contrib + n);
    for (uint32_t i = 0; i < n; i++)
      sbn__arena_init(&r->arenas[i], SBN_SRV_ARENA_KEEP_MAX);
    r->arrived = (uint32_t *)(r->arenas + n);
    r->t_us = r->arrived + r->cap;
    r->timer.data = r;
    uv_timer_init(c->loop, &r->timer);
  }
  /* Everything but the timer, the slots and their arenas starts afresh. */
  r->group = NULL;
  r->job_prev = r->job_next = r->grp_next = r->pool_next = NULL;
  r->seq = 0;
  r->n = n;
  r->nhave = r->ref = 0;
  r->dead = 0;
  r->t0 = 0;
  for (uint32_t i = 0; i < r->cap; i++)
    r->contrib[i] = NULL;
  return r;
}

void sbn__srv_pool_round_put(sbn__coord *c, sbn__srv_round *r) {
  uv_timer_stop(&r->timer);
  for (uint32_t i = 0; i < r->cap; i++) {
    r->contrib[i] = NULL;
    sbn__arena_reset(&r->arenas[i]);
  }
  if (c->stopping || c->pool_nrounds >= SBN_SRV_POOL_ROUNDS_MAX) {
    uv_close((uv_handle_t *)&r->timer, round_on_close);
    return;
  }
  size_t bytes = round_arena_bytes(r);
  if (c->pool_round_bytes + bytes > SBN_SRV_POOL_ROUND_BYTES_MAX) {
    round_release_arenas(r);
    bytes = 0;
  }
  r->pool_next = c->pool_rounds;
  c->pool_rounds = r;
  c->pool_nrounds++;
  c->pool_round_bytes += bytes;
}

/* Encoded buffers */

sbn__srv_wbuf *sbn__srv_pool_wbuf_get(sbn__coord *c, size_t len) {
  sbn__srv_wbuf **pp = &c->pool_wbufs, **best = NULL;
  for (; *pp != NULL; pp = &(*pp)->next)
    if (fits((*pp)->cap, len, 64) && (best == NULL || (*pp)->cap < (*best)->cap))
      best = pp;
  sbn__srv_wbuf *wb;
  if (best != NULL) {
    wb = *best;
    *best = wb->next;
    c->pool_nwbufs--;
    c->pool_wbuf_bytes -= wb->cap;
  } else {
    /* Some room to spare: the same reply grows by a byte when a varint in
     * it (a sequence number, say) crosses a power of 128. */
    size_t cap = len + WBUF_SLACK(len);
    wb = malloc(sizeof(*wb) + cap);
    if (wb == NULL)
      return NULL;
    wb->cap = cap;
    wb->coord = c;
  }
  wb->refs = 1;
  wb->len = len;
  wb->next = NULL;
  return wb;
}

void sbn__srv_wbuf_unref(sbn__srv_wbuf *wb) {
  if (wb == NULL || --wb->refs > 0)
    return;
  sbn__coord *c = wb->coord;
  if (c->stopping || wb->cap > SBN_SRV_ARENA_KEEP_MAX ||
      c->pool_wbuf_bytes + wb->cap > SBN_SRV_POOL_WBUF_BYTES_MAX) {
    free(wb);
    return;
  }
  if (c->pool_nwbufs >= SBN_SRV_POOL_WBUFS_MAX) {
    /* Full: the new buffer replaces the smallest, which serves the least. */
    sbn__srv_wbuf **pp = &c->pool_wbufs, **small = pp;
    for (; *pp != NULL; pp = &(*pp)->next)
      if ((*pp)->cap < (*small)->cap)
        small = pp;
    sbn__srv_wbuf *s = *small;
    if (s->cap >= wb->cap) {
      free(wb);
      return;
    }
    *small = s->next;
    c->pool_nwbufs--;
    c->pool_wbuf_bytes -= s->cap;
    free(s);
  }
  wb->next = c->pool_wbufs;
  c->pool_wbufs = wb;
  c->pool_nwbufs++;
  c->pool_wbuf_bytes += wb->cap;
}

/* Write records */

sbn__srv_write *sbn__srv_pool_write_get(sbn__coord *c) {
  sbn__srv_write *w = c->pool_writes;
  if (w == NULL)
    return malloc(sizeof(*w));
  c->pool_writes = w->next;
  c->pool_nwrites--;
  return w;
}

void sbn__srv_pool_write_put(sbn__coord *c, sbn__srv_write *w) {
  if (c->stopping || c->pool_nwrites >= SBN_SRV_POOL_WRITES_MAX) {
    free(w);
    return;
  }
  w->next = c->pool_writes;
  c->pool_writes = w;
  c->pool_nwrites++;
}

/* Shutdown */

void sbn__srv_pool_drain(sbn__coord *c) {
  while (c->pool_rounds != NULL) {
    sbn__srv_round *r = c->pool_rounds;
    c->pool_rounds = r->pool_next;
    uv_close((uv_handle_t *)&r->timer, round_on_close);
  }
  c->pool_nrounds = 0;
  c->pool_round_bytes = 0;
  sbn__srv_pool_free(c);
}

void sbn__srv_pool_free(sbn__coord *c) {
  while (c->pool_wbufs != NULL) {
    sbn__srv_wbuf *wb = c->pool_wbufs;
    c->pool_wbufs = wb->next;
    free(wb);
  }
  c->pool_nwbufs = 0;
  c->pool_wbuf_bytes = 0;
  while (c->pool_writes != NULL) {
    sbn__srv_write *w = c->pool_writes;
    c->pool_writes = w->next;
    free(w);
  }
  c->pool_nwrites = 0;
}
