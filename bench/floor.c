/*
 * floor.c - the physical floor of one round: a raw TCP ping-pong between two
 * processes on 127.0.0.1 with TCP_NODELAY, both ways the size of a forward
 * round's message (2*C doubles plus a small header).
 *
 * Blocking variant: both ends sleep in recv().  Spinning variant: both ends
 * busy-poll recv(MSG_DONTWAIT), as a worker with spin_us does while it
 * waits for its reply.
 *
 * Star floor (`floor_star`): the same messages through the smallest relay
 * one can write, N worker processes and one relay process: each worker
 * sends its message and waits for the reply; the relay reads until every
 * worker's message is in, then writes the reply to each.  It is a round's
 * topology with nothing else (no framing, decoding, merging or checks), so
 * `round` p50 over it is what the coordinator adds to the topology.  Its
 * spinning variant polls everywhere and yields the CPU between polls, as
 * sbn's workers (spin_us) and coordinator (--spin-us) do: three or more
 * processes spinning on two cores must let each other run.
 */
#define _GNU_SOURCE
#include "bench.h"

#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

/* Frame header (12) + envelope and Contribute fields besides a[] and b[]. */
#define FLOOR_HEADER_BYTES 48
#define FLOOR_IO_TIMEOUT_MS 10000

static const int floor_channels[] = {64, 256, 1024, 4096};
#define N_FLOOR (int)(sizeof(floor_channels) / sizeof(floor_channels[0]))

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

/* How recv_all waits. */
enum { WAIT_SLEEP = 0, WAIT_SPIN = 1, WAIT_SPIN_YIELD = 2 };

/* Receives exactly len bytes; WAIT_SPIN busy-polls, WAIT_SPIN_YIELD also
 * yields the CPU between polls, WAIT_SLEEP sleeps in poll() then reads.
 * Bounded in time. */
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
      if (spin == WAIT_SPIN_YIELD)
        sched_yield();
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
  int fd = loopback_connect(a->port);
  if (fd < 0)
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

/* One measurement: warm + reps round trips; fills st (microseconds) and,
 * when keep is not NULL, keep[reps] with the round trips themselves. */
static int floor_measure(int channels, int spin, int warm, int reps, bench_stats *st,
                         double *keep) {
  size_t bytes = floor_payload_bytes(channels);
  int port;
  int lfd = loopback_listen(4, &port);
  if (lfd < 0)
    return -1;
  floor_arg a = {.port = port, .bytes = bytes, .spin = spin, .total = warm + reps};
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
  if (keep != NULL)
    memcpy(keep, lat, sizeof(double) * (size_t)reps);
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

/*
 * On the VMs this was written on, the first bench of a run on a quiet
 * machine came out up to twice as slow as the same bench later in the run
 * (round N=2, C=256 blocking: 77-107 us as the only bench, 40-42 us after
 * the floor bench); busy loops on both CPUs before it did not help, loopback
 * round trips did, though not every time (57-73 us after 0.5-1.5 s of them,
 * and the star floor next to it still moved between 36 and 75 us).
 * Blocking round trips of a round's size until `seconds` have passed.
 */
void bench_warm_up(double seconds) {
  const double end = now_s() + seconds;
  bench_stats st;
  while (now_s() < end && floor_measure(256, 0, 0, 1000, &st, NULL) == 0) {
  }
}

static int floor_reps(void) { return bench_reps(5000, 300); }
static int floor_warm(void) { return g_opts.quick ? 50 : 500; }

/* ---- star floor ----------------------------------------------------------- */

/* Workers of the star floor, at most (the round bench's largest N). */
#define STAR_WORKERS_MAX 8

typedef struct star_arg {
  int port;
  size_t bytes;
  int spin; /* poll and yield instead of sleeping */
  int warm, total; /* round trips, warm-up ones first */
  double *lat;     /* [total - warm] in shared memory, written by worker 0 */
} star_arg;

/* A star worker: connects, then sends and awaits `total` messages; worker 0
 * times each round trip after the warm-up. */
static int star_worker(int index, void *argp) {
  star_arg *a = argp;
  int fd = loopback_connect(a->port);
  if (fd < 0)
    return 1;
  set_nodelay(fd);
  char *buf = malloc(a->bytes);
  if (buf == NULL)
    return 1;
  memset(buf, 0x5a, a->bytes);
  for (int i = 0; i < a->total; i++) {
    double t0 = now_s();
    if (send_all(fd, buf, a->bytes) != 0 ||
        recv_all(fd, buf, a->bytes, a->spin ? WAIT_SPIN_YIELD : WAIT_SLEEP) != 0)
      return 1;
    if (index == 0 && i >= a->warm)
      a->lat[i - a->warm] = (now_s() - t0) * 1e6;
  }
  free(buf);
  close(fd);
  return 0;
}

/* The relay's side of one round: reads every worker's message (sleeping in
 * poll() like an event loop, or polling and yielding with spin), then
 * writes the reply to each in turn. */
static int star_relay_round(const int *fd, int n, char *buf, size_t bytes, int spin) {
  size_t got[STAR_WORKERS_MAX] = {0};
  struct pollfd pf[STAR_WORKERS_MAX];
  int complete = 0;
  long long deadline = now_ms() + FLOOR_IO_TIMEOUT_MS;
  while (complete < n) {
    int np = 0;
    for (int i = 0; i < n; i++)
      if (got[i] < bytes)
        pf[np++] = (struct pollfd){.fd = fd[i], .events = POLLIN};
    int ready = poll(pf, (nfds_t)np, spin ? 0 : 1000);
    if (now_ms() > deadline || ready < 0)
      return -1;
    if (ready == 0 && spin)
      sched_yield();
    for (int k = 0; k < np; k++) {
      if (!(pf[k].revents & (POLLIN | POLLHUP | POLLERR)))
        continue;
      int i = 0;
      while (fd[i] != pf[k].fd)
        i++;
      ssize_t r = recv(fd[i], buf + got[i], bytes - got[i], MSG_DONTWAIT);
      if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR))
        return -1;
      if (r > 0 && (got[i] += (size_t)r) == bytes)
        complete++;
    }
  }
  for (int i = 0; i < n; i++)
    if (send_all(fd[i], buf, bytes) != 0)
      return -1;
  return 0;
}

