/* raw_peer.c - a raw-socket protocol peer for coordinator tests. */
#define _GNU_SOURCE
#include "raw_peer.h"

#include <arpa/inet.h>
#include <check.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "coord_proc.h"
#include "sbn/status.h"

#define RP_READ_CHUNK (64 * 1024)
#define RP_SEND_POLL_MS 50
#define RP_MAX_SKIPPED 100000

rp *rp_open(int port, int rcvbuf) {
  rp *p = calloc(1, sizeof(*p));
  ck_assert_ptr_nonnull(p);
  sbn__framer_init(&p->rx, SBN_MAX_FRAME_CEILING);
  p->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  ck_assert_int_ge(p->fd, 0);
  if (rcvbuf > 0)
    setsockopt(p->fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
  struct sockaddr_in a;
  memset(&a, 0, sizeof(a));
  a.sin_family = AF_INET;
  a.sin_port = htons((uint16_t)port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  int rc = connect(p->fd, (struct sockaddr *)&a, sizeof(a));
  ck_assert(rc == 0 || errno == EINPROGRESS);
  struct pollfd pf = {.fd = p->fd, .events = POLLOUT};
  ck_assert_int_eq(poll(&pf, 1, RP_IO_TIMEOUT_MS), 1);
  int err = 0;
  socklen_t el = sizeof(err);
  getsockopt(p->fd, SOL_SOCKET, SO_ERROR, &err, &el);
  ck_assert_msg(err == 0, "connect: %s", strerror(err));
  int one = 1;
  setsockopt(p->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  return p;
}

int rp_listen(int *port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ck_assert_int_ge(fd, 0);
  struct sockaddr_in a;
  memset(&a, 0, sizeof(a));
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ck_assert_int_eq(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
  ck_assert_int_eq(listen(fd, 4), 0);
  socklen_t al = sizeof(a);
  ck_assert_int_eq(getsockname(fd, (struct sockaddr *)&a, &al), 0);
  *port = ntohs(a.sin_port);
  return fd;
}

rp *rp_accept(int lfd, int timeout_ms) {
  struct pollfd pf = {.fd = lfd, .events = POLLIN};
  ck_assert_msg(poll(&pf, 1, timeout_ms) == 1, "no connection within %d ms", timeout_ms);
  rp *p = calloc(1, sizeof(*p));
  ck_assert_ptr_nonnull(p);
  sbn__framer_init(&p->rx, SBN_MAX_FRAME_CEILING);
  p->fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
  ck_assert_int_ge(p->fd, 0);
  return p;
}

void rp_close(rp *p) {
  if (p == NULL)
    return;
  if (p->fd >= 0)
    close(p->fd);
  sbn__framer_release(&p->rx);
  free(p);
}

void rp_send_raw(rp *p, const void *data, size_t len) {
  const uint8_t *d = data;
  long long deadline = test_now_ms() + RP_IO_TIMEOUT_MS;
  while (len > 0) {
    ssize_t n = send(p->fd, d, len, MSG_NOSIGNAL);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
      struct pollfd pf = {.fd = p->fd, .events = POLLOUT};
      ck_assert_msg(test_now_ms() < deadline, "send timed out");
      poll(&pf, 1, RP_SEND_POLL_MS);
      continue;
    }
    ck_assert_msg(n > 0, "send: %s", strerror(errno));
    d += n;
    len -= (size_t)n;
  }
}

void rp_send(rp *p, const Sbn__Envelope *env) {
  uint8_t *buf;
  size_t len;
  ck_assert_int_eq(sbn__msg_encode(env, SBN_MAX_FRAME_CEILING, &buf, &len), SBN_OK);
  rp_send_raw(p, buf, len);
  free(buf);
}

int rp_recv_frame(rp *p, int timeout_ms, uint8_t **body, size_t *len) {
  long long deadline = test_now_ms() + timeout_ms;
  for (;;) {
    const uint8_t *b;
    size_t l;
    int rc = sbn__framer_next(&p->rx, &b, &l);
    if (rc == 1) {
      *body = malloc(l ? l : 1);
      memcpy(*body, b, l);
      *len = l;
      return 1;
    }
    if (rc < 0)
      return -1;
    long long left = deadline - test_now_ms();
    if (left <= 0)
      return 0;
    struct pollfd pf = {.fd = p->fd, .events = POLLIN};
    int pr = poll(&pf, 1, (int)left);
    if (pr < 0 && errno == EINTR)
      continue;
    if (pr == 0)
      return 0;
    uint8_t *space;
    long room = sbn__framer_space(&p->rx, RP_READ_CHUNK, &space);
    ck_assert_int_gt(room, 0);
    ssize_t n = recv(p->fd, space, (size_t)room, 0);
    if (n < 0 && (errno == EINTR || errno == EAGAIN))
      continue;
    if (n <= 0)
      return -1;
    sbn__framer_commit(&p->rx, (size_t)n);
  }
}

Sbn__Envelope *rp_recv(rp *p, int timeout_ms) {
  uint8_t *body;
  size_t len;
  int rc = rp_recv_frame(p, timeout_ms, &body, &len);
  ck_assert_msg(rc == 1, "rank %u: no message within %d ms (%s)", (unsigned)p->rank, timeout_ms,
                rc == 0 ? "timeout" : "connection closed");
  char err[160];
  Sbn__Envelope *env = sbn__msg_decode(body, len, err, sizeof(err));
  ck_assert_msg(env != NULL, "undecodable reply: %s", err);
  free(body);
  return env;
}

int rp_wait_closed(rp *p, int timeout_ms) {
  long long deadline = test_now_ms() + timeout_ms;
  for (int i = 0; i < RP_MAX_SKIPPED; i++) {
    long long left = deadline - test_now_ms();
    if (left <= 0)
      return 0;
    uint8_t *body;
    size_t len;
    int rc = rp_recv_frame(p, (int)left, &body, &len);
    if (rc == -1)
      return 1;
    if (rc == 0)
      return 0;
    free(body);
  }
  return 0;
}

void rp_hello(rp *p, const char *job, uint32_t rank, uint32_t world, uint64_t gen,
              const uint8_t *nonce, size_t nonce_len) {
  Sbn__Hello h = SBN__HELLO__INIT;
  Sbn__Envelope env = SBN__ENVELOPE__INIT;
  h.protocol_version = SBN_PROTOCOL_VERSION;
  h.job = (char *)job;
  h.rank = rank;
  h.world_size = world;
  h.generation = gen;
  h.client_version = "test";
  h.nonce.data = (uint8_t *)nonce;
  h.nonce.len = nonce ? nonce_len : 0;
  env.body_case = SBN__ENVELOPE__BODY_HELLO;
  env.hello = &h;
  p->rank = rank;
  rp_send(p, &env);
}

rp *rp_join(int port, const char *job, uint32_t rank, uint32_t world) {
  rp *p = rp_open(port, 0);
  rp_hello(p, job, rank, world, 0, NULL, 0);
  Sbn__Envelope *r = rp_recv(p, RP_IO_TIMEOUT_MS);
  ck_assert_msg(r->body_case == SBN__ENVELOPE__BODY_WELCOME, "rank %u of '%s' not welcomed: %s",
                (unsigned)rank, job,
                r->body_case == SBN__ENVELOPE__BODY_REJECT ? r->reject->message : "?");
  sbn__msg_free(r);
  return p;
}

void rp_forward(rp *p, uint64_t seq, const char *layer, uint32_t C, uint64_t count,
                const double *mean, const double *m2) {
  Sbn__Contribute m = SBN__CONTRIBUTE__INIT;
  Sbn__Envelope env = SBN__ENVELOPE__INIT;
  m.seq = seq;
  m.phase = SBN__PHASE__PHASE_FORWARD;
  m.layer = (char *)layer;
  m.channels = C;
  m.count = count;
  m.a = (double *)mean;
  m.b = (double *)m2;
  m.n_a = m.n_b = C;
  env.body_case = SBN__ENVELOPE__BODY_CONTRIBUTE;
  env.contribute = &m;
  rp_send(p, &env);
}

Sbn__Envelope *rp_expect_error(rp *p, int code, const char *needle, int timeout_ms) {
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

void rp_expect_reject(rp *p, int code, const char *needle) {
  Sbn__Envelope *r = rp_recv(p, RP_IO_TIMEOUT_MS);
  ck_assert_msg(r->body_case == SBN__ENVELOPE__BODY_REJECT, "wanted a reject, got %d",
                r->body_case);
  ck_assert_msg(r->reject->code == code, "reject code %d (%s), wanted %d", r->reject->code,
                r->reject->message, code);
  if (needle)
    ck_assert_msg(strstr(r->reject->message, needle), "'%s' lacks '%s'", r->reject->message,
                  needle);
  sbn__msg_free(r);
}

void rp_expect_result(rp *p) {
  Sbn__Envelope *e = rp_recv(p, RP_IO_TIMEOUT_MS);
  ck_assert_msg(e->body_case == SBN__ENVELOPE__BODY_RESULT, "rank %u: wanted a result, got %s",
                (unsigned)p->rank,
                e->body_case == SBN__ENVELOPE__BODY_ERROR ? e->error->message : "other");
  sbn__msg_free(e);
}
