/*
 * round.c - synchronization rounds: checking contributions, filing them
 * under (job, group, seq), merging in rank order, replies, failures,
 * tombstones, deadlock detection and timeouts.
 *
 * A round keeps every member's unpacked contribution until the last one
 * arrives, then computes the result in group rank order (ascending world
 * rank), so every member gets the same bytes whatever the arrival order.
 * The reply is encoded once and the same buffer is written to every member;
 * the contributions are released as soon as it is queued.
 *
 * Nothing here allocates per round in steady state: rounds come from the
 * coordinator's pool (pool.c) and go back to it, a contribution's memory is
 * its slot's arena, and the reply's buffer is pooled too.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coord_internal.h"
#include "log.h"
#include "merge.h"
#include "sbn/status.h"
#include "util.h"

/* How much of a differing model-check line an error message quotes. */
#define SBN_SRV_LINE_QUOTE 120
#define SBN_SRV_MSG_MAX 1024

/* Life cycle */

static void round_on_timeout(uv_timer_t *t);

/* --stall-warn: the round is still open; warn, then wait for the timeout. */
static void round_on_stall(uv_timer_t *t) {
  sbn__srv_round *r = t->data;
  const sbn__coord_config *cfg = &r->group->job->coord->cfg;
  sbn__obs_round_stalled(r);
  uv_timer_start(&r->timer, round_on_timeout, cfg->round_timeout_ms - cfg->stall_warn_ms, 0);
}

static sbn__srv_round *round_new(sbn__srv_group *g, uint64_t seq, uint64_t now) {
  sbn__srv_job *job = g->job;
  const sbn__coord_config *cfg = &job->coord->cfg;
  sbn__srv_round *r = sbn__srv_pool_round_get(job->coord, g->n);
  if (r == NULL)
    return NULL;
  r->t0 = now;
  r->group = g;
  r->seq = seq;
  if (cfg->stall_warn_ms > 0 && cfg->stall_warn_ms < cfg->round_timeout_ms)
    uv_timer_start(&r->timer, round_on_stall, cfg->stall_warn_ms, 0);
  else
    uv_timer_start(&r->timer, round_on_timeout, cfg->round_timeout_ms, 0);
  r->job_next = job->rounds;
  if (job->rounds != NULL)
    job->rounds->job_prev = r;
  job->rounds = r;
  r->grp_next = g->rounds;
  g->rounds = r;
  job->nrounds++;
  return r;
}

/* Takes r out of every list and releases its members; r stays readable. */
static void round_detach(sbn__srv_round *r) {
  sbn__srv_group *g = r->group;
  sbn__srv_job *job = g->job;
  r->dead = 1;
  if (r->job_prev != NULL)
    r->job_prev->job_next = r->job_next;
  else
    job->rounds = r->job_next;
  if (r->job_next != NULL)
    r->job_next->job_prev = r->job_prev;
  sbn__srv_round **pp = &g->rounds;
  while (*pp != NULL && *pp != r)
    pp = &(*pp)->grp_next;
  if (*pp == r)
    *pp = r->grp_next;
  for (uint32_t k = 0; k < r->nhave; k++) {
    sbn__srv_conn *c = job->ranks[sbn__srv_group_rank(g, r->arrived[k])].conn;
    if (c != NULL && c->round == r) {
      c->round = NULL;
      /* Its contribution sent ahead is dispatched once this round is over. */
      if (c->park_env != NULL)
        sbn__srv_ready_add(c);
    }
  }
  job->n_waiting -= r->nhave;
  job->nrounds--;
}

/* Releases the contributions and returns r to the pool (r is gone after). */
static void round_free(sbn__srv_round *r) {
  sbn__srv_pool_round_put(r->group->job->coord, r);
}

void sbn__srv_round_drop(sbn__srv_round *r) {
  round_detach(r);
  round_free(r);
}

/* Failures and tombstones */

void sbn__srv_group_tomb_release(sbn__srv_group *g) {
  free(g->tomb_msg);
  free(g->tomb_ranks);
  g->tomb_msg = NULL;
  g->tomb_ranks = NULL;
  g->tomb_nranks = 0;
  g->tomb_set = 0;
}

/* Remembers the failure of round seq so late members get it at once. */
static void group_tomb_set(sbn__srv_group *g, uint64_t seq, int code, const char *msg,
                           const uint32_t *ranks, size_t nranks) {
  if (g->tomb_set && seq < g->tomb_seq)
    return;
  size_t mlen = strlen(msg) + 1;
  char *m = malloc(mlen);
  if (m != NULL)
    memcpy(m, msg, mlen);
  uint32_t *rk = nranks ? malloc(nranks * sizeof(uint32_t)) : NULL;
  if (m == NULL || (nranks && rk == NULL)) {
    /* Without memory the late members still get the round timeout. */
    free(m);
    free(rk);
    return;
  }
  if (nranks)
    memcpy(rk, ranks, nranks * sizeof(uint32_t));
  sbn__srv_group_tomb_release(g);
  g->tomb_set = 1;
  g->tomb_seq = seq;
  g->tomb_code = code;
  g->tomb_msg = m;
  g->tomb_ranks = rk;
  g->tomb_nranks = nranks;
}

