/*
 * mpi_ref.c - MPI_Allreduce over TCP as a reference for the round rows.
 *
 * The issue that asked for sbn-bench measures sbn against MPI over TCP with
 * spinning ranks.  Measured once by hand, such a figure cannot be divided
 * into one measured minutes later on this VM (rows move by up to 2x), so
 * sbn-bench runs MPI itself, in turns with each round row: mpirun starts
 * sbn-bench-mpi (bench/mpi/peer.c) on N ranks, which allreduces the row's
 * 2*C doubles and writes rank 0's latencies to a file that is read back here.
 *
 * Open MPI only (the mpirun options below are its own), with everything that
 * could make it faster than "MPI over TCP" turned off and everything that
 * makes it fastest over TCP turned on:
 *   --mca pml ob1 --mca btl self,tcp     the TCP transport, no shared memory
 *                                       (shared memory would be 3 us here)
 *   --mca btl_tcp_if_include lo          loopback, as sbn's rows
 *   --bind-to none                      unbound, as sbn's processes
 *   coll_tuned_allreduce_algorithm       for a round's statistics, recursive
 *                                       doubling (3): at N = 2 Open MPI's own
 *                                       choice is 1.5-2x slower here; for
 *                                       gradients, the ring (4): 100 MiB at
 *                                       N = 2 took 363 ms, 440-600 ms with
 *                                       the others and 480 ms with Open
 *                                       MPI's own choice.  The reference
 *                                       should be MPI at its best.
 * Open MPI's ranks busy-poll while they wait (they yield when there are more
 * ranks than cores): these are the "spinning ranks" of the issue.
 */
#define _GNU_SOURCE
#include "bench.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* Time allowed for one mpirun: its start (about 0.4 s here) plus the calls. */
#define MPI_RUN_BASE_MS 30000
#define MPI_RUN_PER_CALL_MS 5

static const char *const mpi_args[] = {
    "--oversubscribe", "--bind-to", "none",
    "--mca", "pml", "ob1",
    "--mca", "btl", "self,tcp",
    "--mca", "btl_tcp_if_include", "lo",
    "--mca", "oob_tcp_if_include", "lo",
    "--mca", "coll_tuned_use_dynamic_rules", "1",
    "--mca", "coll_tuned_allreduce_algorithm",
};
#define N_MPI_ARGS (sizeof(mpi_args) / sizeof(mpi_args[0]))

/* Open MPI's numbers for its allreduce algorithms. */
#define ALG_RECURSIVE_DOUBLING "3"
#define ALG_RING "4"

const char *mpi_ref_describe(int floats) {
  return floats ? "Open MPI, btl self,tcp on lo, ring, --bind-to none"
                : "Open MPI, btl self,tcp on lo, recursive doubling, --bind-to none";
}

/* Prints the last lines of the run's output to stderr. */
static void show_output(int fd) {
  char buf[1024];
  off_t end = lseek(fd, 0, SEEK_END);
  off_t from = end > (off_t)sizeof(buf) - 1 ? end - (off_t)sizeof(buf) + 1 : 0;
  ssize_t k = pread(fd, buf, sizeof(buf) - 1, from);
  if (k > 0) {
    buf[k] = '\0';
    note("mpi: mpirun said:\n%s", buf);
  }
}

static int mpi_state; /* 0 unknown, 1 usable, -1 not */

int mpi_ref_available(void) {
  if (mpi_state != 0)
    return mpi_state > 0;
  mpi_state = -1;
  if (g_opts.mpi_peer == NULL)
    return 0;
  if (access(g_opts.mpi_peer, X_OK) != 0) {
    note("mpi: %s: %s; no MPI reference (--mpi no runs without it)", g_opts.mpi_peer,
         strerror(errno));
    return 0;
  }
  char tmp[] = "/tmp/sbn-bench-mpi-XXXXXX";
  int fd = mkstemp(tmp);
  if (fd < 0)
    return 0;
  unlink(tmp);
  const char *argv[] = {g_opts.mpirun, "--version", NULL};
  int st = run_bounded(argv, fd, fd, 10000);
  char buf[256] = {0};
  ssize_t k = pread(fd, buf, sizeof(buf) - 1, 0);
  close(fd);
  /* Open MPI 4 prints "mpiexec (OpenRTE) 4.1.4", 5 prints "(Open MPI)". */
  if (st != 0 || k <= 0 ||
      (strstr(buf, "Open MPI") == NULL && strstr(buf, "OpenRTE") == NULL &&
       strstr(buf, "open-mpi.org") == NULL)) {
    note("mpi: '%s --version' exited %d without naming Open MPI; no MPI reference "
         "(--mpirun PATH names Open MPI's mpirun, --mpi no runs without it)",
         g_opts.mpirun, st);
    return 0;
  }
  mpi_state = 1;
  return 1;
}

int mpi_samples(int floats, int workers, size_t count, int warm, int reps, double *out) {
  if (!mpi_ref_available())
    return -1;
  char lat_path[] = "/tmp/sbn-bench-mpi-XXXXXX", log_path[] = "/tmp/sbn-bench-mpi-XXXXXX";
  int lat_fd = mkstemp(lat_path);
  if (lat_fd < 0)
    return -1;
  int log_fd = mkstemp(log_path);
  if (log_fd < 0) {
    close(lat_fd);
    unlink(lat_path);
    return -1;
  }
  unlink(log_path);
  char np[16], ch[24], wm[16], rp[16];
  snprintf(np, sizeof(np), "%d", workers);
  snprintf(ch, sizeof(ch), "%zu", count);
  snprintf(wm, sizeof(wm), "%d", warm);
  snprintf(rp, sizeof(rp), "%d", reps);
  const char *argv[N_MPI_ARGS + 12];
  size_t a = 0;
  argv[a++] = g_opts.mpirun;
  argv[a++] = "-np";
  argv[a++] = np;
  if (geteuid() == 0)
    argv[a++] = "--allow-run-as-root";
  for (size_t i = 0; i < N_MPI_ARGS; i++)
    argv[a++] = mpi_args[i];
  argv[a++] = floats ? ALG_RING : ALG_RECURSIVE_DOUBLING;
  argv[a++] = g_opts.mpi_peer;
  argv[a++] = floats ? "floats" : "stats";
  argv[a++] = ch;
  argv[a++] = wm;
  argv[a++] = rp;
  argv[a++] = lat_path;
  argv[a] = NULL;
  int rc = -1;
  /* 1 s per call and 100 MiB on top: 100 MiB at N = 4 took 0.75 s here. */
  const int per_call = MPI_RUN_PER_CALL_MS + (int)((floats ? count * 4 : count * 16) / 100000);
  int st = run_bounded(argv, log_fd, log_fd, MPI_RUN_BASE_MS + per_call * (warm + reps));
  if (st != 0) {
    note("mpi: N=%d %s=%zu: mpirun exit status %d", workers, floats ? "floats" : "C", count, st);
    show_output(log_fd);
    goto out;
  }
  size_t want = sizeof(double) * (size_t)reps, got = 0;
  while (got < want) {
    ssize_t k = pread(lat_fd, (char *)out + got, want - got, (off_t)got);
    if (k <= 0)
      break;
    got += (size_t)k;
  }
  if (got != want) {
    note("mpi: N=%d %s=%zu: %zu of %zu bytes of latencies", workers, floats ? "floats" : "C",
         count, got, want);
    goto out;
  }
  rc = 0;
out:
  close(lat_fd);
  close(log_fd);
  unlink(lat_path);
  return rc;
}
