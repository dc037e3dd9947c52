/*
 * collectives.c - allreduce, broadcast and barrier through the coordinator.
 *
 * Large buffers travel in chunks of at most SBN_CHUNK_FLOATS values, one
 * round each, so the coordinator's memory per round stays bounded whatever
 * the gradient size.  Small buffers are fused into shared chunks.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/*
 * Allreduce rounds a worker sends ahead of the one it awaits, at most: the
 * coordinator's Welcome says how many it accepts (0 from older ones).
 */
#define SBN_ALLREDUCE_AHEAD_MAX 1u

static sbn__round_req allreduce_req(float *buf, size_t n, sbn_reduce_op op) {
  sbn__round_req req = {.phase = SBN__PHASE__PHASE_ALLREDUCE, .layer = "allreduce",
                        .channels = n, .count = n, .fvals = buf, .op = (int)op};
  return req;
}

/* Awaits the allreduce round tx over buf[0..n) and copies its result in. */
static int allreduce_take(sbn_group *g, const sbn__round_tx *tx, float *buf, size_t n,
                          sbn_reduce_op op) {
  sbn__round_req req = allreduce_req(buf, n, op);
  Sbn__Envelope *reply;
  int rc = sbn__round_await(g, &req, tx, &reply);
  if (rc != SBN_OK)
    return rc;
  const Sbn__Result *r = reply->result;
  if (r->n_fvals != n) {
    rc = sbn__fail(SBN_EPROTO, "coordinator answered an allreduce of %zu values with %zu",
                   n, r->n_fvals);
  } else {
    memcpy(buf, r->fvals, n * sizeof(float));
  }
  sbn__conn_release(reply);
  return rc;
}

/* One allreduce round over buf[0..n), n <= SBN_CHUNK_FLOATS. */
static int allreduce_chunk(sbn_group *g, float *buf, size_t n, sbn_reduce_op op) {
  sbn__round_req req = allreduce_req(buf, n, op);
  sbn__round_tx tx = {0};
  int rc = sbn__round_send(g, &req, &tx);
  return rc == SBN_OK ? allreduce_take(g, &tx, buf, n, op) : rc;
}

/*
 * Chunk `first`'s round failed with chunks first..sent-1 sent ahead of it.
 * The coordinator fails those at once too (Contribute.ahead): take their
 * answers, so that nothing of this call is left on the connection, and
 * give their sequence numbers back when they failed, so that this rank
 * stays in step with members that had sent fewer chunks (the group never
 * ran those rounds).  The failed chunk's error stays the last error.
 */
static void abandon_ahead(sbn_group *g, const sbn__round_tx *tx, size_t first, size_t sent,
                          size_t nslots, sbn_reduce_op op) {
  if (first >= sent)
    return;
  char saved[512];
  snprintf(saved, sizeof(saved), "%s", sbn_last_error());
  int rewind = 0;
  for (size_t j = first; j < sent; j++) {
    sbn__round_req req = allreduce_req(NULL, 0, op);
    Sbn__Envelope *reply = NULL;
    int rc = sbn__round_await(g, &req, &tx[j % nslots], &reply);
    sbn__conn_release(reply);
    if (rc != SBN_OK && !rewind && g->ctx->conn.fd >= 0) {
      g->seq = tx[j % nslots].seq;
      rewind = 1;
    }
  }
  sbn__fail(SBN_OK, "%s", saved); /* the message only; the caller returns the code */
}

/*
 * Chunks of SBN_CHUNK_FLOATS in a pipeline: chunk k+1 is sent before chunk
 * k's result is awaited, so its transfer overlaps chunk k's reduction.  It
 * goes marked as sent ahead: if chunk k's round fails, the coordinator
 * fails it at once too.  So on an error the chunk in flight is abandoned
 * (its error reply is skipped as stale by the group's next round) and the
 * connection is free for the next collective.
 */
static int allreduce_pipelined(sbn_group *g, float *buf, size_t n, sbn_reduce_op op) {
  sbn__round_tx tx[SBN_ALLREDUCE_AHEAD_MAX + 1];
  size_t off[SBN_ALLREDUCE_AHEAD_MAX + 1], len[SBN_ALLREDUCE_AHEAD_MAX + 1];
  size_t sent = 0, done = 0, nslots = SBN_ALLREDUCE_AHEAD_MAX + 1, pos = 0;
  while (done * SBN_CHUNK_FLOATS < n) {
    /* Keep up to nslots chunks in flight. */
    while (pos < n && sent - done < nslots) {
      size_t k = n - pos < SBN_CHUNK_FLOATS ? n - pos : SBN_CHUNK_FLOATS;
      size_t s = sent % nslots;
      sbn__round_req req = allreduce_req(buf + pos, k, op);
      req.ahead = sent > done; /* an earlier chunk's result is still to come */
      int rc = sbn__round_send(g, &req, &tx[s]);
      if (rc != SBN_OK)
        return rc;
      off[s] = pos;
      len[s] = k;
      pos += k;
      sent++;
    }
    size_t s = done % nslots;
    int rc = allreduce_take(g, &tx[s], buf + off[s], len[s], op);
    if (rc != SBN_OK) {
      abandon_ahead(g, tx, done + 1, sent, nslots, op);
      return rc;
    }
    done++;
  }
  return SBN_OK;
}

