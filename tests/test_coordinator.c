/*
 * test_coordinator.c - the real sbn-coordinator binary, spoken to over raw
 * sockets on 127.0.0.1 with the common framing and messages.
 *
 * Every wait is bounded (IO_TIMEOUT_MS unless a test needs a tighter bound)
 * and every loop has a fixed count.  A watchdog process kills the
 * coordinator if a failing test exits without stopping it.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "coord_internal.h" /* SBN_SRV_GONE_NAMED */
#include "coord_proc.h"
#include "raw_peer.h"
#include "frame.h"
#include "msg.h"
#include "sbn/status.h"

#define IO_TIMEOUT_MS 3000
#define QUIET_MS 150 /* "nothing arrives" is checked over this long */

/* The coordinator under test */

static coord_proc cp;
static int watchdog_fd = -1;
static pid_t watchdog_pid;

static void start_coord(const char *const *extra) {
  ck_assert_int_eq(coord_start(&cp, extra), 0);
  int p[2];
  ck_assert_int_eq(pipe(p), 0);
  pid_t w = fork();
  ck_assert_int_ge(w, 0);
  if (w == 0) {
    /* EOF without a byte means the test died: take the coordinator down. */
    char b;
    ssize_t n;
    close(p[1]);
    do
      n = read(p[0], &b, 1);
    while (n < 0 && errno == EINTR);
    if (n <= 0)
      kill(cp.pid, SIGKILL);
    _exit(0);
  }
  close(p[0]);
  watchdog_fd = p[1];
  watchdog_pid = w;
}

/* Stops the coordinator with sig; returns its wait status (-1: timeout). */
static int stop_coord(int sig, int timeout_ms) {
  int st = coord_stop(&cp, sig, timeout_ms);
  if (watchdog_fd >= 0) {
    ck_assert_int_eq(write(watchdog_fd, "x", 1), 1);
    close(watchdog_fd);
    watchdog_fd = -1;
    wait_child(watchdog_pid, IO_TIMEOUT_MS);
  }
  return st;
}

static void stop_ok(void) {
  int st = stop_coord(SIGTERM, 5000);
  ck_assert_msg(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0,
                "coordinator did not exit 0 on SIGTERM (status %d)", st);
}

/* A raw protocol peer */

/* The raw-socket peer of tests/support/raw_peer.h, on this test's coordinator. */
typedef rp peer;

static peer *peer_open(void) { return rp_open(cp.port, 0); }

/* Nothing arrives for QUIET_MS. */
static void expect_quiet(peer *p) {
  uint8_t *body;
  size_t len;
  int rc = rp_recv_frame(p, QUIET_MS, &body, &len);
  if (rc == 1)
    free(body);
  ck_assert_msg(rc == 0, "rank %u got %s while it should wait", (unsigned)p->rank,
                rc == 1 ? "a message" : "closed");
}

static Sbn__Envelope *hello_raw(peer *p, uint32_t version, const char *job, uint32_t rank,
                                uint32_t world, uint64_t gen) {
  Sbn__Hello h = SBN__HELLO__INIT;
  Sbn__Envelope env = SBN__ENVELOPE__INIT;
  h.protocol_version = version;
  h.job = (char *)job;
  h.rank = rank;
  h.world_size = world;
  h.generation = gen;
  h.client_version = "test";
  env.body_case = SBN__ENVELOPE__BODY_HELLO;
  env.hello = &h;
  p->rank = rank;
  rp_send(p, &env);
  return rp_recv(p, IO_TIMEOUT_MS);
}

static peer *join_gen(const char *job, uint32_t rank, uint32_t world, uint64_t gen) {
  peer *p = peer_open();
  Sbn__Envelope *r = hello_raw(p, SBN_PROTOCOL_VERSION, job, rank, world, gen);
  ck_assert_msg(r->body_case == SBN__ENVELOPE__BODY_WELCOME, "rank %u of '%s' not welcomed: %s",
                (unsigned)rank, job,
                r->body_case == SBN__ENVELOPE__BODY_REJECT ? r->reject->message : "?");
  sbn__msg_free(r);
  return p;
}

static peer *join(const char *job, uint32_t rank, uint32_t world) {
  return join_gen(job, rank, world, 0);
}

/* Expects a Reject with code whose message holds every needle. */
static void expect_reject(Sbn__Envelope *r, int code, const char *n1, const char *n2) {
  ck_assert_int_eq(r->body_case, SBN__ENVELOPE__BODY_REJECT);
  ck_assert_msg(r->reject->code == code, "reject code %d (%s), wanted %d", r->reject->code,
                r->reject->message, code);
  if (n1)
    ck_assert_msg(strstr(r->reject->message, n1), "'%s' lacks '%s'", r->reject->message, n1);
  if (n2)
    ck_assert_msg(strstr(r->reject->message, n2), "'%s' lacks '%s'", r->reject->message, n2);
  sbn__msg_free(r);
}

/* Receives an Error with code whose message holds needle; returns it. */
static Sbn__Envelope *expect_error(peer *p, int code, const char *needle, int timeout_ms) {
  Sbn__Envelope *e = rp_recv(p, timeout_ms);
  ck_assert_msg(e->body_case == SBN__ENVELOPE__BODY_ERROR, "rank %u: wanted an error, got %d",
                (unsigned)p->rank, e->body_case);
  ck_assert_msg(e->error->code == code, "rank %u: error %d (%s), wanted %d", (unsigned)p->rank,
                e->error->code, e->error->message, code);
  if (needle)
    ck_assert_msg(strstr(e->error->message, needle), "rank %u: '%s' lacks '%s'", (unsigned)p->rank,
                  e->error->message, needle);
  return e;
}

/* Contributions */

typedef struct contrib {
  const uint32_t *members;
  size_t n_members;
  uint64_t seq;
  int phase;
  const char *layer;
  uint32_t channels;
  uint64_t count;
  const double *a, *b;
  size_t n_ab;
  const float *fvals;
  size_t n_f;
  const char *blob;
  size_t bloblen;
  uint32_t root;
  int op;
  int ahead;
} contrib;

static void send_contrib(peer *p, const contrib *c) {
  Sbn__Contribute m = SBN__CONTRIBUTE__INIT;
  Sbn__Envelope env = SBN__ENVELOPE__INIT;
  m.members = (uint32_t *)c->members;
  m.n_members = c->n_members;
  m.seq = c->seq;
  m.phase = (Sbn__Phase)c->phase;
  m.layer = (char *)(c->layer ? c->layer : "");
  m.channels = c->channels;
  m.count = c->count;
  m.a = (double *)c->a;
  m.b = (double *)c->b;
  m.n_a = m.n_b = c->n_ab;
  m.fvals = (float *)c->fvals;
  m.n_fvals = c->n_f;
  m.blob.data = (uint8_t *)c->blob;
  m.blob.len = c->bloblen;
  m.root = c->root;
  m.op = (Sbn__ReduceOp)c->op;
  m.ahead = c->ahead != 0;
  env.body_case = SBN__ENVELOPE__BODY_CONTRIBUTE;
  env.contribute = &m;
  rp_send(p, &env);
}

static void send_forward(peer *p, uint64_t seq, const char *layer, uint32_t C, uint64_t count,
                         const double *mean, const double *m2) {
  contrib c = {.seq = seq,
               .phase = SBN__PHASE__PHASE_FORWARD,
               .layer = layer,
               .channels = C,
               .count = count,
               .a = mean,
               .b = m2,
               .n_ab = C};
  send_contrib(p, &c);
}

/* Receives a Result for seq; returns its raw body too when body != NULL. */
static Sbn__Envelope *expect_result(peer *p, uint64_t seq, uint8_t **body, size_t *blen) {
  uint8_t *raw;
  size_t len;
  int rc = rp_recv_frame(p, IO_TIMEOUT_MS, &raw, &len);
  ck_assert_msg(rc == 1, "rank %u: no result (%d)", (unsigned)p->rank, rc);
  char err[160];
  Sbn__Envelope *e = sbn__msg_decode(raw, len, err, sizeof(err));
  ck_assert_ptr_nonnull(e);
  ck_assert_msg(e->body_case == SBN__ENVELOPE__BODY_RESULT, "rank %u: wanted a result, got %s",
                (unsigned)p->rank,
                e->body_case == SBN__ENVELOPE__BODY_ERROR ? e->error->message : "other");
  ck_assert_uint_eq(e->result->seq, seq);
  if (body != NULL) {
    *body = raw;
    *blen = len;
  } else {
    free(raw);
  }
  return e;
}

/* Deterministic data */

static uint64_t rng = 0x2545F4914F6CDD1Du;
static double rnd(void) {
  rng ^= rng >> 12;
  rng ^= rng << 25;
  rng ^= rng >> 27;
  return (double)((rng * 2685821657736338717u) >> 11) / 9007199254740992.0;
}

