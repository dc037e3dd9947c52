/*
 * test_flight.c - the flight recorder and the stall warnings of a real
 * coordinator: /debug/rounds as text and JSON lines, the ring's bound, the
 * dump to the log when a round fails or stalls and on SIGUSR1 (read from
 * the coordinator's captured stderr), and --stall-warn naming the job,
 * group, layer, seq and missing ranks once per round, before the abort.
 */
#define _GNU_SOURCE
#include <check.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "coord_proc.h"
#include "raw_peer.h"
#include "sbn/status.h"
#include "scrape.h"
#include "workers.h"

#define C 3
#define SETTLE_MS 100
#define LOG_WAIT_MS 3000
#define LATE_MS 30

static coord_proc coord;
static char log_path[300];
static int mport;

static const double mean[C] = {1, 2, 3}, m2[C] = {1, 1, 1};

static void start(const char *const *extra) {
  mport = observed_start(&coord, "0", extra, log_path, sizeof(log_path));
}

static void stop(void) { observed_stop(&coord, log_path); }

/* One forward round of 3 ranks in which rank 2 comes LATE_MS late. */
static void round3(rp **p, uint64_t seq, const char *layer) {
  rp_forward(p[0], seq, layer, C, 4, mean, m2);
  rp_forward(p[1], seq, layer, C, 4, mean, m2);
  usleep(LATE_MS * 1000);
  rp_forward(p[2], seq, layer, C, 4, mean, m2);
  for (int r = 0; r < 3; r++)
    rp_expect_result(p[r]);
}

static int count_lines(const char *s) {
  int n = 0;
  for (; *s; s++)
    n += *s == '\n';
  return n;
}

START_TEST(debug_rounds_text_and_json) {
  const char *args[] = {"--flight-rounds", "4", NULL};
  start(args);
  rp *p[3];
  for (int r = 0; r < 3; r++)
    p[r] = rp_join(coord.port, "fl", (uint32_t)r, 3);
  for (uint64_t seq = 1; seq <= 6; seq++)
    round3(p, seq, seq % 2 ? "bn1" : "bn2");
  /* An open round is shown too. */
  rp_forward(p[0], 7, "bn1", C, 4, mean, m2);
  usleep(SETTLE_MS * 1000);

  char *r = http_get(mport, "/debug/rounds");
  ck_assert_int_eq(http_status(r), 200);
  const char *b = http_body(r);
  ck_assert_msg(strstr(b, "flight recorder: job 'fl' generation 0 world 3: 4 recorded rounds") !=
                    NULL,
                "%s", b);
  /* The ring holds the last 4 of 6: seq 3 to 6. */
  ck_assert_ptr_null(strstr(b, "seq 2 "));
  ck_assert_ptr_nonnull(strstr(b, "world seq 3 forward layer 'bn1' 3 ch"));
  ck_assert_ptr_nonnull(strstr(b, "world seq 6 forward layer 'bn2' 3 ch"));
  ck_assert_ptr_nonnull(strstr(b, ": ok in "));
  ck_assert_ptr_nonnull(strstr(b, "3 of 3 arrived: rank "));
  /* Rank 2 arrives last, LATE_MS after the first. */
  const char *s6 = strstr(b, "seq 6 ");
  const char *r2 = strstr(s6, ", rank 2 +");
  ck_assert_ptr_nonnull(r2);
  ck_assert_int_ge(atoi(r2 + strlen(", rank 2 +")), LATE_MS * 1000 / 2);
  ck_assert_ptr_nonnull(strstr(b, "seq 7 forward layer 'bn1' 3 ch"));
  ck_assert_ptr_nonnull(strstr(b, "OPEN for "));
  ck_assert_ptr_nonnull(strstr(b, "1 of 3 arrived: rank 0 +0 us; missing ranks 1,2"));
  free(r);

  r = http_get(mport, "/debug/rounds?job=fl&format=json");
  ck_assert_int_eq(http_status(r), 200);
  ck_assert_ptr_nonnull(strstr(r, "Content-Type: application/x-ndjson"));
  b = http_body(r);
  ck_assert_int_eq(count_lines(b), 5);
  static const char first[] = "{\"job\":\"fl\",\"generation\":0,\"group\":\"world\",\"seq\":3,"
                              "\"phase\":\"forward\",\"layer\":\"bn1\",\"channels\":3,"
                              "\"size\":3,\"arrived\":3,";
  ck_assert_msg(strncmp(b, first, sizeof(first) - 1) == 0, "%s", b);
  ck_assert_ptr_nonnull(strstr(b, "\"outcome\":\"ok\""));
  ck_assert_ptr_nonnull(strstr(b, "\"outcome\":\"open\""));
  ck_assert_ptr_nonnull(strstr(b, "\"arrivals\":[{\"rank\":0,\"us\":0}],\"missing\":[1,2]}"));
  free(r);

  r = http_get(mport, "/debug/rounds?job=nope");
  ck_assert_int_eq(http_status(r), 404);
  free(r);
  for (int k = 0; k < 3; k++)
    rp_close(p[k]);
  stop();
}
END_TEST

