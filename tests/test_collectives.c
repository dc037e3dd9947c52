/*
 * test_collectives.c - allreduce (sum, mean, chunked, fused), broadcast and
 * barrier between real worker processes through a real coordinator.  The
 * expected values are computed in the test the way the contract states them:
 * the double sum in rank order, rounded once to float32, so they must match
 * bit for bit.
 */
#include <check.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "coord_proc.h"
#include "internal.h" /* ctx->pipeline: the pipelined allreduce path runs */
#include "raw_peer.h"
#include "sbn/sbn.h"
#include "workers.h"

/* Multi-chunk allreduces run pipelined (two chunks in flight): an odd and an
 * even number of chunks, the last one short or whole. */
#define BIG_N (2 * SBN_CHUNK_FLOATS + 12345) /* three chunks */
#define EVEN_N (2 * SBN_CHUNK_FLOATS)        /* two whole chunks */
#define ODD_N (4 * SBN_CHUNK_FLOATS + 3)     /* five chunks */
#define BCAST_BYTES (SBN_CHUNK_BYTES + 777)  /* two chunks */

typedef struct shared {
  int failures[WORKERS_MAX];
  char msg[WORKERS_MAX][512];
  long long t_before_barrier[WORKERS_MAX];
  long long t_after_barrier[WORKERS_MAX];
  int rc[WORKERS_MAX];
} shared;

typedef struct arg {
  const char *addr;
  const char *job;
  int world;
  /* test_random_script_with_a_death: rank die_rank leaves at op die_at
   * (die_at 0: nobody does), abruptly or (die_goodbye) with sbn_finalize;
   * or, with die_after_ms, exits that long after it joined, wherever it is
   * then (in a round, most likely). */
  int die_rank, die_at, die_goodbye, die_after_ms;
} arg;

static float value(int rank, size_t i) {
  /* Values whose float sums round differently from a float accumulation. */
  uint32_t h = (uint32_t)(i * 2654435761u) ^ (uint32_t)(rank * 40503u);
  return (float)((double)(h % 20011) / 7.0 - 1400.0) * (rank % 2 ? 1e-3f : 1.0f);
}

static float expected(int world, size_t i, sbn_reduce_op op) {
  double s = 0;
  for (int r = 0; r < world; r++)
    s += (double)value(r, i);
  return op == SBN_REDUCE_MEAN ? (float)(s / world) : (float)s;
}

#define FAIL(sh, rank, ...)                                                    \
  do {                                                                         \
    if ((sh)->failures[rank]++ == 0)                                           \
      snprintf((sh)->msg[rank], 512, __VA_ARGS__);                             \
  } while (0)

static int check_buf(shared *sh, int rank, int world, const float *buf, size_t n,
                     sbn_reduce_op op, const char *what) {
  for (size_t i = 0; i < n; i++) {
    float e = expected(world, i, op);
    if (memcmp(&buf[i], &e, sizeof(float)) != 0) {
      FAIL(sh, rank, "%s: element %zu is %.9g, expected %.9g", what, i, buf[i], e);
      return 1;
    }
  }
  return 0;
}

/* Many small buffers (three fused chunks, one packing buffer reused while
 * the chunk packed before is in flight), empty ones among them, and big ones
 * in between, all checked element by element. */
#define MANY_SMALL 3000
#define MANY_SMALL_N 1000
static void check_many(shared *sh, int rank, int world, sbn_group *w) {
  enum { K = MANY_SMALL + 4 };
  size_t ns[K];
  float *bufs[K];
  for (size_t t = 0; t < K; t++) {
    ns[t] = t == 0 || t == K - 1 || t % 997 == 0 ? 0 : MANY_SMALL_N;
    if (t == 1500)
      ns[t] = SBN_CHUNK_FLOATS + 5; /* splits the small ones: sliced on its own */
    if (t == 1501)
      ns[t] = SBN_CHUNK_FLOATS; /* exactly one chunk, on its own */
    bufs[t] = ns[t] ? malloc(ns[t] * sizeof(float)) : NULL; /* NULL is allowed for 0 */
    for (size_t i = 0; i < ns[t]; i++)
      bufs[t][i] = value(rank, i + t);
  }
  if (sbn_allreduce_many(w, bufs, ns, K, SBN_REDUCE_SUM) != SBN_OK)
    FAIL(sh, rank, "allreduce_many of %d buffers: %s", K, sbn_last_error());
  for (size_t t = 0; t < K && !sh->failures[rank]; t++)
    for (size_t i = 0; i < ns[t]; i++) {
      float e = expected(world, i + t, SBN_REDUCE_SUM);
      if (memcmp(&bufs[t][i], &e, sizeof(float)) != 0) {
        FAIL(sh, rank, "allreduce_many: buffer %zu element %zu is %.9g, expected %.9g", t, i,
             bufs[t][i], e);
        break;
      }
    }
  for (size_t t = 0; t < K; t++)
    free(bufs[t]);
}

static sbn_ctx *connect_rank(const arg *a, int rank, shared *sh) {
  sbn_ctx *ctx = NULL;
  if (worker_connect(a->addr, a->job, rank, a->world, &ctx) != SBN_OK)
    FAIL(sh, rank, "init: %s", sbn_last_error());
  return ctx;
}