/* This process's CPU time (user + system), in microseconds. */
static double self_cpu_us(void) {
  struct rusage ru;
  if (getrusage(RUSAGE_SELF, &ru) != 0)
    return NAN;
  return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1e6 +
         (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}

/* One star measurement: fills st (us), *relay_cpu_us, the relay's CPU
 * time per timed round, and keep[reps] (when not NULL) with worker 0's
 * round trips. */
static int star_measure(int n, int channels, int spin, int warm, int reps, bench_stats *st,
                        double *relay_cpu_us, double *keep) {
  if (n < 1 || n > STAR_WORKERS_MAX || reps < 1)
    return -1;
  size_t bytes = floor_payload_bytes(channels);
  int port;
  int lfd = loopback_listen(STAR_WORKERS_MAX, &port);
  if (lfd < 0)
    return -1;
  star_arg *a = shared_alloc(sizeof(*a) + sizeof(double) * (size_t)reps);
  if (a == NULL) {
    close(lfd);
    return -1;
  }
  *a = (star_arg){.port = port, .bytes = bytes, .spin = spin, .warm = warm, .total = warm + reps,
                  .lat = (double *)(a + 1)};
  procs ps;
  int fd[STAR_WORKERS_MAX], nfd = 0, rc = -1;
  char *buf = malloc(bytes);
  if (buf == NULL || procs_start(&ps, n, star_worker, a) != 0) {
    free(buf);
    close(lfd);
    shared_free(a, sizeof(*a) + sizeof(double) * (size_t)reps);
    return -1;
  }
  while (nfd < n) {
    struct pollfd pf = {.fd = lfd, .events = POLLIN};
    if (poll(&pf, 1, FLOOR_IO_TIMEOUT_MS) != 1 || (fd[nfd] = accept(lfd, NULL, NULL)) < 0)
      goto out;
    set_nodelay(fd[nfd++]);
  }
  double cpu0 = 0;
  for (int i = 0; i < warm + reps; i++) {
    if (i == warm)
      cpu0 = self_cpu_us();
    if (star_relay_round(fd, n, buf, bytes, spin) != 0)
      goto out;
  }
  *relay_cpu_us = (self_cpu_us() - cpu0) / reps;
  rc = 0;
out:
  for (int i = 0; i < nfd; i++)
    close(fd[i]);
  close(lfd);
  if (procs_wait(&ps, rc == 0 ? FLOOR_IO_TIMEOUT_MS : 100) != n && rc == 0) {
    note("floor_star: a worker failed");
    rc = -1;
  }
  if (rc == 0 && keep != NULL)
    memcpy(keep, a->lat, sizeof(double) * (size_t)reps);
  if (rc == 0)
    stats_compute(a->lat, reps, st);
  free(buf);
  shared_free(a, sizeof(*a) + sizeof(double) * (size_t)reps);
  return rc;
}

int floor_star_samples(int workers, int channels, int spin, int reps, double *out,
                       double *relay_cpu_us) {
  bench_stats st;
  *relay_cpu_us = NAN;
  return star_measure(workers, channels, spin != 0, floor_warm() / 5, reps, &st, relay_cpu_us,
                      out);
}

int floor_samples(int channels, int spin, int reps, double *out) {
  bench_stats st;
  return floor_measure(channels, spin != 0, floor_warm() / 5, reps, &st, out);
}

int bench_floor(void) {
  int fails = 0;
  for (int spin = 0; spin <= 1; spin++)
    for (int i = 0; i < N_FLOOR; i++) {
      int C = floor_channels[i];
      bench_stats st;
      note("floor C=%d spin=%d", C, spin);
      if (floor_measure(C, spin, floor_warm(), floor_reps(), &st, NULL) != 0) {
        note("floor C=%d spin=%d failed", C, spin);
        fails++;
        continue;
      }
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