START_TEST(failure_and_stall_dump_to_log) {
  const char *args[] = {"--round-timeout", "400", "--stall-warn", "150", NULL};
  start(args);
  rp *p[3];
  for (int r = 0; r < 3; r++)
    p[r] = rp_join(coord.port, "st", (uint32_t)r, 3);
  round3(p, 1, "bn1");
  /* Rank 2 does not come to seq 2. */
  rp_forward(p[0], 2, "bn2", C, 4, mean, m2);
  rp_forward(p[1], 2, "bn2", C, 4, mean, m2);
  sbn__msg_free(rp_expect_error(p[0], SBN_ETIMEDOUT, "rank 2", RP_IO_TIMEOUT_MS));
  sbn__msg_free(rp_expect_error(p[1], SBN_ETIMEDOUT, "rank 2", RP_IO_TIMEOUT_MS));
  ck_assert(log_wait(log_path, "flight: job 'st' gen 0 world seq 2 forward layer 'bn2' 3 ch",
                     LOG_WAIT_MS));
  char *s = read_file(log_path);
  const char *stall = strstr(s, "warn round stalled: job 'st' world seq 2 layer 'bn2' (forward) "
                                "open for ");
  ck_assert_msg(stall != NULL, "%s", s);
  ck_assert_ptr_nonnull(strstr(stall, "waiting for rank 2 (1 of 3 missing); it fails at 400 ms"));
  const char *failed = strstr(s, "round failed: job 'st' world seq 2");
  ck_assert_ptr_nonnull(failed);
  ck_assert(stall < failed);
  /* The stall dump shows the round open; the failure dump shows it failed. */
  ck_assert_ptr_nonnull(strstr(s, "dumped because seq 2 stalled"));
  const char *dump = strstr(s, "dumped because seq 2 failed (timed out)");
  ck_assert_msg(dump != NULL, "%s", s);
  ck_assert_ptr_nonnull(strstr(dump, "world seq 1 forward layer 'bn1' 3 ch"));
  ck_assert_ptr_nonnull(strstr(dump, ": timeout in "));
  ck_assert_ptr_nonnull(strstr(dump, "2 of 3 arrived: rank 0 +"));
  ck_assert_ptr_nonnull(strstr(dump, "; missing rank 2"));
  free(s);
  ck_assert_int_eq(log_count(log_path, "round stalled:"), 1);
  for (int k = 0; k < 3; k++)
    rp_close(p[k]);
  stop();
}
END_TEST

START_TEST(stall_warned_once_then_completes) {
  const char *args[] = {"--round-timeout", "5000", "--stall-warn", "100", NULL};
  start(args);
  rp *a = rp_join(coord.port, "sw", 0, 2), *b = rp_join(coord.port, "sw", 1, 2);
  rp_forward(a, 1, "layer4.bn", C, 4, mean, m2);
  ck_assert(log_wait(log_path,
                     "round stalled: job 'sw' world seq 1 layer 'layer4.bn' (forward) open for ",
                     LOG_WAIT_MS));
  ck_assert(
      log_wait(log_path, "waiting for rank 1 (1 of 2 missing); it fails at 5000 ms", LOG_WAIT_MS));
  usleep(3 * SETTLE_MS * 1000);
  ck_assert_int_eq(log_count(log_path, "round stalled:"), 1);
  rp_forward(b, 1, "layer4.bn", C, 4, mean, m2);
  rp_expect_result(a);
  rp_expect_result(b);
  ck_assert_int_eq(log_count(log_path, "round failed"), 0);
  ck_assert(scrape(mport, "sbn_rounds_stalled_total") == 1);
  ck_assert(scrape(mport, "sbn_rounds_total{phase=\"forward\",outcome=\"ok\"}") == 1);
  rp_close(a);
  rp_close(b);
  stop();
}
END_TEST

