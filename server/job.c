/*
 * job.c - jobs, their ranks and groups: hello, restarts by generation, and
 * what happens when a rank's connection goes away.
 *
 * A job is created by its first accepted hello and freed when its last
 * connection is gone.  Within one generation a rank connects at most once:
 * a rank that was lost or said goodbye cannot come back, because the other
 * members may already have failed rounds on its account; the job restarts
 * with a higher generation instead, which resets every piece of state.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coord_internal.h"
#include "log.h"
#include "sbn/sbn.h"
#include "sbn/status.h"

/* Groups */

long sbn__srv_group_index(const sbn__srv_group *g, uint32_t r) {
  if (g->is_world)
    return r < g->n ? (long)r : -1;
  size_t lo = 0, hi = g->n;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (g->members[mid] == r)
      return (long)mid;
    if (g->members[mid] < r)
      lo = mid + 1;
    else
      hi = mid;
  }
  return -1;
}

uint32_t sbn__srv_group_rank(const sbn__srv_group *g, uint32_t i) {
  return g->is_world ? i : g->members[i];
}

void sbn__srv_group_describe(const sbn__srv_group *g, char *buf, size_t len) {
  if (g->is_world) {
    snprintf(buf, len, "world");
    return;
  }
  char ranks[96];
  sbn__format_ranks(g->members, g->n, ranks, sizeof(ranks));
  snprintf(buf, len, "group %s", ranks);
}

sbn__srv_group *sbn__srv_group_get(sbn__srv_job *job, const uint32_t *members, size_t n,
                                   int *rc) {
  /* An explicit list of every rank is WORLD too: both spellings meet. */
  int is_world = n == 0 || n == job->world;
  size_t klen = is_world ? 0 : n * sizeof(uint32_t);
  sbn__srv_map_node *node = sbn__srv_map_get(&job->groups, members, klen);
  if (node != NULL)
    return (sbn__srv_group *)node;
  *rc = SBN_ELIMIT;
  if (job->ngroups >= job->coord->cfg.max_groups)
    return NULL;
  *rc = SBN_ENOMEM;
  sbn__srv_group *g = calloc(1, sizeof(*g) + klen);
  if (g == NULL)
    return NULL;
  g->job = job;
  g->is_world = is_world;
  g->n = is_world ? job->world : (uint32_t)n;
  if (klen > 0)
    memcpy(g->members, members, klen);
  if (sbn__srv_map_put(&job->groups, &g->node, g->members, klen) != SBN_OK) {
    free(g);
    return NULL;
  }
  job->ngroups++;
  return g;
}

static void group_free_cb(sbn__srv_map_node *n, void *arg) {
  sbn__srv_job *job = arg;
  sbn__srv_group *g = (sbn__srv_group *)n;
  sbn__srv_map_del(&job->groups, n);
  sbn__srv_group_tomb_release(g);
  job->ngroups--;
  free(g);
}

/* Jobs */

/* Frees every round (silently) and group of job, keeping the job itself. */
static void job_reset_state(sbn__srv_job *job) {
  while (job->rounds != NULL)
    sbn__srv_round_drop(job->rounds);
  sbn__srv_map_each(&job->groups, group_free_cb, job);
}

static void job_free(sbn__srv_job *job) {
  job_reset_state(job);
  sbn__srv_map_release(&job->groups);
  sbn__srv_map_del(&job->coord->jobs, &job->node);
  job->coord->njobs--;
  SBN_LOGI("job '%s' ended (generation %llu)", job->name, (unsigned long long)job->generation);
  sbn__flight_free(job);
  free(job->ranks);
  free(job);
}

static void job_free_cb(sbn__srv_map_node *n, void *arg) {
  (void)arg;
  job_free((sbn__srv_job *)n);
}

void sbn__srv_job_free_all(sbn__coord *c) {
  sbn__srv_map_each(&c->jobs, job_free_cb, NULL);
}

