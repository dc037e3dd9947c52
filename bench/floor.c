/*
 * floor.c - the physical floor of one round: a raw TCP ping-pong between two
 * processes on 127.0.0.1 with TCP_NODELAY, both ways the size of a forward
 * round's message (2*C doubles plus a small header).
 *
 * Blocking variant: both ends sleep in recv().  Spinning variant: both ends
 * busy-poll recv(MSG_DONTWAIT), as a worker with spin_us does while it
 * waits for its reply.
 */
#define _GNU_SOURCE
#include "bench.h"

#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* Frame header (12) + envelope and Contribute fields besides a[] and b[]. */
#define FLOOR_HEADER_BYTES 48
#define FLOOR_IO_TIMEOUT_MS 10000

static const int floor_channels[] = {64, 256, 1024, 4096};
#define N_FLOOR (int)(sizeof(floor_channels) / sizeof(floor_channels[0]))

/* Cached p50 per [channel index][spin]; <0 = not measured yet. */
static double floor_cache[N_FLOOR][2] = {{-1, -1}, {-1, -1}, {-1, -1}, {-1, -1}};

size_t floor_payload_bytes(int channels) {
  return (size_t)channels * 2 * sizeof(double) + FLOOR_HEADER_BYTES;
}

static void set_nodelay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

/* Sends len bytes, bounded in time. */
static int send_all(int fd, const char *p, size_t len) {
  long long deadline = now_ms() + FLOOR_IO_TIMEOUT_MS;
  while (len > 0) {
    ssize_t k = send(fd, p, len, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (k > 0) {
      p += k;
      len -= (size_t)k;
      continue;
    }
    if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
      return -1;
    if (now_ms() > deadline)
      return -1;
    struct pollfd pf = {.fd = fd, .events = POLLOUT};
    poll(&pf, 1, 100);
  }
  return 0;
}

/* Receives exactly len bytes; spin busy-polls, otherwise sleeps in poll()
 * then reads.  Bounded in time. */
static int recv_all(int fd, char *p, size_t len, int spin) {
  long long deadline = 0;
  unsigned spins = 0;
  while (len > 0) {
    ssize_t k = recv(fd, p, len, MSG_DONTWAIT);
    if (k > 0) {
      p += k;
      len -= (size_t)k;
      continue;
    }
    if (k == 0)
      return -1; /* peer closed */
    if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
      return -1;
    if (spin) {
      if ((++spins & 0xfff) == 0) {
        if (deadline == 0)
          deadline = now_ms() + FLOOR_IO_TIMEOUT_MS;
        else if (now_ms() > deadline)
          return -1;
      }
      continue;
    }
    if (deadline == 0)
      deadline = now_ms() + FLOOR_IO_TIMEOUT_MS;
    long long left = deadline - now_ms();
    if (left <= 0)
      return -1;
    struct pollfd pf = {.fd = fd, .events = POLLIN};
    poll(&pf, 1, (int)(left < 1000 ? left : 1000));
  }
  return 0;
}

typedef struct floor_arg {
  int port;
  size_t bytes;
  int spin;
  int total; /* messages to echo */
} floor_arg;

/* The echo end: connects, then echoes `total` messages. */
static int echo_child(int index, void *argp) {
  (void)index;
  floor_arg *a = argp;
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0)
    return 1;
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)a->port)};
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0)
    return 1;
  set_nodelay(fd);
  char *buf = malloc(a->bytes);
  if (buf == NULL)
    return 1;
  for (int i = 0; i < a->total; i++) {
    if (recv_all(fd, buf, a->bytes, a->spin) != 0 || send_all(fd, buf, a->bytes) != 0)
      return 1;
  }
  free(buf);
  close(fd);
  return 0;
}

/* One measurement: warm + reps round trips; fills st (microseconds). */
static int floor_measure(int channels, int spin, int warm, int reps, bench_stats *st) {
  size_t bytes = floor_payload_bytes(channels);
  int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (lfd < 0)
    return -1;
  int one = 1;
  setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = 0};
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t sl = sizeof(sa);
  if (bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) != 0 || listen(lfd, 4) != 0 ||
      getsockname(lfd, (struct sockaddr *)&sa, &sl) != 0) {
    close(lfd);
    return -1;
  }
  floor_arg a = {.port = ntohs(sa.sin_port), .bytes = bytes, .spin = spin,
                 .total = warm + reps};
  procs ps;
  if (procs_start(&ps, 1, echo_child, &a) != 0) {
    close(lfd);
    return -1;
  }
  int rc = -1, fd = -1;
  char *buf = malloc(bytes);
  double *lat = malloc(sizeof(double) * (size_t)(reps > 0 ? reps : 1));
  struct pollfd pf = {.fd = lfd, .events = POLLIN};
  if (buf == NULL || lat == NULL || poll(&pf, 1, FLOOR_IO_TIMEOUT_MS) != 1)
    goto out;
  fd = accept(lfd, NULL, NULL);
  if (fd < 0)
    goto out;
  set_nodelay(fd);
  memset(buf, 0x5a, bytes);
  for (int i = 0; i < warm + reps; i++) {
    double t0 = now_s();
    if (send_all(fd, buf, bytes) != 0 || recv_all(fd, buf, bytes, spin) != 0)
      goto out;
    double t1 = now_s();
    if (i >= warm)
      lat[i - warm] = (t1 - t0) * 1e6;
  }
  stats_compute(lat, reps, st);
  rc = 0;
out:
  if (fd >= 0)
    close(fd);
  close(lfd);
  if (procs_wait(&ps, rc == 0 ? FLOOR_IO_TIMEOUT_MS : 100) != 1 && rc == 0) {
    note("floor: echo process failed");
    rc = -1;
  }
  free(buf);
  free(lat);
  return rc;
}

static int floor_index(int channels) {
  for (int i = 0; i < N_FLOOR; i++)
    if (floor_channels[i] == channels)
      return i;
  return -1;
}

static int floor_reps(void) { return bench_reps(5000, 300); }
static int floor_warm(void) { return g_opts.quick ? 50 : 500; }

double floor_p50_us(int channels, int spin) {
  int i = floor_index(channels);
  if (i >= 0 && floor_cache[i][spin] >= 0)
    return floor_cache[i][spin];
  bench_stats st;
  note("floor C=%d spin=%d (for the ratio)", channels, spin);
  if (floor_measure(channels, spin, floor_warm(), floor_reps(), &st) != 0)
    return NAN;
  if (i >= 0)
    floor_cache[i][spin] = st.p50;
  return st.p50;
}

int bench_floor(void) {
  int fails = 0;
  for (int spin = 0; spin <= 1; spin++)
    for (int i = 0; i < N_FLOOR; i++) {
      int C = floor_channels[i];
      bench_stats st;
      note("floor C=%d spin=%d", C, spin);
      if (floor_measure(C, spin, floor_warm(), floor_reps(), &st) != 0) {
        note("floor C=%d spin=%d failed", C, spin);
        fails++;
        continue;
      }
      floor_cache[i][spin] = st.p50;
      jline j;
      j_begin(&j, "floor");
      j_int(&j, "payload_bytes", (long long)floor_payload_bytes(C));
      j_int(&j, "channels", C);
      j_bool(&j, "spin", spin);
      j_int(&j, "reps", st.n);
      j_num(&j, "p50_us", st.p50);
      j_num(&j, "p99_us", st.p99);
      j_num(&j, "mean_us", st.mean);
      j_num(&j, "min_us", st.min);
      j_emit(&j);
    }
  return fails ? -1 : 0;
}
