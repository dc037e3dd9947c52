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

#include "auth.h"
#include "util.h"

/*
 * The largest channel count a contribution may announce (--max-channels may
 * lower it).  The frame limit binds long before this one (a forward round of
 * 2^24 channels is 256 MiB of doubles), it only keeps arithmetic on C far
 * away from overflow.
 */
#define SBN_MAX_CHANNELS (1u << 24)

/* Defaults of the CLI flags, documented in docs/coordinator.md. */
#define SBN_COORD_ROUND_TIMEOUT_DEFAULT_MS 60000u
#define SBN_COORD_HELLO_TIMEOUT_DEFAULT_MS 10000u
#define SBN_COORD_FRAME_TIMEOUT_DEFAULT_MS 60000u
#define SBN_COORD_KEEPALIVE_DEFAULT_S 60u
#define SBN_COORD_MAX_CONNS_DEFAULT 4096u
#define SBN_COORD_MAX_JOBS_DEFAULT 1024u
#define SBN_COORD_MAX_GROUPS_DEFAULT 1024u
#define SBN_COORD_MAX_ROUNDS_DEFAULT 4096u
#define SBN_COORD_MAX_QUEUED_DEFAULT (64ull * 1024u * 1024u)
/* The smallest write-queue bound that still holds a few replies. */
#define SBN_COORD_MAX_QUEUED_FLOOR 4096ull
#define SBN_COORD_MAX_QUEUED_CEILING (16ull * 1024u * 1024u * 1024u)
/* The upper end of the count limits' ranges. */
#define SBN_COORD_COUNT_LIMIT_MAX 1000000u
/* --stall-warn: this value means half the round timeout; 0 turns it off. */
#define SBN_COORD_STALL_WARN_AUTO UINT32_MAX
/* Rounds the flight recorder keeps per job (--flight-rounds), and its ceiling. */
#define SBN_COORD_FLIGHT_ROUNDS_DEFAULT 64u
#define SBN_COORD_FLIGHT_ROUNDS_MAX 4096u
/* Longest --spin-us: 10 ms of polling after each wake-up. */
#define SBN_COORD_SPIN_MAX_US 10000u

typedef struct sbn__coord_config {
  char host[SBN_HOST_MAX + 1]; /* address to bind, numeric or a name */
  int port;                    /* 0 binds an ephemeral port */
  uint32_t round_timeout_ms;   /* a round not complete by then fails */
  uint32_t hello_timeout_ms;   /* a connection not welcomed by then is closed */
  /* A welcomed connection that holds part of a frame and sends nothing more
   * for this long is closed (a stalled or half-open sender). */
  uint32_t frame_timeout_ms;
  /* TCP keepalive idle time in seconds (0 = off): finds dead peers whose
   * host vanished without a FIN or RST.  See docs/security.md. */
  uint32_t keepalive_s;
  uint32_t max_frame;    /* largest frame body accepted from a worker */
  uint32_t max_conns;    /* open connections, welcomed or not */
  uint32_t max_jobs;     /* jobs alive at once */
  uint32_t max_groups;   /* groups a job may create (WORLD included) */
  uint32_t max_channels; /* channels (elements) in one contribution */
  uint32_t max_rounds;   /* open rounds per job */
  uint64_t max_queued;   /* bytes of replies queued for one connection */
  /*
   * With secret.len > 0 every worker must prove it knows the secret at
   * hello.  Without one the coordinator only listens on a loopback address
   * unless insecure is set.
   */
  sbn__secret secret;
  int insecure;
  /* Metrics and health over HTTP on metrics_host:metrics_port; -1 = off. */
  char metrics_host[SBN_HOST_MAX + 1];
  int metrics_port;
  /* An open round logs a warning naming its missing ranks after this long
   * (0 = never; SBN_COORD_STALL_WARN_AUTO = half of round_timeout_ms). */
  uint32_t stall_warn_ms;
  uint32_t flight_rounds; /* rounds recorded per job; 0 = no recorder */
  /* sbn__coord_run: after each wake-up, poll the loop without sleeping for
   * this long (yielding the CPU between polls) before blocking again; 0 =
   * off, at most SBN_COORD_SPIN_MAX_US.  Pays off when the workers spin too
   * (SBN_SPIN_US) and a core is free for the coordinator; costs that core. */
  uint32_t spin_us;
} sbn__coord_config;

typedef struct sbn__coord sbn__coord;

/*
 * Runs the coordinator's loop until nothing is left on it (after
 * sbn__coord_stop() and the closes it starts), spinning per cfg.spin_us.
 * Everything else on the loop (signal handlers, say) runs too.
 */
void sbn__coord_run(sbn__coord *c);

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
 * Returns SBN_OK, SBN_EIO with the reason logged, or SBN_EAUTH when the
 * address is not a loopback one and there is neither a secret nor
 * cfg->insecure (nothing is created then); on other failures the caller
 * must still run the loop once so the listener handle closes, then free.
 */
int sbn__coord_start(sbn__coord *c, char *addr, size_t addrlen);

/*
 * Starts a clean shutdown: stops accepting, fails every open round with
 * SBN_ESHUTDOWN, flushes and closes every connection (bounded in time) and
 * closes every handle, so the loop ends.  Safe to call more than once.
 */
void sbn__coord_stop(sbn__coord *c);

/*
 * The metrics address actually bound ("127.0.0.1:9100"), or "" when there
 * is no metrics server.
 */
const char *sbn__coord_metrics_addr(const sbn__coord *c);

/* Logs every job's recent and open rounds (the flight recorder; SIGUSR1). */
void sbn__coord_dump(sbn__coord *c);

/* Frees c after its loop has run out of handles.  NULL is a no-op. */
void sbn__coord_free(sbn__coord *c);

#endif /* SBN_COORDINATOR_H */
