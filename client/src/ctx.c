/*
 * ctx.c - process set-up: sbn_init() connects and says hello, sbn_finalize()
 * says goodbye.  A world of one never touches the network.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "util.h"

/* The client's own bound on a round when the coordinator's is unknown. */
#define SBN_ROUND_MARGIN_MS 5000
#define SBN_DEFAULT_CONNECT_TIMEOUT_MS 30000
/* How long goodbye may take before we just close. */
#define SBN_GOODBYE_TIMEOUT_MS 1000

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

/* Sends hello and waits for welcome or reject. */
static int handshake(sbn_ctx *ctx, uint64_t deadline_ms) {
  Sbn__Hello hello = SBN__HELLO__INIT;
  Sbn__Envelope env = SBN__ENVELOPE__INIT;
  hello.protocol_version = SBN_PROTOCOL_VERSION;
  hello.job = ctx->job;
  hello.rank = (uint32_t)ctx->rank;
  hello.world_size = (uint32_t)ctx->world_size;
  hello.generation = ctx->generation;
  hello.client_version = (char *)SBN_VERSION_STRING;
  env.body_case = SBN__ENVELOPE__BODY_HELLO;
  env.hello = &hello;
  int rc = sbn__conn_send(&ctx->conn, &env, deadline_ms);
  if (rc != SBN_OK)
    return rc;
  Sbn__Envelope *reply;
  rc = sbn__conn_recv(&ctx->conn, &reply, deadline_ms);
  if (rc == SBN_ETIMEDOUT)
    return sbn__fail(rc, "coordinator did not answer hello in time");
  if (rc != SBN_OK)
    return rc;
  if (reply->body_case == SBN__ENVELOPE__BODY_WELCOME) {
    Sbn__Welcome *w = reply->welcome;
    ctx->conn.max_frame = w->max_frame ? w->max_frame : SBN_MAX_FRAME_DEFAULT;
    ctx->round_timeout_ms = w->round_timeout_ms;
    if (ctx->timeout_ms == 0)
      ctx->timeout_ms = (int)(w->round_timeout_ms + SBN_ROUND_MARGIN_MS);
    sbn__msg_free(reply);
    return SBN_OK;
  }
  if (reply->body_case == SBN__ENVELOPE__BODY_REJECT) {
    int code = reply->reject->code < 0 ? reply->reject->code : SBN_EREJECTED;
    rc = sbn__fail(code, "coordinator rejected rank %d of job '%s': %s", ctx->rank,
                   ctx->job, reply->reject->message);
  } else if (reply->body_case == SBN__ENVELOPE__BODY_ERROR) {
    rc = sbn__fail(reply->error->code < 0 ? reply->error->code : SBN_EPROTO,
                   "coordinator refused hello: %s", reply->error->message);
  } else {
    rc = sbn__fail(SBN_EPROTO, "coordinator answered hello with message type %d",
                   (int)reply->body_case);
  }
  sbn__msg_free(reply);
  return rc;
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
  ctx->world = world;
  if (distributed) {
    uint64_t deadline = sbn__now_ms() + (uint64_t)cfg->connect_timeout_ms;
    rc = sbn__conn_open(&ctx->conn, host, port, deadline);
    if (rc == SBN_OK)
      rc = handshake(ctx, deadline + SBN_ROUND_MARGIN_MS);
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
  if (ctx->conn.fd >= 0) {
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
  free(ctx->lat);
  free(ctx);
  return rc;
}

SBN_API int sbn_rank(const sbn_ctx *ctx) { return ctx ? ctx->rank : 0; }
SBN_API int sbn_world_size(const sbn_ctx *ctx) { return ctx ? ctx->world_size : 1; }
SBN_API int sbn_is_distributed(const sbn_ctx *ctx) {
  return ctx != NULL && ctx->world_size > 1;
}
SBN_API sbn_group *sbn_world(sbn_ctx *ctx) { return ctx ? ctx->world : NULL; }
