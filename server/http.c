/*
 * http.c - a minimal HTTP/1.1 server on the coordinator's loop for
 * Prometheus scrapes (/metrics), Kubernetes probes (/healthz) and the flight
 * recorder (/debug/rounds).
 *
 * One request per connection: the server reads a request of at most
 * SBN_HTTP_REQUEST_MAX bytes and SBN_HTTP_HEADERS_MAX header lines, answers
 * with "Connection: close" and closes.  Only GET is served.  A connection
 * that has not been answered and flushed within SBN_HTTP_TIMEOUT_MS is
 * dropped, and at most SBN_HTTP_CONNS_MAX are open at once, so a slow or
 * hostile client costs a bounded amount of memory and never the workers'
 * service: every answer is computed synchronously from state in memory.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coord_internal.h"
#include "heap.h"
#include "log.h"
#include "sbn/status.h"

/* A request line plus headers; more is answered with 431. */
#define SBN_HTTP_REQUEST_MAX 8192u
#define SBN_HTTP_HEADERS_MAX 64u
/* From accept to the last byte of the answer written. */
#define SBN_HTTP_TIMEOUT_MS 5000u
/* Scrapers and probes open a connection or two; more are closed at once. */
#define SBN_HTTP_CONNS_MAX 32u
/* The largest answer (a /debug/rounds dump of many jobs); the rest is cut. */
#define SBN_HTTP_RESPONSE_MAX (16u * 1024u * 1024u)
#define SBN_HTTP_BACKLOG 64
#define SBN_HTTP_QUERY_MAX 256u

typedef struct http_conn http_conn;

struct sbn__http {
  sbn__coord *coord;
  uv_tcp_t listener;
  int closed; /* the listener and every connection have been told to close */
  http_conn *conns;
  unsigned nconns;
  sbn__srv_refuser refuse; /* the listener's connections without memory */
};

struct http_conn {
  uv_tcp_t tcp;
  uv_timer_t timer; /* the whole life of the connection */
  uv_write_t wreq;
  uv_shutdown_t sreq;
  sbn__http *srv;
  http_conn *prev, *next;
  int handles_open;
  int closing;
  int answered;
  sbn__sbuf resp; /* status line, headers and body */
  size_t len;
  char req[SBN_HTTP_REQUEST_MAX + 1];
};

/* Connections */

static void hc_on_close(uv_handle_t *h) {
  http_conn *hc = h->data;
  if (--hc->handles_open > 0)
    return;
  sbn__http *srv = hc->srv;
  if (hc->prev != NULL)
    hc->prev->next = hc->next;
  else
    srv->conns = hc->next;
  if (hc->next != NULL)
    hc->next->prev = hc->prev;
  srv->nconns--;
  sbn__sbuf_release(&hc->resp);
  free(hc);
}

static void hc_close(http_conn *hc) {
  if (hc->closing)
    return;
  hc->closing = 1;
  uv_read_stop((uv_stream_t *)&hc->tcp);
  uv_close((uv_handle_t *)&hc->tcp, hc_on_close);
  uv_close((uv_handle_t *)&hc->timer, hc_on_close);
}

static void hc_on_timeout(uv_timer_t *t) {
  hc_close(t->data);
}

static void hc_on_shutdown(uv_shutdown_t *req, int status) {
  (void)status;
  hc_close(req->data);
}

static void hc_on_write(uv_write_t *req, int status) {
  http_conn *hc = req->data;
  if (status < 0 || hc->closing) {
    hc_close(hc);
    return;
  }
  hc->sreq.data = hc;
  if (uv_shutdown(&hc->sreq, (uv_stream_t *)&hc->tcp, hc_on_shutdown) != 0)
    hc_close(hc);
}

static const char *reason_phrase(int status) {
  switch (status) {
  case 200: return "OK";
  case 400: return "Bad Request";
  case 404: return "Not Found";
  case 405: return "Method Not Allowed";
  case 431: return "Request Header Fields Too Large";
  case 500: return "Internal Server Error";
  case 503: return "Service Unavailable";
  default: return "Error";
  }
}

