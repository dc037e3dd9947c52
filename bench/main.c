/*
 * sbn-bench - how close sbn comes to the limits of the network and memory.
 *
 *   sbn-bench [--quick] [--only NAME[,NAME...]] [--reps N]
 *             [--coordinator PATH] [--coord-arg ARG]... [--groups G] [--verbose]
 *             [--workers N] [--channels C] [--spin yes|no]
 *             [--mpi PATH|no] [--mpirun PATH] [--python PATH]
 *
 * Benches: floor, round, groups, allreduce, kernel, gloo (all by default, in
 * that order).  Each result is one JSON object on its own line on stdout; progress
 * goes to stderr.  The program starts its own sbn-coordinator on 127.0.0.1
 * port 0 and its own worker processes, and stops them all before exiting.
 * Exit status: 0 when every selected bench ran, 1 when one failed, 2 on
 * bad usage.  See docs/benchmarks.md.
 */
#define _GNU_SOURCE
#include "bench.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef SBN_COORDINATOR_BIN
#define SBN_COORDINATOR_BIN "sbn-coordinator"
#endif
/* Built only when CMake found MPI (bench/mpi/). */
#ifdef SBN_BENCH_MPI_BIN
static const char *const mpi_default = SBN_BENCH_MPI_BIN;
#else
static const char *const mpi_default = NULL;
#endif
#ifndef SBN_BENCH_MPIRUN
#define SBN_BENCH_MPIRUN "mpirun"
#endif

static const char *const all_benches[] = {"floor",  "round", "groups",
                                          "allreduce", "kernel", "gloo"};
#define N_BENCHES 6

static void usage(FILE *f) {
  fprintf(f,
          "usage: sbn-bench [options]\n"
          "  --quick              few repetitions (a smoke run of seconds)\n"
          "  --only NAME[,NAME]   run only these of: floor, round, groups, allreduce,\n"
          "                       kernel, gloo\n"
          "  --reps N             repetitions of every measurement (overrides defaults)\n"
          "  --coordinator PATH   sbn-coordinator binary (default %s)\n"
          "  --coord-arg ARG      extra argument for the coordinator (repeatable)\n"
          "  --groups G           groups of 4 workers in the groups bench (default 64)\n"
          "  --workers N          round: only the rows with N workers (2, 4 or 8)\n"
          "  --channels C         round: only the rows with C channels (64, 256, 1024, 4096)\n"
          "  --spin yes|no        round: only the spinning or the blocking rows\n"
          "  --mpi PATH|no        round, allreduce: the MPI reference, or none (default %s)\n"
          "  --mpirun PATH        Open MPI's mpirun for it (default %s)\n"
          "  --python PATH        gloo: a Python with torch (default /usr/bin/python3)\n"
          "  --verbose            let the coordinator's log through to stderr\n"
          "Results: one JSON object per line on stdout.\n",
          SBN_COORDINATOR_BIN, mpi_default != NULL ? mpi_default : "not built", SBN_BENCH_MPIRUN);
}

/* Loopback round trips before the first timed one (bench_warm_up). */
#define WARM_UP_S 1.5

static int parse_int(const char *s, int *out) {
  char *end;
  long v = strtol(s, &end, 10);
  if (*s == '\0' || *end != '\0' || v <= 0 || v > 100000000)
    return -1;
  *out = (int)v;
  return 0;
}

