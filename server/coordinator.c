/*
 * coordinator.c - the server object: configuration, the listening socket,
 * and the clean shutdown.
 */
#include "coordinator.h"

#include <stdio.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "coord_internal.h"
#include "log.h"
#include "sbn/status.h"

/* Pending connections the kernel may hold for us. */
#define SBN_SRV_BACKLOG 511

void sbn__coord_config_init(sbn__coord_config *cfg) {
  memset(cfg, 0, sizeof(*cfg));
  snprintf(cfg->host, sizeof(cfg->host), "%s", SBN_DEFAULT_HOST);
  cfg->port = SBN_DEFAULT_PORT;
  cfg->round_timeout_ms = SBN_COORD_ROUND_TIMEOUT_DEFAULT_MS;
  cfg->hello_timeout_ms = SBN_COORD_HELLO_TIMEOUT_DEFAULT_MS;
  cfg->max_frame = SBN_MAX_FRAME_DEFAULT;
  cfg->frame_timeout_ms = SBN_COORD_FRAME_TIMEOUT_DEFAULT_MS;
  cfg->keepalive_s = SBN_COORD_KEEPALIVE_DEFAULT_S;
  cfg->max_conns = SBN_COORD_MAX_CONNS_DEFAULT;
  cfg->max_jobs = SBN_COORD_MAX_JOBS_DEFAULT;
  cfg->max_groups = SBN_COORD_MAX_GROUPS_DEFAULT;
  cfg->max_channels = SBN_MAX_CHANNELS;
  cfg->max_rounds = SBN_COORD_MAX_ROUNDS_DEFAULT;
  cfg->max_queued = SBN_COORD_MAX_QUEUED_DEFAULT;
  snprintf(cfg->metrics_host, sizeof(cfg->metrics_host), "%s", SBN_DEFAULT_HOST);
  cfg->metrics_port = -1;
  cfg->stall_warn_ms = SBN_COORD_STALL_WARN_AUTO;
  cfg->flight_rounds = SBN_COORD_FLIGHT_ROUNDS_DEFAULT;
}

int sbn__coord_new(uv_loop_t *loop, const sbn__coord_config *cfg, sbn__coord **out) {
  *out = NULL;
  if (cfg->max_frame < SBN_MAX_FRAME_FLOOR || cfg->max_frame > SBN_MAX_FRAME_CEILING) {
    SBN_LOGE("max frame %u is outside [%u, %u]", (unsigned)cfg->max_frame, SBN_MAX_FRAME_FLOOR,
             SBN_MAX_FRAME_CEILING);
    return SBN_EINVAL;
  }
  if (cfg->max_conns == 0 || cfg->max_jobs == 0 || cfg->max_groups == 0 ||
      cfg->max_rounds == 0 || cfg->max_channels == 0 || cfg->max_channels > SBN_MAX_CHANNELS ||
      cfg->max_queued < SBN_COORD_MAX_QUEUED_FLOOR) {
    SBN_LOGE("a limit is out of range (connections, jobs, groups, rounds at least 1; "
             "channels 1 to %u; queued bytes at least %llu)",
             SBN_MAX_CHANNELS, (unsigned long long)SBN_COORD_MAX_QUEUED_FLOOR);
    return SBN_EINVAL;
  }
  if (cfg->secret.len != 0 && cfg->secret.len < SBN_SECRET_MIN) {
    SBN_LOGE("the shared secret has fewer than %u bytes", SBN_SECRET_MIN);
    return SBN_EINVAL;
  }
  if (cfg->round_timeout_ms == 0 || cfg->hello_timeout_ms == 0 || cfg->frame_timeout_ms == 0) {
    SBN_LOGE("timeouts must be at least 1 ms");
    return SBN_EINVAL;
  }
  if (cfg->port < 0 || cfg->port > 65535 || cfg->metrics_port < -1 || cfg->metrics_port > 65535) {
    SBN_LOGE("port %d (metrics %d) is outside [0, 65535]", cfg->port, cfg->metrics_port);
    return SBN_EINVAL;
  }
  if (cfg->spin_us > SBN_COORD_SPIN_MAX_US) {
    SBN_LOGE("spinning %u us is more than %u us", (unsigned)cfg->spin_us, SBN_COORD_SPIN_MAX_US);
    return SBN_EINVAL;
  }
  if (cfg->flight_rounds > SBN_COORD_FLIGHT_ROUNDS_MAX) {
    SBN_LOGE("flight recorder of %u rounds is more than %u", (unsigned)cfg->flight_rounds,
             SBN_COORD_FLIGHT_ROUNDS_MAX);
    return SBN_EINVAL;
  }
  sbn__coord *c = calloc(1, sizeof(*c));
  if (c == NULL) {
    SBN_LOGE("out of memory creating the coordinator");
    return SBN_ENOMEM;
  }
  c->loop = loop;
  c->cfg = *cfg;
  c->auth = cfg->secret.len > 0;
  if (c->cfg.stall_warn_ms == SBN_COORD_STALL_WARN_AUTO)
    c->cfg.stall_warn_ms = c->cfg.round_timeout_ms / 2;
  c->metrics.start_unix_s = (uint64_t)time(NULL);
  /* The seed only has to differ between runs; see map.c. */
  uint64_t seed = uv_hrtime() ^ ((uint64_t)getpid() << 32) ^ (uint64_t)time(NULL);
  sbn__srv_map_init(&c->jobs, seed);
  *out = c;
  return SBN_OK;
}