static void hc_answer(http_conn *hc, int status, const char *ctype, const sbn__sbuf *body) {
  hc->answered = 1;
  uv_read_stop((uv_stream_t *)&hc->tcp);
  sbn__sbuf_init(&hc->resp, SBN_HTTP_RESPONSE_MAX + 1024);
  sbn__sbuf_printf(&hc->resp,
                   "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                   "Cache-Control: no-store\r\nConnection: close\r\n%s\r\n",
                   status, reason_phrase(status), ctype, body->len,
                   status == 405 ? "Allow: GET\r\n" : "");
  if (body->len > 0)
    sbn__sbuf_add(&hc->resp, body->data, body->len);
  if (hc->resp.oom || hc->resp.truncated || hc->resp.len == 0) {
    hc_close(hc);
    return;
  }
  uv_buf_t buf = uv_buf_init(hc->resp.data, (unsigned)hc->resp.len);
  hc->wreq.data = hc;
  if (uv_write(&hc->wreq, (uv_stream_t *)&hc->tcp, &buf, 1, hc_on_write) != 0)
    hc_close(hc);
}

static void hc_answer_text(http_conn *hc, int status, const char *text) {
  sbn__sbuf b;
  sbn__sbuf_init(&b, 256);
  sbn__sbuf_printf(&b, "%s\n", text);
  hc_answer(hc, status, "text/plain; charset=utf-8", &b);
  sbn__sbuf_release(&b);
}

/* Requests */

/* The end of the header block (just past the empty line), or NULL. */
static const char *headers_end(const char *s, size_t len) {
  for (size_t i = 0; i + 1 < len; i++) {
    if (s[i] != '\n')
      continue;
    if (s[i + 1] == '\n')
      return s + i + 2;
    if (s[i + 1] == '\r' && i + 2 < len && s[i + 2] == '\n')
      return s + i + 3;
  }
  return NULL;
}

static size_t count_lines(const char *s, size_t len) {
  size_t n = 0;
  for (size_t i = 0; i < len; i++)
    n += s[i] == '\n';
  return n;
}

/* A whole request is in hc->req: parse the request line and answer. */
static void hc_handle(http_conn *hc, size_t reqlen) {
  /* The request line and the empty line are not headers. */
  if (count_lines(hc->req, reqlen) > SBN_HTTP_HEADERS_MAX + 2) {
    hc_answer_text(hc, 431, "too many header lines");
    return;
  }
  char *line = hc->req;
  char *eol = memchr(line, '\n', reqlen);
  *eol = '\0';
  if (eol > line && eol[-1] == '\r')
    eol[-1] = '\0';
  char *save = NULL;
  char *method = strtok_r(line, " ", &save);
  char *target = strtok_r(NULL, " ", &save);
  char *version = strtok_r(NULL, " ", &save);
  if (method == NULL || target == NULL || version == NULL || strtok_r(NULL, " ", &save) != NULL ||
      strncmp(version, "HTTP/1.", 7) != 0 || target[0] != '/') {
    hc_answer_text(hc, 400, "bad request line");
    return;
  }
  sbn__sbuf body;
  const char *ctype = "text/plain; charset=utf-8";
  sbn__sbuf_init(&body, SBN_HTTP_RESPONSE_MAX);
  int status = sbn__http_respond(hc->srv->coord, method, target, &body, &ctype);
  hc_answer(hc, status, ctype, &body);
  sbn__sbuf_release(&body);
}

static void hc_on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  http_conn *hc = h->data;
  (void)suggested;
  size_t room = SBN_HTTP_REQUEST_MAX - hc->len;
  *buf = uv_buf_init(room > 0 ? hc->req + hc->len : NULL, (unsigned)room);
}

static void hc_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  http_conn *hc = s->data;
  (void)buf;
  if (nread == 0 || hc->answered || hc->closing)
    return;
  if (nread < 0 && nread != UV_ENOBUFS) {
    hc_close(hc); /* gone before a whole request: nobody to answer */
    return;
  }
  if (nread > 0)
    hc->len += (size_t)nread;
  hc->req[hc->len] = '\0';
  const char *end = headers_end(hc->req, hc->len);
  if (end != NULL) {
    hc_handle(hc, (size_t)(end - hc->req));
    return;
  }
  if (hc->len >= SBN_HTTP_REQUEST_MAX) {
    hc_answer_text(hc, 431, "request too large");
    return;
  }
  if (count_lines(hc->req, hc->len) > SBN_HTTP_HEADERS_MAX + 1)
    hc_answer_text(hc, 431, "too many header lines");
}

/* The endpoint's own allocations (accepting, answering) are not counted in
 * sbn_heap_allocations_total (heap.h); the others free or allocate nothing. */
