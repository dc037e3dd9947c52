/*
 * test_metrics.c - the coordinator's HTTP port (--metrics): Prometheus
 * counters and gauges scraped with a raw socket after known rounds, failures
 * counted by outcome, protocol errors and authentication failures, /healthz
 * (200, and 503 while shutting down), 404 and 405, and requests that are too
 * big, malformed or never finished, which are dropped without harming the
 * workers' service.
 */
#define _GNU_SOURCE
#include <check.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "coord_proc.h"
#include "coordinator.h"
#include "observe.h"
#include "raw_peer.h"
#include "sbn/status.h"
#include "scrape.h"
#include "workers.h"

#define C 4
/* The server drops a request not finished within 5 s; wait a little longer. */
#define HTTP_DROP_WAIT_MS 8000
#define SETTLE_MS 100

static coord_proc coord;
static char log_path[300];
static int mport;

static const double mean[C] = {1, 2, 3, 4}, m2[C] = {1, 1, 1, 1};

static void start(const char *const *extra) {
  mport = observed_start(&coord, "127.0.0.1:0", extra, log_path, sizeof(log_path));
}

static void stop(void) { observed_stop(&coord, log_path); }

#define FWD_OK "sbn_rounds_total{phase=\"forward\",outcome=\"ok\"}"

START_TEST(rounds_counted) {
  start(NULL);
  ck_assert(scrape(mport, FWD_OK) == 0);
  ck_assert(scrape(mport, "sbn_jobs") == 0);
  rp *a = rp_join(coord.port, "m", 0, 2), *b = rp_join(coord.port, "m", 1, 2);
  ck_assert(scrape(mport, "sbn_workers_connected") == 2);
  ck_assert(scrape(mport, "sbn_connections") == 2);
  ck_assert(scrape(mport, "sbn_jobs") == 1);
  for (uint64_t seq = 1; seq <= 5; seq++) {
    rp_forward(a, seq, "bn1", C, 8, mean, m2);
    rp_forward(b, seq, "bn1", C, 8, mean, m2);
    rp_expect_result(a);
    rp_expect_result(b);
  }
  char *resp = http_get(mport, "/metrics");
  ck_assert_int_eq(http_status(resp), 200);
  ck_assert_ptr_nonnull(strstr(resp, "Content-Type: text/plain; version=0.0.4"));
  const char *body = http_body(resp);
  ck_assert(metric_value(body, FWD_OK) == 5);
  ck_assert(metric_value(body, "sbn_round_duration_seconds_count{phase=\"forward\"}") == 5);
  ck_assert(
      metric_value(body, "sbn_round_duration_seconds_bucket{phase=\"forward\",le=\"+Inf\"}") == 5);
  ck_assert(metric_value(body, "sbn_round_duration_seconds_bucket{phase=\"forward\",le=\"60\"}") ==
            5);
  ck_assert(metric_value(body, "sbn_round_duration_seconds_sum{phase=\"forward\"}") > 0);
  ck_assert(metric_value(body, "sbn_round_duration_seconds_count{phase=\"backward\"}") == 0);
  ck_assert(metric_value(body, "sbn_groups") == 1);
  ck_assert(metric_value(body, "sbn_rounds_open") == 0);
  ck_assert(metric_value(body, "sbn_received_bytes_total") > 10 * C * 16);
  ck_assert(metric_value(body, "sbn_sent_bytes_total") > 10 * C * 16);
  ck_assert(metric_value(body, "sbn_connections_accepted_total") == 2);
  ck_assert_ptr_nonnull(strstr(body, "# TYPE sbn_rounds_total counter\n"));
  ck_assert_ptr_nonnull(strstr(body, "# TYPE sbn_round_duration_seconds histogram\n"));
  ck_assert_ptr_nonnull(strstr(body, "# TYPE sbn_workers_connected gauge\n"));
  ck_assert_ptr_nonnull(strstr(body, "# HELP sbn_protocol_errors_total "));
  free(resp);

  /* An open round, then a mismatch that fails it. */
  rp_forward(a, 6, "bn1", C, 8, mean, m2);
  usleep(SETTLE_MS * 1000);
  ck_assert(scrape(mport, "sbn_rounds_open") == 1);
  rp_forward(b, 6, "bn1", C - 1, 8, mean, m2);
  sbn__msg_free(rp_expect_error(a, SBN_EMISMATCH, NULL, RP_IO_TIMEOUT_MS));
  sbn__msg_free(rp_expect_error(b, SBN_EMISMATCH, NULL, RP_IO_TIMEOUT_MS));
  ck_assert(scrape(mport, "sbn_rounds_total{phase=\"forward\",outcome=\"mismatch\"}") == 1);
  ck_assert(scrape(mport, FWD_OK) == 5);
  ck_assert(scrape(mport, "sbn_rounds_open") == 0);

  /* Garbage on a new connection: a protocol error. */
  double before = scrape(mport, "sbn_protocol_errors_total{reason=\"proto\"}");
  rp *g = rp_open(coord.port, 0);
  rp_send_raw(g, "GET / HTTP/1.1\r\n\r\n", 18);
  ck_assert(rp_wait_closed(g, RP_IO_TIMEOUT_MS));
  rp_close(g);
  ck_assert(scrape(mport, "sbn_protocol_errors_total{reason=\"proto\"}") == before + 1);

  rp_close(a);
  rp_close(b);
  usleep(SETTLE_MS * 1000);
  ck_assert(scrape(mport, "sbn_workers_connected") == 0);
  ck_assert(scrape(mport, "sbn_jobs") == 0);
  stop();
}
END_TEST

