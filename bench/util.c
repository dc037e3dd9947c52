/* util.c - clocks, statistics, JSON lines, child processes, the coordinator. */
#define _GNU_SOURCE
#include "bench.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

/* A scrape of the coordinator's metrics: its bound in time and size. */
#define METRICS_TIMEOUT_MS 3000
#define METRICS_MAX_BYTES (256 * 1024)
#endif

#define COORD_START_TIMEOUT_MS 10000

bench_opts g_opts;

int bench_reps(int full, int quick) {
  if (g_opts.reps > 0)
    return g_opts.reps;
  return g_opts.quick ? quick : full;
}

double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

long long now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* Nearest rank: the smallest value with at least p of the samples <= it. */
static double pct(const double *v, int n, double p) {
  int k = (int)ceil(p * n) - 1;
  if (k < 0)
    k = 0;
  if (k >= n)
    k = n - 1;
  return v[k];
}

void stats_compute(double *v, int n, bench_stats *st) {
  memset(st, 0, sizeof(*st));
  st->n = n;
  if (n <= 0) {
    st->p50 = st->p99 = st->mean = st->min = st->max = NAN;
    return;
  }
  qsort(v, (size_t)n, sizeof(double), cmp_double);
  double sum = 0;
  for (int i = 0; i < n; i++)
    sum += v[i];
  st->mean = sum / n;
  st->min = v[0];
  st->max = v[n - 1];
  if (n % 2)
    st->p50 = v[n / 2];
  else
    st->p50 = 0.5 * (v[n / 2 - 1] + v[n / 2]);
  st->p99 = pct(v, n, 0.99);
}

/* ---- JSON ------------------------------------------------------------------ */

static void j_put(jline *j, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void j_put(jline *j, const char *fmt, ...) {
  if (j->len >= sizeof(j->buf))
    return;
  va_list ap;
  va_start(ap, fmt);
  int k = vsnprintf(j->buf + j->len, sizeof(j->buf) - j->len, fmt, ap);
  va_end(ap);
  if (k > 0)
    j->len += (size_t)k;
  if (j->len >= sizeof(j->buf))
    j->len = sizeof(j->buf) - 1;
}

static void j_key(jline *j, const char *key) {
  j_put(j, "%s\"%s\":", j->n++ ? "," : "", key);
}

void j_begin(jline *j, const char *bench) {
  j->len = 0;
  j->n = 0;
  j->buf[0] = '\0';
  j_put(j, "{");
  j_str(j, "bench", bench);
}

void j_str(jline *j, const char *key, const char *val) {
  j_key(j, key);
  j_put(j, "\"");
  for (const char *p = val; *p; p++) {
    unsigned char ch = (unsigned char)*p;
    if (ch == '"' || ch == '\\')
      j_put(j, "\\%c", ch);
    else if (ch < 0x20)
      j_put(j, "\\u%04x", ch);
    else
      j_put(j, "%c", ch);
  }
  j_put(j, "\"");
}

void j_int(jline *j, const char *key, long long val) {
  j_key(j, key);
  j_put(j, "%lld", val);
}

void j_num(jline *j, const char *key, double val) {
  j_key(j, key);
  if (!isfinite(val))
    j_put(j, "null");
  else if (fabs(val) >= 100)
    j_put(j, "%.1f", val);
  else
    j_put(j, "%.4g", val);
}

void j_bool(jline *j, const char *key, int val) {
  j_key(j, key);
  j_put(j, "%s", val ? "true" : "false");
}

void j_null(jline *j, const char *key) {
  j_key(j, key);
  j_put(j, "null");
}

void j_emit(jline *j) {
  j_put(j, "}");
  fputs(j->buf, stdout);
  fputc('\n', stdout);
  fflush(stdout);
}

void note(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("sbn-bench: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
}

/* ---- shared memory, control block ----------------------------------------- */

void *shared_alloc(size_t size) {
  void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  return p == MAP_FAILED ? NULL : p; /* anonymous mappings are zero-filled */
}

void shared_free(void *p, size_t size) {
  if (p != NULL)
    munmap(p, size);
}

int ctl_fail(bench_ctl *ctl, const char *fmt, ...) {
  int expected = 0;
  if (atomic_compare_exchange_strong(&ctl->failed, &expected, 1)) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctl->err, sizeof(ctl->err), fmt, ap);
    va_end(ap);
  }
  return 1;
}

/* The read end of the "go" pipe in a worker. */
static int g_go_rd = -1;

