/*
 * flight.c - the flight recorder and the stall warnings.
 *
 * Every job keeps its last cfg.flight_rounds ended rounds in a ring of
 * fixed-size records: group, seq, phase, layer, channels, outcome, duration
 * and the ranks' arrival times relative to the first contribution.  A round
 * of a large group keeps its missing ranks and its latest arrivals, at most
 * SBN_FLIGHT_RANKS of them: the ranks that held the round up are the ones
 * worth keeping.  The ring is allocated once, when the job's first round
 * ends, and recording a round is a copy into it.
 *
 * The recorder is written to the log when a round of the job fails or
 * stalls (at most once per SBN_FLIGHT_DUMP_INTERVAL_MS per job, so a lost
 * rank failing many rounds at once does not flood the log), for every job
 * on SIGUSR1, and served as text or JSON lines at /debug/rounds.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "coord_internal.h"
#include "log.h"
#include "sbn/status.h"

/* Ranks kept per recorded round (missing ones first, then the latest). */
#define SBN_FLIGHT_RANKS 32
/* Bytes of the layer name and group description kept per round. */
#define SBN_FLIGHT_LAYER 128
#define SBN_FLIGHT_GROUP 64
/* Automatic dumps of one job are at least this far apart. */
#define SBN_FLIGHT_DUMP_INTERVAL_MS 1000
/* An arrival time that marks a rank that has not contributed. */
#define SBN_FLIGHT_MISSING UINT32_MAX
/* Characters of rank lists in a stall warning before it is cut with "...". */
#define SBN_FLIGHT_LIST_MAX 400
#define NS_PER_MS 1000000.0
#define NS_PER_US 1000u

typedef struct flight_slot {
  uint32_t rank;
  uint32_t us; /* after the first contribution, or SBN_FLIGHT_MISSING */
} flight_slot;

typedef struct flight_rec {
  uint64_t seq;
  uint64_t generation;
  uint64_t t0_ns;  /* uv_hrtime() of the first contribution */
  uint64_t dur_ns; /* to the end, or to the dump for an open round */
  uint32_t channels;
  uint32_t n;      /* group size */
  uint32_t nhave;  /* contributions */
  uint32_t nslots; /* filled entries of slots */
  int phase;
  int code; /* SBN_OK or the failure */
  int open; /* still open (only in dumps, never in the ring) */
  char group[SBN_FLIGHT_GROUP];
  char layer[SBN_FLIGHT_LAYER];
  flight_slot slots[SBN_FLIGHT_RANKS];
} flight_rec;

/* Why a job is dumped automatically; each is rate-limited on its own, so a
 * stall warning never hides the failure that follows it. */
enum { DUMP_FAILURE, DUMP_STALL, DUMP_KINDS };

struct sbn__flight {
  uint32_t cap, next, count;
  int dumped[DUMP_KINDS];            /* an automatic dump of that kind happened */
  uint64_t last_dump_ms[DUMP_KINDS]; /* uv_now() of it */
  flight_rec recs[];
};

/* Recording */

static void rec_fill(flight_rec *e, const sbn__srv_round *r, int code, uint64_t now) {
  const sbn__srv_group *g = r->group;
  const Sbn__Contribute *ref = r->contrib[r->ref]->contribute;
  e->seq = r->seq;
  e->generation = g->job->generation;
  e->t0_ns = r->t0;
  e->dur_ns = now > r->t0 ? now - r->t0 : 0;
  e->channels = ref->channels;
  e->n = r->n;
  e->nhave = r->nhave;
  e->phase = ref->phase;
  e->code = code;
  e->open = 0;
  if (g->is_world)
    snprintf(e->group, sizeof(e->group), "world");
  else
    sbn__srv_group_describe(g, e->group, sizeof(e->group));
  snprintf(e->layer, sizeof(e->layer), "%s", ref->layer ? ref->layer : "");
  uint32_t k = 0;
  if (r->nhave < r->n)
    for (uint32_t i = 0; i < r->n && k < SBN_FLIGHT_RANKS; i++)
      if (r->contrib[i] == NULL)
        e->slots[k++] = (flight_slot){sbn__srv_group_rank(g, i), SBN_FLIGHT_MISSING};
  uint32_t room = SBN_FLIGHT_RANKS - k;
  for (uint32_t j = r->nhave > room ? r->nhave - room : 0; j < r->nhave; j++) {
    uint32_t i = r->arrived[j];
    e->slots[k++] = (flight_slot){sbn__srv_group_rank(g, i), r->t_us[i]};
  }
  e->nslots = k;
}