/*
 * Refuses a contribution that would open a round of a group with members
 * gone (returns 1): such a round can never complete.  The error names every
 * member gone, up to SBN_SRV_GONE_NAMED: the disconnected ones first (a rank
 * that left often did so because of them), then those that said goodbye.
 */
static int refuse_if_members_gone(sbn__srv_conn *conn, sbn__srv_group *g, const Sbn__Contribute *m,
                                  const char *layer) {
  const sbn__srv_job *job = conn->job;
  uint32_t i = 0;
  for (uint8_t st; i < g->n; i++)
    if ((st = job->ranks[sbn__srv_group_rank(g, i)].state) == SBN_RANK_LOST || st == SBN_RANK_LEFT)
      break;
  if (i == g->n)
    return 0; /* the usual case: one walk, as before anyone is named */
  uint32_t gone[SBN_SRV_GONE_NAMED];
  size_t k = 0, more = 0;
  char msg[512];
  size_t off = 0;
  for (int pass = 0; pass < 2; pass++) {
    const uint8_t want = pass == 0 ? SBN_RANK_LOST : SBN_RANK_LEFT;
    for (i = 0; i < g->n; i++) {
      const uint32_t mr = sbn__srv_group_rank(g, i);
      if (job->ranks[mr].state != want)
        continue;
      if (k == SBN_SRV_GONE_NAMED) {
        more++;
        continue;
      }
      const char *how = want == SBN_RANK_LEFT ? "left" : "disconnected";
      int w = k == 0 ? snprintf(msg, sizeof(msg), "rank %u of job '%s' %s", (unsigned)mr, job->name,
                                how)
                     : snprintf(msg + off, sizeof(msg) - off, ", rank %u %s", (unsigned)mr, how);
      if (w > 0) /* snprintf returns what it would have written: clamp */
        off = off + (size_t)w < sizeof(msg) ? off + (size_t)w : sizeof(msg) - 1;
      gone[k++] = mr;
    }
  }
  if (more > 0)
    snprintf(msg + off, sizeof(msg) - off, ", and %zu more gone", more);
  sbn__srv_conn_error(conn, SBN_EPEERLOST, gone, k, m->seq, m->phase, layer, "%s", msg);
  return 1;
}

static const Sbn__Contribute *round_ref(const sbn__srv_round *r) {
  return r->contrib[r->ref]->contribute;
}

static void round_fail_msg(sbn__srv_round *r, int code, const uint32_t *ranks, size_t nranks,
                           const char *msg) {
  if (r->dead)
    return;
  sbn__srv_group *g = r->group;
  sbn__srv_job *job = g->job;
  const Sbn__Contribute *ref = round_ref(r);
  char gname[128];
  sbn__srv_group_describe(g, gname, sizeof(gname));
  SBN_LOGW("round failed: job '%s' %s seq %llu layer '%s' (%s): %s: %s", job->name, gname,
           (unsigned long long)r->seq, ref->layer, sbn__phase_name(ref->phase), sbn_strerror(code),
           msg);
  sbn__obs_round_end(r, code);
  sbn__srv_wbuf *wb =
      sbn__srv_error_encode(job->coord, code, msg, ranks, nranks, r->seq, ref->phase, ref->layer);
  group_tomb_set(g, r->seq, code, msg, ranks, nranks);
  round_detach(r);
  for (uint32_t k = 0; k < r->nhave; k++) {
    sbn__srv_conn *c = job->ranks[sbn__srv_group_rank(g, r->arrived[k])].conn;
    if (c != NULL)
      sbn__srv_conn_send(c, wb);
  }
  sbn__srv_wbuf_unref(wb);
  /* What members parked, sent ahead of this round, now goes through the
   * ready list to sbn__srv_contribute, which fails it (no ok_seq). */
  round_free(r);
}

void sbn__srv_round_fail(sbn__srv_round *r, int code, const uint32_t *ranks, size_t nranks,
                         const char *fmt, ...) {
  char msg[SBN_SRV_MSG_MAX];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  round_fail_msg(r, code, ranks, nranks, msg);
}

/* Two ranks concerned, listed in ascending order. */
static void two_ranks(uint32_t out[2], uint32_t a, uint32_t b) {
  out[0] = a < b ? a : b;
  out[1] = a < b ? b : a;
}

static void round_on_timeout(uv_timer_t *t) {
  sbn__srv_round *r = t->data;
  sbn__srv_group *g = r->group;
  const Sbn__Contribute *ref = round_ref(r);
  size_t nmiss = r->n - r->nhave;
  uint32_t *miss = malloc(nmiss * sizeof(uint32_t));
  size_t k = 0;
  for (uint32_t i = 0; miss != NULL && i < r->n; i++)
    if (r->contrib[i] == NULL)
      miss[k++] = sbn__srv_group_rank(g, i);
  char list[256] = "?";
  if (miss != NULL)
    sbn__format_ranks(miss, k, list, sizeof(list));
  sbn__srv_round_fail(r, SBN_ETIMEDOUT, miss, miss ? k : 0,
                      "round seq %llu of layer '%s' (%s) timed out after %u ms waiting for "
                      "rank%s %s",
                      (unsigned long long)r->seq, ref->layer, sbn__phase_name(ref->phase),
                      (unsigned)g->job->coord->cfg.round_timeout_ms, nmiss == 1 ? "" : "s", list);
  free(miss);
}