static void hc_on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  sbn__srv_heap_pause(1);
  hc_read(s, nread, buf);
  sbn__srv_heap_pause(-1);
}

static void http_on_connection(uv_stream_t *server, int status);

static void http_accept(uv_stream_t *server, int status) {
  sbn__http *srv = server->data;
  if (status < 0 || srv->closed)
    return;
  http_conn *hc = calloc(1, sizeof(*hc));
  if (hc == NULL) {
    SBN_LOGE("out of memory accepting a metrics connection: closing it");
    sbn__srv_refuse(&srv->refuse, server, http_on_connection);
    return;
  }
  hc->srv = srv;
  hc->tcp.data = hc->timer.data = hc;
  uv_tcp_init(srv->coord->loop, &hc->tcp);
  uv_timer_init(srv->coord->loop, &hc->timer);
  hc->handles_open = 2;
  hc->next = srv->conns;
  if (srv->conns != NULL)
    srv->conns->prev = hc;
  srv->conns = hc;
  srv->nconns++;
  if (uv_accept(server, (uv_stream_t *)&hc->tcp) != 0 || srv->nconns > SBN_HTTP_CONNS_MAX) {
    hc_close(hc);
    return;
  }
  uv_timer_start(&hc->timer, hc_on_timeout, SBN_HTTP_TIMEOUT_MS, 0);
  if (uv_read_start((uv_stream_t *)&hc->tcp, hc_on_alloc, hc_on_read) != 0)
    hc_close(hc);
}

static void http_on_connection(uv_stream_t *server, int status) {
  sbn__srv_heap_pause(1);
  http_accept(server, status);
  sbn__srv_heap_pause(-1);
}

/* Routes */

static int hexval(char ch) {
  if (ch >= '0' && ch <= '9')
    return ch - '0';
  if (ch >= 'a' && ch <= 'f')
    return ch - 'a' + 10;
  if (ch >= 'A' && ch <= 'F')
    return ch - 'A' + 10;
  return -1;
}

/*
 * The value of query parameter `name` in query (after '?'), percent-decoded
 * into out.  Returns 1 when present, 0 when not.
 */
static int query_param(const char *query, const char *name, char *out, size_t outlen) {
  size_t nlen = strlen(name);
  for (const char *p = query; p != NULL && *p != '\0';) {
    const char *amp = strchr(p, '&');
    const char *end = amp ? amp : p + strlen(p);
    if ((size_t)(end - p) > nlen && strncmp(p, name, nlen) == 0 && p[nlen] == '=') {
      size_t k = 0;
      for (const char *v = p + nlen + 1; v < end && k + 1 < outlen; v++) {
        if (*v == '%' && end - v >= 3 && hexval(v[1]) >= 0 && hexval(v[2]) >= 0) {
          out[k++] = (char)(hexval(v[1]) * 16 + hexval(v[2]));
          v += 2;
        } else {
          out[k++] = *v == '+' ? ' ' : *v;
        }
      }
      out[k] = '\0';
      return 1;
    }
    p = amp ? amp + 1 : NULL;
  }
  return 0;
}

int sbn__http_respond(sbn__coord *c, const char *method, const char *target, sbn__sbuf *out,
                      const char **content_type) {
  static const char *const text = "text/plain; charset=utf-8";
  *content_type = text;
  if (strcmp(method, "GET") != 0) {
    sbn__sbuf_printf(out, "only GET is served\n");
    return 405;
  }
  const char *q = strchr(target, '?');
  size_t plen = q ? (size_t)(q - target) : strlen(target);
  const char *query = q ? q + 1 : "";
  if (plen == 8 && strncmp(target, "/metrics", plen) == 0) {
    *content_type = "text/plain; version=0.0.4; charset=utf-8";
    sbn__metrics_write(c, out);
  } else if (plen == 8 && strncmp(target, "/healthz", plen) == 0) {
    sbn__sbuf_printf(out, "%s\n", c->stopping ? "shutting down" : "ok");
    return c->stopping ? 503 : 200;
  } else if (plen == 13 && strncmp(target, "/debug/rounds", plen) == 0) {
    char job[SBN_HTTP_QUERY_MAX], fmt[16];
    int has_job = query_param(query, "job", job, sizeof(job));
    int json = query_param(query, "format", fmt, sizeof(fmt)) && strcmp(fmt, "json") == 0;
    if (json)
      *content_type = "application/x-ndjson";
    if (sbn__flight_write(c, has_job ? job : NULL, json, out) == 0 && has_job)
      return 404;
  } else {
    sbn__sbuf_printf(out, "not found; try /metrics, /healthz or /debug/rounds\n");
    return 404;
  }
  if (out->oom) {
    out->len = 0;
    sbn__sbuf_printf(out, "out of memory\n");
    return 500;
  }
  return 200;
}