static int collectives_worker(int rank, void *ap, void *sp) {
  const arg *a = ap;
  shared *sh = sp;
  sbn_ctx *ctx = connect_rank(a, rank, sh);
  if (ctx == NULL)
    return 1;
  sbn_group *w = sbn_world(ctx);
  if (ctx->pipeline < 1)
    FAIL(sh, rank, "the coordinator's welcome offers no pipelining (%u)", (unsigned)ctx->pipeline);
  static const size_t sizes[] = {1, 7, 1000, SBN_CHUNK_FLOATS, BIG_N, EVEN_N, ODD_N};
  float *buf = malloc(ODD_N * sizeof(float));
  for (int op = 0; op < 2; op++)
    for (size_t s = 0; s < sizeof(sizes) / sizeof(sizes[0]); s++) {
      for (size_t i = 0; i < sizes[s]; i++)
        buf[i] = value(rank, i);
      int rc = sbn_allreduce(w, buf, sizes[s], (sbn_reduce_op)op);
      if (rc != SBN_OK)
        FAIL(sh, rank, "allreduce of %zu: %s", sizes[s], sbn_last_error());
      else
        check_buf(sh, rank, a->world, buf, sizes[s], (sbn_reduce_op)op, "allreduce");
    }
  /* Fused: small buffers share a chunk, a big one goes alone. */
  static const size_t fsz[] = {3, 1, 5000, SBN_CHUNK_FLOATS - 100, 200, SBN_CHUNK_FLOATS + 1, 2};
  enum { NF = sizeof(fsz) / sizeof(fsz[0]) };
  float *fb[NF];
  for (int k = 0; k < NF; k++) {
    fb[k] = malloc(fsz[k] * sizeof(float));
    for (size_t i = 0; i < fsz[k]; i++)
      fb[k][i] = value(rank, i);
  }
  if (sbn_allreduce_many(w, fb, fsz, NF, SBN_REDUCE_MEAN) != SBN_OK)
    FAIL(sh, rank, "allreduce_many: %s", sbn_last_error());
  else
    for (int k = 0; k < NF; k++)
      check_buf(sh, rank, a->world, fb[k], fsz[k], SBN_REDUCE_MEAN, "allreduce_many");
  for (int k = 0; k < NF; k++)
    free(fb[k]);
  check_many(sh, rank, a->world, w);
  /* A coordinator without pipelining (an older one: Welcome.pipeline 0)
   * gets the chunks one at a time, with the same results. */
  const uint32_t pipeline = ctx->pipeline;
  ctx->pipeline = 0;
  check_many(sh, rank, a->world, w);
  for (size_t i = 0; i < ODD_N; i++)
    buf[i] = value(rank, i);
  if (sbn_allreduce(w, buf, ODD_N, SBN_REDUCE_SUM) != SBN_OK)
    FAIL(sh, rank, "allreduce without pipelining: %s", sbn_last_error());
  else
    check_buf(sh, rank, a->world, buf, ODD_N, SBN_REDUCE_SUM, "allreduce without pipelining");
  ctx->pipeline = pipeline;
  /* Broadcast from the last rank, two chunks. */
  unsigned char *bb = malloc(BCAST_BYTES);
  int root = a->world - 1;
  for (size_t i = 0; i < BCAST_BYTES; i++)
    bb[i] = rank == root ? (unsigned char)(i * 31 + 7) : 0;
  if (sbn_broadcast(w, bb, BCAST_BYTES, root) != SBN_OK)
    FAIL(sh, rank, "broadcast: %s", sbn_last_error());
  for (size_t i = 0; i < BCAST_BYTES; i++)
    if (bb[i] != (unsigned char)(i * 31 + 7)) {
      FAIL(sh, rank, "broadcast byte %zu is %u", i, bb[i]);
      break;
    }
  free(bb);
  /* Barrier: nobody leaves before the last one (rank 0, late) arrives. */
  if (rank == 0)
    usleep(200000);
  sh->t_before_barrier[rank] = test_now_ms();
  if (sbn_barrier(w) != SBN_OK)
    FAIL(sh, rank, "barrier: %s", sbn_last_error());
  sh->t_after_barrier[rank] = test_now_ms();
  /* A subgroup of the odd ranks reduces on its own. */
  if (a->world >= 4 && rank % 2 == 1) {
    int odd[] = {1, 3};
    sbn_group *g;
    if (sbn_new_group(ctx, odd, 2, &g) != SBN_OK) {
      FAIL(sh, rank, "new_group: %s", sbn_last_error());
    } else {
      float v[3] = {(float)rank, 1, 2};
      if (sbn_allreduce(g, v, 3, SBN_REDUCE_SUM) != SBN_OK || v[0] != 4 || v[1] != 2)
        FAIL(sh, rank, "subgroup allreduce: %s (%g %g)", sbn_last_error(), v[0], v[1]);
      sbn_group_free(g);
    }
  }
  free(buf);
  if (sbn_finalize(ctx) != SBN_OK)
    FAIL(sh, rank, "finalize: %s", sbn_last_error());
  return sh->failures[rank] ? 1 : 0;
}

static coord_proc coord;

/* Starts the coordinator (with coord_args) and world workers running fn,
 * waits at most timeout_ms, and checks that every worker succeeded; the
 * caller checks the rest in *ws, then calls finish(). */
static shared *run_workers_plan(worker_set *ws, const char *const *coord_args, int world,
                                worker_fn fn, int timeout_ms, const arg *plan) {
  ck_assert_int_eq(coord_start(&coord, coord_args), 0);
  arg a = plan != NULL ? *plan : (arg){0}; /* the workers get a copy (fork) */
  a.addr = coord.addr, a.job = unique_job(), a.world = world;
  ck_assert_int_eq(workers_start(ws, world, fn, &a, sizeof(shared)), 0);
  int ok = workers_wait(ws, timeout_ms);
  shared *sh = ws->shared;
  for (int r = 0; r < world; r++)
    ck_assert_msg(ws->status[r] == 0, "rank %d: status %d: %s", r, ws->status[r], sh->msg[r]);
  ck_assert_int_eq(ok, world);
  return sh;
}