double *sbn__srv_scratch(sbn__coord *c, size_t n) {
  if (n > c->scratch_len) {
    double *p = realloc(c->scratch, n * sizeof(double));
    if (p == NULL)
      return NULL;
    c->scratch = p;
    c->scratch_len = n;
  }
  return c->scratch;
}

/* Ready list: parked contributions whose open round has ended */

static void coord_on_ready(uv_check_t *h) {
  sbn__coord *c = h->data;
  /* Each dispatch may end rounds and append connections: run until empty. */
  while (c->ready != NULL)
    sbn__srv_conn_unpark(c->ready);
}

static void coord_on_ready_idle(uv_idle_t *h) {
  (void)h; /* only there so that the loop does not block before the check */
}

void sbn__srv_ready_add(sbn__srv_conn *conn) {
  sbn__coord *c = conn->coord;
  if (conn->on_ready || c->stopping || conn->closing)
    return;
  if (!c->ready_check_init) {
    uv_check_init(c->loop, &c->ready_check);
    uv_idle_init(c->loop, &c->ready_idle);
    c->ready_check.data = c;
    c->ready_check_init = 1;
  }
  conn->on_ready = 1;
  conn->ready_prev = NULL;
  conn->ready_next = c->ready;
  if (c->ready != NULL)
    c->ready->ready_prev = conn;
  c->ready = conn;
  /* The check phase follows the poll phase of this iteration.  A round that
   * ends in a timer callback (a timeout) comes before the poll: the idle
   * handle keeps that poll from blocking, so the check runs at once. */
  uv_check_start(&c->ready_check, coord_on_ready);
  uv_idle_start(&c->ready_idle, coord_on_ready_idle);
}

void sbn__srv_ready_remove(sbn__srv_conn *conn) {
  sbn__coord *c = conn->coord;
  if (!conn->on_ready)
    return;
  if (conn->ready_prev != NULL)
    conn->ready_prev->ready_next = conn->ready_next;
  else
    c->ready = conn->ready_next;
  if (conn->ready_next != NULL)
    conn->ready_next->ready_prev = conn->ready_prev;
  conn->ready_prev = conn->ready_next = NULL;
  conn->on_ready = 0;
  if (c->ready == NULL && c->ready_check_init) {
    uv_check_stop(&c->ready_check);
    uv_idle_stop(&c->ready_idle);
  }
}

static void coord_on_connection(uv_stream_t *server, int status) {
  sbn__coord *c = server->data;
  if (status < 0) {
    SBN_LOGW("listen error: %s", uv_strerror(status));
    return;
  }
  if (c->stopping)
    return;
  if (sbn__srv_conn_accept(c) == SBN_ENOMEM) {
    SBN_LOGE("out of memory accepting a connection: closing it");
    c->metrics.refused_nomem++;
    sbn__srv_refuse(&c->refuse, server, coord_on_connection);
  }
}

