/*
 * dist.c - the benches that go through a real sbn-coordinator: `round`
 * (forward rounds of one group), `groups` (many jobs at once) and
 * `allreduce` (gradient allreduce throughput: one buffer, and ResNet-50's
 * parameter tensors fused, each against the raw TCP star of star.c).
 *
 * Every worker is a forked process with its own sbn_ctx.  The parent
 * coordinates through a shared control block: workers connect and warm up,
 * report ready, wait for "go", run the timed part and report done.  The
 * coordinator's CPU time is read around the timed part only.
 */
#define _GNU_SOURCE
#include "bench.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "resnet50_sizes.h"
#include "sbn/sbn.h"

#define WORKER_ROUND_TIMEOUT_MS 30000
#define WORKER_CONNECT_TIMEOUT_MS 20000
#define READY_TIMEOUT_MS 60000
#define STOP_TIMEOUT_MS 15000
#define SPIN_US 200
#define LAYER "bench.bn"

/* ---- forward rounds: one worker ------------------------------------------- */

typedef struct rw_arg {
  const char *addr;
  char job[96];   /* prefix; group g uses "<job>-g<g>" */
  int groups;
  int wpg;        /* workers per group */
  size_t C;
  int spin_us;
  int warm, reps;
  bench_ctl *ctl;
  double *lat;     /* [reps], written by group 0 rank 0 (microseconds) */
  double *elapsed; /* [groups], written by each group's rank 0 (seconds) */
  double *t_end;   /* [groups]: monotonic time when rank 0 finished */
  double *t_init;  /* [workers]: when sbn_init returned, then the first barrier */
  double *t_bar;
} rw_arg;

static int connect_worker(bench_ctl *ctl, const char *addr, const char *job, int rank,
                          int world, int spin_us, sbn_ctx **ctx) {
  sbn_config cfg;
  sbn_config_init(&cfg);
  cfg.coordinator = addr;
  cfg.job = job;
  cfg.rank = rank;
  cfg.world_size = world;
  cfg.connect_timeout_ms = WORKER_CONNECT_TIMEOUT_MS;
  cfg.timeout_ms = WORKER_ROUND_TIMEOUT_MS;
  cfg.spin_us = spin_us;
  int rc = sbn_init(&cfg, ctx);
  if (rc != SBN_OK)
    return ctl_fail(ctl, "%s rank %d: sbn_init: %s (%s)", job, rank, sbn_strerror(rc),
                    sbn_last_error());
  return 0;
}

static int round_worker(int idx, void *argp) {
  rw_arg *a = argp;
  int g = idx / a->wpg, rank = idx % a->wpg;
  char job[128];
  snprintf(job, sizeof(job), "%s-g%d", a->job, g);
  sbn_ctx *ctx = NULL;
  if (connect_worker(a->ctl, a->addr, job, rank, a->wpg, a->spin_us, &ctx) != 0)
    return 1;
  a->t_init[idx] = now_s();
  size_t C = a->C;
  double *v = malloc(sizeof(double) * 4 * C);
  if (v == NULL) {
    sbn_finalize(ctx);
    return ctl_fail(a->ctl, "out of memory");
  }
  double *mean = v, *m2 = v + C, *gmean = v + 2 * C, *gm2 = v + 3 * C;
  for (size_t c = 0; c < C; c++) {
    mean[c] = 0.25 * (double)rank + 0.001 * (double)c;
    m2[c] = 1000.0 + (double)c;
  }
  const uint64_t count = 1024;
  uint64_t gcount = 0;
  sbn_group *w = sbn_world(ctx);
  int rc = sbn_barrier(w);
  a->t_bar[idx] = now_s();
  for (int i = 0; rc == SBN_OK && i < a->warm; i++)
    rc = sbn_sync_stats(w, LAYER, C, count, mean, m2, &gcount, gmean, gm2);
  if (rc != SBN_OK)
    goto fail;
  atomic_fetch_add(&a->ctl->ready, 1);
  if (ctl_wait_go(a->ctl, READY_TIMEOUT_MS) != 0) {
    sbn_finalize(ctx);
    free(v);
    return 1;
  }
  rc = sbn_barrier(w);
  if (rc != SBN_OK)
    goto fail;
  int record = (g == 0 && rank == 0 && a->lat != NULL);
  double start = now_s();
  for (int i = 0; i < a->reps; i++) {
    double t0 = now_s();
    rc = sbn_sync_stats(w, LAYER, C, count, mean, m2, &gcount, gmean, gm2);
    if (rc != SBN_OK)
      goto fail;
    if (record)
      a->lat[i] = (now_s() - t0) * 1e6;
  }
  if (rank == 0) {
    double end = now_s();
    a->elapsed[g] = end - start;
    a->t_end[g] = end;
  }
  if (gcount != count * (uint64_t)a->wpg) {
    sbn_finalize(ctx);
    free(v);
    return ctl_fail(a->ctl, "%s: global count %llu, expected %llu", job,
                    (unsigned long long)gcount,
                    (unsigned long long)(count * (uint64_t)a->wpg));
  }
  atomic_fetch_add(&a->ctl->done, 1);
  sbn_finalize(ctx);
  free(v);
  return 0;
fail:
  ctl_fail(a->ctl, "%s rank %d: %s (%s)", job, rank, sbn_strerror(rc), sbn_last_error());
  sbn_finalize(ctx);
  free(v);
  return 1;
}

