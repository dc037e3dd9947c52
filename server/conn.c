/*
 * conn.c - one worker connection: reading and framing, message dispatch,
 * shared write buffers, and closing.
 *
 * Every connection reads into its own framer, which checks each frame header
 * before buffering its body, so a malformed or oversized frame costs only that
 * connection.  Writes go out with uv_try_write() first and fall back to a
 * queued uv_write() for what the socket did not take.
 *
 * Bounds: the framer holds at most one frame (cfg.max_frame, or
 * SBN_SRV_HELLO_MAX_FRAME before the welcome) plus one read; the write queue
 * at most cfg.max_queued bytes plus one frame per round the worker may have
 * in flight (1 + SBN_SRV_PIPELINE_DEPTH), past which the worker (which does
 * not read its replies) is disconnected.  A welcomed connection holding
 * part of a frame is closed after cfg.frame_timeout_ms without a byte.
 */
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coord_internal.h"
#include "log.h"
#include "sbn/status.h"

/* How much one read may ask the framer for. */
#define SBN_SRV_READ_CHUNK (64u * 1024u)
/* Keepalive probes after the idle time: a dead peer is found within
 * keepalive + 6 x 10 s. */
#define SBN_SRV_KEEPALIVE_INTERVAL_S 10
#define SBN_SRV_KEEPALIVE_PROBES 6

static void conn_dispatch(sbn__srv_conn *conn, Sbn__Envelope *env);

/* Write buffers */

sbn__srv_wbuf *sbn__srv_wbuf_encode(sbn__coord *c, const Sbn__Envelope *env, uint32_t max_frame,
                                    int *rc) {
  size_t body = sbn__envelope__get_packed_size(env);
  if (body > max_frame) {
    *rc = SBN_ETOOBIG;
    return NULL;
  }
  sbn__srv_wbuf *wb = sbn__srv_pool_wbuf_get(c, SBN_FRAME_HEADER_SIZE + body);
  if (wb == NULL) {
    *rc = SBN_ENOMEM;
    return NULL;
  }
  sbn__frame_header_write(wb->data, (uint32_t)body);
  sbn__envelope__pack(env, wb->data + SBN_FRAME_HEADER_SIZE);
  *rc = SBN_OK;
  return wb;
}

sbn__srv_wbuf *sbn__srv_error_encode(sbn__coord *c, int code, const char *msg, const uint32_t *ranks,
                                     size_t nranks, uint64_t seq, int phase, const char *layer) {
  Sbn__Error e = SBN__ERROR__INIT;
  Sbn__Envelope env = SBN__ENVELOPE__INIT;
  e.code = code;
  e.message = (char *)msg;
  e.ranks = (uint32_t *)ranks;
  e.n_ranks = nranks;
  e.seq = seq;
  e.phase = (Sbn__Phase)phase;
  e.layer = (char *)(layer ? layer : "");
  env.body_case = SBN__ENVELOPE__BODY_ERROR;
  env.error = &e;
  int rc;
  /* Errors are small; the frame ceiling only guards a pathological message. */
  return sbn__srv_wbuf_encode(c, &env, SBN_MAX_FRAME_CEILING, &rc);
}

/* Closing */

static void conn_on_close(uv_handle_t *h) {
  sbn__srv_conn *conn = h->data;
  if (--conn->handles_open > 0)
    return;
  sbn__coord *c = conn->coord;
  if (conn->prev != NULL)
    conn->prev->next = conn->next;
  else
    c->conns = conn->next;
  if (conn->next != NULL)
    conn->next->prev = conn->prev;
  c->nconns--;
  sbn__srv_ready_remove(conn);
  conn->park_env = NULL;
  sbn__framer_release(&conn->rx);
  sbn__arena_release(&conn->arena);
  sbn__arena_release(&conn->hello_arena);
  sbn__arena_release(&conn->park_arena);
  free(conn);
  sbn__http_conn_freed(c);
}

