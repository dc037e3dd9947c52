/*
 * ctx.c - process set-up: sbn_init() connects and says hello, sbn_finalize()
 * says goodbye.  A world of one never touches the network.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "auth.h"
#include "internal.h"
#include "util.h"

/* The client's own bound on a round when the coordinator's is unknown. */
#define SBN_ROUND_MARGIN_MS 5000
#define SBN_DEFAULT_CONNECT_TIMEOUT_MS 30000
/* How long goodbye may take before we just close. */
#define SBN_GOODBYE_TIMEOUT_MS 1000

/* Forks since the library first made a context, counted in each child (no
 * system call per round, unlike comparing getpid()). */
static atomic_ulong fork_epoch;
static pthread_once_t watch_once = PTHREAD_ONCE_INIT;
static void in_child(void) { atomic_fetch_add_explicit(&fork_epoch, 1, memory_order_relaxed); }
static void watch_forks(void) { pthread_atfork(NULL, NULL, in_child); }

static int forked(const sbn_ctx *ctx) {
  return atomic_load_explicit(&fork_epoch, memory_order_relaxed) != ctx->fork_epoch;
}

int sbn__ctx_forked(const sbn_ctx *ctx) {
  if (!forked(ctx))
    return 0;
  return sbn__fail(SBN_ESTATE,
                   "this context of rank %d belongs to process %ld; process %ld was forked from "
                   "it and cannot use its connection (call sbn_init in the child)",
                   ctx->rank, ctx->owner_pid, (long)getpid());
}

SBN_API void sbn_config_init(sbn_config *cfg) {
  memset(cfg, 0, sizeof(*cfg));
  cfg->job = "default";
  cfg->world_size = 1;
  cfg->connect_timeout_ms = SBN_DEFAULT_CONNECT_TIMEOUT_MS;
}

static int check_config(const sbn_config *cfg) {
  const char *job = cfg->job ? cfg->job : "default";
  if (cfg->world_size < 1 || cfg->world_size > SBN_WORLD_MAX)
    return sbn__fail(SBN_EINVAL, "world size %d is not in 1..%d", cfg->world_size,
                     SBN_WORLD_MAX);
  if (cfg->rank < 0 || cfg->rank >= cfg->world_size)
    return sbn__fail(SBN_EINVAL, "rank %d is not in 0..%d", cfg->rank,
                     cfg->world_size - 1);
  if (job[0] == '\0' || strlen(job) >= SBN_JOB_MAX)
    return sbn__fail(SBN_EINVAL, "job id '%.40s' must have 1 to %d bytes", job,
                     SBN_JOB_MAX - 1);
  if (cfg->connect_timeout_ms < 0 || cfg->timeout_ms < 0 || cfg->spin_us < 0)
    return sbn__fail(SBN_EINVAL, "timeouts and spin time must not be negative");
  return SBN_OK;
}

/* Turns a Reject, an Error or an unexpected message at hello into a status. */
static int hello_refused(sbn_ctx *ctx, const Sbn__Envelope *reply) {
  if (reply->body_case == SBN__ENVELOPE__BODY_REJECT) {
    int code = reply->reject->code < 0 ? reply->reject->code : SBN_EREJECTED;
    return sbn__fail(code, "coordinator rejected rank %d of job '%s': %s", ctx->rank, ctx->job,
                     reply->reject->message);
  }
  if (reply->body_case == SBN__ENVELOPE__BODY_ERROR)
    return sbn__fail(reply->error->code < 0 ? reply->error->code : SBN_EPROTO,
                     "coordinator refused hello: %s", reply->error->message);
  return sbn__fail(SBN_EPROTO, "coordinator answered hello with message type %d",
                   (int)reply->body_case);
}

/* Receives the answer to hello or proof, with a clear message on timeout. */
static int hello_recv(sbn_ctx *ctx, Sbn__Envelope **reply, uint64_t deadline_ms) {
  int rc = sbn__conn_recv(&ctx->conn, reply, deadline_ms);
  if (rc == SBN_ETIMEDOUT)
    return sbn__fail(rc, "coordinator did not answer hello in time");
  return rc;
}

/*
 * Answers the coordinator's challenge with this worker's proof (see
 * common/auth.h) and waits for what follows it.
 */
