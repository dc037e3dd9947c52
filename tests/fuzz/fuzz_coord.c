/*
 * fuzz_coord.c - libFuzzer target for the coordinator's message handling:
 * two coordinators run in this process on one libuv loop (one open, one
 * with a shared secret), and each input is a script of byte strings written
 * by up to four TCP clients on 127.0.0.1.  Everything the coordinator does
 * with bytes from the network runs: framing, decoding, hello and the
 * challenge-response, jobs and generations, groups, rounds, merges, errors,
 * tombstones, deadlock detection, limits, closing.
 *
 * Input format, repeated:  op (1 byte), length (2 bytes, little endian),
 * then that many bytes (fewer at the end of the input).
 *   op & 3      the client (0-2 talk to the open coordinator, 3 to the one
 *               with a secret); a client connects on first use
 *   op & 0x80   close that client first (it reconnects on next use), with
 *               FIN when op & 0x40, else with RST
 * After every write the loop runs until the coordinators are idle.  At the
 * end of an input every client closes, and the coordinators must free every
 * connection and job: anything left is reported as a crash (a state leak).
 *
 * SBN_FUZZ_MAKE_CORPUS=DIR writes the seed corpus (valid sessions of every
 * kind) into DIR and exits.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "coord_internal.h"
#include "log.h"
#include "sbn/status.h"

#define NCLIENTS 4
#define AUTH_CLIENT 3
#define PUMP_ROUNDS 6
#define SETTLE_MAX_MS 5000
#define FUZZ_SECRET "fuzzing secret, not a real one"
#define CONNECT_TRIES 1000
#define CONNECT_RETRY_US 1000
#define CONNECT_WAIT_MS 5000

static uv_loop_t loop;
static sbn__coord *coords[2];
static int ports[2];
static int fds[NCLIENTS] = {-1, -1, -1, -1};

static void drain(int fd) {
  char buf[65536];
  while (recv(fd, buf, sizeof(buf), MSG_DONTWAIT) > 0)
    ;
}

/* Runs the loop without blocking a few times, reading what clients got. */
static void pump(void) {
  for (int i = 0; i < PUMP_ROUNDS; i++) {
    uv_run(&loop, UV_RUN_NOWAIT);
    for (int k = 0; k < NCLIENTS; k++)
      if (fds[k] >= 0)
        drain(fds[k]);
  }
}

/*
 * Closes client k: with FIN when graceful (the coordinator reads EOF),
 * else with RST (SO_LINGER 0: it reads ECONNRESET).  Abortive closes leave
 * no TIME_WAIT behind, so thousands of inputs a second do not run out of
 * ephemeral ports.
 */
static void client_close(int k, int graceful) {
  if (fds[k] < 0)
    return;
  if (!graceful) {
    struct linger lg = {1, 0};
    setsockopt(fds[k], SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
  }
  close(fds[k]);
  fds[k] = -1;
}

static int client_get(int k) {
  if (fds[k] >= 0)
    return fds[k];
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    abort();
  struct sockaddr_in a;
  memset(&a, 0, sizeof(a));
  a.sin_family = AF_INET;
  a.sin_port = htons((uint16_t)ports[k == AUTH_CLIENT]);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  /*
   * Each connection comes from the next of 65536 loopback source addresses
   * (127.1.0.0/16), each with its own ephemeral ports, so connections that
   * end in TIME_WAIT (graceful closes, on either side) never exhaust them.
   */
  static uint32_t next_src;
  struct sockaddr_in src;
  memset(&src, 0, sizeof(src));
  src.sin_family = AF_INET;
  src.sin_addr.s_addr = htonl(0x7f010000u | (next_src++ & 0xffffu));
  if (bind(fd, (struct sockaddr *)&src, sizeof(src)) != 0) {
    fprintf(stderr, "bind: %s\n", strerror(errno));
    abort();
  }
  /*
   * Non-blocking, so libFuzzer's timer signal cannot interrupt it half-way;
   * loopback connects complete from the backlog, before any accept.
   */
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  int tries = 0;
  while (connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0 && errno != EINPROGRESS) {
    if (errno != EADDRNOTAVAIL || ++tries > CONNECT_TRIES) {
      fprintf(stderr, "connect: %s\n", strerror(errno));
      abort();
    }
    usleep(CONNECT_RETRY_US);
  }
  struct pollfd pf = {.fd = fd, .events = POLLOUT};
  int err = 0;
  socklen_t elen = sizeof(err);
  while (poll(&pf, 1, CONNECT_WAIT_MS) < 0 && errno == EINTR)
    ;
  if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen) != 0 || err != 0 ||
      !(pf.revents & POLLOUT)) {
    fprintf(stderr, "connect: %s\n", strerror(err ? err : ETIMEDOUT));
    abort();
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  fds[k] = fd;
  pump();
  return fd;
}