typedef struct round_result {
  bench_stats lat;     /* group 0 rank 0, microseconds */
  double rounds_per_s; /* all groups together */
  double wall_s;
  double coord_cpu_us, coord_sched_us; /* during the timed part */
  double coord_allocs;                 /* heap allocations then, NAN if unknown */
  long long rounds;    /* group rounds in the timed part */
} round_result;

static size_t align8(size_t n) { return (n + 7) & ~(size_t)7; }

/* Runs groups x wpg workers; 0 or -1 (reason on stderr). */
static int run_rounds(coord *c, int groups, int wpg, size_t C, int spin_us, int warm,
                      int reps, int record, round_result *out, double *keep) {
  memset(out, 0, sizeof(*out));
  size_t off_lat = align8(sizeof(bench_ctl));
  size_t off_el = off_lat + sizeof(double) * (size_t)(record ? reps : 0);
  size_t off_te = off_el + sizeof(double) * (size_t)groups;
  size_t off_ti = off_te + sizeof(double) * (size_t)groups;
  size_t off_tb = off_ti + sizeof(double) * (size_t)(groups * wpg);
  size_t size = off_tb + sizeof(double) * (size_t)(groups * wpg);
  char *sh = shared_alloc(size);
  if (sh == NULL)
    return -1;
  rw_arg a = {.addr = c->addr, .groups = groups, .wpg = wpg, .C = C, .spin_us = spin_us,
              .warm = warm, .reps = reps, .ctl = (bench_ctl *)sh,
              .lat = record ? (double *)(sh + off_lat) : NULL,
              .elapsed = (double *)(sh + off_el), .t_end = (double *)(sh + off_te),
              .t_init = (double *)(sh + off_ti),
              .t_bar = (double *)(sh + off_tb)};
  unique_job(a.job, sizeof(a.job), "round");
  int n = groups * wpg, rc = -1;
  procs ps;
  double ts = now_s();
  if (procs_start(&ps, n, round_worker, &a) != 0)
    goto out;
  if (procs_wait_ctl(&ps, a.ctl, pred_ready, n, READY_TIMEOUT_MS + 10 * n) != 0)
    goto fail;
  if (n > 8) {
    double mi = 0, mb = 0;
    for (int i = 0; i < n; i++) {
      mi = a.t_init[i] - ts > mi ? a.t_init[i] - ts : mi;
      mb = a.t_bar[i] - ts > mb ? a.t_bar[i] - ts : mb;
    }
    note("  %d workers: all connected after %.2f s, first barrier %.2f s, warmed up "
         "%.2f s",
         n, mi, mb, now_s() - ts);
  }
  double al0 = coord_allocs(c);
  double cpu0 = coord_cpu_us(c), sch0 = coord_sched_us(c);
  double t0 = now_s();
  procs_go(&ps);
  long long run_timeout = 60000 + (long long)reps * groups * wpg * 5;
  if (procs_wait_ctl(&ps, a.ctl, pred_done, n,
                     (int)(run_timeout > 2000000000 ? 2000000000 : run_timeout)) != 0)
    goto fail;
  double t1 = now_s();
  double cpu1 = coord_cpu_us(c), sch1 = coord_sched_us(c);
  double al1 = coord_allocs(c);
  if (procs_wait(&ps, STOP_TIMEOUT_MS) != n) {
    note("some workers did not exit cleanly");
    goto out;
  }
  if (n > 8)
    note("  timed part %.2f s, workers exited %.2f s later", t1 - t0, now_s() - t1);
  /* Go was given at t0; the last group's rank 0 finished at max t_end (the
   * parent's own t1 lags by up to one of its sleeps). */
  double last = t0;
  for (int g = 0; g < groups; g++)
    last = a.t_end[g] > last ? a.t_end[g] : last;
  out->wall_s = last - t0;
  out->rounds = (long long)groups * reps;
  if (groups == 1)
    out->rounds_per_s = reps / a.elapsed[0];
  else
    out->rounds_per_s = (double)out->rounds / out->wall_s;
  out->coord_cpu_us = (cpu0 >= 0 && cpu1 >= 0) ? cpu1 - cpu0 : NAN;
  out->coord_sched_us = (sch0 >= 0 && sch1 >= 0) ? sch1 - sch0 : NAN;
  out->coord_allocs = (al0 >= 0 && al1 >= 0) ? al1 - al0 : NAN;
  if (record && keep != NULL)
    memcpy(keep, a.lat, sizeof(double) * (size_t)reps);
  if (record)
    stats_compute(a.lat, reps, &out->lat);
  rc = 0;
  goto out;
fail:
  note("workers failed: %s", a.ctl->err[0] ? a.ctl->err : "a worker exited early");
  procs_kill(&ps);
out:
  shared_free(sh, size);
  return rc;
}

