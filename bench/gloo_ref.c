/*
 * gloo_ref.c - the `gloo` bench: PyTorch's gloo all_reduce of a round's
 * payload, the reference users compare SyncBatchNorm with (bench/gloo.py
 * does the measuring; this runs it with a bound on its time and passes its
 * JSON lines through).  Skipped, with a note, when the Python interpreter
 * has no torch.distributed with gloo.
 */
#define _GNU_SOURCE
#include "bench.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef SBN_BENCH_GLOO_PY
#define SBN_BENCH_GLOO_PY "bench/gloo.py"
#endif

/* gloo.py's cases each have their own bound (300 s); this is all of them. */
#define GLOO_RUN_MS (900 * 1000)
#define GLOO_NO_TORCH 3 /* gloo.py's exit status without torch */

int bench_gloo(void) {
  char reps[16];
  snprintf(reps, sizeof(reps), "%d", bench_reps(400, 20));
  const char *argv[] = {g_opts.python, SBN_BENCH_GLOO_PY, "--workers",
                        g_opts.quick ? "2" : "2,4,8", "--channels", "256", "--reps", reps,
                        "--warm", g_opts.quick ? "5" : "50", NULL};
  char path[] = "/tmp/sbn-bench-gloo-XXXXXX";
  int fd = mkstemp(path);
  if (fd < 0)
    return -1;
  unlink(path);
  int st = run_bounded(argv, fd, -1, GLOO_RUN_MS);
  FILE *f = fdopen(fd, "r");
  if (f == NULL) {
    close(fd);
    return -1;
  }
  rewind(f);
  char line[1024];
  int lines = 0, bad = 0;
  while (fgets(line, sizeof(line), f) != NULL) {
    /* Only whole JSON objects reach stdout. */
    size_t n = strlen(line);
    if (n < 2 || line[0] != '{' || line[n - 1] != '\n' || line[n - 2] != '}') {
      bad++;
      continue;
    }
    fputs(line, stdout);
    lines++;
  }
  fflush(stdout);
  fclose(f);
  if (st == GLOO_NO_TORCH) {
    note("gloo: skipped, %s has no torch.distributed with gloo (--python PATH names another)",
         g_opts.python);
    return 0;
  }
  if (st != 0 || bad || lines == 0) {
    note("gloo: %s %s exited %d with %d result lines (%d malformed)", g_opts.python,
         SBN_BENCH_GLOO_PY, st, lines, bad);
    return -1;
  }
  return 0;
}
