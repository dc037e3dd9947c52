/*
 * main.c - sbn-coordinator: command line, signals, and the loop.
 *
 * Everything else lives in the coordinator object (coordinator.h), so this
 * file only turns flags into a configuration, SIGINT/SIGTERM into a clean
 * stop, SIGUSR1 into a flight recorder dump, and tells systemd (when it
 * started us) that the coordinator is ready and when it stops.
 */
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include <uv.h>

#include "coordinator.h"
#include "frame.h"
#include "heap.h"
#include "log.h"
#include "observe.h"
#include "sbn/sbn.h"
#include "util.h"

/* Exit status for a bad command line, as getopt-based tools use. */
#define EXIT_USAGE 2
#define ADDR_MAX 300
/* Descriptors beside the connections: listener, loop, signals, logs. */
#define SBN_SRV_SPARE_FDS 64

typedef struct app {
  uv_loop_t loop;
  uv_signal_t sigint, sigterm, sigusr1, sighup;
  sbn__coord *coord;
  sbn__notify notify;
  int want_notify; /* --notify: warn when NOTIFY_SOCKET is missing */
} app;

static void usage(FILE *out) {
  fprintf(out,
          "usage: sbn-coordinator [options]\n"
          "\n"
          "Merges SyncBatchNorm statistics of the workers of a training job.\n"
          "\n"
          "  --listen HOST:PORT    address to listen on (default %s:%d; port 0 picks one)\n"
          "  --secret-file PATH    require workers to prove they hold the secret in PATH\n"
          "                        (mode 0600, at least %u bytes; see docs/security.md)\n"
          "  --insecure            allow a non-loopback --listen without a secret\n"
          "  --round-timeout MS    fail a round not complete within MS (default %u)\n"
          "  --hello-timeout MS    close a connection not welcomed within MS (default %u)\n"
          "  --frame-timeout MS    close a worker stalled mid-frame for MS (default %u)\n"
          "  --keepalive SEC       TCP keepalive idle time, 0 = off (default %u)\n"
          "  --max-frame BYTES     largest frame accepted, %u..%u (default %u)\n"
          "  --max-conns N         open connections (default %u)\n"
          "  --max-jobs N          jobs at once (default %u)\n"
          "  --max-groups N        groups per job, WORLD included (default %u)\n"
          "  --max-channels N      channels or elements per contribution, 1..%u (default %u)\n"
          "  --max-rounds N        open rounds per job (default %u)\n"
          "  --max-queued BYTES    replies queued for a worker that does not read, at\n"
          "                        least %llu (default %llu)\n"
          "  --metrics [HOST:]PORT serve /metrics, /healthz and /debug/rounds over HTTP\n"
          "                        (off by default; HOST defaults to %s)\n"
          "  --stall-warn MS       warn about a round open this long, naming the missing\n"
          "                        ranks; 0 = never (default: half the round timeout)\n"
          "  --flight-rounds N     rounds the flight recorder keeps per job, 0..%u\n"
          "                        (default %u); SIGUSR1 logs them\n"
          "  --spin-us US          poll without sleeping until US microseconds pass\n"
          "                        without traffic, 0..%u (default 0); pays off when the\n"
          "                        workers spin too and a core is free\n"
          "  --notify              expect NOTIFY_SOCKET (systemd Type=notify); the\n"
          "                        notification is sent whenever it is set\n"
          "  --log-level LEVEL     error, warn, info or debug (default info)\n"
          "  --help                show this help\n"
          "  --version             show the version\n",
          SBN_DEFAULT_HOST, SBN_DEFAULT_PORT, SBN_SECRET_MIN, SBN_COORD_ROUND_TIMEOUT_DEFAULT_MS,
          SBN_COORD_HELLO_TIMEOUT_DEFAULT_MS, SBN_COORD_FRAME_TIMEOUT_DEFAULT_MS,
          SBN_COORD_KEEPALIVE_DEFAULT_S, SBN_MAX_FRAME_FLOOR, SBN_MAX_FRAME_CEILING,
          SBN_MAX_FRAME_DEFAULT, SBN_COORD_MAX_CONNS_DEFAULT, SBN_COORD_MAX_JOBS_DEFAULT,
          SBN_COORD_MAX_GROUPS_DEFAULT, SBN_MAX_CHANNELS, SBN_MAX_CHANNELS,
          SBN_COORD_MAX_ROUNDS_DEFAULT, (unsigned long long)SBN_COORD_MAX_QUEUED_FLOOR,
          (unsigned long long)SBN_COORD_MAX_QUEUED_DEFAULT, SBN_DEFAULT_HOST,
          SBN_COORD_FLIGHT_ROUNDS_MAX, SBN_COORD_FLIGHT_ROUNDS_DEFAULT, SBN_COORD_SPIN_MAX_US);
}