static void conn_close_handles(sbn__srv_conn *conn) {
  if (!uv_is_closing((uv_handle_t *)&conn->tcp))
    uv_close((uv_handle_t *)&conn->tcp, conn_on_close);
  if (!uv_is_closing((uv_handle_t *)&conn->timer))
    uv_close((uv_handle_t *)&conn->timer, conn_on_close);
}

static void conn_on_shutdown(uv_shutdown_t *req, int status) {
  (void)status; /* flushed or not, the connection is done */
  conn_close_handles(req->data);
}

/* The peer did not take what it was sent in time: drop it. */
static void conn_on_flush_timeout(uv_timer_t *t) {
  conn_close_handles(t->data);
}

void sbn__srv_conn_close(sbn__srv_conn *conn, int flush, const char *fmt, ...) {
  if (conn->closing)
    return;
  conn->closing = 1;
  char why[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(why, sizeof(why), fmt, ap);
  va_end(ap);
  if (conn->job != NULL)
    SBN_LOGI("conn %llu %s (rank %u of job '%s') closed: %s", (unsigned long long)conn->id,
             conn->peer, (unsigned)conn->rank, conn->job->name, why);
  else
    SBN_LOGI("conn %llu %s closed: %s", (unsigned long long)conn->id, conn->peer, why);
  /* The rank is lost (or has left) from now on, whatever remains to flush. */
  if (conn->job != NULL)
    sbn__srv_job_conn_gone(conn);
  uv_read_stop((uv_stream_t *)&conn->tcp);
  uv_timer_stop(&conn->timer);
  if (flush) {
    conn->shutdown_req.data = conn;
    if (uv_shutdown(&conn->shutdown_req, (uv_stream_t *)&conn->tcp, conn_on_shutdown) == 0) {
      uv_timer_start(&conn->timer, conn_on_flush_timeout, SBN_SRV_FLUSH_TIMEOUT_MS, 0);
      return;
    }
  }
  conn_close_handles(conn);
}

/* Writing */

static void conn_on_broken(uv_timer_t *t) {
  sbn__srv_conn *conn = t->data;
  sbn__srv_conn_close(conn, 0, "%s", conn->broken_why);
}

/*
 * A write failed.  The close is deferred to the next loop iteration because
 * the sender is usually in the middle of a round's bookkeeping, and closing
 * a connection may fail rounds and free its job.
 */
static void conn_break(sbn__srv_conn *conn, const char *why, int err) {
  if (conn->closing || conn->broken)
    return;
  conn->broken = 1;
  if (err != 0)
    snprintf(conn->broken_why, sizeof(conn->broken_why), "%s: %s", why, uv_strerror(err));
  else
    snprintf(conn->broken_why, sizeof(conn->broken_why), "%s", why);
  uv_read_stop((uv_stream_t *)&conn->tcp);
  uv_timer_stop(&conn->timer);
  uv_timer_start(&conn->timer, conn_on_broken, 0, 0);
}

static sbn__srv_write *write_get(sbn__srv_conn *conn) {
  if (conn->wrec_busy)
    return sbn__srv_pool_write_get(conn->coord);
  conn->wrec_busy = 1;
  return &conn->wrec;
}

static void write_put(sbn__srv_conn *conn, sbn__srv_write *w) {
  if (w == &conn->wrec)
    conn->wrec_busy = 0;
  else
    sbn__srv_pool_write_put(conn->coord, w);
}

static void conn_on_write(uv_write_t *req, int status) {
  sbn__srv_write *w = (sbn__srv_write *)req;
  sbn__srv_conn *conn = req->data;
  conn->queued -= w->len;
  conn->nwrites--;
  if (status == 0)
    conn->coord->metrics.bytes_out += w->len;
  sbn__srv_wbuf_unref(w->wb);
  write_put(conn, w);
  if (status < 0 && status != UV_ECANCELED)
    conn_break(conn, "write failed", status);
}

/*
 * Never closes conn synchronously (see conn_break), so callers may send to
 * many connections in a loop without their job vanishing under them.
 */
void sbn__srv_conn_send(sbn__srv_conn *conn, sbn__srv_wbuf *wb) {
  if (conn->closing || conn->broken)
    return;
  if (wb == NULL) {
    conn_break(conn, "out of memory for a message to it", 0);
    return;
  }
  uv_buf_t buf = uv_buf_init((char *)wb->data, (unsigned)wb->len);
  /* Most replies fit in the socket buffer: then nothing is queued at all. */
  int n = uv_try_write((uv_stream_t *)&conn->tcp, &buf, 1);
  if (n > 0)
    conn->coord->metrics.bytes_out += (uint64_t)n;
  if (n >= 0 && (size_t)n == wb->len)
    return;
  if (n < 0 && n != UV_EAGAIN) {
    conn_break(conn, "write failed", n);
    return;
  }
  size_t off = n > 0 ? (size_t)n : 0;
  uint64_t limit = conn->coord->cfg.max_queued;
  if (conn->nwrites > SBN_SRV_PIPELINE_DEPTH && conn->queued + (wb->len - off) > limit) {
    /*
     * The worker does not read what it is sent.  One frame per round it may
     * have in flight may always be queued, whatever its size, so large
     * replies never fail on their own: a pipelining worker still sending
     * chunk k + 1 reads result k only after it, when result k + 1 may be
     * out already.
     */
    char why[160];
    snprintf(why, sizeof(why),
             "write queue of %llu bytes would exceed the limit of %llu bytes "
             "(the peer does not read its replies)",
             (unsigned long long)(conn->queued + (wb->len - off)), (unsigned long long)limit);
    conn_break(conn, why, 0);
    return;
  }
  sbn__srv_write *w = write_get(conn);
  if (w == NULL) {
    /* Part of a frame may be out already: the stream cannot be saved. */
    conn_break(conn, "out of memory queueing a write", 0);
    return;
  }
  w->wb = wb;
  w->len = wb->len - off;
  w->req.data = conn;
  wb->refs++;
  conn->queued += w->len;
  conn->nwrites++;
  buf = uv_buf_init((char *)wb->data + off, (unsigned)(wb->len - off));
  int rc = uv_write(&w->req, (uv_stream_t *)&conn->tcp, &buf, 1, conn_on_write);
  if (rc != 0) {
    conn->queued -= w->len;
    conn->nwrites--;
    sbn__srv_wbuf_unref(wb);
    write_put(conn, w);
    conn_break(conn, "write failed", rc);
  }
}

void sbn__srv_conn_error(sbn__srv_conn *conn, int code, const uint32_t *ranks, size_t nranks,
                         uint64_t seq, int phase, const char *layer, const char *fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  SBN_LOGW("conn %llu %s: error %s: %s", (unsigned long long)conn->id, conn->peer,
           sbn_strerror(code), msg);
  sbn__obs_proto_error(conn->coord, code);
  sbn__srv_wbuf *wb =
      sbn__srv_error_encode(conn->coord, code, msg, ranks, nranks, seq, phase, layer);
  sbn__srv_conn_send(conn, wb);
  sbn__srv_wbuf_unref(wb);
}

/* Reading */

static void conn_on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  sbn__srv_conn *conn = h->data;
  uint8_t *space = NULL;
  (void)suggested;
  long room = sbn__framer_space(&conn->rx, SBN_SRV_READ_CHUNK, &space);
  /* A zero-length buffer makes libuv report UV_ENOBUFS to the read callback. */
  *buf = uv_buf_init(room > 0 ? (char *)space : NULL, room > 0 ? (unsigned)room : 0);
}

