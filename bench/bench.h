/*
 * bench.h - shared pieces of sbn-bench: options, clocks, statistics, JSON
 * lines, child processes (the coordinator and the workers) and the benches.
 *
 * Output rule: every result is one JSON object on one line of stdout; nothing
 * else goes to stdout.  Progress and errors go to stderr.  Children never
 * write to stdout (they _exit() without flushing stdio).
 */
#ifndef SBN_BENCH_H
#define SBN_BENCH_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* ---- options ------------------------------------------------------------ */

#define BENCH_MAX_COORD_ARGS 16

typedef struct bench_opts {
  int quick;            /* few repetitions: a smoke run of seconds */
  int reps;             /* > 0: repetitions of every measurement */
  int verbose;          /* coordinator's stderr passes through */
  const char *coordinator;                    /* path of sbn-coordinator */
  const char *coord_args[BENCH_MAX_COORD_ARGS]; /* extra coordinator args */
  int n_coord_args;
  int groups;           /* > 0: groups for the groups bench */
  /* round rows only with this many workers / channels / spin mode (0: all
   * of them; spin: 1 blocking only, 2 spinning only) */
  int round_workers, round_channels, round_spin;
  const char *mpi_peer; /* sbn-bench-mpi, or NULL: no MPI reference */
  const char *mpirun;   /* Open MPI's mpirun (looked up in PATH) */
  const char *python;   /* the interpreter for bench/gloo.py */
} bench_opts;

extern bench_opts g_opts;

/* Repetitions: --reps if given, else quick or full default. */
int bench_reps(int full, int quick);

/* ---- clocks, statistics ------------------------------------------------- */

double now_s(void);  /* monotonic seconds */
long long now_ms(void);

typedef struct bench_stats {
  double p50, p99, mean, min, max;
  int n;
} bench_stats;

/* Sorts v in place and fills st (nearest-rank percentiles). */
void stats_compute(double *v, int n, bench_stats *st);

/* ---- JSON lines ---------------------------------------------------------- */

typedef struct jline {
  char buf[2048];
  size_t len;
  int n;
} jline;

void j_begin(jline *j, const char *bench);
void j_str(jline *j, const char *key, const char *val);
void j_int(jline *j, const char *key, long long val);
void j_num(jline *j, const char *key, double val); /* NaN/Inf -> null */
void j_bool(jline *j, const char *key, int val);
void j_null(jline *j, const char *key);
/* Closes the object, writes it as one line on stdout and flushes. */
void j_emit(jline *j);

