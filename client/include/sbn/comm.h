/*
 * sbn/comm.h - the connection to the coordinator, groups and synchronization
 * rounds.
 *
 * Threading: an sbn_ctx and its groups belong to one thread at a time; calls
 * on the same context must not overlap (the library sends one request and
 * waits for its reply).  Different contexts are independent, also in one
 * process (ranks as threads: tested under ThreadSanitizer).
 *
 * Fork: a context belongs to the process that made it.  In a process forked
 * from that one (a data loader's worker, say) every call that would use the
 * connection fails with SBN_ESTATE, naming both processes, and sends nothing;
 * sbn_finalize there only frees the child's copy (no goodbye, so the parent's
 * rank stays in its job).  A child that takes part calls sbn_init itself.
 *
 * Failure: every function returns SBN_OK or a negative SBN_E* code and, on
 * failure, leaves a message for sbn_last_error() on the calling thread.  No
 * function calls exit() or abort().  Every blocking call is bounded by the
 * context's timeout.  When a round fails (a member lost, ranks that disagree,
 * a timeout) the output buffers are left unchanged.
 */
#ifndef SBN_COMM_H
#define SBN_COMM_H

#include <stddef.h>
#include <stdint.h>

#include "sbn/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct sbn_ctx sbn_ctx;
typedef struct sbn_group sbn_group;

/* Limits, named so callers and tests can meet them at their edge. */
#define SBN_JOB_MAX 128       /* bytes in a job id */
#define SBN_LAYER_MAX 256     /* bytes in a layer identity */
#define SBN_WORLD_MAX 65536   /* ranks in a job */

typedef struct sbn_config {
  /* "host:port" of sbn-coordinator; NULL (or world_size 1) = no network. */
  const char *coordinator;
  const char *job;        /* job id, default "default"; at most SBN_JOB_MAX-1 bytes */
  int rank;               /* 0 .. world_size-1 */
  int world_size;         /* >= 1 */
  uint64_t generation;    /* restart counter, default 0 */
  int connect_timeout_ms; /* keep retrying connect this long, default 30000 */
  /* Bound on each blocking round; 0 = the coordinator's round timeout plus
   * 5 s, so that its error (which names the missing ranks) arrives first.
   * A call returns SBN_ETIMEDOUT within a few milliseconds after it (the
   * kernel's timer granularity), also while spinning. */
  int timeout_ms;
  /* Poll the socket without sleeping this long before blocking on a reply
   * (trades CPU for latency; between polls the thread yields the CPU to any
   * other runnable thread, so an oversubscribed machine still makes
   * progress).  Pays off only with a core per worker and one for the
   * coordinator.  Default 0 = off. */
  int spin_us;
  /* Path of the file holding the secret shared with the coordinator
   * (started with --secret-file); NULL = none.  The file must not be
   * readable by others (chmod 600; group access is allowed) and must hold
   * at least 16 bytes; one trailing newline is ignored.  With a secret,
   * sbn_init() proves it knows the secret, checks that the coordinator
   * knows it too, and fails with SBN_EAUTH otherwise; a coordinator that
   * requires a secret refuses a worker without one with SBN_EAUTH.
   * (Added in 0.1; kept last for ABI.) */
  const char *secret_file;
} sbn_config;

/* Fills cfg with the defaults above (no coordinator, rank 0, world size 1). */
SBN_API void sbn_config_init(sbn_config *cfg);

/*
 * Fills cfg from the environment, first set wins for each field:
 *   coordinator  SBN_COORDINATOR=host:port, else MASTER_ADDR[:MASTER_PORT]
 *   rank         SBN_RANK, RANK, SLURM_PROCID
 *   world size   SBN_WORLD_SIZE, WORLD_SIZE, SLURM_NTASKS
 *   job          SBN_JOB, SLURM_JOB_ID
 *   timeouts     SBN_TIMEOUT_MS, SBN_CONNECT_TIMEOUT_MS, SBN_SPIN_US
 *   generation   SBN_GENERATION (restart counter)
 *   secret file  SBN_SECRET_FILE (the path, never the secret itself)
 * Fields with no variable keep their value.  The strings stay owned by the
 * environment/this library (valid until the next call).  Returns SBN_EINVAL
 * naming the variable when one is malformed (cfg is then unchanged).
 */
SBN_API int sbn_config_from_env(sbn_config *cfg);

/*
 * Connects (retrying until connect_timeout_ms), says hello and waits for the
 * coordinator's welcome.  With world_size 1 or no coordinator, no connection
 * is made and every group operation is local.  On success *out owns the
 * context; free it with sbn_finalize().  On failure *out is NULL.
 */
SBN_API int sbn_init(const sbn_config *cfg, sbn_ctx **out);

/* Says goodbye, closes the connection and frees ctx and its groups (but not
 * groups already freed).  NULL is a no-op.  Returns the goodbye's status. */
SBN_API int sbn_finalize(sbn_ctx *ctx);

SBN_API int sbn_rank(const sbn_ctx *ctx);
SBN_API int sbn_world_size(const sbn_ctx *ctx);
/* True when rounds go to a coordinator (world size > 1). */
SBN_API int sbn_is_distributed(const sbn_ctx *ctx);

/* The group of all ranks; owned by ctx, valid until sbn_finalize(). */
SBN_API sbn_group *sbn_world(sbn_ctx *ctx);

