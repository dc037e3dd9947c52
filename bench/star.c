/*
 * star.c - the physical floor of an allreduce through one process in the
 * middle, the topology of sbn's coordinator: a raw TCP star on 127.0.0.1.
 * Also the loopback socket helpers the benches share.
 *
 * N forked worker processes each connect to one relay (the bench process
 * itself) with TCP_NODELAY.  In a repetition every worker sends B bytes of
 * float32 and receives B bytes back, both at once on a non-blocking socket.
 * The relay reads from all workers at once, into one region buffer per
 * worker, folds each complete region into a float accumulator (the last
 * worker's fold also takes the mean), and streams a region's result back to
 * every worker as soon as all N have delivered it, while it still reads the
 * next regions.  So the relay moves the 2*N*B bytes any allreduce through one
 * relay must move, with no framing, no decoding and no work on the data but
 * the sum.  Worker 0 times a repetition from its start signal to its last
 * byte received.
 */
#define _GNU_SOURCE
#include "bench.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "sbn/comm.h"

/* The unit the relay sums and releases: sbn's chunk, so that both wait for
 * the same amount of data before the first result can flow back. */
#define STAR_REGION_BYTES ((size_t)SBN_CHUNK_BYTES)
#define STAR_MAX_WORKERS 64
/* Nothing moved on any socket for this long: the measurement fails. */
#define STAR_IDLE_TIMEOUT_MS 10000
/* poll() wakes at least this often to check the deadline. */
#define STAR_POLL_MS 1000
/* The relay waits this long for all workers to connect. */
#define STAR_ACCEPT_TIMEOUT_MS 10000
/* Workers still running this long after the last repetition are killed. */
#define STAR_EXIT_TIMEOUT_MS 10000
/* The barrier before each repetition: every worker sends READY, then the
 * relay sends GO to each. */
#define STAR_READY 'r'
#define STAR_GO 'g'

static int would_block(int err) {
  return err == EAGAIN || err == EWOULDBLOCK || err == EINTR;
}

/* One non-blocking send: bytes sent (0 when the socket is full) or -1. */
static ssize_t send_some(int fd, const void *p, size_t len) {
  ssize_t k = send(fd, p, len, MSG_NOSIGNAL | MSG_DONTWAIT);
  if (k < 0)
    return would_block(errno) ? 0 : -1;
  return k;
}

/* One non-blocking receive: bytes received (0 when none are there) or -1,
 * also when the peer closed. */
static ssize_t recv_some(int fd, void *p, size_t len) {
  ssize_t k = recv(fd, p, len, MSG_DONTWAIT);
  if (k == 0)
    return -1;
  if (k < 0)
    return would_block(errno) ? 0 : -1;
  return k;
}

/* Sends slen bytes from sbuf and receives rlen bytes into rbuf on fd at the
 * same time (full duplex: a star worker must not finish sending before it
 * starts reading, or the relay's replies back up).  Fails when nothing moves
 * for STAR_IDLE_TIMEOUT_MS. */
static int xfer(int fd, const char *sbuf, size_t slen, char *rbuf, size_t rlen) {
  size_t so = 0, ro = 0;
  long long deadline = now_ms() + STAR_IDLE_TIMEOUT_MS;
  while (so < slen || ro < rlen) {
    struct pollfd pf = {.fd = fd,
                        .events = (short)((so < slen ? POLLOUT : 0) | (ro < rlen ? POLLIN : 0))};
    if (poll(&pf, 1, STAR_POLL_MS) < 0 && errno != EINTR)
      return -1;
    /* A hang-up is an error unless data may still wait to be read. */
    if ((pf.revents & (POLLERR | POLLNVAL)) || ((pf.revents & POLLHUP) && ro == rlen))
      return -1;
    ssize_t sent = 0, got = 0;
    if (so < slen && (pf.revents & POLLOUT) && (sent = send_some(fd, sbuf + so, slen - so)) < 0)
      return -1;
    if (ro < rlen && (pf.revents & (POLLIN | POLLHUP)) &&
        (got = recv_some(fd, rbuf + ro, rlen - ro)) < 0)
      return -1;
    so += (size_t)sent;
    ro += (size_t)got;
    if (sent > 0 || got > 0)
      deadline = now_ms() + STAR_IDLE_TIMEOUT_MS;
    else if (now_ms() > deadline)
      return -1;
  }
  return 0;
}