static void client_write(int k, const uint8_t *p, size_t n) {
  int fd = client_get(k);
  while (n > 0) {
    ssize_t w = send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w > 0) {
      p += w;
      n -= (size_t)w;
    } else if (w < 0 && (errno == EAGAIN || errno == EINTR)) {
      pump();
    } else {
      client_close(k, 0); /* the coordinator closed us: fine */
      return;
    }
  }
  pump();
}

/* Every connection closed and every job gone, or a crash after a while. */
static void settle(void) {
  for (int k = 0; k < NCLIENTS; k++)
    client_close(k, 0);
  uint64_t deadline = uv_now(&loop) + SETTLE_MAX_MS;
  for (;;) {
    uv_run(&loop, UV_RUN_NOWAIT);
    int busy = 0;
    for (int i = 0; i < 2; i++)
      busy |= coords[i]->conns != NULL || coords[i]->njobs != 0 || coords[i]->jobs.count != 0;
    if (!busy)
      return;
    uv_update_time(&loop);
    if (uv_now(&loop) > deadline) {
      fprintf(stderr, "coordinator state left after the clients closed\n");
      abort();
    }
    usleep(100);
  }
}

static void write_corpus(const char *dir);

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  sbn__log_set_level(getenv("SBN_FUZZ_LOG") ? SBN_LOG_DEBUG : SBN_LOG_ERROR - 1);
  if (uv_loop_init(&loop) != 0)
    abort();
  for (int i = 0; i < 2; i++) {
    sbn__coord_config cfg;
    sbn__coord_config_init(&cfg);
    cfg.port = 0;
    /* Timeouts far away: an input is over in milliseconds. */
    cfg.round_timeout_ms = 600000;
    cfg.hello_timeout_ms = 600000;
    cfg.frame_timeout_ms = 600000;
    cfg.max_frame = 1u << 20;
    cfg.max_groups = 16;
    cfg.max_jobs = 8;
    cfg.max_rounds = 8;
    cfg.max_conns = 16;
    cfg.max_queued = SBN_COORD_MAX_QUEUED_FLOOR * 4;
    if (i == 1) {
      memcpy(cfg.secret.key, FUZZ_SECRET, strlen(FUZZ_SECRET));
      cfg.secret.len = strlen(FUZZ_SECRET);
    }
    char addr[128];
    if (sbn__coord_new(&loop, &cfg, &coords[i]) != SBN_OK ||
        sbn__coord_start(coords[i], addr, sizeof(addr)) != SBN_OK)
      abort();
    ports[i] = atoi(strrchr(addr, ':') + 1);
  }
  const char *dir = getenv("SBN_FUZZ_MAKE_CORPUS");
  if (dir != NULL) {
    write_corpus(dir);
    exit(0);
  }
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  size_t off = 0;
  while (size - off >= 3) {
    uint8_t op = data[off];
    size_t len = (size_t)data[off + 1] | ((size_t)data[off + 2] << 8);
    off += 3;
    if (len > size - off)
      len = size - off;
    int k = op & 3;
    if (op & 0x80)
      client_close(k, op & 0x40);
    if (len > 0)
      client_write(k, data + off, len);
    off += len;
  }
  settle();
  return 0;
}

/* The seed corpus */

typedef struct script {
  uint8_t buf[65536];
  size_t len;
} script;

static void put_bytes(script *s, int op, const uint8_t *p, size_t n) {
  if (s->len + 3 + n > sizeof(s->buf))
    abort();
  s->buf[s->len++] = (uint8_t)op;
  s->buf[s->len++] = (uint8_t)(n & 0xff);
  s->buf[s->len++] = (uint8_t)(n >> 8);
  memcpy(s->buf + s->len, p, n);
  s->len += n;
}

static void put_env(script *s, int op, const Sbn__Envelope *env) {
  uint8_t *b;
  size_t n;
  if (sbn__msg_encode(env, SBN_MAX_FRAME_CEILING, &b, &n) != SBN_OK)
    abort();
  put_bytes(s, op, b, n);
  free(b);
}

