/*
 * test_notify.c - the coordinator as a systemd service: READY=1 with a
 * STATUS once it listens and STOPPING=1 on SIGTERM over the datagram socket
 * named by NOTIFY_SOCKET (a path and an abstract '@' name, both created
 * here), WATCHDOG=1 when WATCHDOG_USEC is set, --notify without a socket,
 * and SIGHUP, which is logged and ignored.
 */
#define _GNU_SOURCE
#include <check.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "coord_proc.h"
#include "raw_peer.h"
#include "scrape.h"
#include "workers.h"

#define WAIT_MS 3000

static coord_proc coord;
static char log_path[300];

/* A datagram socket bound to name ('@' = abstract); returns its fd. */
static int notify_socket(const char *name) {
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  ck_assert_int_ge(fd, 0);
  struct sockaddr_un sa;
  memset(&sa, 0, sizeof(sa));
  sa.sun_family = AF_UNIX;
  size_t n = strlen(name);
  memcpy(sa.sun_path, name, n);
  if (name[0] == '@')
    sa.sun_path[0] = '\0';
  else
    unlink(name);
  ck_assert_int_eq(
      bind(fd, (struct sockaddr *)&sa, (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n)), 0);
  ck_assert_int_eq(setenv("NOTIFY_SOCKET", name, 1), 0);
  return fd;
}

/* The next datagram as a string (static buffer), or "" after timeout. */
static const char *recv_msg(int fd, int timeout_ms) {
  static char buf[4096];
  struct pollfd p = {.fd = fd, .events = POLLIN};
  buf[0] = '\0';
  if (poll(&p, 1, timeout_ms) != 1)
    return buf;
  ssize_t n = recv(fd, buf, sizeof(buf) - 1, 0);
  buf[n > 0 ? n : 0] = '\0';
  return buf;
}

/* The next datagram that is not a watchdog ping. */
static const char *recv_state(int fd) {
  for (;;) {
    const char *m = recv_msg(fd, WAIT_MS);
    if (strcmp(m, "WATCHDOG=1") != 0)
      return m;
  }
}

static void start(const char *const *args) {
  temp_log_path(log_path, sizeof(log_path));
  ck_assert_int_eq(coord_start_log(&coord, args, log_path), 0);
}

static void stop_clean(void) {
  int st = coord_stop(&coord, SIGTERM, 5000);
  ck_assert_msg(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "status %d", st);
  unlink(log_path);
}

static void ready_and_stopping(const char *name) {
  int fd = notify_socket(name);
  const char *args[] = {"--metrics", "0", NULL};
  start(args);
  char want[128];
  snprintf(want, sizeof(want),
           "READY=1\nSTATUS=listening on %s, metrics on 127.0.0.1:", coord.addr);
  const char *m = recv_state(fd);
  ck_assert_msg(strncmp(m, want, strlen(want)) == 0, "got '%s'", m);
  /* Ready means serving. */
  rp_close(rp_join(coord.port, "n", 0, 1));
  ck_assert_int_eq(kill(coord.pid, SIGTERM), 0);
  m = recv_state(fd);
  ck_assert_msg(strncmp(m, "STOPPING=1\n", 11) == 0, "got '%s'", m);
  /* SIGTERM was sent: wait for the exit (a second SIGTERM would kill it). */
  int st = wait_child(coord.pid, 5000);
  ck_assert_msg(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "status %d", st);
  unlink(log_path);
  close(fd);
  if (name[0] != '@')
    unlink(name);
}

START_TEST(notify_path_socket) {
  char name[108];
  snprintf(name, sizeof(name), "/tmp/sbn-notify-%d.sock", (int)getpid());
  ready_and_stopping(name);
}
END_TEST

START_TEST(notify_abstract_socket) {
  char name[108];
  snprintf(name, sizeof(name), "@sbn-notify-test-%d", (int)getpid());
  ready_and_stopping(name);
}
END_TEST

START_TEST(notify_watchdog) {
  char name[108];
  snprintf(name, sizeof(name), "@sbn-notify-wd-%d", (int)getpid());
  int fd = notify_socket(name);
  setenv("WATCHDOG_USEC", "100000", 1);
  unsetenv("WATCHDOG_PID");
  start(NULL);
  ck_assert_int_eq(strncmp(recv_msg(fd, WAIT_MS), "READY=1", 7), 0);
  int pings = 0;
  long long t0 = test_now_ms();
  while (pings < 3 && test_now_ms() - t0 < WAIT_MS)
    pings += strcmp(recv_msg(fd, WAIT_MS), "WATCHDOG=1") == 0;
  ck_assert_int_eq(pings, 3);
  stop_clean();
  close(fd);
}
END_TEST

START_TEST(notify_flag_without_socket) {
  unsetenv("NOTIFY_SOCKET");
  const char *args[] = {"--notify", NULL};
  start(args);
  ck_assert(log_wait(log_path, "--notify: NOTIFY_SOCKET is not set", WAIT_MS));
  rp_close(rp_join(coord.port, "n", 0, 1));
  stop_clean();
}
END_TEST

START_TEST(sighup_ignored) {
  unsetenv("NOTIFY_SOCKET");
  start(NULL);
  ck_assert_int_eq(kill(coord.pid, SIGHUP), 0);
  ck_assert(log_wait(log_path, "received SIGHUP: there is nothing to reload", WAIT_MS));
  ck_assert_int_eq(kill(coord.pid, SIGHUP), 0);
  usleep(100 * 1000);
  ck_assert_int_eq(log_count(log_path, "received SIGHUP"), 2);
  rp_close(rp_join(coord.port, "h", 0, 1));
  stop_clean();
}
END_TEST

int main(void) {
  Suite *s = suite_create("notify");
  TCase *tc = tcase_create("notify");
  tcase_set_timeout(tc, 30);
  tcase_add_test(tc, notify_path_socket);
  tcase_add_test(tc, notify_abstract_socket);
  tcase_add_test(tc, notify_watchdog);
  tcase_add_test(tc, notify_flag_without_socket);
  tcase_add_test(tc, sighup_ignored);
  suite_add_tcase(s, tc);
  return run_suite(s) == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