static void job_shutdown_cb(sbn__srv_map_node *n, void *arg) {
  sbn__srv_job *job = (sbn__srv_job *)n;
  (void)arg;
  while (job->rounds != NULL)
    sbn__srv_round_fail(job->rounds, SBN_ESHUTDOWN, NULL, 0, "the coordinator is shutting down");
}

void sbn__srv_jobs_shutdown(sbn__coord *c) {
  sbn__srv_map_each(&c->jobs, job_shutdown_cb, NULL);
}

static sbn__srv_job *job_new(sbn__coord *c, const char *name, uint32_t world, uint64_t gen) {
  sbn__srv_job *job = calloc(1, sizeof(*job));
  sbn__srv_rank *ranks = calloc(world, sizeof(*ranks));
  if (job == NULL || ranks == NULL) {
    free(job);
    free(ranks);
    return NULL;
  }
  job->coord = c;
  snprintf(job->name, sizeof(job->name), "%s", name);
  job->world = world;
  job->generation = gen;
  job->ranks = ranks;
  sbn__srv_map_init(&job->groups, c->jobs.seed);
  if (sbn__srv_map_put(&c->jobs, &job->node, job->name, strlen(job->name)) != SBN_OK) {
    free(ranks);
    free(job);
    return NULL;
  }
  c->njobs++;
  SBN_LOGI("job '%s' created (world size %u, generation %llu)", job->name, (unsigned)world,
           (unsigned long long)gen);
  return job;
}

/*
 * A newer generation replaces the job's state: every old connection is told
 * and closed, rounds and groups are dropped.  Returns SBN_ENOMEM (and changes
 * nothing) if the new rank table cannot be had.
 */
static int job_restart(sbn__srv_job *job, uint64_t gen, uint32_t world) {
  sbn__srv_rank *ranks = calloc(world, sizeof(*ranks));
  if (ranks == NULL)
    return SBN_ENOMEM;
  char msg[256];
  snprintf(msg, sizeof(msg), "job '%s' restarted with generation %llu", job->name,
           (unsigned long long)gen);
  SBN_LOGI("%s (was generation %llu)", msg, (unsigned long long)job->generation);
  sbn__srv_wbuf *wb = sbn__srv_error_encode(job->coord, SBN_EPEERLOST, msg, NULL, 0, 0, 0, "");
  for (uint32_t r = 0; r < job->world; r++) {
    sbn__srv_conn *conn = job->ranks[r].conn;
    if (conn == NULL)
      continue;
    /* Detached first, so its close does not count as a loss in the new state. */
    conn->job = NULL;
    conn->round = NULL;
    sbn__srv_conn_send(conn, wb);
    sbn__srv_conn_close(conn, 1, "%s", msg);
  }
  sbn__srv_wbuf_unref(wb);
  job_reset_state(job);
  free(job->ranks);
  job->ranks = ranks;
  job->world = world;
  job->generation = gen;
  job->nconns = 0;
  job->n_waiting = 0;
  return SBN_OK;
}

/* Hello */

void sbn__srv_reject(sbn__srv_conn *conn, int code, const char *fmt, ...) {
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  Sbn__Reject rj = SBN__REJECT__INIT;
  Sbn__Envelope env = SBN__ENVELOPE__INIT;
  rj.code = code;
  rj.message = msg;
  env.body_case = SBN__ENVELOPE__BODY_REJECT;
  env.reject = &rj;
  int rc;
  sbn__srv_wbuf *wb = sbn__srv_wbuf_encode(conn->coord, &env, SBN_MAX_FRAME_CEILING, &rc);
  sbn__srv_conn_send(conn, wb);
  sbn__srv_wbuf_unref(wb);
  SBN_LOGW("conn %llu %s: hello rejected (%s): %s", (unsigned long long)conn->id, conn->peer,
           sbn_strerror(code), msg);
  sbn__obs_reject(conn->coord, code);
  sbn__srv_conn_close(conn, 1, "hello rejected");
}

/* The Welcome for conn joining job, or NULL with *rc SBN_EAUTH (no proof
 * of the coordinator's own) or SBN_ENOMEM. */
