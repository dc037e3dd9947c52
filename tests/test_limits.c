/*
 * test_limits.c - every configurable limit of the coordinator at its edge:
 * the limit itself passes, one more fails with a clear error to that client
 * only (SBN_ELIMIT, SBN_ETOOBIG), and the coordinator keeps serving.  Also
 * the timeouts for silent, half-sent and stalled peers, and a worker that
 * never reads its replies (its write queue is bounded).
 */
#define _GNU_SOURCE
#include <check.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "coord_proc.h"
#include "raw_peer.h"
#include "sbn/status.h"
#include "workers.h"

#define SETTLE_MS 200

static coord_proc coord;

static void start(const char *const *args) {
  ck_assert_int_eq(coord_start(&coord, args), 0);
}

static void stop(void) {
  int st = coord_stop(&coord, SIGTERM, 5000);
  ck_assert_msg(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "status %d", st);
}

static void send_env_body(rp *p, int phase, const uint32_t *members, size_t nm, uint64_t seq,
                          const char *layer, uint32_t C, const char *blob, size_t bloblen) {
  static double zeros[64];
  Sbn__Contribute m = SBN__CONTRIBUTE__INIT;
  Sbn__Envelope env = SBN__ENVELOPE__INIT;
  m.members = (uint32_t *)members;
  m.n_members = nm;
  m.seq = seq;
  m.phase = (Sbn__Phase)phase;
  m.layer = (char *)layer;
  m.channels = C;
  m.count = 1;
  if (phase == SBN__PHASE__PHASE_FORWARD) {
    m.a = m.b = zeros;
    m.n_a = m.n_b = C;
  }
  m.blob.data = (uint8_t *)blob;
  m.blob.len = bloblen;
  env.body_case = SBN__ENVELOPE__BODY_CONTRIBUTE;
  env.contribute = &m;
  rp_send(p, &env);
}

static void barrier(rp *p, const uint32_t *members, size_t nm, uint64_t seq) {
  send_env_body(p, SBN__PHASE__PHASE_BARRIER, members, nm, seq, "b", 0, NULL, 0);
}

static void expect_result(rp *p) {
  Sbn__Envelope *e = rp_recv(p, RP_IO_TIMEOUT_MS);
  ck_assert_msg(e->body_case == SBN__ENVELOPE__BODY_RESULT, "rank %u: wanted a result, got %s",
                (unsigned)p->rank,
                e->body_case == SBN__ENVELOPE__BODY_ERROR ? e->error->message : "other");
  sbn__msg_free(e);
}

static void ping(rp *p) {
  Sbn__Ping pi = SBN__PING__INIT;
  Sbn__Envelope env = SBN__ENVELOPE__INIT;
  pi.nonce = 7;
  env.body_case = SBN__ENVELOPE__BODY_PING;
  env.ping = &pi;
  rp_send(p, &env);
  Sbn__Envelope *e = rp_recv(p, RP_IO_TIMEOUT_MS);
  ck_assert_int_eq(e->body_case, SBN__ENVELOPE__BODY_PONG);
  sbn__msg_free(e);
}

START_TEST(max_conns) {
  const char *args[] = {"--max-conns", "3", NULL};
  start(args);
  rp *a = rp_join(coord.port, "c", 0, 3), *b = rp_join(coord.port, "c", 1, 3);
  rp *c = rp_open(coord.port, 0); /* the third: at the limit, still served */
  rp *d = rp_open(coord.port, 0);
  sbn__msg_free(rp_expect_error(d, SBN_ELIMIT, "limit of 3 connections", RP_IO_TIMEOUT_MS));
  ck_assert(rp_wait_closed(d, RP_IO_TIMEOUT_MS));
  rp_close(d);
  rp_hello(c, "c", 2, 3, 0, NULL, 0);
  Sbn__Envelope *w = rp_recv(c, RP_IO_TIMEOUT_MS);
  ck_assert_int_eq(w->body_case, SBN__ENVELOPE__BODY_WELCOME);
  sbn__msg_free(w);
  ping(a);
  /* A closed connection frees its place. */
  rp_close(b);
  usleep(SETTLE_MS * 1000);
  rp *e = rp_open(coord.port, 0);
  rp_hello(e, "other", 0, 1, 0, NULL, 0);
  w = rp_recv(e, RP_IO_TIMEOUT_MS);
  ck_assert_int_eq(w->body_case, SBN__ENVELOPE__BODY_WELCOME);
  sbn__msg_free(w);
  rp_close(a);
  rp_close(c);
  rp_close(e);
  stop();
}
END_TEST

