/*
 * main.c - sbn-coordinator: command line, signals, and the loop.
 *
 * Everything else lives in the coordinator object (coordinator.h), so this
 * file only turns flags into a configuration and SIGINT/SIGTERM into a clean
 * stop.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "coordinator.h"
#include "frame.h"
#include "log.h"
#include "sbn/sbn.h"
#include "util.h"

/* Exit status for a bad command line, as getopt-based tools use. */
#define EXIT_USAGE 2
#define ADDR_MAX 300

typedef struct app {
  uv_loop_t loop;
  uv_signal_t sigint, sigterm;
  sbn__coord *coord;
} app;

static void usage(FILE *out) {
  fprintf(out,
          "usage: sbn-coordinator [options]\n"
          "\n"
          "Merges SyncBatchNorm statistics of the workers of a training job.\n"
          "\n"
          "  --listen HOST:PORT    address to listen on (default %s:%d; port 0 picks one)\n"
          "  --round-timeout MS    fail a round not complete within MS (default %u)\n"
          "  --hello-timeout MS    close a connection without hello within MS (default %u)\n"
          "  --max-frame BYTES     largest frame accepted, %u..%u (default %u)\n"
          "  --log-level LEVEL     error, warn, info or debug (default info)\n"
          "  --help                show this help\n"
          "  --version             show the version\n",
          SBN_DEFAULT_HOST, SBN_DEFAULT_PORT, SBN_COORD_ROUND_TIMEOUT_DEFAULT_MS,
          SBN_COORD_HELLO_TIMEOUT_DEFAULT_MS, SBN_MAX_FRAME_FLOOR, SBN_MAX_FRAME_CEILING,
          SBN_MAX_FRAME_DEFAULT);
}

static int bad_flag(const char *fmt, const char *flag, const char *value) {
  fprintf(stderr, "sbn-coordinator: ");
  fprintf(stderr, fmt, flag, value);
  fprintf(stderr, "\nTry 'sbn-coordinator --help'.\n");
  return EXIT_USAGE;
}

/*
 * Parses argv into cfg.  Returns -1 to go on, or an exit status (0 after
 * --help/--version, EXIT_USAGE for a bad flag).  Flags take their value as
 * the next argument or after '='.
 */
static int parse_args(int argc, char **argv, sbn__coord_config *cfg) {
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
    int takes_value = strcmp(flag, "--listen") == 0 || strcmp(flag, "--round-timeout") == 0 ||
                      strcmp(flag, "--hello-timeout") == 0 || strcmp(flag, "--max-frame") == 0 ||
                      strcmp(flag, "--log-level") == 0;
    if (!takes_value)
      return bad_flag("unknown option '%s'%s", arg, "");
    if (value == NULL) {
      if (i + 1 >= argc)
        return bad_flag("option '%s' needs a value%s", flag, "");
      value = argv[++i];
    }
    uint64_t v;
    if (strcmp(flag, "--listen") == 0) {
      char err[256];
      if (sbn__parse_hostport(value, cfg->host, &cfg->port, err, sizeof(err)) != 0) {
        fprintf(stderr, "sbn-coordinator: --listen: %s\n", err);
        return EXIT_USAGE;
      }
    } else if (strcmp(flag, "--round-timeout") == 0) {
      if (sbn__parse_u64(value, 1, UINT32_MAX, &v) != 0)
        return bad_flag("%s: '%s' is not a number of milliseconds from 1 to 4294967295", flag,
                        value);
      cfg->round_timeout_ms = (uint32_t)v;
    } else if (strcmp(flag, "--hello-timeout") == 0) {
      if (sbn__parse_u64(value, 1, UINT32_MAX, &v) != 0)
        return bad_flag("%s: '%s' is not a number of milliseconds from 1 to 4294967295", flag,
                        value);
      cfg->hello_timeout_ms = (uint32_t)v;
    } else if (strcmp(flag, "--max-frame") == 0) {
      if (sbn__parse_u64(value, SBN_MAX_FRAME_FLOOR, SBN_MAX_FRAME_CEILING, &v) != 0) {
        fprintf(stderr, "sbn-coordinator: --max-frame: '%s' is not a byte count from %u to %u\n",
                value, SBN_MAX_FRAME_FLOOR, SBN_MAX_FRAME_CEILING);
        return EXIT_USAGE;
      }
      cfg->max_frame = (uint32_t)v;
    } else {
      int level = sbn__log_parse_level(value);
      if (level < 0)
        return bad_flag("%s: '%s' is not one of error, warn, info, debug", flag, value);
      sbn__log_set_level(level);
    }
  }
  return -1;
}

static void on_signal(uv_signal_t *s, int signum) {
  app *a = s->data;
  SBN_LOGI("received %s", signum == SIGINT ? "SIGINT" : "SIGTERM");
  sbn__coord_stop(a->coord);
  /* With the signal handles gone the loop ends once the coordinator's do. */
  uv_close((uv_handle_t *)&a->sigint, NULL);
  uv_close((uv_handle_t *)&a->sigterm, NULL);
}

int main(int argc, char **argv) {
  sbn__coord_config cfg;
  sbn__coord_config_init(&cfg);
  int rc = parse_args(argc, argv, &cfg);
  if (rc >= 0)
    return rc;
  /* A peer that vanishes must cost a write error, not the process. */
  signal(SIGPIPE, SIG_IGN);

  app a;
  memset(&a, 0, sizeof(a));
  if (uv_loop_init(&a.loop) != 0) {
    SBN_LOGE("cannot create the event loop");
    return EXIT_FAILURE;
  }
  if (sbn__coord_new(&a.loop, &cfg, &a.coord) != 0) {
    uv_loop_close(&a.loop);
    return EXIT_FAILURE;
  }
  char addr[ADDR_MAX];
  int status = EXIT_SUCCESS;
  if (sbn__coord_start(a.coord, addr, sizeof(addr)) != 0) {
    status = EXIT_FAILURE;
  } else {
    a.sigint.data = a.sigterm.data = &a;
    uv_signal_init(&a.loop, &a.sigint);
    uv_signal_init(&a.loop, &a.sigterm);
    uv_signal_start(&a.sigint, on_signal, SIGINT);
    uv_signal_start(&a.sigterm, on_signal, SIGTERM);
    /* Tests and launchers wait for exactly this line to learn the port. */
    printf("sbn-coordinator listening on %s\n", addr);
    fflush(stdout);
  }
  uv_run(&a.loop, UV_RUN_DEFAULT);
  sbn__coord_free(a.coord);
  rc = uv_loop_close(&a.loop);
  if (rc != 0) {
    SBN_LOGE("event loop still has handles at exit: %s", uv_strerror(rc));
    status = EXIT_FAILURE;
  }
  SBN_LOGI("stopped");
  return status;
}