int loopback_listen(int backlog, int *port) {
  int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (lfd < 0)
    return -1;
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = 0};
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t sl = sizeof(sa);
  if (bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) != 0 || listen(lfd, backlog) != 0 ||
      getsockname(lfd, (struct sockaddr *)&sa, &sl) != 0) {
    close(lfd);
    return -1;
  }
  *port = ntohs(sa.sin_port);
  return lfd;
}

int loopback_connect(int port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return -1;
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
    int err = errno;
    close(fd);
    errno = err;
    return -1;
  }
  return fd;
}

static void set_nodelay_nonblock(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

/* ---- a worker ----------------------------------------------------------------- */

typedef struct star_arg {
  int port;
  size_t bytes;
  int workers;
  int warm, reps;
  bench_ctl *ctl;
  double *lat; /* [reps], worker 0, milliseconds */
} star_arg;

static int star_worker(int index, void *argp) {
  star_arg *a = argp;
  size_t n = a->bytes / sizeof(float);
  int fd = loopback_connect(a->port);
  if (fd < 0)
    return ctl_fail(a->ctl, "star worker %d: connect: %s", index, strerror(errno));
  set_nodelay_nonblock(fd);
  float *out = malloc(a->bytes), *in = malloc(a->bytes);
  if (out == NULL || in == NULL)
    return ctl_fail(a->ctl, "star worker %d: out of memory", index);
  /* Worker w sends w + 1 everywhere, so every mean is (N + 1) / 2. */
  for (size_t i = 0; i < n; i++)
    out[i] = (float)(index + 1);
  memset(in, 0, a->bytes); /* touch the pages before the timed part */
  const float want = 0.5f * (float)(a->workers + 1);
  for (int r = 0; r < a->warm + a->reps; r++) {
    char ready = STAR_READY, go = 0;
    if (xfer(fd, &ready, 1, NULL, 0) != 0 || xfer(fd, NULL, 0, &go, 1) != 0 || go != STAR_GO)
      return ctl_fail(a->ctl, "star worker %d: no start signal", index);
    double t0 = now_s();
    if (xfer(fd, (const char *)out, a->bytes, (char *)in, a->bytes) != 0)
      return ctl_fail(a->ctl, "star worker %d: transfer failed in repetition %d", index, r);
    double t1 = now_s();
    if (n > 0 && (fabsf(in[0] - want) > 1e-5f * want || fabsf(in[n - 1] - want) > 1e-5f * want))
      return ctl_fail(a->ctl, "star worker %d: mean %g, expected %g", index, (double)in[0],
                      (double)want);
    if (index == 0 && r >= a->warm)
      a->lat[r - a->warm] = (t1 - t0) * 1e3;
  }
  free(out);
  free(in);
  close(fd);
  return 0;
}

/* ---- the relay ------------------------------------------------------------------ */

typedef struct star_relay {
  int n;
  int fd[STAR_MAX_WORKERS];
  char *region[STAR_MAX_WORKERS]; /* the region being received from each */
  size_t bytes;
  float *acc;  /* [bytes / 4]: the sums, then the means sent back */
  int *folded; /* [regions]: workers folded into each region so far */
  size_t regions;
} star_relay;

static size_t region_len(const star_relay *s, size_t k) {
  size_t left = s->bytes - k * STAR_REGION_BYTES;
  return left < STAR_REGION_BYTES ? left : STAR_REGION_BYTES;
}

/* The first worker's region is copied, the others' added; the last fold
 * also takes the mean, so no pass of its own is needed. */
static void fold(float *restrict dst, const float *restrict src, size_t n, int first, int last,
                 float scale) {
  if (first && last) {
    for (size_t i = 0; i < n; i++)
      dst[i] = src[i] * scale;
  } else if (first) {
    memcpy(dst, src, n * sizeof(float));
  } else if (last) {
    for (size_t i = 0; i < n; i++)
      dst[i] = (dst[i] + src[i]) * scale;
  } else {
    for (size_t i = 0; i < n; i++)
      dst[i] += src[i];
  }
}

/* Bytes of a worker's stream folded into acc once rcv bytes arrived. */
static size_t folded_prefix(const star_relay *s, size_t rcv) {
  return rcv == s->bytes ? rcv : rcv - rcv % STAR_REGION_BYTES;
}

/* Every worker sends READY; then each gets GO. */
static int relay_barrier(star_relay *s) {
  for (int i = 0; i < s->n; i++) {
    char c = 0;
    if (xfer(s->fd[i], NULL, 0, &c, 1) != 0 || c != STAR_READY)
      return -1;
  }
  for (int i = 0; i < s->n; i++) {
    char go = STAR_GO;
    if (xfer(s->fd[i], &go, 1, NULL, 0) != 0)
      return -1;
  }
  return 0;
}

/* One repetition: read and fold every worker's B bytes while the finished
 * regions stream back to all of them. */
static int relay_round(star_relay *s) {
  size_t rcv[STAR_MAX_WORKERS] = {0}, snd[STAR_MAX_WORKERS] = {0};
  struct pollfd pf[STAR_MAX_WORKERS];
  size_t ready = 0; /* the prefix of acc every worker has been folded into */
  const float scale = 1.0f / (float)s->n;
  memset(s->folded, 0, sizeof(int) * s->regions);
  long long deadline = now_ms() + STAR_IDLE_TIMEOUT_MS;
  for (;;) {
    int serving = 0;
    for (int i = 0; i < s->n; i++) {
      /* A worker that has everything may close (after the last repetition):
       * its socket is left out, or its hang-up would read as a failure. */
      int busy = rcv[i] < s->bytes || snd[i] < s->bytes;
      pf[i].fd = busy ? s->fd[i] : -1;
      pf[i].events = (short)((rcv[i] < s->bytes ? POLLIN : 0) | (snd[i] < ready ? POLLOUT : 0));
      pf[i].revents = 0;
      serving += busy;
    }
    if (!serving)
      return 0;
    if (poll(pf, (nfds_t)s->n, STAR_POLL_MS) < 0 && errno != EINTR)
      return -1;
    int moved = 0;
    for (int i = 0; i < s->n; i++) {
      /* A worker hangs up only when it has failed. */
      if (pf[i].revents & (POLLERR | POLLHUP | POLLNVAL))
        return -1;
      if (pf[i].revents & POLLIN) {
        size_t k = rcv[i] / STAR_REGION_BYTES, off = rcv[i] % STAR_REGION_BYTES;
        size_t len = region_len(s, k);
        ssize_t got = recv_some(s->fd[i], s->region[i] + off, len - off);
        if (got < 0)
          return -1;
        rcv[i] += (size_t)got;
        moved |= got > 0;
        if (off + (size_t)got == len) {
          int c = s->folded[k]++;
          fold(s->acc + k * (STAR_REGION_BYTES / sizeof(float)), (const float *)s->region[i],
               len / sizeof(float), c == 0, c == s->n - 1, scale);
        }
      }
      if (pf[i].revents & POLLOUT) {
        ssize_t sent = send_some(s->fd[i], (const char *)s->acc + snd[i], ready - snd[i]);
        if (sent < 0)
          return -1;
        snd[i] += (size_t)sent;
        moved |= sent > 0;
      }
    }
    ready = s->bytes;
    for (int i = 0; i < s->n; i++) {
      size_t p = folded_prefix(s, rcv[i]);
      ready = p < ready ? p : ready;
    }
    if (moved)
      deadline = now_ms() + STAR_IDLE_TIMEOUT_MS;
    else if (now_ms() > deadline)
      return -1;
  }
}

/* Accepts n connections within STAR_ACCEPT_TIMEOUT_MS; 0 or -1. */
static int relay_accept(star_relay *s, int lfd, int n) {
  long long deadline = now_ms() + STAR_ACCEPT_TIMEOUT_MS;
  while (s->n < n) {
    long long left = deadline - now_ms();
    struct pollfd pf = {.fd = lfd, .events = POLLIN};
    if (left <= 0)
      return -1;
    int r = poll(&pf, 1, (int)left);
    if (r < 0 && errno != EINTR)
      return -1;
    if (r <= 0)
      continue;
    int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0)
      return -1;
    set_nodelay_nonblock(fd);
    s->fd[s->n++] = fd;
  }
  return 0;
}