int ctl_wait_go(bench_ctl *ctl, int timeout_ms) {
  long long deadline = now_ms() + timeout_ms;
  for (;;) {
    if (atomic_load(&ctl->failed))
      return -1;
    long long left = deadline - now_ms();
    if (left <= 0 || g_go_rd < 0)
      return -1;
    struct pollfd p = {.fd = g_go_rd, .events = POLLIN};
    /* Wake up now and then to notice a failure elsewhere. */
    int r = poll(&p, 1, (int)(left < 500 ? left : 500));
    if (r > 0)
      return 0; /* EOF: the parent closed the write end */
    if (r < 0 && errno != EINTR)
      return -1;
  }
}

/* ---- child processes ------------------------------------------------------ */

/* In a freshly forked child: die with the parent, no inherited stdio buffers. */
static void child_setup(void) {
#ifdef __linux__
  prctl(PR_SET_PDEATHSIG, SIGKILL);
#endif
  signal(SIGPIPE, SIG_IGN);
}

int procs_start(procs *ps, int n, proc_fn fn, void *arg) {
  memset(ps, 0, sizeof(*ps));
  ps->go_fd = -1;
  if (n > PROCS_MAX)
    return -1;
  int gp[2];
  if (pipe2(gp, O_CLOEXEC) != 0)
    return -1;
  ps->go_fd = gp[1];
  fflush(stdout);
  fflush(stderr);
  for (int i = 0; i < n; i++) {
    pid_t pid = fork();
    if (pid < 0) {
      note("fork: %s", strerror(errno));
      close(gp[0]);
      procs_kill(ps);
      return -1;
    }
    if (pid == 0) {
      child_setup();
      close(gp[1]);
      g_go_rd = gp[0];
      int rc = fn(i, arg);
      _exit(rc);
    }
    ps->pid[i] = pid;
    ps->n = i + 1;
  }
  close(gp[0]);
  return 0;
}

void procs_go(procs *ps) {
  if (ps->go_fd >= 0)
    close(ps->go_fd);
  ps->go_fd = -1;
}

/* True when some child has exited and not been reaped (one syscall, however
 * many children). */
static int any_child_exited(void) {
  siginfo_t si;
  memset(&si, 0, sizeof(si));
  if (waitid(P_ALL, 0, &si, WEXITED | WNOHANG | WNOWAIT) != 0)
    return errno != ECHILD && errno != EINTR;
  return si.si_pid != 0;
}

int procs_poll(procs *ps, int *bad) {
  int running = 0;
  for (int i = 0; i < ps->n; i++) {
    if (ps->exited[i])
      continue;
    int st;
    pid_t r = waitpid(ps->pid[i], &st, WNOHANG);
    if (r == ps->pid[i]) {
      ps->exited[i] = 1;
      ps->status[i] = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
      if (WIFSIGNALED(st))
        note("worker %d (pid %d) killed by signal %d", i, (int)r, WTERMSIG(st));
      if (ps->status[i] != 0 && bad)
        *bad = 1;
    } else if (r < 0 && errno != EINTR) {
      ps->exited[i] = 1;
      ps->status[i] = -1;
      if (bad)
        *bad = 1;
    } else {
      running++;
    }
  }
  return running;
}

void procs_kill(procs *ps) {
  procs_go(ps);
  for (int i = 0; i < ps->n; i++)
    if (!ps->exited[i])
      kill(ps->pid[i], SIGKILL);
  for (int i = 0; i < ps->n; i++)
    if (!ps->exited[i]) {
      int st;
      while (waitpid(ps->pid[i], &st, 0) < 0 && errno == EINTR)
        ;
      ps->exited[i] = 1;
      ps->status[i] = -1;
    }
}

int procs_wait(procs *ps, int timeout_ms) {
  long long deadline = now_ms() + timeout_ms;
  procs_go(ps);
  while (procs_poll(ps, NULL) > 0 && now_ms() < deadline)
    usleep(2000);
  if (procs_poll(ps, NULL) > 0) {
    note("%d worker(s) still running after %d ms: killed", procs_poll(ps, NULL),
         timeout_ms);
    procs_kill(ps);
  }
  int ok = 0;
  for (int i = 0; i < ps->n; i++)
    ok += ps->status[i] == 0;
  return ok;
}

int pred_ready(bench_ctl *ctl, int n) { return atomic_load(&ctl->ready) >= n; }
int pred_done(bench_ctl *ctl, int n) { return atomic_load(&ctl->done) >= n; }

int procs_wait_ctl(procs *ps, bench_ctl *ctl, int (*pred)(bench_ctl *, int), int n,
                   int timeout_ms) {
  long long deadline = now_ms() + timeout_ms;
  for (;;) {
    if (pred(ctl, n))
      return 0;
    if (atomic_load(&ctl->failed))
      return -1;
    if (any_child_exited()) {
      int bad = 0;
      procs_poll(ps, &bad);
      if (bad)
        return -1;
    }
    if (now_ms() > deadline) {
      ctl_fail(ctl, "timed out after %d ms", timeout_ms);
      return -1;
    }
    /* The parent shares the 2 cores with the workers: wake rarely. */
    usleep(2000);
  }
}