/* Checking a contribution */

static int phase_needs_channels(int phase) {
  return phase == SBN__PHASE__PHASE_FORWARD || phase == SBN__PHASE__PHASE_BACKWARD ||
         phase == SBN__PHASE__PHASE_ALLREDUCE;
}

/*
 * The request's shape: members, layer, channels and the payload sizes its
 * phase needs.  Returns SBN_OK or a status with a message in msg; such a
 * request concerns its sender only.
 */
static int check_shape(const sbn__srv_conn *conn, const Sbn__Contribute *m, char *msg, size_t len) {
  const sbn__srv_job *job = conn->job;
  const char *layer = m->layer ? m->layer : "";
  int found = m->n_members == 0;
  for (size_t i = 0; i < m->n_members; i++) {
    if (m->members[i] >= job->world) {
      snprintf(msg, len, "group member %u is outside world size %u", (unsigned)m->members[i],
               (unsigned)job->world);
      return SBN_EINVAL;
    }
    if (i > 0 && m->members[i] <= m->members[i - 1]) {
      snprintf(msg, len, "group members are not sorted and distinct (%u after %u)",
               (unsigned)m->members[i], (unsigned)m->members[i - 1]);
      return SBN_EINVAL;
    }
    if (m->members[i] == conn->rank)
      found = 1;
  }
  if (!found) {
    snprintf(msg, len, "rank %u is not a member of the group it contributes to",
             (unsigned)conn->rank);
    return SBN_ENOTMEMBER;
  }
  if (m->phase < SBN__PHASE__PHASE_FORWARD || m->phase > SBN__PHASE__PHASE_MODEL_CHECK) {
    snprintf(msg, len, "unknown phase %d", (int)m->phase);
    return SBN_EINVAL;
  }
  if (strlen(layer) >= SBN_SRV_LAYER_MAX) {
    snprintf(msg, len, "layer name of %zu bytes is longer than %d bytes", strlen(layer),
             SBN_SRV_LAYER_MAX - 1);
    return SBN_EINVAL;
  }
  if (m->channels > job->coord->cfg.max_channels) {
    snprintf(msg, len, "%u channels for layer '%s' exceed the coordinator's limit of %u",
             (unsigned)m->channels, layer, (unsigned)job->coord->cfg.max_channels);
    return SBN_ELIMIT;
  }
  if (m->channels == 0 && phase_needs_channels(m->phase)) {
    snprintf(msg, len, "%s contribution for layer '%s' has 0 channels", sbn__phase_name(m->phase),
             layer);
    return SBN_EINVAL;
  }
  size_t gsize = m->n_members ? m->n_members : job->world;
  switch (m->phase) {
  case SBN__PHASE__PHASE_FORWARD:
  case SBN__PHASE__PHASE_BACKWARD:
    if (m->n_a != m->channels || m->n_b != m->channels) {
      snprintf(msg, len, "%s contribution for layer '%s' has %zu and %zu values for %u channels",
               sbn__phase_name(m->phase), layer, m->n_a, m->n_b, (unsigned)m->channels);
      return SBN_EINVAL;
    }
    break;
  case SBN__PHASE__PHASE_ALLREDUCE:
    if (m->op != SBN__REDUCE_OP__REDUCE_SUM && m->op != SBN__REDUCE_OP__REDUCE_MEAN) {
      snprintf(msg, len, "allreduce of '%s' asks for unknown reduce op %d", layer, (int)m->op);
      return SBN_EINVAL;
    }
    if (m->n_fvals != m->channels) {
      snprintf(msg, len, "allreduce of '%s' has %zu values for %u elements", layer, m->n_fvals,
               (unsigned)m->channels);
      return SBN_EINVAL;
    }
    break;
  case SBN__PHASE__PHASE_BROADCAST: {
    if (m->root >= gsize) {
      snprintf(msg, len, "broadcast root %u of '%s' is outside the group of %zu", (unsigned)m->root,
               layer, gsize);
      return SBN_EINVAL;
    }
    uint32_t root_rank = m->n_members ? m->members[m->root] : m->root;
    if (root_rank != conn->rank && m->blob.len > 0) {
      snprintf(msg, len, "rank %u sent a broadcast payload for '%s' but the root is rank %u",
               (unsigned)conn->rank, layer, (unsigned)root_rank);
      return SBN_EINVAL;
    }
    break;
  }
  case SBN__PHASE__PHASE_BARRIER:
    if (m->n_a || m->n_b || m->n_fvals || m->blob.len) {
      snprintf(msg, len, "barrier '%s' carries a payload", layer);
      return SBN_EINVAL;
    }
    break;
  default: break;
  }
  return SBN_OK;
}

/*
 * The values: statistics finite with M2 >= 0, sums and allreduce values
 * finite.  Returns SBN_OK or SBN_EBADSTATS with a message; bad values fail
 * the whole round, since its result could not be trusted.
 */
