/*
 * observe.h - what the coordinator tells its operator: Prometheus metrics
 * and health on an optional HTTP port (metrics.c, http.c), the flight
 * recorder of every job's last rounds and the stall warnings (flight.c),
 * and systemd readiness notification (notify.c).  Private to server/.
 *
 * The per-round cost is a handful of counter increments, one histogram
 * bucket search and one fixed-size copy into the job's ring; nothing here
 * allocates per round.  Everything that formats text runs on request (a
 * scrape, a signal) or when a round fails or stalls.
 */
#ifndef SBN_OBSERVE_H
#define SBN_OBSERVE_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

/* Status codes are 0 (ok) down to SBN_STATUS_MIN: counters index by -code. */
#define SBN_OBS_CODES 22
/* Phases 0 (unspecified) to 6 (model check), as on the wire. */
#define SBN_OBS_PHASES 7
/* Finite upper bounds of the round latency histogram; +Inf comes after. */
#define SBN_OBS_BUCKETS 19

/* A text buffer that grows up to a maximum, then drops what does not fit. */
typedef struct sbn__sbuf {
  char *data;
  size_t len, cap, max;
  int truncated; /* something did not fit under max */
  int oom;       /* growing failed */
} sbn__sbuf;

void sbn__sbuf_init(sbn__sbuf *b, size_t max);
void sbn__sbuf_release(sbn__sbuf *b);
void sbn__sbuf_printf(sbn__sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void sbn__sbuf_add(sbn__sbuf *b, const char *s, size_t n);

/* Counters, all monotonic since start; gauges are computed at scrape time. */
typedef struct sbn__metrics {
  uint64_t rounds[SBN_OBS_PHASES][SBN_OBS_CODES]; /* ended rounds by phase, outcome */
  /* Latency of completed rounds, first contribution to reply. */
  uint64_t lat_bucket[SBN_OBS_PHASES][SBN_OBS_BUCKETS + 1]; /* not cumulative */
  uint64_t lat_sum_ns[SBN_OBS_PHASES];
  uint64_t proto_errors[SBN_OBS_CODES]; /* Errors sent to one connection */
  uint64_t rejects[SBN_OBS_CODES];      /* hellos rejected */
  uint64_t auth_failures;
  uint64_t bytes_in, bytes_out;
  uint64_t fvals_in_place, fvals_copied; /* allreduce contributions' values on receipt */
  uint64_t accepted;
  uint64_t refused_nomem; /* connections closed at accept: no memory for them */
  uint64_t stalls;
  uint64_t start_unix_s;
} sbn__metrics;

typedef struct sbn__coord sbn__coord;
typedef struct sbn__srv_round sbn__srv_round;
typedef struct sbn__srv_job sbn__srv_job;
typedef struct sbn__http sbn__http;
typedef struct sbn__flight sbn__flight;

/* metrics.c */
/* A label value for a status code: "ok", "timeout", "peer_lost", ... */
const char *sbn__obs_code_name(int code);
/* A label value for a phase: "forward", ..., "model_check". */
const char *sbn__obs_phase_name(int phase);
/* Counts an Error sent to one connection, a rejected hello. */
void sbn__obs_proto_error(sbn__coord *c, int code);
void sbn__obs_reject(sbn__coord *c, int code);
/* Counts a round that ended; a completed one (SBN_OK) in the histogram too. */
void sbn__metrics_round(sbn__coord *c, int phase, int code, uint64_t dur_ns);
/* Writes the Prometheus text exposition (format 0.0.4) into out. */
void sbn__metrics_write(sbn__coord *c, sbn__sbuf *out);

/*
 * flight.c.  A round ends (completed with SBN_OK, or failed): counts it,
 * observes its latency, records it in its job's ring and, for a failure,
 * dumps the job's recent rounds to the log.  Call while the round still
 * holds its contributions (before round_detach).
 */
void sbn__obs_round_end(sbn__srv_round *r, int code);
/* The round's --stall-warn time has passed: warns once, dumps its job. */
void sbn__obs_round_stalled(sbn__srv_round *r);
/* Frees the job's ring (job_free). */
void sbn__flight_free(sbn__srv_job *job);
/* Every job's recent and open rounds, to the log (SIGUSR1). */
void sbn__flight_dump_all(sbn__coord *c);
/*
 * Every job's (or only job's, when job is not NULL) recent and open rounds
 * into out: text lines, or JSON lines with json.  Returns how many jobs
 * were written.
 */
int sbn__flight_write(sbn__coord *c, const char *job, int json, sbn__sbuf *out);

/* http.c */
/* Binds and listens on cfg.metrics_host:metrics_port; writes the address. */
int sbn__http_start(sbn__coord *c, char *addr, size_t addrlen);
/*
 * The coordinator is stopping: /healthz answers 503 from now on, and the
 * server closes once the last worker connection has closed.
 */
void sbn__http_stopping(sbn__coord *c);
/* A worker connection was freed (conn.c); closes the server when it is time. */
void sbn__http_conn_freed(sbn__coord *c);
void sbn__http_free(sbn__coord *c);
/*
 * The answer to one request, without the network: the status code, the
 * content type and the body in out.  method and target as in the request
 * line ("GET", "/metrics?x=1").
 */
int sbn__http_respond(sbn__coord *c, const char *method, const char *target, sbn__sbuf *out,
                      const char **content_type);

/* notify.c - the sd_notify protocol without libsystemd. */
typedef struct sbn__notify {
  char path[108]; /* NOTIFY_SOCKET; '@' for an abstract name */
  int enabled;
  uv_timer_t watchdog; /* WATCHDOG=1 every half WATCHDOG_USEC */
  int watchdog_on;
} sbn__notify;

/*
 * Reads NOTIFY_SOCKET (and WATCHDOG_USEC) from the environment and unsets
 * them.  Returns 1 when notifications will be sent, 0 otherwise.
 */
int sbn__notify_init(sbn__notify *n, uv_loop_t *loop);
/* Sends one datagram ("READY=1\nSTATUS=..."); 0 or a negative errno. */
int sbn__notify_send(const sbn__notify *n, const char *msg);
/* Stops the watchdog timer (closes its handle if it was started). */
void sbn__notify_close(sbn__notify *n);

#endif /* SBN_OBSERVE_H */