/* ---- other programs -------------------------------------------------------- */

int run_bounded(const char *const *argv, int out_fd, int err_fd, int timeout_ms) {
  fflush(stdout);
  fflush(stderr);
  pid_t pid = fork();
  if (pid < 0)
    return -1;
  if (pid == 0) {
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (out_fd >= 0)
      dup2(out_fd, STDOUT_FILENO);
    else /* stdout carries sbn-bench's JSON only */
      dup2(STDERR_FILENO, STDOUT_FILENO);
    if (err_fd >= 0)
      dup2(err_fd, STDERR_FILENO);
    execvp(argv[0], (char *const *)argv);
    _exit(127);
  }
  setpgid(pid, pid);
  long long deadline = now_ms() + timeout_ms;
  for (;;) {
    int st;
    pid_t r = waitpid(pid, &st, WNOHANG);
    if (r == pid) {
      kill(-pid, SIGKILL); /* ranks that outlived mpirun */
      return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    }
    if (r < 0 && errno != EINTR)
      return -1;
    if (now_ms() > deadline) {
      kill(-pid, SIGKILL);
      waitpid(pid, &st, 0);
      note("%s did not finish in %d ms, killed", argv[0], timeout_ms);
      return -1;
    }
    usleep(2000);
  }
}

/* ---- the coordinator --------------------------------------------------------- */

int coord_start(coord *c, const char *const *extra) {
  int pfd[2];
  const char *argv[BENCH_MAX_COORD_ARGS + BENCH_MAX_EXTRA_ARGS + 8];
  int argc = 0;
  memset(c, 0, sizeof(*c));
  c->out_fd = -1;
  argv[argc++] = g_opts.coordinator;
  argv[argc++] = "--listen";
  argv[argc++] = "127.0.0.1:0";
  argv[argc++] = "--metrics";
  argv[argc++] = "127.0.0.1:0";
  for (int i = 0; i < g_opts.n_coord_args; i++)
    argv[argc++] = g_opts.coord_args[i];
  for (int i = 0; extra != NULL && extra[i] != NULL && i < BENCH_MAX_EXTRA_ARGS; i++)
    argv[argc++] = extra[i];
  argv[argc] = NULL;
  if (access(g_opts.coordinator, X_OK) != 0) {
    note("coordinator %s: %s", g_opts.coordinator, strerror(errno));
    return -1;
  }
  if (pipe2(pfd, O_CLOEXEC) != 0)
    return -1;
  fflush(stdout);
  fflush(stderr);
  pid_t pid = fork();
  if (pid < 0) {
    close(pfd[0]);
    close(pfd[1]);
    return -1;
  }
  if (pid == 0) {
    child_setup();
    dup2(pfd[1], STDOUT_FILENO);
    if (!g_opts.verbose) {
      int dn = open("/dev/null", O_WRONLY);
      if (dn >= 0)
        dup2(dn, STDERR_FILENO);
    }
    execv(argv[0], (char *const *)argv);
    _exit(127);
  }
  close(pfd[1]);
  c->pid = pid;
  c->out_fd = pfd[0];
  char buf[512];
  size_t len = 0;
  int port = 0;
  long long deadline = now_ms() + COORD_START_TIMEOUT_MS;
  while (len < sizeof(buf) - 1) {
    long long left = deadline - now_ms();
    if (left <= 0)
      break;
    struct pollfd p = {.fd = pfd[0], .events = POLLIN};
    int r = poll(&p, 1, (int)left);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      break;
    ssize_t k = read(pfd[0], buf + len, sizeof(buf) - 1 - len);
    if (k <= 0)
      break;
    len += (size_t)k;
    buf[len] = '\0';
    /* "sbn-coordinator listening on 127.0.0.1:PORT", then "... metrics on
     * 127.0.0.1:PORT". */
    char *line = strstr(buf, "listening on ");
    char *nl = line ? strchr(line, '\n') : NULL;
    if (nl != NULL && port == 0) {
      const char *colon = memrchr(line, ':', (size_t)(nl - line));
      if (colon != NULL)
        port = atoi(colon + 1);
    }
    const char *m = strstr(buf, "metrics on ");
    const char *mnl = m ? strchr(m, '\n') : NULL;
    if (mnl != NULL) {
      const char *mcolon = memrchr(m, ':', (size_t)(mnl - m));
      if (mcolon != NULL)
        c->metrics_port = atoi(mcolon + 1);
      break;
    }
  }
  if (port <= 0) {
    note("coordinator %s did not report a port within %d ms (start it with "
         "--verbose to see its log)",
         g_opts.coordinator, COORD_START_TIMEOUT_MS);
    coord_stop(c, 1000);
    return -1;
  }
  snprintf(c->addr, sizeof(c->addr), "127.0.0.1:%d", port);
  return 0;
}

