/*
 * group.c - groups of ranks and the synchronization rounds they run.
 *
 * A round is one request and one reply on the context's connection.  Every
 * member numbers the rounds of a group 0, 1, 2, ... in call order; the
 * coordinator matches contributions by that number and checks that all
 * members agree on what the round is (phase, layer, channels).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "util.h"

int sbn__group_is_local(const sbn_group *g) {
  return g == NULL || g->n == 1;
}

static int cmp_u32(const void *a, const void *b) {
  uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
  return (x > y) - (x < y);
}

/* The counter of the rounds of the sorted members m[0..n) (see
 * sbn__seq_slot), made if new; NULL without memory for it. */
static uint64_t *seq_of(sbn_ctx *ctx, const uint32_t *m, size_t n) {
  if (n == (size_t)ctx->world_size)
    return &ctx->world_seq; /* n distinct ranks of the world: all of them */
  for (sbn__seq_slot *s = ctx->seqs; s != NULL; s = s->next)
    if (s->n == n && memcmp(s->members, m, n * sizeof(*m)) == 0)
      return &s->seq;
  sbn__seq_slot *s = malloc(sizeof(*s) + n * sizeof(*m));
  if (s == NULL)
    return NULL;
  s->seq = 0;
  s->n = n;
  memcpy(s->members, m, n * sizeof(*m));
  s->next = ctx->seqs;
  ctx->seqs = s;
  return &s->seq;
}

SBN_API int sbn_new_group(sbn_ctx *ctx, const int *ranks, size_t n, sbn_group **out) {
  if (out == NULL)
    return sbn__fail(SBN_EINVAL, "sbn_new_group needs somewhere to store the group");
  *out = NULL;
  if (ctx == NULL)
    return sbn__fail(SBN_ESTATE, "sbn_new_group called before sbn_init");
  if (ranks == NULL || n == 0)
    return sbn__fail(SBN_EINVAL, "a group needs at least one rank");
  for (size_t i = 0; i < n; i++)
    if (ranks[i] < 0 || ranks[i] >= ctx->world_size)
      return sbn__fail(SBN_EINVAL, "rank %d is not in the world 0..%d", ranks[i],
                       ctx->world_size - 1);
  if (n > (size_t)ctx->world_size)
    return sbn__fail(SBN_EINVAL, "a group of %zu ranks repeats some: the world has %d", n,
                     ctx->world_size);
  uint32_t *m = malloc(n * sizeof(*m));
  sbn_group *g = calloc(1, sizeof(*g));
  if (m == NULL || g == NULL) {
    free(m);
    free(g);
    return sbn__fail(SBN_ENOMEM, "out of memory creating a group");
  }
  for (size_t i = 0; i < n; i++)
    m[i] = (uint32_t)ranks[i];
  qsort(m, n, sizeof(*m), cmp_u32);
  g->my_index = -1;
  for (size_t i = 0; i < n; i++) {
    if (i > 0 && m[i] == m[i - 1]) {
      unsigned dup = m[i];
      free(m);
      free(g);
      return sbn__fail(SBN_EINVAL, "rank %u appears twice in the group", dup);
    }
    if (m[i] == (uint32_t)ctx->rank)
      g->my_index = (int)i;
  }
  if (g->my_index < 0) {
    free(m);
    free(g);
    return sbn__fail(SBN_ENOTMEMBER, "rank %d is not a member of the group it creates", ctx->rank);
  }
  g->seq = seq_of(ctx, m, n);
  if (g->seq == NULL) {
    free(m);
    free(g);
    return sbn__fail(SBN_ENOMEM, "out of memory creating a group");
  }
  g->ctx = ctx;
  g->members = m;
  g->n = n;
  *out = g;
  return SBN_OK;
}

SBN_API void sbn_group_free(sbn_group *g) {
  if (g == NULL || (g->ctx != NULL && g == g->ctx->world))
    return; /* WORLD belongs to the context */
  free(g->members);
  free(g);
}

SBN_API int sbn_group_size(const sbn_group *g) {
  return g ? (int)g->n : 1;
}
SBN_API int sbn_group_rank(const sbn_group *g) {
  return g ? g->my_index : 0;
}
SBN_API int sbn_group_member(const sbn_group *g, int i) {
  if (g == NULL)
    return i == 0 ? 0 : -1;
  return i >= 0 && (size_t)i < g->n ? (int)g->members[i] : -1;
}

