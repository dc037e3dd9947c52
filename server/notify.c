/*
 * notify.c - systemd's readiness protocol without libsystemd.
 *
 * A service of Type=notify finds the address of the service manager's
 * datagram socket in NOTIFY_SOCKET: a path, or an abstract name written with
 * a leading '@'.  Each notification is one datagram of "KEY=value" lines:
 * READY=1 once the coordinator listens, STOPPING=1 when it shuts down,
 * STATUS=... for `systemctl status`, and WATCHDOG=1 every half
 * WATCHDOG_USEC when the unit sets WatchdogSec= (a loop that hangs stops
 * sending them, and systemd restarts the service).
 */
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "coord_internal.h"
#include "log.h"
#include "util.h"

#define USEC_PER_MS 1000u

static void on_watchdog(uv_timer_t *t) {
  sbn__notify_send(t->data, "WATCHDOG=1");
}

int sbn__notify_init(sbn__notify *n, uv_loop_t *loop) {
  memset(n, 0, sizeof(*n));
  const char *s = getenv("NOTIFY_SOCKET");
  const char *wd = getenv("WATCHDOG_USEC");
  const char *wd_pid = getenv("WATCHDOG_PID");
  if (s != NULL && s[0] != '\0') {
    struct sockaddr_un sa;
    if ((s[0] != '/' && s[0] != '@') || strlen(s) >= sizeof(n->path) ||
        strlen(s) > sizeof(sa.sun_path)) {
      SBN_LOGW("NOTIFY_SOCKET '%s' is neither a socket path nor an abstract name ('@...'); "
               "no readiness notification",
               s);
    } else {
      snprintf(n->path, sizeof(n->path), "%s", s);
      n->enabled = 1;
    }
  }
  uint64_t usec = 0;
  if (n->enabled && wd != NULL && sbn__parse_u64(wd, 1, UINT64_MAX, &usec) == 0 &&
      (wd_pid == NULL || strtol(wd_pid, NULL, 10) == (long)getpid())) {
    uint64_t ms = usec / USEC_PER_MS / 2;
    uv_timer_init(loop, &n->watchdog);
    n->watchdog.data = n;
    /* The watchdog must not keep the loop alive on its own. */
    uv_unref((uv_handle_t *)&n->watchdog);
    uv_timer_start(&n->watchdog, on_watchdog, ms ? ms : 1, ms ? ms : 1);
    n->watchdog_on = 1;
  }
  /* Whatever this process starts must not talk to the manager for it. */
  unsetenv("NOTIFY_SOCKET");
  unsetenv("WATCHDOG_USEC");
  unsetenv("WATCHDOG_PID");
  return n->enabled;
}

int sbn__notify_send(const sbn__notify *n, const char *msg) {
  if (!n->enabled)
    return 0;
  struct sockaddr_un sa;
  memset(&sa, 0, sizeof(sa));
  sa.sun_family = AF_UNIX;
  size_t plen = strlen(n->path);
  memcpy(sa.sun_path, n->path, plen);
  if (n->path[0] == '@')
    sa.sun_path[0] = '\0'; /* abstract: the name is exactly plen bytes */
  socklen_t salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + plen);
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return -errno;
  int rc = 0;
  if (sendto(fd, msg, strlen(msg), MSG_NOSIGNAL, (struct sockaddr *)&sa, salen) < 0) {
    rc = -errno;
    SBN_LOGW("cannot notify the service manager at '%s': %s", n->path, strerror(errno));
  }
  close(fd);
  return rc;
}

void sbn__notify_close(sbn__notify *n) {
  if (n->watchdog_on && !uv_is_closing((uv_handle_t *)&n->watchdog)) {
    uv_timer_stop(&n->watchdog);
    uv_close((uv_handle_t *)&n->watchdog, NULL);
  }
}