START_TEST(max_jobs) {
  const char *args[] = {"--max-jobs", "2", NULL};
  start(args);
  rp *a = rp_join(coord.port, "j1", 0, 2), *b = rp_join(coord.port, "j2", 0, 1);
  rp *a1 = rp_join(coord.port, "j1", 1, 2); /* an existing job takes more ranks */
  rp *c = rp_open(coord.port, 0);
  rp_hello(c, "j3", 0, 1, 0, NULL, 0);
  rp_expect_reject(c, SBN_ELIMIT, "2 jobs");
  rp_close(c);
  rp_close(b); /* job j2 ends */
  usleep(SETTLE_MS * 1000);
  c = rp_join(coord.port, "j3", 0, 1);
  ping(a);
  rp_close(a);
  rp_close(a1);
  rp_close(c);
  stop();
}
END_TEST

START_TEST(max_groups) {
  const char *args[] = {"--max-groups", "3", NULL};
  start(args);
  rp *p[3];
  for (uint32_t r = 0; r < 3; r++)
    p[r] = rp_join(coord.port, "g", r, 3);
  static const uint32_t g0[] = {0}, g01[] = {0, 1}, g02[] = {0, 2}, g1[] = {1};
  barrier(p[0], g0, 1, 0);
  expect_result(p[0]);
  barrier(p[0], g01, 2, 0);
  barrier(p[1], g01, 2, 0);
  expect_result(p[0]);
  expect_result(p[1]);
  /* The third group is the limit: it works. */
  barrier(p[0], g02, 2, 0);
  barrier(p[2], g02, 2, 0);
  expect_result(p[0]);
  expect_result(p[2]);
  /* A fourth fails for its sender only; the known groups keep working. */
  barrier(p[1], g1, 1, 0);
  sbn__msg_free(rp_expect_error(p[1], SBN_ELIMIT, "3 groups", RP_IO_TIMEOUT_MS));
  barrier(p[0], g01, 2, 1);
  barrier(p[1], g01, 2, 1);
  expect_result(p[0]);
  expect_result(p[1]);
  for (int r = 0; r < 3; r++)
    rp_close(p[r]);
  stop();
}
END_TEST

START_TEST(max_channels) {
  const char *args[] = {"--max-channels", "8", NULL};
  start(args);
  rp *p = rp_join(coord.port, "ch", 0, 1);
  send_env_body(p, SBN__PHASE__PHASE_FORWARD, NULL, 0, 0, "bn", 8, NULL, 0);
  expect_result(p);
  send_env_body(p, SBN__PHASE__PHASE_FORWARD, NULL, 0, 1, "bn", 9, NULL, 0);
  sbn__msg_free(rp_expect_error(p, SBN_ELIMIT, "9 channels for layer 'bn' exceed", 3000));
  send_env_body(p, SBN__PHASE__PHASE_FORWARD, NULL, 0, 1, "bn", 8, NULL, 0);
  expect_result(p);
  rp_close(p);
  stop();
}
END_TEST

START_TEST(max_rounds) {
  const char *args[] = {"--max-rounds", "2", NULL};
  start(args);
  rp *p[4];
  for (uint32_t r = 0; r < 4; r++)
    p[r] = rp_join(coord.port, "r", r, 4);
  static const uint32_t g01[] = {0, 1}, g23[] = {2, 3}, g1[] = {1}, g3[] = {3};
  barrier(p[0], g01, 2, 0); /* open round 1 */
  barrier(p[2], g23, 2, 0); /* open round 2: the limit */
  usleep(SETTLE_MS * 1000);
  barrier(p[1], g1, 1, 0); /* a third would open: refused */
  sbn__msg_free(rp_expect_error(p[1], SBN_ELIMIT, "2 open rounds", RP_IO_TIMEOUT_MS));
  barrier(p[1], g01, 2, 0); /* joining an open round is fine */
  expect_result(p[0]);
  expect_result(p[1]);
  barrier(p[3], g3, 1, 0); /* one round open now: a second may open */
  expect_result(p[3]);
  barrier(p[3], g23, 2, 0);
  expect_result(p[2]);
  expect_result(p[3]);
  for (int r = 0; r < 4; r++)
    rp_close(p[r]);
  stop();
}
END_TEST