static int await_result(sbn_ctx *ctx, const uint64_t *counter, const sbn__round_req *req,
                        uint64_t seq, uint64_t deadline, Sbn__Envelope **reply);
static void record_latency(sbn_ctx *ctx, uint64_t ns);

/* Turns an Error from the coordinator into the caller's status and message. */
static int error_from_reply(const Sbn__Error *e) {
  int code = e->code < 0 && e->code >= SBN_STATUS_MIN ? e->code : SBN_EPROTO;
  return sbn__fail(code, "%s", e->message && e->message[0] ? e->message : sbn_strerror(code));
}

int sbn__round_send(sbn_group *g, const sbn__round_req *req, sbn__round_tx *tx) {
  sbn_ctx *ctx = g->ctx;
  memset(tx, 0, sizeof(*tx));
  if (sbn__ctx_forked(ctx))
    return SBN_ESTATE;
  if (req->layer != NULL && strlen(req->layer) >= SBN_LAYER_MAX)
    return sbn__fail(SBN_EINVAL, "layer name '%.40s...' is longer than %d bytes", req->layer,
                     SBN_LAYER_MAX - 1);
  Sbn__Contribute c = SBN__CONTRIBUTE__INIT;
  Sbn__Envelope env = SBN__ENVELOPE__INIT;
  uint64_t seq = (*g->seq)++;
  /* WORLD travels as an empty member list: the coordinator knows it. */
  if (g != ctx->world) {
    c.n_members = g->n;
    c.members = g->members;
  }
  c.seq = seq;
  c.phase = (Sbn__Phase)req->phase;
  c.layer = (char *)(req->layer ? req->layer : "");
  c.channels = (uint32_t)req->channels;
  c.count = req->count;
  if (req->a != NULL) {
    c.n_a = req->channels;
    c.a = (double *)req->a;
  }
  if (req->b != NULL) {
    c.n_b = req->channels;
    c.b = (double *)req->b;
  }
  /* Allreduce values go on the wire straight from the caller's buffer. */
  const int raw_fvals = req->fvals != NULL && SBN_WIRE_IS_HOST_ORDER;
  if (req->fvals != NULL && !raw_fvals) {
    c.n_fvals = req->channels;
    c.fvals = (float *)req->fvals;
  }
  c.blob.data = (uint8_t *)req->blob;
  c.blob.len = req->blob_len;
  c.root = req->root;
  c.op = (Sbn__ReduceOp)req->op;
  c.ahead = req->ahead != 0;
  env.body_case = SBN__ENVELOPE__BODY_CONTRIBUTE;
  env.contribute = &c;
  uint64_t t0 = sbn__now_ns();
  uint64_t deadline = t0 / 1000000u + (uint64_t)ctx->timeout_ms;
  int rc = raw_fvals ? sbn__conn_send_tail(&ctx->conn, &env, SBN_MSG_CONTRIBUTE_FVALS, req->fvals,
                                           req->channels * sizeof(float), deadline)
                     : sbn__conn_send(&ctx->conn, &env, deadline);
  tx->seq = seq;
  tx->t0_ns = t0;
  tx->deadline_ms = deadline;
  if (rc != SBN_OK) {
    ctx->rounds_failed++;
    /* Nothing went out while the connection lives (a failed write closes
     * it): the round never started, so its sequence number is given back
     * and this rank stays in step with the group. */
    if (ctx->conn.fd >= 0)
      *g->seq = seq;
  }
  return rc;
}

int sbn__round_await(sbn_group *g, const sbn__round_req *req, const sbn__round_tx *tx,
                     Sbn__Envelope **reply) {
  *reply = NULL;
  sbn_ctx *ctx = g->ctx;
  int rc = await_result(ctx, g->seq, req, tx->seq, tx->deadline_ms, reply);
  if (rc == SBN_OK)
    record_latency(ctx, sbn__now_ns() - tx->t0_ns);
  else
    ctx->rounds_failed++;
  return rc;
}

int sbn__round(sbn_group *g, const sbn__round_req *req, Sbn__Envelope **reply) {
  *reply = NULL;
  sbn__round_tx tx = {0};
  int rc = sbn__round_send(g, req, &tx);
  return rc == SBN_OK ? sbn__round_await(g, req, &tx, reply) : rc;
}