void sbn__srv_conn_unpark(sbn__srv_conn *conn) {
  sbn__srv_ready_remove(conn);
  Sbn__Envelope *env = conn->park_env;
  if (env == NULL)
    return;
  conn->park_env = NULL;
  if (conn->closing || conn->job == NULL) {
    sbn__arena_reset(&conn->park_arena);
    return;
  }
  /* conn->arena is empty between dispatches: the parked memory takes its
   * place, exactly as if the message had just been decoded. */
  sbn__arena_swap(&conn->arena, &conn->park_arena);
  sbn__srv_contribute(conn, env);
  sbn__arena_reset(&conn->arena);
}

/*
 * An allreduce contribution decoded in place has its values in the receive
 * buffer: that buffer goes along with the message in conn->arena (as its
 * block), so the values live exactly as long as the rest of the message,
 * wherever the handler files it (a round's slot, the park), and the reader
 * goes on in the arena's spare block.  Without memory for that, the values
 * are copied into the arena instead.  SBN_OK or SBN_ENOMEM.
 */
static int keep_in_place(sbn__srv_conn *conn, Sbn__Envelope *env) {
  if (env->body_case != SBN__ENVELOPE__BODY_CONTRIBUTE || env->contribute->n_fvals == 0)
    return SBN_OK;
  Sbn__Contribute *m = env->contribute;
  const uintptr_t p = (uintptr_t)m->fvals, rx = (uintptr_t)conn->rx.buf;
  if (rx == 0 || p < rx || p - rx >= conn->rx.cap) {
    conn->coord->metrics.fvals_copied++;
    return SBN_OK; /* decoded by copy: already in the arena */
  }
  if (sbn__framer_swap_buf(&conn->rx, &conn->arena.block, &conn->arena.block_cap) == SBN_OK) {
    conn->arena.block_used = 1;
    conn->coord->metrics.fvals_in_place++;
    return SBN_OK;
  }
  ProtobufCAllocator pa = sbn__arena_allocator(&conn->arena);
  float *copy = pa.alloc(pa.allocator_data, m->n_fvals * sizeof(float));
  if (copy == NULL)
    return SBN_ENOMEM;
  memcpy(copy, m->fvals, m->n_fvals * sizeof(float));
  m->fvals = copy;
  conn->coord->metrics.fvals_copied++;
  return SBN_OK;
}