/*
 * A group of the given world ranks (any order; they are sorted, the group
 * rank is the index in sorted order).  Must be called by members only, with
 * the same set on every member.  Fails with SBN_EINVAL for an empty set, a
 * duplicate or out-of-range rank, SBN_ENOTMEMBER when the caller is not in
 * it.  Free with sbn_group_free() (before sbn_finalize).  The coordinator
 * knows a group by its members: every group of the same members in one
 * context (a group of every rank and WORLD; a group freed and made again)
 * numbers its rounds on from the others', so a round that failed in one
 * never fails a later round of another.  A few bytes per distinct set of
 * members stay with the context until sbn_finalize().
 */
SBN_API int sbn_new_group(sbn_ctx *ctx, const int *ranks, size_t n,
                          sbn_group **out);
SBN_API void sbn_group_free(sbn_group *g);
SBN_API int sbn_group_size(const sbn_group *g);
/* This process's rank within the group. */
SBN_API int sbn_group_rank(const sbn_group *g);
/* The world rank of group rank i, or -1 when i is out of range. */
SBN_API int sbn_group_member(const sbn_group *g, int i);

/*
 * One forward synchronization round.  Sends this rank's per-channel count,
 * mean[C] and M2[C] (sum of squared deviations) and waits for the group's
 * merge: *gcount, gmean[C], gm2[C] (all members get bitwise the same values).
 * layer names the layer (at most SBN_LAYER_MAX-1 bytes); every member must
 * call with the same layer and C in the same order, or every member gets
 * SBN_EMISMATCH naming who differed.  count may be 0 (mean/M2 then ignored).
 * A NULL group or a group of one merges locally.
 */
SBN_API int sbn_sync_stats(sbn_group *g, const char *layer, size_t C,
                           uint64_t count, const double *mean, const double *m2,
                           uint64_t *gcount, double *gmean, double *gm2);

/*
 * One backward round: gsum_a = sum over members of a[C], likewise b; added
 * in rank order in double.  Same rules as sbn_sync_stats.
 */
SBN_API int sbn_sync_sums(sbn_group *g, const char *layer, size_t C,
                          const double *a, const double *b, double *gsum_a,
                          double *gsum_b);

/* Latency of the rounds this context ran through the coordinator (all kinds:
 * forward, backward, collectives), over the last SBN_LATENCY_WINDOW rounds. */
#define SBN_LATENCY_WINDOW 4096
typedef struct sbn_round_stats {
  unsigned long long rounds; /* rounds completed since the last reset */
  unsigned long long failed; /* rounds that returned an error */
  double mean_us, p50_us, p99_us, max_us; /* over the window (0 when empty) */
} sbn_round_stats;

/* Fills *out; with reset != 0 starts a new window.  SBN_EINVAL for NULLs. */
SBN_API int sbn_round_stats_get(sbn_ctx *ctx, sbn_round_stats *out, int reset);

/* ---- Collectives for data-parallel training ----------------------------
 *
 * Served by the same coordinator, with the same failure rules as the rounds
 * above (a lost member, a disagreement or a timeout fails the call on every
 * member, with a message naming the ranks).  A buffer that fits one chunk
 * is updated only when its chunk's round succeeds; a larger one travels in
 * several chunks, and a failure part-way leaves the earlier chunks updated
 * (the call still returns the error; treat the contents of every buffer of
 * a failed call as undefined then: with sbn_allreduce_many, the buffers of
 * chunks that completed before the failure hold their results).
 * With a coordinator that allows it (its Welcome), the next chunk is sent
 * while the previous one is reduced (two in flight); a failed call still
 * leaves the group ready for the next collective on every member.
 */

/* Values per chunk: larger buffers travel in several rounds, so the
 * coordinator holds at most members x SBN_CHUNK_FLOATS values per round. */
#define SBN_CHUNK_FLOATS (1024u * 1024u)
#define SBN_CHUNK_BYTES (4u * 1024u * 1024u)

typedef enum sbn_reduce_op {
  SBN_REDUCE_SUM = 0,  /* element-wise sum */
  SBN_REDUCE_MEAN = 1  /* element-wise sum divided by the group size */
} sbn_reduce_op;

/*
 * Replaces buf[0..n) on every member with the element-wise sum (or mean)
 * over the group.  The sum is taken in double in rank order and rounded once,
 * so every member gets bitwise the same floats whatever the arrival order.
 * Every member must pass the same n.  NaN or Inf in any input fails the call
 * with SBN_EBADSTATS naming the rank (the coordinator checks; a NULL group or
 * a group of one returns the values as they are, unchecked, like the rounds
 * of sbn_sync_stats and sbn_sync_sums).
 */
SBN_API int sbn_allreduce(sbn_group *g, float *buf, size_t n, sbn_reduce_op op);

/*
 * Fused allreduce of k buffers (like Horovod's tensor fusion): consecutive
 * buffers smaller than SBN_CHUNK_FLOATS are packed into shared chunks of at
 * most SBN_CHUNK_FLOATS, so many small gradients cost few rounds; a larger
 * buffer goes in chunks of its own, sent from the buffer itself.  The
 * chunks of the whole list run two in flight like sbn_allreduce's.
 * bufs[i] has ns[i] floats (0 is allowed, and bufs[i] may then be NULL);
 * every member must pass the same list of sizes.  Uses one temporary
 * buffer of SBN_CHUNK_BYTES when buffers are fused (SBN_ENOMEM without it).
 */
SBN_API int sbn_allreduce_many(sbn_group *g, float *const *bufs, const size_t *ns,
                               size_t k, sbn_reduce_op op);

/*
 * Copies len bytes at buf from group rank root to every other member's buf.
 * Every member must pass the same len and root.
 */
SBN_API int sbn_broadcast(sbn_group *g, void *buf, size_t len, int root);

/* Returns once every member of the group has called it. */
SBN_API int sbn_barrier(sbn_group *g);

#ifdef __cplusplus
}
#endif

#endif /* SBN_COMM_H */
