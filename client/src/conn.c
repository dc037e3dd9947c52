/*
 * conn.c - the blocking connection to the coordinator.
 *
 * Plain POSIX sockets: a worker makes one request and waits for its reply,
 * so an event loop would buy nothing here.  Every wait is bounded by a
 * deadline on the monotonic clock, and a connection that failed once stays
 * failed (the protocol stream cannot be trusted after a partial frame).
 *
 * Once connected the socket is blocking: a reply is waited for inside
 * recv() itself, bounded by SO_RCVTIMEO, which saves a poll() per round (a
 * system call costs a microsecond or more on a VM).  Sends never block
 * (MSG_DONTWAIT, then poll() for room).
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "internal.h"
#include "util.h"

/* Pause between connection attempts: starts small, doubles up to the cap. */
#define SBN_CONNECT_RETRY_MIN_MS 50
#define SBN_CONNECT_RETRY_MAX_MS 1000
/* Bytes asked of one recv(). */
#define SBN_RECV_CHUNK (64 * 1024)

/* ---- the connection --------------------------------------------------------- */

void sbn__conn_init(sbn__conn *c) {
  memset(c, 0, sizeof(*c));
  c->fd = -1;
  c->max_frame = SBN_MAX_FRAME_DEFAULT;
  sbn__framer_init(&c->rx, SBN_MAX_FRAME_CEILING);
  sbn__arena_init(&c->arena, 0);
  c->alloc = sbn__arena_allocator(&c->arena);
}

void sbn__conn_close(sbn__conn *c) {
  if (c->fd >= 0)
    close(c->fd);
  c->fd = -1;
  sbn__framer_release(&c->rx);
  sbn__arena_release(&c->arena);
  free(c->tx);
  c->tx = NULL;
  c->tx_cap = 0;
}

int sbn__conn_kill(sbn__conn *c, int code, const char *msg) {
  if (c->dead_code == 0) {
    c->dead_code = code;
    snprintf(c->dead_msg, sizeof(c->dead_msg), "%s", msg);
  }
  if (c->fd >= 0) {
    close(c->fd);
    c->fd = -1;
  }
  return sbn__fail(c->dead_code, "%s", c->dead_msg);
}

static int ms_left(uint64_t deadline_ms) {
  uint64_t now = sbn__now_ms();
  if (now >= deadline_ms)
    return 0;
  uint64_t left = deadline_ms - now;
  return left > INT32_MAX ? INT32_MAX : (int)left;
}

/* One non-blocking connect attempt bounded by deadline_ms. */
static int try_connect(const struct addrinfo *ai, uint64_t deadline_ms, int *err) {
  int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol);
  if (fd < 0) {
    *err = errno;
    return -1;
  }
  if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0 && errno != EINPROGRESS) {
    *err = errno;
    close(fd);
    return -1;
  }
  struct pollfd p = {.fd = fd, .events = POLLOUT};
  int r;
  do
    r = poll(&p, 1, ms_left(deadline_ms));
  while (r < 0 && errno == EINTR);
  int soerr = 0;
  socklen_t len = sizeof(soerr);
  if (r <= 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) != 0 || soerr) {
    *err = r == 0 ? ETIMEDOUT : soerr ? soerr : errno;
    close(fd);
    return -1;
  }
  int one = 1, flags = fcntl(fd, F_GETFL);
  if (flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) != 0) {
    *err = errno;
    close(fd);
    return -1;
  }
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  return fd;
}

int sbn__conn_open(sbn__conn *c, const char *host, int port, uint64_t deadline_ms) {
  char portstr[16];
  snprintf(portstr, sizeof(portstr), "%d", port);
  struct addrinfo hints = {0}, *res = NULL;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  int gai = getaddrinfo(host, portstr, &hints, &res);
  if (gai != 0)
    return sbn__fail(SBN_ECONNECT, "cannot resolve coordinator host '%s': %s", host,
                     gai_strerror(gai));
  int delay = SBN_CONNECT_RETRY_MIN_MS, err = 0, attempts = 0;
  for (;;) {
    attempts++;
    for (struct addrinfo *ai = res; ai != NULL; ai = ai->ai_next) {
      int fd = try_connect(ai, deadline_ms, &err);
      if (fd >= 0) {
        freeaddrinfo(res);
        c->fd = fd;
        c->rcvtimeo_ms = 0;
        c->dead_code = 0;
        return SBN_OK;
      }
    }
    int left = ms_left(deadline_ms);
    if (left == 0)
      break;
    usleep((useconds_t)(delay < left ? delay : left) * 1000u);
    delay = delay * 2 > SBN_CONNECT_RETRY_MAX_MS ? SBN_CONNECT_RETRY_MAX_MS : delay * 2;
  }
  freeaddrinfo(res);
  return sbn__fail(SBN_ECONNECT, "cannot connect to coordinator '%s:%d' after %d attempts: %s",
                   host, port, attempts, strerror(err));
}

