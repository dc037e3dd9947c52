/* scrape.c - a raw HTTP client and log readers for coordinator tests. */
#define _GNU_SOURCE
#include "scrape.h"

#include <arpa/inet.h>
#include <signal.h>
#include <sys/wait.h>
#include <check.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "coord_proc.h"

#define SCRAPE_CHUNK 65536
#define LOG_POLL_US 20000

char *http_raw(int port, const char *request, int timeout_ms, int *closed) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return NULL;
  struct sockaddr_in a;
  memset(&a, 0, sizeof(a));
  a.sin_family = AF_INET;
  a.sin_port = htons((uint16_t)port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
    close(fd);
    return NULL;
  }
  size_t rlen = strlen(request);
  if (rlen > 0 && send(fd, request, rlen, MSG_NOSIGNAL) != (ssize_t)rlen) {
    close(fd);
    return NULL;
  }
  size_t cap = SCRAPE_CHUNK, len = 0;
  char *buf = malloc(cap + 1);
  long long deadline = test_now_ms() + timeout_ms;
  *closed = 0;
  for (;;) {
    long long left = deadline - test_now_ms();
    if (left <= 0)
      break;
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int r = poll(&p, 1, (int)left);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      break;
    if (len == cap) {
      cap *= 2;
      buf = realloc(buf, cap + 1);
    }
    ssize_t n = recv(fd, buf + len, cap - len, 0);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0) {
      *closed = 1;
      break;
    }
    len += (size_t)n;
  }
  buf[len] = '\0';
  close(fd);
  return buf;
}

char *http_get(int port, const char *path) {
  char req[512];
  int closed;
  snprintf(req, sizeof(req), "GET %s HTTP/1.1\r\nHost: localhost\r\nUser-Agent: test\r\n\r\n",
           path);
  return http_raw(port, req, SCRAPE_TIMEOUT_MS, &closed);
}

int http_status(const char *resp) {
  int code;
  if (resp == NULL || sscanf(resp, "HTTP/1.1 %d", &code) != 1)
    return -1;
  return code;
}

const char *http_body(const char *resp) {
  const char *b = resp ? strstr(resp, "\r\n\r\n") : NULL;
  return b ? b + 4 : "";
}

double metric_value(const char *body, const char *series) {
  size_t n = strlen(series);
  for (const char *p = body; p != NULL && *p != '\0';) {
    if (strncmp(p, series, n) == 0 && p[n] == ' ')
      return strtod(p + n + 1, NULL);
    p = strchr(p, '\n');
    if (p != NULL)
      p++;
  }
  return -1;
}

double scrape(int port, const char *series) {
  char *resp = http_get(port, "/metrics");
  ck_assert_msg(http_status(resp) == 200, "scrape failed: %s", resp ? resp : "(no answer)");
  double v = metric_value(http_body(resp), series);
  free(resp);
  return v;
}

char *read_file(const char *path) {
  FILE *f = fopen(path, "rb");
  if (f == NULL)
    return NULL;
  size_t cap = SCRAPE_CHUNK, len = 0;
  char *buf = malloc(cap + 1);
  size_t n;
  while ((n = fread(buf + len, 1, cap - len, f)) > 0) {
    len += n;
    if (len == cap) {
      cap *= 2;
      buf = realloc(buf, cap + 1);
    }
  }
  fclose(f);
  buf[len] = '\0';
  return buf;
}

int log_count(const char *path, const char *needle) {
  char *s = read_file(path);
  int n = 0;
  for (const char *p = s; p != NULL && (p = strstr(p, needle)) != NULL; p += strlen(needle))
    n++;
  free(s);
  return n;
}

int log_wait(const char *path, const char *needle, int timeout_ms) {
  long long deadline = test_now_ms() + timeout_ms;
  do {
    if (log_count(path, needle) > 0)
      return 1;
    usleep(LOG_POLL_US);
  } while (test_now_ms() < deadline);
  return 0;
}

int log_metrics_port(const char *path) {
  static const char needle[] = "metrics listening on http://";
  if (!log_wait(path, needle, SCRAPE_TIMEOUT_MS))
    return -1;
  char *s = read_file(path);
  const char *p = strstr(s, needle);
  const char *colon = p ? strchr(p + sizeof(needle) - 1, ':') : NULL;
  int port = colon ? atoi(colon + 1) : -1;
  free(s);
  return port;
}

void temp_log_path(char *out, size_t len) {
  const char *dir = getenv("TMPDIR");
  snprintf(out, len, "%s/sbn-coord-XXXXXX", dir && dir[0] ? dir : "/tmp");
  int fd = mkstemp(out);
  ck_assert_int_ge(fd, 0);
  close(fd);
}

int observed_start(coord_proc *cp, const char *metrics_addr, const char *const *extra,
                   char *log_path, size_t log_len) {
  const char *args[32] = {"--metrics", metrics_addr};
  int n = 2;
  for (int i = 0; extra && extra[i] && n < 31; i++)
    args[n++] = extra[i];
  args[n] = NULL;
  temp_log_path(log_path, log_len);
  ck_assert_int_eq(coord_start_log(cp, args, log_path), 0);
  int port = log_metrics_port(log_path);
  ck_assert_int_gt(port, 0);
  return port;
}

void observed_stop(coord_proc *cp, const char *log_path) {
  int st = coord_stop(cp, SIGTERM, 5000);
  ck_assert_msg(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "status %d", st);
  unlink(log_path);
}