static shared *run_workers(worker_set *ws, const char *const *coord_args, int world,
                           worker_fn fn, int timeout_ms) {
  return run_workers_plan(ws, coord_args, world, fn, timeout_ms, NULL);
}

static void finish(worker_set *ws) {
  workers_release(ws);
  ck_assert_int_eq(coord_stop(&coord, SIGTERM, 5000), 0);
}

START_TEST(test_collectives_n) {
  static const int worlds[] = {2, 4};
  int world = worlds[_i];
  worker_set ws;
  shared *sh = run_workers(&ws, NULL, world, collectives_worker, 100000);
  for (int r = 0; r < world; r++)
    ck_assert_msg(sh->t_after_barrier[r] >= sh->t_before_barrier[0],
                  "rank %d left the barrier before rank 0 arrived", r);
  finish(&ws);
}
END_TEST

static int nan_worker(int rank, void *ap, void *sp) {
  const arg *a = ap;
  shared *sh = sp;
  sbn_ctx *ctx = connect_rank(a, rank, sh);
  if (ctx == NULL)
    return 1;
  float v[4] = {1, 2, 3, 4};
  if (rank == 1)
    v[2] = NAN;
  sh->rc[rank] = sbn_allreduce(sbn_world(ctx), v, 4, SBN_REDUCE_SUM);
  snprintf(sh->msg[rank], 512, "%s", sbn_last_error());
  if (strstr(sh->msg[rank], "rank 1") == NULL)
    return 1; /* the error names the rank with the NaN */
  /* Sizes that differ between ranks are a mismatch, not a hang. */
  float w[8] = {0};
  int rc2 = sbn_allreduce(sbn_world(ctx), w, rank == 0 ? 8 : 6, SBN_REDUCE_SUM);
  if (rc2 == SBN_OK)
    return 1;
  /* A pipelined (3-chunk) allreduce whose first chunk fails (a NaN on rank
   * 1): the chunk sent ahead fails with it, and the next collectives work. */
  size_t n = 2 * SBN_CHUNK_FLOATS + 17;
  float *big = calloc(n, sizeof(float));
  if (big == NULL)
    return 1;
  if (rank == 1)
    big[5] = NAN;
  int rc3 = sbn_allreduce(sbn_world(ctx), big, n, SBN_REDUCE_SUM);
  int bad = rc3 != SBN_EBADSTATS;
  big[5] = 0;
  /* Sizes whose chunk counts differ (3 against 2): chunk 1 mismatches while
   * rank 0 has chunk 2 in flight; both stay in step for what follows. */
  int rc4 = sbn_allreduce(sbn_world(ctx), big, rank == 0 ? n : SBN_CHUNK_FLOATS + 3,
                          SBN_REDUCE_SUM);
  bad |= rc4 != SBN_EMISMATCH;
  if (rc4 != SBN_EMISMATCH)
    snprintf(sh->msg[rank], 512, "size mismatch gave %d: %s", rc4, sbn_last_error());
  /* A fused chunk with a NaN (rank 1) fails sbn_allreduce_many, and the
   * big buffer's first chunk sent ahead of its result with it. */
  float small[2][5] = {{1, 2, 3, 4, 5}, {6, 7, 8, 9, 10}};
  if (rank == 1)
    small[0][2] = NAN;
  float *mb[3] = {small[0], small[1], big};
  size_t mn[3] = {5, 5, n};
  int rc5 = sbn_allreduce_many(sbn_world(ctx), mb, mn, 3, SBN_REDUCE_SUM);
  bad |= rc5 != SBN_EBADSTATS || strstr(sbn_last_error(), "rank 1") == NULL;
  if (rc5 != SBN_EBADSTATS)
    snprintf(sh->msg[rank], 512, "NaN in a fused chunk gave %d: %s", rc5, sbn_last_error());
  for (size_t i = 0; i < n; i++)
    big[i] = (float)(rank + 1);
  bad |= sbn_barrier(sbn_world(ctx)) != SBN_OK;
  bad |= sbn_allreduce(sbn_world(ctx), big, n, SBN_REDUCE_SUM) != SBN_OK;
  for (size_t i = 0; i < n && !bad; i++)
    bad |= big[i] != 3.0f;
  if (!bad || rc5 == SBN_EBADSTATS)
    snprintf(sh->msg[rank], 512, "after the failed pipelined allreduce (%d): %s", rc3,
             sbn_last_error());
  free(big);
  sbn_finalize(ctx);
  return bad;
}

START_TEST(test_poisoned_allreduce) {
  worker_set ws;
  shared *sh = run_workers(&ws, NULL, 2, nan_worker, 30000);
  for (int r = 0; r < 2; r++)
    ck_assert_msg(sh->rc[r] == SBN_EBADSTATS, "rank %d: %d", r, sh->rc[r]);
  finish(&ws);
}
END_TEST

/*
 * A round that one rank cannot send (its message is over the coordinator's
 * frame limit, UNSENT_MAX_FRAME) never starts: that rank gives its sequence
 * number back, so its next call meets the other rank's open round and both
 * get a clear mismatch at once, and the group stays in step.  (Were the
 * number kept, the two ranks would be one round apart from then on.)
 */