/* Waits until fd is ready for events or deadline_ms passes. */
static int wait_fd(sbn__conn *c, short events, uint64_t deadline_ms) {
  struct pollfd p = {.fd = c->fd, .events = events};
  for (;;) {
    int left = ms_left(deadline_ms);
    int r = poll(&p, 1, left);
    if (r > 0)
      return SBN_OK;
    if (r == 0)
      return SBN_ETIMEDOUT;
    if (errno != EINTR)
      return SBN_EIO;
  }
}

/* Room for len bytes in the connection's encode buffer, or NULL. */
static uint8_t *tx_room(sbn__conn *c, size_t len) {
  if (len > c->tx_cap) {
    uint8_t *nb = realloc(c->tx, len);
    if (nb == NULL)
      return NULL;
    c->tx = nb;
    c->tx_cap = len;
  }
  return c->tx;
}

static int too_big(const sbn__conn *c, size_t body) {
  return sbn__fail(SBN_ETOOBIG,
                   "message of %zu bytes exceeds the coordinator's frame limit of %u bytes", body,
                   (unsigned)c->max_frame);
}

/* Writes the iovecs (consumed as they go out) before deadline_ms. */
static int send_all(sbn__conn *c, struct iovec *iov, int iovcnt, uint64_t deadline_ms) {
  struct msghdr mh;
  memset(&mh, 0, sizeof(mh));
  while (iovcnt > 0) {
    if (iov->iov_len == 0) {
      iov++;
      iovcnt--;
      continue;
    }
    mh.msg_iov = iov;
    mh.msg_iovlen = (size_t)iovcnt;
    ssize_t n = sendmsg(c->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      size_t left = (size_t)n;
      while (left > 0 && left >= iov->iov_len) {
        left -= iov->iov_len;
        iov++;
        iovcnt--;
      }
      if (left > 0) {
        iov->iov_base = (uint8_t *)iov->iov_base + left;
        iov->iov_len -= left;
      }
      continue;
    }
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      int rc = wait_fd(c, POLLOUT, deadline_ms);
      if (rc == SBN_OK)
        continue;
      /* A partial frame is on the wire: the stream is unusable now. */
      return sbn__conn_kill(c, rc == SBN_ETIMEDOUT ? SBN_ETIMEDOUT : SBN_EIO,
                            rc == SBN_ETIMEDOUT ? "timed out sending to the coordinator"
                                                : "poll failed while sending to the coordinator");
    }
    char msg[200];
    snprintf(msg, sizeof(msg), "lost the connection to the coordinator: %s", strerror(errno));
    return sbn__conn_kill(c, SBN_ECLOSED, msg);
  }
  return SBN_OK;
}

static int not_connected(const sbn__conn *c) {
  return c->dead_code ? sbn__fail(c->dead_code, "%s", c->dead_msg)
                      : sbn__fail(SBN_ECLOSED, "not connected to a coordinator");
}

int sbn__conn_send(sbn__conn *c, const Sbn__Envelope *env, uint64_t deadline_ms) {
  if (c->fd < 0)
    return not_connected(c);
  /* Encode into the connection's buffer, kept from one message to the next. */
  size_t body = sbn__envelope__get_packed_size(env);
  if (body > c->max_frame)
    return too_big(c, body);
  size_t len = SBN_FRAME_HEADER_SIZE + body;
  uint8_t *buf = tx_room(c, len);
  if (buf == NULL)
    return sbn__fail(SBN_ENOMEM, "cannot encode a message of %zu bytes: out of memory", len);
  sbn__frame_header_write(buf, (uint32_t)body);
  sbn__envelope__pack(env, buf + SBN_FRAME_HEADER_SIZE);
  struct iovec iov = {.iov_base = buf, .iov_len = len};
  return send_all(c, &iov, 1, deadline_ms);
}

