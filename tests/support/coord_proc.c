/* coord_proc.c - start, find and stop a real sbn-coordinator for tests. */
#define _GNU_SOURCE
#include "coord_proc.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define COORD_START_TIMEOUT_MS 10000
#define COORD_MAX_ARGS 64

long long test_now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int coord_start(coord_proc *cp, const char *const *extra_args) {
  return coord_start_log(cp, extra_args, NULL);
}

int coord_start_log(coord_proc *cp, const char *const *extra_args, const char *stderr_path) {
  return coord_start_bin(cp, SBN_COORDINATOR_BIN, extra_args, stderr_path);
}

int coord_start_bin(coord_proc *cp, const char *bin, const char *const *extra_args,
                    const char *stderr_path) {
  int pfd[2];
  const char *argv[COORD_MAX_ARGS];
  int argc = 0;
  memset(cp, 0, sizeof(*cp));
  /*
   * SBN_TEST_COORD_WRAPPER runs the coordinator under a tool, e.g.
   * "valgrind --leak-check=full --error-exitcode=99" (scripts/valgrind.sh).
   */
  char wrap[1024];
  const char *w = getenv("SBN_TEST_COORD_WRAPPER");
  if (w != NULL && w[0] != '\0') {
    snprintf(wrap, sizeof(wrap), "%s", w);
    for (char *save = NULL, *t = strtok_r(wrap, " ", &save); t && argc < COORD_MAX_ARGS / 2;
         t = strtok_r(NULL, " ", &save))
      argv[argc++] = t;
  }
  argv[argc++] = bin;
  argv[argc++] = "--listen";
  argv[argc++] = "127.0.0.1:0";
  for (int i = 0; extra_args && extra_args[i] && argc < COORD_MAX_ARGS - 1; i++)
    argv[argc++] = extra_args[i];
  argv[argc] = NULL;
  if (pipe2(pfd, O_CLOEXEC) != 0)
    return -1;
  pid_t pid = fork();
  if (pid < 0) {
    close(pfd[0]);
    close(pfd[1]);
    return -1;
  }
  if (pid == 0) {
    /* A test that dies (a failed assertion) takes its coordinator along. */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    dup2(pfd[1], STDOUT_FILENO);
    if (stderr_path != NULL) {
      int lf = open(stderr_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
      if (lf >= 0)
        dup2(lf, STDERR_FILENO);
    } else if (getenv("SBN_TEST_QUIET")) {
      int dn = open("/dev/null", O_WRONLY);
      if (dn >= 0)
        dup2(dn, STDERR_FILENO);
    }
    execvp(argv[0], (char *const *)argv);
    _exit(127);
  }
  close(pfd[1]);
  cp->pid = pid;
  char buf[256];
  size_t len = 0;
  /* Under a wrapper (valgrind) start-up is slower. */
  long long deadline =
      test_now_ms() + (w != NULL && w[0] != '\0' ? 6 * COORD_START_TIMEOUT_MS : COORD_START_TIMEOUT_MS);
  while (len < sizeof(buf) - 1) {
    long long left = deadline - test_now_ms();
    if (left <= 0)
      break;
    struct pollfd p = {.fd = pfd[0], .events = POLLIN};
    int r = poll(&p, 1, (int)left);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      break;
    ssize_t n = read(pfd[0], buf + len, sizeof(buf) - 1 - len);
    if (n <= 0)
      break;
    len += (size_t)n;
    buf[len] = '\0';
    char *nl = strchr(buf, '\n');
    if (nl != NULL) {
      const char *colon = memrchr(buf, ':', (size_t)(nl - buf));
      if (colon != NULL)
        cp->port = atoi(colon + 1);
      break;
    }
  }
  close(pfd[0]);
  if (cp->port <= 0) {
    cp->start_status = coord_stop(cp, SIGKILL, 1000);
    return -1;
  }
  snprintf(cp->addr, sizeof(cp->addr), "127.0.0.1:%d", cp->port);
  return 0;
}

int wait_child(pid_t pid, int timeout_ms) {
  long long deadline = test_now_ms() + timeout_ms;
  int status;
  for (;;) {
    pid_t r = waitpid(pid, &status, WNOHANG);
    if (r == pid)
      return status;
    if (r < 0 && errno != EINTR)
      return -1;
    if (test_now_ms() >= deadline)
      break;
    usleep(2000);
  }
  kill(pid, SIGKILL);
  waitpid(pid, &status, 0);
  return -1;
}

int coord_stop(coord_proc *cp, int sig, int timeout_ms) {
  if (cp->pid <= 0)
    return -1;
  kill(cp->pid, sig);
  int st = wait_child(cp->pid, timeout_ms);
  cp->pid = 0;
  return st;
}