static int check_values(const sbn__srv_conn *conn, const Sbn__Contribute *m, char *msg,
                        size_t len) {
  const char *what = NULL;
  long bad = -1;
  if ((m->phase == SBN__PHASE__PHASE_FORWARD || m->phase == SBN__PHASE__PHASE_ALLREDUCE) &&
      m->count > SBN_MAX_COUNT) {
    /* A count that went negative in a signed type arrives as a huge one. */
    snprintf(msg, len,
             "rank %u sent bad values for layer '%s' (seq %llu, %s): count %llu (%lld as a "
             "signed number) is negative or larger than 2^53",
             (unsigned)conn->rank, m->layer, (unsigned long long)m->seq, sbn__phase_name(m->phase),
             (unsigned long long)m->count, (long long)m->count);
    return SBN_EBADSTATS;
  }
  switch (m->phase) {
  case SBN__PHASE__PHASE_FORWARD:
    bad = sbn__stats_check(m->count, m->a, m->b, m->channels, &what);
    break;
  case SBN__PHASE__PHASE_BACKWARD:
    if ((bad = sbn__finite_check(m->a, m->n_a)) >= 0)
      what = "sum of dy is not finite";
    else if ((bad = sbn__finite_check(m->b, m->n_b)) >= 0)
      what = "sum of dy*xhat is not finite";
    break;
  /* Allreduce values: checked by the reduction itself (sbn__reduce_floats),
   * which reads them anyway. */
  default: break;
  }
  if (bad < 0)
    return SBN_OK;
  snprintf(msg, len, "rank %u sent bad values for layer '%s' (seq %llu, %s), channel %ld: %s",
           (unsigned)conn->rank, m->layer, (unsigned long long)m->seq, sbn__phase_name(m->phase),
           bad, what);
  return SBN_EBADSTATS;
}

/*
 * Whether m agrees with the round's reference contribution (from rank
 * ref_rank).  Returns SBN_OK or SBN_EMISMATCH with a message naming both.
 */
static int check_agrees(const sbn__srv_round *r, uint32_t ref_rank, uint32_t rank,
                        const Sbn__Contribute *m, char *msg, size_t len) {
  const Sbn__Contribute *ref = round_ref(r);
  if (m->phase != ref->phase) {
    snprintf(msg, len,
             "rank %u is in the %s phase of layer '%s' (seq %llu), rank %u in the %s phase",
             (unsigned)rank, sbn__phase_name(m->phase), m->layer, (unsigned long long)m->seq,
             (unsigned)ref_rank, sbn__phase_name(ref->phase));
    return SBN_EMISMATCH;
  }
  if (strcmp(m->layer, ref->layer) != 0) {
    snprintf(msg, len, "rank %u is at layer '%s' (seq %llu, %s), rank %u at layer '%s'",
             (unsigned)rank, m->layer, (unsigned long long)m->seq, sbn__phase_name(m->phase),
             (unsigned)ref_rank, ref->layer);
    return SBN_EMISMATCH;
  }
  if (m->channels != ref->channels) {
    snprintf(msg, len, "rank %u sent %u channels for layer '%s', rank %u sent %u", (unsigned)rank,
             (unsigned)m->channels, m->layer, (unsigned)ref_rank, (unsigned)ref->channels);
    return SBN_EMISMATCH;
  }
  if (m->phase == SBN__PHASE__PHASE_ALLREDUCE && m->op != ref->op) {
    snprintf(msg, len, "rank %u asks for the %s of '%s', rank %u for the %s", (unsigned)rank,
             m->op == SBN__REDUCE_OP__REDUCE_MEAN ? "mean" : "sum", m->layer, (unsigned)ref_rank,
             ref->op == SBN__REDUCE_OP__REDUCE_MEAN ? "mean" : "sum");
    return SBN_EMISMATCH;
  }
  if (m->phase == SBN__PHASE__PHASE_BROADCAST && m->root != ref->root) {
    snprintf(msg, len, "rank %u names root %u for the broadcast of '%s', rank %u names root %u",
             (unsigned)rank, (unsigned)m->root, m->layer, (unsigned)ref_rank, (unsigned)ref->root);
    return SBN_EMISMATCH;
  }
  return SBN_OK;
}

/* Deadlocks */

static void deadlock(sbn__srv_round *r, uint32_t rank, sbn__srv_round *o, uint32_t other) {
  char gr[128], go[128], msg[SBN_SRV_MSG_MAX];
  sbn__srv_group_describe(r->group, gr, sizeof(gr));
  sbn__srv_group_describe(o->group, go, sizeof(go));
  snprintf(msg, sizeof(msg),
           "rank %u is at seq %llu of %s (layer '%s'), rank %u at seq %llu of %s "
           "(layer '%s'): neither round can complete",
           (unsigned)rank, (unsigned long long)r->seq, gr, round_ref(r)->layer, (unsigned)other,
           (unsigned long long)o->seq, go, round_ref(o)->layer);
  uint32_t both[2];
  two_ranks(both, rank, other);
  round_fail_msg(o, SBN_EMISMATCH, both, 2, msg);
  round_fail_msg(r, SBN_EMISMATCH, both, 2, msg);
}

/*
 * Rank `rank` now waits in r.  If some member m of r waits in another round
 * o that needs `rank`, neither round can ever complete (each connection has
 * one open contribution).  The search walks whichever is smaller: the
 * members of r, or the contributions waiting in the job's other rounds.
 */