/* ---- round ----------------------------------------------------------------- */

/*
 * Least squares of the coordinator's CPU time per round (from schedstat, in
 * microseconds) against y = a + b * members + c * members * channels over
 * the rounds without spinning, with R^2 and the largest relative residual:
 * the evidence that the cost per round is linear in members x channels.
 * pts[i] = {members, members * channels, us per round}.
 */
#define FIT_MAX 16
static void emit_fit(double pts[][3], int n) {
  if (n < 4)
    return;
  double A[3][4] = {{0}};
  for (int i = 0; i < n; i++) {
    const double x[3] = {1, pts[i][0], pts[i][1]};
    for (int r = 0; r < 3; r++) {
      for (int k = 0; k < 3; k++)
        A[r][k] += x[r] * x[k];
      A[r][3] += x[r] * pts[i][2];
    }
  }
  /* Gauss-Jordan with partial pivoting on the 3 x 3 normal equations. */
  for (int col = 0; col < 3; col++) {
    int piv = col;
    for (int r = col + 1; r < 3; r++)
      if (fabs(A[r][col]) > fabs(A[piv][col]))
        piv = r;
    if (fabs(A[piv][col]) < 1e-300)
      return;
    for (int k = 0; k < 4; k++) {
      double t = A[col][k];
      A[col][k] = A[piv][k];
      A[piv][k] = t;
    }
    for (int r = 0; r < 3; r++) {
      if (r == col)
        continue;
      double f = A[r][col] / A[col][col];
      for (int k = col; k < 4; k++)
        A[r][k] -= f * A[col][k];
    }
  }
  double beta[3];
  for (int r = 0; r < 3; r++)
    beta[r] = A[r][3] / A[r][r];
  double mean = 0, ss_tot = 0, ss_res = 0, worst = 0;
  for (int i = 0; i < n; i++)
    mean += pts[i][2] / n;
  for (int i = 0; i < n; i++) {
    double pred = beta[0] + beta[1] * pts[i][0] + beta[2] * pts[i][1];
    double res = pts[i][2] - pred;
    ss_tot += (pts[i][2] - mean) * (pts[i][2] - mean);
    ss_res += res * res;
    if (fabs(res) / pts[i][2] > worst)
      worst = fabs(res) / pts[i][2];
  }
  jline j;
  j_begin(&j, "round_fit");
  j_str(&j, "model", "coord_sched_us_per_round = a + b*workers + c*workers*channels");
  j_int(&j, "points", n);
  j_num(&j, "a_us", beta[0]);
  j_num(&j, "b_us_per_worker", beta[1]);
  j_num(&j, "c_ns_per_worker_channel", beta[2] * 1000.0);
  j_num(&j, "r2", ss_tot > 0 ? 1.0 - ss_res / ss_tot : NAN);
  j_num(&j, "max_rel_residual", worst);
  j_emit(&j);
}