static sbn__srv_wbuf *welcome_encode(sbn__srv_conn *conn, const Sbn__Hello *h, uint64_t session,
                                     int *rc) {
  sbn__coord *c = conn->coord;
  Sbn__Welcome w = SBN__WELCOME__INIT;
  Sbn__Envelope env = SBN__ENVELOPE__INIT;
  uint8_t proof[SBN_AUTH_MAC_SIZE];
  if (conn->authed) {
    /* The same transcript as the worker's proof, the other direction. */
    if (sbn__auth_proof(&c->cfg.secret, SBN_AUTH_COORDINATOR, conn->nonce_w, conn->nonce_c,
                        h->job, h->rank, h->world_size, h->generation, proof) != SBN_OK) {
      *rc = SBN_EAUTH;
      return NULL;
    }
    w.proof.data = proof;
    w.proof.len = SBN_AUTH_MAC_SIZE;
  }
  w.protocol_version = SBN_PROTOCOL_VERSION;
  w.server_version = (char *)SBN_VERSION_STRING;
  w.max_frame = c->cfg.max_frame;
  w.round_timeout_ms = c->cfg.round_timeout_ms;
  w.session = session;
  w.pipeline = SBN_SRV_PIPELINE_DEPTH;
  env.body_case = SBN__ENVELOPE__BODY_WELCOME;
  env.welcome = &w;
  return sbn__srv_wbuf_encode(c, &env, SBN_MAX_FRAME_CEILING, rc);
}

void sbn__srv_job_hello(sbn__srv_conn *conn, const Sbn__Hello *h) {
  sbn__coord *c = conn->coord;
  const char *name = h->job ? h->job : "";
  size_t nlen = strlen(name);
  if (c->stopping) {
    sbn__srv_reject(conn, SBN_ESHUTDOWN, "the coordinator is shutting down");
    return;
  }
  if (h->protocol_version != SBN_PROTOCOL_VERSION) {
    sbn__srv_reject(conn, SBN_EVERSION, "hello speaks protocol version %u, this coordinator speaks %u",
           (unsigned)h->protocol_version, SBN_PROTOCOL_VERSION);
    return;
  }
  if (nlen == 0) {
    sbn__srv_reject(conn, SBN_EINVAL, "job id is empty");
    return;
  }
  if (nlen >= SBN_SRV_JOB_MAX) {
    sbn__srv_reject(conn, SBN_EINVAL, "job id of %zu bytes is longer than %d bytes", nlen,
           SBN_SRV_JOB_MAX - 1);
    return;
  }
  if (h->world_size < 1 || h->world_size > SBN_SRV_WORLD_MAX) {
    sbn__srv_reject(conn, SBN_EINVAL, "world size %u of job '%s' is outside [1, %u]",
           (unsigned)h->world_size, name, SBN_SRV_WORLD_MAX);
    return;
  }
  if (h->rank >= h->world_size) {
    sbn__srv_reject(conn, SBN_EINVAL, "rank %u is outside world size %u of job '%s'", (unsigned)h->rank,
           (unsigned)h->world_size, name);
    return;
  }
  sbn__srv_job *job = (sbn__srv_job *)sbn__srv_map_get(&c->jobs, name, nlen);
  if (job != NULL && h->generation < job->generation) {
    sbn__srv_reject(conn, SBN_EREJECTED, "stale generation %llu for job '%s', the job is at generation %llu",
           (unsigned long long)h->generation, name, (unsigned long long)job->generation);
    return;
  }
  if (job != NULL && h->generation > job->generation) {
    if (job_restart(job, h->generation, h->world_size) != SBN_OK) {
      sbn__srv_reject(conn, SBN_ENOMEM, "out of memory restarting job '%s'", name);
      return;
    }
  } else if (job != NULL && h->world_size != job->world) {
    sbn__srv_reject(conn, SBN_EMISMATCH,
           "rank %u says world size %u for job '%s', the job has world size %u", (unsigned)h->rank,
           (unsigned)h->world_size, name, (unsigned)job->world);
    return;
  }
  if (job == NULL && c->njobs >= c->cfg.max_jobs) {
    sbn__srv_reject(conn, SBN_ELIMIT,
                    "the coordinator serves %u jobs, its limit; job '%s' cannot start",
                    (unsigned)c->njobs, name);
    return;
  }
  if (job == NULL) {
    job = job_new(c, name, h->world_size, h->generation);
    if (job == NULL) {
      sbn__srv_reject(conn, SBN_ENOMEM, "out of memory creating job '%s'", name);
      return;
    }
  }
  sbn__srv_rank *slot = &job->ranks[h->rank];
  if (slot->state == SBN_RANK_CONNECTED) {
    sbn__srv_reject(conn, SBN_EDUPLICATE, "rank %u of job '%s' is already connected", (unsigned)h->rank,
           name);
    return;
  }
  if (slot->state != SBN_RANK_NEVER) {
    sbn__srv_reject(conn, SBN_EREJECTED,
           "rank %u of job '%s' %s earlier in generation %llu; restart the job with a new "
           "generation",
           (unsigned)h->rank, name, slot->state == SBN_RANK_LEFT ? "left" : "was lost",
           (unsigned long long)job->generation);
    return;
  }
  /* The Welcome is built before the rank is taken: without it (out of
   * memory) the worker is refused and may simply try again. */
  uint64_t session = c->next_session + 1;
  int rc;
  sbn__srv_wbuf *wb = welcome_encode(conn, h, session, &rc);
  if (wb == NULL) {
    if (job->nconns == 0)
      job_free(job); /* created for this hello, or holding nobody */
    sbn__srv_reject(conn, rc, "%s",
                    rc == SBN_EAUTH ? "the coordinator cannot compute its proof"
                                    : "out of memory welcoming the worker");
    return;
  }
  c->next_session = session;
  slot->conn = conn;
  slot->state = SBN_RANK_CONNECTED;
  job->nconns++;
  conn->job = job;
  conn->rank = h->rank;
  conn->generation = job->generation;
  conn->welcomed = 1;
  sbn__srv_conn_send(conn, wb);
  sbn__srv_wbuf_unref(wb);
  /* A welcomed worker may send frames up to the configured limit. */
  conn->rx.max_frame = c->cfg.max_frame;
  SBN_LOGI("conn %llu %s: hello accepted%s: job '%s' rank %u world %u generation %llu "
           "session %llu",
           (unsigned long long)conn->id, conn->peer, conn->authed ? " (authenticated)" : "",
           job->name, (unsigned)conn->rank, (unsigned)job->world,
           (unsigned long long)conn->generation, (unsigned long long)session);
}