static int bad_flag(const char *fmt, const char *flag, const char *value) {
  fprintf(stderr, "sbn-coordinator: ");
  fprintf(stderr, fmt, flag, value);
  fprintf(stderr, "\nTry 'sbn-coordinator --help'.\n");
  return EXIT_USAGE;
}

/* A numeric flag: its range, and where the value goes (u32 or u64). */
typedef struct num_flag {
  const char *name;
  uint64_t min, max;
  const char *unit;
  uint32_t *u32;
  uint64_t *u64;
} num_flag;

/*
 * Parses argv into cfg.  Returns -1 to go on, or an exit status (0 after
 * --help/--version, EXIT_USAGE for a bad flag).  Flags take their value as
 * the next argument or after '='.
 */
static int parse_args(int argc, char **argv, sbn__coord_config *cfg, int *want_notify) {
  const num_flag nums[] = {
      {"--round-timeout", 1, UINT32_MAX, "a number of milliseconds", &cfg->round_timeout_ms, NULL},
      {"--hello-timeout", 1, UINT32_MAX, "a number of milliseconds", &cfg->hello_timeout_ms, NULL},
      {"--frame-timeout", 1, UINT32_MAX, "a number of milliseconds", &cfg->frame_timeout_ms, NULL},
      {"--keepalive", 0, 86400, "a number of seconds", &cfg->keepalive_s, NULL},
      {"--max-frame", SBN_MAX_FRAME_FLOOR, SBN_MAX_FRAME_CEILING, "a byte count", &cfg->max_frame,
       NULL},
      {"--max-conns", 1, SBN_COORD_COUNT_LIMIT_MAX, "a count", &cfg->max_conns, NULL},
      {"--max-jobs", 1, SBN_COORD_COUNT_LIMIT_MAX, "a count", &cfg->max_jobs, NULL},
      {"--max-groups", 1, SBN_COORD_COUNT_LIMIT_MAX, "a count", &cfg->max_groups, NULL},
      {"--max-channels", 1, SBN_MAX_CHANNELS, "a count", &cfg->max_channels, NULL},
      {"--max-rounds", 1, SBN_COORD_COUNT_LIMIT_MAX, "a count", &cfg->max_rounds, NULL},
      {"--max-queued", SBN_COORD_MAX_QUEUED_FLOOR, SBN_COORD_MAX_QUEUED_CEILING, "a byte count",
       NULL, &cfg->max_queued},
      {"--stall-warn", 0, UINT32_MAX - 1, "a number of milliseconds", &cfg->stall_warn_ms, NULL},
      {"--flight-rounds", 0, SBN_COORD_FLIGHT_ROUNDS_MAX, "a count", &cfg->flight_rounds, NULL},
      {"--spin-us", 0, SBN_COORD_SPIN_MAX_US, "a number of microseconds", &cfg->spin_us, NULL},
  };
  const size_t nnums = sizeof(nums) / sizeof(nums[0]);
  for (int i = 1; i < argc; i++) {
    const char *arg = argv[i];
    char flag[64];
    const char *value = NULL;
    const char *eq = strchr(arg, '=');
    if (strncmp(arg, "--", 2) == 0 && eq != NULL && (size_t)(eq - arg) < sizeof(flag)) {
      memcpy(flag, arg, (size_t)(eq - arg));
      flag[eq - arg] = '\0';
      value = eq + 1;
    } else {
      snprintf(flag, sizeof(flag), "%s", arg);
    }
    if (strcmp(flag, "--help") == 0 || strcmp(flag, "-h") == 0) {
      usage(stdout);
      return 0;
    }
    if (strcmp(flag, "--version") == 0) {
      printf("sbn-coordinator %s (protocol %u)\n", SBN_VERSION_STRING, SBN_PROTOCOL_VERSION);
      return 0;
    }
    if (strcmp(flag, "--insecure") == 0 && value == NULL) {
      cfg->insecure = 1;
      continue;
    }
    if (strcmp(flag, "--notify") == 0 && value == NULL) {
      *want_notify = 1;
      continue;
    }
    const num_flag *nf = NULL;
    for (size_t k = 0; k < nnums; k++)
      if (strcmp(flag, nums[k].name) == 0)
        nf = &nums[k];
    int takes_value = nf != NULL || strcmp(flag, "--listen") == 0 ||
                      strcmp(flag, "--log-level") == 0 || strcmp(flag, "--secret-file") == 0 ||
                      strcmp(flag, "--metrics") == 0;
    if (!takes_value)
      return bad_flag("unknown option '%s'%s", arg, "");
    if (value == NULL) {
      if (i + 1 >= argc)
        return bad_flag("option '%s' needs a value%s", flag, "");
      value = argv[++i];
    }
    if (nf != NULL) {
      uint64_t v;
      if (sbn__parse_u64(value, nf->min, nf->max, &v) != 0) {
        fprintf(stderr, "sbn-coordinator: %s: '%s' is not %s from %llu to %llu\n", flag, value,
                nf->unit, (unsigned long long)nf->min, (unsigned long long)nf->max);
        return EXIT_USAGE;
      }
      if (nf->u32 != NULL)
        *nf->u32 = (uint32_t)v;
      else
        *nf->u64 = v;
    } else if (strcmp(flag, "--listen") == 0) {
      char err[256];
      if (sbn__parse_hostport(value, cfg->host, &cfg->port, err, sizeof(err)) != 0) {
        fprintf(stderr, "sbn-coordinator: --listen: %s\n", err);
        return EXIT_USAGE;
      }
    } else if (strcmp(flag, "--metrics") == 0) {
      /* A bare port means loopback: metrics are not authenticated. */
      char err[256];
      int port = -1;
      uint64_t v;
      snprintf(cfg->metrics_host, sizeof(cfg->metrics_host), "%s", SBN_DEFAULT_HOST);
      if (sbn__parse_u64(value, 0, 65535, &v) == 0) {
        port = (int)v;
      } else if (sbn__parse_hostport(value, cfg->metrics_host, &port, err, sizeof(err)) != 0) {
        fprintf(stderr, "sbn-coordinator: --metrics: %s\n", err);
        return EXIT_USAGE;
      }
      if (port < 0)
        return bad_flag("%s: '%s' has no port (HOST:PORT or PORT)", flag, value);
      cfg->metrics_port = port;
    } else if (strcmp(flag, "--secret-file") == 0) {
      char err[512];
      /* The path is named in messages, the content never. */
      if (sbn__secret_load(value, &cfg->secret, err, sizeof(err)) != 0) {
        fprintf(stderr, "sbn-coordinator: --secret-file: %s\n", err);
        return EXIT_USAGE;
      }
      if (cfg->secret.group_access)
        SBN_LOGW("secret file '%s' is accessible by its group; chmod 600 it unless the group "
                 "is meant to hold the secret",
                 value);
    } else {
      int level = sbn__log_parse_level(value);
      if (level < 0)
        return bad_flag("%s: '%s' is not one of error, warn, info, debug", flag, value);
      sbn__log_set_level(level);
    }
  }
  return -1;
}