/* A model-check contribution whose envelope is exactly `body` bytes. */
static size_t blob_for_body(size_t body) {
  for (size_t b = body > 64 ? body - 64 : 0; b < body; b++) {
    Sbn__Contribute m = SBN__CONTRIBUTE__INIT;
    Sbn__Envelope env = SBN__ENVELOPE__INIT;
    m.phase = SBN__PHASE__PHASE_MODEL_CHECK;
    m.layer = "m";
    m.seq = 1;
    m.count = 1; /* as send_env_body sends it */
    m.blob.len = b;
    m.blob.data = (uint8_t *)"";
    env.body_case = SBN__ENVELOPE__BODY_CONTRIBUTE;
    env.contribute = &m;
    if (sbn__envelope__get_packed_size(&env) == body)
      return b;
  }
  ck_abort_msg("no blob size gives a body of %zu bytes", body);
  return 0;
}

START_TEST(max_frame_edge) {
  const char *args[] = {"--max-frame", "2048", NULL};
  start(args);
  rp *p = rp_join(coord.port, "f", 0, 1);
  static char blob[4096];
  memset(blob, 'x', sizeof(blob));
  size_t b = blob_for_body(2048);
  send_env_body(p, SBN__PHASE__PHASE_MODEL_CHECK, NULL, 0, 1, "m", 0, blob, b);
  expect_result(p);
  send_env_body(p, SBN__PHASE__PHASE_MODEL_CHECK, NULL, 0, 2, "m", 0, blob, b + 1);
  sbn__msg_free(
      rp_expect_error(p, SBN_ETOOBIG, "2049 bytes exceeds the limit of 2048", RP_IO_TIMEOUT_MS));
  ck_assert(rp_wait_closed(p, RP_IO_TIMEOUT_MS));
  rp_close(p);
  /* Before the welcome the cap is 4096 bytes, whatever --max-frame says. */
  p = rp_open(coord.port, 0);
  uint8_t hdr[SBN_FRAME_HEADER_SIZE];
  sbn__frame_header_write(hdr, 4097);
  rp_send_raw(p, hdr, sizeof(hdr));
  sbn__msg_free(rp_expect_error(p, SBN_ETOOBIG, "limit of 2048", RP_IO_TIMEOUT_MS));
  rp_close(p);
  stop();
}
END_TEST

START_TEST(silent_and_stalled_peers) {
  const char *args[] = {"--hello-timeout", "300", "--frame-timeout", "300", NULL};
  start(args);
  /* Connects and says nothing. */
  rp *silent = rp_open(coord.port, 0);
  /* Half a hello, then nothing. */
  rp *half = rp_open(coord.port, 0);
  uint8_t hdr[SBN_FRAME_HEADER_SIZE];
  sbn__frame_header_write(hdr, 40);
  rp_send_raw(half, hdr, sizeof(hdr));
  /* Welcomed, then half a frame. */
  rp *stall = rp_join(coord.port, "s", 0, 2);
  /* Welcomed and idle (no partial frame): never dropped for that. */
  rp *idle = rp_join(coord.port, "s", 1, 2);
  long long t0 = test_now_ms();
  rp_send_raw(stall, hdr, sizeof(hdr));
  rp_send_raw(stall, "\x22", 1);
  sbn__msg_free(rp_expect_error(silent, SBN_ETIMEDOUT, "no hello within 300 ms", 3000));
  sbn__msg_free(rp_expect_error(half, SBN_ETIMEDOUT, "no hello", 3000));
  sbn__msg_free(rp_expect_error(stall, SBN_ETIMEDOUT, "unfinished frame", 3000));
  ck_assert(rp_wait_closed(stall, 3000));
  long long took = test_now_ms() - t0;
  ck_assert_msg(took >= 250 && took < 2000, "took %lld ms", took);
  /* The idle worker lost its peer (rank 0) but is itself still served. */
  usleep(400000);
  ping(idle);
  rp_close(silent);
  rp_close(half);
  rp_close(stall);
  rp_close(idle);
  stop();
}
END_TEST