/*
 * One round row and what its ratios divide by, measured in turns: the
 * rounds, the star floor, the two-process floor (and the spinning floor for
 * a spinning row) and MPI_Allreduce over TCP (when mpi_ref_available()),
 * ROW_ALTERNATIONS times reps / ROW_ALTERNATIONS round trips each, so that
 * all of them span the same minutes of this machine's moods (one after the
 * other, a row and its floors moved apart by up to 2x here).  Each statistic is over all the turns' samples together.
 */
#define ROW_ALTERNATIONS 4
typedef struct row_result {
  bench_stats lat, star, floor, floor_spin, mpi; /* microseconds */
  int has_mpi;
  double rounds_per_s, relay_cpu_us;
  double coord_cpu_us, coord_sched_us, coord_allocs;
  long long rounds;
  int alternations;
} row_result;

static int measure_row(coord *cc, int N, int C, int spin, int warm, int reps, row_result *out) {
  const int k = reps >= ROW_ALTERNATIONS * 100 ? ROW_ALTERNATIONS : 1, rk = reps / k;
  const size_t per = (size_t)rk * (size_t)k;
  double *v = malloc(sizeof(double) * per * 5);
  if (v == NULL)
    return -1;
  double *lat = v, *star = v + per, *fl = v + 2 * per, *fls = v + 3 * per, *mpi = v + 4 * per;
  memset(out, 0, sizeof(*out));
  out->alternations = k;
  out->has_mpi = mpi_ref_available();
  double elapsed = 0, relay = 0;
  int rc = -1;
  for (int t = 0; t < k; t++) {
    round_result r;
    double rcpu;
    const size_t o = (size_t)t * (size_t)rk;
    if (run_rounds(cc, 1, N, (size_t)C, spin ? SPIN_US : 0, warm, rk, 1, &r, lat + o) != 0)
      goto out;
    if (floor_star_samples(N, C, spin, rk, star + o, &rcpu) != 0 ||
        floor_samples(C, 0, rk, fl + o) != 0 || (spin && floor_samples(C, 1, rk, fls + o) != 0)) {
      note("round N=%d C=%d spin=%d: a floor failed", N, C, spin);
      goto out;
    }
    if (out->has_mpi && mpi_samples(0, N, (size_t)C, warm, rk, mpi + o) != 0) {
      note("round N=%d C=%d spin=%d: the MPI reference failed", N, C, spin);
      goto out;
    }
    elapsed += (double)rk / r.rounds_per_s;
    relay += rcpu / k;
    out->coord_cpu_us += r.coord_cpu_us;
    out->coord_sched_us += r.coord_sched_us;
    out->coord_allocs += r.coord_allocs;
    out->rounds += r.rounds;
  }
  out->rounds_per_s = (double)per / elapsed;
  out->relay_cpu_us = relay;
  stats_compute(lat, (int)per, &out->lat);
  stats_compute(star, (int)per, &out->star);
  stats_compute(fl, (int)per, &out->floor);
  if (spin)
    stats_compute(fls, (int)per, &out->floor_spin);
  if (out->has_mpi)
    stats_compute(mpi, (int)per, &out->mpi);
  rc = 0;
out:
  free(v);
  return rc;
}