static void check_deadlock(sbn__srv_round *r, uint32_t rank) {
  sbn__srv_group *g = r->group;
  sbn__srv_job *job = g->job;
  uint32_t others = job->n_waiting - r->nhave;
  if (others == 0)
    return;
  if (others < r->n) {
    for (sbn__srv_round *o = job->rounds; o != NULL; o = o->job_next) {
      if (o == r || sbn__srv_group_index(o->group, rank) < 0)
        continue;
      for (uint32_t k = 0; k < o->nhave; k++) {
        uint32_t m = sbn__srv_group_rank(o->group, o->arrived[k]);
        if (sbn__srv_group_index(g, m) >= 0) {
          deadlock(r, rank, o, m);
          return;
        }
      }
    }
    return;
  }
  for (uint32_t i = 0; i < r->n; i++) {
    uint32_t m = sbn__srv_group_rank(g, i);
    sbn__srv_conn *c = job->ranks[m].conn;
    if (m == rank || c == NULL || c->round == NULL || c->round == r)
      continue;
    if (sbn__srv_group_index(c->round->group, rank) >= 0) {
      deadlock(r, rank, c->round, m);
      return;
    }
  }
}

/* Completing */

/*
 * Line k of a newline-separated blob, or NULL past the last line.  A final
 * newline ends the last line rather than starting an empty one.
 */
static const char *blob_line(const ProtobufCBinaryData *b, size_t k, size_t *len) {
  if (b->len == 0)
    return NULL; /* data may be NULL then, and NULL + 0 is undefined */
  const char *p = (const char *)b->data, *end = p + b->len;
  for (size_t i = 0; p < end; i++) {
    const char *nl = memchr(p, '\n', (size_t)(end - p));
    const char *stop = nl ? nl : end;
    if (i == k) {
      *len = (size_t)(stop - p);
      return p;
    }
    p = nl ? nl + 1 : end;
  }
  return NULL;
}

/* Describes the first line where blob b (rank rb) differs from a (rank ra). */
static void model_diff(const ProtobufCBinaryData *a, uint32_t ra, const ProtobufCBinaryData *b,
                       uint32_t rb, char *msg, size_t len) {
  for (size_t k = 0;; k++) {
    size_t la = 0, lb = 0;
    const char *pa = blob_line(a, k, &la), *pb = blob_line(b, k, &lb);
    if (pa == NULL && pb == NULL) {
      snprintf(msg, len, "rank %u sent a model description that differs from rank %u's",
               (unsigned)rb, (unsigned)ra);
      return;
    }
    if (pa != NULL && pb != NULL && la == lb && memcmp(pa, pb, la) == 0)
      continue;
    if (pb == NULL) {
      snprintf(msg, len, "rank %u has no layer %zu, rank %u has '%.*s'", (unsigned)rb, k,
               (unsigned)ra, (int)(la < SBN_SRV_LINE_QUOTE ? la : SBN_SRV_LINE_QUOTE), pa);
    } else if (pa == NULL) {
      snprintf(msg, len, "rank %u layer %zu is '%.*s', rank %u has no layer %zu", (unsigned)rb, k,
               (int)(lb < SBN_SRV_LINE_QUOTE ? lb : SBN_SRV_LINE_QUOTE), pb, (unsigned)ra, k);
    } else {
      snprintf(msg, len, "rank %u layer %zu is '%.*s', rank %u has '%.*s'", (unsigned)rb, k,
               (int)(lb < SBN_SRV_LINE_QUOTE ? lb : SBN_SRV_LINE_QUOTE), pb, (unsigned)ra,
               (int)(la < SBN_SRV_LINE_QUOTE ? la : SBN_SRV_LINE_QUOTE), pa);
    }
    return;
  }
}

/*
 * Finite inputs can still overflow when merged (means of +-1e308, sums of
 * large values): such a result fails the round rather than reach anyone.
 * Returns 1 when every value is finite, else fails r and returns 0.
 */
static int result_finite(sbn__srv_round *r, const double *a, const double *b, size_t C) {
  const Sbn__Contribute *ref = round_ref(r);
  long bad = sbn__finite_check(a, C);
  if (bad < 0)
    bad = sbn__finite_check(b, C);
  if (bad < 0)
    return 1;
  sbn__srv_round_fail(r, SBN_EBADSTATS, NULL, 0,
                      "the merged %s values of layer '%s' (seq %llu) overflow double at "
                      "channel %ld",
                      sbn__phase_name(ref->phase), ref->layer, (unsigned long long)r->seq, bad);
  return 0;
}

/*
 * Every member has contributed: merge in group rank order, reply, free.
 * The accumulations run in place in the lowest rank's unpacked arrays, which
 * are freed right after the reply is encoded.
 */