static void relay_free(star_relay *s) {
  for (int i = 0; i < s->n; i++) {
    close(s->fd[i]);
    free(s->region[i]);
  }
  free(s->acc);
  free(s->folded);
}

static int relay_alloc(star_relay *s) {
  s->regions = (s->bytes + STAR_REGION_BYTES - 1) / STAR_REGION_BYTES;
  s->acc = malloc(s->bytes);
  s->folded = calloc(s->regions, sizeof(int));
  if (s->acc == NULL || s->folded == NULL)
    return -1;
  for (int i = 0; i < s->n; i++)
    if ((s->region[i] = malloc(STAR_REGION_BYTES)) == NULL)
      return -1;
  return 0;
}

/* warm + reps repetitions of the star with n workers; fills st (ms). */
static int star_measure(size_t bytes, int n, int warm, int reps, bench_stats *st) {
  if (n < 1 || n > STAR_MAX_WORKERS || bytes == 0 || bytes % sizeof(float) != 0 || reps < 1)
    return -1;
  int port = 0;
  int lfd = loopback_listen(n, &port);
  if (lfd < 0)
    return -1;
  size_t off_lat = (sizeof(bench_ctl) + 7) & ~(size_t)7;
  size_t size = off_lat + sizeof(double) * (size_t)reps;
  char *sh = shared_alloc(size);
  if (sh == NULL) {
    close(lfd);
    return -1;
  }
  star_arg a = {.port = port, .bytes = bytes, .workers = n, .warm = warm,
                .reps = reps, .ctl = (bench_ctl *)sh, .lat = (double *)(sh + off_lat)};
  star_relay s = {.n = 0, .bytes = bytes};
  procs ps;
  int rc = -1;
  if (procs_start(&ps, n, star_worker, &a) != 0) {
    close(lfd);
    shared_free(sh, size);
    return -1;
  }
  if (relay_accept(&s, lfd, n) != 0 || relay_alloc(&s) != 0)
    goto out;
  for (int r = 0; r < warm + reps; r++)
    if (relay_barrier(&s) != 0 || relay_round(&s) != 0)
      goto out;
  rc = 0;
out:
  close(lfd);
  relay_free(&s); /* on failure the workers see EOF and give up at once */
  if (procs_wait(&ps, rc == 0 ? STAR_EXIT_TIMEOUT_MS : 100) != n) {
    note("allreduce floor: %s", a.ctl->err[0] ? a.ctl->err : "a worker failed");
    rc = -1;
  }
  if (rc == 0)
    stats_compute(a.lat, reps, st);
  shared_free(sh, size);
  return rc;
}

double allreduce_floor_p50_ms(size_t bytes, int workers, int warm, int reps) {
  bench_stats st;
  note("allreduce floor N=%d bytes=%zu", workers, bytes);
  if (star_measure(bytes, workers, warm, reps, &st) != 0) {
    note("allreduce floor N=%d bytes=%zu failed", workers, bytes);
    return NAN;
  }
  jline j;
  j_begin(&j, "allreduce_floor");
  j_int(&j, "bytes", (long long)bytes);
  j_int(&j, "workers", workers);
  j_int(&j, "reps", st.n);
  j_num(&j, "p50_ms", st.p50);
  j_num(&j, "p99_ms", st.p99);
  j_num(&j, "min_ms", st.min);
  j_num(&j, "gbps", (double)bytes / (st.p50 * 1e-3) / 1e9);
  j_emit(&j);
  return st.p50;
}
