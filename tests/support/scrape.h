/*
 * scrape.h - an HTTP client on a raw socket for the coordinator's metrics
 * port, and readers of a coordinator's captured log.  Every wait is bounded.
 */
#ifndef SBN_TEST_SCRAPE_H
#define SBN_TEST_SCRAPE_H

#include <stddef.h>

#define SCRAPE_TIMEOUT_MS 3000

/*
 * Sends `request` (raw bytes, e.g. "GET /metrics HTTP/1.1\r\n\r\n") to
 * 127.0.0.1:port and reads until the server closes or timeout_ms passes.
 * Returns the malloc'd response (NUL-terminated), or NULL when the
 * connection failed; *closed says whether the server closed it in time.
 */
char *http_raw(int port, const char *request, int timeout_ms, int *closed);
/* GET path; returns the response or NULL. */
char *http_get(int port, const char *path);
/* The status code of a response ("HTTP/1.1 200 OK" gives 200), or -1. */
int http_status(const char *resp);
/* The body of a response (after the empty line), or "". */
const char *http_body(const char *resp);
/*
 * The value of the sample `series` (name with its labels exactly as
 * exposed, e.g. "sbn_rounds_total{phase=\"forward\",outcome=\"ok\"}") in a
 * Prometheus text body, or -1 when absent.
 */
double metric_value(const char *body, const char *series);
/* GET /metrics and metric_value(); asserts the scrape worked. */
double scrape(int port, const char *series);

/* The whole file at path (malloc'd, NUL-terminated), or NULL. */
char *read_file(const char *path);
/* Waits until the file at path holds needle; returns 1, or 0 at timeout. */
int log_wait(const char *path, const char *needle, int timeout_ms);
/* How many times needle occurs in the file at path. */
int log_count(const char *path, const char *needle);
/* The metrics port the coordinator logged ("metrics listening on
 * http://127.0.0.1:PORT/"), or -1. */
int log_metrics_port(const char *path);
/* A fresh temporary file name for a coordinator log (the file is created). */
void temp_log_path(char *out, size_t len);

struct coord_proc;
/*
 * Starts a coordinator with "--metrics metrics_addr" and the extra arguments,
 * its stderr logged to a fresh file (path written to log_path), and returns
 * the metrics port read from that log.  Asserts on failure.
 */
int observed_start(struct coord_proc *cp, const char *metrics_addr, const char *const *extra,
                   char *log_path, size_t log_len);
/* SIGTERM, asserts a clean exit 0, removes the log. */
void observed_stop(struct coord_proc *cp, const char *log_path);

#endif