/*
 * Every connection is a descriptor: raise the soft limit towards what
 * --max-conns needs, and say so when the hard limit is in the way.
 */
static void raise_fd_limit(uint32_t max_conns) {
  struct rlimit rl;
  rlim_t want = (rlim_t)max_conns + SBN_SRV_SPARE_FDS;
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur >= want)
    return;
  rlim_t old = rl.rlim_cur;
  rl.rlim_cur = rl.rlim_max == RLIM_INFINITY || rl.rlim_max >= want ? want : rl.rlim_max;
  if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
    rl.rlim_cur = old;
  if (rl.rlim_cur < want)
    SBN_LOGW("open files are limited to %llu, fewer than --max-conns %u needs; accepts beyond "
             "that fail",
             (unsigned long long)rl.rlim_cur, (unsigned)max_conns);
}

static void on_signal(uv_signal_t *s, int signum) {
  app *a = s->data;
  SBN_LOGI("received %s", signum == SIGINT ? "SIGINT" : "SIGTERM");
  sbn__notify_send(&a->notify, "STOPPING=1\nSTATUS=shutting down");
  sbn__coord_stop(a->coord);
  /* With the signal handles gone the loop ends once the coordinator's do. */
  uv_close((uv_handle_t *)&a->sigint, NULL);
  uv_close((uv_handle_t *)&a->sigterm, NULL);
  uv_close((uv_handle_t *)&a->sigusr1, NULL);
  uv_close((uv_handle_t *)&a->sighup, NULL);
  sbn__notify_close(&a->notify);
}

static void on_sigusr1(uv_signal_t *s, int signum) {
  app *a = s->data;
  (void)signum;
  sbn__coord_dump(a->coord);
}

/*
 * Nothing is re-read on SIGHUP: every setting is a flag, and the jobs' state
 * lives only in this process.  Changing the configuration is a restart
 * (workers then restart their job with a new generation).
 */