int main(int argc, char **argv) {
  int selected[N_BENCHES] = {1, 1, 1, 1, 1, 1};
  g_opts.coordinator = SBN_COORDINATOR_BIN;
  g_opts.mpi_peer = mpi_default;
  g_opts.mpirun = SBN_BENCH_MPIRUN;
  g_opts.python = "/usr/bin/python3"; /* Debian's, where python3-torch goes */
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    const char *val = (i + 1 < argc) ? argv[i + 1] : NULL;
    if (strcmp(a, "--quick") == 0) {
      g_opts.quick = 1;
    } else if (strcmp(a, "--verbose") == 0) {
      g_opts.verbose = 1;
    } else if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
      usage(stdout);
      return 0;
    } else if (val != NULL && strcmp(a, "--only") == 0) {
      memset(selected, 0, sizeof(selected));
      char *copy = strdup(val), *save = NULL;
      for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        int found = 0;
        for (int b = 0; b < N_BENCHES; b++)
          if (strcmp(tok, all_benches[b]) == 0)
            selected[b] = found = 1;
        if (!found) {
          fprintf(stderr, "sbn-bench: unknown bench '%s'\n", tok);
          usage(stderr);
          free(copy);
          return 2;
        }
      }
      free(copy);
      i++;
    } else if (val != NULL && strcmp(a, "--reps") == 0) {
      if (parse_int(val, &g_opts.reps) != 0) {
        fprintf(stderr, "sbn-bench: --reps wants a positive integer, got '%s'\n", val);
        return 2;
      }
      i++;
    } else if (val != NULL && strcmp(a, "--groups") == 0) {
      if (parse_int(val, &g_opts.groups) != 0) {
        fprintf(stderr, "sbn-bench: --groups wants a positive integer, got '%s'\n", val);
        return 2;
      }
      i++;
    } else if (val != NULL && strcmp(a, "--workers") == 0) {
      if (parse_int(val, &g_opts.round_workers) != 0 ||
          (g_opts.round_workers != 2 && g_opts.round_workers != 4 && g_opts.round_workers != 8)) {
        fprintf(stderr, "sbn-bench: --workers wants 2, 4 or 8, got '%s'\n", val);
        return 2;
      }
      i++;
    } else if (val != NULL && strcmp(a, "--channels") == 0) {
      int c = 0;
      if (parse_int(val, &c) != 0 || (c != 64 && c != 256 && c != 1024 && c != 4096)) {
        fprintf(stderr, "sbn-bench: --channels wants 64, 256, 1024 or 4096, got '%s'\n", val);
        return 2;
      }
      g_opts.round_channels = c;
      i++;
    } else if (val != NULL && strcmp(a, "--spin") == 0) {
      if (strcmp(val, "no") != 0 && strcmp(val, "yes") != 0) {
        fprintf(stderr, "sbn-bench: --spin wants yes or no, got '%s'\n", val);
        return 2;
      }
      g_opts.round_spin = strcmp(val, "yes") == 0 ? 2 : 1;
      i++;
    } else if (val != NULL && strcmp(a, "--mpi") == 0) {
      if (strcmp(val, "no") != 0 && access(val, X_OK) != 0) {
        fprintf(stderr, "sbn-bench: --mpi wants no or an executable, got '%s'\n", val);
        return 2;
      }
      g_opts.mpi_peer = strcmp(val, "no") == 0 ? NULL : val;
      i++;
    } else if (val != NULL && strcmp(a, "--python") == 0) {
      g_opts.python = val;
      i++;
    } else if (val != NULL && strcmp(a, "--mpirun") == 0) {
      g_opts.mpirun = val;
      i++;
    } else if (val != NULL && strcmp(a, "--coordinator") == 0) {
      g_opts.coordinator = val;
      i++;
    } else if (val != NULL && strcmp(a, "--coord-arg") == 0) {
      if (g_opts.n_coord_args >= BENCH_MAX_COORD_ARGS) {
        fprintf(stderr, "sbn-bench: too many --coord-arg\n");
        return 2;
      }
      g_opts.coord_args[g_opts.n_coord_args++] = val;
      i++;
    } else {
      fprintf(stderr, "sbn-bench: bad argument '%s'\n", a);
      usage(stderr);
      return 2;
    }
  }
  signal(SIGPIPE, SIG_IGN);

  int failed = 0;
  int need_coord = selected[1] || selected[2] || selected[3];
  const char *warm_env = getenv("SBN_BENCH_WARM_S"); /* to study the warm-up itself */
  const double warm_s = warm_env != NULL ? atof(warm_env) : g_opts.quick ? 0.0 : WARM_UP_S;
  if ((selected[0] || need_coord) && warm_s > 0) {
    note("warming up: %.1f s of loopback round trips", warm_s);
    bench_warm_up(warm_s);
  }
  coord c = {.pid = 0, .out_fd = -1};
  if (need_coord) {
    if (coord_start(&c, NULL) != 0) {
      note("cannot start the coordinator: skipping round, groups, allreduce");
      failed = 1;
      selected[1] = selected[2] = selected[3] = 0;
    } else {
      note("coordinator pid %d on %s", (int)c.pid, c.addr);
    }
  }
  for (int b = 0; b < N_BENCHES; b++) {
    if (!selected[b])
      continue;
    double t0 = now_s();
    int rc;
    switch (b) {
    case 0:
      rc = bench_floor();
      break;
    case 1:
      rc = bench_round(&c);
      break;
    case 2:
      rc = bench_groups(&c);
      break;
    case 3:
      rc = bench_allreduce(&c);
      break;
    case 4:
      rc = bench_kernel();
      break;
    default:
      rc = bench_gloo();
      break;
    }
    note("%s: %s in %.1f s", all_benches[b], rc == 0 ? "done" : "FAILED", now_s() - t0);
    if (rc != 0)
      failed = 1;
  }
  if (c.pid > 0) {
    int st = coord_stop(&c, 10000);
    if (st != 0)
      note("coordinator exit status %d", st);
  }
  return failed;
}