static void put_hello(script *s, int k, const char *job, uint32_t rank, uint32_t world,
                      uint64_t gen) {
  static uint8_t nonce[SBN_AUTH_NONCE_SIZE] = {1, 2, 3};
  Sbn__Hello h = SBN__HELLO__INIT;
  Sbn__Envelope e = SBN__ENVELOPE__INIT;
  h.protocol_version = SBN_PROTOCOL_VERSION;
  h.job = (char *)job;
  h.rank = rank;
  h.world_size = world;
  h.generation = gen;
  h.client_version = "fuzz";
  if (k == AUTH_CLIENT) {
    h.nonce.data = nonce;
    h.nonce.len = sizeof(nonce);
  }
  e.body_case = SBN__ENVELOPE__BODY_HELLO;
  e.hello = &h;
  put_env(s, k, &e);
}

static void put_contrib(script *s, int k, const uint32_t *members, size_t nm, uint64_t seq,
                        int phase, const char *layer, uint32_t C, uint64_t count, double v,
                        int op) {
  double a[8], b[8];
  float f[8];
  for (int i = 0; i < 8; i++) {
    a[i] = v + i;
    b[i] = (double)i;
    f[i] = (float)(v * i);
  }
  Sbn__Contribute m = SBN__CONTRIBUTE__INIT;
  Sbn__Envelope e = SBN__ENVELOPE__INIT;
  m.members = (uint32_t *)members;
  m.n_members = nm;
  m.seq = seq;
  m.phase = (Sbn__Phase)phase;
  m.layer = (char *)layer;
  m.channels = C;
  m.count = count;
  if (phase == SBN__PHASE__PHASE_FORWARD || phase == SBN__PHASE__PHASE_BACKWARD) {
    m.a = a;
    m.b = b;
    m.n_a = m.n_b = C;
  } else if (phase == SBN__PHASE__PHASE_ALLREDUCE) {
    m.fvals = f;
    m.n_fvals = C;
    m.op = (Sbn__ReduceOp)op;
  } else if (phase == SBN__PHASE__PHASE_BROADCAST && k == 0) {
    m.blob.data = (uint8_t *)"payload";
    m.blob.len = 7;
  } else if (phase == SBN__PHASE__PHASE_MODEL_CHECK) {
    m.blob.data = (uint8_t *)(v > 0 ? "bn1 4\nbn2 8\n" : "bn1 4\nbn2 16\n");
    m.blob.len = strlen((const char *)m.blob.data);
  }
  e.body_case = SBN__ENVELOPE__BODY_CONTRIBUTE;
  e.contribute = &m;
  put_env(s, k, &e);
}

static void save(const char *dir, const char *name, const script *s) {
  char path[1024];
  snprintf(path, sizeof(path), "%s/%s", dir, name);
  FILE *f = fopen(path, "wb");
  if (f == NULL || fwrite(s->buf, 1, s->len, f) != s->len)
    abort();
  fclose(f);
}

