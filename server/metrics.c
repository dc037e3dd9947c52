/*
 * metrics.c - the coordinator's counters and their Prometheus text
 * exposition (format 0.0.4), plus the bounded text buffer the HTTP answers
 * and the flight recorder's dumps are written into.
 *
 * Counters are plain increments on the loop thread.  Gauges (connections,
 * workers, jobs, groups, open rounds) are not kept at all: a scrape walks
 * the jobs and reads the counts they hold anyway.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coord_internal.h"
#include "heap.h"
#include "sbn/sbn.h"
#include "sbn/status.h"

/* Nanoseconds per second, for the latency sums. */
#define NS_PER_S 1e9

/* Upper bounds of the latency histogram in nanoseconds: 50 us to 60 s. */
static const uint64_t lat_bounds_ns[SBN_OBS_BUCKETS] = {
    50000ull,      100000ull,      250000ull,      500000ull,     1000000ull,
    2500000ull,    5000000ull,     10000000ull,    25000000ull,   50000000ull,
    100000000ull,  250000000ull,   500000000ull,   1000000000ull, 2500000000ull,
    5000000000ull, 10000000000ull, 30000000000ull, 60000000000ull};
/* The same bounds as Prometheus writes them in the le label. */
static const char *const lat_bounds_label[SBN_OBS_BUCKETS] = {
    "5e-05", "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05",
    "0.1",   "0.25",   "0.5",     "1",      "2.5",   "5",      "10",    "30",   "60"};

/* Bounded text buffer */

void sbn__sbuf_init(sbn__sbuf *b, size_t max) {
  memset(b, 0, sizeof(*b));
  b->max = max;
}

void sbn__sbuf_release(sbn__sbuf *b) {
  free(b->data);
  b->data = NULL;
  b->len = b->cap = 0;
}

/* Makes room for n more bytes plus a NUL; 0 when it cannot. */
static int sbuf_reserve(sbn__sbuf *b, size_t n) {
  if (b->len + n + 1 <= b->cap)
    return 1;
  if (b->len + n + 1 > b->max + 1) {
    b->truncated = 1;
    return 0;
  }
  size_t cap = b->cap ? b->cap : 4096;
  while (cap < b->len + n + 1)
    cap *= 2;
  if (cap > b->max + 1)
    cap = b->max + 1;
  char *p = realloc(b->data, cap);
  if (p == NULL) {
    b->oom = 1;
    return 0;
  }
  b->data = p;
  b->cap = cap;
  return 1;
}

void sbn__sbuf_add(sbn__sbuf *b, const char *s, size_t n) {
  if (b->truncated || b->oom || !sbuf_reserve(b, n))
    return;
  memcpy(b->data + b->len, s, n);
  b->len += n;
  b->data[b->len] = '\0';
}

void sbn__sbuf_printf(sbn__sbuf *b, const char *fmt, ...) {
  char line[1024];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(line, sizeof(line), fmt, ap);
  va_end(ap);
  if (n < 0)
    return;
  if ((size_t)n < sizeof(line)) {
    sbn__sbuf_add(b, line, (size_t)n);
    return;
  }
  /* A long line: format again straight into the buffer. */
  if (b->truncated || b->oom || !sbuf_reserve(b, (size_t)n))
    return;
  va_start(ap, fmt);
  vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
  va_end(ap);
  b->len += (size_t)n;
}

/* Label values */

const char *sbn__obs_code_name(int code) {
  static const char *const names[SBN_OBS_CODES] = {
      "ok",       "invalid",   "nomem",    "io",     "timeout", "connect",  "proto",      "version",
      "rejected", "peer_lost", "mismatch", "closed", "too_big", "shutdown", "not_member", "state",
      "auth",     "bad_stats", "limit",    "key",    "shape",   "duplicate"};
  if (code > 0 || -code >= SBN_OBS_CODES)
    return "other";
  return names[-code];
}

const char *sbn__obs_phase_name(int phase) {
  static const char *const names[SBN_OBS_PHASES] = {
      "unspecified", "forward", "backward", "allreduce", "broadcast", "barrier", "model_check"};
  if (phase < 0 || phase >= SBN_OBS_PHASES)
    return "unspecified";
  return names[phase];
}

/* Index of a status code in the counter arrays, or -1 for a code outside
 * them (not counted). */
static int code_index(int code) {
  return code <= 0 && -code < SBN_OBS_CODES ? -code : -1;
}

void sbn__obs_proto_error(sbn__coord *c, int code) {
  int i = code_index(code);
  if (i >= 0)
    c->metrics.proto_errors[i]++;
}

