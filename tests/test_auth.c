/*
 * test_auth.c - the shared-secret challenge-response at hello, with a real
 * sbn-coordinator: real workers with the right, a wrong or no secret; raw
 * peers that replay an old answer, answer for another rank, or talk before
 * proving; a fake coordinator that does not know the secret; secret files
 * with bad modes or sizes; the loopback-only rule without a secret; and
 * what the daemon logs (never the secret).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <check.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "auth.h"
#include "coord_proc.h"
#include "raw_peer.h"
#include "sbn/sbn.h"
#include "workers.h"

#define SECRET "correct horse battery staple 42"
#define OTHER_SECRET "another secret of enough length"
#define WORKER_TIMEOUT_MS 20000
#define LOG_MAX 65536

static char dir[256];
static char secret_path[300], wrong_path[300], log_path[300];

/* A private temporary directory with the secret files, per test. */
static void write_file(const char *path, const char *content, mode_t mode) {
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  ck_assert_int_ge(fd, 0);
  ck_assert_int_eq(write(fd, content, strlen(content)), (ssize_t)strlen(content));
  close(fd);
  ck_assert_int_eq(chmod(path, mode), 0);
}

static void setup(void) {
  snprintf(dir, sizeof(dir), "/tmp/sbn-auth-XXXXXX");
  ck_assert_ptr_nonnull(mkdtemp(dir));
  snprintf(secret_path, sizeof(secret_path), "%s/secret", dir);
  snprintf(wrong_path, sizeof(wrong_path), "%s/wrong", dir);
  snprintf(log_path, sizeof(log_path), "%s/coord.log", dir);
  /* The coordinator's file ends in a newline, which is not part of the secret. */
  write_file(secret_path, SECRET "\n", 0600);
  write_file(wrong_path, OTHER_SECRET, 0600);
}

static void teardown(void) {
  char cmd[300];
  snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
  if (system(cmd) != 0)
    fprintf(stderr, "cannot remove %s\n", dir);
}