START_TEST(failures_by_outcome) {
  const char *args[] = {"--round-timeout", "300", NULL};
  start(args);
  rp *a = rp_join(coord.port, "f", 0, 2), *b = rp_join(coord.port, "f", 1, 2);
  /* Rank 1 never comes: the round times out. */
  rp_forward(a, 1, "bn1", C, 8, mean, m2);
  sbn__msg_free(rp_expect_error(a, SBN_ETIMEDOUT, "rank 1", RP_IO_TIMEOUT_MS));
  ck_assert(scrape(mport, "sbn_rounds_total{phase=\"forward\",outcome=\"timeout\"}") == 1);
  /* A stall warning came first (half the round timeout by default). */
  ck_assert(scrape(mport, "sbn_rounds_stalled_total") == 1);
  /* Rank 1 disconnects while rank 0 waits: peer lost. */
  rp_forward(a, 2, "bn1", C, 8, mean, m2);
  usleep(SETTLE_MS * 1000);
  rp_close(b);
  sbn__msg_free(rp_expect_error(a, SBN_EPEERLOST, "rank 1", RP_IO_TIMEOUT_MS));
  ck_assert(scrape(mport, "sbn_rounds_total{phase=\"forward\",outcome=\"peer_lost\"}") == 1);
  ck_assert(scrape(mport, "sbn_rounds_total{phase=\"forward\",outcome=\"ok\"}") == 0);
  ck_assert(scrape(mport, "sbn_round_duration_seconds_count{phase=\"forward\"}") == 0);
  rp_close(a);
  stop();
}
END_TEST

START_TEST(auth_failures_counted) {
  char dir[] = "/tmp/sbn-metrics-XXXXXX", path[300];
  ck_assert_ptr_nonnull(mkdtemp(dir));
  snprintf(path, sizeof(path), "%s/secret", dir);
  FILE *f = fopen(path, "w");
  fputs("a secret of more than sixteen bytes\n", f);
  fclose(f);
  chmod(path, 0600);
  const char *args[] = {"--secret-file", path, NULL};
  start(args);
  ck_assert(scrape(mport, "sbn_auth_failures_total") == 0);
  rp *p = rp_open(coord.port, 0);
  rp_hello(p, "a", 0, 1, 0, NULL, 0); /* no nonce: holds no secret */
  rp_expect_reject(p, SBN_EAUTH, NULL);
  rp_close(p);
  ck_assert(scrape(mport, "sbn_auth_failures_total") == 1);
  ck_assert(scrape(mport, "sbn_hello_rejects_total{reason=\"auth\"}") == 1);
  stop();
  unlink(path);
  rmdir(dir);
}
END_TEST