START_TEST(stall_warn_off) {
  const char *args[] = {"--round-timeout", "300", "--stall-warn", "0", NULL};
  start(args);
  rp *a = rp_join(coord.port, "so", 0, 2), *b = rp_join(coord.port, "so", 1, 2);
  rp_forward(a, 1, "bn", C, 4, mean, m2);
  sbn__msg_free(rp_expect_error(a, SBN_ETIMEDOUT, "rank 1", RP_IO_TIMEOUT_MS));
  ck_assert_int_eq(log_count(log_path, "round stalled:"), 0);
  rp_close(a);
  rp_close(b);
  stop();
}
END_TEST

START_TEST(sigusr1_dumps_all_jobs) {
  start(NULL);
  rp *a = rp_join(coord.port, "job-a", 0, 1), *b = rp_join(coord.port, "job-b", 0, 1);
  for (uint64_t seq = 1; seq <= 3; seq++) {
    rp_forward(a, seq, "a.bn", C, 4, mean, m2);
    rp_forward(b, seq, "b.bn", C, 4, mean, m2);
    rp_expect_result(a);
    rp_expect_result(b);
  }
  ck_assert_int_eq(kill(coord.pid, SIGUSR1), 0);
  ck_assert(log_wait(log_path, "flight recorder dump requested: 2 jobs", LOG_WAIT_MS));
  ck_assert(log_wait(log_path, "flight: job 'job-b' gen 0 world seq 3 forward layer 'b.bn'",
                     LOG_WAIT_MS));
  ck_assert(log_wait(log_path, "flight: job 'job-a' gen 0 world seq 3 forward layer 'a.bn'",
                     LOG_WAIT_MS));
  ck_assert_int_eq(log_count(log_path, "flight: job 'job-a'"), 3);
  ck_assert_int_eq(log_count(log_path, "flight recorder: job 'job-a' generation 0 world 1: 3 "
                                       "recorded rounds"),
                   1);
  /* The coordinator serves on after the dump. */
  rp_forward(a, 4, "a.bn", C, 4, mean, m2);
  rp_expect_result(a);
  rp_close(a);
  rp_close(b);
  stop();
}
END_TEST

START_TEST(recorder_off) {
  const char *args[] = {"--flight-rounds", "0", NULL};
  start(args);
  rp *a = rp_join(coord.port, "off", 0, 1);
  rp_forward(a, 1, "bn", C, 4, mean, m2);
  rp_expect_result(a);
  char *r = http_get(mport, "/debug/rounds");
  ck_assert_int_eq(http_status(r), 200);
  ck_assert_ptr_nonnull(strstr(http_body(r), "job 'off' generation 0 world 1: 0 recorded rounds"));
  free(r);
  ck_assert(scrape(mport, "sbn_rounds_total{phase=\"forward\",outcome=\"ok\"}") == 1);
  rp_close(a);
  stop();
}
END_TEST

int main(void) {
  Suite *s = suite_create("flight");
  TCase *tc = tcase_create("flight");
  tcase_set_timeout(tc, 60);
  tcase_add_test(tc, debug_rounds_text_and_json);
  tcase_add_test(tc, failure_and_stall_dump_to_log);
  tcase_add_test(tc, stall_warned_once_then_completes);
  tcase_add_test(tc, stall_warn_off);
  tcase_add_test(tc, sigusr1_dumps_all_jobs);
  tcase_add_test(tc, recorder_off);
  suite_add_tcase(s, tc);
  return run_suite(s) == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