static void two_pass(const double *x, size_t n, long double *mean, long double *m2) {
  long double s = 0, q = 0;
  for (size_t i = 0; i < n; i++)
    s += x[i];
  *mean = n ? s / (long double)n : 0;
  for (size_t i = 0; i < n; i++)
    q += (x[i] - *mean) * (x[i] - *mean);
  *m2 = q;
}

/* Hello and connections */

START_TEST(hello_welcome) {
  const char *args[] = {"--round-timeout", "1234", "--max-frame", "65536", NULL};
  start_coord(args);
  peer *p = peer_open();
  Sbn__Envelope *r = hello_raw(p, SBN_PROTOCOL_VERSION, "job-w", 0, 2, 0);
  ck_assert_int_eq(r->body_case, SBN__ENVELOPE__BODY_WELCOME);
  ck_assert_uint_eq(r->welcome->protocol_version, SBN_PROTOCOL_VERSION);
  ck_assert_str_eq(r->welcome->server_version, "0.1.0");
  ck_assert_uint_eq(r->welcome->max_frame, 65536);
  ck_assert_uint_eq(r->welcome->round_timeout_ms, 1234);
  ck_assert_uint_eq(r->welcome->pipeline, 1); /* one allreduce sent ahead */
  uint64_t s1 = r->welcome->session;
  sbn__msg_free(r);
  peer *q = join("job-w", 1, 2);
  peer *z = peer_open();
  r = hello_raw(z, SBN_PROTOCOL_VERSION, "job-z", 0, 1, 0);
  ck_assert_uint_ne(r->welcome->session, s1);
  sbn__msg_free(r);
  /* Ping, pong with the same nonce. */
  Sbn__Ping ping = SBN__PING__INIT;
  Sbn__Envelope env = SBN__ENVELOPE__INIT;
  ping.nonce = 0xDEADBEEFCAFEull;
  env.body_case = SBN__ENVELOPE__BODY_PING;
  env.ping = &ping;
  rp_send(q, &env);
  r = rp_recv(q, IO_TIMEOUT_MS);
  ck_assert_int_eq(r->body_case, SBN__ENVELOPE__BODY_PONG);
  ck_assert_uint_eq(r->pong->nonce, 0xDEADBEEFCAFEull);
  sbn__msg_free(r);
  rp_close(p);
  rp_close(q);
  rp_close(z);
  stop_ok();
}
END_TEST

START_TEST(header_wrong_version_closes) {
  start_coord(NULL);
  peer *p = peer_open();
  uint8_t hdr[SBN_FRAME_HEADER_SIZE + 4];
  sbn__frame_header_write(hdr, 4);
  hdr[5] = 2;
  memset(hdr + SBN_FRAME_HEADER_SIZE, 0, 4);
  rp_send_raw(p, hdr, sizeof(hdr));
  ck_assert(rp_wait_closed(p, IO_TIMEOUT_MS));
  rp_close(p);
  stop_ok();
}
END_TEST

START_TEST(hello_rejects) {
  start_coord(NULL);
  peer *p = peer_open();
  expect_reject(hello_raw(p, 2, "j", 0, 2, 0), SBN_EVERSION, "version 2", NULL);
  ck_assert(rp_wait_closed(p, IO_TIMEOUT_MS));
  rp_close(p);
  p = peer_open();
  expect_reject(hello_raw(p, SBN_PROTOCOL_VERSION, "j", 5, 4, 0), SBN_EINVAL, "rank 5",
                "world size 4");
  rp_close(p);
  p = peer_open();
  expect_reject(hello_raw(p, SBN_PROTOCOL_VERSION, "j", 0, 0, 0), SBN_EINVAL, "world size 0", NULL);
  rp_close(p);
  p = peer_open();
  expect_reject(hello_raw(p, SBN_PROTOCOL_VERSION, "", 0, 1, 0), SBN_EINVAL, "empty", NULL);
  rp_close(p);
  char longjob[200];
  memset(longjob, 'x', sizeof(longjob) - 1);
  longjob[sizeof(longjob) - 1] = '\0';
  p = peer_open();
  expect_reject(hello_raw(p, SBN_PROTOCOL_VERSION, longjob, 0, 1, 0), SBN_EINVAL, "199 bytes",
                NULL);
  rp_close(p);
  peer *a = join("j", 1, 4);
  p = peer_open();
  expect_reject(hello_raw(p, SBN_PROTOCOL_VERSION, "j", 1, 4, 0), SBN_EDUPLICATE, "rank 1",
                "already connected");
  rp_close(p);
  p = peer_open();
  expect_reject(hello_raw(p, SBN_PROTOCOL_VERSION, "j", 2, 8, 0), SBN_EMISMATCH, "world size 8",
                "world size 4");
  rp_close(p);
  /* The good connection is unaffected by all of that. */
  Sbn__Ping ping = SBN__PING__INIT;
  Sbn__Envelope env = SBN__ENVELOPE__INIT;
  ping.nonce = 7;
  env.body_case = SBN__ENVELOPE__BODY_PING;
  env.ping = &ping;
  rp_send(a, &env);
  Sbn__Envelope *r = rp_recv(a, IO_TIMEOUT_MS);
  ck_assert_int_eq(r->body_case, SBN__ENVELOPE__BODY_PONG);
  sbn__msg_free(r);
  rp_close(a);
  stop_ok();
}
END_TEST

START_TEST(hello_order_and_generations) {
  start_coord(NULL);
  /* Anything before hello: an error, then the connection closes. */
  peer *p = peer_open();
  double one = 1;
  send_forward(p, 0, "bn", 1, 1, &one, &one);
  sbn__msg_free(expect_error(p, SBN_EPROTO, "expected hello", IO_TIMEOUT_MS));
  ck_assert(rp_wait_closed(p, IO_TIMEOUT_MS));
  rp_close(p);
  /* A second hello: the same. */
  p = join("g", 0, 2);
  peer *b = join("g", 1, 2);
  Sbn__Envelope *r = hello_raw(p, SBN_PROTOCOL_VERSION, "g", 0, 2, 0);
  ck_assert_int_eq(r->body_case, SBN__ENVELOPE__BODY_ERROR);
  ck_assert_int_eq(r->error->code, SBN_EPROTO);
  sbn__msg_free(r);
  ck_assert(rp_wait_closed(p, IO_TIMEOUT_MS));
  rp_close(p);
  /* A lost rank cannot come back within its generation. */
  p = peer_open();
  expect_reject(hello_raw(p, SBN_PROTOCOL_VERSION, "g", 0, 2, 0), SBN_EREJECTED, "rank 0",
                "new generation");
  rp_close(p);
  /* A newer generation restarts the job: old connections are told and closed. */
  peer *a2 = join_gen("g", 0, 2, 1);
  sbn__msg_free(expect_error(b, SBN_EPEERLOST, "restarted with generation 1", IO_TIMEOUT_MS));
  ck_assert(rp_wait_closed(b, IO_TIMEOUT_MS));
  rp_close(b);
  p = peer_open();
  expect_reject(hello_raw(p, SBN_PROTOCOL_VERSION, "g", 1, 2, 0), SBN_EREJECTED,
                "stale generation 0", NULL);
  rp_close(p);
  peer *b2 = join_gen("g", 1, 2, 1);
  /* And the restarted job works. */
  double m = 2, q = 0;
  send_forward(a2, 0, "bn", 1, 1, &m, &q);
  send_forward(b2, 0, "bn", 1, 1, &m, &q);
  sbn__msg_free(expect_result(a2, 0, NULL, NULL));
  sbn__msg_free(expect_result(b2, 0, NULL, NULL));
  rp_close(a2);
  rp_close(b2);
  stop_ok();
}
END_TEST

/* Rounds */

enum { FWD_RANKS = 3, FWD_C = 5, FWD_MAXN = 64 };

/* Per-rank data for forward rounds and its long-double reference. */
typedef struct fwd_data {
  uint64_t count[FWD_RANKS];
  double mean[FWD_RANKS][FWD_C], m2[FWD_RANKS][FWD_C];
  long double ref_mean[FWD_C], ref_m2[FWD_C];
  uint64_t total;
} fwd_data;