/* Hands every whole frame held to the dispatcher, stopping when one closes us. */
static void conn_drain(sbn__srv_conn *conn) {
  while (!conn->closing) {
    /* A parked message whose round has ended goes before anything newer. */
    if (conn->park_env != NULL && conn->round == NULL)
      sbn__srv_conn_unpark(conn);
    if (conn->closing)
      return;
    const uint8_t *body;
    size_t len;
    int rc = sbn__framer_next(&conn->rx, &body, &len);
    if (rc == 0)
      return;
    if (rc < 0) {
      sbn__srv_conn_error(conn, rc, NULL, 0, 0, 0, "", "%s", conn->rx.errmsg);
      sbn__srv_conn_close(conn, 1, "frame error: %s", conn->rx.errmsg);
      return;
    }
    char err[160];
    ProtobufCAllocator pa = sbn__arena_allocator(&conn->arena);
    Sbn__Envelope *env = sbn__msg_decode_tail(&pa, body, len, err, sizeof(err));
    if (env == NULL && conn->arena.failed) {
      sbn__arena_reset(&conn->arena);
      sbn__srv_conn_error(conn, SBN_ENOMEM, NULL, 0, 0, 0, "", "out of memory for a message");
      sbn__srv_conn_close(conn, 1, "out of memory decoding a message of %zu bytes", len);
      return;
    }
    if (env == NULL) {
      sbn__arena_reset(&conn->arena);
      sbn__srv_conn_error(conn, SBN_EPROTO, NULL, 0, 0, 0, "", "%s", err);
      sbn__srv_conn_close(conn, 1, "bad message: %s", err);
      return;
    }
    if (keep_in_place(conn, env) != SBN_OK) {
      sbn__arena_reset(&conn->arena);
      sbn__srv_conn_error(conn, SBN_ENOMEM, NULL, 0, 0, 0, "", "out of memory for a message");
      sbn__srv_conn_close(conn, 1, "out of memory for a message of %zu bytes", len);
      return;
    }
    conn_dispatch(conn, env);
    /* Whatever the handler did not take (by swapping arenas) goes now. */
    sbn__arena_reset(&conn->arena);
  }
}