static void round_complete(sbn__srv_round *r) {
  sbn__srv_group *g = r->group;
  sbn__srv_job *job = g->job;
  const Sbn__Contribute *ref = round_ref(r);
  Sbn__Contribute *first = r->contrib[0]->contribute;
  size_t C = ref->channels;
  Sbn__Result res = SBN__RESULT__INIT;
  sbn__srv_wbuf *wb = NULL; /* the encoded reply, when a phase builds it itself */
  res.seq = r->seq;
  res.phase = ref->phase;
  res.layer = ref->layer;
  res.channels = ref->channels;
  switch (ref->phase) {
  case SBN__PHASE__PHASE_FORWARD: {
    uint64_t n = first->count;
    for (uint32_t i = 1; i < r->n; i++) {
      const Sbn__Contribute *c = r->contrib[i]->contribute;
      if (c->count > SBN_MAX_COUNT - n) {
        uint32_t who = sbn__srv_group_rank(g, i);
        sbn__srv_round_fail(r, SBN_EBADSTATS, &who, 1,
                            "the global count of layer '%s' (seq %llu, forward) exceeds 2^53 "
                            "with rank %u's count of %llu",
                            ref->layer, (unsigned long long)r->seq, (unsigned)who,
                            (unsigned long long)c->count);
        return;
      }
      sbn__stats_merge(&n, first->a, first->b, c->count, c->a, c->b, C);
    }
    if (!result_finite(r, first->a, first->b, C))
      return;
    if (n == 0) {
      /* Nobody had data: report zeros rather than rank 0's ignored values. */
      memset(first->a, 0, C * sizeof(double));
      memset(first->b, 0, C * sizeof(double));
    }
    res.count = n;
    res.n_a = res.n_b = C;
    res.a = first->a;
    res.b = first->b;
    break;
  }
  case SBN__PHASE__PHASE_BACKWARD:
    for (uint32_t i = 1; i < r->n; i++) {
      const Sbn__Contribute *c = r->contrib[i]->contribute;
      sbn__sums_add(first->a, c->a, C);
      sbn__sums_add(first->b, c->b, C);
    }
    if (!result_finite(r, first->a, first->b, C))
      return;
    res.n_a = res.n_b = C;
    res.a = first->a;
    res.b = first->b;
    break;
  case SBN__PHASE__PHASE_ALLREDUCE: {
    /* Scratch: the reduction's block accumulator, then the inputs in rank order. */
    size_t ptr_doubles = (r->n * sizeof(float *) + sizeof(double) - 1) / sizeof(double);
    double *acc = sbn__srv_scratch(job->coord, SBN_REDUCE_BLOCK + ptr_doubles);
    if (acc == NULL) {
      sbn__srv_round_fail(r, SBN_ENOMEM, NULL, 0, "out of memory reducing '%s'", ref->layer);
      return;
    }
    const float **in = (const float **)(void *)(acc + SBN_REDUCE_BLOCK);
    uint64_t count = 0;
    for (uint32_t i = 0; i < r->n; i++) {
      in[i] = r->contrib[i]->contribute->fvals;
      count += r->contrib[i]->contribute->count;
    }
    /* The mean divides the double sum, so it too is rounded only once. */
    double scale = ref->op == SBN__REDUCE_OP__REDUCE_MEAN ? (double)r->n : 1.0;
    double bad_value = 0;
    long bad, bad_input = -1;
    res.count = count;
#if SBN_WIRE_IS_HOST_ORDER
    /* The sums go straight into the reply's frame, after its prefix: no
     * copy of the result is ever made (see sbn__msg_tail_prefix). */
    Sbn__Envelope renv = SBN__ENVELOPE__INIT;
    renv.body_case = SBN__ENVELOPE__BODY_RESULT;
    renv.result = &res;
    size_t prefix = 0, body = 0;
    int prc = sbn__msg_tail_prefix(&renv, SBN_MSG_RESULT_FVALS, C * sizeof(float),
                                   SBN_MAX_FRAME_CEILING, NULL, 0, &prefix, &body);
    if (prc == SBN_OK &&
        (wb = sbn__srv_pool_wbuf_get(job->coord, SBN_FRAME_HEADER_SIZE + body)) == NULL)
      prc = SBN_ENOMEM;
    if (prc == SBN_OK)
      prc = sbn__msg_tail_prefix(&renv, SBN_MSG_RESULT_FVALS, C * sizeof(float),
                                 SBN_MAX_FRAME_CEILING, wb->data, wb->len, &prefix, &body);
    if (prc != SBN_OK) {
      sbn__srv_wbuf_unref(wb);
      sbn__srv_round_fail(r, prc, NULL, 0, "cannot encode the result of '%s': %s", ref->layer,
                          sbn_strerror(prc));
      return;
    }
    bad = sbn__reduce_floats(wb->data + prefix, in, r->n, C, scale, acc, &bad_value, &bad_input);
#else
    bad = sbn__reduce_floats(first->fvals, in, r->n, C, scale, acc, &bad_value, &bad_input);
    res.n_fvals = C;
    res.fvals = first->fvals;
#endif
    if (bad >= 0 && bad_input >= 0) {
      sbn__srv_wbuf_unref(wb);
      uint32_t who = sbn__srv_group_rank(g, (uint32_t)bad_input);
      sbn__srv_round_fail(r, SBN_EBADSTATS, &who, 1,
                          "rank %u sent bad values for layer '%s' (seq %llu, allreduce), "
                          "channel %ld: value is not finite",
                          (unsigned)who, ref->layer, (unsigned long long)r->seq, bad);
      return;
    }
    if (bad >= 0) {
      sbn__srv_wbuf_unref(wb);
      sbn__srv_round_fail(r, SBN_EBADSTATS, NULL, 0,
                          "the %s of element %ld of '%s' (seq %llu, allreduce) overflows "
                          "float32 (%g)",
                          scale == 1.0 ? "sum" : "mean", bad, ref->layer,
                          (unsigned long long)r->seq, bad_value);
      return;
    }
    break;
  }
  case SBN__PHASE__PHASE_BROADCAST: res.blob = r->contrib[ref->root]->contribute->blob; break;
  case SBN__PHASE__PHASE_MODEL_CHECK:
    for (uint32_t i = 1; i < r->n; i++) {
      const ProtobufCBinaryData *a = &first->blob, *b = &r->contrib[i]->contribute->blob;
      if (a->len == b->len && (a->len == 0 || memcmp(a->data, b->data, a->len) == 0))
        continue;
      char msg[SBN_SRV_MSG_MAX];
      uint32_t ra = sbn__srv_group_rank(g, 0), rb = sbn__srv_group_rank(g, i), both[2];
      model_diff(a, ra, b, rb, msg, sizeof(msg));
      two_ranks(both, ra, rb);
      round_fail_msg(r, SBN_EMISMATCH, both, 2, msg);
      return;
    }
    break;
  default: break; /* barrier: an empty result is the answer */
  }
  if (wb == NULL) {
    Sbn__Envelope env = SBN__ENVELOPE__INIT;
    env.body_case = SBN__ENVELOPE__BODY_RESULT;
    env.result = &res;
    int rc;
    wb = sbn__srv_wbuf_encode(job->coord, &env, SBN_MAX_FRAME_CEILING, &rc);
    if (wb == NULL) {
      sbn__srv_round_fail(r, rc, NULL, 0, "cannot encode the result of '%s': %s", ref->layer,
                          sbn_strerror(rc));
      return;
    }
  }
  if (sbn__log_get_level() >= SBN_LOG_DEBUG) {
    char gname[128];
    sbn__srv_group_describe(g, gname, sizeof(gname));
    SBN_LOGD("round complete: job '%s' %s seq %llu layer '%s' (%s, %zu channels)", job->name, gname,
             (unsigned long long)r->seq, ref->layer, sbn__phase_name(ref->phase), C);
  }
  sbn__obs_round_end(r, SBN_OK);
  round_detach(r);
  for (uint32_t i = 0; i < r->n; i++) {
    sbn__srv_conn *c = job->ranks[sbn__srv_group_rank(g, i)].conn;
    if (c != NULL) {
      sbn__srv_conn_send(c, wb);
      /* An allreduce sent ahead of this round may follow it. */
      c->ok_group = g;
      c->ok_seq = r->seq;
    }
  }
  sbn__srv_wbuf_unref(wb);
  round_free(r);
}