/* Starts a coordinator whose stderr goes to log_path. */
static coord_proc coord;
static void start_logged(const char *const *args) {
  unsetenv("SBN_TEST_QUIET"); /* the log is what we read */
  int saved = dup(STDERR_FILENO);
  int fd = open(log_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  ck_assert_int_ge(fd, 0);
  dup2(fd, STDERR_FILENO);
  close(fd);
  int rc = coord_start(&coord, args);
  dup2(saved, STDERR_FILENO);
  close(saved);
  ck_assert_int_eq(rc, 0);
}

static void start_secure(void) {
  const char *args[] = {"--secret-file", secret_path, NULL};
  start_logged(args);
}

static void read_log(char *buf, size_t len) {
  buf[0] = '\0';
  int fd = open(log_path, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return;
  ssize_t n = read(fd, buf, len - 1);
  buf[n > 0 ? n : 0] = '\0';
  close(fd);
}

/* The log holds needle (waiting a little: the coordinator writes it async). */
static void expect_log(const char *needle) {
  static char buf[LOG_MAX];
  for (int i = 0; i < 100; i++) {
    read_log(buf, sizeof(buf));
    if (strstr(buf, needle) != NULL)
      break;
    usleep(10000);
  }
  ck_assert_msg(strstr(buf, needle) != NULL, "log lacks '%s':\n%s", needle, buf);
  ck_assert_msg(strstr(buf, "horse") == NULL && strstr(buf, "another secret") == NULL,
                "a secret appears in the log:\n%s", buf);
}

static void stop(void) {
  int st = coord_stop(&coord, SIGTERM, 5000);
  ck_assert_msg(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "coordinator status %d", st);
}

/* Workers */

typedef struct auth_arg {
  const char *addr;
  const char *job;
  const char *secret_file; /* NULL = none */
  int use_env;             /* pass it through SBN_SECRET_FILE instead */
} auth_arg;

typedef struct auth_shared {
  int rc[WORKERS_MAX];
  char msg[WORKERS_MAX][512];
  uint64_t gcount[WORKERS_MAX];
} auth_shared;

static int auth_worker(int rank, void *argp, void *sharedp) {
  auth_arg *arg = argp;
  auth_shared *sh = sharedp;
  sbn_config cfg;
  sbn_config_init(&cfg);
  if (arg->use_env) {
    setenv("SBN_SECRET_FILE", arg->secret_file, 1);
    if (sbn_config_from_env(&cfg) != SBN_OK) {
      sh->rc[rank] = 1000;
      return 1;
    }
  } else {
    cfg.secret_file = arg->secret_file;
  }
  cfg.coordinator = arg->addr;
  cfg.job = arg->job;
  cfg.rank = rank;
  cfg.world_size = 2;
  cfg.connect_timeout_ms = 5000;
  sbn_ctx *ctx;
  int rc = sbn_init(&cfg, &ctx);
  if (rc == SBN_OK) {
    double mean[2] = {rank, 1}, m2[2] = {0, 0}, gm[2], gv[2];
    rc = sbn_sync_stats(sbn_world(ctx), "bn", 2, 3, mean, m2, &sh->gcount[rank], gm, gv);
    sbn_finalize(ctx);
  }
  sh->rc[rank] = rc;
  snprintf(sh->msg[rank], sizeof(sh->msg[rank]), "%s", rc ? sbn_last_error() : "");
  return 0;
}

/* Runs 2 workers of a new job, both with secret file f (NULL = none). */
static void run_pair(const char *addr, const char *f, int use_env, auth_shared *out) {
  auth_arg a = {addr, unique_job(), f, use_env};
  worker_set ws;
  ck_assert_int_eq(workers_start(&ws, 2, auth_worker, &a, sizeof(auth_shared)), 0);
  ck_assert_int_eq(workers_wait(&ws, WORKER_TIMEOUT_MS), 2);
  memcpy(out, ws.shared, sizeof(*out));
  workers_release(&ws);
}

START_TEST(right_secret_runs_rounds) {
  start_secure();
  auth_shared sh;
  run_pair(coord.addr, secret_path, 0, &sh);
  for (int r = 0; r < 2; r++) {
    ck_assert_msg(sh.rc[r] == SBN_OK, "rank %d: %d %s", r, sh.rc[r], sh.msg[r]);
    ck_assert_uint_eq(sh.gcount[r], 6);
  }
  /* The same through SBN_SECRET_FILE, with a file without the newline. */
  char nonl[300];
  snprintf(nonl, sizeof(nonl), "%s/nonl", dir);
  write_file(nonl, SECRET, 0400);
  run_pair(coord.addr, nonl, 1, &sh);
  for (int r = 0; r < 2; r++)
    ck_assert_msg(sh.rc[r] == SBN_OK, "rank %d: %d %s", r, sh.rc[r], sh.msg[r]);
  expect_log("(authenticated)");
  stop();
}
END_TEST

START_TEST(no_or_wrong_secret_rejected) {
  start_secure();
  auth_shared sh;
  run_pair(coord.addr, NULL, 0, &sh);
  for (int r = 0; r < 2; r++) {
    ck_assert_msg(sh.rc[r] == SBN_EAUTH, "rank %d: %d %s", r, sh.rc[r], sh.msg[r]);
    ck_assert_msg(strstr(sh.msg[r], "SBN_SECRET_FILE") != NULL, "'%s'", sh.msg[r]);
  }
  expect_log("holds no shared secret");
  run_pair(coord.addr, wrong_path, 0, &sh);
  for (int r = 0; r < 2; r++) {
    ck_assert_msg(sh.rc[r] == SBN_EAUTH, "rank %d: %d %s", r, sh.rc[r], sh.msg[r]);
    ck_assert_msg(strstr(sh.msg[r], "proof") != NULL, "'%s'", sh.msg[r]);
  }
  expect_log("authentication failed: wrong proof");
  stop();
}
END_TEST

START_TEST(worker_refuses_coordinator_without_secret) {
  start_logged(NULL);
  auth_shared sh;
  run_pair(coord.addr, secret_path, 0, &sh);
  for (int r = 0; r < 2; r++) {
    ck_assert_msg(sh.rc[r] == SBN_EAUTH, "rank %d: %d %s", r, sh.rc[r], sh.msg[r]);
    ck_assert_msg(strstr(sh.msg[r], "did not authenticate") != NULL, "'%s'", sh.msg[r]);
  }
  stop();
}
END_TEST

/* Raw exchange: hello with a nonce, then the challenge's nonce. */
static void raw_challenge(rp *p, const char *job, uint32_t rank, const uint8_t nw[32],
                          uint8_t nc[32]) {
  rp_hello(p, job, rank, 2, 0, nw, SBN_AUTH_NONCE_SIZE);
  Sbn__Envelope *e = rp_recv(p, RP_IO_TIMEOUT_MS);
  ck_assert_int_eq(e->body_case, SBN__ENVELOPE__BODY_CHALLENGE);
  ck_assert_uint_eq(e->challenge->nonce.len, SBN_AUTH_NONCE_SIZE);
  memcpy(nc, e->challenge->nonce.data, SBN_AUTH_NONCE_SIZE);
  sbn__msg_free(e);
}

static void send_proof(rp *p, const uint8_t *mac, size_t len) {
  Sbn__Proof pr = SBN__PROOF__INIT;
  Sbn__Envelope env = SBN__ENVELOPE__INIT;
  pr.proof.data = (uint8_t *)mac;
  pr.proof.len = len;
  env.body_case = SBN__ENVELOPE__BODY_PROOF;
  env.proof = &pr;
  rp_send(p, &env);
}

static void load_secret(sbn__secret *s) {
  char err[256];
  ck_assert_int_eq(sbn__secret_load(secret_path, s, err, sizeof(err)), SBN_OK);
  ck_assert_uint_eq(s->len, strlen(SECRET));
}

START_TEST(replayed_or_misbound_answers_rejected) {
  start_secure();
  sbn__secret s;
  load_secret(&s);
  uint8_t nw[32], nc[32], mac[32];
  memset(nw, 7, sizeof(nw));
  /* An honest exchange: the welcome carries the coordinator's proof. */
  rp *p = rp_open(coord.port, 0);
  raw_challenge(p, "replay", 0, nw, nc);
  ck_assert_int_eq(sbn__auth_proof(&s, SBN_AUTH_WORKER, nw, nc, "replay", 0, 2, 0, mac), SBN_OK);
  send_proof(p, mac, sizeof(mac));
  Sbn__Envelope *w = rp_recv(p, RP_IO_TIMEOUT_MS);
  ck_assert_int_eq(w->body_case, SBN__ENVELOPE__BODY_WELCOME);
  ck_assert(sbn__auth_check(&s, SBN_AUTH_COORDINATOR, nw, nc, "replay", 0, 2, 0,
                            w->welcome->proof.data, w->welcome->proof.len));
  /* The worker's own proof is not the coordinator's (direction label). */
  ck_assert(!sbn__auth_check(&s, SBN_AUTH_COORDINATOR, nw, nc, "replay", 0, 2, 0, mac, 32));
  sbn__msg_free(w);
  /* The same hello and the recorded answer on a new connection: a new
   * challenge, so the old answer is wrong. */
  rp *q = rp_open(coord.port, 0);
  uint8_t nc2[32];
  raw_challenge(q, "replay", 1, nw, nc2);
  ck_assert(memcmp(nc, nc2, 32) != 0);
  send_proof(q, mac, sizeof(mac));
  rp_expect_reject(q, SBN_EAUTH, "authentication failed");
  ck_assert(rp_wait_closed(q, RP_IO_TIMEOUT_MS));
  rp_close(q);
  /* A right proof for another rank (or job, or generation) does not pass. */
  q = rp_open(coord.port, 0);
  raw_challenge(q, "replay", 1, nw, nc2);
  ck_assert_int_eq(sbn__auth_proof(&s, SBN_AUTH_WORKER, nw, nc2, "replay", 0, 2, 0, mac), SBN_OK);
  send_proof(q, mac, sizeof(mac));
  rp_expect_reject(q, SBN_EAUTH, NULL);
  rp_close(q);
  q = rp_open(coord.port, 0);
  raw_challenge(q, "replay", 1, nw, nc2);
  ck_assert_int_eq(sbn__auth_proof(&s, SBN_AUTH_WORKER, nw, nc2, "replay", 1, 2, 1, mac), SBN_OK);
  send_proof(q, mac, sizeof(mac));
  rp_expect_reject(q, SBN_EAUTH, NULL);
  rp_close(q);
  /* A truncated proof, an empty one. */
  q = rp_open(coord.port, 0);
  raw_challenge(q, "replay", 1, nw, nc2);
  ck_assert_int_eq(sbn__auth_proof(&s, SBN_AUTH_WORKER, nw, nc2, "replay", 1, 2, 0, mac), SBN_OK);
  send_proof(q, mac, 31);
  rp_expect_reject(q, SBN_EAUTH, NULL);
  rp_close(q);
  /* A hello without a nonce. */
  q = rp_open(coord.port, 0);
  rp_hello(q, "replay", 1, 2, 0, NULL, 0);
  rp_expect_reject(q, SBN_EAUTH, "shared secret");
  rp_close(q);
  /* Rank 1 can still join properly: failures cost nothing to the job. */
  q = rp_open(coord.port, 0);
  raw_challenge(q, "replay", 1, nw, nc2);
  ck_assert_int_eq(sbn__auth_proof(&s, SBN_AUTH_WORKER, nw, nc2, "replay", 1, 2, 0, mac), SBN_OK);
  send_proof(q, mac, sizeof(mac));
  w = rp_recv(q, RP_IO_TIMEOUT_MS);
  ck_assert_int_eq(w->body_case, SBN__ENVELOPE__BODY_WELCOME);
  sbn__msg_free(w);
  double m[1] = {1}, v[1] = {0};
  rp_forward(p, 0, "bn", 1, 2, m, v);
  rp_forward(q, 0, "bn", 1, 2, m, v);
  for (int i = 0; i < 2; i++) {
    Sbn__Envelope *r = rp_recv(i ? q : p, RP_IO_TIMEOUT_MS);
    ck_assert_int_eq(r->body_case, SBN__ENVELOPE__BODY_RESULT);
    ck_assert_uint_eq(r->result->count, 4);
    sbn__msg_free(r);
  }
  rp_close(p);
  rp_close(q);
  expect_log("wrong proof for rank 1");
  sbn__secret_wipe(&s);
  stop();
}
END_TEST

START_TEST(nothing_before_proof) {
  const char *args[] = {"--secret-file", secret_path, "--hello-timeout", "300", NULL};
  start_logged(args);
  uint8_t nw[32] = {1}, nc[32];
  /* A contribution instead of a proof. */
  rp *p = rp_open(coord.port, 0);
  raw_challenge(p, "early", 0, nw, nc);
  double m[1] = {1}, v[1] = {0};
  rp_forward(p, 0, "bn", 1, 1, m, v);
  sbn__msg_free(rp_expect_error(p, SBN_EPROTO, "expected hello", RP_IO_TIMEOUT_MS));
  ck_assert(rp_wait_closed(p, RP_IO_TIMEOUT_MS));
  rp_close(p);
  /* A second hello while the challenge is out. */
  p = rp_open(coord.port, 0);
  raw_challenge(p, "early", 0, nw, nc);
  rp_hello(p, "early", 0, 2, 0, nw, 32);
  sbn__msg_free(rp_expect_error(p, SBN_EPROTO, "second hello", RP_IO_TIMEOUT_MS));
  rp_close(p);
  /* A proof out of the blue. */
  p = rp_open(coord.port, 0);
  send_proof(p, nc, 32);
  sbn__msg_free(rp_expect_error(p, SBN_EPROTO, "challenge", RP_IO_TIMEOUT_MS));
  rp_close(p);
  /* The pre-welcome frame cap holds during authentication. */
  p = rp_open(coord.port, 0);
  raw_challenge(p, "early", 0, nw, nc);
  uint8_t hdr[SBN_FRAME_HEADER_SIZE];
  sbn__frame_header_write(hdr, 5000);
  rp_send_raw(p, hdr, sizeof(hdr));
  sbn__msg_free(rp_expect_error(p, SBN_ETOOBIG, "4096", RP_IO_TIMEOUT_MS));
  rp_close(p);
  /* No proof at all: the hello timeout covers the challenge. */
  p = rp_open(coord.port, 0);
  raw_challenge(p, "early", 0, nw, nc);
  long long t0 = test_now_ms();
  sbn__msg_free(rp_expect_error(p, SBN_ETIMEDOUT, "no proof", RP_IO_TIMEOUT_MS));
  ck_assert_int_lt(test_now_ms() - t0, 2000);
  rp_close(p);
  stop();
}
END_TEST

/* A fake coordinator that challenges but does not know the secret. */
static void fake_coordinator(int lfd) {
  int fd = accept(lfd, NULL, NULL);
  if (fd < 0)
    _exit(1);
  sbn__framer rx;
  sbn__framer_init(&rx, SBN_MAX_FRAME_CEILING);
  for (int step = 0; step < 2; step++) {
    const uint8_t *body;
    size_t len;
    int rc;
    while ((rc = sbn__framer_next(&rx, &body, &len)) == 0) {
      uint8_t *space;
      long room = sbn__framer_space(&rx, 4096, &space);
      ssize_t n = room > 0 ? recv(fd, space, (size_t)room, 0) : -1;
      if (n <= 0)
        _exit(2);
      sbn__framer_commit(&rx, (size_t)n);
    }
    Sbn__Envelope out = SBN__ENVELOPE__INIT;
    Sbn__Challenge ch = SBN__CHALLENGE__INIT;
    Sbn__Welcome w = SBN__WELCOME__INIT;
    uint8_t junk[32];
    memset(junk, 0x5a, sizeof(junk));
    if (step == 0) {
      ch.nonce.data = junk;
      ch.nonce.len = 32;
      out.body_case = SBN__ENVELOPE__BODY_CHALLENGE;
      out.challenge = &ch;
    } else {
      w.protocol_version = SBN_PROTOCOL_VERSION;
      w.server_version = "fake";
      w.max_frame = 65536;
      w.round_timeout_ms = 1000;
      w.proof.data = junk;
      w.proof.len = 32;
      out.body_case = SBN__ENVELOPE__BODY_WELCOME;
      out.welcome = &w;
    }
    uint8_t *buf;
    size_t blen;
    if (sbn__msg_encode(&out, SBN_MAX_FRAME_CEILING, &buf, &blen) != 0 ||
        send(fd, buf, blen, MSG_NOSIGNAL) != (ssize_t)blen)
      _exit(3);
    free(buf);
  }
  sleep(5);
  _exit(0);
}

START_TEST(worker_refuses_fake_coordinator) {
  int port;
  int lfd = rp_listen(&port);
  pid_t pid = fork();
  ck_assert_int_ge(pid, 0);
  if (pid == 0)
    fake_coordinator(lfd);
  close(lfd);
  char addr[64];
  snprintf(addr, sizeof(addr), "127.0.0.1:%d", port);
  sbn_config cfg;
  sbn_config_init(&cfg);
  cfg.coordinator = addr;
  cfg.world_size = 2;
  cfg.secret_file = secret_path;
  sbn_ctx *ctx = NULL;
  ck_assert_int_eq(sbn_init(&cfg, &ctx), SBN_EAUTH);
  ck_assert_ptr_null(ctx);
  ck_assert_msg(strstr(sbn_last_error(), "proof is wrong") != NULL, "'%s'", sbn_last_error());
  kill(pid, SIGKILL);
  wait_child(pid, 2000);
}
END_TEST

START_TEST(secret_files_checked) {
  char path[300], err[512];
  sbn__secret s;
  /* Readable by others: refused, by the coordinator and by workers. */
  snprintf(path, sizeof(path), "%s/open", dir);
  write_file(path, SECRET, 0644);
  ck_assert_int_eq(sbn__secret_load(path, &s, err, sizeof(err)), SBN_EAUTH);
  ck_assert_msg(strstr(err, "chmod 600") && strstr(err, path), "'%s'", err);
  ck_assert_ptr_null(strstr(err, "horse"));
  /* Group access passes (Kubernetes fsGroup volumes) but is flagged. */
  char grp[300];
  snprintf(grp, sizeof(grp), "%s/grp", dir);
  write_file(grp, SECRET, 0640);
  ck_assert_int_eq(sbn__secret_load(grp, &s, err, sizeof(err)), SBN_OK);
  ck_assert_int_eq(s.group_access, 1);
  ck_assert_int_eq(sbn__secret_load(secret_path, &s, err, sizeof(err)), SBN_OK);
  ck_assert_int_eq(s.group_access, 0);
  coord_proc c2;
  const char *args[] = {"--secret-file", path, NULL};
  ck_assert_int_eq(coord_start(&c2, args), -1); /* exits 2 before listening */
  sbn_config cfg;
  sbn_config_init(&cfg);
  cfg.coordinator = "127.0.0.1:1";
  cfg.world_size = 2;
  cfg.secret_file = path;
  sbn_ctx *ctx = NULL;
  ck_assert_int_eq(sbn_init(&cfg, &ctx), SBN_EAUTH);
  ck_assert_msg(strstr(sbn_last_error(), "chmod 600"), "'%s'", sbn_last_error());
  /* Too short (the newline does not count), at the minimum, missing, a directory. */
  char shortv[SBN_SECRET_MIN + 2];
  memset(shortv, 'x', SBN_SECRET_MIN - 1);
  shortv[SBN_SECRET_MIN - 1] = '\n';
  shortv[SBN_SECRET_MIN] = '\0';
  write_file(path, shortv, 0600);
  ck_assert_int_eq(sbn__secret_load(path, &s, err, sizeof(err)), SBN_EAUTH);
  ck_assert_msg(strstr(err, "at least 16"), "'%s'", err);
  shortv[SBN_SECRET_MIN - 1] = 'x';
  write_file(path, shortv, 0600);
  ck_assert_int_eq(sbn__secret_load(path, &s, err, sizeof(err)), SBN_OK);
  ck_assert_uint_eq(s.len, SBN_SECRET_MIN);
  static char big[SBN_SECRET_MAX + 2];
  memset(big, 'y', SBN_SECRET_MAX + 1);
  big[SBN_SECRET_MAX + 1] = '\0';
  write_file(path, big, 0600);
  ck_assert_int_eq(sbn__secret_load(path, &s, err, sizeof(err)), SBN_EAUTH);
  big[SBN_SECRET_MAX] = '\0';
  write_file(path, big, 0600);
  ck_assert_int_eq(sbn__secret_load(path, &s, err, sizeof(err)), SBN_OK);
  ck_assert_int_eq(sbn__secret_load("/nonexistent/secret", &s, err, sizeof(err)), SBN_EAUTH);
  ck_assert_int_eq(sbn__secret_load(dir, &s, err, sizeof(err)), SBN_EAUTH);
  sbn__secret_wipe(&s);
}
END_TEST

/* Runs the coordinator binary with args; returns its status, stderr in out. */
static int run_coord_briefly(const char *const *args, char *out, size_t outlen, int *listened) {
  int pfd[2], efd[2];
  ck_assert_int_eq(pipe(pfd), 0);
  ck_assert_int_eq(pipe(efd), 0);
  pid_t pid = fork();
  if (pid == 0) {
    const char *argv[16];
    int n = 0;
    argv[n++] = SBN_COORDINATOR_BIN;
    for (int i = 0; args[i] && n < 15; i++)
      argv[n++] = args[i];
    argv[n] = NULL;
    dup2(pfd[1], STDOUT_FILENO);
    dup2(efd[1], STDERR_FILENO);
    execv(argv[0], (char *const *)argv);
    _exit(127);
  }
  close(pfd[1]);
  close(efd[1]);
  char line[256] = "";
  struct pollfd pf = {.fd = pfd[0], .events = POLLIN};
  *listened = 0;
  if (poll(&pf, 1, 3000) > 0 && read(pfd[0], line, sizeof(line) - 1) > 0)
    *listened = strstr(line, "listening on") != NULL;
  if (*listened)
    kill(pid, SIGTERM);
  int st = wait_child(pid, 5000);
  size_t len = 0;
  ssize_t n;
  while (len < outlen - 1 && (n = read(efd[0], out + len, outlen - 1 - len)) > 0)
    len += (size_t)n;
  out[len] = '\0';
  close(pfd[0]);
  close(efd[0]);
  return st;
}

START_TEST(loopback_only_without_secret) {
  static char out[LOG_MAX];
  int listened;
  const char *open_args[] = {"--listen", "0.0.0.0:0", NULL};
  int st = run_coord_briefly(open_args, out, sizeof(out), &listened);
  ck_assert_msg(!listened && WIFEXITED(st) && WEXITSTATUS(st) != 0, "status %d", st);
  ck_assert_msg(strstr(out, "refusing to listen") && strstr(out, "--secret-file"), "%s", out);
  const char *insecure[] = {"--listen", "0.0.0.0:0", "--insecure", NULL};
  st = run_coord_briefly(insecure, out, sizeof(out), &listened);
  ck_assert_msg(listened && WIFEXITED(st) && WEXITSTATUS(st) == 0, "status %d: %s", st, out);
  ck_assert_msg(strstr(out, "INSECURE"), "%s", out);
  const char *secured[] = {"--listen", "0.0.0.0:0", "--secret-file", secret_path, NULL};
  st = run_coord_briefly(secured, out, sizeof(out), &listened);
  ck_assert_msg(listened && WIFEXITED(st) && WEXITSTATUS(st) == 0, "status %d: %s", st, out);
  ck_assert_msg(!strstr(out, "INSECURE") && strstr(out, "shared secret"), "%s", out);
  ck_assert_msg(!strstr(out, "horse"), "the secret is in the log: %s", out);
  /* Loopback without a secret is the default and needs no flag. */
  const char *local[] = {"--listen", "127.0.0.1:0", NULL};
  st = run_coord_briefly(local, out, sizeof(out), &listened);
  ck_assert_msg(listened && WIFEXITED(st) && WEXITSTATUS(st) == 0, "status %d: %s", st, out);
}
END_TEST

START_TEST(rounds_bound_to_their_job) {
  /* Two jobs with the same ranks and layers: nothing crosses between them. */
  start_logged(NULL);
  rp *a0 = rp_join(coord.port, "job-a", 0, 2), *b0 = rp_join(coord.port, "job-b", 0, 2);
  rp *b1 = rp_join(coord.port, "job-b", 1, 2);
  double m[1] = {1}, v[1] = {0};
  rp_forward(a0, 0, "bn", 1, 100, m, v);
  rp_forward(b0, 0, "bn", 1, 2, m, v);
  rp_forward(b1, 0, "bn", 1, 3, m, v);
  for (int i = 0; i < 2; i++) {
    Sbn__Envelope *r = rp_recv(i ? b1 : b0, RP_IO_TIMEOUT_MS);
    ck_assert_int_eq(r->body_case, SBN__ENVELOPE__BODY_RESULT);
    ck_assert_uint_eq(r->result->count, 5); /* job-a's 100 is not in it */
    sbn__msg_free(r);
  }
  /* job-a's round still waits for its own rank 1. */
  uint8_t *body;
  size_t len;
  ck_assert_int_eq(rp_recv_frame(a0, 150, &body, &len), 0);
  rp_close(a0);
  rp_close(b0);
  rp_close(b1);
  stop();
}
END_TEST

START_TEST(proof_depends_on_every_field) {
  /* Pure: every transcript field and the direction change the proof. */
  sbn__secret k;
  load_secret(&k);
  uint8_t nw[32], nc[32], base[32], other[32];
  memset(nw, 1, sizeof(nw));
  memset(nc, 2, sizeof(nc));
  ck_assert_int_eq(sbn__auth_proof(&k, SBN_AUTH_WORKER, nw, nc, "job", 1, 4, 9, base), SBN_OK);
  ck_assert_int_eq(sbn__auth_proof(&k, SBN_AUTH_WORKER, nw, nc, "job", 1, 4, 9, other), SBN_OK);
  ck_assert(memcmp(base, other, 32) == 0);
  ck_assert(sbn__auth_check(&k, SBN_AUTH_WORKER, nw, nc, "job", 1, 4, 9, base, 32));
  struct {
    int dir;
    const char *job;
    uint32_t rank, world;
    uint64_t gen;
    int flip_w, flip_c;
  } v[] = {{SBN_AUTH_COORDINATOR, "job", 1, 4, 9, 0, 0}, {SBN_AUTH_WORKER, "jo", 1, 4, 9, 0, 0},
           {SBN_AUTH_WORKER, "job", 2, 4, 9, 0, 0},      {SBN_AUTH_WORKER, "job", 1, 5, 9, 0, 0},
           {SBN_AUTH_WORKER, "job", 1, 4, 8, 0, 0},      {SBN_AUTH_WORKER, "job", 1, 4, 9, 1, 0},
           {SBN_AUTH_WORKER, "job", 1, 4, 9, 0, 1}};
  for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++) {
    uint8_t w2[32], c2[32];
    memcpy(w2, nw, 32);
    memcpy(c2, nc, 32);
    w2[31] ^= (uint8_t)v[i].flip_w;
    c2[0] ^= (uint8_t)v[i].flip_c;
    ck_assert_int_eq(
        sbn__auth_proof(&k, v[i].dir, w2, c2, v[i].job, v[i].rank, v[i].world, v[i].gen, other),
        SBN_OK);
    ck_assert_msg(memcmp(base, other, 32) != 0, "variant %zu gives the same proof", i);
    ck_assert(!sbn__auth_check(&k, SBN_AUTH_WORKER, nw, nc, "job", 1, 4, 9, other, 32));
  }
  /* Another key, a truncated or empty proof. */
  sbn__secret k2 = k;
  k2.key[0] ^= 1;
  ck_assert(!sbn__auth_check(&k2, SBN_AUTH_WORKER, nw, nc, "job", 1, 4, 9, base, 32));
  ck_assert(!sbn__auth_check(&k, SBN_AUTH_WORKER, nw, nc, "job", 1, 4, 9, base, 31));
  ck_assert(!sbn__auth_check(&k, SBN_AUTH_WORKER, nw, nc, "job", 1, 4, 9, NULL, 0));
  /* Nonces differ from call to call. */
  ck_assert_int_eq(sbn__auth_nonce(nw), SBN_OK);
  ck_assert_int_eq(sbn__auth_nonce(nc), SBN_OK);
  ck_assert(memcmp(nw, nc, 32) != 0);
  sbn__secret_wipe(&k);
  sbn__secret_wipe(&k2);
  ck_assert_uint_eq(k.len, 0);
}
END_TEST

int main(void) {
  Suite *s = suite_create("auth");
  TCase *tc = tcase_create("auth");
  tcase_set_timeout(tc, 60);
  tcase_add_checked_fixture(tc, setup, teardown);
  tcase_add_test(tc, right_secret_runs_rounds);
  tcase_add_test(tc, no_or_wrong_secret_rejected);
  tcase_add_test(tc, worker_refuses_coordinator_without_secret);
  tcase_add_test(tc, replayed_or_misbound_answers_rejected);
  tcase_add_test(tc, nothing_before_proof);
  tcase_add_test(tc, worker_refuses_fake_coordinator);
  tcase_add_test(tc, secret_files_checked);
  tcase_add_test(tc, loopback_only_without_secret);
  tcase_add_test(tc, rounds_bound_to_their_job);
  tcase_add_test(tc, proof_depends_on_every_field);
  suite_add_tcase(s, tc);
  return run_suite(s);
}