/* Keeps the last SBN_LATENCY_WINDOW latencies in a ring. */
static void record_latency(sbn_ctx *ctx, uint64_t ns) {
  if (ctx->lat == NULL && (ctx->lat = malloc(SBN_LATENCY_WINDOW * sizeof(float))) == NULL)
    return; /* statistics are best effort */
  ctx->lat[ctx->lat_n++ % SBN_LATENCY_WINDOW] = (float)((double)ns / 1000.0);
  ctx->rounds_ok++;
}

static int cmp_float(const void *a, const void *b) {
  float x = *(const float *)a, y = *(const float *)b;
  return (x > y) - (x < y);
}

SBN_API int sbn_round_stats_get(sbn_ctx *ctx, sbn_round_stats *out, int reset) {
  if (ctx == NULL || out == NULL)
    return sbn__fail(SBN_EINVAL, "sbn_round_stats_get needs a context and an output");
  memset(out, 0, sizeof(*out));
  out->rounds = ctx->rounds_ok;
  out->failed = ctx->rounds_failed;
  size_t n = ctx->lat_n < SBN_LATENCY_WINDOW ? ctx->lat_n : SBN_LATENCY_WINDOW;
  if (n > 0) {
    float *v = malloc(n * sizeof(float));
    if (v == NULL)
      return sbn__fail(SBN_ENOMEM, "out of memory sorting latencies");
    memcpy(v, ctx->lat, n * sizeof(float));
    qsort(v, n, sizeof(float), cmp_float);
    double sum = 0;
    for (size_t i = 0; i < n; i++)
      sum += v[i];
    out->mean_us = sum / (double)n;
    out->p50_us = v[n / 2];
    out->p99_us = v[(size_t)((double)(n - 1) * 0.99)];
    out->max_us = v[n - 1];
    free(v);
  }
  if (reset) {
    ctx->lat_n = 0;
    ctx->rounds_ok = ctx->rounds_failed = 0;
  }
  return SBN_OK;
}

/* Waits for the Result of round seq of the group numbered by counter,
 * answering pings on the way. */
static int await_result(sbn_ctx *ctx, const uint64_t *counter, const sbn__round_req *req,
                        uint64_t seq, uint64_t deadline, Sbn__Envelope **reply) {
  int rc;
  if (ctx->early.set && ctx->early.counter == counter && ctx->early.seq <= seq) {
    ctx->early.set = 0; /* this round's, or one of a round given up */
    if (ctx->early.seq == seq)
      return sbn__fail(ctx->early.code, "%s", ctx->early.msg);
  }
  for (;;) {
    Sbn__Envelope *in;
    rc = sbn__conn_recv(&ctx->conn, &in, deadline);
    if (rc == SBN_ETIMEDOUT) {
      char msg[300];
      snprintf(msg, sizeof(msg),
               "no answer from the coordinator for round %llu of layer '%s' within "
               "%d ms",
               (unsigned long long)seq, req->layer ? req->layer : "", ctx->timeout_ms);
      /* The reply may still come: the stream is out of step, drop it. */
      return sbn__conn_kill(&ctx->conn, SBN_ETIMEDOUT, msg);
    }
    if (rc != SBN_OK)
      return rc;
    switch (in->body_case) {
    case SBN__ENVELOPE__BODY_RESULT:
      if (in->result->seq == seq && (int)in->result->phase == req->phase) {
        *reply = in;
        return SBN_OK;
      }
      break; /* a stale reply of an abandoned round: skip it */
    case SBN__ENVELOPE__BODY_ERROR:
      /* Errors that concern no round (seq 0, no phase) concern the
       * connection: the job restarted, the coordinator is shutting down. */
      if (in->error->seq == seq || in->error->phase == SBN__PHASE__PHASE_UNSPECIFIED) {
        rc = error_from_reply(in->error);
        sbn__conn_release(in);
        return rc;
      }
      if (in->error->seq > seq && in->error->seq < *counter && !ctx->early.set) {
        /* A round sent after this one already failed: its await gets it. */
        ctx->early.code = error_from_reply(in->error);
        snprintf(ctx->early.msg, sizeof(ctx->early.msg), "%s", sbn_last_error());
        ctx->early.counter = counter;
        ctx->early.seq = in->error->seq;
        ctx->early.set = 1;
      }
      break;
    case SBN__ENVELOPE__BODY_PING: {
      Sbn__Pong pong = SBN__PONG__INIT;
      Sbn__Envelope out = SBN__ENVELOPE__INIT;
      pong.nonce = in->ping->nonce;
      out.body_case = SBN__ENVELOPE__BODY_PONG;
      out.pong = &pong;
      rc = sbn__conn_send(&ctx->conn, &out, deadline);
      if (rc != SBN_OK) {
        sbn__conn_release(in);
        return rc;
      }
      break;
    }
    default: break; /* pong, or something newer than us: ignore */
    }
    sbn__conn_release(in);
  }
}

