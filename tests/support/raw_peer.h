/*
 * raw_peer.h - a protocol peer on a raw socket, for tests that speak to a
 * real sbn-coordinator without the client library (hellos, proofs,
 * contributions, garbage).  Every wait is bounded; failures are Check
 * assertions, so call these from the test process.
 */
#ifndef SBN_TEST_RAW_PEER_H
#define SBN_TEST_RAW_PEER_H

#include <stddef.h>
#include <stdint.h>

#include "frame.h"
#include "msg.h"

#define RP_IO_TIMEOUT_MS 3000

typedef struct rp {
  int fd;
  sbn__framer rx;
  uint32_t rank;
} rp;

/* Connects to 127.0.0.1:port; rcvbuf > 0 sets SO_RCVBUF first. */
rp *rp_open(int port, int rcvbuf);
/* The other side, for tests that play the coordinator to a worker: a
 * listening socket on 127.0.0.1 port 0 (its port in *port), and the peer of
 * the next connection to it (asserts one comes within timeout_ms). */
int rp_listen(int *port);
rp *rp_accept(int lfd, int timeout_ms);
void rp_close(rp *p);
void rp_send_raw(rp *p, const void *data, size_t len);
void rp_send(rp *p, const Sbn__Envelope *env);
/* 1 and a malloc'd body, 0 on timeout, -1 when closed or bad. */
int rp_recv_frame(rp *p, int timeout_ms, uint8_t **body, size_t *len);
/* The next message (asserts one arrives). */
Sbn__Envelope *rp_recv(rp *p, int timeout_ms);
/* 1 when the coordinator closes p within timeout_ms (frames skipped). */
int rp_wait_closed(rp *p, int timeout_ms);
/* Sends a hello; nonce may be NULL. */
void rp_hello(rp *p, const char *job, uint32_t rank, uint32_t world, uint64_t gen,
              const uint8_t *nonce, size_t nonce_len);
/* hello + welcome without a secret; asserts the welcome. */
rp *rp_join(int port, const char *job, uint32_t rank, uint32_t world);
/* A forward contribution to WORLD. */
void rp_forward(rp *p, uint64_t seq, const char *layer, uint32_t C, uint64_t count,
                const double *mean, const double *m2);
/* Receives an Error (asserts it, its code, and that its message holds needle). */
Sbn__Envelope *rp_expect_error(rp *p, int code, const char *needle, int timeout_ms);
/* Receives a Result (asserts it; an Error's message is shown). */
void rp_expect_result(rp *p);
/* Receives a Reject likewise. */
void rp_expect_reject(rp *p, int code, const char *needle);

#endif