static void fwd_make(fwd_data *d) {
  static const uint64_t counts[FWD_RANKS] = {17, 0, 40};
  double all[FWD_C][FWD_RANKS * FWD_MAXN];
  memset(d, 0, sizeof(*d));
  for (int r = 0; r < FWD_RANKS; r++) {
    d->count[r] = counts[r];
    for (int c = 0; c < FWD_C; c++) {
      double x[FWD_MAXN];
      for (uint64_t i = 0; i < counts[r]; i++) {
        x[i] = 1e4 + 0.3 * c + (rnd() - 0.5) * 3.4 + 0.1 * r;
        all[c][d->total + i] = x[i];
      }
      long double lm, lq;
      two_pass(x, counts[r], &lm, &lq);
      d->mean[r][c] = (double)lm;
      d->m2[r][c] = (double)lq;
    }
    d->total += counts[r];
  }
  for (int c = 0; c < FWD_C; c++)
    two_pass(all[c], d->total, &d->ref_mean[c], &d->ref_m2[c]);
}

static void fwd_check(const fwd_data *d, const Sbn__Result *res) {
  ck_assert_uint_eq(res->count, d->total);
  ck_assert_uint_eq(res->n_a, FWD_C);
  ck_assert_uint_eq(res->n_b, FWD_C);
  ck_assert_uint_eq(res->channels, FWD_C);
  ck_assert_int_eq(res->phase, SBN__PHASE__PHASE_FORWARD);
  for (int c = 0; c < FWD_C; c++) {
    double em = fabs((double)(res->a[c] - d->ref_mean[c])) / fabs((double)d->ref_mean[c]);
    double ev = fabs((double)(res->b[c] - d->ref_m2[c])) / fabs((double)d->ref_m2[c]);
    ck_assert_msg(em <= 1e-12 && ev <= 1e-12, "channel %d: rel err mean %g M2 %g", c, em, ev);
  }
}

/* Runs one forward round of job with ranks sending in `order`; returns bodies. */
static void fwd_round(const char *job, const int *order, const fwd_data *d,
                      uint8_t *bodies[FWD_RANKS], size_t lens[FWD_RANKS]) {
  peer *p[FWD_RANKS];
  for (int r = 0; r < FWD_RANKS; r++)
    p[r] = join(job, (uint32_t)r, FWD_RANKS);
  for (int k = 0; k < FWD_RANKS; k++) {
    int r = order[k];
    send_forward(p[r], 0, "layer1.bn", FWD_C, d->count[r], d->mean[r], d->m2[r]);
    if (k < FWD_RANKS - 1) {
      usleep(20000); /* lets the coordinator see them in this order */
      expect_quiet(p[r]);
    }
  }
  for (int r = 0; r < FWD_RANKS; r++) {
    Sbn__Envelope *e = expect_result(p[r], 0, &bodies[r], &lens[r]);
    ck_assert_str_eq(e->result->layer, "layer1.bn");
    fwd_check(d, e->result);
    sbn__msg_free(e);
    rp_close(p[r]);
  }
}

START_TEST(forward_round) {
  start_coord(NULL);
  fwd_data d;
  fwd_make(&d);
  static const int in_order[FWD_RANKS] = {0, 1, 2}, shuffled[FWD_RANKS] = {2, 0, 1};
  uint8_t *b1[FWD_RANKS], *b2[FWD_RANKS];
  size_t l1[FWD_RANKS], l2[FWD_RANKS];
  fwd_round("fwd-a", in_order, &d, b1, l1);
  fwd_round("fwd-b", shuffled, &d, b2, l2);
  for (int r = 0; r < FWD_RANKS; r++) {
    ck_assert_uint_eq(l1[r], l1[0]);
    ck_assert_uint_eq(l2[r], l1[0]);
    ck_assert_msg(memcmp(b1[r], b1[0], l1[0]) == 0, "rank %d got other bytes", r);
    ck_assert_msg(memcmp(b2[r], b1[0], l1[0]) == 0, "shuffled rank %d got other bytes", r);
  }
  for (int r = 0; r < FWD_RANKS; r++) {
    free(b1[r]);
    free(b2[r]);
  }
  stop_ok();
}
END_TEST

START_TEST(forward_subgroup_and_many_rounds) {
  start_coord(NULL);
  peer *p[3];
  for (uint32_t r = 0; r < 3; r++)
    p[r] = join("sub", r, 3);
  static const uint32_t grp[] = {0, 2};
  for (uint64_t seq = 0; seq < 50; seq++) {
    double m0 = (double)seq, m2v = 1.0 + (double)seq, q = 2.0;
    contrib c0 = {.members = grp,
                  .n_members = 2,
                  .seq = seq,
                  .phase = SBN__PHASE__PHASE_FORWARD,
                  .layer = "bn",
                  .channels = 1,
                  .count = 2,
                  .a = &m0,
                  .b = &q,
                  .n_ab = 1};
    contrib c2 = c0;
    c2.a = &m2v;
    send_contrib(p[2], &c2);
    send_contrib(p[0], &c0);
    for (int k = 0; k < 2; k++) {
      Sbn__Envelope *e = expect_result(p[grp[k]], seq, NULL, NULL);
      /* {m, m, m+1, m+1} with M2 2 per rank: mean m+0.5, M2 4 + 1. */
      ck_assert(e->result->count == 4);
      ck_assert(fabs(e->result->a[0] - (m0 + 0.5)) < 1e-12);
      ck_assert(fabs(e->result->b[0] - 5.0) < 1e-12);
      sbn__msg_free(e);
    }
  }
  /* Rank 1 was never involved and got nothing. */
  expect_quiet(p[1]);
  for (int r = 0; r < 3; r++)
    rp_close(p[r]);
  stop_ok();
}
END_TEST

START_TEST(backward_sums) {
  start_coord(NULL);
  peer *p[2] = {join("bw", 0, 2), join("bw", 1, 2)};
  double a[2][3] = {{1.5, -2, 1e16}, {0.25, 4, 1}}, b[2][3] = {{3, 3, 3}, {-1, 0.5, 7}};
  for (int r = 1; r >= 0; r--) {
    contrib c = {.seq = 0,
                 .phase = SBN__PHASE__PHASE_BACKWARD,
                 .layer = "bn",
                 .channels = 3,
                 .a = a[r],
                 .b = b[r],
                 .n_ab = 3};
    send_contrib(p[r], &c);
  }
  for (int r = 0; r < 2; r++) {
    Sbn__Envelope *e = expect_result(p[r], 0, NULL, NULL);
    ck_assert_int_eq(e->result->phase, SBN__PHASE__PHASE_BACKWARD);
    ck_assert_uint_eq(e->result->n_a, 3);
    for (int c = 0; c < 3; c++) {
      ck_assert(e->result->a[c] == a[0][c] + a[1][c]);
      ck_assert(e->result->b[c] == b[0][c] + b[1][c]);
    }
    sbn__msg_free(e);
    rp_close(p[r]);
  }
  stop_ok();
}
END_TEST