/* Sends without asserting: the coordinator may have dropped us. */
static int try_send(rp *p, const Sbn__Envelope *env) {
  uint8_t *buf;
  size_t len;
  ck_assert_int_eq(sbn__msg_encode(env, SBN_MAX_FRAME_CEILING, &buf, &len), SBN_OK);
  ssize_t n = send(p->fd, buf, len, MSG_NOSIGNAL | MSG_DONTWAIT);
  free(buf);
  return n == (ssize_t)len ? 0 : -1;
}

START_TEST(reader_that_never_reads) {
  /* Results of 2 x 2048 doubles (32 KiB) to a peer with a 4 KiB receive
   * buffer that never reads: its queue passes 64 KiB within a few rounds. */
  const char *args[] = {"--max-queued", "65536", NULL};
  start(args);
  rp *r0 = rp_join(coord.port, "q", 0, 2);
  rp *r1 = rp_open(coord.port, 4096);
  rp_hello(r1, "q", 1, 2, 0, NULL, 0);
  enum { CH = 2048, MAX_ROUNDS = 400 };
  static double v[CH];
  Sbn__Contribute m = SBN__CONTRIBUTE__INIT;
  Sbn__Envelope env = SBN__ENVELOPE__INIT;
  m.phase = SBN__PHASE__PHASE_BACKWARD;
  m.layer = "big";
  m.channels = CH;
  m.a = m.b = v;
  m.n_a = m.n_b = CH;
  env.body_case = SBN__ENVELOPE__BODY_CONTRIBUTE;
  env.contribute = &m;
  int dropped_at = -1;
  for (int k = 0; k < MAX_ROUNDS && dropped_at < 0; k++) {
    m.seq = (uint64_t)k;
    rp_send(r0, &env);
    if (try_send(r1, &env) != 0) {
      dropped_at = k;
      break;
    }
    Sbn__Envelope *e = rp_recv(r0, RP_IO_TIMEOUT_MS);
    if (e->body_case == SBN__ENVELOPE__BODY_ERROR) {
      ck_assert_msg(e->error->code == SBN_EPEERLOST && strstr(e->error->message, "rank 1"), "%d %s",
                    e->error->code, e->error->message);
      dropped_at = k;
    }
    sbn__msg_free(e);
  }
  ck_assert_msg(dropped_at > 0, "the peer that never reads was not dropped (%d)", dropped_at);
  /* Rank 0 read everything and is still served. */
  ping(r0);
  rp_close(r0);
  rp_close(r1);
  stop();
}
END_TEST

START_TEST(limit_flags_checked) {
  static const char *const bad[][3] = {
      {"--max-conns", "0", NULL},    {"--max-channels", "16777217", NULL},
      {"--max-queued", "100", NULL}, {"--frame-timeout", "0", NULL},
      {"--keepalive", "x", NULL},    {"--max-groups", "-1", NULL}};
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    coord_proc c2;
    ck_assert_msg(coord_start(&c2, bad[i]) == -1, "%s %s accepted", bad[i][0], bad[i][1]);
  }
  const char *ok[] = {"--max-conns=1",  "--max-jobs=1",      "--max-groups=1",
                      "--max-rounds=1", "--max-channels=1",  "--max-queued=4096",
                      "--keepalive=0",  "--frame-timeout=1", NULL};
  start(ok);
  stop();
}
END_TEST

int main(void) {
  Suite *s = suite_create("limits");
  TCase *tc = tcase_create("limits");
  tcase_set_timeout(tc, 60);
  tcase_add_test(tc, max_conns);
  tcase_add_test(tc, max_jobs);
  tcase_add_test(tc, max_groups);
  tcase_add_test(tc, max_channels);
  tcase_add_test(tc, max_rounds);
  tcase_add_test(tc, max_frame_edge);
  tcase_add_test(tc, silent_and_stalled_peers);
  tcase_add_test(tc, reader_that_never_reads);
  tcase_add_test(tc, limit_flags_checked);
  suite_add_tcase(s, tc);
  return run_suite(s);
}
