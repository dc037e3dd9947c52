/*
 * sbn-bench-mpi - the MPI reference for sbn-bench's round rows.
 *
 * Every rank runs MPI_Allreduce(MPI_SUM) on what a forward round of C
 * channels carries (2*C doubles, as sbn_sync_stats sends), warm times
 * untimed and then reps timed times.  Rank 0 times each call and writes the
 * reps latencies, in microseconds, as native doubles to OUT.  sbn-bench
 * starts it under mpirun with the TCP transport only (see bench/mpi_ref.c).
 *
 * usage: sbn-bench-mpi CHANNELS WARM REPS OUT
 * Exit status 0, or 1 with the reason on stderr.
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

static long arg(const char *s, long lo, long hi, const char *what) {
  char *end;
  long v = strtol(s, &end, 10);
  if (*s == '\0' || *end != '\0' || v < lo || v > hi) {
    fprintf(stderr, "sbn-bench-mpi: %s must be in [%ld, %ld], got '%s'\n", what, lo, hi, s);
    return -1;
  }
  return v;
}

int main(int argc, char **argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: sbn-bench-mpi CHANNELS WARM REPS OUT\n");
    return 1;
  }
  long C = arg(argv[1], 1, 1 << 20, "CHANNELS"), warm = arg(argv[2], 0, 1000000, "WARM"),
       reps = arg(argv[3], 1, 10000000, "REPS");
  if (C < 0 || warm < 0 || reps < 0)
    return 1;
  MPI_Init(&argc, &argv);
  int rank;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  size_t n = 2 * (size_t)C;
  double *in = malloc(n * sizeof(double)), *out = malloc(n * sizeof(double));
  double *lat = rank == 0 ? malloc((size_t)reps * sizeof(double)) : NULL;
  int ok = in != NULL && out != NULL && (rank != 0 || lat != NULL);
  int all_ok = 0;
  MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (!all_ok) {
    fprintf(stderr, "sbn-bench-mpi: out of memory\n");
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  for (size_t i = 0; i < n; i++)
    in[i] = (double)(rank + 1) * (double)(i + 1);
  for (long i = 0; i < warm; i++)
    MPI_Allreduce(in, out, (int)n, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  MPI_Barrier(MPI_COMM_WORLD);
  for (long i = 0; i < reps; i++) {
    double t0 = rank == 0 ? now_us() : 0;
    MPI_Allreduce(in, out, (int)n, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    if (rank == 0)
      lat[i] = now_us() - t0;
  }
  int rc = 0;
  if (rank == 0) {
    /* The sum over ranks r = 0..N-1 of (r+1)*(i+1): a transport that lost or
     * mixed data would not give it. */
    int size;
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    double f = (double)size * (size + 1) / 2;
    for (size_t i = 0; i < n && rc == 0; i++)
      if (out[i] != f * (double)(i + 1)) {
        fprintf(stderr, "sbn-bench-mpi: wrong sum at %zu\n", i);
        rc = 1;
      }
    FILE *f_out = rc == 0 ? fopen(argv[4], "wb") : NULL;
    if (rc == 0 && (f_out == NULL || fwrite(lat, sizeof(double), (size_t)reps, f_out) != (size_t)reps)) {
      perror("sbn-bench-mpi: write");
      rc = 1;
    }
    if (f_out != NULL && fclose(f_out) != 0)
      rc = 1;
  }
  free(in);
  free(out);
  free(lat);
  MPI_Finalize();
  return rc;
}