START_TEST(allreduce_broadcast_barrier) {
  start_coord(NULL);
  peer *p[3];
  for (uint32_t r = 0; r < 3; r++)
    p[r] = join("coll", r, 3);
  /* Allreduce: summed in double in rank order, rounded once. */
  float v[3][3] = {{0.1f, 1e8f, 1.0f}, {0.2f, 1.0f, -1.0f}, {0.3f, 1.0f, 3.5f}};
  for (int r = 2; r >= 0; r--) {
    contrib c = {.seq = 0,
                 .phase = SBN__PHASE__PHASE_ALLREDUCE,
                 .layer = "grads",
                 .channels = 3,
                 .count = 3,
                 .fvals = v[r],
                 .n_f = 3};
    send_contrib(p[r], &c);
  }
  for (int r = 0; r < 3; r++) {
    Sbn__Envelope *e = expect_result(p[r], 0, NULL, NULL);
    ck_assert_uint_eq(e->result->n_fvals, 3);
    for (int i = 0; i < 3; i++) {
      float want = (float)(((double)v[0][i] + (double)v[1][i]) + (double)v[2][i]);
      ck_assert(e->result->fvals[i] == want);
    }
    sbn__msg_free(e);
  }
  /* The mean divides the double sum by the group size before rounding. */
  for (int r = 0; r < 3; r++) {
    contrib c = {.seq = 3,
                 .phase = SBN__PHASE__PHASE_ALLREDUCE,
                 .layer = "grads",
                 .channels = 3,
                 .count = 3,
                 .fvals = v[r],
                 .n_f = 3,
                 .op = SBN__REDUCE_OP__REDUCE_MEAN};
    send_contrib(p[r], &c);
  }
  for (int r = 0; r < 3; r++) {
    Sbn__Envelope *e = expect_result(p[r], 3, NULL, NULL);
    for (int i = 0; i < 3; i++) {
      float want = (float)((((double)v[0][i] + (double)v[1][i]) + (double)v[2][i]) / 3.0);
      ck_assert(e->result->fvals[i] == want);
    }
    sbn__msg_free(e);
  }
  /* Members that disagree on the operation. */
  for (int r = 0; r < 3; r++) {
    contrib c = {.seq = 4,
                 .phase = SBN__PHASE__PHASE_ALLREDUCE,
                 .layer = "grads",
                 .channels = 3,
                 .count = 3,
                 .fvals = v[r],
                 .n_f = 3,
                 .op = r == 1 ? SBN__REDUCE_OP__REDUCE_MEAN : SBN__REDUCE_OP__REDUCE_SUM};
    send_contrib(p[r], &c);
    usleep(20000);
  }
  for (int r = 0; r < 2; r++)
    sbn__msg_free(expect_error(p[r], SBN_EMISMATCH, "rank 1 asks for the mean", IO_TIMEOUT_MS));
  sbn__msg_free(expect_error(p[2], SBN_EMISMATCH, "rank 1 asks for the mean", IO_TIMEOUT_MS));
  /* Broadcast from group rank 1. */
  static const char payload[] = "weights-v1";
  for (int r = 0; r < 3; r++) {
    contrib c = {.seq = 5,
                 .phase = SBN__PHASE__PHASE_BROADCAST,
                 .layer = "init",
                 .root = 1,
                 .blob = r == 1 ? payload : NULL,
                 .bloblen = r == 1 ? sizeof(payload) : 0};
    send_contrib(p[r], &c);
  }
  for (int r = 0; r < 3; r++) {
    Sbn__Envelope *e = expect_result(p[r], 5, NULL, NULL);
    ck_assert_uint_eq(e->result->blob.len, sizeof(payload));
    ck_assert(memcmp(e->result->blob.data, payload, sizeof(payload)) == 0);
    sbn__msg_free(e);
  }
  /* Broadcast in a subgroup {0, 2}: group rank 1 is world rank 2. */
  static const uint32_t grp[] = {0, 2};
  for (int k = 1; k >= 0; k--) {
    contrib c = {.members = grp,
                 .n_members = 2,
                 .seq = 0,
                 .phase = SBN__PHASE__PHASE_BROADCAST,
                 .layer = "sub",
                 .root = 1,
                 .blob = k == 1 ? "x" : NULL,
                 .bloblen = k == 1};
    send_contrib(p[grp[k]], &c);
  }
  for (int k = 0; k < 2; k++) {
    Sbn__Envelope *e = expect_result(p[grp[k]], 0, NULL, NULL);
    ck_assert_uint_eq(e->result->blob.len, 1);
    sbn__msg_free(e);
  }
  /* Barrier: empty result once all arrive, not before. */
  contrib bar = {.seq = 6, .phase = SBN__PHASE__PHASE_BARRIER, .layer = "sync"};
  send_contrib(p[0], &bar);
  send_contrib(p[1], &bar);
  expect_quiet(p[0]);
  send_contrib(p[2], &bar);
  for (int r = 0; r < 3; r++) {
    Sbn__Envelope *e = expect_result(p[r], 6, NULL, NULL);
    ck_assert_int_eq(e->result->phase, SBN__PHASE__PHASE_BARRIER);
    ck_assert_uint_eq(e->result->n_a + e->result->n_fvals + e->result->blob.len, 0);
    sbn__msg_free(e);
    rp_close(p[r]);
  }
  stop_ok();
}
END_TEST

START_TEST(model_check) {
  start_coord(NULL);
  peer *p[3];
  for (uint32_t r = 0; r < 3; r++)
    p[r] = join("mc", r, 3);
  static const char same[] = "bn0 32 1e-05 0.1\nbn1 64 1e-05 0.1\nbn2 16 1e-05 0.1\n";
  static const char other[] = "bn0 32 1e-05 0.1\nbn1 128 1e-05 0.1\nbn2 16 1e-05 0.1\n";
  for (int r = 0; r < 3; r++) {
    contrib c = {.seq = 0,
                 .phase = SBN__PHASE__PHASE_MODEL_CHECK,
                 .layer = "model",
                 .blob = same,
                 .bloblen = strlen(same)};
    send_contrib(p[r], &c);
  }
  for (int r = 0; r < 3; r++)
    sbn__msg_free(expect_result(p[r], 0, NULL, NULL));
  for (int r = 0; r < 3; r++) {
    const char *b = r == 2 ? other : same;
    contrib c = {.seq = 1,
                 .phase = SBN__PHASE__PHASE_MODEL_CHECK,
                 .layer = "model",
                 .blob = b,
                 .bloblen = strlen(b)};
    send_contrib(p[r], &c);
  }
  for (int r = 0; r < 3; r++) {
    Sbn__Envelope *e = expect_error(p[r], SBN_EMISMATCH,
                                    "rank 2 layer 1 is 'bn1 128 1e-05 0.1', rank 0 has "
                                    "'bn1 64 1e-05 0.1'",
                                    IO_TIMEOUT_MS);
    ck_assert_uint_eq(e->error->seq, 1);
    ck_assert_uint_eq(e->error->n_ranks, 2);
    ck_assert_uint_eq(e->error->ranks[0], 0);
    ck_assert_uint_eq(e->error->ranks[1], 2);
    sbn__msg_free(e);
    rp_close(p[r]);
  }
  stop_ok();
}
END_TEST

/* Disagreements and bad values */

START_TEST(mismatched_channels) {
  start_coord(NULL);
  peer *p[3];
  double v[8] = {0}, q[8] = {0};
  for (uint32_t r = 0; r < 3; r++)
    p[r] = join("mm", r, 3);
  send_forward(p[0], 0, "bn2", 4, 1, v, q);
  usleep(20000);
  send_forward(p[1], 0, "bn2", 4, 1, v, q);
  usleep(20000);
  send_forward(p[2], 0, "bn2", 8, 1, v, q);
  for (int r = 0; r < 3; r++) {
    Sbn__Envelope *e =
        expect_error(p[r], SBN_EMISMATCH, "rank 2 sent 8 channels for layer 'bn2', rank 0 sent 4",
                     IO_TIMEOUT_MS);
    ck_assert_uint_eq(e->error->n_ranks, 2);
    ck_assert_uint_eq(e->error->ranks[0], 0);
    ck_assert_uint_eq(e->error->ranks[1], 2);
    ck_assert_uint_eq(e->error->seq, 0);
    ck_assert_str_eq(e->error->layer, "bn2");
    sbn__msg_free(e);
  }
  /* Layers that disagree, the same way. */
  send_forward(p[0], 1, "bn2", 4, 1, v, q);
  usleep(20000);
  send_forward(p[1], 1, "bn3", 4, 1, v, q);
  for (int r = 0; r < 2; r++)
    sbn__msg_free(expect_error(p[r], SBN_EMISMATCH,
                               "rank 1 is at layer 'bn3' (seq 1, forward), "
                               "rank 0 at layer 'bn2'",
                               IO_TIMEOUT_MS));
  for (int r = 0; r < 3; r++)
    rp_close(p[r]);
  stop_ok();
}
END_TEST

START_TEST(tombstone_for_late_member) {
  start_coord(NULL);
  peer *p[3];
  double v[8] = {0}, q[8] = {0};
  for (uint32_t r = 0; r < 3; r++)
    p[r] = join("tomb", r, 3);
  send_forward(p[0], 0, "bn1", 4, 1, v, q);
  usleep(20000);
  send_forward(p[1], 0, "bn1", 8, 1, v, q);
  for (int r = 0; r < 2; r++)
    sbn__msg_free(expect_error(p[r], SBN_EMISMATCH, "rank 1 sent 8 channels", IO_TIMEOUT_MS));
  /* The late member is told at once, not after a timeout. */
  long long t0 = test_now_ms();
  send_forward(p[2], 0, "bn1", 4, 1, v, q);
  Sbn__Envelope *e = expect_error(p[2], SBN_EMISMATCH, "rank 1 sent 8 channels", 500);
  ck_assert_uint_eq(e->error->seq, 0);
  ck_assert_int_lt(test_now_ms() - t0, 500);
  sbn__msg_free(e);
  /* The group carries on with the next seq. */
  for (int r = 0; r < 3; r++)
    send_forward(p[r], 1, "bn1", 4, 1, v, q);
  for (int r = 0; r < 3; r++) {
    sbn__msg_free(expect_result(p[r], 1, NULL, NULL));
    rp_close(p[r]);
  }
  stop_ok();
}
END_TEST