/* The next record of job's ring (allocated at the first use), or NULL. */
static flight_rec *ring_next(sbn__srv_job *job) {
  uint32_t cap = job->coord->cfg.flight_rounds;
  if (cap == 0)
    return NULL;
  if (job->flight == NULL) {
    job->flight = calloc(1, sizeof(*job->flight) + (size_t)cap * sizeof(flight_rec));
    if (job->flight == NULL)
      return NULL; /* the job goes on unrecorded */
    job->flight->cap = cap;
  }
  sbn__flight *f = job->flight;
  flight_rec *e = &f->recs[f->next];
  f->next = (f->next + 1) % f->cap;
  if (f->count < f->cap)
    f->count++;
  return e;
}

void sbn__flight_free(sbn__srv_job *job) {
  free(job->flight);
  job->flight = NULL;
}

/* Formatting */

/* Copies s with control characters replaced, so names cannot forge lines. */
static void clean(char *out, size_t len, const char *s) {
  size_t k = 0;
  for (; *s != '\0' && k + 1 < len; s++)
    out[k++] = (unsigned char)*s < 0x20 || *s == 0x7f ? '?' : *s;
  out[k] = '\0';
}

static void json_str(sbn__sbuf *o, const char *s) {
  sbn__sbuf_add(o, "\"", 1);
  for (; *s != '\0'; s++) {
    unsigned char ch = (unsigned char)*s;
    if (ch == '"' || ch == '\\') {
      char esc[2] = {'\\', (char)ch};
      sbn__sbuf_add(o, esc, 2);
    } else if (ch < 0x20 || ch >= 0x7f) {
      /* Names are bytes, not necessarily UTF-8: keep the JSON ASCII. */
      sbn__sbuf_printf(o, "\\u%04x", ch);
    } else {
      sbn__sbuf_add(o, (const char *)&ch, 1);
    }
  }
  sbn__sbuf_add(o, "\"", 1);
}

/* Wall-clock time of an hrtime stamp, as "2026-11-24T17:10:26.123Z". */
static void wall_time(uint64_t t_ns, char *out, size_t len) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  uint64_t now_hr = uv_hrtime();
  int64_t wall_ns = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec - (int64_t)(now_hr - t_ns);
  time_t sec = (time_t)(wall_ns / 1000000000);
  struct tm tm;
  gmtime_r(&sec, &tm);
  snprintf(out, len, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1,
           tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)(wall_ns / 1000000 % 1000));
}

static void rec_text(sbn__sbuf *o, const char *jobname, const flight_rec *e) {
  char job[SBN_SRV_JOB_MAX], layer[SBN_FLIGHT_LAYER], when[64];
  clean(job, sizeof(job), jobname);
  clean(layer, sizeof(layer), e->layer);
  wall_time(e->t0_ns, when, sizeof(when));
  sbn__sbuf_printf(o, "job '%s' gen %llu %s seq %llu %s layer '%s' %u ch, started %s: ", job,
                   (unsigned long long)e->generation, e->group, (unsigned long long)e->seq,
                   sbn__obs_phase_name(e->phase), layer, (unsigned)e->channels, when);
  if (e->open)
    sbn__sbuf_printf(o, "OPEN for %.3f ms", (double)e->dur_ns / NS_PER_MS);
  else
    sbn__sbuf_printf(o, "%s in %.3f ms", sbn__obs_code_name(e->code),
                     (double)e->dur_ns / NS_PER_MS);
  sbn__sbuf_printf(o, "; %u of %u arrived", (unsigned)e->nhave, (unsigned)e->n);
  uint32_t kept = 0, missing = 0;
  for (uint32_t k = 0; k < e->nslots; k++) {
    if (e->slots[k].us == SBN_FLIGHT_MISSING) {
      missing++;
      continue;
    }
    sbn__sbuf_printf(o, "%s rank %u +%u us", kept == 0 ? ":" : ",", (unsigned)e->slots[k].rank,
                     (unsigned)e->slots[k].us);
    kept++;
  }
  if (kept < e->nhave)
    sbn__sbuf_printf(o, " (%u earlier arrivals not kept)", (unsigned)(e->nhave - kept));
  if (missing > 0) {
    sbn__sbuf_printf(o, "; missing rank%s", e->n - e->nhave == 1 ? "" : "s");
    uint32_t m = 0;
    for (uint32_t k = 0; k < e->nslots; k++)
      if (e->slots[k].us == SBN_FLIGHT_MISSING)
        sbn__sbuf_printf(o, "%s%u", m++ == 0 ? " " : ",", (unsigned)e->slots[k].rank);
    if (missing < e->n - e->nhave)
      sbn__sbuf_printf(o, ",... (%u more)", (unsigned)(e->n - e->nhave - missing));
  }
  sbn__sbuf_add(o, "\n", 1);
}