static void write_corpus(const char *dir) {
  static script s;
  static const int phases[] = {SBN__PHASE__PHASE_FORWARD,   SBN__PHASE__PHASE_BACKWARD,
                               SBN__PHASE__PHASE_ALLREDUCE, SBN__PHASE__PHASE_BROADCAST,
                               SBN__PHASE__PHASE_BARRIER,   SBN__PHASE__PHASE_MODEL_CHECK};
  static const char *const names[] = {"forward",   "backward", "allreduce",
                                      "broadcast", "barrier",  "model_check"};
  for (int p = 0; p < 6; p++) {
    /* Two ranks, two rounds of one phase (the second disagrees for model check). */
    s.len = 0;
    put_hello(&s, 0, "job", 0, 2, 0);
    put_hello(&s, 1, "job", 1, 2, 0);
    for (uint64_t seq = 0; seq < 2; seq++) {
      uint32_t C = phases[p] <= SBN__PHASE__PHASE_ALLREDUCE ? 4 : 0;
      put_contrib(&s, 0, NULL, 0, seq, phases[p], "bn", C, 3, 1.0, (int)seq);
      put_contrib(&s, 1, NULL, 0, seq, phases[p], "bn", C, 5, seq ? -1.0 : 2.0, (int)seq);
    }
    save(dir, names[p], &s);
  }
  /* Three ranks, subgroups, a deadlock, a mismatch, a tombstone. */
  s.len = 0;
  static const uint32_t g01[] = {0, 1}, g12[] = {1, 2};
  put_hello(&s, 0, "grp", 0, 3, 0);
  put_hello(&s, 1, "grp", 1, 3, 0);
  put_hello(&s, 2, "grp", 2, 3, 0);
  put_contrib(&s, 0, g01, 2, 0, SBN__PHASE__PHASE_FORWARD, "a", 2, 1, 1.0, 0);
  put_contrib(&s, 1, g12, 2, 0, SBN__PHASE__PHASE_FORWARD, "b", 2, 1, 1.0, 0);
  put_contrib(&s, 2, g12, 2, 0, SBN__PHASE__PHASE_FORWARD, "b", 3, 1, 1.0, 0);
  put_contrib(&s, 0, NULL, 0, 0, SBN__PHASE__PHASE_BARRIER, "w", 0, 0, 0, 0);
  put_contrib(&s, 1, NULL, 0, 0, SBN__PHASE__PHASE_BARRIER, "w", 0, 0, 0, 0);
  save(dir, "subgroups", &s);
  /* Bad values, a restart by generation, a stale one, a duplicate rank. */
  s.len = 0;
  put_hello(&s, 0, "gen", 0, 2, 1);
  put_hello(&s, 1, "gen", 1, 2, 1);
  put_contrib(&s, 0, NULL, 0, 0, SBN__PHASE__PHASE_FORWARD, "bn", 2, UINT64_MAX, 1.0, 0);
  put_contrib(&s, 1, NULL, 0, 0, SBN__PHASE__PHASE_FORWARD, "bn", 2, 1, 1e308, 0);
  put_hello(&s, 0x82, "gen", 0, 2, 2);
  put_hello(&s, 0xC0, "gen", 0, 2, 0);
  put_hello(&s, 0x81, "gen", 0, 2, 2);
  save(dir, "generations", &s);
  /* Ping, goodbye, then a contribution to a group with a departed rank. */
  s.len = 0;
  put_hello(&s, 0, "bye", 0, 2, 0);
  put_hello(&s, 1, "bye", 1, 2, 0);
  Sbn__Envelope e = SBN__ENVELOPE__INIT;
  Sbn__Ping ping = SBN__PING__INIT;
  ping.nonce = 42;
  e.body_case = SBN__ENVELOPE__BODY_PING;
  e.ping = &ping;
  put_env(&s, 0, &e);
  Sbn__Goodbye bye = SBN__GOODBYE__INIT;
  bye.reason = "done";
  e.body_case = SBN__ENVELOPE__BODY_GOODBYE;
  e.goodbye = &bye;
  put_env(&s, 1, &e);
  put_contrib(&s, 0, NULL, 0, 0, SBN__PHASE__PHASE_FORWARD, "bn", 1, 1, 1.0, 0);
  save(dir, "goodbye", &s);
  /* Authentication: hello with a nonce, then a wrong proof; no nonce. */
  s.len = 0;
  put_hello(&s, AUTH_CLIENT, "sec", 0, 1, 0);
  uint8_t junk[SBN_AUTH_MAC_SIZE] = {9};
  Sbn__Proof pr = SBN__PROOF__INIT;
  pr.proof.data = junk;
  pr.proof.len = sizeof(junk);
  e.body_case = SBN__ENVELOPE__BODY_PROOF;
  e.proof = &pr;
  put_env(&s, AUTH_CLIENT, &e);
  put_hello(&s, 0x80 | AUTH_CLIENT, "sec", 0, 1, 0);
  save(dir, "auth", &s);
  /* Garbage: bad magic, an oversized length, half a frame. */
  s.len = 0;
  uint8_t hdr[SBN_FRAME_HEADER_SIZE];
  sbn__frame_header_write(hdr, 1u << 30);
  put_bytes(&s, 0, hdr, sizeof(hdr));
  put_bytes(&s, 1, (const uint8_t *)"GET / HTTP/1.0\r\n\r\n", 18);
  sbn__frame_header_write(hdr, 100);
  put_bytes(&s, 2, hdr, sizeof(hdr));
  put_bytes(&s, 2, (const uint8_t *)"\x0a\x03", 2);
  save(dir, "garbage", &s);
}
