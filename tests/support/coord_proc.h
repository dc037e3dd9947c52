/*
 * coord_proc.h - run a real sbn-coordinator process for a test.
 *
 * The coordinator is started on 127.0.0.1 port 0; it prints
 * "sbn-coordinator listening on 127.0.0.1:PORT" on stdout once it listens,
 * which is how the port is learnt.  Every wait here is bounded.
 */
#ifndef SBN_TEST_COORD_PROC_H
#define SBN_TEST_COORD_PROC_H

#include <sys/types.h>

typedef struct coord_proc {
  pid_t pid;
  int port;
  char addr[64]; /* "127.0.0.1:PORT" */
  /* When coord_start* failed: the wait status of the process (it exited on
   * its own, or was killed with SIGKILL after the start timeout), or -1. */
  int start_status;
} coord_proc;

/*
 * Starts SBN_COORDINATOR_BIN with "--listen 127.0.0.1:0" and the extra
 * arguments (NULL-terminated, may be NULL).  Its stderr goes to the test's
 * stderr unless SBN_TEST_QUIET is set.  Returns 0, or -1 if it did not
 * report a port within 10 s.
 */
int coord_start(coord_proc *cp, const char *const *extra_args);

/* coord_start() with the coordinator's stderr written to stderr_path
 * (created or truncated), for tests that read its log. */
int coord_start_log(coord_proc *cp, const char *const *extra_args, const char *stderr_path);

/* coord_start_log() of another build of the coordinator (test_nomem's). */
int coord_start_bin(coord_proc *cp, const char *bin, const char *const *extra_args,
                    const char *stderr_path);

/*
 * Sends sig (SIGTERM for a clean stop) and waits at most timeout_ms.
 * Returns the exit status as waitpid() gives it, or -1 on timeout (the
 * process is then killed with SIGKILL and reaped).
 */
int coord_stop(coord_proc *cp, int sig, int timeout_ms);

/* Waits at most timeout_ms for child pid; returns its wait status or -1
 * (then the child is killed with SIGKILL and reaped). */
int wait_child(pid_t pid, int timeout_ms);

/* Milliseconds on the monotonic clock. */
long long test_now_ms(void);

#endif