START_TEST(health_and_errors) {
  start(NULL);
  char *r = http_get(mport, "/healthz");
  ck_assert_int_eq(http_status(r), 200);
  ck_assert_str_eq(http_body(r), "ok\n");
  ck_assert_ptr_nonnull(strstr(r, "Connection: close\r\n"));
  free(r);
  r = http_get(mport, "/healthz?probe=1");
  ck_assert_int_eq(http_status(r), 200);
  free(r);
  r = http_get(mport, "/nothing-here");
  ck_assert_int_eq(http_status(r), 404);
  free(r);
  int closed;
  r = http_raw(mport, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", SCRAPE_TIMEOUT_MS,
               &closed);
  ck_assert_int_eq(http_status(r), 405);
  ck_assert_ptr_nonnull(strstr(r, "Allow: GET\r\n"));
  ck_assert(closed);
  free(r);
  r = http_raw(mport, "HEAD /metrics HTTP/1.1\r\n\r\n", SCRAPE_TIMEOUT_MS, &closed);
  ck_assert_int_eq(http_status(r), 405);
  free(r);
  r = http_raw(mport, "GET /metrics\r\n\r\n", SCRAPE_TIMEOUT_MS, &closed);
  ck_assert_int_eq(http_status(r), 400);
  free(r);
  r = http_raw(mport, "GET metrics HTTP/1.1\r\n\r\n", SCRAPE_TIMEOUT_MS, &closed);
  ck_assert_int_eq(http_status(r), 400);
  free(r);
  /* Bare newlines are accepted as line ends. */
  r = http_raw(mport, "GET /healthz HTTP/1.0\n\n", SCRAPE_TIMEOUT_MS, &closed);
  ck_assert_int_eq(http_status(r), 200);
  free(r);
  stop();
}
END_TEST

START_TEST(bad_requests_dropped) {
  start(NULL);
  rp *a = rp_join(coord.port, "d", 0, 1);
  /* Far more than a request may hold, headers never ending. */
  size_t big = 64 * 1024;
  char *junk = malloc(big + 1);
  memcpy(junk, "GET /metrics HTTP/1.1\r\n", 23);
  for (size_t i = 23; i < big; i++)
    junk[i] = (i % 80 == 79) ? '\n' : 'x';
  junk[big] = '\0';
  int closed;
  char *r = http_raw(mport, junk, SCRAPE_TIMEOUT_MS, &closed);
  ck_assert(r == NULL || http_status(r) == 431 || closed);
  free(r);
  /* Too many header lines, each short. */
  size_t off = (size_t)sprintf(junk, "GET /metrics HTTP/1.1\r\n");
  for (int i = 0; i < 200; i++)
    off += (size_t)sprintf(junk + off, "X-%d: y\r\n", i);
  sprintf(junk + off, "\r\n");
  r = http_raw(mport, junk, SCRAPE_TIMEOUT_MS, &closed);
  ck_assert_int_eq(http_status(r), 431);
  free(r);
  free(junk);

  /* A request that never finishes: meanwhile scrapes and rounds go on, and
   * the server drops it in bounded time. */
  int fd_closed = 0;
  long long t0 = test_now_ms();
  pid_t pid = fork();
  ck_assert_int_ge(pid, 0);
  if (pid == 0) {
    char *rr =
        http_raw(mport, "GET /metrics HTTP/1.1\r\nHost: x\r\n", HTTP_DROP_WAIT_MS, &fd_closed);
    _exit(fd_closed && rr != NULL && rr[0] == '\0' ? 0 : 1);
  }
  usleep(SETTLE_MS * 1000);
  for (uint64_t seq = 1; seq <= 3; seq++) {
    rp_forward(a, seq, "bn", C, 2, mean, m2);
    rp_expect_result(a);
  }
  ck_assert(scrape(mport, FWD_OK) == 3);
  int st = wait_child(pid, HTTP_DROP_WAIT_MS + 2000);
  ck_assert_msg(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0,
                "the unfinished request was not dropped (status %d)", st);
  ck_assert_int_lt(test_now_ms() - t0, HTTP_DROP_WAIT_MS);
  /* A connection that sends nothing at all, closed by the client. */
  r = http_raw(mport, "", SETTLE_MS, &closed);
  free(r);
  ck_assert(scrape(mport, FWD_OK) == 3);
  rp_close(a);
  stop();
}
END_TEST