static void conn_on_stalled(uv_timer_t *t) {
  sbn__srv_conn *conn = t->data;
  unsigned ms = conn->coord->cfg.frame_timeout_ms;
  size_t held = sbn__framer_pending(&conn->rx);
  sbn__srv_conn_error(conn, SBN_ETIMEDOUT, NULL, 0, 0, 0, "",
                      "%zu bytes of an unfinished frame and nothing more within %u ms", held, ms);
  sbn__srv_conn_close(conn, 1, "stalled in the middle of a frame (%zu bytes held for %u ms)", held,
                      ms);
}

static void conn_on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  sbn__srv_conn *conn = s->data;
  (void)buf;
  if (nread == 0)
    return; /* EAGAIN; the buffer is handed back untouched */
  if (nread == UV_EOF) {
    sbn__srv_conn_close(conn, 0, conn->said_goodbye ? "goodbye" : "peer closed the connection");
    return;
  }
  if (nread == UV_ENOBUFS) {
    sbn__srv_conn_close(conn, 0, "no room to read a frame (out of memory)");
    return;
  }
  if (nread < 0) {
    sbn__srv_conn_close(conn, 0, "read failed: %s", uv_strerror((int)nread));
    return;
  }
  conn->coord->metrics.bytes_in += (uint64_t)nread;
  sbn__framer_commit(&conn->rx, (size_t)nread);
  conn_drain(conn);
  /*
   * Before the welcome the hello timeout bounds everything.  After it, a
   * peer that stops in the middle of a frame is stalled or half-open: the
   * timer restarts with every read while part of a frame is held.
   */
  if (conn->welcomed && !conn->closing && !conn->broken) {
    if (sbn__framer_pending(&conn->rx) > 0)
      uv_timer_start(&conn->timer, conn_on_stalled, conn->coord->cfg.frame_timeout_ms, 0);
    else
      uv_timer_stop(&conn->timer);
  }
}

static void conn_on_hello_timeout(uv_timer_t *t) {
  sbn__srv_conn *conn = t->data;
  unsigned ms = conn->coord->cfg.hello_timeout_ms;
  const char *what = conn->hello_env != NULL ? "no proof" : "no hello";
  sbn__srv_conn_error(conn, SBN_ETIMEDOUT, NULL, 0, 0, 0, "", "%s within %u ms", what, ms);
  sbn__srv_conn_close(conn, 1, "%s within %u ms", what, ms);
}

/* Dispatch */

static const char *body_name(int body_case) {
  switch (body_case) {
  case SBN__ENVELOPE__BODY_HELLO: return "hello";
  case SBN__ENVELOPE__BODY_WELCOME: return "welcome";
  case SBN__ENVELOPE__BODY_REJECT: return "reject";
  case SBN__ENVELOPE__BODY_CONTRIBUTE: return "contribute";
  case SBN__ENVELOPE__BODY_RESULT: return "result";
  case SBN__ENVELOPE__BODY_ERROR: return "error";
  case SBN__ENVELOPE__BODY_PING: return "ping";
  case SBN__ENVELOPE__BODY_PONG: return "pong";
  case SBN__ENVELOPE__BODY_GOODBYE: return "goodbye";
  case SBN__ENVELOPE__BODY_CHALLENGE: return "challenge";
  case SBN__ENVELOPE__BODY_PROOF: return "proof";
  default: return "unknown";
  }
}

