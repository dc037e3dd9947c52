/*
 * client_wrap.h - failing allocations on request in a test program linked
 * with --wrap=malloc,calloc,realloc (tests/nomem/client_wrap.c), for
 * test_nomem_client.  Outside an armed stretch every allocation is passed
 * through; inside it they are counted, and the chosen one fails (with
 * SBN_NOMEM_TRACE=1 set, a backtrace goes to stderr: addr2line -f -e the
 * test program names the frames).  One thread; a forked child inherits the
 * state.
 */
#ifndef SBN_TEST_CLIENT_WRAP_H
#define SBN_TEST_CLIENT_WRAP_H

/* From now on count allocations; the fail_at-th (1-based) returns NULL, and
 * with persist every one after it too.  fail_at 0: none fails. */
void nomem_arm(unsigned long fail_at, int persist);
/* Stops counting; returns the allocations counted since nomem_arm() and
 * stores how many of them failed in *failed. */
unsigned long nomem_disarm(unsigned long *failed);
/* 1: allocations pass through uncounted (the test's own work) until 0. */
void nomem_hold(int on);

#endif