/* In process: /healthz answers 503 once the coordinator is stopping. */
START_TEST(health_503_when_stopping) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  sbn__coord_config cfg;
  sbn__coord_config_init(&cfg);
  sbn__coord *c;
  ck_assert_int_eq(sbn__coord_new(&loop, &cfg, &c), SBN_OK);
  sbn__sbuf out;
  const char *ctype;
  sbn__sbuf_init(&out, 1 << 20);
  ck_assert_int_eq(sbn__http_respond(c, "GET", "/healthz", &out, &ctype), 200);
  ck_assert_str_eq(out.data, "ok\n");
  sbn__sbuf_release(&out);
  sbn__coord_stop(c);
  sbn__sbuf_init(&out, 1 << 20);
  ck_assert_int_eq(sbn__http_respond(c, "GET", "/healthz", &out, &ctype), 503);
  sbn__sbuf_release(&out);
  sbn__sbuf_init(&out, 1 << 20);
  ck_assert_int_eq(sbn__http_respond(c, "GET", "/metrics", &out, &ctype), 200);
  ck_assert(metric_value(out.data, "sbn_shutting_down") == 1);
  ck_assert_str_eq(ctype, "text/plain; version=0.0.4; charset=utf-8");
  sbn__sbuf_release(&out);
  sbn__sbuf_init(&out, 1 << 20);
  ck_assert_int_eq(sbn__http_respond(c, "PUT", "/healthz", &out, &ctype), 405);
  sbn__sbuf_release(&out);
  /* A bounded buffer: what does not fit is dropped, never overrun. */
  sbn__sbuf_init(&out, 100);
  ck_assert_int_eq(sbn__http_respond(c, "GET", "/metrics", &out, &ctype), 200);
  ck_assert(out.truncated);
  ck_assert_uint_le(out.len, 100);
  sbn__sbuf_release(&out);
  uv_run(&loop, UV_RUN_DEFAULT);
  sbn__coord_free(c);
  ck_assert_int_eq(uv_loop_close(&loop), 0);
}
END_TEST

/* The bad --spin-us below is one past the limit. */
_Static_assert(SBN_COORD_SPIN_MAX_US == 10000, "update the --spin-us case of bad_metrics_flags");

START_TEST(bad_metrics_flags) {
  char cmd[512];
  const char *bad[] = {"--metrics host-without-port", "--metrics 70000", "--metrics",
                       "--flight-rounds 5000", "--stall-warn x", "--spin-us 10001",
                       "--spin-us -1"};
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    snprintf(cmd, sizeof(cmd), "%s %s 2>/dev/null", SBN_COORDINATOR_BIN, bad[i]);
    int st = system(cmd);
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 2, "'%s' gave %d", bad[i], st);
  }
}
END_TEST

int main(void) {
  Suite *s = suite_create("metrics");
  TCase *tc = tcase_create("metrics");
  tcase_set_timeout(tc, 60);
  tcase_add_test(tc, rounds_counted);
  tcase_add_test(tc, failures_by_outcome);
  tcase_add_test(tc, auth_failures_counted);
  tcase_add_test(tc, health_and_errors);
  tcase_add_test(tc, bad_requests_dropped);
  tcase_add_test(tc, health_503_when_stopping);
  tcase_add_test(tc, bad_metrics_flags);
  suite_add_tcase(s, tc);
  return run_suite(s) == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