START_TEST(bad_stats_and_shapes) {
  start_coord(NULL);
  peer *p[2] = {join("bad", 0, 2), join("bad", 1, 2)};
  double good[2] = {1, 2}, q[2] = {1, 1}, nan_mean[2] = {1, NAN};
  send_forward(p[0], 0, "bn", 2, 3, good, q);
  usleep(20000);
  send_forward(p[1], 0, "bn", 2, 3, nan_mean, q);
  for (int r = 0; r < 2; r++) {
    Sbn__Envelope *e = expect_error(p[r], SBN_EBADSTATS, "rank 1", IO_TIMEOUT_MS);
    ck_assert_msg(strstr(e->error->message, "channel 1") && strstr(e->error->message, "'bn'"), "%s",
                  e->error->message);
    sbn__msg_free(e);
  }
  /* Shape errors concern the sender only, and its connection stays open. */
  contrib c = {.seq = 1,
               .phase = SBN__PHASE__PHASE_FORWARD,
               .layer = "bn",
               .channels = 2,
               .count = 1,
               .a = good,
               .b = q,
               .n_ab = 1};
  send_contrib(p[0], &c);
  sbn__msg_free(expect_error(p[0], SBN_EINVAL, "2 channels", IO_TIMEOUT_MS));
  static const uint32_t unsorted[] = {1, 0};
  c.n_ab = 2;
  c.members = unsorted;
  c.n_members = 2;
  send_contrib(p[0], &c);
  sbn__msg_free(expect_error(p[0], SBN_EINVAL, "sorted", IO_TIMEOUT_MS));
  static const uint32_t not_me[] = {1};
  c.members = not_me;
  c.n_members = 1;
  send_contrib(p[0], &c);
  sbn__msg_free(expect_error(p[0], SBN_ENOTMEMBER, "rank 0", IO_TIMEOUT_MS));
  c.members = NULL;
  c.n_members = 0;
  c.channels = 0;
  c.n_ab = 0;
  send_contrib(p[0], &c);
  sbn__msg_free(expect_error(p[0], SBN_EINVAL, "0 channels", IO_TIMEOUT_MS));
  expect_quiet(p[1]);
  /* One open contribution per connection. */
  send_forward(p[0], 1, "bn", 2, 3, good, q);
  send_forward(p[0], 2, "bn", 2, 3, good, q);
  sbn__msg_free(expect_error(p[0], SBN_ESTATE, "still open", IO_TIMEOUT_MS));
  send_forward(p[1], 1, "bn", 2, 3, good, q);
  for (int r = 0; r < 2; r++) {
    Sbn__Envelope *e = expect_result(p[r], 1, NULL, NULL);
    ck_assert_uint_eq(e->result->count, 6);
    sbn__msg_free(e);
    rp_close(p[r]);
  }
  stop_ok();
}
END_TEST

/* Pipelining: one allreduce contribution sent ahead of an open one */

#define PIPE_N 1000

/* An allreduce of PIPE_N values v[i] = base + i (members NULL: WORLD),
 * marked as sent ahead of seq - 1 when ahead. */
static void send_ar_x(peer *p, uint64_t seq, float base, const uint32_t *members, size_t nm,
                      int ahead, uint32_t channels) {
  static float v[PIPE_N];
  for (int i = 0; i < PIPE_N; i++)
    v[i] = base + (float)i;
  contrib c = {.members = members,
               .n_members = nm,
               .seq = seq,
               .phase = SBN__PHASE__PHASE_ALLREDUCE,
               .layer = "allreduce",
               .channels = channels,
               .count = PIPE_N,
               .fvals = v,
               .n_f = channels,
               .ahead = ahead};
  send_contrib(p, &c);
}

static void send_ar(peer *p, uint64_t seq, float base, const uint32_t *members, size_t nm) {
  send_ar_x(p, seq, base, members, nm, 0, PIPE_N);
}

/* The same, sent ahead of seq - 1. */
static void send_ahead(peer *p, uint64_t seq, float base, const uint32_t *members, size_t nm) {
  send_ar_x(p, seq, base, members, nm, 1, PIPE_N);
}

/* Expects the Result of seq: the sum of the allreduces of base b0 and b1. */
static void expect_ar_sum(peer *p, uint64_t seq, float b0, float b1) {
  Sbn__Envelope *e = expect_result(p, seq, NULL, NULL);
  ck_assert_uint_eq(e->result->n_fvals, PIPE_N);
  for (int i = 0; i < PIPE_N; i++) {
    float want = (float)((double)(b0 + (float)i) + (double)(b1 + (float)i));
    ck_assert_msg(e->result->fvals[i] == want, "rank %u seq %llu value %d: %g, wanted %g",
                  (unsigned)p->rank, (unsigned long long)seq, i, e->result->fvals[i], want);
  }
  sbn__msg_free(e);
}

/* Expects an Error for seq with code whose message holds needle. */
static void expect_seq_error(peer *p, int code, uint64_t seq, const char *needle, int ms) {
  Sbn__Envelope *e = expect_error(p, code, needle, ms);
  ck_assert_uint_eq(e->error->seq, seq);
  sbn__msg_free(e);
}

START_TEST(pipelined_allreduce) {
  start_coord(NULL);
  peer *p[2] = {join("pipe", 0, 2), join("pipe", 1, 2)};
  /* Both ranks send seq 1 and 2 back to back: results 1 then 2. */
  for (int r = 0; r < 2; r++) {
    send_ar(p[r], 1, 10.0f * (float)r, NULL, 0);
    send_ahead(p[r], 2, 100.0f + 10.0f * (float)r, NULL, 0);
  }
  for (int r = 0; r < 2; r++) {
    expect_ar_sum(p[r], 1, 0.0f, 10.0f);
    expect_ar_sum(p[r], 2, 100.0f, 110.0f);
  }
  /* Rank 0 parks seq 4 while seq 3 waits for rank 1: 4 goes once 3 is done.
   * Seq 4 names every rank explicitly: that is WORLD too, the same group. */
  static const uint32_t both[] = {0, 1};
  send_ar(p[0], 3, 1.0f, NULL, 0);
  send_ahead(p[0], 4, 2.0f, both, 2);
  expect_quiet(p[0]);
  send_ar(p[1], 3, 3.0f, NULL, 0);
  for (int r = 0; r < 2; r++)
    expect_ar_sum(p[r], 3, 1.0f, 3.0f);
  expect_quiet(p[0]);
  send_ahead(p[1], 4, 4.0f, NULL, 0); /* after 3 completed: accepted */
  for (int r = 0; r < 2; r++)
    expect_ar_sum(p[r], 4, 2.0f, 4.0f);
  /* A third message while one is open and one parked. */
  send_ar(p[0], 5, 0.0f, NULL, 0);
  send_ahead(p[0], 6, 0.0f, NULL, 0);
  send_ahead(p[0], 7, 0.0f, NULL, 0);
  expect_seq_error(p[0], SBN_ESTATE, 7, "seq 7", IO_TIMEOUT_MS);
  send_ar(p[1], 5, 1.0f, NULL, 0);
  send_ahead(p[1], 6, 1.0f, NULL, 0);
  for (int r = 0; r < 2; r++) {
    expect_ar_sum(p[r], 5, 0.0f, 1.0f);
    expect_ar_sum(p[r], 6, 0.0f, 1.0f);
  }
  /* Not parked: another group (rank 0 alone), seq + 2, a forward of seq + 1. */
  static const uint32_t alone[] = {0};
  double v = 1, q = 0;
  send_ar(p[0], 8, 0.0f, NULL, 0);
  send_ahead(p[0], 9, 0.0f, alone, 1);
  expect_seq_error(p[0], SBN_ESTATE, 9, "still open", IO_TIMEOUT_MS);
  send_ahead(p[0], 10, 0.0f, NULL, 0);
  expect_seq_error(p[0], SBN_ESTATE, 10, "still open", IO_TIMEOUT_MS);
  /* Not marked as sent ahead: one open contribution, as always. */
  send_ar(p[0], 9, 0.0f, NULL, 0);
  expect_seq_error(p[0], SBN_ESTATE, 9, "still open", IO_TIMEOUT_MS);
  send_forward(p[0], 9, "bn", 1, 1, &v, &q);
  expect_seq_error(p[0], SBN_ESTATE, 9, "still open", IO_TIMEOUT_MS);
  send_ar(p[1], 8, 5.0f, NULL, 0);
  for (int r = 0; r < 2; r++)
    expect_ar_sum(p[r], 8, 0.0f, 5.0f);
  /* Nothing was left parked: seq 9 runs as usual. */
  for (int r = 0; r < 2; r++)
    send_ar(p[r], 9, (float)r, NULL, 0);
  for (int r = 0; r < 2; r++)
    expect_ar_sum(p[r], 9, 0.0f, 1.0f);
  rp_close(p[0]);
  rp_close(p[1]);
  stop_ok();
}
END_TEST

/* Ranks 0 and 1 of job; rank 0 sends seq 1 and parks seq 2, rank 1 waits. */
static void park_seq2(const char *job, peer *p[2]) {
  p[0] = join(job, 0, 2);
  p[1] = join(job, 1, 2);
  send_ar(p[0], 1, 0.0f, NULL, 0);
  send_ahead(p[0], 2, 0.0f, NULL, 0);
}