#define UNSENT_MAX_FRAME "8192"
#define UNSENT_BIG_N 4096 /* 16 KiB of values */
static int unsent_worker(int rank, void *ap, void *sp) {
  const arg *a = ap;
  shared *sh = sp;
  sbn_ctx *ctx = connect_rank(a, rank, sh);
  if (ctx == NULL)
    return 1;
  sbn_group *w = sbn_world(ctx);
  static float big[UNSENT_BIG_N];
  float small[16] = {0};
  if (rank == 0) {
    int rc = sbn_allreduce(w, big, UNSENT_BIG_N, SBN_REDUCE_SUM);
    if (rc != SBN_ETOOBIG)
      FAIL(sh, rank, "allreduce over the frame limit gave %d: %s", rc, sbn_last_error());
    rc = sbn_barrier(w); /* meets rank 1's allreduce in the same round */
    if (rc != SBN_EMISMATCH)
      FAIL(sh, rank, "barrier against an allreduce gave %d: %s", rc, sbn_last_error());
  } else {
    int rc = sbn_allreduce(w, small, 16, SBN_REDUCE_SUM);
    if (rc != SBN_EMISMATCH)
      FAIL(sh, rank, "allreduce against a barrier gave %d: %s", rc, sbn_last_error());
  }
  /* In step again. */
  for (int i = 0; i < 16; i++)
    small[i] = (float)(rank + 1) * (float)i;
  if (sbn_barrier(w) != SBN_OK || sbn_allreduce(w, small, 16, SBN_REDUCE_SUM) != SBN_OK)
    FAIL(sh, rank, "after the unsent round: %s", sbn_last_error());
  for (int i = 0; i < 16 && !sh->failures[rank]; i++)
    if (small[i] != 3.0f * (float)i)
      FAIL(sh, rank, "element %d is %g after the unsent round", i, small[i]);
  sbn_finalize(ctx);
  return sh->failures[rank] ? 1 : 0;
}

START_TEST(test_unsent_round_gives_seq_back) {
  const char *args[] = {"--max-frame", UNSENT_MAX_FRAME, NULL};
  worker_set ws;
  run_workers(&ws, args, 2, unsent_worker, 30000);
  finish(&ws);
}
END_TEST

/*
 * The coordinator knows a group by its members: a group of every rank is
 * WORLD's state there, and a group freed and made again finds its old state.
 * Their rounds must go on from where that state is, whatever round failed in
 * it before (a NaN in an allreduce), and never meet that failure again.
 * World of 3: WORLD and a group of all ranks; a group of ranks 0 and 1.
 */
#define SAME_WORLD 3
/* n allreduces of g (size k) checked, a barrier of `other` after each. */
static void same_rounds(shared *sh, int rank, sbn_group *g, int k, sbn_group *other, int n,
                        const char *what) {
  for (int i = 0; i < n; i++) {
    float u[3] = {(float)rank, 1, 2};
    int rc = sbn_allreduce(g, u, 3, SBN_REDUCE_SUM);
    float r0 = (float)(k * (k - 1) / 2);
    if (rc != SBN_OK)
      FAIL(sh, rank, "%s: allreduce %d gave %d: %s", what, i, rc, sbn_last_error());
    else if (u[0] != r0 || u[1] != (float)k || u[2] != 2.0f * (float)k)
      FAIL(sh, rank, "%s: allreduce %d: %g %g %g", what, i, u[0], u[1], u[2]);
    if (other != NULL && (rc = sbn_barrier(other)) != SBN_OK)
      FAIL(sh, rank, "%s: barrier %d: %d: %s", what, i, rc, sbn_last_error());
  }
}

/* A NaN from rank 1 in an allreduce of g: every member gets EBADSTATS. */
static void same_fail(shared *sh, int rank, sbn_group *g, const char *what) {
  float v[4] = {1, 2, 3, 4};
  v[1] = rank == 1 ? NAN : 0.0f;
  int rc = sbn_allreduce(g, v, 4, SBN_REDUCE_SUM);
  if (rc != SBN_EBADSTATS)
    FAIL(sh, rank, "%s: allreduce with a NaN gave %d: %s", what, rc, sbn_last_error());
}

static int same_members_worker(int rank, void *ap, void *sp) {
  const arg *a = ap;
  shared *sh = sp;
  sbn_ctx *ctx = connect_rank(a, rank, sh);
  if (ctx == NULL)
    return 1;
  sbn_group *w = sbn_world(ctx);
  same_rounds(sh, rank, w, SAME_WORLD, NULL, 3, "WORLD");
  same_fail(sh, rank, w, "WORLD");
  const int all[SAME_WORLD] = {2, 0, 1}, pair[2] = {1, 0};
  for (int again = 0; again < 2; again++) {
    sbn_group *g = NULL;
    if (sbn_new_group(ctx, all, SAME_WORLD, &g) != SBN_OK) {
      FAIL(sh, rank, "new group: %s", sbn_last_error());
      break;
    }
    /* Past the failed round's number, alternating with WORLD. */
    same_rounds(sh, rank, g, SAME_WORLD, w, 6, again ? "all ranks, made again" : "all ranks");
    sbn_group_free(g);
  }
  if (rank < 2)
    for (int again = 0; again < 2; again++) {
      sbn_group *g = NULL;
      if (sbn_new_group(ctx, pair, 2, &g) != SBN_OK) {
        FAIL(sh, rank, "new pair: %s", sbn_last_error());
        break;
      }
      if (!again) {
        same_rounds(sh, rank, g, 2, NULL, 2, "pair");
        same_fail(sh, rank, g, "pair");
      } else {
        same_rounds(sh, rank, g, 2, NULL, 6, "pair made again");
      }
      sbn_group_free(g);
    }
  if (sbn_barrier(w) != SBN_OK)
    FAIL(sh, rank, "last barrier: %s", sbn_last_error());
  sbn_finalize(ctx);
  return sh->failures[rank] ? 1 : 0;
}

START_TEST(test_groups_of_the_same_members) {
  worker_set ws;
  run_workers(&ws, NULL, SAME_WORLD, same_members_worker, 60000);
  finish(&ws);
}
END_TEST

