/*
 * sbn-bench-mpi - the MPI reference for sbn-bench's round rows.
 *
 * Every rank runs MPI_Allreduce(MPI_SUM), warm times untimed and then reps
 * timed times, on
 *   stats COUNT:  what a forward round of COUNT channels carries (2*COUNT
 *                 doubles, as sbn_sync_stats sends), or
 *   floats COUNT: a gradient of COUNT floats (as sbn_allreduce takes).
 * Rank 0 times each call and writes the reps latencies, in microseconds, as
 * native doubles to OUT.  sbn-bench starts it under mpirun with the TCP
 * transport only (see bench/mpi_ref.c).
 *
 * usage: sbn-bench-mpi stats|floats COUNT WARM REPS OUT
 * Exit status 0, or 1 with the reason on stderr.
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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
  if (argc != 6 || (strcmp(argv[1], "stats") != 0 && strcmp(argv[1], "floats") != 0)) {
    fprintf(stderr, "usage: sbn-bench-mpi stats|floats COUNT WARM REPS OUT\n");
    return 1;
  }
  const int floats = strcmp(argv[1], "floats") == 0;
  long count = arg(argv[2], 1, 1L << 30, "COUNT"), warm = arg(argv[3], 0, 1000000, "WARM"),
       reps = arg(argv[4], 1, 10000000, "REPS");
  if (count < 0 || warm < 0 || reps < 0)
    return 1;
  MPI_Init(&argc, &argv);
  int rank, size;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  const size_t n = floats ? (size_t)count : 2 * (size_t)count;
  const size_t esz = floats ? sizeof(float) : sizeof(double);
  const MPI_Datatype type = floats ? MPI_FLOAT : MPI_DOUBLE;
  void *in = malloc(n * esz), *out = malloc(n * esz);
  double *lat = rank == 0 ? malloc((size_t)reps * sizeof(double)) : NULL;
  int ok = in != NULL && out != NULL && (rank != 0 || lat != NULL);
  int all_ok = 0;
  MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (!all_ok) {
    fprintf(stderr, "sbn-bench-mpi: out of memory\n");
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  /* Small integers: every sum is exact in float and double alike. */
  for (size_t i = 0; i < n; i++) {
    double v = (double)(rank + 1) * (double)(i % 1000 + 1);
    if (floats)
      ((float *)in)[i] = (float)v;
    else
      ((double *)in)[i] = v;
  }
  for (long i = 0; i < warm; i++)
    MPI_Allreduce(in, out, (int)n, type, MPI_SUM, MPI_COMM_WORLD);
  MPI_Barrier(MPI_COMM_WORLD);
  for (long i = 0; i < reps; i++) {
    double t0 = rank == 0 ? now_us() : 0;
    MPI_Allreduce(in, out, (int)n, type, MPI_SUM, MPI_COMM_WORLD);
    if (rank == 0)
      lat[i] = now_us() - t0;
  }
  int rc = 0;
  if (rank == 0) {
    /* The sum over ranks r = 0..N-1 of (r+1)*k: a transport that lost or
     * mixed data would not give it. */
    const double f = (double)size * (size + 1) / 2;
    for (size_t i = 0; i < n && rc == 0; i++) {
      double got = floats ? (double)((float *)out)[i] : ((double *)out)[i];
      if (got != f * (double)(i % 1000 + 1)) {
        fprintf(stderr, "sbn-bench-mpi: wrong sum at %zu\n", i);
        rc = 1;
      }
    }
    FILE *f_out = rc == 0 ? fopen(argv[5], "wb") : NULL;
    if (rc == 0 &&
        (f_out == NULL || fwrite(lat, sizeof(double), (size_t)reps, f_out) != (size_t)reps)) {
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