int coord_stop(coord *c, int timeout_ms) {
  int result = -1;
  if (c->pid > 0) {
    kill(c->pid, SIGTERM);
    long long deadline = now_ms() + timeout_ms;
    int st;
    for (;;) {
      pid_t r = waitpid(c->pid, &st, WNOHANG);
      if (r == c->pid) {
        result = st;
        break;
      }
      if ((r < 0 && errno != EINTR) || now_ms() >= deadline) {
        note("coordinator did not stop within %d ms: killed", timeout_ms);
        kill(c->pid, SIGKILL);
        while (waitpid(c->pid, &st, 0) < 0 && errno == EINTR)
          ;
        break;
      }
      usleep(2000);
    }
    c->pid = 0;
  }
  if (c->out_fd >= 0)
    close(c->out_fd);
  c->out_fd = -1;
  return result;
}

double coord_cpu_us(const coord *c) {
  char path[64], buf[1024];
  snprintf(path, sizeof(path), "/proc/%d/stat", (int)c->pid);
  FILE *f = fopen(path, "r");
  if (f == NULL)
    return -1;
  size_t n = fread(buf, 1, sizeof(buf) - 1, f);
  fclose(f);
  buf[n] = '\0';
  char *p = strrchr(buf, ')'); /* the command name may hold spaces */
  if (p == NULL)
    return -1;
  /* After ')': state(3) ppid pgrp session tty tpgid flags minflt cminflt
   * majflt cmajflt utime(14) stime(15). */
  unsigned long long utime = 0, stime = 0;
  if (sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &utime,
             &stime) != 2)
    return -1;
  long hz = sysconf(_SC_CLK_TCK);
  if (hz <= 0)
    hz = 100;
  return (double)(utime + stime) * 1e6 / (double)hz;
}

/* GET /metrics from 127.0.0.1:port into buf (NUL-terminated); 0 or -1. */
static int http_get_metrics(int port, char *buf, size_t cap) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return -1;
  struct sockaddr_in a;
  memset(&a, 0, sizeof(a));
  a.sin_family = AF_INET;
  a.sin_port = htons((uint16_t)port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  static const char req[] = "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
  size_t len = 0;
  int rc = -1;
  if (connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0 ||
      write(fd, req, sizeof(req) - 1) != (ssize_t)(sizeof(req) - 1))
    goto out;
  long long deadline = now_ms() + METRICS_TIMEOUT_MS;
  while (len < cap - 1) {
    long long left = deadline - now_ms();
    struct pollfd p = {.fd = fd, .events = POLLIN};
    if (left <= 0 || poll(&p, 1, (int)left) <= 0)
      goto out;
    ssize_t k = read(fd, buf + len, cap - 1 - len);
    if (k < 0)
      goto out;
    if (k == 0) {
      rc = 0; /* the server closes after the answer */
      break;
    }
    len += (size_t)k;
  }
out:
  buf[len] = '\0';
  close(fd);
  return rc;
}

double coord_allocs(const coord *c) {
  static char buf[METRICS_MAX_BYTES];
  static const char name[] = "\nsbn_heap_allocations_total ";
  if (c->metrics_port <= 0 || http_get_metrics(c->metrics_port, buf, sizeof(buf)) != 0)
    return -1;
  const char *p = strstr(buf, name);
  return p ? strtod(p + sizeof(name) - 1, NULL) : -1;
}

double coord_sched_us(const coord *c) {
  char path[96];
  snprintf(path, sizeof(path), "/proc/%d/task", (int)c->pid);
  DIR *d = opendir(path);
  if (d == NULL)
    return -1;
  double total = 0;
  int found = 0;
  struct dirent *e;
  while ((e = readdir(d)) != NULL) {
    if (e->d_name[0] == '.')
      continue;
    char p2[320];
    snprintf(p2, sizeof(p2), "/proc/%d/task/%s/schedstat", (int)c->pid, e->d_name);
    FILE *f = fopen(p2, "r");
    if (f == NULL)
      continue;
    unsigned long long ns;
    if (fscanf(f, "%llu", &ns) == 1) {
      total += (double)ns / 1000.0;
      found = 1;
    }
    fclose(f);
  }
  closedir(d);
  return found ? total : -1;
}

void unique_job(char *buf, size_t len, const char *name) {
  static int counter;
  snprintf(buf, len, "bench-%d-%s-%d", (int)getpid(), name, counter++);
}