static void rec_json(sbn__sbuf *o, const char *jobname, const flight_rec *e) {
  char when[64];
  wall_time(e->t0_ns, when, sizeof(when));
  sbn__sbuf_add(o, "{\"job\":", 7);
  json_str(o, jobname);
  sbn__sbuf_printf(o, ",\"generation\":%llu,\"group\":", (unsigned long long)e->generation);
  json_str(o, e->group);
  sbn__sbuf_printf(o, ",\"seq\":%llu,\"phase\":\"%s\",\"layer\":", (unsigned long long)e->seq,
                   sbn__obs_phase_name(e->phase));
  json_str(o, e->layer);
  sbn__sbuf_printf(o,
                   ",\"channels\":%u,\"size\":%u,\"arrived\":%u,\"started\":\"%s\","
                   "\"outcome\":\"%s\",\"duration_us\":%llu,\"arrivals\":[",
                   (unsigned)e->channels, (unsigned)e->n, (unsigned)e->nhave, when,
                   e->open ? "open" : sbn__obs_code_name(e->code),
                   (unsigned long long)(e->dur_ns / NS_PER_US));
  int first = 1;
  for (uint32_t k = 0; k < e->nslots; k++)
    if (e->slots[k].us != SBN_FLIGHT_MISSING) {
      sbn__sbuf_printf(o, "%s{\"rank\":%u,\"us\":%u}", first ? "" : ",", (unsigned)e->slots[k].rank,
                       (unsigned)e->slots[k].us);
      first = 0;
    }
  sbn__sbuf_add(o, "],\"missing\":[", 13);
  first = 1;
  for (uint32_t k = 0; k < e->nslots; k++)
    if (e->slots[k].us == SBN_FLIGHT_MISSING) {
      sbn__sbuf_printf(o, "%s%u", first ? "" : ",", (unsigned)e->slots[k].rank);
      first = 0;
    }
  sbn__sbuf_add(o, "]}\n", 3);
}

/*
 * Visits job's recorded rounds (oldest first), then its open rounds but
 * `ending` (a round being recorded right now, not open any more).
 */
typedef void (*rec_fn)(const sbn__srv_job *job, const flight_rec *e, void *arg);

static void job_each_rec(const sbn__srv_job *job, rec_fn fn, void *arg,
                         const sbn__srv_round *ending) {
  const sbn__flight *f = job->flight;
  if (f != NULL)
    for (uint32_t k = 0; k < f->count; k++)
      fn(job, &f->recs[(f->next + f->cap - f->count + k) % f->cap], arg);
  uint64_t now = uv_hrtime();
  for (const sbn__srv_round *r = job->rounds; r != NULL; r = r->job_next) {
    if (r == ending)
      continue;
    flight_rec e;
    rec_fill(&e, r, SBN_OK, now);
    e.open = 1;
    fn(job, &e, arg);
  }
}

static void header_text(sbn__sbuf *o, const sbn__srv_job *job, const sbn__srv_round *ending) {
  char name[SBN_SRV_JOB_MAX];
  clean(name, sizeof(name), job->name);
  sbn__sbuf_printf(o,
                   "flight recorder: job '%s' generation %llu world %u: %u recorded round%s "
                   "(oldest first, of at most %u), %u open\n",
                   name, (unsigned long long)job->generation, (unsigned)job->world,
                   job->flight ? (unsigned)job->flight->count : 0u,
                   job->flight && job->flight->count == 1 ? "" : "s",
                   (unsigned)job->coord->cfg.flight_rounds,
                   (unsigned)(job->nrounds - (ending != NULL)));
}

/* Into a buffer (/debug/rounds) */

typedef struct write_ctx {
  sbn__sbuf *out;
  int json;
  const char *only; /* a job name, or NULL */
  int written;
} write_ctx;

static void write_rec(const sbn__srv_job *job, const flight_rec *e, void *arg) {
  write_ctx *w = arg;
  if (w->json)
    rec_json(w->out, job->name, e);
  else
    rec_text(w->out, job->name, e);
}

static void write_job(sbn__srv_map_node *n, void *arg) {
  const sbn__srv_job *job = (const sbn__srv_job *)n;
  write_ctx *w = arg;
  if (w->only != NULL && strcmp(w->only, job->name) != 0)
    return;
  w->written++;
  if (!w->json)
    header_text(w->out, job, NULL);
  job_each_rec(job, write_rec, w, NULL);
}

int sbn__flight_write(sbn__coord *c, const char *job, int json, sbn__sbuf *out) {
  write_ctx w = {out, json, job, 0};
  sbn__srv_map_each(&c->jobs, write_job, &w);
  if (!json && w.written == 0)
    sbn__sbuf_printf(out, job ? "no job '%s'\n" : "no jobs\n", job);
  return w.written;
}

/* To the log */