/* Server */

static int resolve(uv_loop_t *loop, const char *host, int port, struct sockaddr_storage *ss) {
  memset(ss, 0, sizeof(*ss));
  if (uv_ip4_addr(host, port, (struct sockaddr_in *)ss) == 0)
    return 0;
  if (uv_ip6_addr(host, port, (struct sockaddr_in6 *)ss) == 0)
    return 0;
  uv_getaddrinfo_t req;
  struct addrinfo hints;
  memset(&hints, 0, sizeof(hints));
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  int rc = uv_getaddrinfo(loop, &req, NULL, host, NULL, &hints); /* once, at start */
  if (rc != 0)
    return rc;
  memcpy(ss, req.addrinfo->ai_addr, req.addrinfo->ai_addrlen);
  if (ss->ss_family == AF_INET)
    ((struct sockaddr_in *)ss)->sin_port = htons((uint16_t)port);
  else
    ((struct sockaddr_in6 *)ss)->sin6_port = htons((uint16_t)port);
  uv_freeaddrinfo(req.addrinfo);
  return 0;
}

int sbn__http_start(sbn__coord *c, char *addr, size_t addrlen) {
  struct sockaddr_storage ss;
  int rc = resolve(c->loop, c->cfg.metrics_host, c->cfg.metrics_port, &ss);
  if (rc != 0) {
    SBN_LOGE("--metrics: cannot resolve '%s': %s", c->cfg.metrics_host, uv_strerror(rc));
    return SBN_EIO;
  }
  sbn__http *srv = calloc(1, sizeof(*srv));
  if (srv == NULL)
    return SBN_ENOMEM;
  srv->coord = c;
  c->http = srv;
  uv_tcp_init(c->loop, &srv->listener);
  srv->listener.data = srv;
  rc = uv_tcp_bind(&srv->listener, (struct sockaddr *)&ss, 0);
  if (rc == 0)
    rc = uv_listen((uv_stream_t *)&srv->listener, SBN_HTTP_BACKLOG, http_on_connection);
  if (rc != 0) {
    SBN_LOGE("--metrics: cannot listen on %s:%d: %s", c->cfg.metrics_host, c->cfg.metrics_port,
             uv_strerror(rc));
    srv->closed = 1;
    uv_close((uv_handle_t *)&srv->listener, NULL);
    return SBN_EIO;
  }
  int len = sizeof(ss);
  char ip[INET6_ADDRSTRLEN] = "?";
  uv_tcp_getsockname(&srv->listener, (struct sockaddr *)&ss, &len);
  if (ss.ss_family == AF_INET6) {
    uv_ip6_name((struct sockaddr_in6 *)&ss, ip, sizeof(ip));
    snprintf(addr, addrlen, "[%s]:%d", ip, ntohs(((struct sockaddr_in6 *)&ss)->sin6_port));
  } else {
    uv_ip4_name((struct sockaddr_in *)&ss, ip, sizeof(ip));
    snprintf(addr, addrlen, "%s:%d", ip, ntohs(((struct sockaddr_in *)&ss)->sin_port));
  }
  SBN_LOGI("metrics listening on http://%s/metrics (also /healthz, /debug/rounds; no "
           "authentication: keep this port on a trusted network)",
           addr);
  return SBN_OK;
}

static void http_close(sbn__http *srv) {
  if (srv->closed)
    return;
  srv->closed = 1;
  uv_close((uv_handle_t *)&srv->listener, NULL);
  for (http_conn *hc = srv->conns; hc != NULL; hc = hc->next)
    hc_close(hc);
}

void sbn__http_stopping(sbn__coord *c) {
  /* Probes see 503 for as long as workers are still being flushed. */
  if (c->http != NULL && c->conns == NULL)
    http_close(c->http);
}

void sbn__http_conn_freed(sbn__coord *c) {
  if (c->http != NULL && c->stopping && c->conns == NULL)
    http_close(c->http);
}

void sbn__http_free(sbn__coord *c) {
  free(c->http);
  c->http = NULL;
}