static int answer_challenge(sbn_ctx *ctx, const sbn__secret *secret, const uint8_t *nonce_w,
                            uint8_t *nonce_c, Sbn__Envelope **reply, uint64_t deadline_ms) {
  const Sbn__Challenge *ch = (*reply)->challenge;
  if (secret == NULL) {
    sbn__conn_release(*reply);
    *reply = NULL;
    return sbn__fail(SBN_EAUTH,
                     "coordinator requires a shared secret and rank %d of job '%s' has none: "
                     "set SBN_SECRET_FILE or sbn_config.secret_file to the coordinator's "
                     "secret file",
                     ctx->rank, ctx->job);
  }
  if (ch->nonce.len != SBN_AUTH_NONCE_SIZE) {
    sbn__conn_release(*reply);
    *reply = NULL;
    return sbn__fail(SBN_EPROTO, "coordinator's challenge has a nonce of %zu bytes, not %u",
                     ch->nonce.len, SBN_AUTH_NONCE_SIZE);
  }
  memcpy(nonce_c, ch->nonce.data, SBN_AUTH_NONCE_SIZE);
  sbn__conn_release(*reply);
  *reply = NULL;
  uint8_t mac[SBN_AUTH_MAC_SIZE];
  if (sbn__auth_proof(secret, SBN_AUTH_WORKER, nonce_w, nonce_c, ctx->job, (uint32_t)ctx->rank,
                      (uint32_t)ctx->world_size, ctx->generation, mac) != SBN_OK)
    return sbn__fail(SBN_EAUTH, "cannot compute the proof for the coordinator");
  Sbn__Proof proof = SBN__PROOF__INIT;
  Sbn__Envelope env = SBN__ENVELOPE__INIT;
  proof.proof.data = mac;
  proof.proof.len = sizeof(mac);
  env.body_case = SBN__ENVELOPE__BODY_PROOF;
  env.proof = &proof;
  int rc = sbn__conn_send(&ctx->conn, &env, deadline_ms);
  if (rc != SBN_OK)
    return rc;
  return hello_recv(ctx, reply, deadline_ms);
}

/*
 * Sends hello and waits for welcome or reject.  With a secret the hello
 * carries this worker's nonce, the coordinator must challenge it, and its
 * welcome must carry the coordinator's proof: a coordinator that does not
 * know the secret is refused, as it refuses workers that do not.
 */
static int handshake(sbn_ctx *ctx, const sbn__secret *secret, uint64_t deadline_ms) {
  Sbn__Hello hello = SBN__HELLO__INIT;
  Sbn__Envelope env = SBN__ENVELOPE__INIT;
  uint8_t nonce_w[SBN_AUTH_NONCE_SIZE], nonce_c[SBN_AUTH_NONCE_SIZE];
  hello.protocol_version = SBN_PROTOCOL_VERSION;
  hello.job = ctx->job;
  hello.rank = (uint32_t)ctx->rank;
  hello.world_size = (uint32_t)ctx->world_size;
  hello.generation = ctx->generation;
  hello.client_version = (char *)SBN_VERSION_STRING;
  if (secret != NULL) {
    if (sbn__auth_nonce(nonce_w) != SBN_OK)
      return sbn__fail(SBN_EAUTH, "no random numbers for the authentication nonce");
    hello.nonce.data = nonce_w;
    hello.nonce.len = SBN_AUTH_NONCE_SIZE;
  }
  env.body_case = SBN__ENVELOPE__BODY_HELLO;
  env.hello = &hello;
  int rc = sbn__conn_send(&ctx->conn, &env, deadline_ms);
  if (rc != SBN_OK)
    return rc;
  Sbn__Envelope *reply;
  rc = hello_recv(ctx, &reply, deadline_ms);
  if (rc != SBN_OK)
    return rc;
  int challenged = 0;
  if (reply->body_case == SBN__ENVELOPE__BODY_CHALLENGE) {
    challenged = 1;
    rc = answer_challenge(ctx, secret, nonce_w, nonce_c, &reply, deadline_ms);
    if (rc != SBN_OK)
      return rc;
  }
  if (reply->body_case != SBN__ENVELOPE__BODY_WELCOME) {
    rc = hello_refused(ctx, reply);
    sbn__conn_release(reply);
    return rc;
  }
  Sbn__Welcome *w = reply->welcome;
  if (secret != NULL &&
      (!challenged ||
       !sbn__auth_check(secret, SBN_AUTH_COORDINATOR, nonce_w, nonce_c, ctx->job,
                        (uint32_t)ctx->rank, (uint32_t)ctx->world_size, ctx->generation,
                        w->proof.data, w->proof.len))) {
    sbn__conn_release(reply);
    return sbn__fail(SBN_EAUTH,
                     challenged ? "coordinator's proof is wrong: it does not hold this worker's "
                                  "secret; refusing it"
                                : "coordinator did not authenticate itself (it runs without "
                                  "--secret-file?); refusing it since this worker has a secret");
  }
  ctx->conn.max_frame = w->max_frame ? w->max_frame : SBN_MAX_FRAME_DEFAULT;
  ctx->round_timeout_ms = w->round_timeout_ms;
  ctx->pipeline = w->pipeline;
  if (ctx->timeout_ms == 0)
    ctx->timeout_ms = (int)(w->round_timeout_ms + SBN_ROUND_MARGIN_MS);
  sbn__conn_release(reply);
  return SBN_OK;
}