/* Borrows env (see coord_internal.h). */
static void conn_dispatch(sbn__srv_conn *conn, Sbn__Envelope *env) {
  int kind = env->body_case;
  if (kind == SBN__ENVELOPE__BODY_HELLO) {
    if (conn->welcomed || conn->job != NULL || conn->hello_env != NULL) {
      sbn__srv_conn_error(conn, SBN_EPROTO, NULL, 0, 0, 0, "", "second hello on a connection");
      sbn__srv_conn_close(conn, 1, "second hello");
    } else {
      sbn__srv_hello(conn, env);
    }
    return;
  }
  if (kind == SBN__ENVELOPE__BODY_PROOF && !conn->welcomed) {
    sbn__srv_proof(conn, env);
    return;
  }
  if (!conn->welcomed) {
    sbn__srv_conn_error(conn, SBN_EPROTO, NULL, 0, 0, 0, "", "expected hello, got %s",
                        body_name(kind));
    sbn__srv_conn_close(conn, 1, "%s before hello", body_name(kind));
    return;
  }
  switch (kind) {
  case SBN__ENVELOPE__BODY_CONTRIBUTE:
    sbn__srv_contribute(conn, env);
    return;
  case SBN__ENVELOPE__BODY_PING: {
    Sbn__Pong pong = SBN__PONG__INIT;
    Sbn__Envelope out = SBN__ENVELOPE__INIT;
    pong.nonce = env->ping->nonce;
    out.body_case = SBN__ENVELOPE__BODY_PONG;
    out.pong = &pong;
    int rc;
    sbn__srv_wbuf *wb = sbn__srv_wbuf_encode(conn->coord, &out, SBN_MAX_FRAME_CEILING, &rc);
    if (wb == NULL)
      sbn__srv_conn_close(conn, 0, "cannot answer ping: %s", sbn_strerror(rc));
    sbn__srv_conn_send(conn, wb);
    sbn__srv_wbuf_unref(wb);
    break;
  }
  case SBN__ENVELOPE__BODY_PONG:
    break; /* an answer to a liveness probe: receiving it was the point */
  case SBN__ENVELOPE__BODY_GOODBYE:
    conn->said_goodbye = 1;
    sbn__srv_conn_close(conn, 1, "goodbye%s%s",
                        env->goodbye->reason && env->goodbye->reason[0] ? ": " : "",
                        env->goodbye->reason ? env->goodbye->reason : "");
    break;
  default:
    sbn__srv_conn_error(conn, SBN_EPROTO, NULL, 0, 0, 0, "", "a worker must not send %s",
                        body_name(kind));
    sbn__srv_conn_close(conn, 1, "sent %s, which only the coordinator sends", body_name(kind));
    break;
  }
}

/* Accepting */

static void format_peer(uv_tcp_t *tcp, char *out, size_t len) {
  struct sockaddr_storage ss;
  int sl = sizeof(ss);
  char ip[INET6_ADDRSTRLEN] = "?";
  int port = 0;
  snprintf(out, len, "?");
  if (uv_tcp_getpeername(tcp, (struct sockaddr *)&ss, &sl) != 0)
    return;
  if (ss.ss_family == AF_INET) {
    struct sockaddr_in *a = (struct sockaddr_in *)&ss;
    uv_ip4_name(a, ip, sizeof(ip));
    port = ntohs(a->sin_port);
    snprintf(out, len, "%s:%d", ip, port);
  } else if (ss.ss_family == AF_INET6) {
    struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
    uv_ip6_name(a, ip, sizeof(ip));
    port = ntohs(a->sin6_port);
    snprintf(out, len, "[%s]:%d", ip, port);
  }
}

/*
 * TCP keepalive: the kernel probes an idle connection after idle_s seconds,
 * then every SBN_SRV_KEEPALIVE_INTERVAL_S, and reports it dead after
 * SBN_SRV_KEEPALIVE_PROBES unanswered probes.  A live worker's kernel
 * answers the probes even while the worker computes for minutes (or is
 * stopped), so only vanished hosts and broken paths are dropped.
 */
static void conn_keepalive(sbn__srv_conn *conn, unsigned idle_s) {
  int rc = uv_tcp_keepalive(&conn->tcp, 1, idle_s);
#if defined(TCP_KEEPINTVL) && defined(TCP_KEEPCNT)
  uv_os_fd_t fd;
  if (rc == 0 && uv_fileno((uv_handle_t *)&conn->tcp, &fd) == 0) {
    int intvl = SBN_SRV_KEEPALIVE_INTERVAL_S, cnt = SBN_SRV_KEEPALIVE_PROBES;
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl));
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt));
  }