/* Contributions */

static sbn__srv_round *group_find_round(sbn__srv_group *g, uint64_t seq) {
  for (sbn__srv_round *r = g->rounds; r != NULL; r = r->grp_next)
    if (r->seq == seq)
      return r;
  return NULL;
}

/* Whether members[0..n) name group g (n == 0: WORLD). */
/* Whether members name g, as sbn__srv_group_get() would find it: WORLD is
 * the empty list and also a list of every rank (n == world; a list that is
 * not strictly increasing is refused when the message is filed). */
static int group_is(const sbn__srv_group *g, const uint32_t *members, size_t n) {
  if (g->is_world)
    return n == 0 || n == g->n;
  return n == g->n && memcmp(members, g->members, n * sizeof(uint32_t)) == 0;
}

/*
 * Pipelining (SBN_SRV_PIPELINE_DEPTH): while conn's round is open, an
 * allreduce of the same group with the next seq waits, parked with its
 * memory, until that round ends.  Returns 1 when m was parked.
 */
static int park(sbn__srv_conn *conn, Sbn__Envelope *env) {
  const sbn__srv_round *open = conn->round;
  const Sbn__Contribute *m = env->contribute;
  if (conn->park_env != NULL || !m->ahead || m->phase != SBN__PHASE__PHASE_ALLREDUCE ||
      round_ref(open)->phase != SBN__PHASE__PHASE_ALLREDUCE || m->seq != open->seq + 1 ||
      !group_is(open->group, m->members, m->n_members))
    return 0;
  conn->park_env = env;
  sbn__arena_swap(&conn->arena, &conn->park_arena);
  return 1;
}