/*
 * A random script of rounds (the same on every rank, from one seed) over
 * groups that overlap: WORLD, a list of every rank, pairs, triples and
 * singles, freed and made again at random; allreduces (one chunk, or two
 * pipelined), fused allreduces (mean), forward statistics, backward sums,
 * broadcasts and barriers, with a NaN or Inf from a random member now and
 * then.  Every call must return what the script
 * says: SBN_EBADSTATS naming the rank for a NaN, SBN_OK with the values
 * computed here otherwise.  Ranks run ahead into rounds of other groups, so
 * this checks that the coordinator's and the workers' state of every group
 * stays in step through failures.
 */
#define SCRIPT_WORLD 4
#define SCRIPT_OPS 400
#define SCRIPT_SEED 0x5b7c0ffeeull
#define SCRIPT_OP_MAX_MS 4000 /* an op of the script, on a loaded machine */
static const unsigned script_sets[] = {0 /* WORLD */, 0xF, 0x3, 0x6, 0xC, 0x9, 0x7, 0xE, 0x5, 0x1};
#define SCRIPT_NSETS (int)(sizeof(script_sets) / sizeof(script_sets[0]))

static uint64_t script_next(uint64_t *s) {
  uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static float script_value(int rank, size_t i, int t) {
  return (float)((rank + 1) * (int)(i % 7) + t % 5);
}

static void *die_later(void *ms) {
  usleep((useconds_t)(*(const int *)ms) * 1000u);
  _exit(0);
}

static int script_worker(int rank, void *ap, void *sp) {
  const arg *a = ap;
  shared *sh = sp;
  sbn_ctx *ctx = connect_rank(a, rank, sh);
  if (ctx == NULL)
    return 1;
  pthread_t killer;
  if (a->die_after_ms > 0 && rank == a->die_rank &&
      pthread_create(&killer, NULL, die_later, (void *)&a->die_after_ms) != 0)
    FAIL(sh, rank, "cannot start the thread that ends this rank");
  sbn_group *gs[SCRIPT_NSETS] = {0};
  gs[0] = sbn_world(ctx);
  float *buf = malloc(sizeof(float) * (SBN_CHUNK_FLOATS + 300));
  /* SBN_SCRIPT_SEED=N runs another script (to explore; ctest runs the one). */
  const char *seed = getenv("SBN_SCRIPT_SEED");
  uint64_t rng = seed != NULL ? strtoull(seed, NULL, 0) : SCRIPT_SEED;
  const int dier = a->die_at > 0 || a->die_after_ms > 0 ? a->die_rank : -1;
  /* The op the rank that leaves is gone by at the latest (with die_after_ms
   * it may be gone from any op on: rounds with it may succeed or fail). */
  const int die_at = a->die_after_ms > 0 ? 0 : a->die_at;
  for (int t = 0; t < SCRIPT_OPS && !sh->failures[rank] && buf != NULL; t++) {
    if (rank == dier && a->die_at > 0 && t == a->die_at) {
      /* Gone between two rounds: with a goodbye, or the kernel closes the
       * socket.  _exit: nothing of the worker's own clean-up runs. */
      if (a->die_goodbye)
        sbn_finalize(ctx);
      _exit(0);
    }
    int set = (int)(script_next(&rng) % SCRIPT_NSETS);
    int kind = (int)(script_next(&rng) % 8);
    uint64_t r1 = script_next(&rng), r2 = script_next(&rng), r3 = script_next(&rng);
    unsigned mask = script_sets[set] ? script_sets[set] : (1u << SCRIPT_WORLD) - 1;
    int members[SCRIPT_WORLD], k = 0, me = -1;
    for (int r = 0; r < SCRIPT_WORLD; r++)
      if (mask & (1u << r)) {
        if (r == rank)
          me = k;
        members[k++] = r;
      }
    /* A NaN now and then (a group of one is local: nothing checks it). */
    int checked = kind <= 2 || kind >= 6; /* rounds whose values the coordinator checks */
    int bad = r3 % 8 == 0 && checked && k > 1 ? members[(r3 / 8) % (uint64_t)k] : -1;
    if (me < 0)
      continue; /* not a member: on to the next round this rank is in */
    if (set > 0 && (gs[set] == NULL || kind == 5)) {
      sbn_group_free(gs[set]); /* kind 5: made again */
      gs[set] = NULL;
      if (sbn_new_group(ctx, members, (size_t)k, &gs[set]) != SBN_OK) {
        FAIL(sh, rank, "op %d: new group %#x: %s", t, mask, sbn_last_error());
        break;
      }
    }
    sbn_group *g = gs[set];
    int rc = SBN_OK;
    const long long t0 = test_now_ms();
    if (kind == 0 || kind == 1) {
      size_t n = kind == 1 && r1 % 4 == 0 ? SBN_CHUNK_FLOATS + 1 + r2 % 300 : 1 + r2 % 300;
      for (size_t i = 0; i < n; i++)
        buf[i] = script_value(rank, i, t);
      if (rank == bad)
        buf[n / 2] = NAN;
      rc = sbn_allreduce(g, buf, n, SBN_REDUCE_SUM);
      for (size_t i = 0; rc == SBN_OK && i < n && !sh->failures[rank]; i++) {
        float e = 0;
        for (int j = 0; j < k; j++)
          e += script_value(members[j], i, t);
        if (buf[i] != e)
          FAIL(sh, rank, "op %d: allreduce of %#x, %zu values: [%zu] = %g, expected %g", t,
               mask, n, i, buf[i], e);
      }
    } else if (kind == 2) {
      size_t C = 1 + r2 % 64;
      double mean[64], m2[64], gmean[64], gm2[64];
      uint64_t gn = 0;
      for (size_t c = 0; c < C; c++)
        mean[c] = rank + (double)c, m2[c] = 1.0;
      if (rank == bad)
        mean[C - 1] = NAN;
      rc = sbn_sync_stats(g, "script", C, 2, mean, m2, &gn, gmean, gm2);
      double msum = 0, m2want = k * 1.0;
      for (int j = 0; j < k; j++)
        msum += members[j];
      for (int j = 0; j < k; j++) /* 2 (mean_j - mean)^2 each */
        m2want += 2.0 * (members[j] - msum / k) * (members[j] - msum / k);
      for (size_t c = 0; rc == SBN_OK && c < C && !sh->failures[rank]; c++)
        if (gn != 2u * (uint64_t)k || fabs(gmean[c] - (msum / k + (double)c)) > 1e-12 ||
            fabs(gm2[c] - m2want) > 1e-9)
          FAIL(sh, rank, "op %d: stats of %#x: count %llu mean %.17g m2 %.17g", t, mask,
               (unsigned long long)gn, gmean[c], gm2[c]);
    } else if (kind == 6) {
      /* Fused: two small buffers around an empty one, then (sometimes) one
       * of more than a chunk; the mean of the values. */
      size_t ns[4] = {1 + r2 % 100, 0, 1 + r1 % 50, r1 % 3 == 0 ? SBN_CHUNK_FLOATS + 7 : 0};
      float *bufs[4] = {buf, NULL, buf + 100, buf + 150};
      for (int b = 0; b < 4; b++)
        for (size_t i = 0; i < ns[b]; i++)
          bufs[b][i] = script_value(rank, i + (size_t)b, t) * (float)k;
      if (rank == bad)
        bufs[2][0] = INFINITY;
      rc = sbn_allreduce_many(g, bufs, ns, 4, SBN_REDUCE_MEAN);
      for (int b = 0; b < 4 && rc == SBN_OK; b++)
        for (size_t i = 0; i < ns[b] && !sh->failures[rank]; i++) {
          double e = 0;
          for (int j = 0; j < k; j++)
            e += (double)(script_value(members[j], i + (size_t)b, t) * (float)k);
          if (bufs[b][i] != (float)(e / k))
            FAIL(sh, rank, "op %d: allreduce_many of %#x, buffer %d [%zu] = %g, expected %g", t,
                 mask, b, i, bufs[b][i], e / k);
        }
    } else if (kind == 7) {
      size_t C = 1 + r2 % 64;
      double x[64], y[64], gx[64], gy[64];
      for (size_t c = 0; c < C; c++)
        x[c] = rank + 0.5 * (double)c, y[c] = -(double)rank;
      if (rank == bad)
        y[0] = NAN;
      rc = sbn_sync_sums(g, "script", C, x, y, gx, gy);
      double rs = 0;
      for (int j = 0; j < k; j++)
        rs += members[j];
      for (size_t c = 0; rc == SBN_OK && c < C && !sh->failures[rank]; c++)
        if (gx[c] != rs + 0.5 * (double)c * k || gy[c] != -rs)
          FAIL(sh, rank, "op %d: sums of %#x: %g %g", t, mask, gx[c], gy[c]);
    } else if (kind == 3 || kind == 5) {
      rc = sbn_barrier(g);
    } else {
      unsigned char b[512];
      size_t len = 1 + r2 % sizeof(b);
      int root = (int)(r1 % (uint64_t)k);
      for (size_t i = 0; i < len; i++)
        b[i] = me == root ? (unsigned char)(t + 3 * i) : 0;
      rc = sbn_broadcast(g, b, len, root);
      for (size_t i = 0; rc == SBN_OK && i < len && !sh->failures[rank]; i++)
        if (b[i] != (unsigned char)(t + 3 * i))
          FAIL(sh, rank, "op %d: broadcast of %#x: byte %zu", t, mask, i);
    }
    const long long took = test_now_ms() - t0;
    char want[32], gone[32];
    snprintf(want, sizeof(want), "rank %d", bad);
    snprintf(gone, sizeof(gone), "rank %d", dier);
    const int nan_named = rc == SBN_EBADSTATS && strstr(sbn_last_error(), want) != NULL;
    const int may_succeed = a->die_after_ms > 0 && (bad < 0 ? rc == SBN_OK : nan_named);
    if (dier >= 0 && t >= die_at && (mask & (1u << dier))) {
      /* The round can never complete: the member that left is named, at
       * once (a NaN from another member may be found first).  A round it
       * took part in before a timed exit completes (values checked above). */
      if (!(rc == SBN_EPEERLOST && strstr(sbn_last_error(), gone) != NULL) &&
          !(bad >= 0 && nan_named) && !may_succeed)
        FAIL(sh, rank, "op %d (kind %d, group %#x, rank %d gone at op %d): %d: %s", t, kind,
             mask, dier, die_at, rc, sbn_last_error());
    } else if (bad >= 0 && !nan_named) {
      FAIL(sh, rank, "op %d (kind %d, group %#x, NaN from rank %d): %d: %s", t, kind, mask, bad,
           rc, sbn_last_error());
    } else if (bad < 0 && rc != SBN_OK) {
      FAIL(sh, rank, "op %d (kind %d, group %#x): %d: %s", t, kind, mask, rc, sbn_last_error());
    }
    if (took > SCRIPT_OP_MAX_MS)
      FAIL(sh, rank, "op %d (kind %d, group %#x) took %lld ms: %d", t, kind, mask, took, rc);
  }
  free(buf);
  for (int i = 1; i < SCRIPT_NSETS; i++)
    sbn_group_free(gs[i]);
  if (sh->failures[rank] == 0) {
    const int rc = sbn_barrier(gs[0]);
    if (rc != (dier >= 0 ? SBN_EPEERLOST : SBN_OK) && !(a->die_after_ms > 0 && rc == SBN_OK))
      FAIL(sh, rank, "last barrier: %d: %s", rc, sbn_last_error());
  }
  sbn_finalize(ctx);
  return sh->failures[rank] ? 1 : 0;
}

START_TEST(test_random_script) {
  worker_set ws;
  const char *args[] = {"--round-timeout", "5000", NULL};
  run_workers(&ws, args, SCRIPT_WORLD, script_worker, 120000);
  finish(&ws);
}
END_TEST

/*
 * The same script, but one rank leaves before op die_at, silently or with a
 * goodbye.  Every later round of a group it is in must fail at once with
 * SBN_EPEERLOST naming it (the round time-out is 30 s, an op may take
 * SCRIPT_OP_MAX_MS), and every round of the groups without it still gives
 * exact results; the coordinator then stops cleanly.  The last two plans end
 * the rank from a thread after a time instead, wherever it is then: in the
 * middle of a round, a pipelined allreduce or a broadcast; a round with it
 * then either completes exactly or fails naming it.
 */
static const arg script_deaths[] = {
    {.die_rank = 2, .die_at = 37, .die_goodbye = 0},
    {.die_rank = 0, .die_at = 150, .die_goodbye = 1},
    {.die_rank = 3, .die_at = 1, .die_goodbye = 0},
    {.die_rank = 1, .die_at = 299, .die_goodbye = 1},
    {.die_rank = 2, .die_after_ms = 300},
    {.die_rank = 0, .die_after_ms = 900},
};

START_TEST(test_random_script_with_a_death) {
  worker_set ws;
  const char *args[] = {"--round-timeout", "30000", NULL};
  run_workers_plan(&ws, args, SCRIPT_WORLD, script_worker, 120000, &script_deaths[_i]);
  finish(&ws);
}
END_TEST

/*
 * A coordinator that answers out of order, played by the test on a raw
 * socket: the Error for the chunk sent ahead comes before the Result of the
 * chunk before it.  The worker keeps that Error for the chunk's await and
 * fails at once with it, instead of skipping it and waiting out its
 * time-out (which the real coordinator's in-order replies never test).
 */
#define EARLY_TIMEOUT_MS 4000
#define EARLY_N (SBN_CHUNK_FLOATS + 10) /* two chunks, the second sent ahead */
static int early_worker(int rank, void *ap, void *sp) {
  const arg *a = ap;
  shared *sh = sp;
  sbn_config cfg;
  worker_config(&cfg, a->addr, a->job, rank, 2);
  cfg.timeout_ms = EARLY_TIMEOUT_MS;
  sbn_ctx *ctx = NULL;
  if (sbn_init(&cfg, &ctx) != SBN_OK) {
    FAIL(sh, rank, "init: %s", sbn_last_error());
    return 1;
  }
  float *buf = calloc(EARLY_N, sizeof(float));
  long long t0 = test_now_ms();
  sh->rc[rank] = sbn_allreduce(sbn_world(ctx), buf, EARLY_N, SBN_REDUCE_SUM);
  sh->t_after_barrier[rank] = test_now_ms() - t0;
  snprintf(sh->msg[rank], 512, "%s", sbn_last_error());
  free(buf);
  sbn_finalize(ctx);
  return 0;
}

START_TEST(test_error_before_the_result_it_follows) {
  int port;
  int lfd = rp_listen(&port);
  char addr[64];
  snprintf(addr, sizeof(addr), "127.0.0.1:%d", port);
  arg a = {.addr = addr, .job = unique_job(), .world = 2};
  worker_set ws;
  ck_assert_int_eq(workers_start(&ws, 1, early_worker, &a, sizeof(shared)), 0);
  rp *w = rp_accept(lfd, RP_IO_TIMEOUT_MS);
  Sbn__Envelope *e = rp_recv(w, RP_IO_TIMEOUT_MS);
  ck_assert_int_eq(e->body_case, SBN__ENVELOPE__BODY_HELLO);
  sbn__msg_free(e);
  Sbn__Welcome wel = SBN__WELCOME__INIT;
  Sbn__Envelope out = SBN__ENVELOPE__INIT;
  wel.protocol_version = SBN_PROTOCOL_VERSION;
  wel.server_version = (char *)"test";
  wel.max_frame = SBN_MAX_FRAME_CEILING;
  wel.round_timeout_ms = 60000;
  wel.session = 1;
  wel.pipeline = 1;
  out.body_case = SBN__ENVELOPE__BODY_WELCOME;
  out.welcome = &wel;
  rp_send(w, &out);
  /* Chunk 0, then chunk 1 sent ahead of its result. */
  Sbn__Envelope *c0 = rp_recv(w, RP_IO_TIMEOUT_MS), *c1 = rp_recv(w, RP_IO_TIMEOUT_MS);
  ck_assert_int_eq(c0->body_case, SBN__ENVELOPE__BODY_CONTRIBUTE);
  ck_assert_int_eq(c1->body_case, SBN__ENVELOPE__BODY_CONTRIBUTE);
  ck_assert_uint_eq(c0->contribute->seq, 0);
  ck_assert_uint_eq(c1->contribute->seq, 1);
  ck_assert(c1->contribute->ahead);
  Sbn__Error err = SBN__ERROR__INIT;
  err.code = SBN_EMISMATCH;
  err.message = (char *)"test: chunk 1 refused before chunk 0's result";
  err.seq = 1;
  err.phase = SBN__PHASE__PHASE_ALLREDUCE;
  err.layer = c1->contribute->layer;
  out.body_case = SBN__ENVELOPE__BODY_ERROR;
  out.error = &err;
  rp_send(w, &out);
  Sbn__Result res = SBN__RESULT__INIT;
  res.seq = 0;
  res.phase = SBN__PHASE__PHASE_ALLREDUCE;
  res.layer = c0->contribute->layer;
  res.n_fvals = c0->contribute->n_fvals;
  res.fvals = c0->contribute->fvals;
  out.body_case = SBN__ENVELOPE__BODY_RESULT;
  out.result = &res;
  rp_send(w, &out);
  ck_assert_int_eq(workers_wait(&ws, 3 * EARLY_TIMEOUT_MS), 1);
  shared *sh = ws.shared;
  ck_assert_msg(sh->rc[0] == SBN_EMISMATCH && strstr(sh->msg[0], "chunk 1 refused") != NULL,
                "allreduce gave %d: %s", sh->rc[0], sh->msg[0]);
  ck_assert_msg(sh->t_after_barrier[0] < EARLY_TIMEOUT_MS / 2,
                "the error took %lld ms: it was skipped and the time-out waited out",
                sh->t_after_barrier[0]);
  sbn__msg_free(c0);
  sbn__msg_free(c1);
  workers_release(&ws);
  rp_close(w);
  close(lfd);
}
END_TEST

/*
 * A process forked from a worker (a data loader's, say) inherits its context
 * and socket: using them would put its bytes into the parent's stream, and
 * its sbn_finalize would say goodbye for the parent's rank.  The child's
 * collectives fail with SBN_ESTATE naming both processes, its finalize sends
 * nothing, and the parent's job goes on.
 */
static int fork_worker(int rank, void *ap, void *sp) {
  const arg *a = ap;
  shared *sh = sp;
  sbn_ctx *ctx = connect_rank(a, rank, sh);
  if (ctx == NULL)
    return 1;
  float v[3] = {1, 2, 3};
  if (rank == 0) {
    pid_t child = fork();
    if (child == 0) {
      int bad = 0;
      float w[3] = {1, 2, 3};
      char want[64];
      snprintf(want, sizeof(want), "belongs to process %ld", (long)getppid());
      if (sbn_allreduce(sbn_world(ctx), w, 3, SBN_REDUCE_SUM) != SBN_ESTATE ||
          strstr(sbn_last_error(), want) == NULL || strstr(sbn_last_error(), "forked") == NULL)
        bad = 1;
      if (sbn_barrier(sbn_world(ctx)) != SBN_ESTATE)
        bad |= 2;
      if (sbn_finalize(ctx) != SBN_OK)
        bad |= 4;
      _exit(bad);
    }
    int st = 0;
    if (child < 0 || waitpid(child, &st, 0) != child || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
      FAIL(sh, rank, "forked child: status %d (1: allreduce, 2: barrier, 4: finalize)",
           WIFEXITED(st) ? WEXITSTATUS(st) : -1);
  }
  /* The parent's job is intact: a round with rank 1, then goodbye. */
  if (sbn_allreduce(sbn_world(ctx), v, 3, SBN_REDUCE_SUM) != SBN_OK)
    FAIL(sh, rank, "allreduce after the fork: %s", sbn_last_error());
  else if (v[0] != 2 || v[1] != 4 || v[2] != 6)
    FAIL(sh, rank, "allreduce after the fork: %g %g %g", v[0], v[1], v[2]);
  if (sbn_finalize(ctx) != SBN_OK)
    FAIL(sh, rank, "finalize: %s", sbn_last_error());
  return sh->failures[rank] ? 1 : 0;
}

START_TEST(test_forked_child_cannot_use_context) {
  worker_set ws;
  run_workers(&ws, NULL, 2, fork_worker, 30000);
  finish(&ws);
}
END_TEST

START_TEST(test_local_collectives) {
  sbn_config cfg;
  sbn_config_init(&cfg);
  sbn_ctx *ctx;
  ck_assert_int_eq(sbn_init(&cfg, &ctx), SBN_OK);
  float v[2] = {1.5f, -2};
  ck_assert_int_eq(sbn_allreduce(sbn_world(ctx), v, 2, SBN_REDUCE_MEAN), SBN_OK);
  ck_assert(v[0] == 1.5f && v[1] == -2);
  ck_assert_int_eq(sbn_allreduce(sbn_world(ctx), v, 2, (sbn_reduce_op)7), SBN_EINVAL);
  ck_assert_int_eq(sbn_allreduce(sbn_world(ctx), NULL, 2, SBN_REDUCE_SUM), SBN_EINVAL);
  ck_assert_int_eq(sbn_broadcast(sbn_world(ctx), v, sizeof(v), 1), SBN_EINVAL);
  ck_assert_ptr_nonnull(strstr(sbn_last_error(), "root 1"));
  ck_assert_int_eq(sbn_broadcast(sbn_world(ctx), v, sizeof(v), 0), SBN_OK);
  ck_assert_int_eq(sbn_barrier(sbn_world(ctx)), SBN_OK);
  sbn_finalize(ctx);
}
END_TEST

int main(void) {
  Suite *s = suite_create("collectives");
  TCase *tc = tcase_create("collectives");
  tcase_set_timeout(tc, 150);
  tcase_add_loop_test(tc, test_collectives_n, 0, 2);
  tcase_add_test(tc, test_poisoned_allreduce);
  tcase_add_test(tc, test_unsent_round_gives_seq_back);
  tcase_add_test(tc, test_groups_of_the_same_members);
  tcase_add_test(tc, test_random_script);
  tcase_add_loop_test(tc, test_random_script_with_a_death, 0,
                      (int)(sizeof(script_deaths) / sizeof(script_deaths[0])));
  tcase_add_test(tc, test_error_before_the_result_it_follows);
  tcase_add_test(tc, test_local_collectives);
  tcase_add_test(tc, test_forked_child_cannot_use_context);
  suite_add_tcase(s, tc);
  return run_suite(s);
}