#endif
  if (rc != 0)
    SBN_LOGW("conn %llu %s: TCP keepalive failed: %s", (unsigned long long)conn->id, conn->peer,
             uv_strerror(rc));
}

static void refuser_on_close(uv_handle_t *h) {
  sbn__srv_refuser *r = h->data;
  r->busy = 0;
  if (r->again && !uv_is_closing((uv_handle_t *)r->listener)) {
    r->again = 0;
    r->retry(r->listener, 0);
  }
}

void sbn__srv_refuse(sbn__srv_refuser *r, uv_stream_t *listener, uv_connection_cb retry) {
  r->listener = listener;
  r->retry = retry;
  if (r->busy) {
    r->again = 1; /* refuser_on_close comes back for it */
    return;
  }
  uv_tcp_init(listener->loop, &r->tcp);
  r->tcp.data = r;
  r->busy = 1;
  int rc = uv_accept(listener, (uv_stream_t *)&r->tcp);
  if (rc != 0)
    SBN_LOGW("accept failed: %s", uv_strerror(rc));
  uv_close((uv_handle_t *)&r->tcp, refuser_on_close);
}

int sbn__srv_conn_accept(sbn__coord *c) {
  sbn__srv_conn *conn = calloc(1, sizeof(*conn));
  if (conn == NULL)
    return SBN_ENOMEM;
  conn->coord = c;
  conn->id = ++c->next_conn_id;
  c->nconns++;
  c->metrics.accepted++;
  conn->tcp.data = conn;
  conn->timer.data = conn;
  sbn__framer_init(&conn->rx, SBN_SRV_HELLO_MAX_FRAME < c->cfg.max_frame ? SBN_SRV_HELLO_MAX_FRAME
                                                                         : c->cfg.max_frame);
  sbn__arena_init(&conn->arena, SBN_SRV_ARENA_KEEP_MAX);
  sbn__arena_init(&conn->hello_arena, 0);
  sbn__arena_init(&conn->park_arena, SBN_SRV_ARENA_KEEP_MAX);
  uv_tcp_init(c->loop, &conn->tcp);
  uv_timer_init(c->loop, &conn->timer);
  conn->handles_open = 2;
  conn->next = c->conns;
  if (c->conns != NULL)
    c->conns->prev = conn;
  c->conns = conn;
  int rc = uv_accept((uv_stream_t *)&c->listener, (uv_stream_t *)&conn->tcp);
  if (rc != 0) {
    SBN_LOGW("accept failed: %s", uv_strerror(rc));
    conn->closing = 1;
    conn_close_handles(conn);
    return SBN_OK;
  }
  format_peer(&conn->tcp, conn->peer, sizeof(conn->peer));
  /* Rounds are latency bound: never let Nagle hold a reply back. */
  rc = uv_tcp_nodelay(&conn->tcp, 1);
  if (rc != 0)
    SBN_LOGW("conn %llu %s: TCP_NODELAY failed: %s", (unsigned long long)conn->id, conn->peer,
             uv_strerror(rc));
  if (c->cfg.keepalive_s > 0)
    conn_keepalive(conn, c->cfg.keepalive_s);
  SBN_LOGI("conn %llu accepted from %s", (unsigned long long)conn->id, conn->peer);
  if (c->nconns > c->cfg.max_conns) {
    /* Accepted all the same, so the refusal is an answer and not a hang. */
    sbn__srv_conn_error(conn, SBN_ELIMIT, NULL, 0, 0, 0, "",
                        "the coordinator has reached its limit of %u connections",
                        (unsigned)c->cfg.max_conns);
    sbn__srv_conn_close(conn, 1, "over the limit of %u connections", (unsigned)c->cfg.max_conns);
    return SBN_OK;
  }
  uv_timer_start(&conn->timer, conn_on_hello_timeout, c->cfg.hello_timeout_ms, 0);
  rc = uv_read_start((uv_stream_t *)&conn->tcp, conn_on_alloc, conn_on_read);
  if (rc != 0)
    sbn__srv_conn_close(conn, 0, "cannot read: %s", uv_strerror(rc));
  return SBN_OK;
}