START_TEST(pipelined_results_queue) {
  /* A pipelining worker reads result k only after sending chunk k + 1, when
   * result k + 1 may be out already: two results (4 MiB each, far over
   * --max-queued) queued for a slow reader do not disconnect it. */
  const char *args[] = {"--max-queued", "4096", NULL};
  start_coord(args);
  enum { N = 1u << 20 };
  float *v = calloc(N, sizeof(float));
  ck_assert_ptr_nonnull(v);
  for (uint32_t i = 0; i < N; i++)
    v[i] = (float)(i % 1000);
  peer *p[2] = {join("pipeq", 0, 2), rp_open(cp.port, 4096)};
  Sbn__Envelope *w = hello_raw(p[1], SBN_PROTOCOL_VERSION, "pipeq", 1, 2, 0);
  ck_assert_int_eq(w->body_case, SBN__ENVELOPE__BODY_WELCOME);
  sbn__msg_free(w);
  for (uint64_t seq = 1; seq <= 2; seq++)
    for (int r = 0; r < 2; r++) {
      contrib c = {.seq = seq,
                   .phase = SBN__PHASE__PHASE_ALLREDUCE,
                   .layer = "allreduce",
                   .channels = N,
                   .count = N,
                   .fvals = v,
                   .n_f = N,
                   .ahead = seq == 2};
      send_contrib(p[r], &c);
    }
  usleep(200000); /* both results queued for rank 1 before it reads */
  for (uint64_t seq = 1; seq <= 2; seq++)
    for (int r = 1; r >= 0; r--) {
      Sbn__Envelope *e = expect_result(p[r], seq, NULL, NULL);
      ck_assert_uint_eq(e->result->n_fvals, N);
      ck_assert(e->result->fvals[N - 1] == 2.0f * v[N - 1]);
      sbn__msg_free(e);
    }
  free(v);
  rp_close(p[0]);
  rp_close(p[1]);
  stop_ok();
}
END_TEST

START_TEST(pipelined_peer_lost) {
  const char *args[] = {"--round-timeout", "20000", NULL};
  start_coord(args);
  peer *p[2];
  park_seq2("pipelost", p);
  expect_quiet(p[0]);
  long long t0 = test_now_ms();
  close(p[1]->fd);
  p[1]->fd = -1;
  expect_seq_error(p[0], SBN_EPEERLOST, 1, "rank 1 of job 'pipelost' disconnected", 1000);
  expect_seq_error(p[0], SBN_EPEERLOST, 2, "sent ahead of seq 1, which failed: rank 1 of job "
                                           "'pipelost' disconnected",
                   1000);
  ck_assert_int_lt(test_now_ms() - t0, 1000);
  rp_close(p[0]);
  rp_close(p[1]);
  stop_ok();
}
END_TEST

START_TEST(pipelined_round_timeout) {
  const char *args[] = {"--round-timeout", "300", NULL};
  start_coord(args);
  peer *p[2];
  long long t0 = test_now_ms();
  park_seq2("pipeto", p);
  /* Seq 1 times out; seq 2, sent ahead of it, fails with it at once. */
  expect_seq_error(p[0], SBN_ETIMEDOUT, 1, "timed out", 2000);
  expect_seq_error(p[0], SBN_ETIMEDOUT, 2, "sent ahead of seq 1, which failed", 200);
  long long took = test_now_ms() - t0;
  ck_assert_msg(took >= 250 && took < 1000, "a timeout of 300 ms took %lld ms", took);
  /* Nothing stays open for the rank: its next round runs. */
  send_ar(p[0], 3, 0.0f, NULL, 0);
  send_ar(p[1], 3, 1.0f, NULL, 0);
  for (int r = 0; r < 2; r++)
    expect_ar_sum(p[r], 3, 0.0f, 1.0f);
  rp_close(p[0]);
  rp_close(p[1]);
  stop_ok();
}
END_TEST

/* A round that fails takes what was sent ahead of it along, promptly, and
 * leaves every member free for its next round; so does one refused. */
START_TEST(pipelined_failure_takes_ahead_along) {
  start_coord(NULL);
  peer *p[2] = {join("pipefail", 0, 2), join("pipefail", 1, 2)};
  long long t0 = test_now_ms();
  /* Rank 1's seq 1 has one element less: EMISMATCH for both, and for
   * both seq 2s, sent ahead of it. */
  send_ar(p[0], 1, 0.0f, NULL, 0);
  send_ahead(p[0], 2, 0.0f, NULL, 0);
  send_ar_x(p[1], 1, 0.0f, NULL, 0, 0, PIPE_N - 1);
  send_ahead(p[1], 2, 0.0f, NULL, 0);
  for (int r = 0; r < 2; r++) {
    expect_seq_error(p[r], SBN_EMISMATCH, 1, "channels", IO_TIMEOUT_MS);
    expect_seq_error(p[r], SBN_EMISMATCH, 2, "sent ahead of seq 1, which failed", IO_TIMEOUT_MS);
  }
  ck_assert_int_lt(test_now_ms() - t0, 1000);
  /* Sent ahead of one refused (its values do not match its size). */
  contrib bad = {.seq = 3,
                 .phase = SBN__PHASE__PHASE_ALLREDUCE,
                 .layer = "allreduce",
                 .channels = 5,
                 .count = 5,
                 .fvals = (const float[4]){0},
                 .n_f = 4};
  send_contrib(p[0], &bad);
  send_ahead(p[0], 4, 0.0f, NULL, 0);
  expect_seq_error(p[0], SBN_EINVAL, 3, "4 values for 5 elements", IO_TIMEOUT_MS);
  expect_seq_error(p[0], SBN_ESTATE, 4, "not open and did not complete", IO_TIMEOUT_MS);
  expect_quiet(p[1]);
  /* Both are free: seq 5 runs, and a pipeline after it too. */
  for (int r = 0; r < 2; r++) {
    send_ar(p[r], 5, (float)r, NULL, 0);
    send_ahead(p[r], 6, 2.0f * (float)r, NULL, 0);
  }
  for (int r = 0; r < 2; r++) {
    expect_ar_sum(p[r], 5, 0.0f, 1.0f);
    expect_ar_sum(p[r], 6, 0.0f, 2.0f);
  }
  rp_close(p[0]);
  rp_close(p[1]);
  stop_ok();
}
END_TEST

START_TEST(pipelined_sigterm_with_parked) {
  start_coord(NULL);
  peer *p[2];
  park_seq2("pipeterm", p);
  peer *a = p[0], *b = p[1];
  expect_quiet(a);
  long long t0 = test_now_ms();
  int st = stop_coord(SIGTERM, 3000);
  ck_assert_msg(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "exit status %d", st);
  ck_assert_int_lt(test_now_ms() - t0, 3000);
  expect_seq_error(a, SBN_ESHUTDOWN, 1, "shutting down", 1000);
  ck_assert(rp_wait_closed(a, 1000));
  sbn__msg_free(expect_error(b, SBN_ESHUTDOWN, "shutting down", 1000));
  ck_assert(rp_wait_closed(b, 1000));
  rp_close(a);
  rp_close(b);
}
END_TEST

START_TEST(deadlock_detected) {
  start_coord(NULL);
  peer *p[2] = {join("dl", 0, 2), join("dl", 1, 2)};
  double v = 1, q = 0, q0 = 0;
  send_forward(p[0], 1, "bn2", 1, 1, &v, &q);
  usleep(20000);
  send_forward(p[1], 0, "bn1", 1, 1, &v, &q);
  for (int r = 0; r < 2; r++) {
    Sbn__Envelope *e = expect_error(p[r], SBN_EMISMATCH, "neither round can complete", 1000);
    ck_assert_uint_eq(e->error->seq, r == 0 ? 1 : 0);
    ck_assert_uint_eq(e->error->n_ranks, 2);
    sbn__msg_free(e);
    rp_close(p[r]);
  }
  /* Rank 1 enters group {0,1} while 0 and 2 wait for it in WORLD. */
  peer *w[3];
  for (uint32_t r = 0; r < 3; r++)
    w[r] = join("dl3", r, 3);
  send_forward(w[0], 0, "world.bn", 1, 1, &v, &q0);
  send_forward(w[2], 0, "world.bn", 1, 1, &v, &q0);
  usleep(20000);
  static const uint32_t pair[] = {0, 1};
  contrib c = {.members = pair,
               .n_members = 2,
               .seq = 0,
               .phase = SBN__PHASE__PHASE_FORWARD,
               .layer = "pair.bn",
               .channels = 1,
               .count = 1,
               .a = &v,
               .b = &q0,
               .n_ab = 1};
  send_contrib(w[1], &c);
  for (int r = 0; r < 3; r++) {
    Sbn__Envelope *e = expect_error(w[r], SBN_EMISMATCH, "neither round can complete", 1000);
    ck_assert_msg(strstr(e->error->message, "group 0,1") && strstr(e->error->message, "world"),
                  "%s", e->error->message);
    sbn__msg_free(e);
    rp_close(w[r]);
  }
  stop_ok();
}
END_TEST