/* Checks the arguments every round shares. */
static int check_round_args(sbn_group *g, const char *layer, size_t C) {
  if (layer == NULL)
    return sbn__fail(SBN_EINVAL, "layer name is NULL");
  if (C == 0 || C > UINT32_MAX)
    return sbn__fail(SBN_EINVAL, "channel count %zu for layer '%s' is out of range", C, layer);
  if (g != NULL && g->ctx == NULL)
    return sbn__fail(SBN_ESTATE, "group has no context");
  return SBN_OK;
}

/* Copies the reply's arrays after checking they have C values each. */
static int take_pair(const Sbn__Result *r, size_t C, const char *layer, double *a, double *b) {
  if (r->n_a != C || r->n_b != C)
    return sbn__fail(SBN_EPROTO,
                     "coordinator answered layer '%s' with %zu/%zu values, expected %zu", layer,
                     r->n_a, r->n_b, C);
  memcpy(a, r->a, C * sizeof(double));
  memcpy(b, r->b, C * sizeof(double));
  return SBN_OK;
}

SBN_API int sbn_sync_stats(sbn_group *g, const char *layer, size_t C, uint64_t count,
                           const double *mean, const double *m2, uint64_t *gcount, double *gmean,
                           double *gm2) {
  int rc = check_round_args(g, layer, C);
  if (rc != SBN_OK)
    return rc;
  if (mean == NULL || m2 == NULL || gcount == NULL || gmean == NULL || gm2 == NULL)
    return sbn__fail(SBN_EINVAL, "sbn_sync_stats for layer '%s' got a NULL buffer", layer);
  if (sbn__group_is_local(g)) {
    *gcount = count;
    memmove(gmean, mean, C * sizeof(double));
    memmove(gm2, m2, C * sizeof(double));
    return SBN_OK;
  }
  sbn__round_req req = {.phase = SBN__PHASE__PHASE_FORWARD,
                        .layer = layer,
                        .channels = C,
                        .count = count,
                        .a = mean,
                        .b = m2};
  Sbn__Envelope *reply;
  rc = sbn__round(g, &req, &reply);
  if (rc != SBN_OK)
    return rc;
  rc = take_pair(reply->result, C, layer, gmean, gm2);
  if (rc == SBN_OK)
    *gcount = reply->result->count;
  sbn__conn_release(reply);
  return rc;
}

SBN_API int sbn_sync_sums(sbn_group *g, const char *layer, size_t C, const double *a,
                          const double *b, double *gsum_a, double *gsum_b) {
  int rc = check_round_args(g, layer, C);
  if (rc != SBN_OK)
    return rc;
  if (a == NULL || b == NULL || gsum_a == NULL || gsum_b == NULL)
    return sbn__fail(SBN_EINVAL, "sbn_sync_sums for layer '%s' got a NULL buffer", layer);
  if (sbn__group_is_local(g)) {
    memmove(gsum_a, a, C * sizeof(double));
    memmove(gsum_b, b, C * sizeof(double));
    return SBN_OK;
  }
  sbn__round_req req = {
      .phase = SBN__PHASE__PHASE_BACKWARD, .layer = layer, .channels = C, .a = a, .b = b};
  Sbn__Envelope *reply;
  rc = sbn__round(g, &req, &reply);
  if (rc != SBN_OK)
    return rc;
  rc = take_pair(reply->result, C, layer, gsum_a, gsum_b);
  sbn__conn_release(reply);
  return rc;
}

int sbn__group_model_check(sbn_group *g, const char *text, size_t len) {
  if (sbn__group_is_local(g))
    return SBN_OK;
  if (g->ctx == NULL)
    return sbn__fail(SBN_ESTATE, "group has no context");
  sbn__round_req req = {
      .phase = SBN__PHASE__PHASE_MODEL_CHECK, .layer = "model", .blob = text, .blob_len = len};
  Sbn__Envelope *reply;
  int rc = sbn__round(g, &req, &reply);
  sbn__conn_release(reply);
  return rc;
}