static void log_rec(const sbn__srv_job *job, const flight_rec *e, void *arg) {
  (void)arg;
  sbn__sbuf line;
  sbn__sbuf_init(&line, 2048);
  rec_text(&line, job->name, e);
  if (line.len > 0) {
    line.data[line.len - 1] = '\0'; /* the log adds its own newline */
    SBN_LOGW("flight: %s", line.data);
  }
  sbn__sbuf_release(&line);
}

static void dump_job(const sbn__srv_job *job, const char *why, const sbn__srv_round *ending) {
  sbn__sbuf head;
  sbn__sbuf_init(&head, 1024);
  header_text(&head, job, ending);
  if (head.len > 0) {
    head.data[head.len - 1] = '\0';
    SBN_LOGW("%s%s%s", head.data, why ? "; dumped because " : "", why ? why : "");
  }
  sbn__sbuf_release(&head);
  job_each_rec(job, log_rec, NULL, ending);
}

/* A failure or stall: dump job, unless it was dumped a moment ago. */
static void dump_auto(sbn__srv_job *job, int kind, const char *why, const sbn__srv_round *r) {
  uint64_t now = uv_now(job->coord->loop);
  sbn__flight *f = job->flight;
  if (f != NULL && f->dumped[kind] && now - f->last_dump_ms[kind] < SBN_FLIGHT_DUMP_INTERVAL_MS)
    return;
  if (f != NULL) {
    f->dumped[kind] = 1;
    f->last_dump_ms[kind] = now;
  }
  dump_job(job, why, r);
}

static void dump_cb(sbn__srv_map_node *n, void *arg) {
  dump_job((const sbn__srv_job *)n, arg, NULL);
}

void sbn__flight_dump_all(sbn__coord *c) {
  SBN_LOGW("flight recorder dump requested: %u job%s", (unsigned)c->njobs,
           c->njobs == 1 ? "" : "s");
  sbn__srv_map_each(&c->jobs, dump_cb, "requested");
}

/* Hooks from round.c */

void sbn__obs_round_end(sbn__srv_round *r, int code) {
  sbn__srv_job *job = r->group->job;
  uint64_t now = uv_hrtime();
  const Sbn__Contribute *ref = r->contrib[r->ref]->contribute;
  sbn__metrics_round(job->coord, ref->phase, code, now - r->t0);
  flight_rec *e = ring_next(job);
  if (e != NULL)
    rec_fill(e, r, code, now);
  if (code != SBN_OK && code != SBN_ESHUTDOWN) {
    char why[160];
    snprintf(why, sizeof(why), "seq %llu failed (%s)", (unsigned long long)r->seq,
             sbn_strerror(code));
    dump_auto(job, DUMP_FAILURE, why, r);
  }
}

/* Appends world ranks as "2,5,7" to buf, cut with "..." past the limit. */
static void list_missing(const sbn__srv_round *r, char *buf, size_t len) {
  size_t k = 0;
  buf[0] = '\0';
  for (uint32_t i = 0; i < r->n; i++) {
    if (r->contrib[i] != NULL)
      continue;
    if (k + 16 >= len || k >= SBN_FLIGHT_LIST_MAX) {
      snprintf(buf + k, len - k, ",...");
      return;
    }
    k += (size_t)snprintf(buf + k, len - k, "%s%u", k ? "," : "",
                          (unsigned)sbn__srv_group_rank(r->group, i));
  }
}

void sbn__obs_round_stalled(sbn__srv_round *r) {
  sbn__srv_job *job = r->group->job;
  sbn__coord *c = job->coord;
  const Sbn__Contribute *ref = r->contrib[r->ref]->contribute;
  char gname[128], list[SBN_FLIGHT_LIST_MAX + 32], jname[SBN_SRV_JOB_MAX], layer[SBN_FLIGHT_LAYER];
  c->metrics.stalls++;
  sbn__srv_group_describe(r->group, gname, sizeof(gname));
  list_missing(r, list, sizeof(list));
  clean(jname, sizeof(jname), job->name);
  clean(layer, sizeof(layer), ref->layer ? ref->layer : "");
  uint32_t nmiss = r->n - r->nhave;
  SBN_LOGW("round stalled: job '%s' %s seq %llu layer '%s' (%s) open for %.0f ms, waiting for "
           "rank%s %s (%u of %u missing); it fails at %u ms",
           jname, gname, (unsigned long long)r->seq, layer, sbn__phase_name(ref->phase),
           (double)(uv_hrtime() - r->t0) / NS_PER_MS, nmiss == 1 ? "" : "s", list, (unsigned)nmiss,
           (unsigned)r->n, (unsigned)c->cfg.round_timeout_ms);
  char why[64];
  snprintf(why, sizeof(why), "seq %llu stalled", (unsigned long long)r->seq);
  dump_auto(job, DUMP_STALL, why, NULL);
}