void sbn__obs_reject(sbn__coord *c, int code) {
  int i = code_index(code);
  if (i >= 0)
    c->metrics.rejects[i]++;
  if (code == SBN_EAUTH)
    c->metrics.auth_failures++;
}

void sbn__metrics_round(sbn__coord *c, int phase, int code, uint64_t dur_ns) {
  int i = code_index(code);
  if (phase < 0 || phase >= SBN_OBS_PHASES || i < 0)
    return;
  c->metrics.rounds[phase][i]++;
  if (code != SBN_OK)
    return;
  int b = 0;
  while (b < SBN_OBS_BUCKETS && dur_ns > lat_bounds_ns[b])
    b++;
  c->metrics.lat_bucket[phase][b]++;
  c->metrics.lat_sum_ns[phase] += dur_ns;
}

/* Exposition */

typedef struct gauges {
  uint64_t workers, groups, rounds;
} gauges;

static void gauge_job(sbn__srv_map_node *n, void *arg) {
  const sbn__srv_job *job = (const sbn__srv_job *)n;
  gauges *g = arg;
  g->workers += job->nconns;
  g->groups += job->ngroups;
  g->rounds += job->nrounds;
}

static void head(sbn__sbuf *o, const char *name, const char *type, const char *help) {
  sbn__sbuf_printf(o, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* A counter by status code: every code seen, and always the ones in `always`. */
static void by_code(sbn__sbuf *o, const char *name, const char *label, const uint64_t *v,
                    const int *always, size_t nalways) {
  for (int i = 0; i < SBN_OBS_CODES; i++) {
    int show = v[i] != 0;
    for (size_t k = 0; k < nalways && !show; k++)
      show = -always[k] == i;
    if (show)
      sbn__sbuf_printf(o, "%s{%s=\"%s\"} %llu\n", name, label, sbn__obs_code_name(-i),
                       (unsigned long long)v[i]);
  }
}

void sbn__metrics_write(sbn__coord *c, sbn__sbuf *o) {
  const sbn__metrics *m = &c->metrics;
  gauges g = {0, 0, 0};
  sbn__srv_map_each(&c->jobs, gauge_job, &g);

  head(o, "sbn_build_info", "gauge", "Version of this coordinator and of the protocol it speaks.");
  sbn__sbuf_printf(o, "sbn_build_info{version=\"%s\",protocol=\"%u\"} 1\n", SBN_VERSION_STRING,
                   (unsigned)SBN_PROTOCOL_VERSION);
  head(o, "sbn_start_time_seconds", "gauge", "Start time of the coordinator, Unix seconds.");
  sbn__sbuf_printf(o, "sbn_start_time_seconds %llu\n", (unsigned long long)m->start_unix_s);
  head(o, "sbn_shutting_down", "gauge", "1 once a clean shutdown has started.");
  sbn__sbuf_printf(o, "sbn_shutting_down %d\n", c->stopping ? 1 : 0);

  /* Rounds by phase and outcome; the ok series exist from the start. */
  head(o, "sbn_rounds_total", "counter",
       "Rounds ended, by phase and outcome (ok, or the status the round failed with).");
  for (int p = 1; p < SBN_OBS_PHASES; p++)
    for (int i = 0; i < SBN_OBS_CODES; i++)
      if (i == 0 || m->rounds[p][i] != 0)
        sbn__sbuf_printf(o, "sbn_rounds_total{phase=\"%s\",outcome=\"%s\"} %llu\n",
                         sbn__obs_phase_name(p), sbn__obs_code_name(-i),
                         (unsigned long long)m->rounds[p][i]);

  head(o, "sbn_round_duration_seconds", "histogram",
       "Completed rounds: time from the first contribution to the reply, by phase.");
  for (int p = 1; p < SBN_OBS_PHASES; p++) {
    const char *pn = sbn__obs_phase_name(p);
    uint64_t cum = 0;
    for (int b = 0; b < SBN_OBS_BUCKETS; b++) {
      cum += m->lat_bucket[p][b];
      sbn__sbuf_printf(o, "sbn_round_duration_seconds_bucket{phase=\"%s\",le=\"%s\"} %llu\n", pn,
                       lat_bounds_label[b], (unsigned long long)cum);
    }
    cum += m->lat_bucket[p][SBN_OBS_BUCKETS];
    sbn__sbuf_printf(o, "sbn_round_duration_seconds_bucket{phase=\"%s\",le=\"+Inf\"} %llu\n", pn,
                     (unsigned long long)cum);
    sbn__sbuf_printf(o, "sbn_round_duration_seconds_sum{phase=\"%s\"} %.9f\n", pn,
                     (double)m->lat_sum_ns[p] / NS_PER_S);
    sbn__sbuf_printf(o, "sbn_round_duration_seconds_count{phase=\"%s\"} %llu\n", pn,
                     (unsigned long long)cum);
  }

  head(o, "sbn_rounds_stalled_total", "counter",
       "Rounds still open after --stall-warn (each warned about once).");
  sbn__sbuf_printf(o, "sbn_rounds_stalled_total %llu\n", (unsigned long long)m->stalls);

  head(o, "sbn_connections", "gauge", "Open connections, welcomed or not.");
  sbn__sbuf_printf(o, "sbn_connections %u\n", (unsigned)c->nconns);
  head(o, "sbn_workers_connected", "gauge", "Welcomed worker connections attached to a job.");
  sbn__sbuf_printf(o, "sbn_workers_connected %llu\n", (unsigned long long)g.workers);
  head(o, "sbn_jobs", "gauge", "Jobs alive.");
  sbn__sbuf_printf(o, "sbn_jobs %u\n", (unsigned)c->njobs);
  head(o, "sbn_groups", "gauge", "Groups of all jobs (WORLD included).");
  sbn__sbuf_printf(o, "sbn_groups %llu\n", (unsigned long long)g.groups);
  head(o, "sbn_rounds_open", "gauge", "Rounds holding at least one contribution.");
  sbn__sbuf_printf(o, "sbn_rounds_open %llu\n", (unsigned long long)g.rounds);

  head(o, "sbn_connections_accepted_total", "counter", "Connections accepted.");
  sbn__sbuf_printf(o, "sbn_connections_accepted_total %llu\n", (unsigned long long)m->accepted);
  head(o, "sbn_connections_refused_total", "counter",
       "Connections closed as soon as accepted, for want of memory to serve them.");
  sbn__sbuf_printf(o, "sbn_connections_refused_total %llu\n",
                   (unsigned long long)m->refused_nomem);
  static const int proto_always[] = {SBN_EPROTO};
  head(o, "sbn_protocol_errors_total", "counter",
       "Errors sent to one connection about its own stream or request (malformed frames "
       "and messages, refused requests, timeouts), by reason.");
  by_code(o, "sbn_protocol_errors_total", "reason", m->proto_errors, proto_always, 1);
  static const int reject_always[] = {SBN_EAUTH};
  head(o, "sbn_hello_rejects_total", "counter", "Hellos rejected, by reason.");
  by_code(o, "sbn_hello_rejects_total", "reason", m->rejects, reject_always, 1);
  head(o, "sbn_auth_failures_total", "counter",
       "Workers that failed to prove they hold the shared secret.");
  sbn__sbuf_printf(o, "sbn_auth_failures_total %llu\n", (unsigned long long)m->auth_failures);
  head(o, "sbn_received_bytes_total", "counter", "Bytes read from worker connections.");
  sbn__sbuf_printf(o, "sbn_received_bytes_total %llu\n", (unsigned long long)m->bytes_in);
  head(o, "sbn_sent_bytes_total", "counter", "Bytes written to worker connections.");
  sbn__sbuf_printf(o, "sbn_sent_bytes_total %llu\n", (unsigned long long)m->bytes_out);
  head(o, "sbn_allreduce_values_received_total", "counter",
       "Allreduce contributions received, by how their values were kept: \"in_place\" where "
       "they arrived (the receive buffer goes with the message), \"copied\" otherwise.");
  sbn__sbuf_printf(o, "sbn_allreduce_values_received_total{kept=\"in_place\"} %llu\n",
                   (unsigned long long)m->fvals_in_place);
  sbn__sbuf_printf(o, "sbn_allreduce_values_received_total{kept=\"copied\"} %llu\n",
                   (unsigned long long)m->fvals_copied);

  if (sbn__srv_heap_counted()) {
    head(o, "sbn_heap_allocations_total", "counter",
         "Heap allocations (malloc, calloc, realloc) by the coordinator, libuv and protobuf-c, "
         "except the metrics endpoint's own; flat while rounds run in steady state.");
    sbn__sbuf_printf(o, "sbn_heap_allocations_total %llu\n",
                     (unsigned long long)sbn__srv_heap_allocs());
  }
  head(o, "sbn_pool_rounds", "gauge", "Idle rounds kept for reuse.");
  sbn__sbuf_printf(o, "sbn_pool_rounds %u\n", (unsigned)c->pool_nrounds);
  head(o, "sbn_pool_bytes", "gauge",
       "Bytes kept for reuse: pooled rounds' arenas and pooled reply buffers.");
  sbn__sbuf_printf(o, "sbn_pool_bytes %llu\n",
                   (unsigned long long)(c->pool_round_bytes + c->pool_wbuf_bytes));
}
