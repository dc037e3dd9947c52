/*
 * coordinator.h - the sbn-coordinator server object.
 *
 * A coordinator lives on a libuv loop that the caller owns.  The life cycle is
 *
 *   sbn__coord_config_init(&cfg);  ... adjust cfg ...
 *   sbn__coord_new(loop, &cfg, &c);
 *   sbn__coord_start(c, addr, sizeof(addr));   binds and listens
 *   uv_run(loop, UV_RUN_DEFAULT);               serves until stopped
 *   sbn__coord_stop(c);                         from a callback on the loop
 *   ... uv_run() returns once every handle of c is closed ...
 *   sbn__coord_free(c);
 *
 * Rule for the whole API: a function that fails changes nothing, so the
 * caller frees what it created and nothing more.
 */
#ifndef SBN_COORDINATOR_H
#define SBN_COORDINATOR_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "util.h"

/* Defaults of the CLI flags, documented in docs/coordinator.md. */
#define SBN_COORD_ROUND_TIMEOUT_DEFAULT_MS 60000u
#define SBN_COORD_HELLO_TIMEOUT_DEFAULT_MS 10000u

typedef struct sbn__coord_config {
  char host[SBN_HOST_MAX + 1]; /* address to bind, numeric or a name */
  int port;                    /* 0 binds an ephemeral port */
  uint32_t round_timeout_ms;   /* a round not complete by then fails */
  uint32_t hello_timeout_ms;   /* a connection silent that long is closed */
  uint32_t max_frame;          /* largest frame body accepted from a worker */
} sbn__coord_config;

typedef struct sbn__coord sbn__coord;

/* Fills cfg with the defaults (127.0.0.1:SBN_DEFAULT_PORT, ...). */
void sbn__coord_config_init(sbn__coord_config *cfg);

/*
 * Creates a coordinator on loop with a copy of cfg.  Returns SBN_OK and sets
 * *out, or SBN_EINVAL (a value out of range, named in the log) / SBN_ENOMEM.
 */
int sbn__coord_new(uv_loop_t *loop, const sbn__coord_config *cfg, sbn__coord **out);

/*
 * Binds and listens.  On success writes the address actually bound
 * ("127.0.0.1:40123", the real port when cfg->port was 0) into addr.
 * Returns SBN_OK or SBN_EIO with the reason logged; on failure the caller
 * must still run the loop once so the listener handle closes, then free.
 */
int sbn__coord_start(sbn__coord *c, char *addr, size_t addrlen);

/*
 * Starts a clean shutdown: stops accepting, fails every open round with
 * SBN_ESHUTDOWN, flushes and closes every connection (bounded in time) and
 * closes every handle, so the loop ends.  Safe to call more than once.
 */
void sbn__coord_stop(sbn__coord *c);

/* Frees c after its loop has run out of handles.  NULL is a no-op. */
void sbn__coord_free(sbn__coord *c);

#endif /* SBN_COORDINATOR_H */