/* Progress on stderr (prefixed "sbn-bench: "). */
void note(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---- shared memory and child processes ---------------------------------- */

/* Anonymous MAP_SHARED memory, zeroed; NULL on failure. */
void *shared_alloc(size_t size);
void shared_free(void *p, size_t size);

/* The control block every multi-process bench puts at the start of its
 * shared region. */
typedef struct bench_ctl {
  atomic_int ready;   /* workers connected and warmed up */
  atomic_int done;    /* workers finished the timed part */
  atomic_int failed;  /* first failure wins the message below */
  char err[512];
} bench_ctl;

/* Records a worker failure (first one wins) and returns 1. */
int ctl_fail(bench_ctl *ctl, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* In a worker: sleeps until the parent calls procs_go() (the "go" pipe is
 * closed), at most timeout_ms; 0 or -1.  No busy polling: hundreds of
 * waiting workers must not steal the CPU from those still warming up. */
int ctl_wait_go(bench_ctl *ctl, int timeout_ms);

typedef int (*proc_fn)(int index, void *arg);

#define PROCS_MAX 512

typedef struct procs {
  int n;
  pid_t pid[PROCS_MAX];
  int exited[PROCS_MAX];
  int status[PROCS_MAX]; /* exit code, or -1 killed / timed out */
  int go_fd;             /* write end of the "go" pipe, -1 once closed */
} procs;

/* Forks n children; child i runs fn(i, arg) and _exit()s with its result.
 * Returns 0, or -1 (the children already started are killed). */
int procs_start(procs *ps, int n, proc_fn fn, void *arg);
/* Reaps children that have exited; returns how many are still running, and
 * sets *bad when one exited non-zero. */
int procs_poll(procs *ps, int *bad);
/* Waits at most timeout_ms for all; the rest are killed.  Returns how many
 * exited 0. */
int procs_wait(procs *ps, int timeout_ms);
void procs_kill(procs *ps);
/* Releases every worker waiting in ctl_wait_go(). */
void procs_go(procs *ps);

/* Waits (bounded) until pred(ctl) or a child fails/exits early or the
 * deadline passes.  Returns 0 when the predicate holds, -1 otherwise. */
int procs_wait_ctl(procs *ps, bench_ctl *ctl, int (*pred)(bench_ctl *, int), int n,
                   int timeout_ms);
int pred_ready(bench_ctl *ctl, int n);
int pred_done(bench_ctl *ctl, int n);

/* Runs argv (argv[0] looked up in PATH) in its own process group, with its
 * stdout to out_fd (or to stderr when -1: stdout is for JSON lines) and its
 * stderr to err_fd (or inherited when -1), for at most timeout_ms.  Returns
 * its exit status, or -1 when it could not run, was killed or timed out
 * (then its whole group is killed). */
int run_bounded(const char *const *argv, int out_fd, int err_fd, int timeout_ms);

/* ---- the coordinator ----------------------------------------------------- */

typedef struct coord {
  pid_t pid;
  int out_fd; /* read end of its stdout, kept open so it never sees EPIPE */
  char addr[64];
  int metrics_port; /* its --metrics port on 127.0.0.1, 0 if unknown */
} coord;

/* Starts the coordinator on 127.0.0.1:0 with --metrics, the --coord-arg
 * arguments, then extra (NULL-terminated, at most BENCH_MAX_EXTRA_ARGS, or
 * NULL); 0 or -1 (message on stderr). */
#define BENCH_MAX_EXTRA_ARGS 8
int coord_start(coord *c, const char *const *extra);
/* SIGTERM, then SIGKILL after timeout_ms.  Returns the wait status or -1. */
int coord_stop(coord *c, int timeout_ms);
/* The coordinator's CPU time (user + system) in microseconds from
 * /proc/<pid>/stat (clock-tick resolution), or -1. */
double coord_cpu_us(const coord *c);
/* The coordinator's sbn_heap_allocations_total (scraped from its metrics
 * port, which does not count its own scrapes), or -1 when unavailable. */
double coord_allocs(const coord *c);
/* The same from /proc/<pid>/task/(*)/schedstat (nanosecond resolution), or -1. */
double coord_sched_us(const coord *c);

/* A job id unique to this run: "bench-<pid>-<name>-<counter>". */
void unique_job(char *buf, size_t len, const char *name);

/* ---- loopback TCP (star.c) ------------------------------------------------- */

/* A socket listening on 127.0.0.1 at a port the kernel picks (*port); the
 * fd, or -1. */
int loopback_listen(int backlog, int *port);
/* A socket connected to 127.0.0.1:port; the fd, or -1 (errno kept). */
int loopback_connect(int port);

/* ---- benches --------------------------------------------------------------- */

size_t floor_payload_bytes(int channels);

/* The star floor of an allreduce of `bytes` across `workers` (star.c): runs
 * it, writes its "allreduce_floor" line and returns its p50 in ms (NAN when
 * it failed). */
double allreduce_floor_p50_ms(size_t bytes, int workers, int warm, int reps);

/* The star floor (floor.c): the same messages through a minimal relay with
 * `workers` processes (with spin everyone polls and yields between polls, as
 * sbn's spinning does); out[reps] gets worker 0's timed round trips (us),
 * *relay_cpu_us the relay's CPU time per round.  0, or -1 on failure. */
int floor_star_samples(int workers, int channels, int spin, int reps, double *out,
                       double *relay_cpu_us);
/* The two-process floor's timed round trips (us) into out[reps]; 0 or -1. */
int floor_samples(int channels, int spin, int reps, double *out);

/* The MPI reference (mpi_ref.c): MPI_Allreduce over TCP on `workers` ranks
 * started by mpirun, of what a round of `count` channels carries (floats 0)
 * or of `count` floats (floats 1); out[reps] gets rank 0's timed calls (us).
 * 0, or -1 (reason on stderr). */
int mpi_samples(int floats, int workers, size_t count, int warm, int reps, double *out);
/* True when the MPI reference can run (checked once; says why not). */
int mpi_ref_available(void);
/* The MPI configuration, for the JSON lines. */
const char *mpi_ref_describe(int floats);

int bench_floor(void);
/* Round trips on loopback for `seconds`, before anything is timed (floor.c). */
void bench_warm_up(double seconds);
int bench_round(coord *c);
int bench_groups(coord *c);
int bench_allreduce(coord *c);
int bench_kernel(void);
int bench_gloo(void);

#endif /* SBN_BENCH_H */
