/* map.c - the intrusive hash map of jobs and groups. */
#include "map.h"

#include <stdlib.h>
#include <string.h>

#include "sbn/status.h"

#define SBN_MAP_INITIAL_BUCKETS 16u

/*
 * FNV-1a over the key, started from a per-process seed.  It is not a keyed
 * cryptographic hash: workers are trusted peers of a training job, and
 * authentication (a later issue) is what keeps strangers out.
 */
static uint64_t map_hash(uint64_t seed, const void *key, size_t klen) {
  const uint8_t *p = key;
  uint64_t h = UINT64_C(1469598103934665603) ^ seed;
  for (size_t i = 0; i < klen; i++) {
    h ^= p[i];
    h *= UINT64_C(1099511628211);
  }
  return h ^ (h >> 29);
}

void sbn__srv_map_init(sbn__srv_map *m, uint64_t seed) {
  memset(m, 0, sizeof(*m));
  m->seed = seed;
}

void sbn__srv_map_release(sbn__srv_map *m) {
  free(m->buckets);
  m->buckets = NULL;
  m->nbuckets = m->count = 0;
}

sbn__srv_map_node *sbn__srv_map_get(const sbn__srv_map *m, const void *key, size_t klen) {
  if (m->nbuckets == 0)
    return NULL;
  uint64_t h = map_hash(m->seed, key, klen);
  for (sbn__srv_map_node *n = m->buckets[h & (m->nbuckets - 1)]; n != NULL; n = n->next)
    if (n->hash == h && n->klen == klen && (klen == 0 || memcmp(n->key, key, klen) == 0))
      return n;
  return NULL;
}

/* Doubles the bucket array; on allocation failure the map keeps working. */
static void map_grow(sbn__srv_map *m) {
  size_t nb = m->nbuckets ? m->nbuckets * 2 : SBN_MAP_INITIAL_BUCKETS;
  sbn__srv_map_node **b = calloc(nb, sizeof(*b));
  if (b == NULL)
    return;
  for (size_t i = 0; i < m->nbuckets; i++) {
    sbn__srv_map_node *n = m->buckets[i];
    while (n != NULL) {
      sbn__srv_map_node *next = n->next;
      n->next = b[n->hash & (nb - 1)];
      b[n->hash & (nb - 1)] = n;
      n = next;
    }
  }
  free(m->buckets);
  m->buckets = b;
  m->nbuckets = nb;
}

int sbn__srv_map_put(sbn__srv_map *m, sbn__srv_map_node *n, const void *key, size_t klen) {
  if (m->count >= m->nbuckets)
    map_grow(m);
  if (m->nbuckets == 0)
    return SBN_ENOMEM;
  n->hash = map_hash(m->seed, key, klen);
  n->key = key;
  n->klen = klen;
  size_t i = n->hash & (m->nbuckets - 1);
  n->next = m->buckets[i];
  m->buckets[i] = n;
  m->count++;
  return SBN_OK;
}

void sbn__srv_map_del(sbn__srv_map *m, sbn__srv_map_node *n) {
  sbn__srv_map_node **pp = &m->buckets[n->hash & (m->nbuckets - 1)];
  while (*pp != NULL && *pp != n)
    pp = &(*pp)->next;
  if (*pp == n) {
    *pp = n->next;
    n->next = NULL;
    m->count--;
  }
}

void sbn__srv_map_each(sbn__srv_map *m, void (*fn)(sbn__srv_map_node *n, void *arg), void *arg) {
  for (size_t i = 0; i < m->nbuckets; i++) {
    sbn__srv_map_node *n = m->buckets[i];
    while (n != NULL) {
      sbn__srv_map_node *next = n->next;
      fn(n, arg);
      n = next;
    }
  }
}