int bench_round(coord *c) {
  static const int Ns[] = {2, 4, 8};
  static const int Cs[] = {64, 256, 1024, 4096};
  int reps = bench_reps(2000, 100), warm = g_opts.quick ? 20 : 200;
  int fails = 0;
  double fit[FIT_MAX][3];
  int nfit = 0;
  /* Spinning rows: the workers spin, and so does a coordinator of their own. */
  coord spinning = {.pid = 0, .out_fd = -1};
  char spin_arg[16];
  snprintf(spin_arg, sizeof(spin_arg), "%d", SPIN_US);
  const char *const spin_args[] = {"--spin-us", spin_arg, NULL};
  if (g_opts.mpi_peer != NULL && !mpi_ref_available())
    fails++; /* asked for (or built with) the MPI reference, and it cannot run */
  for (int spin = 0; spin <= 1; spin++)
    for (int ni = 0; ni < 3; ni++) {
      if ((g_opts.round_spin && g_opts.round_spin != spin + 1) ||
          (g_opts.round_workers && g_opts.round_workers != Ns[ni]))
        continue;
      if (spin && spinning.pid == 0) {
        if (coord_start(&spinning, spin_args) != 0) {
          fails++;
          break;
        }
      }
      coord *cc = spin ? &spinning : c;
      int N = Ns[ni];
      if (spin && N > 4)
        continue; /* 8 spinning processes on 2 cores only measure contention */
      for (int ci = 0; ci < 4; ci++) {
        int C = Cs[ci];
        if (g_opts.round_channels && g_opts.round_channels != C)
          continue;
        note("round N=%d C=%d spin=%d", N, C, spin);
        row_result r;
        if (measure_row(cc, N, C, spin, warm, reps, &r) != 0) {
          fails++;
          continue;
        }
        jline j;
        j_begin(&j, "floor_star");
        j_int(&j, "workers", N);
        j_int(&j, "channels", C);
        j_bool(&j, "spin", spin);
        j_int(&j, "payload_bytes", (long long)floor_payload_bytes(C));
        j_int(&j, "reps", r.star.n);
        j_num(&j, "p50_us", r.star.p50);
        j_num(&j, "p99_us", r.star.p99);
        j_num(&j, "mean_us", r.star.mean);
        j_num(&j, "relay_cpu_us_per_round", r.relay_cpu_us);
        j_emit(&j);
        if (r.has_mpi) {
          j_begin(&j, "round_mpi");
          j_int(&j, "workers", N);
          j_int(&j, "channels", C);
          j_int(&j, "payload_bytes", (long long)floor_payload_bytes(C));
          j_str(&j, "mpi", mpi_ref_describe(0));
          j_int(&j, "reps", r.mpi.n);
          j_num(&j, "p50_us", r.mpi.p50);
          j_num(&j, "p99_us", r.mpi.p99);
          j_num(&j, "mean_us", r.mpi.mean);
          j_emit(&j);
        }
        j_begin(&j, "round");
        j_int(&j, "workers", N);
        j_int(&j, "channels", C);
        j_int(&j, "payload_bytes", (long long)floor_payload_bytes(C));
        j_bool(&j, "spin", spin);
        j_int(&j, "spin_us", spin ? SPIN_US : 0);
        j_int(&j, "coord_spin_us", spin ? SPIN_US : 0);
        j_int(&j, "reps", r.lat.n);
        j_int(&j, "alternations", r.alternations);
        j_num(&j, "p50_us", r.lat.p50);
        j_num(&j, "p99_us", r.lat.p99);
        j_num(&j, "mean_us", r.lat.mean);
        j_num(&j, "rounds_per_s", r.rounds_per_s);
        j_num(&j, "floor_p50_us", r.floor.p50);
        j_num(&j, "floor_ratio", r.lat.p50 / r.floor.p50);
        j_num(&j, "star_p50_us", r.star.p50);
        j_num(&j, "star_ratio", r.lat.p50 / r.star.p50);
        if (spin) {
          j_num(&j, "floor_spin_p50_us", r.floor_spin.p50);
          j_num(&j, "floor_spin_ratio", r.lat.p50 / r.floor_spin.p50);
        }
        if (r.has_mpi) {
          j_num(&j, "mpi_p50_us", r.mpi.p50);
          j_num(&j, "mpi_ratio", r.lat.p50 / r.mpi.p50);
        }
        j_num(&j, "coord_cpu_us_per_round", r.coord_cpu_us / (double)r.rounds);
        j_num(&j, "coord_sched_us_per_round", r.coord_sched_us / (double)r.rounds);
        j_num(&j, "coord_allocs_per_round", r.coord_allocs / (double)r.rounds);
        j_emit(&j);
        if (!spin && nfit < FIT_MAX) {
          fit[nfit][0] = N;
          fit[nfit][1] = (double)N * C;
          fit[nfit][2] = r.coord_sched_us / (double)r.rounds;
          nfit++;
        }
      }
    }
  if (spinning.pid > 0)
    coord_stop(&spinning, 10000);
  emit_fit(fit, nfit);
  return fails ? -1 : 0;
}