/* Resolves cfg->host (numeric first, then the resolver) into ss. */
static int coord_resolve(const sbn__coord_config *cfg, uv_loop_t *loop,
                         struct sockaddr_storage *ss) {
  memset(ss, 0, sizeof(*ss));
  if (uv_ip4_addr(cfg->host, cfg->port, (struct sockaddr_in *)ss) == 0)
    return 0;
  if (uv_ip6_addr(cfg->host, cfg->port, (struct sockaddr_in6 *)ss) == 0)
    return 0;
  uv_getaddrinfo_t req;
  struct addrinfo hints;
  memset(&hints, 0, sizeof(hints));
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  /* Without a callback the lookup is synchronous: this runs once at start. */
  int rc = uv_getaddrinfo(loop, &req, NULL, cfg->host, NULL, &hints);
  if (rc != 0)
    return rc;
  memcpy(ss, req.addrinfo->ai_addr, req.addrinfo->ai_addrlen);
  if (ss->ss_family == AF_INET)
    ((struct sockaddr_in *)ss)->sin_port = htons((uint16_t)cfg->port);
  else
    ((struct sockaddr_in6 *)ss)->sin6_port = htons((uint16_t)cfg->port);
  uv_freeaddrinfo(req.addrinfo);
  return 0;
}

/* 127.0.0.0/8, ::1 and ::ffff:127.0.0.0/104: reachable from this host only. */
static int is_loopback(const struct sockaddr_storage *ss) {
  if (ss->ss_family == AF_INET)
    return (ntohl(((const struct sockaddr_in *)ss)->sin_addr.s_addr) >> 24) == 127;
  if (ss->ss_family == AF_INET6) {
    const struct in6_addr *a = &((const struct sockaddr_in6 *)ss)->sin6_addr;
    return IN6_IS_ADDR_LOOPBACK(a) || (IN6_IS_ADDR_V4MAPPED(a) && a->s6_addr[12] == 127);
  }
  return 0;
}

int sbn__coord_start(sbn__coord *c, char *addr, size_t addrlen) {
  struct sockaddr_storage ss;
  int rc = coord_resolve(&c->cfg, c->loop, &ss);
  if (rc != 0) {
    SBN_LOGE("cannot resolve '%s': %s", c->cfg.host, uv_strerror(rc));
    return SBN_EIO;
  }
  if (!c->auth && !is_loopback(&ss)) {
    if (!c->cfg.insecure) {
      SBN_LOGE("refusing to listen on non-loopback address '%s' without a shared secret: "
               "give --secret-file PATH (or --insecure to accept any peer that can reach "
               "this port)",
               c->cfg.host);
      return SBN_EAUTH;
    }
    SBN_LOGW("INSECURE: listening on '%s' without a shared secret; anyone who can reach "
             "this port can join any job, replace its generation and read its statistics",
             c->cfg.host);
  }
  uv_tcp_init(c->loop, &c->listener);
  c->listener.data = c;
  c->listening = 1;
  rc = uv_tcp_bind(&c->listener, (struct sockaddr *)&ss, 0);
  if (rc == 0)
    rc = uv_listen((uv_stream_t *)&c->listener, SBN_SRV_BACKLOG, coord_on_connection);
  if (rc != 0) {
    SBN_LOGE("cannot listen on %s:%d: %s", c->cfg.host, c->cfg.port, uv_strerror(rc));
    uv_close((uv_handle_t *)&c->listener, NULL);
    return SBN_EIO;
  }
  int len = sizeof(ss);
  char ip[INET6_ADDRSTRLEN] = "?";
  uv_tcp_getsockname(&c->listener, (struct sockaddr *)&ss, &len);
  if (ss.ss_family == AF_INET6) {
    uv_ip6_name((struct sockaddr_in6 *)&ss, ip, sizeof(ip));
    snprintf(addr, addrlen, "[%s]:%d", ip, ntohs(((struct sockaddr_in6 *)&ss)->sin6_port));
  } else {
    uv_ip4_name((struct sockaddr_in *)&ss, ip, sizeof(ip));
    snprintf(addr, addrlen, "%s:%d", ip, ntohs(((struct sockaddr_in *)&ss)->sin_port));
  }
  SBN_LOGI("listening on %s (round timeout %u ms, hello timeout %u ms, max frame %u bytes)", addr,
           (unsigned)c->cfg.round_timeout_ms, (unsigned)c->cfg.hello_timeout_ms,
           (unsigned)c->cfg.max_frame);
  SBN_LOGI("limits: %u connections, %u jobs, %u groups and %u open rounds per job, "
           "%u channels, %llu queued bytes per connection; frame timeout %u ms, "
           "keepalive %u s",
           (unsigned)c->cfg.max_conns, (unsigned)c->cfg.max_jobs, (unsigned)c->cfg.max_groups,
           (unsigned)c->cfg.max_rounds, (unsigned)c->cfg.max_channels,
           (unsigned long long)c->cfg.max_queued, (unsigned)c->cfg.frame_timeout_ms,
           (unsigned)c->cfg.keepalive_s);
  if (c->cfg.stall_warn_ms > 0 && c->cfg.stall_warn_ms < c->cfg.round_timeout_ms)
    SBN_LOGI("stall warning after %u ms; flight recorder keeps %u rounds per job",
             (unsigned)c->cfg.stall_warn_ms, (unsigned)c->cfg.flight_rounds);
  else
    SBN_LOGI("no stall warning; flight recorder keeps %u rounds per job",
             (unsigned)c->cfg.flight_rounds);
  if (c->cfg.spin_us > 0)
    SBN_LOGI("spinning: polls for %u us after each wake-up before sleeping",
             (unsigned)c->cfg.spin_us);
  if (c->cfg.metrics_port >= 0 &&
      sbn__http_start(c, c->metrics_addr, sizeof(c->metrics_addr)) != SBN_OK) {
    uv_close((uv_handle_t *)&c->listener, NULL);
    return SBN_EIO;
  }
  if (c->auth)
    SBN_LOGI("authentication: workers must prove they hold the shared secret (%zu bytes)",
             c->cfg.secret.len);
  else
    SBN_LOGW("authentication: off (no --secret-file); any local process can join a job");
  return SBN_OK;
}

