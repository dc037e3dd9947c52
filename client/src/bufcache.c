/*
 * bufcache.c - a small cache of large tensor buffers.
 *
 * A training step frees and allocates the same activation sizes over and
 * over.  Large blocks come from mmap (or a trimmed heap top), so every new
 * buffer costs one page fault per 4 KiB on its first write: more than the
 * kernel that fills it.  Like PyTorch's caching allocator, this keeps freed
 * buffers of SBN_BUFCACHE_MIN_BYTES or more (at most SBN_BUFCACHE_SLOTS of
 * them and sbn_tensor_cache_limit() bytes in all) and hands them out again for
 * the same size.  Small buffers go straight to malloc.  Thread-safe.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "nn_internal.h"

#define SBN_BUFCACHE_SLOTS 32
#define SBN_BUFCACHE_MIN_BYTES (64u * 1024u)
#define SBN_BUFCACHE_DEFAULT_LIMIT ((size_t)256 * 1024 * 1024)

typedef struct slot {
  void *p;
  size_t bytes;
  uint64_t stamp; /* last use, for eviction of the oldest */
} slot;

static pthread_mutex_t cache_lock = PTHREAD_MUTEX_INITIALIZER;
static slot cache[SBN_BUFCACHE_SLOTS];
static size_t cache_bytes, cache_limit = SBN_BUFCACHE_DEFAULT_LIMIT;
static uint64_t clock_stamp;

void *sbn__buf_get(size_t bytes) {
  if (bytes >= SBN_BUFCACHE_MIN_BYTES) {
    pthread_mutex_lock(&cache_lock);
    for (int i = 0; i < SBN_BUFCACHE_SLOTS; i++) {
      if (cache[i].p != NULL && cache[i].bytes == bytes) {
        void *p = cache[i].p;
        cache[i].p = NULL;
        cache_bytes -= bytes;
        pthread_mutex_unlock(&cache_lock);
        return p;
      }
    }
    pthread_mutex_unlock(&cache_lock);
  }
  return malloc(bytes ? bytes : 1);
}

void sbn__buf_put(void *p, size_t bytes) {
  if (p == NULL)
    return;
  if (bytes < SBN_BUFCACHE_MIN_BYTES) {
    free(p);
    return;
  }
  void *evict[SBN_BUFCACHE_SLOTS];
  int nevict = 0;
  pthread_mutex_lock(&cache_lock);
  if (bytes > cache_limit) {
    pthread_mutex_unlock(&cache_lock);
    free(p);
    return;
  }
  /* Make room: drop the least recently used until both limits hold. */
  for (;;) {
    int free_slot = -1, oldest = -1;
    for (int i = 0; i < SBN_BUFCACHE_SLOTS; i++) {
      if (cache[i].p == NULL) {
        if (free_slot < 0)
          free_slot = i;
      } else if (oldest < 0 || cache[i].stamp < cache[oldest].stamp) {
        oldest = i;
      }
    }
    if (free_slot >= 0 && cache_bytes + bytes <= cache_limit) {
      cache[free_slot] = (slot){p, bytes, ++clock_stamp};
      cache_bytes += bytes;
      break;
    }
    evict[nevict++] = cache[oldest].p;
    cache_bytes -= cache[oldest].bytes;
    cache[oldest].p = NULL;
  }
  pthread_mutex_unlock(&cache_lock);
  for (int i = 0; i < nevict; i++)
    free(evict[i]);
}

SBN_API void sbn_tensor_cache_trim(void) {
  void *all[SBN_BUFCACHE_SLOTS];
  int n = 0;
  pthread_mutex_lock(&cache_lock);
  for (int i = 0; i < SBN_BUFCACHE_SLOTS; i++)
    if (cache[i].p != NULL) {
      all[n++] = cache[i].p;
      cache[i].p = NULL;
    }
  cache_bytes = 0;
  pthread_mutex_unlock(&cache_lock);
  for (int i = 0; i < n; i++)
    free(all[i]);
}

SBN_API void sbn_tensor_cache_set_limit(size_t bytes) {
  pthread_mutex_lock(&cache_lock);
  cache_limit = bytes;
  pthread_mutex_unlock(&cache_lock);
  if (bytes < cache_bytes || bytes == 0)
    sbn_tensor_cache_trim();
}

SBN_API size_t sbn_tensor_cache_bytes(void) {
  pthread_mutex_lock(&cache_lock);
  size_t b = cache_bytes;
  pthread_mutex_unlock(&cache_lock);
  return b;
}