/* ---- groups ---------------------------------------------------------------- */

int bench_groups(coord *c) {
  static const int Cs[] = {64, 256, 1024};
  int groups = g_opts.groups > 0 ? g_opts.groups : (g_opts.quick ? 8 : 64);
  const int wpg = 4;
  if (groups * wpg > PROCS_MAX) {
    note("groups: at most %d processes", PROCS_MAX);
    return -1;
  }
  int reps = bench_reps(200, 20), warm = g_opts.quick ? 5 : 20;
  int fails = 0;
  for (int ci = 0; ci < 3; ci++) {
    int C = Cs[ci];
    round_result r;
    note("groups G=%d x %d C=%d (%d processes)", groups, wpg, C, groups * wpg);
    if (run_rounds(c, groups, wpg, (size_t)C, 0, warm, reps, 0, &r, NULL) != 0) {
      fails++;
      continue;
    }
    jline j;
    j_begin(&j, "groups");
    j_int(&j, "groups", groups);
    j_int(&j, "workers_per_group", wpg);
    j_int(&j, "processes", groups * wpg);
    j_str(&j, "layout", "one job per group, one process per worker");
    j_int(&j, "channels", C);
    j_int(&j, "rounds_per_group", reps);
    j_num(&j, "rounds_per_s", r.rounds_per_s);
    j_num(&j, "wall_s", r.wall_s);
    double per = r.coord_cpu_us / (double)r.rounds;
    j_num(&j, "coord_cpu_us_per_round", per);
    j_num(&j, "coord_sched_us_per_round", r.coord_sched_us / (double)r.rounds);
    j_num(&j, "coord_ns_per_member_channel",
          r.coord_sched_us * 1000.0 / ((double)r.rounds * wpg * C));
    j_num(&j, "coord_allocs_per_round", r.coord_allocs / (double)r.rounds);
    j_emit(&j);
  }
  return fails ? -1 : 0;
}

/* ---- allreduce ---------------------------------------------------------------- */

/* Untimed calls before the timed ones, for sbn and for its star floor alike. */
#define AR_WARM 1
/* The allreduce_many rows: the parameter tensors of ResNet-50. */
#define AR_MANY_MODEL "resnet50"

typedef struct ar_arg {
  const char *addr;
  char job[96];
  int world;
  size_t n;         /* floats in all */
  const size_t *ns; /* k > 0: sbn_allreduce_many over k tensors of ns[i] floats */
  size_t k;
  int warm, reps;
  bench_ctl *ctl;
  double *lat; /* [reps], rank 0, milliseconds */
} ar_arg;

static void free_tensors(float **bufs, size_t m) {
  for (size_t t = 0; bufs != NULL && t < m; t++)
    free(bufs[t]);
  free(bufs);
}