void sbn__srv_contribute(sbn__srv_conn *conn, Sbn__Envelope *env) {
  sbn__srv_job *job = conn->job;
  Sbn__Contribute *m = env->contribute;
  const char *layer = m->layer ? m->layer : "";
  char msg[SBN_SRV_MSG_MAX];
  int rc;
  if (m->layer == NULL)
    m->layer = (char *)layer;
  if (conn->round != NULL && park(conn, env))
    return;
  if (conn->round != NULL && conn->park_env != NULL) {
    sbn__srv_conn_error(conn, SBN_ESTATE, &conn->rank, 1, m->seq, m->phase, layer,
                        "rank %u sent seq %llu of layer '%s' while its seq %llu of layer '%s' "
                        "is still open and seq %llu is already sent ahead",
                        (unsigned)conn->rank, (unsigned long long)m->seq, layer,
                        (unsigned long long)conn->round->seq, round_ref(conn->round)->layer,
                        (unsigned long long)conn->park_env->contribute->seq);
    return;
  }
  if (conn->round != NULL) {
    sbn__srv_conn_error(conn, SBN_ESTATE, &conn->rank, 1, m->seq, m->phase, layer,
                        "rank %u sent seq %llu of layer '%s' while its seq %llu of layer '%s' "
                        "is still open",
                        (unsigned)conn->rank, (unsigned long long)m->seq, layer,
                        (unsigned long long)conn->round->seq, round_ref(conn->round)->layer);
    return;
  }
  if ((rc = check_shape(conn, m, msg, sizeof(msg))) != SBN_OK) {
    sbn__srv_conn_error(conn, rc, &conn->rank, 1, m->seq, m->phase, layer, "%s", msg);
    return;
  }
  sbn__srv_group *g = sbn__srv_group_get(job, m->members, m->n_members, &rc);
  if (g == NULL && rc == SBN_ELIMIT) {
    sbn__srv_conn_error(conn, SBN_ELIMIT, &conn->rank, 1, m->seq, m->phase, layer,
                        "job '%s' has created %u groups, the coordinator's limit; layer '%s' "
                        "cannot use a new one",
                        job->name, (unsigned)job->ngroups, layer);
    return;
  }
  if (g == NULL) {
    sbn__srv_conn_error(conn, SBN_ENOMEM, NULL, 0, m->seq, m->phase, layer,
                        "out of memory filing a contribution");
    return;
  }
  if (g->tomb_set && m->seq <= g->tomb_seq) {
    /* A round this rank is late for already failed: the same error, now. */
    sbn__srv_wbuf *wb = sbn__srv_error_encode(job->coord, g->tomb_code, g->tomb_msg, g->tomb_ranks,
                                              g->tomb_nranks, m->seq, m->phase, layer);
    sbn__srv_conn_send(conn, wb);
    sbn__srv_wbuf_unref(wb);
    return;
  }
  if (m->ahead && !(conn->ok_group == g && conn->ok_seq + 1 == m->seq)) {
    /* Sent ahead of a round of this rank's that did not complete (it failed,
     * or was refused): it fails too, so that nothing stays open for it. */
    int late = g->tomb_set && g->tomb_seq + 1 == m->seq;
    sbn__srv_conn_error(conn, late ? g->tomb_code : SBN_ESTATE, &conn->rank, 1, m->seq, m->phase,
                        layer, "seq %llu was sent ahead of seq %llu, which failed: %s",
                        (unsigned long long)m->seq, (unsigned long long)m->seq - 1,
                        late ? g->tomb_msg : "it is not open and did not complete");
    return;
  }
  const uint64_t now = uv_hrtime();
  sbn__srv_round *r = group_find_round(g, m->seq);
  uint32_t idx = (uint32_t)sbn__srv_group_index(g, conn->rank);
  if (r == NULL) {
    /*
     * A group with a lost or departed member can never complete a round.
     * Open rounds are failed when the loss happens, so the members only
     * need checking when a round is about to be created.
     */
    if (refuse_if_members_gone(conn, g, m, layer))
      return;
    if (job->nrounds >= job->coord->cfg.max_rounds) {
      sbn__srv_conn_error(conn, SBN_ELIMIT, &conn->rank, 1, m->seq, m->phase, layer,
                          "job '%s' has %u open rounds, the coordinator's limit; seq %llu of "
                          "layer '%s' cannot open another",
                          job->name, (unsigned)job->nrounds, (unsigned long long)m->seq, layer);
      return;
    }
    r = round_new(g, m->seq, now);
    if (r == NULL) {
      sbn__srv_conn_error(conn, SBN_ENOMEM, NULL, 0, m->seq, m->phase, layer,
                          "out of memory opening a round");
      return;
    }
    r->ref = idx;
  } else if (r->contrib[idx] != NULL) {
    sbn__srv_conn_error(conn, SBN_ESTATE, &conn->rank, 1, m->seq, m->phase, layer,
                        "rank %u already contributed to seq %llu", (unsigned)conn->rank,
                        (unsigned long long)m->seq);
    return;
  }
  /* Filed first, so that a failure below reaches the sender with the rest.
   * The slot takes the memory under env, leaving conn its (empty) arena. */
  r->contrib[idx] = env;
  sbn__arena_swap(&conn->arena, &r->arenas[idx]);
  r->arrived[r->nhave++] = idx;
  uint64_t since_us = (now - r->t0) / 1000u;
  r->t_us[idx] = since_us < UINT32_MAX ? (uint32_t)since_us : UINT32_MAX - 1;
  conn->round = r;
  job->n_waiting++;
  uint32_t ref_rank = sbn__srv_group_rank(g, r->ref);
  if (idx != r->ref && (rc = check_agrees(r, ref_rank, conn->rank, m, msg, sizeof(msg))) != 0) {
    uint32_t both[2];
    two_ranks(both, ref_rank, conn->rank);
    round_fail_msg(r, rc, both, 2, msg);
    return;
  }
  if ((rc = check_values(conn, m, msg, sizeof(msg))) != SBN_OK) {
    round_fail_msg(r, rc, &conn->rank, 1, msg);
    return;
  }
  if (r->nhave == r->n)
    round_complete(r);
  else
    check_deadlock(r, conn->rank);
}