static int check_op(sbn_reduce_op op) {
  if (op != SBN_REDUCE_SUM && op != SBN_REDUCE_MEAN)
    return sbn__fail(SBN_EINVAL, "reduce op %d is neither SBN_REDUCE_SUM nor SBN_REDUCE_MEAN",
                     (int)op);
  return SBN_OK;
}

SBN_API int sbn_allreduce(sbn_group *g, float *buf, size_t n, sbn_reduce_op op) {
  int rc = check_op(op);
  if (rc != SBN_OK)
    return rc;
  if (buf == NULL && n > 0)
    return sbn__fail(SBN_EINVAL, "sbn_allreduce got a NULL buffer of %zu values", n);
  if (sbn__group_is_local(g) || n == 0)
    return SBN_OK; /* the sum and the mean over one member are the values */
  if (n > SBN_CHUNK_FLOATS && g->ctx->pipeline >= 1)
    return allreduce_pipelined(g, buf, n, op);
  for (size_t off = 0; off < n; off += SBN_CHUNK_FLOATS) {
    size_t k = n - off < SBN_CHUNK_FLOATS ? n - off : SBN_CHUNK_FLOATS;
    rc = allreduce_chunk(g, buf + off, k, op);
    if (rc != SBN_OK)
      return rc;
  }
  return SBN_OK;
}

SBN_API int sbn_allreduce_many(sbn_group *g, float *const *bufs, const size_t *ns,
                               size_t k, sbn_reduce_op op) {
  int rc = check_op(op);
  if (rc != SBN_OK)
    return rc;
  if (k > 0 && (bufs == NULL || ns == NULL))
    return sbn__fail(SBN_EINVAL, "sbn_allreduce_many got a NULL list");
  for (size_t i = 0; i < k; i++)
    if (bufs[i] == NULL && ns[i] > 0)
      return sbn__fail(SBN_EINVAL, "sbn_allreduce_many: buffer %zu is NULL", i);
  if (sbn__group_is_local(g))
    return SBN_OK;
  float *pack = NULL;
  size_t i = 0;
  while (i < k) {
    /* A buffer of a chunk or more goes on its own, in place. */
    if (ns[i] >= SBN_CHUNK_FLOATS) {
      rc = sbn_allreduce(g, bufs[i], ns[i], op);
      if (rc != SBN_OK)
        break;
      i++;
      continue;
    }
    /* Otherwise fuse consecutive small buffers into one chunk. */
    size_t j = i, total = 0;
    while (j < k && ns[j] < SBN_CHUNK_FLOATS && total + ns[j] <= SBN_CHUNK_FLOATS)
      total += ns[j++];
    if (pack == NULL && (pack = malloc(SBN_CHUNK_BYTES)) == NULL) {
      rc = sbn__fail(SBN_ENOMEM, "out of memory for the fusion buffer");
      break;
    }
    size_t off = 0;
    for (size_t t = i; t < j; t++) {
      memcpy(pack + off, bufs[t], ns[t] * sizeof(float));
      off += ns[t];
    }
    rc = total ? allreduce_chunk(g, pack, total, op) : SBN_OK;
    if (rc != SBN_OK)
      break;
    off = 0;
    for (size_t t = i; t < j; t++) {
      memcpy(bufs[t], pack + off, ns[t] * sizeof(float));
      off += ns[t];
    }
    i = j;
  }
  free(pack);
  return rc;
}

SBN_API int sbn_broadcast(sbn_group *g, void *buf, size_t len, int root) {
  if (buf == NULL && len > 0)
    return sbn__fail(SBN_EINVAL, "sbn_broadcast got a NULL buffer of %zu bytes", len);
  if (root < 0 || root >= sbn_group_size(g))
    return sbn__fail(SBN_EINVAL, "broadcast root %d is not a group rank (group of %d)",
                     root, sbn_group_size(g));
  if (sbn__group_is_local(g))
    return SBN_OK;
  int is_root = g->my_index == root;
  uint8_t *p = buf;
  size_t off = 0;
  do {
    size_t k = len - off < SBN_CHUNK_BYTES ? len - off : SBN_CHUNK_BYTES;
    sbn__round_req req = {.phase = SBN__PHASE__PHASE_BROADCAST, .layer = "broadcast",
                          .channels = k, .root = (uint32_t)root,
                          .blob = is_root ? p + off : NULL, .blob_len = is_root ? k : 0};
    Sbn__Envelope *reply;
    int rc = sbn__round(g, &req, &reply);
    if (rc != SBN_OK)
      return rc;
    const Sbn__Result *r = reply->result;
    if (r->blob.len != k) {
      rc = sbn__fail(SBN_EMISMATCH,
                     "broadcast from group rank %d carried %zu bytes, this rank expected %zu",
                     root, r->blob.len, k);
      sbn__conn_release(reply);
      return rc;
    }
    if (!is_root)
      memcpy(p + off, r->blob.data, k);
    sbn__conn_release(reply);
    off += k;
  } while (off < len);
  return SBN_OK;
}

SBN_API int sbn_barrier(sbn_group *g) {
  if (sbn__group_is_local(g))
    return SBN_OK;
  sbn__round_req req = {.phase = SBN__PHASE__PHASE_BARRIER, .layer = "barrier"};
  Sbn__Envelope *reply;
  int rc = sbn__round(g, &req, &reply);
  sbn__conn_release(reply);
  return rc;
}