static int allreduce_worker(int rank, void *argp) {
  ar_arg *a = argp;
  sbn_ctx *ctx = NULL;
  if (connect_worker(a->ctl, a->addr, a->job, rank, a->world, 0, &ctx) != 0)
    return 1;
  /* One buffer, or one allocation per tensor as a framework's gradients
   * would be: nothing lets the library count on them being adjacent. */
  size_t m = a->k > 0 ? a->k : 1;
  const size_t *ns = a->k > 0 ? a->ns : &a->n;
  float **bufs = calloc(m, sizeof(float *));
  for (size_t t = 0; bufs != NULL && t < m; t++) {
    if ((bufs[t] = malloc(sizeof(float) * (ns[t] > 0 ? ns[t] : 1))) == NULL) {
      free_tensors(bufs, m);
      bufs = NULL;
      break;
    }
    for (size_t i = 0; i < ns[t]; i++)
      bufs[t][i] = (float)(rank + 1) * 0.5f + (float)(i & 1023) * 1e-3f;
  }
  if (bufs == NULL) {
    sbn_finalize(ctx);
    return ctl_fail(a->ctl, "out of memory for %zu floats", a->n);
  }
  sbn_group *w = sbn_world(ctx);
  int rc = sbn_barrier(w);
  for (int i = 0; rc == SBN_OK && i < a->warm + a->reps; i++) {
    if (i == a->warm) {
      atomic_fetch_add(&a->ctl->ready, 1);
      if (ctl_wait_go(a->ctl, READY_TIMEOUT_MS) != 0) {
        sbn_finalize(ctx);
        free_tensors(bufs, m);
        return 1;
      }
    }
    if (i >= a->warm && (rc = sbn_barrier(w)) != SBN_OK)
      break;
    double t0 = now_s();
    rc = a->k > 0 ? sbn_allreduce_many(w, bufs, a->ns, a->k, SBN_REDUCE_MEAN)
                  : sbn_allreduce(w, bufs[0], a->n, SBN_REDUCE_MEAN);
    if (rc == SBN_OK && i >= a->warm && rank == 0)
      a->lat[i - a->warm] = (now_s() - t0) * 1e3;
  }
  if (rc != SBN_OK) {
    ctl_fail(a->ctl, "%s rank %d: %s (%s)", a->job, rank, sbn_strerror(rc),
             sbn_last_error());
    sbn_finalize(ctx);
    free_tensors(bufs, m);
    return 1;
  }
  atomic_fetch_add(&a->ctl->done, 1);
  sbn_finalize(ctx);
  free_tensors(bufs, m);
  return 0;
}

/* Timed repetitions by size: 30 up to 1 MiB, 10 up to 16 MiB, 5 beyond. */
static int ar_reps(size_t bytes) {
  return bench_reps(bytes <= (1u << 20) ? 30 : bytes <= (16u << 20) ? 10 : 5, 2);
}

/* N workers allreduce n floats (k > 0: as the k tensors ns[]) AR_WARM + reps
 * times; fills st with rank 0's timed calls (ms).  0 or -1. */
static int ar_run(coord *c, int N, size_t n, const size_t *ns, size_t k, int reps,
                  bench_stats *st) {
  size_t off_lat = align8(sizeof(bench_ctl));
  size_t size = off_lat + sizeof(double) * (size_t)reps;
  char *sh = shared_alloc(size);
  if (sh == NULL)
    return -1;
  ar_arg a = {.addr = c->addr, .world = N, .n = n, .ns = ns, .k = k, .warm = AR_WARM,
              .reps = reps, .ctl = (bench_ctl *)sh, .lat = (double *)(sh + off_lat)};
  unique_job(a.job, sizeof(a.job), k > 0 ? "allreduce-many" : "allreduce");
  size_t bytes = n * sizeof(float);
  procs ps;
  int ok = 0;
  if (procs_start(&ps, N, allreduce_worker, &a) == 0) {
    long long tmo = 60000 + (long long)reps * (long long)(bytes >> 20) * N * 100;
    if (procs_wait_ctl(&ps, a.ctl, pred_ready, N, READY_TIMEOUT_MS + (int)(tmo / 4)) == 0 &&
        (procs_go(&ps), procs_wait_ctl(&ps, a.ctl, pred_done, N, (int)tmo) == 0) &&
        procs_wait(&ps, STOP_TIMEOUT_MS) == N)
      ok = 1;
    if (!ok) {
      note("allreduce workers failed: %s",
           a.ctl->err[0] ? a.ctl->err : "a worker exited early");
      procs_kill(&ps);
    }
  }
  if (ok)
    stats_compute(a.lat, reps, st);
  shared_free(sh, size);
  return ok ? 0 : -1;
}

