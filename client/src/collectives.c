/*
 * collectives.c - allreduce, broadcast and barrier through the coordinator.
 *
 * Large buffers travel in chunks of at most SBN_CHUNK_FLOATS values, one
 * round each, so the coordinator's memory per round stays bounded whatever
 * the gradient size.  Small buffers are fused into shared chunks.  Both
 * kinds run through one pipeline (allreduce_list).
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

static sbn__round_req allreduce_req(const float *buf, size_t n, sbn_reduce_op op) {
  sbn__round_req req = {.phase = SBN__PHASE__PHASE_ALLREDUCE, .layer = "allreduce",
                        .channels = n, .count = n, .fvals = buf, .op = (int)op};
  return req;
}

/*
 * The chunks of an allreduce over a list of buffers (sbn_allreduce is the
 * list of one).  A buffer of SBN_CHUNK_FLOATS values or more goes on its
 * own, in slices of SBN_CHUNK_FLOATS sent from the buffer itself;
 * consecutive smaller ones share chunks of at most SBN_CHUNK_FLOATS (tensor
 * fusion), packed into one buffer to be sent.  Empty buffers are skipped.
 * Every member computes the same chunks from the same list of sizes.
 */
typedef struct chunk_list {
  float *const *bufs;
  const size_t *ns;
  size_t k;
  size_t i, off; /* where the next chunk starts */
} chunk_list;

/* n values from bufs[i][off] on, through the next buffers (then off = 0). */
typedef struct chunk {
  size_t i, off, n;
} chunk;

/* The next chunk into *out; 0 when the list is done. */
static int next_chunk(chunk_list *l, chunk *out) {
  while (l->i < l->k && l->ns[l->i] == 0)
    l->i++;
  if (l->i >= l->k)
    return 0;
  const size_t n = l->ns[l->i];
  if (n >= SBN_CHUNK_FLOATS) {
    const size_t take = n - l->off < SBN_CHUNK_FLOATS ? n - l->off : SBN_CHUNK_FLOATS;
    *out = (chunk){l->i, l->off, take};
    if ((l->off += take) == n)
      l->i++, l->off = 0;
    return 1;
  }
  size_t j = l->i, total = 0;
  while (j < l->k && l->ns[j] < SBN_CHUNK_FLOATS && total + l->ns[j] <= SBN_CHUNK_FLOATS)
    total += l->ns[j++];
  *out = (chunk){l->i, 0, total};
  l->i = j;
  return 1;
}

/* True when the chunk lies in one buffer, which can then be sent as it is. */
static int chunk_direct(const chunk_list *l, const chunk *c) {
  return c->n <= l->ns[c->i] - c->off;
}

/* Copies the chunk's values into flat (to_flat) or back out of it. */
static void chunk_copy(const chunk_list *l, const chunk *c, float *flat, int to_flat) {
  size_t i = c->i, off = c->off, done = 0;
  while (done < c->n) {
    size_t take = l->ns[i] - off < c->n - done ? l->ns[i] - off : c->n - done;
    if (take > 0) { /* an empty buffer may be NULL */
      float *buf = l->bufs[i] + off;
      memcpy(to_flat ? flat + done : buf, to_flat ? buf : flat + done, take * sizeof(float));
    }
    done += take;
    i++, off = 0;
  }
}

/*
 * Awaits the allreduce round tx over chunk c and copies its result into
 * the buffers.
 */
static int chunk_take(sbn_group *g, const chunk_list *l, const chunk *c, const sbn__round_tx *tx,
                      sbn_reduce_op op) {
  sbn__round_req req = allreduce_req(NULL, c->n, op);
  Sbn__Envelope *reply;
  int rc = sbn__round_await(g, &req, tx, &reply);
  if (rc != SBN_OK)
    return rc;
  const Sbn__Result *r = reply->result;
  if (r->n_fvals != c->n)
    rc = sbn__fail(SBN_EPROTO, "coordinator answered an allreduce of %zu values with %zu",
                   c->n, r->n_fvals);
  else
    chunk_copy(l, c, r->fvals, 0);
  sbn__conn_release(reply);
  return rc;
}

/*
 * Chunk `first`'s round failed (or could not be sent) with chunks
 * first..sent-1 in flight.  The coordinator fails those at once too when
 * `first` failed (Contribute.ahead): take their answers, so that nothing of
 * this call is left on the connection, and give their sequence numbers back
 * when they failed, so that this rank stays in step with members that had
 * sent fewer chunks (the group never ran those rounds).  The failed chunk's
 * error stays the last error.
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
      *g->seq = tx[j % nslots].seq;
      rewind = 1;
    }
  }
  sbn__fail(SBN_OK, "%s", saved); /* the message only; the caller returns the code */
}

/*
 * The rounds of an allreduce over the list, one per chunk.  With a
 * coordinator that accepts it (Welcome.pipeline), chunk k+1 is sent before
 * chunk k's result is awaited, so its transfer overlaps chunk k's
 * reduction; it goes marked as sent ahead: if chunk k's round fails, the
 * coordinator fails it at once too.  So on an error the chunk in flight is
 * abandoned and the connection is free for the next collective.  Each send
 * completes before the call returns (sbn__round_send), so one packing
 * buffer serves every fused chunk.
 */
static int allreduce_list(sbn_group *g, chunk_list *l, sbn_reduce_op op) {
  enum { SLOTS = SBN_ALLREDUCE_AHEAD_MAX + 1 };
  const size_t nslots = g->ctx->pipeline >= SBN_ALLREDUCE_AHEAD_MAX ? SLOTS : 1;
  sbn__round_tx tx[SLOTS];
  chunk ch[SLOTS];
  float *pack = NULL;
  size_t sent = 0, done = 0;
  int more = 1, rc = SBN_OK;
  for (;;) {
    /* Keep up to nslots chunks in flight. */
    while (more && sent - done < nslots) {
      chunk *c = &ch[sent % nslots];
      if (!(more = next_chunk(l, c)))
        break;
      const float *src = l->bufs[c->i] + c->off;
      if (!chunk_direct(l, c)) {
        if (pack == NULL && (pack = malloc(SBN_CHUNK_BYTES)) == NULL) {
          rc = sbn__fail(SBN_ENOMEM, "out of memory for the fusion buffer");
          goto fail;
        }
        chunk_copy(l, c, pack, 1);
        src = pack;
      }
      sbn__round_req req = allreduce_req(src, c->n, op);
      req.ahead = sent > done; /* an earlier chunk's result is still to come */
      if ((rc = sbn__round_send(g, &req, &tx[sent % nslots])) != SBN_OK)
        goto fail;
      sent++;
    }
    if (done == sent)
      break;
    rc = chunk_take(g, l, &ch[done % nslots], &tx[done % nslots], op);
    done++;
    if (rc != SBN_OK)
      goto fail; /* the chunks after it are abandoned */
  }
  free(pack);
  return SBN_OK;
fail:
  abandon_ahead(g, tx, done, sent, nslots, op);
  free(pack);
  return rc;
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
  chunk_list l = {.bufs = &buf, .ns = &n, .k = 1};
  return allreduce_list(g, &l, op);
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
  chunk_list l = {.bufs = bufs, .ns = ns, .k = k};
  return allreduce_list(g, &l, op);
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