/* Failures */

START_TEST(peer_lost_mid_round) {
  start_coord(NULL);
  peer *p[3];
  double v = 1, q = 0;
  for (uint32_t r = 0; r < 3; r++)
    p[r] = join("lost", r, 3);
  send_forward(p[0], 0, "bn", 1, 1, &v, &q);
  send_forward(p[1], 0, "bn", 1, 1, &v, &q);
  expect_quiet(p[0]);
  long long t0 = test_now_ms();
  close(p[2]->fd);
  p[2]->fd = -1;
  for (int r = 0; r < 2; r++) {
    Sbn__Envelope *e = expect_error(p[r], SBN_EPEERLOST, "rank 2 of job 'lost' disconnected", 1000);
    ck_assert_uint_eq(e->error->n_ranks, 1);
    ck_assert_uint_eq(e->error->ranks[0], 2);
    sbn__msg_free(e);
  }
  ck_assert_int_lt(test_now_ms() - t0, 1000);
  /* Later rounds of any group with rank 2 fail at once; others still work. */
  send_forward(p[0], 1, "bn", 1, 1, &v, &q);
  sbn__msg_free(expect_error(p[0], SBN_EPEERLOST, "rank 2", 500));
  static const uint32_t grp[] = {0, 1};
  for (int r = 0; r < 2; r++) {
    contrib c = {.members = grp,
                 .n_members = 2,
                 .seq = 0,
                 .phase = SBN__PHASE__PHASE_FORWARD,
                 .layer = "bn",
                 .channels = 1,
                 .count = 1,
                 .a = &v,
                 .b = &q,
                 .n_ab = 1};
    send_contrib(p[r], &c);
  }
  for (int r = 0; r < 2; r++) {
    sbn__msg_free(expect_result(p[r], 0, NULL, NULL));
    rp_close(p[r]);
  }
  rp_close(p[2]);
  stop_ok();
}
END_TEST

START_TEST(round_timeout) {
  const char *args[] = {"--round-timeout", "600", NULL};
  start_coord(args);
  peer *p[3];
  double v = 1, q = 0;
  for (uint32_t r = 0; r < 3; r++)
    p[r] = join("slow", r, 3);
  long long t0 = test_now_ms();
  send_forward(p[0], 7, "bn5", 1, 1, &v, &q);
  send_forward(p[2], 7, "bn5", 1, 1, &v, &q);
  for (int r = 0; r < 3; r += 2) {
    Sbn__Envelope *e = expect_error(p[r], SBN_ETIMEDOUT, "waiting for rank 1", 2000);
    ck_assert_msg(strstr(e->error->message, "bn5") && strstr(e->error->message, "seq 7"), "%s",
                  e->error->message);
    ck_assert_uint_eq(e->error->n_ranks, 1);
    ck_assert_uint_eq(e->error->ranks[0], 1);
    sbn__msg_free(e);
  }
  long long took = test_now_ms() - t0;
  ck_assert_msg(took >= 550 && took < 2000, "timed out after %lld ms", took);
  /* The straggler gets the same error as soon as it shows up. */
  send_forward(p[1], 7, "bn5", 1, 1, &v, &q);
  sbn__msg_free(expect_error(p[1], SBN_ETIMEDOUT, "waiting for rank 1", 300));
  for (int r = 0; r < 3; r++)
    rp_close(p[r]);
  stop_ok();
}
END_TEST

/* A healthy pair of ranks completes n rounds starting at *seq. */
static void healthy_rounds(peer *a, peer *b, uint64_t *seq, int n) {
  for (int i = 0; i < n; i++, (*seq)++) {
    double m = (double)i, q = 1;
    send_forward(a, *seq, "bn", 1, 2, &m, &q);
    send_forward(b, *seq, "bn", 1, 2, &m, &q);
    sbn__msg_free(expect_result(a, *seq, NULL, NULL));
    sbn__msg_free(expect_result(b, *seq, NULL, NULL));
  }
}

START_TEST(garbage_closes_only_its_connection) {
  const char *args[] = {"--hello-timeout", "1500", NULL};
  start_coord(args);
  peer *a = join("healthy", 0, 2), *b = join("healthy", 1, 2);
  uint64_t seq = 0;
  healthy_rounds(a, b, &seq, 10);
  /* A half frame, then silence: held until the hello timeout. */
  peer *half = peer_open();
  uint8_t hdr[SBN_FRAME_HEADER_SIZE + 20];
  memset(hdr, 0, sizeof(hdr));
  sbn__frame_header_write(hdr, 200);
  rp_send_raw(half, hdr, sizeof(hdr));
  long long t_half = test_now_ms();
  /* Random bytes. */
  peer *junk = peer_open();
  uint8_t noise[4096];
  for (size_t i = 0; i < sizeof(noise); i++)
    noise[i] = (uint8_t)(rnd() * 256);
  rp_send_raw(junk, noise, sizeof(noise));
  healthy_rounds(a, b, &seq, 10);
  ck_assert(rp_wait_closed(junk, IO_TIMEOUT_MS));
  /* An oversized length. */
  peer *big = peer_open();
  sbn__frame_header_write(hdr, 0xFFFFFFF0u);
  rp_send_raw(big, hdr, SBN_FRAME_HEADER_SIZE);
  healthy_rounds(a, b, &seq, 10);
  ck_assert(rp_wait_closed(big, IO_TIMEOUT_MS));
  /* A welcomed worker that sends what only the coordinator sends. */
  peer *rogue = join("rogue", 0, 1);
  Sbn__Result res = SBN__RESULT__INIT;
  Sbn__Envelope env = SBN__ENVELOPE__INIT;
  env.body_case = SBN__ENVELOPE__BODY_RESULT;
  env.result = &res;
  rp_send(rogue, &env);
  sbn__msg_free(expect_error(rogue, SBN_EPROTO, "must not send result", IO_TIMEOUT_MS));
  ck_assert(rp_wait_closed(rogue, IO_TIMEOUT_MS));
  /* A welcomed worker whose next frame is garbage. */
  peer *broken = join("rogue", 0, 1);
  rp_send_raw(broken, noise, 64);
  ck_assert(rp_wait_closed(broken, IO_TIMEOUT_MS));
  healthy_rounds(a, b, &seq, 10);
  /* The half frame is still pending, then closed by the hello timeout. */
  ck_assert(rp_wait_closed(half, 4000));
  long long held = test_now_ms() - t_half;
  ck_assert_msg(held >= 1300, "half frame closed after %lld ms", held);
  healthy_rounds(a, b, &seq, 10);
  rp_close(half);
  rp_close(junk);
  rp_close(big);
  rp_close(rogue);
  rp_close(broken);
  rp_close(a);
  rp_close(b);
  stop_ok();
}
END_TEST

START_TEST(goodbye_then_peer_left) {
  start_coord(NULL);
  peer *a = join("bye", 0, 2), *b = join("bye", 1, 2);
  Sbn__Goodbye g = SBN__GOODBYE__INIT;
  Sbn__Envelope env = SBN__ENVELOPE__INIT;
  g.reason = "done";
  env.body_case = SBN__ENVELOPE__BODY_GOODBYE;
  env.goodbye = &g;
  rp_send(b, &env);
  ck_assert(rp_wait_closed(b, IO_TIMEOUT_MS));
  double v = 1, q = 0;
  send_forward(a, 0, "bn", 1, 1, &v, &q);
  sbn__msg_free(expect_error(a, SBN_EPEERLOST, "rank 1 of job 'bye' left", 500));
  rp_close(a);
  rp_close(b);
  stop_ok();
}
END_TEST

/*
 * A round that would need members already gone is refused at once, and the
 * error names all of them (the disconnected ones first, then those that
 * left), up to SBN_SRV_GONE_NAMED, and counts the rest: the first rank in
 * member order is not necessarily the one that broke the job.  _i: 7 or 8
 * disconnected (the limit, and one past it when a departed rank is added).
 */