/* Losing a rank */

/* The first open round of job that rank r belongs to, or NULL. */
static sbn__srv_round *round_with_rank(sbn__srv_job *job, uint32_t r) {
  for (sbn__srv_round *rd = job->rounds; rd != NULL; rd = rd->job_next)
    if (sbn__srv_group_index(rd->group, r) >= 0)
      return rd;
  return NULL;
}

void sbn__srv_job_conn_gone(sbn__srv_conn *conn) {
  sbn__srv_job *job = conn->job;
  uint32_t r = conn->rank;
  int left = conn->said_goodbye;
  job->ranks[r].conn = NULL;
  job->ranks[r].state = left ? SBN_RANK_LEFT : SBN_RANK_LOST;
  conn->job = NULL;
  conn->round = NULL;
  if (!left && !job->coord->stopping)
    SBN_LOGW("rank %u of job '%s' lost", (unsigned)r, job->name);
  /*
   * Every open round this rank belongs to can never complete: fail them now
   * so nobody waits for the round timeout.  A loss is rare, so a walk over
   * the job's open rounds is fine here (it is never done per contribution).
   */
  sbn__srv_round *rd;
  while ((rd = round_with_rank(job, r)) != NULL)
    sbn__srv_round_fail(rd, SBN_EPEERLOST, &r, 1, "rank %u of job '%s' %s", (unsigned)r, job->name,
                        left ? "left" : "disconnected");
  if (--job->nconns == 0)
    job_free(job);
}