void sbn__coord_stop(sbn__coord *c) {
  if (c == NULL || c->stopping)
    return;
  c->stopping = 1;
  SBN_LOGI("shutting down");
  if (c->listening && !uv_is_closing((uv_handle_t *)&c->listener))
    uv_close((uv_handle_t *)&c->listener, NULL);
  /*
   * Idle workers learn of the shutdown from a connection-level error (no
   * phase), workers waiting in a round from that round's error.
   */
  sbn__srv_wbuf *idle =
      sbn__srv_error_encode(c, SBN_ESHUTDOWN, "the coordinator is shutting down", NULL, 0, 0, 0, "");
  for (sbn__srv_conn *conn = c->conns; conn != NULL; conn = conn->next)
    if (conn->welcomed && conn->round == NULL)
      sbn__srv_conn_send(conn, idle);
  sbn__srv_wbuf_unref(idle);
  sbn__srv_jobs_shutdown(c);
  /* Parked contributions are dropped with their connections. */
  while (c->ready != NULL)
    sbn__srv_ready_remove(c->ready);
  if (c->ready_check_init && !uv_is_closing((uv_handle_t *)&c->ready_check)) {
    uv_close((uv_handle_t *)&c->ready_check, NULL);
    uv_close((uv_handle_t *)&c->ready_idle, NULL);
  }
  sbn__srv_pool_drain(c);
  for (sbn__srv_conn *conn = c->conns; conn != NULL; conn = conn->next)
    sbn__srv_conn_close(conn, 1, "the coordinator is shutting down");
  sbn__http_stopping(c);
}

void sbn__coord_run(sbn__coord *c) {
  if (c->cfg.spin_us == 0) {
    uv_run(c->loop, UV_RUN_DEFAULT);
    return;
  }
  const uint64_t spin_ns = (uint64_t)c->cfg.spin_us * 1000u;
  /* After a wake-up the rest of a round usually follows within
   * microseconds: poll for it instead of sleeping, which on a busy machine
   * costs a wake-up of its own.  Every poll that read something starts the
   * window again, so the loop sleeps only after spin_us without traffic,
   * not once every spin_us while rounds flow.  Yielding between polls lets
   * the workers run when they share the coordinator's core. */
  while (uv_run(c->loop, UV_RUN_ONCE) != 0) {
    uint64_t end = uv_hrtime() + spin_ns;
    int alive = 1;
    while (alive && uv_hrtime() < end) {
      const uint64_t seen = c->metrics.bytes_in;
      alive = uv_run(c->loop, UV_RUN_NOWAIT);
      if (c->metrics.bytes_in != seen)
        end = uv_hrtime() + spin_ns;
      sched_yield();
    }
    if (!alive)
      break;
  }
}

const char *sbn__coord_metrics_addr(const sbn__coord *c) {
  return c->metrics_addr;
}

void sbn__coord_dump(sbn__coord *c) {
  sbn__flight_dump_all(c);
}

void sbn__coord_free(sbn__coord *c) {
  if (c == NULL)
    return;
  sbn__srv_job_free_all(c);
  sbn__srv_map_release(&c->jobs);
  free(c->scratch);
  sbn__srv_pool_free(c);
  sbn__http_free(c);
  sbn__secret_wipe(&c->cfg.secret);
  free(c);
}