int sbn__conn_send_tail(sbn__conn *c, const Sbn__Envelope *env, uint32_t field, const void *tail,
                        size_t tail_bytes, uint64_t deadline_ms) {
  if (c->fd < 0)
    return not_connected(c);
  size_t prefix = 0, body = 0;
  int rc = sbn__msg_tail_prefix(env, field, tail_bytes, c->max_frame, NULL, 0, &prefix, &body);
  if (rc == SBN_ETOOBIG)
    return too_big(c, body);
  if (rc != SBN_OK)
    return sbn__fail(rc, "cannot encode a message with a raw field %u", (unsigned)field);
  uint8_t *buf = tx_room(c, prefix);
  if (buf == NULL)
    return sbn__fail(SBN_ENOMEM, "cannot encode a message of %zu bytes: out of memory", prefix);
  sbn__msg_tail_prefix(env, field, tail_bytes, c->max_frame, buf, prefix, &prefix, &body);
  struct iovec iov[2] = {{.iov_base = buf, .iov_len = prefix},
                         {.iov_base = (void *)tail, .iov_len = tail_bytes}};
  return send_all(c, iov, 2, deadline_ms);
}

int sbn__rcvtimeo_next(int cur_ms, int left_ms) {
  if (cur_ms != 0 && cur_ms <= left_ms && cur_ms >= left_ms / 4)
    return 0;
  return left_ms > 1 ? left_ms / 2 : 1;
}

/* Makes a blocking recv() on c return within left_ms (> 0). */
static int bound_recv(sbn__conn *c, int left_ms) {
  int ms = sbn__rcvtimeo_next(c->rcvtimeo_ms, left_ms);
  if (ms == 0)
    return 0;
  struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};
  if (setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) != 0)
    return -1;
  c->rcvtimeo_ms = ms;
  return 0;
}

int sbn__conn_recv(sbn__conn *c, Sbn__Envelope **out, uint64_t deadline_ms) {
  *out = NULL;
  if (c->fd < 0)
    return c->dead_code ? sbn__fail(c->dead_code, "%s", c->dead_msg)
                        : sbn__fail(SBN_ECLOSED, "not connected to a coordinator");
  /* Spinning reads the socket without waiting (MSG_DONTWAIT) until spin_us
   * pass; then, and always when not spinning, recv() itself waits, bounded
   * by SO_RCVTIMEO and the deadline. */
  int spinning = c->spin_us > 0;
  uint64_t spin_end = spinning ? sbn__now_ns() + (uint64_t)c->spin_us * 1000u : 0;
  for (;;) {
    const uint8_t *body;
    size_t len;
    int r = sbn__framer_next(&c->rx, &body, &len);
    if (r > 0) {
      char err[160];
      sbn__arena_reset(&c->arena); /* the previous reply is released by now */
      /* A Result's allreduce values stay in the receive buffer (no copy). */
      Sbn__Envelope *env = sbn__msg_decode_tail(&c->alloc, body, len, err, sizeof(err));
      if (env == NULL && c->arena.failed)
        return sbn__conn_kill(c, SBN_ENOMEM, "out of memory decoding the coordinator's reply");
      if (env == NULL) {
        char msg[200];
        snprintf(msg, sizeof(msg), "bad message from the coordinator: %s", err);
        return sbn__conn_kill(c, SBN_EPROTO, msg);
      }
      *out = env;
      return SBN_OK;
    }
    if (r < 0) {
      char msg[200];
      snprintf(msg, sizeof(msg), "bad frame from the coordinator: %s", c->rx.errmsg);
      return sbn__conn_kill(c, r, msg);
    }
    if (!spinning) {
      int left = ms_left(deadline_ms);
      if (left == 0)
        return sbn__fail(SBN_ETIMEDOUT, "no reply from the coordinator in time");
      if (bound_recv(c, left) != 0)
        return sbn__conn_kill(c, SBN_EIO, "cannot bound the wait for the coordinator");
    }
    uint8_t *space;
    long room = sbn__framer_space(&c->rx, SBN_RECV_CHUNK, &space);
    if (room < 0)
      return sbn__conn_kill(c, (int)room, "cannot buffer the coordinator's reply");
    ssize_t n = recv(c->fd, space, (size_t)room, spinning ? MSG_DONTWAIT : 0);
    if (n > 0) {
      sbn__framer_commit(&c->rx, (size_t)n);
      continue;
    }
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      /* Spinning and nothing yet, or SO_RCVTIMEO expired: the loop checks
       * the deadline. */
      if (spinning && (sbn__now_ns() >= spin_end || ms_left(deadline_ms) == 0))
        spinning = 0;
      else if (spinning)
        sched_yield(); /* lets a worker or coordinator sharing this core run */
      continue;
    }
    char msg[200];
    if (n == 0)
      snprintf(msg, sizeof(msg), "the coordinator closed the connection");
    else
      snprintf(msg, sizeof(msg), "lost the connection to the coordinator: %s", strerror(errno));
    return sbn__conn_kill(c, SBN_ECLOSED, msg);
  }
}