START_TEST(every_member_gone_is_named) {
  const uint32_t nlost = SBN_SRV_GONE_NAMED - 1 + (uint32_t)_i, world = nlost + 2;
  start_coord(NULL);
  peer *p[SBN_SRV_GONE_NAMED + 2];
  for (uint32_t r = 0; r < world; r++)
    p[r] = join("gone", r, world);
  /* Rank 1 says goodbye; the coordinator closes it once it has read it. */
  Sbn__Goodbye g = SBN__GOODBYE__INIT;
  Sbn__Envelope env = SBN__ENVELOPE__INIT;
  g.reason = "done";
  env.body_case = SBN__ENVELOPE__BODY_GOODBYE;
  env.goodbye = &g;
  rp_send(p[1], &env);
  ck_assert(rp_wait_closed(p[1], IO_TIMEOUT_MS));
  /* Ranks 2.. vanish; a round of rank 0 with each one fails once the
   * coordinator has seen the loss (open and failed, or refused). */
  double v = 1, q = 0;
  for (uint32_t r = 2; r < world; r++) {
    rp_close(p[r]);
    const uint32_t pair[2] = {0, r};
    contrib c = {.members = pair, .n_members = 2, .seq = 0, .phase = SBN__PHASE__PHASE_FORWARD,
                 .layer = "bn", .channels = 1, .count = 1, .a = &v, .b = &q, .n_ab = 1};
    send_contrib(p[0], &c);
    char want[64];
    snprintf(want, sizeof(want), "rank %u of job 'gone' disconnected", (unsigned)r);
    sbn__msg_free(expect_error(p[0], SBN_EPEERLOST, want, IO_TIMEOUT_MS));
  }
  send_forward(p[0], 0, "bn", 1, 1, &v, &q);
  char want[512];
  int off = snprintf(want, sizeof(want), "rank 2 of job 'gone' disconnected");
  for (uint32_t r = 3; r < world; r++)
    off += snprintf(want + off, sizeof(want) - (size_t)off, ", rank %u disconnected", (unsigned)r);
  if (nlost < SBN_SRV_GONE_NAMED)
    snprintf(want + off, sizeof(want) - (size_t)off, ", rank 1 left");
  else
    snprintf(want + off, sizeof(want) - (size_t)off, ", and 1 more gone");
  Sbn__Envelope *e = expect_error(p[0], SBN_EPEERLOST, want, IO_TIMEOUT_MS);
  ck_assert_str_eq(e->error->message, want);
  ck_assert_uint_eq(e->error->n_ranks, nlost < SBN_SRV_GONE_NAMED ? nlost + 1 : nlost);
  for (size_t i = 0; i < nlost; i++)
    ck_assert_uint_eq(e->error->ranks[i], i + 2);
  if (nlost < SBN_SRV_GONE_NAMED)
    ck_assert_uint_eq(e->error->ranks[nlost], 1);
  sbn__msg_free(e);
  rp_close(p[0]);
  rp_close(p[1]);
  stop_ok();
}
END_TEST

START_TEST(sigterm_with_open_round) {
  start_coord(NULL);
  peer *a = join("term", 0, 2), *b = join("term", 1, 2);
  double v = 1, q = 0;
  send_forward(a, 3, "bn", 1, 1, &v, &q);
  expect_quiet(a);
  long long t0 = test_now_ms();
  int st = stop_coord(SIGTERM, 3000);
  ck_assert_msg(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "exit status %d", st);
  ck_assert_int_lt(test_now_ms() - t0, 3000);
  Sbn__Envelope *e = expect_error(a, SBN_ESHUTDOWN, "shutting down", 1000);
  ck_assert_uint_eq(e->error->seq, 3);
  sbn__msg_free(e);
  ck_assert(rp_wait_closed(a, 1000));
  sbn__msg_free(expect_error(b, SBN_ESHUTDOWN, "shutting down", 1000));
  ck_assert(rp_wait_closed(b, 1000));
  rp_close(a);
  rp_close(b);
}
END_TEST

START_TEST(max_frame_after_welcome) {
  const char *args[] = {"--max-frame", "2048", NULL};
  start_coord(args);
  peer *a = join("solo", 0, 1);
  /* A group of one completes at once. */
  double m[300] = {0}, q[300] = {0};
  send_forward(a, 0, "bn", 4, 9, m, q);
  Sbn__Envelope *e = expect_result(a, 0, NULL, NULL);
  ck_assert_uint_eq(e->result->count, 9);
  sbn__msg_free(e);
  /* 300 channels of doubles do not fit in 2048 bytes: that connection ends. */
  send_forward(a, 1, "bn", 300, 9, m, q);
  sbn__msg_free(expect_error(a, SBN_ETOOBIG, "limit of 2048", IO_TIMEOUT_MS));
  ck_assert(rp_wait_closed(a, IO_TIMEOUT_MS));
  rp_close(a);
  stop_ok();
}
END_TEST

/* Runs the binary with args; returns its exit status and what it printed. */
static int run_cli(const char *const *args, char *out, size_t outlen) {
  int pfd[2];
  ck_assert_int_eq(pipe(pfd), 0);
  pid_t pid = fork();
  ck_assert_int_ge(pid, 0);
  if (pid == 0) {
    const char *argv[8];
    int n = 0;
    argv[n++] = SBN_COORDINATOR_BIN;
    for (int i = 0; args[i] && n < 7; i++)
      argv[n++] = args[i];
    argv[n] = NULL;
    dup2(pfd[1], STDOUT_FILENO);
    dup2(pfd[1], STDERR_FILENO);
    close(pfd[0]);
    execv(argv[0], (char *const *)argv);
    _exit(127);
  }
  close(pfd[1]);
  size_t len = 0;
  long long deadline = test_now_ms() + IO_TIMEOUT_MS;
  while (len + 1 < outlen && test_now_ms() < deadline) {
    struct pollfd pf = {.fd = pfd[0], .events = POLLIN};
    if (poll(&pf, 1, 100) <= 0)
      continue;
    ssize_t n = read(pfd[0], out + len, outlen - 1 - len);
    if (n <= 0)
      break;
    len += (size_t)n;
  }
  out[len] = '\0';
  close(pfd[0]);
  return wait_child(pid, IO_TIMEOUT_MS);
}

START_TEST(cli_flags) {
  char out[4096];
  static const char *const bad[][3] = {
      {"--bogus", NULL, NULL},           {"--max-frame", "12", NULL},
      {"--round-timeout", "soon", NULL}, {"--hello-timeout", "0", NULL},
      {"--log-level", "loud", NULL},     {"--listen", "1.2.3.4:99999", NULL},
      {"--listen", NULL, NULL}};
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    int st = run_cli(bad[i], out, sizeof(out));
    ck_assert_msg(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 2, "%s: status %d", bad[i][0],
                  st);
    ck_assert_msg(strstr(out, bad[i][0]) != NULL, "'%s' not named in: %s", bad[i][0], out);
  }
  static const char *const help[] = {"--help", NULL}, *const version[] = {"--version", NULL};
  int st = run_cli(help, out, sizeof(out));
  ck_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0);
  ck_assert_ptr_nonnull(strstr(out, "--round-timeout"));
  ck_assert_ptr_nonnull(strstr(out, "29517"));
  st = run_cli(version, out, sizeof(out));
  ck_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0);
  ck_assert_ptr_nonnull(strstr(out, "0.1.0"));
}
END_TEST

int main(void) {
  Suite *s = suite_create("coordinator");
  TCase *tc = tcase_create("protocol");
  tcase_set_timeout(tc, 30);
  tcase_add_test(tc, hello_welcome);
  tcase_add_test(tc, header_wrong_version_closes);
  tcase_add_test(tc, hello_rejects);
  tcase_add_test(tc, hello_order_and_generations);
  tcase_add_test(tc, forward_round);
  tcase_add_test(tc, forward_subgroup_and_many_rounds);
  tcase_add_test(tc, backward_sums);
  tcase_add_test(tc, allreduce_broadcast_barrier);
  tcase_add_test(tc, model_check);
  tcase_add_test(tc, mismatched_channels);
  tcase_add_test(tc, tombstone_for_late_member);
  tcase_add_test(tc, bad_stats_and_shapes);
  tcase_add_test(tc, deadlock_detected);
  tcase_add_test(tc, pipelined_allreduce);
  tcase_add_test(tc, pipelined_results_queue);
  tcase_add_test(tc, pipelined_peer_lost);
  tcase_add_test(tc, pipelined_round_timeout);
  tcase_add_test(tc, pipelined_failure_takes_ahead_along);
  tcase_add_test(tc, pipelined_sigterm_with_parked);
  tcase_add_test(tc, peer_lost_mid_round);
  tcase_add_test(tc, round_timeout);
  tcase_add_test(tc, garbage_closes_only_its_connection);
  tcase_add_test(tc, goodbye_then_peer_left);
  tcase_add_loop_test(tc, every_member_gone_is_named, 0, 2);
  tcase_add_test(tc, sigterm_with_open_round);
  tcase_add_test(tc, max_frame_after_welcome);
  tcase_add_test(tc, cli_flags);
  suite_add_tcase(s, tc);
  SRunner *sr = srunner_create(s);
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