/* MPI_Allreduce over TCP of n floats on N ranks: writes its "allreduce_mpi"
 * line and returns its p50 in ms; NAN without MPI or when it failed. */
static double mpi_ref_p50_ms(int N, size_t n, int reps) {
  if (!mpi_ref_available())
    return NAN;
  double *v = malloc(sizeof(double) * (size_t)reps);
  bench_stats st;
  if (v == NULL || mpi_samples(1, N, n, AR_WARM, reps, v) != 0) {
    free(v);
    return NAN;
  }
  stats_compute(v, reps, &st);
  free(v);
  jline j;
  j_begin(&j, "allreduce_mpi");
  j_int(&j, "bytes", (long long)(n * sizeof(float)));
  j_int(&j, "workers", N);
  j_str(&j, "mpi", mpi_ref_describe(1));
  j_str(&j, "op", "sum");
  j_int(&j, "reps", st.n);
  j_num(&j, "p50_ms", st.p50 / 1e3);
  j_num(&j, "p99_ms", st.p99 / 1e3);
  j_num(&j, "min_ms", st.min / 1e3);
  j_num(&j, "gbps", (double)(n * sizeof(float)) / (st.p50 * 1e-6) / 1e9);
  j_emit(&j);
  return st.p50 / 1e3;
}

/* One row: the star floor for the same bytes and workers first (its own
 * line), then sbn, with the ratio of the two.  0 or -1. */
static int ar_case(coord *c, const char *bench, int N, size_t n, const size_t *ns, size_t k) {
  size_t bytes = n * sizeof(float);
  int reps = ar_reps(bytes);
  double fl = allreduce_floor_p50_ms(bytes, N, AR_WARM, reps);
  bench_stats st;
  note("%s N=%d bytes=%zu", bench, N, bytes);
  if (ar_run(c, N, n, ns, k, reps, &st) != 0)
    return -1;
  /* MPI_Allreduce of the same floats (one buffer: MPI has no fused call). */
  double mpi = k > 0 ? NAN : mpi_ref_p50_ms(N, n, reps);
  jline j;
  j_begin(&j, bench);
  j_int(&j, "bytes", (long long)bytes);
  j_int(&j, "workers", N);
  if (k > 0) {
    j_str(&j, "model", AR_MANY_MODEL);
    j_int(&j, "tensors", (long long)k);
  }
  j_str(&j, "op", "mean");
  j_int(&j, "reps", reps);
  j_num(&j, "p50_ms", st.p50);
  j_num(&j, "p99_ms", st.p99);
  j_num(&j, "min_ms", st.min);
  j_num(&j, "gbps", (double)bytes / (st.p50 * 1e-3) / 1e9);
  j_num(&j, "floor_p50_ms", fl);
  j_num(&j, "floor_ratio", st.p50 / fl);
  if (!isnan(mpi)) {
    j_num(&j, "mpi_p50_ms", mpi);
    j_num(&j, "mpi_ratio", st.p50 / mpi);
  }
  j_emit(&j);
  return isnan(fl) || (k == 0 && mpi_ref_available() && isnan(mpi)) ? -1 : 0;
}

int bench_allreduce(coord *c) {
  static const size_t sizes[] = {1u << 20, 16u << 20, 100u << 20};
  static const int Ns[] = {2, 4};
  int fails = 0;
  for (int ni = 0; ni < 2; ni++)
    for (int si = 0; si < 3; si++)
      fails += ar_case(c, "allreduce", Ns[ni], sizes[si] / sizeof(float), NULL, 0) != 0;
  for (int ni = 0; ni < 2; ni++)
    fails += ar_case(c, "allreduce_many", Ns[ni], RESNET50_FLOATS, resnet50_sizes,
                     RESNET50_TENSORS) != 0;
  return fails ? -1 : 0;
}
