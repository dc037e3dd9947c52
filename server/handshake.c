/*
 * handshake.c - hello and, with a shared secret, the challenge-response that
 * comes before the job checks (common/auth.h describes the exchange).
 *
 * Without a secret a hello goes straight to the job checks in job.c.  With
 * one, the hello is parked on the connection, a Challenge carrying the
 * coordinator's fresh nonce goes out, and only a correct Proof lets the
 * hello through.  Nothing about jobs (names, generations, ranks taken) is
 * revealed to a peer before it has proved it holds the secret, and the hello
 * timeout keeps running until the welcome, so a peer that stalls mid-way is
 * dropped.  Frames stay capped at SBN_SRV_HELLO_MAX_FRAME until the welcome.
 */
#include <string.h>

#include "coord_internal.h"
#include "log.h"
#include "sbn/status.h"

/* How much of an unauthenticated job id a log line quotes. */
#define SBN_SRV_LOG_JOB_QUOTE 64

static void send_challenge(sbn__srv_conn *conn) {
  Sbn__Challenge ch = SBN__CHALLENGE__INIT;
  Sbn__Envelope env = SBN__ENVELOPE__INIT;
  ch.nonce.data = conn->nonce_c;
  ch.nonce.len = SBN_AUTH_NONCE_SIZE;
  env.body_case = SBN__ENVELOPE__BODY_CHALLENGE;
  env.challenge = &ch;
  int rc;
  sbn__srv_wbuf *wb = sbn__srv_wbuf_encode(conn->coord, &env, SBN_MAX_FRAME_CEILING, &rc);
  sbn__srv_conn_send(conn, wb);
  sbn__srv_wbuf_unref(wb);
}

void sbn__srv_hello(sbn__srv_conn *conn, Sbn__Envelope *env) {
  sbn__coord *c = conn->coord;
  const Sbn__Hello *h = env->hello;
  if (!c->auth) {
    uv_timer_stop(&conn->timer);
    sbn__srv_job_hello(conn, h);
    return;
  }
  if (h->protocol_version != SBN_PROTOCOL_VERSION) {
    sbn__srv_reject(conn, SBN_EVERSION,
                    "hello speaks protocol version %u, this coordinator speaks %u",
                    (unsigned)h->protocol_version, SBN_PROTOCOL_VERSION);
    return;
  }
  if (h->nonce.len != SBN_AUTH_NONCE_SIZE) {
    SBN_LOGW("conn %llu %s: authentication failed: rank %u of job '%.*s' holds no shared secret",
             (unsigned long long)conn->id, conn->peer, (unsigned)h->rank, SBN_SRV_LOG_JOB_QUOTE,
             h->job ? h->job : "");
    sbn__srv_reject(conn, SBN_EAUTH,
                    "this coordinator requires a shared secret: give the worker the "
                    "coordinator's secret file with SBN_SECRET_FILE or sbn_config.secret_file");
    return;
  }
  memcpy(conn->nonce_w, h->nonce.data, SBN_AUTH_NONCE_SIZE);
  if (sbn__auth_nonce(conn->nonce_c) != SBN_OK) {
    sbn__srv_reject(conn, SBN_EAUTH, "the coordinator has no random numbers for a challenge");
    return;
  }
  /* Kept until the proof: the hello takes its memory along. */
  conn->hello_env = env;
  sbn__arena_swap(&conn->arena, &conn->hello_arena);
  send_challenge(conn);
}

void sbn__srv_proof(sbn__srv_conn *conn, Sbn__Envelope *env) {
  sbn__coord *c = conn->coord;
  if (!c->auth || conn->hello_env == NULL) {
    sbn__srv_conn_error(conn, SBN_EPROTO, NULL, 0, 0, 0, "",
                        "a proof must answer this coordinator's challenge");
    sbn__srv_conn_close(conn, 1, "proof without a challenge");
    return;
  }
  Sbn__Envelope *he = conn->hello_env;
  const Sbn__Hello *h = he->hello;
  int ok = sbn__auth_check(&c->cfg.secret, SBN_AUTH_WORKER, conn->nonce_w, conn->nonce_c, h->job,
                           h->rank, h->world_size, h->generation, env->proof->proof.data,
                           env->proof->proof.len);
  if (!ok) {
    SBN_LOGW("conn %llu %s: authentication failed: wrong proof for rank %u of job '%.*s'",
             (unsigned long long)conn->id, conn->peer, (unsigned)h->rank, SBN_SRV_LOG_JOB_QUOTE,
             h->job ? h->job : "");
    sbn__srv_reject(conn, SBN_EAUTH,
                    "authentication failed: the proof of rank %u is wrong (the worker's secret "
                    "differs from the coordinator's, or the answer is not for this challenge)",
                    (unsigned)h->rank);
    return;
  }
  conn->authed = 1;
  conn->hello_env = NULL;
  uv_timer_stop(&conn->timer);
  sbn__srv_job_hello(conn, h);
  (void)he;
  sbn__arena_release(&conn->hello_arena);
}