SBN_API int sbn_init(const sbn_config *cfg, sbn_ctx **out) {
  if (out == NULL)
    return sbn__fail(SBN_EINVAL, "sbn_init needs somewhere to store the context");
  *out = NULL;
  if (cfg == NULL)
    return sbn__fail(SBN_EINVAL, "sbn_init needs a configuration");
  int rc = check_config(cfg);
  if (rc != SBN_OK)
    return rc;
  char host[SBN_HOST_MAX + 1] = SBN_DEFAULT_HOST;
  int port = SBN_DEFAULT_PORT;
  int distributed = cfg->world_size > 1 && cfg->coordinator != NULL;
  if (cfg->world_size > 1 && cfg->coordinator == NULL)
    return sbn__fail(SBN_EINVAL, "world size %d needs a coordinator address "
                                 "(SBN_COORDINATOR=host:port)",
                     cfg->world_size);
  if (distributed) {
    char err[160];
    if (sbn__parse_hostport(cfg->coordinator, host, &port, err, sizeof(err)) != SBN_OK)
      return sbn__fail(SBN_EINVAL, "coordinator address: %s", err);
    if (port == 0)
      return sbn__fail(SBN_EINVAL, "coordinator address '%s' has port 0",
                       cfg->coordinator);
  }
  pthread_once(&watch_once, watch_forks);
  sbn_ctx *ctx = calloc(1, sizeof(*ctx));
  sbn_group *world = calloc(1, sizeof(*world));
  uint32_t *members = calloc((size_t)cfg->world_size, sizeof(uint32_t));
  if (ctx == NULL || world == NULL || members == NULL) {
    free(ctx);
    free(world);
    free(members);
    return sbn__fail(SBN_ENOMEM, "out of memory creating the context");
  }
  ctx->rank = cfg->rank;
  ctx->world_size = cfg->world_size;
  ctx->owner_pid = (long)getpid();
  ctx->fork_epoch = atomic_load_explicit(&fork_epoch, memory_order_relaxed);
  snprintf(ctx->job, sizeof(ctx->job), "%s", cfg->job ? cfg->job : "default");
  ctx->generation = cfg->generation;
  ctx->timeout_ms = cfg->timeout_ms;
  sbn__conn_init(&ctx->conn);
  ctx->conn.spin_us = cfg->spin_us;
  for (int i = 0; i < cfg->world_size; i++)
    members[i] = (uint32_t)i;
  world->ctx = ctx;
  world->members = members;
  world->n = (size_t)cfg->world_size;
  world->my_index = cfg->rank;
  world->seq = &ctx->world_seq;
  ctx->world = world;
  if (distributed) {
    /* The secret lives on the stack for the handshake only, then is wiped. */
    sbn__secret secret;
    secret.len = 0;
    if (cfg->secret_file != NULL) {
      char err[512];
      rc = sbn__secret_load(cfg->secret_file, &secret, err, sizeof(err));
      if (rc != SBN_OK)
        rc = sbn__fail(rc, "%s", err);
    }
    uint64_t deadline = sbn__now_ms() + (uint64_t)cfg->connect_timeout_ms;
    if (rc == SBN_OK)
      rc = sbn__conn_open(&ctx->conn, host, port, deadline);
    if (rc == SBN_OK)
      rc = handshake(ctx, secret.len > 0 ? &secret : NULL, deadline + SBN_ROUND_MARGIN_MS);
    sbn__secret_wipe(&secret);
    if (rc != SBN_OK) {
      sbn__conn_close(&ctx->conn);
      free(members);
      free(world);
      free(ctx);
      return rc;
    }
  }
  *out = ctx;
  return SBN_OK;
}

SBN_API int sbn_finalize(sbn_ctx *ctx) {
  if (ctx == NULL)
    return SBN_OK;
  int rc = SBN_OK;
  /* In a forked child: the connection is the parent's, so no goodbye (it
   * would end the parent's rank); closing the child's copy of the socket
   * leaves the parent's open. */
  if (ctx->conn.fd >= 0 && !forked(ctx)) {
    Sbn__Goodbye bye = SBN__GOODBYE__INIT;
    Sbn__Envelope env = SBN__ENVELOPE__INIT;
    bye.reason = "finalize";
    env.body_case = SBN__ENVELOPE__BODY_GOODBYE;
    env.goodbye = &bye;
    rc = sbn__conn_send(&ctx->conn, &env, sbn__now_ms() + SBN_GOODBYE_TIMEOUT_MS);
  }
  sbn__conn_close(&ctx->conn);
  free(ctx->world->members);
  free(ctx->world);
  while (ctx->seqs != NULL) {
    sbn__seq_slot *next = ctx->seqs->next;
    free(ctx->seqs);
    ctx->seqs = next;
  }
  free(ctx->lat);
  sbn_tensor_cache_trim(); /* documented in sbn/tensor.h */
  free(ctx);
  return rc;
}

SBN_API int sbn_rank(const sbn_ctx *ctx) { return ctx ? ctx->rank : 0; }
SBN_API int sbn_world_size(const sbn_ctx *ctx) { return ctx ? ctx->world_size : 1; }
SBN_API int sbn_is_distributed(const sbn_ctx *ctx) {
  return ctx != NULL && ctx->world_size > 1;
}
SBN_API sbn_group *sbn_world(sbn_ctx *ctx) { return ctx ? ctx->world : NULL; }
