/*
 * map.h - an intrusive hash map keyed by byte strings.
 *
 * The node lives inside the value (a job, a group), so inserting allocates
 * nothing but the occasional bucket array.  The key bytes are owned by the
 * value and must stay valid and unchanged while the node is in the map.
 */
#ifndef SBN_SERVER_MAP_H
#define SBN_SERVER_MAP_H

#include <stddef.h>
#include <stdint.h>

typedef struct sbn__srv_map_node {
  struct sbn__srv_map_node *next;
  uint64_t hash;
  const void *key;
  size_t klen;
} sbn__srv_map_node;

typedef struct sbn__srv_map {
  sbn__srv_map_node **buckets;
  size_t nbuckets; /* a power of two, or 0 before the first insert */
  size_t count;
  uint64_t seed;
} sbn__srv_map;

/*
 * The seed perturbs the hash so that a peer cannot predict which keys
 * collide (a weak defence against hash flooding; see map.c).
 */
void sbn__srv_map_init(sbn__srv_map *m, uint64_t seed);
/* Frees the buckets, not the values. */
void sbn__srv_map_release(sbn__srv_map *m);

sbn__srv_map_node *sbn__srv_map_get(const sbn__srv_map *m, const void *key, size_t klen);
/* Inserts n (key not present yet).  Returns SBN_OK or SBN_ENOMEM (n not inserted). */
int sbn__srv_map_put(sbn__srv_map *m, sbn__srv_map_node *n, const void *key, size_t klen);
void sbn__srv_map_del(sbn__srv_map *m, sbn__srv_map_node *n);

/* Calls fn on every node; fn may delete the node it is given. */
void sbn__srv_map_each(sbn__srv_map *m, void (*fn)(sbn__srv_map_node *n, void *arg), void *arg);

#endif /* SBN_SERVER_MAP_H */