static void on_sighup(uv_signal_t *s, int signum) {
  (void)s;
  (void)signum;
  SBN_LOGW("received SIGHUP: there is nothing to reload; restart the coordinator to change its "
           "configuration (running jobs must then restart with a new generation)");
}

/*
 * Allreduce chunks make the coordinator allocate and free blocks of several
 * MiB every round (decoded contributions, the encoded reply).  By default
 * glibc serves those with mmap or trims them off the heap top again, so each
 * round pays a page fault per 4 KiB touched: most of its time.  Keeping such
 * blocks in the heap makes steady-state rounds fault-free; the price is that
 * up to SBN_SRV_TRIM_THRESHOLD of freed memory stays with the process.
 */
#define SBN_SRV_MMAP_THRESHOLD (64 * 1024 * 1024)
#define SBN_SRV_TRIM_THRESHOLD (256 * 1024 * 1024)
static void keep_large_blocks(void) {
  mallopt(M_MMAP_THRESHOLD, SBN_SRV_MMAP_THRESHOLD);
  mallopt(M_TRIM_THRESHOLD, SBN_SRV_TRIM_THRESHOLD);
}

int main(int argc, char **argv) {
#if defined(SBN_HEAP_WRAP)
  /* libuv allocates through the same (wrapped) functions: all are counted. */
  sbn__srv_heap_enable();
  uv_replace_allocator(malloc, realloc, calloc, free);
#endif
  sbn__coord_config cfg;
  sbn__coord_config_init(&cfg);
  int want_notify = 0;
  int rc = parse_args(argc, argv, &cfg, &want_notify);
  if (rc >= 0)
    return rc;
  /* A peer that vanishes must cost a write error, not the process. */
  signal(SIGPIPE, SIG_IGN);
  raise_fd_limit(cfg.max_conns);
  keep_large_blocks();

  app a;
  memset(&a, 0, sizeof(a));
  a.want_notify = want_notify;
  if (uv_loop_init(&a.loop) != 0) {
    SBN_LOGE("cannot create the event loop");
    return EXIT_FAILURE;
  }
  rc = sbn__coord_new(&a.loop, &cfg, &a.coord);
  sbn__secret_wipe(&cfg.secret); /* the coordinator holds its own copy */
  if (rc != 0) {
    uv_loop_close(&a.loop);
    return EXIT_FAILURE;
  }
  char addr[ADDR_MAX];
  int status = EXIT_SUCCESS;
  if (sbn__coord_start(a.coord, addr, sizeof(addr)) != 0) {
    status = EXIT_FAILURE;
  } else {
    a.sigint.data = a.sigterm.data = a.sigusr1.data = a.sighup.data = &a;
    uv_signal_init(&a.loop, &a.sigint);
    uv_signal_init(&a.loop, &a.sigterm);
    uv_signal_init(&a.loop, &a.sigusr1);
    uv_signal_init(&a.loop, &a.sighup);
    uv_signal_start(&a.sigint, on_signal, SIGINT);
    uv_signal_start(&a.sigterm, on_signal, SIGTERM);
    uv_signal_start(&a.sigusr1, on_sigusr1, SIGUSR1);
    uv_signal_start(&a.sighup, on_sighup, SIGHUP);
    /* Tests and launchers wait for this first line to learn the port; the
     * metrics address (with --metrics) comes on the line after it. */
    printf("sbn-coordinator listening on %s\n", addr);
    if (sbn__coord_metrics_addr(a.coord)[0])
      printf("sbn-coordinator metrics on %s\n", sbn__coord_metrics_addr(a.coord));
    fflush(stdout);
    if (sbn__notify_init(&a.notify, &a.loop)) {
      char msg[2 * ADDR_MAX];
      const char *maddr = sbn__coord_metrics_addr(a.coord);
      snprintf(msg, sizeof(msg), "READY=1\nSTATUS=listening on %s%s%s", addr,
               maddr[0] ? ", metrics on " : "", maddr);
      sbn__notify_send(&a.notify, msg);
    } else if (a.want_notify) {
      SBN_LOGW("--notify: NOTIFY_SOCKET is not set, so there is no service manager to notify");
    }
  }
  sbn__coord_run(a.coord);
  sbn__coord_free(a.coord);
  rc = uv_loop_close(&a.loop);
  if (rc != 0) {
    SBN_LOGE("event loop still has handles at exit: %s", uv_strerror(rc));
    status = EXIT_FAILURE;
  }
  SBN_LOGI("stopped");
  return status;
}
